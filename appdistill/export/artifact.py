"""Serving artefact: ``appdistill export RUN_DIR --out DIR`` and :class:`Ranker` (``score``).

The artefact holds the plain student only — never a teacher, an encoder, or a method module
(asserted on export) — with everything needed to turn raw request rows into scores:

* ``model.pt2``: the student compiled with ``torch.export`` (dynamic batch and id-list sizes), for
  other runtimes; :class:`Ranker` never loads it (see "Loading runs no code" below);
* ``weights.pt``: the same weights as a state dict (``weights_only`` loading);
* ``student.json``: architecture; ``features.json``: the spec subset the student needs;
* ``processor.json``: fitted vocabularies (unseen ids -> OOV) and dense transforms;
* ``manifest.json``: versions, training config, teacher identities, metrics and a sha256 per file.

Export is all-or-nothing: the files are written into a temporary sibling directory, checked, and
only then moved into place, so a failed export (truncated checkpoint, checkpoint of another spec)
leaves ``--out`` exactly as it was. An existing ``--out`` is replaced only when it is an earlier
export (it holds nothing but export files); any other non-empty directory is refused. Staging
directories left by a killed export are removed by the next export to the same place (each live one
is ``flock``-ed by its export, so a running export's staging directory is never touched). Export holds
the run directory's lock (:func:`appdistill.train.io.run_lock`): it is refused while a ``train`` or
another export writes there.

Loading runs no code: ``torch.export.load`` unpickles parts of a ``.pt2`` archive with
``torch.load(weights_only=False)`` (weights or constants marked ``use_pickle``, sample inputs that fail
the weights-only load) and evaluates expression strings from it, so a tampered archive would execute
code before any check could fail -- and the sha256 in ``manifest.json`` sits in the same folder, so
it proves nothing against an attacker. :class:`Ranker` therefore never hands ``model.pt2`` to torch:
it rebuilds the program with ``torch.export.export`` from ``weights.pt`` (``weights_only=True``) and
``student.json`` (bit-identical scores; it costs about what ``torch.export.load`` did, ~1 s), and it
refuses an archive that carries a pickled payload (:func:`check_pt2_archive`, pure-Python
inspection before anything is deserialised), so a tampered export is reported, not served.

Input rows (one per candidate, raw values as in the training tables, joined like the training
data: interactions columns + the item's and the user's side-table columns) follow the training
transforms exactly:

=====================  ==================================================================================
column kind             serving rule (same as training unless noted)
=====================  ==================================================================================
missing column          error naming the file and the columns
duplicate column        a needed column that appears twice: error naming it
extra columns           ignored
``sparse_id``           unseen id -> OOV row; ids are categorical and cast to the vocabulary's key type
                        (``50``, ``50.0`` and ``"50"`` are the same integer id; a string that is not an
                        integer is an unseen id -> OOV); a number with a fractional part (``50.5``),
                        ``inf``, a boolean, a date/time, bytes, a complex number or a container
                        (list, dict, set) is an error naming file, column and first bad row
NaN ``sparse_id``       side-table feature (``users``/``items``: gender, occupation...) or a feature with
                        ``missing: oov``: OOV, exactly what training gives a row whose key is missing
                        from that table (a failed left join); otherwise (the request keys
                        ``user_id``/``item_id``): error naming file, column and row (training refuses
                        NaN there too)
``id_list``             separator strings or list cells; NaN/empty cell -> empty list (training's missing
                        row); unseen ids -> OOV; elements follow the ``sparse_id`` rules
``dense``               ints, floats, booleans (0/1) and numeric strings; NaN/None -> the training mean
                        (the fitted transform's imputation, as in training); ``inf``, a value beyond
                        float32 (``|x| > 3.4e38``) or one the transform takes beyond it, a value that is
                        not a number (``"abc"``, a date, a list, a complex number) -> error naming file,
                        column, row, value
=====================  ==================================================================================

Rows are numbered from 0 in file order (row 0 = the first data row of a CSV).

Example:
    >>> ranker = Ranker.load("export/")
    >>> scores = ranker.score(pd.DataFrame({"user_id": [1], "item_id": [50], ...}))   # [N] probabilities
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickletools
import platform
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from appdistill.errors import AppDistillError
from appdistill.export.serving import ServingModel
from appdistill.features import content as content_files
from appdistill.features.content import CONTENT_DIR, ContentTable
from appdistill.features.processor import FeatureProcessor
from appdistill.features.spec import FeatureSpec
from appdistill.features.vocab import (Vocabulary, first_out_of_float32, normalize_ids, odd_id, odd_id_message,
                                       odd_id_value, out_of_float32_message)
from appdistill.student.model import RankingModel, StudentConfig
from appdistill.train.io import atomic_write_bytes, atomic_write_text, load_checkpoint, run_lock, sha256_file

FILES = ("model.pt2", "weights.pt", "student.json", "features.json", "processor.json")
REQUIRED = ("weights.pt", "student.json", "features.json", "processor.json")
MANIFEST = "manifest.json"
FORMAT = "appdistill-export/1"
STUDENT_PREFIXES = ("ebc.", "dense_arch.", "interaction.", "over_arch.", "content_proj.")
CONTENT_FILES = tuple(f"{CONTENT_DIR}/{f}" for f in content_files.FILES)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AppDistillError(f"file '{path}': {what} is unreadable or not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------- export
def load_student(run_dir: str | Path) -> tuple[RankingModel, list[FeatureSpec], FeatureProcessor, dict[str, Any]]:
    """Rebuild the trained student of a run directory from its checkpoint (no training data needed).

    Raises:
        AppDistillError: a missing, truncated or foreign checkpoint (another spec, another run's
            vocabularies), an unreadable ``spec.json``/``processor.json``.
    """
    from appdistill.config import config_from_dict
    from appdistill.features.spec import FeatureSpecSet
    from appdistill.train.loop import student_config

    run = Path(run_dir)
    if not run.is_dir():
        raise AppDistillError(f"run directory '{run}' not found")
    for f in ("checkpoint.pt", "processor.json", "spec.json"):
        if not (run / f).is_file():
            raise AppDistillError(f"run directory '{run}': missing '{f}' (is this a finished `appdistill train` run?)")
    ck_path = run / "checkpoint.pt"
    ck = load_checkpoint(ck_path, warn_unverified=True)
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("config"), dict):
        raise AppDistillError(f"file '{ck_path}': not a student checkpoint of `appdistill train` "
                              "(no 'model'/'config' entries)")
    cfg = config_from_dict(ck["config"], source=f"{ck_path} (config)")
    raw = _read_json(run / "spec.json", "the run's feature spec")
    spec = FeatureSpecSet.from_dict(raw, source=str(run / "spec.json"),
                                    base_dir=raw.get("base_dir", ".") if isinstance(raw, dict) else ".")
    want = ck.get("spec_fingerprint")
    if want and spec.fingerprint() != want:
        raise AppDistillError(
            f"file '{ck_path}': the checkpoint was trained with feature spec {want}, but '{run / 'spec.json'}' "
            f"is spec {spec.fingerprint()} (checkpoint copied from another run, or spec.json edited); "
            "export the run directory that produced this checkpoint")
    try:
        proc = FeatureProcessor.from_json((run / "processor.json").read_text())
    except (KeyError, TypeError, ValueError) as e:
        raise AppDistillError(f"file '{run / 'processor.json'}': not a fitted feature processor ({e})") from e
    feats = spec.visible("student")
    missing = [f.name for f in feats if f.kind in ("sparse_id", "id_list") and f.name not in proc.vocabs]
    missing += [f.name for f in feats if f.kind == "dense" and f.name not in proc.dense]
    if missing:
        raise AppDistillError(f"file '{run / 'processor.json'}': no fitted vocabulary/transform for student "
                              f"features {missing} of '{run / 'spec.json'}' (files from different runs?)")
    scfg = student_config(cfg, spec)
    if scfg.content_dim and not (run / CONTENT_DIR / "table.json").is_file():
        raise AppDistillError(f"run directory '{run}': the student reads a content table, but '{run / CONTENT_DIR}' "
                              "is missing (copied without it?)")
    model = RankingModel.from_spec(feats, proc, scfg)
    extra = [k for k in ck["model"] if not k.startswith(STUDENT_PREFIXES)]
    if extra:
        raise AppDistillError(f"checkpoint '{ck_path}' holds non-student parameters {extra[:5]}")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(s.strip() for s in first[1:4]) or first[0]
        raise AppDistillError(
            f"file '{ck_path}': the checkpoint's parameters do not fit the student that '{run / 'spec.json'}' and "
            f"'{run / 'processor.json'}' describe ({detail}); the checkpoint comes from another run, spec or "
            "data") from e
    return model.eval(), feats, proc, ck


def _is_export_dir(path: Path) -> bool:
    """True when ``path`` holds nothing but the files of an earlier export (and its manifest)."""
    names = {p.name for p in path.iterdir()}
    leftovers = {n for n in names if n.startswith(".") and n.endswith(".tmp")}  # interrupted atomic writes
    return MANIFEST in names and names - leftovers <= {*FILES, MANIFEST, CONTENT_DIR}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AppDistillError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_export_dir(out):
        raise AppDistillError(f"--out '{out}' is a non-empty directory that is not an earlier export "
                              f"(it may hold only {[*FILES, MANIFEST]}); choose a new or empty directory")


def _claim(d: Path) -> int:
    """Open and ``flock`` a staging directory this export created: while the descriptor is open the
    directory is in use; once the export ends or dies the lock is gone and :func:`_clean_stale` may
    remove it."""
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _clean_stale(out: Path) -> None:
    """Remove staging (``.tmp``) and replaced-export (``.old``) directories of ``out`` that a killed export
    left behind; one whose lock is held belongs to a running export and is left alone."""
    if not out.parent.is_dir():
        return
    try:
        import fcntl
    except ImportError:
        return
    for p in out.parent.iterdir():
        if not (p.name.startswith(f".{out.name}.") and p.name.endswith((".tmp", ".old")) and p.is_dir()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live export holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


def _swap_in(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` directory to ``out`` (replacing an earlier export there)."""
    if not out.exists():
        os.rename(stage, out)
        return
    if not any(out.iterdir()):
        os.replace(stage, out)  # an empty directory is replaced atomically
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    fd = _claim(old)
    try:
        os.rename(out, old / "x")  # two renames: at no point is a half-written export at `out`
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(fd)


def export_run(run_dir: str | Path, out_dir: str | Path, compile: bool = True) -> Path:
    """Write the serving artefact of ``run_dir`` into ``out_dir`` (all files or none; see module doc)."""
    out, run = Path(out_dir), Path(run_dir)
    if not run.is_dir():
        raise AppDistillError(f"run directory '{run}' not found")
    with run_lock(run, "export"):  # not while a train (or another export) writes the run
        _check_out_dir(out)
        model, feats, proc, ck = load_student(run)
        serving = ServingModel(model).eval()
        names = {n for n, _ in serving.named_parameters()}
        assert all(n.startswith(("tables.", "dense_arch.", "interaction.", "over_arch.", "content_proj."))
                   for n in names), names
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        fd = _claim(stage)
        try:
            program = _write_artifact(stage, run, model, serving, feats, proc, ck, compile)
            check = Ranker(stage, compiled=False)  # checksums, loading of every file, model.pt2 holds no pickle
            if program is not None:
                x = check.encoder.example()
                with torch.no_grad():
                    a, b = program(*x), check.eager(*x)
                if not torch.allclose(a, b, atol=1e-5):
                    raise AppDistillError(f"export of '{run}': the torch.export program disagrees with the eager "
                                          f"student (max diff {float((a - b).abs().max()):.2e}); use --no-compile")
            _swap_in(stage, out)
        finally:
            os.close(fd)
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
    return out


def export_program(serving: ServingModel, feats: list[FeatureSpec], example: tuple[torch.Tensor, ...]) -> Any:
    """``torch.export`` of the serving model with dynamic batch and id-list sizes (an ``ExportedProgram``).

    The same call builds the program that ``model.pt2`` holds (at export) and the one :class:`Ranker`
    runs (at load, from ``weights.pt``): equal weights and graph give bit-identical scores.
    """
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 24)
    dyn: list[dict[int, Any]] = []
    for f in (f for f in feats if f.kind in ("sparse_id", "id_list")):
        dyn += [{0: batch} if f.kind == "sparse_id" else {0: Dim(f"nnz_{f.name}", min=1, max=1 << 30)}, {0: batch}]
    dyn.append({0: batch})
    return torch.export.export(serving, example, dynamic_shapes=(tuple(dyn),), strict=False)


# ---------------------------------------------------------------------------------------- archive check
_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_MEMBERS = re.compile(r"(models/\w+\.json|data/weights/\w+_weights_config\.json|"
                          r"data/constants/\w+_constants_config\.json|data/weights/weight_\d+|"
                          r"data/constants/tensor_\d+|data/sample_inputs/\w+\.pt)")
#: what the (weights-only) pickle of the sample inputs may name: tensors, their storages, dicts
_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("collections", "OrderedDict"), ("torch", "device")}
_UNSAFE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "STACK_GLOBAL"}
#: guards and symbolic expressions are Python/sympy expressions that torch evaluates on load
_SAFE_EXPR = re.compile(r"[A-Za-z0-9_\[\]'\"().,:=<>!+\-*/%& |]*")


class UnsafeArchiveError(AppDistillError):
    """A ``model.pt2`` holds a pickled payload or something else that loading it would execute."""


def check_pt2_archive(path: str | Path) -> None:
    """Refuse a ``torch.export`` archive that would run code when loaded, without deserialising it.

    Only the members ``torch.export.save`` writes for a plain module are allowed; every weight and
    constant must be stored raw (``use_pickle: false``) as a tensor; the sample-input pickle may name
    only tensor-rebuilding globals (no ``INST``/``OBJ``/``STACK_GLOBAL``/extension opcodes); guard and
    expression strings may not use dunders or characters beyond arithmetic and indexing. A
    :class:`Ranker` never loads the archive anyway; this keeps a tampered one from being served or
    passed on.

    Raises:
        UnsafeArchiveError: naming the file and the member.
    """
    path = Path(path)

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"file '{path}': refused: {why}; the export was tampered with or is not from "
                                  "`appdistill export` (re-export the run)")

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise refuse(f"not a torch.export archive ({e})") from None
    with z:
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise refuse(f"unexpected archive layout {sorted(roots)[:5]}")
        root = roots.pop() + "/"
        rel = {n[len(root):]: n for n in names}
        odd = sorted(r for r in rel if r not in _PT2_FIXED and not _PT2_MEMBERS.fullmatch(r))
        if odd:
            raise refuse(f"unexpected member(s) {odd[:5]} (custom objects, pickled weights or code)")
        for r, n in rel.items():
            if r.endswith("_config.json"):
                _check_payload_config(z, n, r, refuse)
            elif r.startswith("models/"):
                _check_program_json(z, n, refuse)
            elif r.startswith("data/sample_inputs/"):
                _check_weights_pickle(z.read(n), n, refuse)


def check_weights_file(path: str | Path) -> None:
    """Refuse a ``torch.save`` file (``weights.pt``) whose pickle names anything but tensors, storages and
    dicts -- checked without unpickling, before ``torch.load(weights_only=True)`` reads it."""
    path = Path(path)

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"file '{path}': refused: {why}; the export was tampered with (re-export the run)")

    _check_weights_pickle(path.read_bytes(), path.name, refuse)


def _json_member(z: zipfile.ZipFile, name: str, refuse: Any) -> Any:
    try:
        return json.loads(z.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise refuse(f"member '{name}' is not valid JSON ({e})") from None


def _check_payload_config(z: zipfile.ZipFile, name: str, rel: str, refuse: Any) -> None:
    cfg = _json_member(z, name, refuse)
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise refuse(f"member '{name}' is not a payload config")
    prefix = "weight_" if rel.startswith("data/weights/") else "tensor_"
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise refuse(f"member '{name}' marks '{fqn}' as a pickled payload (use_pickle)")
        if not str(meta.get("path_name", "")).startswith(prefix) or not isinstance(meta.get("tensor_meta"), dict):
            raise refuse(f"member '{name}': '{fqn}' is not a raw tensor ({meta.get('path_name')!r})")


def _check_program_json(z: zipfile.ZipFile, name: str, refuse: Any) -> None:
    prog = _json_member(z, name, refuse)
    exprs: list[str] = list(prog.get("guards_code") or []) if isinstance(prog, dict) else []
    stack = [prog]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if isinstance(o.get("expr_str"), str):
                exprs.append(o["expr_str"])
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    for e in exprs:
        if not isinstance(e, str) or "__" in e or not _SAFE_EXPR.fullmatch(e):
            raise refuse(f"member '{name}' holds an expression torch would evaluate that is not plain arithmetic: "
                         f"{str(e)[:80]!r}")


def _check_weights_pickle(data: bytes, name: str, refuse: Any) -> None:
    """A ``torch.save`` zip whose pickles name only tensor-rebuilding globals (what ``weights_only`` loads)."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise refuse(f"member '{name}' is not a torch.save archive (a bare pickle?)") from None
    with inner:
        for n in inner.namelist():
            if not n.endswith(".pkl"):
                continue
            try:
                for op, arg, _ in pickletools.genops(inner.read(n)):
                    if op.name in _UNSAFE_OPS:
                        raise refuse(f"member '{name}/{n}' uses the pickle opcode {op.name}")
                    if op.name == "GLOBAL":
                        mod, _, attr = str(arg).partition(" ")
                        if (mod, attr) not in _SAFE_GLOBALS and not (mod == "torch" and attr.endswith("Storage")):
                            raise refuse(f"member '{name}/{n}' pickles a reference to {mod}.{attr}")
            except UnsafeArchiveError:
                raise
            except Exception as e:  # noqa: BLE001 - a malformed pickle is refused, never loaded
                raise refuse(f"member '{name}/{n}' is not a readable pickle ({type(e).__name__}: {e})") from None


def _write_artifact(out: Path, run_dir: Path, model: RankingModel, serving: ServingModel, feats: list[FeatureSpec],
                    proc: FeatureProcessor, ck: dict[str, Any], compile: bool) -> Any:
    """Write the export files into ``out``; returns the compiled program (``None`` without ``compile``)."""
    sub = proc_subset(proc, feats)
    content = ContentTable.load(run_dir / CONTENT_DIR) if model.config.content_dim else None
    if content is not None and content.dim != model.config.content_dim:
        raise AppDistillError(f"run directory '{run_dir}': the content table has {content.dim} columns, the "
                              f"student reads {model.config.content_dim} (files from different runs?)")
    x = RowEncoder(feats, sub, content).example()
    program = None
    if compile:
        ep = export_program(serving, feats, x)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        atomic_write_bytes(out / "model.pt2", buf.getvalue())
        program = ep.module()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "weights.pt", buf.getvalue())
    atomic_write_text(out / "student.json", json.dumps(asdict(model.config), indent=1))
    atomic_write_text(out / "features.json", json.dumps([f.model_dump() for f in feats], indent=1))
    atomic_write_text(out / "processor.json", sub.to_json())
    if content is not None:
        content.save(out / CONTENT_DIR)
    metrics_path = run_dir / "metrics.json"
    manifest = {
        "format": FORMAT,
        "versions": {"appdistill": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "config": ck["config"], "spec_fingerprint": ck.get("spec_fingerprint"),
        "data_fingerprint": ck.get("data_fingerprint"), "teachers": ck.get("teachers", {}),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        "params": model.size(), "compiled": "torch.export" if compile else None,
        "files": {f: sha256_file(out / f) for f in (*FILES, *CONTENT_FILES) if (out / f).is_file()},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, default=str))
    return program


def proc_subset(proc: FeatureProcessor, feats: list[FeatureSpec]) -> FeatureProcessor:
    names = {f.name for f in feats}
    return FeatureProcessor({k: v for k, v in proc.vocabs.items() if k in names},
                            {k: v for k, v in proc.dense.items() if k in names})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("appdistill")
    except PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------------------------------- encoding
class _Lookup:
    """Raw ids -> embedding rows of one vocabulary, without pandas per call (batch-1 latency).

    Integer vocabularies use a sorted array + ``searchsorted``, string ones a dict; hashing
    vocabularies go through :meth:`Vocabulary.encode` (the training code path).
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.is_int, self.hashing = vocab.is_int, vocab.hashing
        if not self.hashing and self.is_int:
            v = np.asarray(vocab.values, np.int64)
            self.order = np.argsort(v, kind="stable")
            self.sorted = v[self.order]
        elif not self.hashing:
            self.table = {str(x): i + 1 for i, x in enumerate(vocab.values)}

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """``keys``: int64 (integer vocabulary) or object array of str -> rows ``[N]`` int64, 0 = OOV."""
        if self.hashing:
            return self.vocab.encode(keys) if len(keys) else np.zeros(0, np.int64)
        if self.is_int:
            if len(self.sorted) == 0:
                return np.zeros(len(keys), np.int64)
            pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
            return np.where(self.sorted[pos] == keys, self.order[pos] + 1, 0).astype(np.int64)
        get = self.table.get
        return np.fromiter((get(k, 0) for k in keys), np.int64, count=len(keys))


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _id_str(v: Any) -> str:
    """A raw id as the string key of a string vocabulary (``8.0`` -> ``"8"``)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _missing(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        return np.isnan(arr)
    if arr.dtype.kind in "iub":
        return np.zeros(len(arr), bool)
    return pd.isna(arr)


class RowEncoder:
    """Raw request rows -> the exported model's inputs, with the training transforms (module doc).

    Args:
        feats: the student's features (``features.json``).
        proc: their fitted vocabularies and transforms (``processor.json``).
        content: the student's content table (``content/``), looked up by the item key column; its
            vectors follow the dense features. An unknown or missing key gets zeros (the mean item).
    """

    def __init__(self, feats: list[FeatureSpec], proc: FeatureProcessor, content: ContentTable | None = None) -> None:
        self.feats, self.proc, self.content = feats, proc, content
        self.lookups = {f.name: _Lookup(proc.vocabs[f.name]) for f in feats if f.kind in ("sparse_id", "id_list")}
        self.dense = {f.name: proc.dense[f.name] for f in feats if f.kind == "dense"}
        self.content_key: FeatureSpec | None = None
        if content is not None:  # the key column read like any sparse_id column, through the table's vocabulary
            self.content_key = FeatureSpec(name=f"content:{content.table}", kind="sparse_id", table=content.table,
                                           column=content.key, missing="oov")
            self.lookups[self.content_key.name] = _Lookup(content.vocab)

    @property
    def columns(self) -> list[str]:
        cols = [f.col for f in self.feats]
        return cols + [self.content_key.col] if self.content_key is not None else cols

    def string_columns(self) -> list[str]:
        """Columns whose ids are strings (read them as text from CSV so ``"08"`` stays ``"08"``)."""
        ids = [f for f in (*self.feats, self.content_key) if f is not None and f.kind in ("sparse_id", "id_list")]
        return list(dict.fromkeys(f.col for f in ids if not self.lookups[f.name].is_int))

    # ------------------------------------------------------------------ key casting
    def _keys(self, f: FeatureSpec, arr: np.ndarray, where: str, rows: np.ndarray | None = None,
              all_str: bool = False) -> np.ndarray:
        """Cast non-missing raw ids to the vocabulary's key type (int64 or str objects).

        ``all_str``: the caller knows every element is a ``str`` already (string dtype, split lists).
        Booleans, inf, dates, complex numbers, bytes and containers are refused (naming the row):
        ``True`` would otherwise become id 1 (or ``"True"``), a list its ``str()``.
        """
        if not all_str:
            found = odd_id(arr)
            if found is not None:
                raise AppDistillError(odd_id_message(where, found, rows))
        if not self.lookups[f.name].is_int:  # string vocabulary: integral numbers print as "8", not "8.0"
            if all_str:
                return arr
            if arr.dtype.kind in "iub":
                return arr.astype(str).astype(object)
            return np.array([v if type(v) is str else _id_str(v) for v in arr], dtype=object)
        if arr.dtype.kind in "iub":
            return arr.astype(np.int64)
        num = arr.astype(np.float64) if arr.dtype.kind == "f" else pd.to_numeric(
            pd.Series(arr, dtype=object), errors="coerce").to_numpy(np.float64)
        frac = np.isfinite(num) & (num % 1 != 0)
        if frac.any():
            r = _first(frac)
            row = int(rows[r]) if rows is not None else r
            v = arr[r].item() if isinstance(arr[r], np.generic) else arr[r]
            raise AppDistillError(f"{where}, row {row}: id {v!r} is a number with a fractional part; ids are "
                                  "integers or strings (is this a dense column?)")
        if arr.dtype.kind == "f":  # inf can never be a known id: OOV
            return np.where(np.isfinite(arr), np.nan_to_num(arr, posinf=0.0, neginf=0.0), -(2.0**62)).astype(np.int64)
        return normalize_ids(pd.Series(arr, dtype=object), as_int=True, what=where)

    def _list_cells(self, f: FeatureSpec, arr: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(lengths ``[N]``, flat raw ids) of an ``id_list`` column; null cells are empty lists."""
        if f.separator is not None:
            sep = f.separator
            miss = _missing(arr)
            found = odd_id(arr[~miss])
            if found is not None:
                r = int(np.flatnonzero(~miss)[found[0]])
                raise AppDistillError(f"{where}, row {r}: {found[1]!r} is {found[2]}; cells are strings of ids "
                                      f"separated by {sep!r}")
            cells = ["" if m else (v if type(v) is str else _id_str(v)) for v, m in zip(arr, miss)]
            lists = [[x for x in c.split(sep) if x != ""] for c in cells]
        else:
            lists = []
            for r, v in enumerate(arr):
                if isinstance(v, (list, tuple, np.ndarray)):
                    for x in v:  # elements are ids: no nested lists, booleans, dates...
                        what = odd_id_value(x)
                        if what is not None:
                            raise AppDistillError(f"{where}, row {r}: list element {x!r} is {what}, not an id; ids "
                                                  "are integers or strings")
                    lists.append([x for x in v if not pd.isna(x)])
                elif v is None or (isinstance(v, float) and np.isnan(v)):
                    lists.append([])
                else:
                    raise AppDistillError(f"{where}, row {r}: expected a list of ids, got {v!r} (feature "
                                          f"'{f.name}' has no separator)")
        lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        flat = [x for xs in lists for x in xs]
        if f.separator is not None and not self.lookups[f.name].is_int:
            return lengths, np.array(flat, dtype=object)
        return lengths, (np.array(flat) if flat else np.zeros(0, np.int64))

    # ------------------------------------------------------------------ encoding
    def encode(self, df: pd.DataFrame, source: str = "input") -> tuple[torch.Tensor, ...]:
        """``(values_0, offsets_0, ..., dense)`` for the rows of ``df`` (see the module doc for the rules)."""
        if not isinstance(df, pd.DataFrame):
            raise AppDistillError(f"file '{source}': expected a pandas DataFrame of raw rows, got {type(df).__name__}")
        dup = sorted({str(c) for c in df.columns[df.columns.duplicated()] if c in set(self.columns)})
        if dup:
            raise AppDistillError(f"file '{source}': columns {dup} appear more than once; each input column must be "
                                  "given once")
        missing = [c for c in dict.fromkeys(self.columns) if c not in df.columns]
        if missing:
            raise AppDistillError(f"file '{source}': missing columns {missing} (the student needs {self.columns}; "
                                  "other columns are ignored)")
        n = len(df)
        out: list[torch.Tensor] = []
        dense: list[np.ndarray] = []
        for f in self.feats:
            where = f"file '{source}', feature '{f.name}', column '{f.col}'"
            col = df[f.col]
            try:
                if f.kind == "sparse_id":
                    arr = col.to_numpy()
                    strs = isinstance(col.dtype, pd.StringDtype)
                    miss = _missing(arr)
                    rows = np.zeros(n, np.int64)
                    if miss.any():
                        if f.table == "interactions" and f.missing != "oov":
                            raise AppDistillError(f"{where}, row {_first(miss)}: missing id (NaN/null); the "
                                                  "request keys must be present (unknown ids are fine: OOV; a "
                                                  "feature with `missing: oov` maps missing ids to OOV)")
                        ok = np.flatnonzero(~miss)  # side-table NaN: training's "missing row" -> OOV
                        rows[ok] = self.lookups[f.name](self._keys(f, arr[ok], where, ok, strs))
                    else:
                        rows = self.lookups[f.name](self._keys(f, arr, where, all_str=strs))
                    out += [torch.from_numpy(rows), torch.arange(n, dtype=torch.long)]
                elif f.kind == "id_list":
                    lengths, flat = self._list_cells(f, col.to_numpy(), where)
                    keys = self._keys(f, flat, where + " (list element)", all_str=f.separator is not None)
                    vals = self.lookups[f.name](keys) if len(flat) else np.zeros(0, np.int64)
                    offsets = np.zeros(n, np.int64)
                    np.cumsum(lengths[:-1], out=offsets[1:])
                    out += [torch.from_numpy(np.ascontiguousarray(vals, np.int64)), torch.from_numpy(offsets)]
                elif f.kind == "dense":
                    x = self._numbers(col, where)
                    t = self.dense[f.name]
                    v = t.apply(x)[0]
                    if not np.isfinite(v).all():  # within float32 raw, beyond it once standardised
                        r = _first(~np.isfinite(v))
                        raise AppDistillError(f"{where}, row {r}: value {x[r].item()!r} overflows float32 after the "
                                              f"feature's '{t.kind}' transform (mean {t.mean:.4g}, std {t.std:.4g})")
                    dense.append(v)
            except AppDistillError:
                raise
            except Exception as e:  # noqa: BLE001 - name the column
                raise AppDistillError(f"{where}: cannot encode the values ({type(e).__name__}: {e})") from e
        d = np.stack(dense, 1) if dense else np.zeros((n, 0), np.float32)
        if self.content is not None:
            d = np.concatenate([d.astype(np.float32, copy=False), self._content(df, source)], 1)
        out.append(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)))
        return tuple(out)

    def _content(self, df: pd.DataFrame, source: str) -> np.ndarray:
        """The content vectors ``[N, C]`` of the rows' item keys (missing or unknown key: zeros)."""
        f, table = self.content_key, self.content
        assert f is not None and table is not None
        where = f"file '{source}', column '{f.col}' (the content table's item key)"
        col = df[f.col]
        arr = col.to_numpy()
        miss = _missing(arr)
        rows = np.zeros(len(arr), np.int64)
        ok = np.flatnonzero(~miss)
        if len(ok):
            rows[ok] = self.lookups[f.name](self._keys(f, arr[ok], where, ok, isinstance(col.dtype, pd.StringDtype)))
        return table.lookup_rows(rows)

    @staticmethod
    def _numbers(col: pd.Series, where: str) -> np.ndarray:
        """Raw dense values as float64 (NaN = missing): numbers, booleans and numeric strings; anything
        else (dates, complex numbers, lists, "abc"), inf and values beyond float32 are refused."""
        kind = col.dtype.kind
        if kind == "c":
            raise AppDistillError(f"{where}: complex numbers (dtype {col.dtype}) are not dense values")
        if kind in "Mm" or isinstance(col.dtype, (pd.PeriodDtype, pd.IntervalDtype)):
            raise AppDistillError(f"{where}: dense values must be numbers, got dates/times (dtype {col.dtype}); "
                                  "convert them as the training table did")
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            x = col.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            arr = col.to_numpy()
            if pd.api.types.infer_dtype(arr, skipna=True) not in ("string", "integer", "floating", "boolean",
                                                                   "mixed-integer-float", "empty"):
                for r, v in enumerate(arr):
                    if not (v is None or v is pd.NA or isinstance(v, (str, int, float, bool, np.integer, np.floating,
                                                                      np.bool_))):
                        raise AppDistillError(f"{where}, row {r}: expected a number, got {v!r} (a "
                                              f"{type(v).__name__})")
            conv = pd.to_numeric(col, errors="coerce")
            bad = (conv.isna() & col.notna()).to_numpy()
            if bad.any():
                r = _first(bad)
                raise AppDistillError(f"{where}, row {r}: expected a number, got {col.iloc[r]!r}")
            x = conv.to_numpy(dtype=np.float64, na_value=np.nan)
        r = first_out_of_float32(x)
        if r is not None:
            raise AppDistillError(out_of_float32_message(where, r, x[r].item()))
        return x

    def example(self) -> tuple[torch.Tensor, ...]:
        """Two rows of OOV ids (one id per list): the example inputs the program is traced with."""
        ex = {}
        for f in self.feats:
            if f.kind == "id_list":
                ex[f.col] = [[0], [0]] if f.separator is None else [f"a{f.separator}b", "c"]
            elif f.kind == "sparse_id":
                ex[f.col] = [0, 0]
            else:
                ex[f.col] = [0.0, 0.0]
        if self.content_key is not None:
            ex.setdefault(self.content_key.col, [0, 0])
        return self.encode(pd.DataFrame(ex), "example")


def serving_inputs(feats: list[FeatureSpec], proc: FeatureProcessor, df: pd.DataFrame,
                   source: str = "input") -> tuple[torch.Tensor, ...]:
    """Encode raw rows into the exported model's inputs (values/offsets per sparse feature, dense)."""
    return RowEncoder(feats, proc).encode(df, source)


# ---------------------------------------------------------------------------------------- serving
class Ranker:
    """Scores raw request rows with an exported student.

    Args:
        path: export directory (every file's sha256 is checked against ``manifest.json`` on load).
        compiled: run the student compiled with ``torch.export`` (default; rebuilt from ``weights.pt``,
            ``model.pt2`` is inspected but never loaded: module doc) or the eager model.

    Raises:
        AppDistillError: a missing, edited or corrupt file in the export directory (named);
            :class:`UnsafeArchiveError` for a ``model.pt2`` that would run code if loaded.
    """

    def __init__(self, path: str | Path, compiled: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise AppDistillError(f"export directory '{self.path}' not found")
        man_path = self.path / MANIFEST
        if not man_path.is_file():
            raise AppDistillError(f"export directory '{self.path}': missing file '{MANIFEST}' "
                                  "(not an `appdistill export` directory?)")
        self.manifest = _read_json(man_path, "the export manifest")
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        if not isinstance(files, dict) or self.manifest.get("format") != FORMAT:
            raise AppDistillError(f"file '{man_path}': not an {FORMAT} manifest (edited or from another version)")
        unlisted = [f for f in REQUIRED if f not in files]
        if unlisted:
            raise AppDistillError(f"file '{man_path}': lists no checksum for {unlisted} (manifest edited or corrupt)")
        for f, digest in files.items():
            p = self.path / f
            if not p.is_file():
                raise AppDistillError(f"export directory '{self.path}': missing file '{f}'")
            if sha256_file(p) != digest:
                raise AppDistillError(f"export directory '{self.path}': file '{f}' does not match its checksum "
                                      "in manifest.json (edited or corrupt); re-run `appdistill export`")
        try:
            self.features = [FeatureSpec.model_validate(d) for d in _read_json(self.path / "features.json", "features")]
            self.processor = FeatureProcessor.from_json((self.path / "processor.json").read_text())
            cfg = StudentConfig(**_read_json(self.path / "student.json", "the student config"))
            model = RankingModel.from_spec(self.features, self.processor, cfg)
            check_weights_file(self.path / "weights.pt")  # only tensors, before even the weights-only unpickler
            model.load_state_dict(torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True))
        except AppDistillError:
            raise
        except Exception as e:  # noqa: BLE001 - checksums matched, so the export itself is inconsistent
            raise AppDistillError(f"export directory '{self.path}': cannot load the student "
                                  f"({type(e).__name__}: {e})") from e
        unlisted = [f for f in CONTENT_FILES if f not in files] if cfg.content_dim else []
        if unlisted:  # never read a file the manifest does not vouch for
            raise AppDistillError(f"file '{man_path}': lists no checksum for {unlisted} (manifest edited or corrupt)")
        self.content = ContentTable.load(self.path / CONTENT_DIR) if cfg.content_dim else None
        if self.content is not None and self.content.dim != cfg.content_dim:
            raise AppDistillError(f"export directory '{self.path}': the content table has {self.content.dim} columns, "
                                  f"the student reads {cfg.content_dim}")
        self.encoder = RowEncoder(self.features, self.processor, self.content)
        self.eager = ServingModel(model.eval()).eval()
        self.program = None
        if files.get("model.pt2"):  # a tampered archive is refused, not served (nor passed on), compiled or not
            check_pt2_archive(self.path / "model.pt2")
        if compiled and files.get("model.pt2"):
            # never torch.export.load: it can unpickle and evaluate what the archive holds (module doc).
            # The program is rebuilt from the weights-only state dict instead: the graph and weights of
            # model.pt2, so the same scores.
            try:
                with torch.no_grad():
                    self.program = export_program(self.eager, self.features, self.encoder.example()).module()
            except Exception as e:  # noqa: BLE001
                raise AppDistillError(f"export directory '{self.path}': cannot compile the student with torch.export "
                                      f"({type(e).__name__}: {e}); load it with compiled=False") from e

    @classmethod
    def load(cls, path: str | Path, compiled: bool = True) -> Ranker:
        return cls(path, compiled)

    @property
    def columns(self) -> list[str]:
        """The input columns the student needs (others are ignored)."""
        return self.encoder.columns

    def inputs(self, df: pd.DataFrame, source: str = "input") -> tuple[torch.Tensor, ...]:
        """The model inputs of ``df`` (what :meth:`forward` takes)."""
        return self.encoder.encode(df, source)

    @torch.inference_mode()
    def forward(self, x: tuple[torch.Tensor, ...]) -> np.ndarray:
        """Logits ``[N]`` of already encoded inputs (:meth:`inputs`)."""
        # the compiled program was traced with non-empty id lists; an all-empty list feature goes eager
        fn = self.program if self.program is not None and all(v.numel() > 0 for v in x[:-1:2]) else self.eager
        return fn(*x).numpy()

    def logits(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Raw student logits ``[N]`` for rows of raw feature values."""
        x = self.inputs(df, source)
        if len(df) == 0:
            return np.zeros(0, np.float32)
        return self.forward(x)

    def score(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Probabilities ``[N]`` float64 (sigmoid of the logits, in float64 so no two scores tie that
        the logits order).

        ``df`` is a pandas DataFrame, one row per candidate, holding :attr:`columns` once each (other
        columns are ignored). Accepted values:

        - ``sparse_id``: integers, integral floats (``50.0``) and strings (``"50"``); unseen -> OOV;
          NaN/None -> OOV for side-table features and ``missing: oov`` features, else an error.
        - ``id_list``: with a separator, strings such as ``"a|b"`` (a single number is one id); without,
          lists/tuples/arrays of ids; NaN/None/empty -> an empty list.
        - ``dense``: ints, floats, booleans (0/1) and numeric strings; NaN/None -> the training mean.

        Refused, with an :class:`~appdistill.errors.AppDistillError` naming ``source``, the feature,
        the column and the first bad row: booleans, ``inf``, fractional floats, dates/times, complex
        numbers, bytes, lists/dicts/sets as ids; dates/times, complex numbers, containers, non-numeric
        strings, ``inf`` and values beyond float32 (``|x| > 3.4e38``) as dense values; a needed column
        that is missing or appears twice.
        """
        from scipy.special import expit

        return expit(self.logits(df, source).astype(np.float64))
