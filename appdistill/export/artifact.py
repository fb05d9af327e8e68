"""Serving artefact: ``appdistill export RUN_DIR --out DIR`` and :class:`Ranker` (``score``).

The artefact holds the plain student only — never a teacher, an encoder, or a method module
(asserted on export) — with everything needed to turn raw request rows into scores:

* ``model.pt2``: the student compiled with ``torch.export`` (dynamic batch and id-list sizes);
* ``weights.pt``: the same weights as a state dict (``weights_only`` loading), for the eager path;
* ``student.json``: architecture; ``features.json``: the spec subset the student needs;
* ``processor.json``: fitted vocabularies (unseen ids -> OOV) and dense transforms;
* ``manifest.json``: versions, training config, teacher identities, metrics and a sha256 per file.

Example:
    >>> ranker = Ranker.load("export/")
    >>> scores = ranker.score(pd.DataFrame({"user_id": [1], "item_id": [50], ...}))   # [N] probabilities
"""

from __future__ import annotations

import hashlib
import json
import platform
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
from appdistill.student.model import RankingModel, StudentConfig
from appdistill.train.io import atomic_write_bytes, atomic_write_text, load_checkpoint

FILES = ("model.pt2", "weights.pt", "student.json", "features.json", "processor.json")
STUDENT_PREFIXES = ("ebc.", "dense_arch.", "interaction.", "over_arch.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_student(run_dir: str | Path) -> tuple[RankingModel, list[FeatureSpec], FeatureProcessor, dict[str, Any]]:
    """Rebuild the trained student of a run directory from its checkpoint (no training data needed)."""
    from appdistill.config import config_from_dict
    from appdistill.features.spec import FeatureSpecSet

    run = Path(run_dir)
    for f in ("checkpoint.pt", "processor.json", "spec.json"):
        if not (run / f).is_file():
            raise AppDistillError(f"run directory '{run}': missing '{f}' (is this a finished `appdistill train` run?)")
    ck = load_checkpoint(run / "checkpoint.pt")
    cfg = config_from_dict(ck["config"])
    raw = json.loads((run / "spec.json").read_text())
    spec = FeatureSpecSet.from_dict(raw, source=str(run / "spec.json"), base_dir=raw.get("base_dir", "."))
    proc = FeatureProcessor.from_json((run / "processor.json").read_text())
    from appdistill.train.loop import student_config

    feats = spec.visible("student")
    model = RankingModel.from_spec(feats, proc, student_config(cfg))
    extra = [k for k in ck["model"] if not k.startswith(STUDENT_PREFIXES)]
    if extra:
        raise AppDistillError(f"checkpoint '{run / 'checkpoint.pt'}' holds non-student parameters {extra[:5]}")
    model.load_state_dict(ck["model"])
    return model.eval(), feats, proc, ck


def serving_inputs(feats: list[FeatureSpec], proc: FeatureProcessor, df: pd.DataFrame,
                   source: str = "input") -> tuple[torch.Tensor, ...]:
    """Encode raw rows into the exported model's inputs (values/offsets per sparse feature, dense)."""
    missing = [f.col for f in feats if f.col not in df.columns]
    if missing:
        raise AppDistillError(f"file '{source}': missing columns {missing} (the student needs "
                              f"{[f.col for f in feats]})")
    n = len(df)
    out: list[torch.Tensor] = []
    dense = []
    for f in feats:
        col = df[f.col]
        try:
            if f.kind == "sparse_id":
                if col.isna().any():
                    row = int(np.flatnonzero(col.isna().to_numpy())[0])
                    raise AppDistillError(f"file '{source}', column '{f.col}', row {row}: missing id")
                out += [torch.from_numpy(proc.encode_sparse(f.name, col)), torch.arange(n, dtype=torch.long)]
            elif f.kind == "id_list":
                j = proc.encode_list(f, col)
                out += [torch.from_numpy(j.values), torch.from_numpy(j.offsets[:-1].copy())]
            elif f.kind == "dense":
                if not pd.api.types.is_numeric_dtype(col.dtype):
                    conv = pd.to_numeric(col, errors="coerce")
                    bad = conv.isna() & col.notna()
                    if bad.any():
                        row = int(np.flatnonzero(bad.to_numpy())[0])
                        raise AppDistillError(f"file '{source}', column '{f.col}', row {row}: expected a number, "
                                              f"got {col.iloc[row]!r}")
                    col = conv
                dense.append(proc.encode_dense(f.name, col.to_numpy()))
        except AppDistillError:
            raise
        except Exception as e:  # noqa: BLE001 - name the column
            raise AppDistillError(f"file '{source}', column '{f.col}': cannot encode feature '{f.name}': {e}") from e
    d = np.stack(dense, 1) if dense else np.zeros((n, 0), np.float32)
    out.append(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)))
    return tuple(out)


def export_run(run_dir: str | Path, out_dir: str | Path, compile: bool = True) -> Path:
    """Write the serving artefact of ``run_dir`` into ``out_dir`` (files written atomically)."""
    from torch.export import Dim

    model, feats, proc, ck = load_student(run_dir)
    serving = ServingModel(model).eval()
    names = {n for n, _ in serving.named_parameters()}
    assert all(n.startswith(("tables.", "dense_arch.", "interaction.", "over_arch.")) for n in names), names
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sub = proc_subset(proc, feats)
    # example inputs: two rows of OOV ids (+ one id per list) - shapes are dynamic in the export
    ex = pd.DataFrame({f.col: ([0, 0] if f.kind != "id_list" else ["0", "0"]) for f in feats})
    for f in feats:
        if f.kind == "id_list" and f.separator is None:
            ex[f.col] = [[0], [0]]
        elif f.kind == "id_list":
            ex[f.col] = [f"a{f.separator}b", "c"]
    x = serving_inputs(feats, sub, ex, "example")
    batch = Dim("batch", min=1, max=1 << 24)
    dyn: list[dict[int, Any]] = []
    for i, f in enumerate(f for f in feats if f.kind in ("sparse_id", "id_list")):
        dyn += [{0: batch} if f.kind == "sparse_id" else {0: Dim(f"nnz_{f.name}", min=1, max=1 << 30)}, {0: batch}]
    dyn.append({0: batch})
    import io

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
    metrics_path = Path(run_dir) / "metrics.json"
    manifest = {
        "format": "appdistill-export/1",
        "versions": {"appdistill": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "config": ck["config"], "spec_fingerprint": ck.get("spec_fingerprint"),
        "data_fingerprint": ck.get("data_fingerprint"), "teachers": ck.get("teachers", {}),
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        "params": model.size(), "compiled": "torch.export" if compile else None,
        "files": {f: _sha256(out / f) for f in FILES if (out / f).is_file()},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, default=str))
    return out


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


class Ranker:
    """Scores raw request rows with an exported student.

    Args:
        path: export directory (checksums verified on load).
        compiled: use the ``torch.export`` program (default) or the eager model.
    """

    def __init__(self, path: str | Path, compiled: bool = True) -> None:
        self.path = Path(path)
        man_path = self.path / "manifest.json"
        if not man_path.is_file():
            raise AppDistillError(f"export directory '{self.path}': missing manifest.json")
        self.manifest = json.loads(man_path.read_text())
        for f, digest in self.manifest["files"].items():
            p = self.path / f
            if not p.is_file():
                raise AppDistillError(f"export directory '{self.path}': missing file '{f}'")
            if _sha256(p) != digest:
                raise AppDistillError(f"export directory '{self.path}': file '{f}' does not match its checksum "
                                      "in manifest.json (edited or corrupt); re-run `appdistill export`")
        self.features = [FeatureSpec.model_validate(d) for d in json.loads((self.path / "features.json").read_text())]
        self.processor = FeatureProcessor.from_json((self.path / "processor.json").read_text())
        cfg = StudentConfig(**json.loads((self.path / "student.json").read_text()))
        model = RankingModel.from_spec(self.features, self.processor, cfg)
        model.load_state_dict(torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True))
        self.eager = ServingModel(model.eval()).eval()
        self.program = None
        if compiled and (self.path / "model.pt2").is_file():
            self.program = torch.export.load(self.path / "model.pt2").module()

    @classmethod
    def load(cls, path: str | Path, compiled: bool = True) -> Ranker:
        return cls(path, compiled)

    @torch.no_grad()
    def logits(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Raw student logits ``[N]`` for rows of raw feature values."""
        if len(df) == 0:
            return np.zeros(0, np.float32)
        x = serving_inputs(self.features, self.processor, df, source)
        sparse_vals = x[:-1:2]
        # the compiled program was traced with non-empty id lists; an all-empty list feature goes eager
        fn = self.program if self.program is not None and all(v.numel() > 0 for v in sparse_vals) else self.eager
        return fn(*x).numpy()

    def score(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Probabilities ``[N]`` (sigmoid of the logits)."""
        return 1.0 / (1.0 + np.exp(-self.logits(df, source)))
