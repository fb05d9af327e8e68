"""The wiring layer: the one place that puts a run together from a config.

``appdistill distill`` is teachers -> cache -> student -> eval -> export; ``appdistill train`` is the
student part with a committee fitted beforehand. Here (and only here) the config's teachers are
fitted or reused (:func:`fit_teachers`), loaded once each, their output caches built or reused
(:func:`build_caches`), and handed to the training loop as a
:class:`~appdistill.train.loop.Committee` (:func:`train`). The packages below never load a
teacher or read a config's committee themselves.

Each stage reuses what an earlier run left when it still matches (fitted teachers by fit
fingerprint, caches by teacher identity + data fingerprint), so rerunning with another method only
trains the student.

Example:
    >>> cfg = load_config("configs/ml100k_committee.yaml")
    >>> fit_committee(cfg, "runs/c")                    # teachers -> runs/c/teachers/<name>/
    >>> metrics = train(cfg, "runs/c/dd")               # the student, with cfg.teachers_dir = runs/c
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appdistill.config import ExperimentConfig
from appdistill.errors import ConfigError
from appdistill.features.dataset import Dataset
from appdistill.io import atomic_write_text, staged_dir
from appdistill.progress import write as progress_write

log = logging.getLogger("appdistill.pipeline")


def text_embeddings_for(cfg: ExperimentConfig, ds: Dataset, names: list[str] | None = None) -> dict[str, Any] | None:
    """Item text embeddings for teachers that read text (LightGBM), from the foundation store; the
    teachers in ``names`` (default: all) encode their items first (:meth:`Teacher.encode_items`)."""
    feats = [f for f in ds.spec.features if f.kind == "text"
             and any(f.name in v for m, v in ds.spec.visibility.items() if m != "student")]
    from appdistill.teachers.fit import build_teacher, teacher_class

    wants_text = any(teacher_class(b.key).wants_text_embeddings(b.kwargs) for b in cfg.teachers.values())
    if not feats or not wants_text:
        return None
    spec = ds.spec
    for name, b in cfg.teachers.items():  # the committee's encoders first, every output in one pass
        if names is None or name in names:
            build_teacher(b.key, b.kwargs, spec, name).encode_items(ds)
    from appdistill.foundation.catalog import text_embeddings  # through the shared per-item store

    return text_embeddings(ds, feats)


def _teacher_metrics(teacher: Any, ds: Dataset, cfg: ExperimentConfig, key: str, fit_seconds: float) -> dict[str, Any]:
    """``metrics.json`` of a teacher: its evaluation on every split plus how it was fitted."""
    from appdistill.teachers.fit import evaluate_teacher

    return {**evaluate_teacher(teacher, ds, cfg.eval.k), "fit_seconds": fit_seconds, "key": key,
            "identity_hash": teacher.identity_hash()}


def fit_teachers(cfg: ExperimentConfig, run_dir: str | Path, names: list[str] | None = None,
                 ds: Dataset | None = None, *, text_embeddings: dict[str, np.ndarray] | None = None,
                 progress: bool = True, force: bool = False) -> dict[str, dict[str, Any]]:
    """Fit (or reuse) every teacher of ``cfg.teachers`` and write ``run_dir/teachers/<name>/``.

    Args:
        cfg: the experiment config; ``cfg.teachers`` is ``{name: {key, kwargs}}``.
        run_dir: run directory.
        names: fit only these teachers (default: all, in config order).
        ds: the encoded data set (built from ``cfg``'s spec when omitted).
        text_embeddings: ``{text feature: [n_table_rows(+1), d]}`` item text embeddings for teachers
            that take them (LightGBM); teachers without the ``text_embeddings`` attribute ignore them.
        progress: progress bars and one line per teacher.
        force: refit even when a matching fitted teacher exists.

    Returns:
        ``{name: metrics}`` with the ``metrics.json`` content plus ``reused`` and ``identity``.
    """
    from appdistill.teachers.fit import (FIT_JSON, METRICS_JSON, TEACHER_JSON, build_teacher,
                                         fit_fingerprint, jsonable, reuse_fitted, saved_identity, write_teacher_json)

    run_dir = Path(run_dir)
    spec = cfg.load_spec()
    names = list(cfg.teachers) if names is None else list(names)
    unknown = [n for n in names if n not in cfg.teachers]
    if unknown:
        raise ConfigError(f"teachers {unknown} are not in the config (teachers: {sorted(cfg.teachers)})")
    if ds is None:
        ds = Dataset.build(spec)
    say = progress_write if progress else log.info
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        block = cfg.teachers[name]
        teacher = build_teacher(block.key, block.kwargs, spec, name)
        if text_embeddings is not None and teacher.wants_text_embeddings(block.kwargs):
            teacher.text_embeddings = text_embeddings
        teacher.progress = progress
        path = run_dir / "teachers" / name
        fp = fit_fingerprint(teacher, ds)
        reused = None if force else reuse_fitted(run_dir, name, spec, ds, fp)
        if reused is not None:
            teacher, fit_seconds = reused
            say(f"teacher {name} ({block.key}): reusing {path} (identity {teacher.identity_hash()})")
        else:
            say(f"teacher {name} ({block.key}): fitting on {len(ds.splits['train']):,} training rows")
            t0 = time.perf_counter()
            teacher.fit(ds)
            fit_seconds = round(time.perf_counter() - t0, 3)
            metrics = _teacher_metrics(teacher, ds, cfg, block.key, fit_seconds)
            # the whole directory is swapped in at once: a crash mid-save leaves the old one (or none)
            with staged_dir(path) as stage:
                teacher.save(stage)
                if saved_identity(stage / TEACHER_JSON) != teacher.identity_hash():  # teachers that do not write it
                    write_teacher_json(teacher, stage)
                atomic_write_text(stage / METRICS_JSON, json.dumps(jsonable(metrics), indent=2))
                atomic_write_text(stage / FIT_JSON, json.dumps({"fit_fingerprint": fp, "fit_seconds": fit_seconds,
                                                                "identity_hash": teacher.identity_hash()}, indent=1))
        metrics_path = path / METRICS_JSON
        if reused is not None:
            if saved_identity(metrics_path) == teacher.identity_hash():
                metrics = json.loads(metrics_path.read_text())
            else:
                metrics = _teacher_metrics(teacher, ds, cfg, block.key, fit_seconds)
                atomic_write_text(metrics_path, json.dumps(jsonable(metrics), indent=2))
        say(f"teacher {name}: test AUC {metrics['test']['auc']:.4f}, valid AUC {metrics['valid']['auc']:.4f}, "
            f"fit {metrics['fit_seconds']:.1f}s")
        results[name] = {**metrics, "reused": reused is not None, "identity": jsonable(teacher.identity())}
    return results


def fit_committee(cfg: ExperimentConfig, run_dir: str | Path, names: list[str] | None = None,
                  ds: Dataset | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    ds = ds if ds is not None else Dataset.build(cfg.load_spec())
    return fit_teachers(cfg, run_dir, names, ds, text_embeddings=text_embeddings_for(cfg, ds, names),
                        progress=progress, force=force)


def build_caches(cfg: ExperimentConfig, run_dir: str | Path, ds: Dataset | None = None, *,
                 teachers: dict[str, Any] | None = None, splits: Sequence[str] = ("train", "valid", "test"),
                 batch_size: int = 8192, float_dtype: str = "float32", int_dtype: str = "auto",
                 verify: str = "checksum", progress: bool = True, hidden: bool | tuple[str, ...] | None = None,
                 echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Get or build the cache of every teacher in ``cfg.teachers`` under ``run_dir/cache``.

    Each teacher not given is loaded from ``run_dir/teachers/<name>`` (``appdistill.teachers.fit.load_teacher``)
    and a one-line summary is printed per teacher (built/reused, rows, MB, seconds).

    Args:
        cfg: the experiment config.
        run_dir: the run directory (teachers fitted there already).
        ds: the data set; built from ``cfg``'s spec when ``None``.
        teachers: ``{name: Teacher}`` already loaded (each is loaded here otherwise).
        echo: where summary lines go (``print``; pass ``log.info`` or a no-op to silence).
        hidden: cache the teachers' hidden taps too; ``None`` (default): when ``cfg.method`` reads them
            (:meth:`Method.reads_hidden`), else the logits only.
        others: see :func:`appdistill.cache.get_or_build_cache`.

    Returns:
        ``{teacher name: TeacherCache}`` in config order.
    """
    from appdistill.cache import get_or_build_cache
    from appdistill.methods import METHODS
    from appdistill.teachers.fit import load_teacher

    ds = ds if ds is not None else Dataset.build(cfg.load_spec())
    root = Path(run_dir) / "cache"
    if hidden is None:
        hidden = cfg.method.key in METHODS and METHODS.get(cfg.method.key).reads_hidden(cfg.method.kwargs)
    caches: dict[str, Any] = {}
    for name in cfg.teachers:
        teacher = (teachers or {}).get(name) or load_teacher(run_dir, name, ds.spec, ds)
        cache = get_or_build_cache(teacher, ds, root, splits=splits, batch_size=batch_size, progress=progress,
                                   float_dtype=float_dtype, int_dtype=int_dtype, verify=verify, hidden=hidden)
        if not cache.built:
            what = "reused"
        elif cache.rebuilt:
            what = f"rebuilt {','.join(cache.rebuilt)} (corrupt), built {','.join(cache.built)}"
        else:
            what = f"built {','.join(cache.built)}"
        echo(f"teacher cache {name}: {what}; {cache.n_rows:,} rows, {cache.nbytes / 2**20:.1f} MB, "
             f"{f'taps {cache.hidden_shapes()}' if cache.taps else 'logits only'}, {cache.seconds:.1f} s -> {cache.path}")
        caches[name] = cache
    return caches


def load_committee(cfg: ExperimentConfig, ds: Dataset, run_dir: str | Path, ctx: Any,
                   progress: bool = True, hidden: bool | tuple[str, ...] | None = None) -> Any:
    """The :class:`~appdistill.train.loop.Committee` of a run: each fitted teacher loaded once, its
    caches built or reused (rank 0 first under torchrun), the join hook, the teachers' own metrics.

    Teachers must already be fitted (``appdistill teachers fit`` or ``appdistill distill``) in
    :meth:`ExperimentConfig.teachers_path`. A plain student (``method: none``) gets the metrics only.
    ``hidden``: the taps to cache, as :func:`build_caches` (default: what ``cfg.method`` reads).
    """
    from appdistill.teachers.fit import METRICS_JSON, load_teacher
    from appdistill.train.loop import Committee

    tdir = cfg.teachers_path(run_dir)
    metrics = {n: json.loads((tdir / "teachers" / n / METRICS_JSON).read_text()) for n in cfg.teachers
               if (tdir / "teachers" / n / METRICS_JSON).is_file()}
    if cfg.method.key == "none" or not cfg.teachers:
        return Committee(metrics=metrics)
    splits = tuple(ds.splits)  # train, valid, test (+ transfer)
    teachers = {n: load_teacher(tdir, n, ds.spec, ds) for n in cfg.teachers}
    if ctx.is_dist:
        import torch.distributed as dist

        if ctx.is_main:
            build_caches(cfg, tdir, ds, teachers=teachers, splits=splits, progress=progress, hidden=hidden)
        dist.barrier()
    caches = build_caches(cfg, tdir, ds, teachers=teachers, splits=splits, progress=progress and ctx.is_main,
                          hidden=hidden,
                          # one line per teacher on a terminal run; quiet under --no-progress and in `bench`,
                          # which prints one line per run itself
                          echo=print if ctx.is_main and not ctx.is_dist and progress else log.info)
    return Committee(teachers, caches, metrics)


def train(cfg: ExperimentConfig, run_dir: str | Path, *, dataset: Dataset | None = None, progress: bool = True,
          resume: bool = False) -> dict[str, Any]:
    """Train the student of ``cfg`` into ``run_dir`` (see :func:`appdistill.train.loop.train`), its
    committee loaded here from :meth:`ExperimentConfig.teachers_path`. Returns the ``metrics.json`` dict."""
    from appdistill.train.loop import train as train_student

    return train_student(cfg, run_dir, dataset=dataset, progress=progress, resume=resume,
                         committee=lambda ds, ctx: load_committee(cfg, ds, run_dir, ctx, progress))


def distill(cfg: ExperimentConfig, run_dir: str | Path, *, export: bool = True, progress: bool = True,
            ds: Dataset | None = None, resume: bool = False) -> dict[str, Any]:
    """Fit/reuse teachers, build/reuse caches, train the student with ``cfg.method``, evaluate, export."""
    import contextlib

    from appdistill.io import run_lock

    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    # one writer per run directory for the whole pipeline (train and export re-take it re-entrantly)
    with run_lock(run_dir, "distill") if rank == 0 else contextlib.nullcontext():
        return _distill(cfg, run_dir, export=export, progress=progress, ds=ds, resume=resume, rank=rank)


def _distill(cfg: ExperimentConfig, run_dir: Path, *, export: bool, progress: bool, ds: Dataset | None,
             resume: bool, rank: int) -> dict[str, Any]:
    ds = ds if ds is not None else Dataset.build(cfg.load_spec())
    if cfg.teachers and rank == 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        fit_committee(cfg, cfg.teachers_path(run_dir), ds=ds, progress=progress)
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
