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
the run directory's lock (:func:`appdistill.io.run_lock`): it is refused while a ``train`` or
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

Example:
    >>> ranker = Ranker.load("export/")
    >>> scores = ranker.score(pd.DataFrame({"user_id": [1], "item_id": [50], ...}))   # [N] probabilities
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from appdistill.errors import AppDistillError
from appdistill.export.format import (CONTENT_FILES, FILES, FORMAT, MANIFEST, STUDENT_PREFIXES, export_program,
                                      read_json)
from appdistill.export.ranker import Ranker
from appdistill.export.serving import ServingModel
from appdistill.features.content import CONTENT_DIR, ContentTable
from appdistill.features.processor import FeatureProcessor
from appdistill.features.row_encoder import RowEncoder
from appdistill.features.spec import FeatureSpec
from appdistill.io import (atomic_write_bytes, atomic_write_text, file_digests, file_in_the_way, load_checkpoint,
                           run_lock, staged_dir)
from appdistill.student.model import RankingModel, StudentConfig

# ---------------------------------------------------------------------------------------- export
def load_student(run_dir: str | Path) -> tuple[RankingModel, list[FeatureSpec], FeatureProcessor, dict[str, Any]]:
    """Rebuild the trained student of a run directory from its checkpoint (no training data needed).

    Raises:
        AppDistillError: a missing, truncated or foreign checkpoint (another spec, another run's
            vocabularies), an unreadable ``spec.json``/``processor.json``.
    """
    from appdistill.config import config_from_dict
    from appdistill.features.spec import FeatureSpecSet

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
    raw = read_json(run / "spec.json", "the run's feature spec")
    spec = FeatureSpecSet.from_dict(raw, source=str(run / "spec.json"),
                                    base_dir=raw.get("base_dir", ".") if isinstance(raw, dict) else ".")
    want = ck.get("spec_fingerprint")
    if want and spec.fingerprint() != want:
        raise AppDistillError(
            f"file '{ck_path}': the checkpoint was trained with feature spec {want}, but '{run / 'spec.json'}' "
            f"is spec {spec.fingerprint()} (checkpoint copied from another run, or spec.json edited); "
            "export the run directory that produced this checkpoint")
    proc_bytes = (run / "processor.json").read_bytes()
    want = ck.get("processor_sha256")  # absent in checkpoints written before it was recorded
    if want and hashlib.sha256(proc_bytes).hexdigest() != want:
        raise AppDistillError(
            f"file '{run / 'processor.json'}': does not match the sha256 that '{ck_path}' recorded for the "
            "vocabularies and transforms the student was trained with (edited, truncated or copied from another "
            "run); it is not used. Restore it or re-run training")
    try:
        proc = FeatureProcessor.from_json(proc_bytes.decode())
    except (KeyError, TypeError, ValueError) as e:
        raise AppDistillError(f"file '{run / 'processor.json'}': not a fitted feature processor ({e})") from e
    feats = spec.visible("student")
    missing = [f.name for f in feats if f.kind in ("sparse_id", "id_list") and f.name not in proc.vocabs]
    missing += [f.name for f in feats if f.kind == "dense" and f.name not in proc.dense]
    if missing:
        raise AppDistillError(f"file '{run / 'processor.json'}': no fitted vocabulary/transform for student "
                              f"features {missing} of '{run / 'spec.json'}' (files from different runs?)")
    scfg = StudentConfig.from_section(cfg.student, spec)
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
    above = file_in_the_way(out)
    if above is not None:
        raise AppDistillError(f"--out '{out}': '{above}' is a file, so the directory cannot be created there")
    if out.is_dir() and any(out.iterdir()) and not _is_export_dir(out):
        raise AppDistillError(f"--out '{out}' is a non-empty directory that is not an earlier export "
                              f"(it may hold only {[*FILES, MANIFEST]}); choose a new or empty directory")


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
        with staged_dir(out) as stage:
            program = _write_artifact(stage, run, model, serving, feats, proc, ck, compile)
            check = Ranker(stage, compiled=False)  # checksums, loading of every file, model.pt2 holds no pickle
            if program is not None:
                x = check.encoder.example()
                with torch.no_grad():
                    a, b = program(*x), check.eager(*x)
                if not torch.allclose(a, b, atol=1e-5):
                    raise AppDistillError(f"export of '{run}': the torch.export program disagrees with the eager "
                                          f"student (max diff {float((a - b).abs().max()):.2e}); use --no-compile")
    return out


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
        "files": file_digests(out, [f for f in (*FILES, *CONTENT_FILES) if (out / f).is_file()]),
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


