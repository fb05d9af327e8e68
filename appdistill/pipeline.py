"""The whole pipeline behind ``appdistill distill``: teachers -> cache -> student -> eval -> export.

Each stage reuses what an earlier run left when it still matches (fitted teachers by fit
fingerprint, caches by teacher identity + data fingerprint), so rerunning with another method only
trains the student.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appdistill.config import ExperimentConfig
from appdistill.features.dataset import Dataset


def text_embeddings_for(cfg: ExperimentConfig, ds: Dataset, run_dir: Path) -> dict[str, Any] | None:
    """Item text embeddings for teachers that read text (LightGBM), from the foundation store."""
    feats = [f for f in ds.spec.features if f.kind == "text"
             and any(f.name in v for m, v in ds.spec.visibility.items() if m != "student")]
    wants_text = any(b.key == "lightgbm" and b.kwargs.get("use_text", True) for b in cfg.teachers.values())
    if not feats or not wants_text:
        return None
    from appdistill.foundation.catalog import text_embeddings  # through the shared per-item store

    return text_embeddings(ds, feats)


def fit_committee(cfg: ExperimentConfig, run_dir: str | Path, names: list[str] | None = None,
                  ds: Dataset | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    from appdistill.teachers.fit import fit_teachers

    ds = ds if ds is not None else Dataset.build(cfg.load_spec())
    return fit_teachers(cfg, run_dir, names, ds, text_embeddings=text_embeddings_for(cfg, ds, Path(run_dir)),
                        progress=progress, force=force)


def distill(cfg: ExperimentConfig, run_dir: str | Path, *, export: bool = True, progress: bool = True,
            ds: Dataset | None = None, resume: bool = False) -> dict[str, Any]:
    """Fit/reuse teachers, build/reuse caches, train the student with ``cfg.method``, evaluate, export."""
    import contextlib

    from appdistill.train.io import run_lock

    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    # one writer per run directory for the whole pipeline (train and export re-take it re-entrantly)
    with run_lock(run_dir, "distill") if rank == 0 else contextlib.nullcontext():
        return _distill(cfg, run_dir, export=export, progress=progress, ds=ds, resume=resume, rank=rank)


def _distill(cfg: ExperimentConfig, run_dir: Path, *, export: bool, progress: bool, ds: Dataset | None,
             resume: bool, rank: int) -> dict[str, Any]:
    from appdistill.train.loop import teachers_dir, train

    ds = ds if ds is not None else Dataset.build(cfg.load_spec())
    if cfg.teachers and rank == 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        fit_committee(cfg, teachers_dir(cfg, run_dir), ds=ds, progress=progress)
    elif cfg.teachers and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun, teachers are fitted by one process beforehand (`appdistill teachers fit`)
        pass
    metrics = train(cfg, run_dir, dataset=ds, progress=progress, resume=resume)
    if export and rank == 0:
        from appdistill.export.artifact import export_run

        export_run(run_dir, run_dir / "export")
        if cfg.tracking.enabled:  # into the MLflow run that train() recorded in RUN_DIR/tracking.json
            from appdistill.train.tracking import reopen_tracker

            with reopen_tracker(run_dir) as tracker:
                tracker.log_artifacts(run_dir / "export", "export")
    return metrics
