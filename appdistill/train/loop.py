"""``train()``: one loop for a single process and for ``torchrun``.

Every rank builds the same data set (deterministic), walks the same global batch order and takes
its slice; embedding tables are sharded by TorchRec under torchrun. Evaluation runs on every rank
(the sharded model needs all of them for its all-to-all) and logits are gathered, so every rank
takes the same best-epoch decision; rank 0 writes the run directory.

Example:
    >>> from appdistill.config import load_config
    >>> metrics = train(load_config("configs/ml100k_plain.yaml"), "runs/plain")
    >>> metrics["test"]["auc"]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appdistill.cache import CacheJoin
from appdistill.config import ExperimentConfig
from appdistill.distributed import (DistContext, adam, all_gather_varlen, full_state_dict, init_distributed,
                                    load_full_state_dict, shard_model, unwrap)
from appdistill.errors import ConfigError
from appdistill.eval.metrics import evaluate_rows
from appdistill.features.batch import BatchBuilder, BatchLoader
from appdistill.features.content import CONTENT_DIR, ContentTable
from appdistill.features.dataset import Dataset
from appdistill.foundation.content import build_content_table
from appdistill.io import atomic_write_text, directory_in_the_way, run_lock, save_checkpoint
from appdistill.methods import METHODS
from appdistill.methods.stack import HeldOut
from appdistill.progress import bar as progress_bar, write as progress_write
from appdistill.student.model import RankingModel, StudentConfig, build_student, check_interaction
from appdistill.train import checkpoint as ckpt
from appdistill.train.plots import plot_curves
from appdistill.train.tracking import Tracker, config_params, make_tracker, step_values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_config(cfg: ExperimentConfig, spec: Any = None) -> StudentConfig:
    """The student's architecture; ``spec`` (default: the config's) sizes the content input."""
    return StudentConfig.from_section(cfg.student, spec if spec is not None else cfg.load_spec())


@torch.no_grad()
def predict(model: torch.nn.Module, builder: BatchBuilder, rows: np.ndarray, ctx: DistContext,
            batch_size: int = 8192) -> np.ndarray:
    """Student logits ``[len(rows)]`` in ``rows`` order; collective under torchrun."""
    was = model.training
    model.eval()
    loader = BatchLoader(builder, rows, batch_size * ctx.world_size, rank=ctx.rank,
                         world_size=ctx.world_size, prefetch=2)
    logits, ids = [], []
    for b in loader:
        b = b.to(ctx.device)
        with torch.no_grad():  # evaluation builds no autograd graph
            logits.append(model(b.sparse, b.dense).logits.float().cpu())
        ids.append(b.row_ids.cpu())
    z = all_gather_varlen(torch.cat(logits) if logits else torch.zeros(0), ctx)
    r = all_gather_varlen(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long), ctx)
    model.train(was)
    # map gathered (row id, logit) pairs back to the order of ``rows``
    sorter = np.argsort(rows, kind="stable")
    out = np.empty(len(rows), np.float64)
    out[sorter[np.searchsorted(rows, r.numpy(), sorter=sorter)]] = z.numpy()
    return out


def train_loader(cfg: ExperimentConfig, ds: Dataset, builder: BatchBuilder, ctx: DistContext,
                 hooks: list[Any] | None = None, prefetch: int | None = None) -> BatchLoader:
    """The training split's loader: the batches (and their per-epoch order) ``train()`` steps
    through. ``prefetch`` overrides ``cfg.train.prefetch``.

    ``train.prefetch: null`` (the default) builds batches on a loader thread only when a core is
    left over by the training threads of every rank on this machine. On a 2-core machine the
    thread competes with torch's two intra-op threads: ``bench_student`` measured 0.88 / 0.97 /
    0.76 / 0.85 with ``prefetch: 4`` against 0.92 / 0.96 / 0.87 inline (a batch costs ~0.3 ms to
    build, in blocks of 32).
    """
    tr = cfg.train
    # transfer-set rows (NaN labels) are shuffled in with the labelled ones
    rows = np.concatenate([ds.splits["train"], ds.splits["transfer"]]) if "transfer" in ds.splits else ds.splits["train"]
    return BatchLoader(builder, rows, tr.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(rows) >= tr.batch_size,
                       rank=ctx.rank, world_size=ctx.world_size,
                       prefetch=train_prefetch(cfg) if prefetch is None else prefetch, hooks=hooks,
                       block_shuffle=tr.block_shuffle(bool(ds.streamed)))


def train_prefetch(cfg: ExperimentConfig) -> int:
    """``cfg.train.prefetch``, or when it is null: 4 if this machine has a core beyond the torch
    threads of all its ranks, else 0 (build inline)."""
    if cfg.train.prefetch is not None:
        return cfg.train.prefetch
    busy = torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return 4 if _cores() > busy else 0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_transfer(cfg: ExperimentConfig, spec: Any, ds: Dataset) -> Dataset:
    """``ds`` with ``cfg.transfer``'s unlabelled rows appended (``splits["transfer"]``), when a
    method distils from teachers; ``ds`` itself otherwise."""
    t = cfg.transfer
    if not t.enabled or cfg.method.key == "none" or not cfg.teachers or "transfer" in ds.splits:
        return ds
    from appdistill.features.transfer import make_transfer_rows

    if ds.streamed:
        raise ConfigError("transfer.enabled: a transfer set is built from the interactions in memory; this spec "
                          "streams them from a folder of parquet files (turn transfer off, or give one file)")
    return Dataset.build(spec, tables=ds.tables,
                         transfer=lambda sp, tb, sl: make_transfer_rows(sp, tb, sl, t.ratio, t.strategy, t.seed))


def method_optimizer(method: torch.nn.Module, lr: float) -> torch.optim.Optimizer | None:
    """Adam over the method's trainable (training-only) parameters; None when it has none."""
    params = [p for p in method.parameters() if p.requires_grad]
    return adam(params, lr) if params else None


def train_step(model: torch.nn.Module, method_fn: torch.nn.Module, opt: Any,
               method_opt: torch.optim.Optimizer | None, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of student and method on ``batch``; returns ``(loss, terms)``.
    ``benchmarks/bench_step.py`` times exactly this."""
    out = model(batch.sparse, batch.dense)
    terms = method_fn(out, batch, unwrap(model))
    loss = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    if method_opt is not None:
        method_opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if method_opt is not None:
        method_opt.step()
    return loss, terms


def evaluate_split(model: torch.nn.Module, ds: Dataset, builder: BatchBuilder, split: str, ctx: DistContext,
                   cfg: ExperimentConfig, full: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    rows = ds.splits[split]
    z = predict(model, builder, rows, ctx, cfg.train.eval_batch_size)
    return evaluate_rows(z, ds, rows, cfg.eval.k, full), z


@dataclass
class Committee:
    """What a run distils from, handed to :func:`train` by the wiring layer (``appdistill.pipeline``).

    Attributes:
        teachers: ``{name: Teacher}`` loaded once, in config order.
        caches: ``{name: TeacherCache}`` of every split the run reads; the loop joins to each batch
            only the teachers and taps the method declares (``Method.cache_taps()``).
        metrics: ``{name: the teacher's own metrics.json}``, reported beside the student's.
    """

    teachers: dict[str, Any] = field(default_factory=dict)
    caches: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def train(cfg: ExperimentConfig, run_dir: str | Path, *, dataset: Dataset | None = None,
          committee: Callable[[Dataset, DistContext], Committee] | None = None,
          progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train the student with ``cfg.method``, evaluate, and write ``run_dir`` (rank 0).

    Args:
        dataset: the data set (built from the config's spec when ``None``); a transfer set is added here.
        committee: ``(dataset, ctx) -> Committee``, called once the run directory exists; required when
            the method distils from teachers. ``appdistill.pipeline.train`` supplies it (fitted teachers,
            their caches); this function never loads a teacher itself.
        resume: continue from ``run_dir/checkpoints/last.pt`` when it exists (a fresh start
            otherwise). Under ``torchrun --max-restarts`` a restarted worker group resumes by itself.

    With ``tracking.enabled`` rank 0 also logs to MLflow (``appdistill.train.tracking``); the run
    ends FINISHED, or FAILED (KILLED on Ctrl-C) when training raises.

    Returns the ``metrics.json`` dict (on every rank).
    """
    spec = cfg.load_spec()  # the student section is checked against it before RUN_DIR exists:
    if cfg.student.content.enabled:  # a content section the spec cannot serve
        from appdistill.features.content import content_features

        content_features(list(cfg.student.content.features), spec)
    check_interaction(cfg.student, spec)  # e.g. `dot` for a dense-only student
    trackers: list[Tracker] = []  # _train puts its tracker here once the run directory exists
    threads = torch.get_num_threads()  # _train may change it for the run; the caller gets it back
    # one writer per run directory: a second train/distill/export on it fails at once (rank 0 writes)
    lock = run_lock(run_dir, "train") if int(os.environ.get("RANK", "0") or 0) == 0 else contextlib.nullcontext()
    try:
        with lock:
            metrics = _train(cfg, run_dir, trackers, dataset=dataset, committee=committee, progress=progress,
                             resume=resume)
    except BaseException as e:
        for t in trackers:
            t.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        torch.set_num_threads(threads)
    for t in trackers:
        t.close("FINISHED")
    return metrics


def _train(cfg: ExperimentConfig, run_dir: str | Path, trackers: list[Tracker], *, dataset: Dataset | None,
           committee: Callable[[Dataset, DistContext], Committee] | None, progress: bool,
           resume: bool) -> dict[str, Any]:
    """The body of :func:`train`; appends its tracker to ``trackers`` for the caller to close."""
    ctx = init_distributed()
    run_dir = Path(run_dir)
    cores = _cores()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    elif ctx.is_dist:
        torch.set_num_threads(max(1, cores // ctx.world_size))
    seed_everything(cfg.seed)
    # before the data is built: what this run writes must be writable as files (a directory named
    # checkpoint.pt would otherwise fail the run at its first save, after the first epoch)
    directory_in_the_way([run_dir / f for f in (ckpt.RESUME_FILE, "checkpoint.pt", "metrics.json", "history.json",
                                                "config.yaml", "processor.json", "spec.json")])
    spec = cfg.load_spec()
    ds = with_transfer(cfg, spec, dataset if dataset is not None else Dataset.build(spec))
    if (resume or _restarted()) and (run_dir / ckpt.RESUME_FILE).is_file():
        # a changed spec/data/student/method/teacher set is refused before anything below is written,
        # so a refused --resume leaves the finished run exactly as it was
        ckpt.precheck_resume(run_dir / ckpt.RESUME_FILE, cfg, spec.fingerprint(), ds.fingerprint,
                             cfg.teachers_path(run_dir), bool(ds.streamed))
    content = build_content_table(cfg.student.content, ds)
    processor_json = ds.processor.to_json()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if content is not None:  # export ships it; `appdistill content refresh` extends it there
            content.save(run_dir / CONTENT_DIR)
        atomic_write_text(run_dir / "config.yaml", cfg.dump())
        atomic_write_text(run_dir / "processor.json", processor_json)  # its sha256 goes in checkpoint.pt
        atomic_write_text(run_dir / "spec.json", json.dumps(spec.model_dump(), indent=1))
    tracker = make_tracker(cfg, run_dir, ctx.is_main,
                           resume=(resume or _restarted()) and (run_dir / ckpt.RESUME_FILE).is_file())
    trackers.append(tracker)
    tracker.log_params(config_params(cfg))

    torch.manual_seed(cfg.seed)
    model: torch.nn.Module = build_student(spec, ds.processor, student_config(cfg, spec))
    size = unwrap(model).size()  # type: ignore[operator]
    # under torchrun every rank loads these weights after sharding (one init for all); a single process
    # keeps its model as built (a copy would double the embedding tables' memory for nothing)
    init_state = {k: v.clone() for k, v in model.state_dict().items()} if ctx.is_dist else {}
    wants = cfg.method.key != "none" and bool(cfg.teachers)
    if wants and committee is None:
        raise ConfigError(f"method '{cfg.method.key}' distils from the configured teachers; train through "
                          "appdistill.pipeline.train (or `appdistill train`), which loads them")
    parts = committee(ds, ctx) if committee is not None and cfg.teachers else Committee()
    method = build_method(cfg, parts.teachers, unwrap(model).over_arch.in_dim, ds, parts.caches).to(ctx.device)
    taps = method.cache_taps()  # the join reads only the teachers and taps the method declares
    joined = {n: c for n, c in parts.caches.items() if n in taps}
    hooks = [CacheJoin(joined, taps=taps)] if taps and parts.caches else []
    model, opt = shard_model(model, ctx, cfg.train.lr, cfg.train.embedding_lr, cfg.train.weight_decay,
                             cfg.train.sharding)
    method_opt = method_optimizer(method, cfg.train.lr)
    ident = ckpt.identity(cfg, spec.fingerprint(), ds.fingerprint, {n: t.identity() for n, t in parts.teachers.items()},
                          bool(ds.streamed))
    pos, best_state = ckpt.Position(), None
    resume_path = run_dir / ckpt.RESUME_FILE
    if (resume or _restarted()) and resume_path.is_file():
        pos, best_state = _restore(resume_path, ident, model, opt, method, method_opt, ctx, cfg.seed)
        if ctx.is_main:
            print(f"resuming from {resume_path}: epoch {pos.epoch + 1}, step {pos.global_step}", flush=True)
    elif ctx.is_dist:
        load_full_state_dict(model, init_state, ctx)  # same initial weights as a single-process run
    method_fn: torch.nn.Module = method
    if ctx.is_dist and method_opt is not None:
        # training-only parameters are replicated: average their gradients like the dense arch's
        method_fn = torch.nn.parallel.DistributedDataParallel(method, find_unused_parameters=True)

    builder = student_batches(ds, content)
    tr = cfg.train
    loader = train_loader(cfg, ds, builder, ctx, hooks)
    total = tr.epochs * len(loader)
    fault = _fault_step(ctx)

    def checkpoint() -> None:  # collective under torchrun
        ckpt.save_resume_collective(resume_path, model, opt, method, method_opt, pos, ident, best_state,
                                    cfg.model_dump(exclude={"base_dir"}), ctx)

    for epoch in range(pos.epoch, tr.epochs):
        if epoch != pos.epoch or pos.step_in_epoch == 0:
            pos.epoch, pos.step_in_epoch, pos.sums, pos.counts = epoch, 0, {}, {}
        loader.set_epoch(epoch, pos.step_in_epoch)
        model.train()
        t0 = time.perf_counter()
        bar = progress_bar(loader, total=len(loader), initial=pos.step_in_epoch, desc=f"epoch {epoch + 1}/{tr.epochs}",
                           enabled=progress and ctx.is_main, leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = batch.to(ctx.device)
            loss, terms = train_step(model, method_fn, opt, method_opt, batch)
            method.on_step_end(loss.detach(), pos.global_step, total)
            pos.global_step += 1
            pos.step_in_epoch += 1
            pos.samples += batch.size * ctx.world_size
            for k, v in terms.items():
                pos.sums[k] = pos.sums.get(k, 0.0) + float(v.detach())
                pos.counts[k] = pos.counts.get(k, 0) + 1
            if pos.global_step % tr.log_every == 0 or pos.global_step == 1:
                rec = {"step": pos.global_step, "loss": float(loss.detach()), **method.logs()}
                pos.step_log.append(rec)
                tracker.log_step(pos.global_step, step_values(rec, terms))
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if tr.checkpoint_every and pos.global_step % tr.checkpoint_every == 0:
                pos.train_seconds += time.perf_counter() - t0
                checkpoint()
                t0 = time.perf_counter()
            if pos.global_step == fault:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the restart tests
        pos.train_seconds += time.perf_counter() - t0
        n_steps = max(1, len(loader))
        valid, _ = evaluate_split(model, ds, builder, "valid", ctx, cfg, full=False)
        rec = {"epoch": epoch + 1, **{f"train_{k}": v / pos.counts.get(k, n_steps) for k, v in pos.sums.items()},
               "valid_auc": valid["auc"], "valid_logloss": valid["logloss"]}
        pos.history.append(rec)
        tracker.log_step(epoch + 1, {k: v for k, v in rec.items() if k != "epoch"})
        if ctx.is_main and progress:
            progress_write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in rec.items() if k != "epoch"))
        if tr.select_best and valid["auc"] > pos.best_auc:
            pos.best_auc, pos.best_epoch = valid["auc"], epoch + 1
            best_state = full_state_dict(model, ctx) if tr.epochs > 1 else None
        pos.epoch, pos.step_in_epoch, pos.sums, pos.counts = epoch + 1, 0, {}, {}
        checkpoint()
    if tr.select_best and pos.best_epoch != tr.epochs and pos.best_epoch > 0:
        load_full_state_dict(model, _broadcast_state(best_state, model, ctx), ctx)
    test, _ = evaluate_split(model, ds, builder, "test", ctx, cfg)
    valid, _ = evaluate_split(model, ds, builder, "valid", ctx, cfg, full=False)
    metrics: dict[str, Any] = {
        "dataset": spec.name, "split": spec.split.by, "method": cfg.method.key, "seed": cfg.seed,
        "test": test, "valid": valid, "teachers": parts.metrics,
        "student": {"params": size["params"], "bytes": size["bytes"], "embedding_params": size["embedding_params"]},
        "train": {"seconds": round(pos.train_seconds, 3),
                  "samples_per_s": round(pos.samples / max(pos.train_seconds, 1e-9), 1),
                  "steps": pos.global_step, "epochs": tr.epochs,
                  "best_epoch": pos.best_epoch if tr.select_best else tr.epochs,
                  "world_size": ctx.world_size, "teacher_passes_skipped": float(method.logs().get("skipped", 0.0))},
        "data": {"fingerprint": ds.fingerprint, "nan_imputed": ds.processor.nan_imputed,
                 "join_coverage": ds.join_coverage},
    }
    routing = routing_report(model, method, ds, builder, hooks, ctx, cfg.train.eval_batch_size)
    if routing is not None:
        metrics["routing"] = routing
    state = full_state_dict(model, ctx)
    if ctx.is_main:
        save_checkpoint(run_dir / "checkpoint.pt", {
            "model": state, "config": cfg.model_dump(exclude={"base_dir"}), "spec_fingerprint": spec.fingerprint(),
            "data_fingerprint": ds.fingerprint, "epoch": tr.epochs, "step": pos.global_step,
            # export serves processor.json only if it is still the one this model was trained with
            "processor_sha256": hashlib.sha256(processor_json.encode()).hexdigest(),
            "teachers": {n: t.identity() for n, t in parts.teachers.items()}})
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
        atomic_write_text(run_dir / "history.json",
                          json.dumps({"epochs": pos.history, "steps": pos.step_log}, indent=1))
        plot_curves(pos.history, pos.step_log, run_dir / "curve.png", title=f"{cfg.name} ({cfg.method.key})")
        tracker.log_metrics(metrics)
        for name in ("metrics.json", "history.json", "curve.png", "config.yaml"):
            tracker.log_artifact(run_dir / name)
    return metrics


def _restarted() -> bool:
    """True in a worker group that ``torchrun --max-restarts`` restarted after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _fault_step(ctx: DistContext) -> int:
    """``APPDISTILL_FAULT=RANK:STEP``: SIGKILL this rank after global step STEP (first attempt only).

    A testing hook: the kill-and-resume and torchrun-restart tests use it to die at a chosen step.
    """
    spec = os.environ.get("APPDISTILL_FAULT", "")
    if not spec or _restarted():
        return -1
    rank, step = (int(x) for x in spec.split(":"))
    return step if rank == ctx.rank else -1


def _restore(path: Path, ident: dict[str, Any], model: torch.nn.Module, opt: Any, method: torch.nn.Module,
             method_opt: torch.optim.Optimizer | None, ctx: DistContext,
             seed: int) -> tuple[ckpt.Position, dict[str, torch.Tensor] | None]:
    """Load a resume checkpoint into the (possibly sharded) model, optimizers, method and RNGs."""
    ck = ckpt.load_resume(path, ident)
    ckpt.load_optimizer_state(opt, ck["optim"], ctx)
    load_full_state_dict(model, ck["model"], ctx)  # after the optimizer: its state init may touch weights
    m = ck["method"]
    method.load_state_dict(m["params"], strict=False)
    if method_opt is not None and m["optim"] is not None:
        method_opt.load_state_dict(m["optim"])
    method.load_state(m["state"])
    pos: ckpt.Position = ck["position"]
    if len(ck["rng"]) == ctx.world_size:
        ckpt.set_rng_state(ck["rng"][ctx.rank])
    else:  # another world size: no per-rank stream to continue; a fresh, reproducible one
        seed_everything(seed + 7919 * ctx.rank + pos.global_step)
    return pos, ck["best_state"]


@torch.no_grad()
def routing_report(model: torch.nn.Module, method: Any, ds: Dataset, builder: BatchBuilder, hooks: list[Any],
                   ctx: DistContext, batch_size: int) -> dict[str, Any] | None:
    """Each teacher's mean share of what the method distils on the test rows (its gate's weights,
    or the held-out stack's modulated by them), overall and per item segment (the bench sets it
    beside the segment oracle's choices). Methods without ``route_weights``, and torchrun runs,
    report none."""
    if ctx.is_dist or not hasattr(method, "route_weights") or not hooks:
        return None
    from appdistill.eval.segments import split_buckets

    rows = ds.splits["test"]
    was = model.training
    model.eval()
    w, ids = [], []
    for b in BatchLoader(builder, rows, batch_size, hooks=hooks, prefetch=0):
        b = b.to(ctx.device)
        w.append(method.route_weights(model(b.sparse, b.dense).h, b).float().cpu())
        ids.append(b.row_ids.cpu())
    model.train(was)
    W = torch.cat(w).numpy()
    pos = np.searchsorted(rows, torch.cat(ids).numpy())  # rows are sorted; loader order may differ
    names = list(method.names)
    out: dict[str, Any] = {"teachers": names, "overall": {n: round(float(W[:, j].mean()), 4)
                                                         for j, n in enumerate(names)}}
    buckets = split_buckets(ds, rows).get("items")
    if buckets is not None:
        b = buckets[pos]
        out["segments"] = {s: {n: round(float(W[b == s, j].mean()), 4) for j, n in enumerate(names)}
                           for s in ("cold", "tail", "torso", "head") if (b == s).any()}
    return out


def build_method(cfg: ExperimentConfig, committee: dict[str, Any], student_dim: int, ds: Dataset | None = None,
                 caches: dict[str, Any] | None = None) -> Any:
    """Build ``cfg.method`` (:func:`make_method` with the config's key and kwargs)."""
    return make_method(cfg.method.key, cfg.method.kwargs, committee, student_dim, ds, caches)


def make_method(key: str, kwargs: dict[str, Any], committee: dict[str, Any], student_dim: int,
                ds: Dataset | None = None, caches: dict[str, Any] | None = None) -> Any:
    """Method ``key`` with ``kwargs``; the loop supplies ``committee``, ``student_dim``, and (from ``ds``
    and the teachers' ``caches``) ``item_frequency`` (training rows per item code) and ``held_out``
    (the committee's cached validation logits, :class:`~appdistill.methods.stack.HeldOut`) to the
    methods whose signature takes them."""
    import inspect

    params = inspect.signature(METHODS.get(key, context="method")).parameters
    extra: dict[str, Any] = {}
    if "committee" in params:
        extra["committee"] = committee
    if "student_dim" in params:
        extra["student_dim"] = student_dim
    if "item_frequency" in params and ds is not None:
        extra["item_frequency"] = ds.train_counts("items")
    if "held_out" in params and ds is not None and caches and len(ds.splits.get("valid", [])):
        valid = ds.splits["valid"]
        extra["held_out"] = HeldOut.of(ds, {n: c.lookup("valid", valid, taps=[]).logits.numpy()
                                            for n, c in caches.items()})
    return METHODS.build(key, kwargs, "method", **extra)


def _broadcast_state(state: dict[str, torch.Tensor] | None, model: torch.nn.Module,
                     ctx: DistContext) -> dict[str, torch.Tensor]:
    """Rank 0 holds the full best state; give every rank a copy (they load their own shards)."""
    if not ctx.is_dist:
        assert state is not None
        return state
    import torch.distributed as dist

    obj = [state]
    dist.broadcast_object_list(obj, src=0)  # between our own ranks only
    return obj[0]  # type: ignore[return-value]


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


def build_model_for_run(cfg: ExperimentConfig, ds: Dataset) -> RankingModel:
    return build_student(ds.spec, ds.processor, student_config(cfg, ds.spec))


def student_batches(ds: Dataset, content: ContentTable | None) -> BatchBuilder:
    """The student's batches: its visible features, then the content table's columns (looked up through
    the same vocabulary and vectors that serving reads from the export)."""
    if content is None:
        return BatchBuilder(ds, ds.spec.visible("student"))
    vec = np.concatenate([content.lookup(ds.tables[content.table][content.key]),
                          np.zeros((1, content.dim), np.float32)])  # + the missing-join row
    return BatchBuilder(ds, ds.spec.visible("student"), content=(content.table, vec))
