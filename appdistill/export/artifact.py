"""Serving artefact: ``appdistill export RUN_DIR --out DIR`` and :class:`Ranker` (``score``).

The artefact holds the plain student only — never a teacher, an encoder, or a method module
(asserted on export) — with everything needed to turn raw request rows into scores:

* ``model.pt2``: the student compiled with ``torch.export`` (dynamic batch and id-list sizes);
* ``weights.pt``: the same weights as a state dict (``weights_only`` loading), for the eager path;
* ``student.json``: architecture; ``features.json``: the spec subset the student needs;
* ``processor.json``: fitted vocabularies (unseen ids -> OOV) and dense transforms;
* ``manifest.json``: versions, training config, teacher identities, metrics and a sha256 per file.

Export is all-or-nothing: the files are written into a temporary sibling directory, checked, and
only then moved into place, so a failed export (truncated checkpoint, checkpoint of another spec)
leaves ``--out`` exactly as it was. An existing ``--out`` is replaced only when it is an earlier
export (it holds nothing but export files); any other non-empty directory is refused.

Input rows (one per candidate, raw values as in the training tables, joined like the training
data: interactions columns + the item's and the user's side-table columns) follow the training
transforms exactly:

=====================  ==================================================================================
column kind             serving rule (same as training unless noted)
=====================  ==================================================================================
missing column          error naming the file and the columns
extra columns           ignored
``sparse_id``           unseen id -> OOV row; ids are categorical and cast to the vocabulary's key type
                        (``50``, ``50.0`` and ``"50"`` are the same integer id; a string that is not an
                        integer is an unseen id -> OOV); a number with a fractional part (``50.5``) is
                        an error naming file, column and first bad row
NaN ``sparse_id``       side-table feature (``users``/``items``: gender, occupation...): OOV, exactly what
                        training gives a row whose key is missing from that table (a failed left join);
                        an ``interactions`` feature (the request keys ``user_id``/``item_id``): error
                        naming file, column and row (training refuses NaN there too)
``id_list``             separator strings or list cells; NaN/empty cell -> empty list (training's missing
                        row); unseen ids -> OOV
``dense``               NaN/inf -> the training mean (the fitted transform's imputation, as in training);
                        a value that is not a number (``"abc"``) -> error naming file, column, row, value
=====================  ==================================================================================

Rows are numbered from 0 in file order (row 0 = the first data row of a CSV).

Example:
    >>> ranker = Ranker.load("export/")
    >>> scores = ranker.score(pd.DataFrame({"user_id": [1], "item_id": [50], ...}))   # [N] probabilities
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from appdistill.errors import AppDistillError
from appdistill.export.serving import ServingModel
from appdistill.features.processor import FeatureProcessor
from appdistill.features.spec import FeatureSpec
from appdistill.features.vocab import Vocabulary, normalize_ids
from appdistill.student.model import RankingModel, StudentConfig
from appdistill.train.io import atomic_write_bytes, atomic_write_text, load_checkpoint, sha256_file

FILES = ("model.pt2", "weights.pt", "student.json", "features.json", "processor.json")
REQUIRED = ("weights.pt", "student.json", "features.json", "processor.json")
MANIFEST = "manifest.json"
FORMAT = "appdistill-export/1"
STUDENT_PREFIXES = ("ebc.", "dense_arch.", "interaction.", "over_arch.")


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
    ck = load_checkpoint(ck_path)
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
    model = RankingModel.from_spec(feats, proc, student_config(cfg))
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
    return MANIFEST in names and names - leftovers <= {*FILES, MANIFEST}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise AppDistillError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_export_dir(out):
        raise AppDistillError(f"--out '{out}' is a non-empty directory that is not an earlier export "
                              f"(it may hold only {[*FILES, MANIFEST]}); choose a new or empty directory")


def _swap_in(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` directory to ``out`` (replacing an earlier export there)."""
    if not out.exists():
        os.rename(stage, out)
        return
    if not any(out.iterdir()):
        os.replace(stage, out)  # an empty directory is replaced atomically
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "x")  # two renames: at no point is a half-written export at `out`
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: str | Path, out_dir: str | Path, compile: bool = True) -> Path:
    """Write the serving artefact of ``run_dir`` into ``out_dir`` (all files or none; see module doc)."""
    out = Path(out_dir)
    _check_out_dir(out)
    model, feats, proc, ck = load_student(run_dir)
    serving = ServingModel(model).eval()
    names = {n for n, _ in serving.named_parameters()}
    assert all(n.startswith(("tables.", "dense_arch.", "interaction.", "over_arch.")) for n in names), names
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_artifact(stage, Path(run_dir), model, serving, feats, proc, ck, compile)
        check = Ranker(stage, compiled=compile)  # checksums, loading, compiled == eager
        x = check.encoder.example()
        if check.program is not None:
            with torch.no_grad():
                a, b = check.program(*x), check.eager(*x)
            if not torch.allclose(a, b, atol=1e-5):
                raise AppDistillError(f"export of '{run_dir}': the torch.export program disagrees with the eager "
                                      f"student (max diff {float((a - b).abs().max()):.2e}); use --no-compile")
        _swap_in(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _write_artifact(out: Path, run_dir: Path, model: RankingModel, serving: ServingModel, feats: list[FeatureSpec],
                    proc: FeatureProcessor, ck: dict[str, Any], compile: bool) -> None:
    from torch.export import Dim

    sub = proc_subset(proc, feats)
    x = RowEncoder(feats, sub).example()
    batch = Dim("batch", min=1, max=1 << 24)
    dyn: list[dict[int, Any]] = []
    for f in (f for f in feats if f.kind in ("sparse_id", "id_list")):
        dyn += [{0: batch} if f.kind == "sparse_id" else {0: Dim(f"nnz_{f.name}", min=1, max=1 << 30)}, {0: batch}]
    dyn.append({0: batch})
    if compile:
        ep = torch.export.export(serving, x, dynamic_shapes=(tuple(dyn),), strict=False)
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        atomic_write_bytes(out / "model.pt2", buf.getvalue())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "weights.pt", buf.getvalue())
    atomic_write_text(out / "student.json", json.dumps(asdict(model.config), indent=1))
    atomic_write_text(out / "features.json", json.dumps([f.model_dump() for f in feats], indent=1))
    atomic_write_text(out / "processor.json", sub.to_json())
    metrics_path = run_dir / "metrics.json"
    manifest = {
        "format": FORMAT,
        "versions": {"appdistill": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "config": ck["config"], "spec_fingerprint": ck.get("spec_fingerprint"),
        "data_fingerprint": ck.get("data_fingerprint"), "teachers": ck.get("teachers", {}),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        "params": model.size(), "compiled": "torch.export" if compile else None,
        "files": {f: sha256_file(out / f) for f in FILES if (out / f).is_file()},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, default=str))


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
    """

    def __init__(self, feats: list[FeatureSpec], proc: FeatureProcessor) -> None:
        self.feats, self.proc = feats, proc
        self.lookups = {f.name: _Lookup(proc.vocabs[f.name]) for f in feats if f.kind in ("sparse_id", "id_list")}
        self.dense = {f.name: proc.dense[f.name] for f in feats if f.kind == "dense"}

    @property
    def columns(self) -> list[str]:
        return [f.col for f in self.feats]

    def string_columns(self) -> list[str]:
        """Columns whose ids are strings (read them as text from CSV so ``"08"`` stays ``"08"``)."""
        return [f.col for f in self.feats if f.kind in ("sparse_id", "id_list") and not self.lookups[f.name].is_int]

    # ------------------------------------------------------------------ key casting
    def _keys(self, f: FeatureSpec, arr: np.ndarray, where: str, rows: np.ndarray | None = None,
              all_str: bool = False) -> np.ndarray:
        """Cast non-missing raw ids to the vocabulary's key type (int64 or str objects).

        ``all_str``: the caller knows every element is a ``str`` already (string dtype, split lists).
        """
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
            cells = ["" if m else (v if type(v) is str else _id_str(v)) for v, m in zip(arr, miss)]
            lists = [[x for x in c.split(sep) if x != ""] for c in cells]
        else:
            lists = []
            for r, v in enumerate(arr):
                if isinstance(v, (list, tuple, np.ndarray)):
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
                        if f.table == "interactions":
                            raise AppDistillError(f"{where}, row {_first(miss)}: missing id (NaN/null); the "
                                                  "request keys must be present (unknown ids are fine: OOV)")
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
                    dense.append(self.dense[f.name].apply(self._numbers(col, where))[0])
            except AppDistillError:
                raise
            except Exception as e:  # noqa: BLE001 - name the column
                raise AppDistillError(f"{where}: cannot encode the values ({type(e).__name__}: {e})") from e
        d = np.stack(dense, 1) if dense else np.zeros((n, 0), np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)))
        return tuple(out)

    @staticmethod
    def _numbers(col: pd.Series, where: str) -> np.ndarray:
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            return col.to_numpy(dtype=np.float64, na_value=np.nan)
        conv = pd.to_numeric(col, errors="coerce")
        bad = (conv.isna() & col.notna()).to_numpy()
        if bad.any():
            r = _first(bad)
            raise AppDistillError(f"{where}, row {r}: expected a number, got {col.iloc[r]!r}")
        return conv.to_numpy(dtype=np.float64, na_value=np.nan)

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
        compiled: use the ``torch.export`` program (default) or the eager model.

    Raises:
        AppDistillError: a missing, edited or corrupt file in the export directory (named).
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
            model.load_state_dict(torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True))
        except AppDistillError:
            raise
        except Exception as e:  # noqa: BLE001 - checksums matched, so the export itself is inconsistent
            raise AppDistillError(f"export directory '{self.path}': cannot load the student "
                                  f"({type(e).__name__}: {e})") from e
        self.encoder = RowEncoder(self.features, self.processor)
        self.eager = ServingModel(model.eval()).eval()
        self.program = None
        if compiled and files.get("model.pt2"):
            try:
                self.program = torch.export.load(self.path / "model.pt2").module()
            except Exception as e:  # noqa: BLE001
                raise AppDistillError(f"file '{self.path / 'model.pt2'}': cannot load the torch.export program "
                                      f"({type(e).__name__}: {e})") from e

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
        the logits order)."""
        from scipy.special import expit

        return expit(self.logits(df, source).astype(np.float64))
