"""Teacher-cache join cost inside the BatchLoader, and cache build/open times, on ML-100K.

Three fake teachers (deterministic functions of the row id; no real teacher needed) with hidden
taps ``h [B, 64]`` float32, ``h [B, 128]`` float32 and ``leaves [B, 300]`` int (LightGBM-like) are
cached for every split; then ``BatchLoader(BatchBuilder(ds, spec.visible('student')), train, 1024,
shuffle=True, prefetch=0)`` is iterated for whole epochs without and with ``CacheJoin`` as a hook.
Runs alternate (plain, join, plain, join, ...) after a warm-up epoch of each so neither side gets a
cold or warm advantage; the median of ``--repeats`` epochs is reported.

Second measurement (``--train-epochs``, 0 to skip): the same loader with the default
``prefetch=4`` feeding a real student training step (``configs/ml100k_plain.yaml`` model, BCE,
Adam), with and without the join: what a training run actually loses.

``--config`` names another student config; its spec is the data set (default: ML-100K).

Usage:
    python benchmarks/bench_cache.py --out runs/bench_cache [--repeats 7] [--batch-size 1024] [--config CFG]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _epoch(loader, cpu: list[float] | None = None) -> tuple[float, int]:  # noqa: ANN001
    """Wall seconds and rows of one epoch; appends the thread's CPU seconds to ``cpu`` (robust to other
    processes competing for the cores: prefetch=0 keeps all the work on this thread)."""
    t0, c0, n = time.perf_counter(), time.thread_time(), 0
    for b in loader:
        n += b.size
    if cpu is not None:
        cpu.append(time.thread_time() - c0)
    return time.perf_counter() - t0, n


def _student_step(cfg, ds):  # noqa: ANN001, ANN202
    """A real training step of ``cfg``'s student (None if the student code is unavailable)."""
    import torch

    try:
        from appdistill.distributed import DistContext, shard_model
        from appdistill.train.loop import build_model_for_run
    except ImportError:
        return None
    torch.manual_seed(0)
    model, opt = shard_model(build_model_for_run(cfg, ds), DistContext(), cfg.train.lr, cfg.train.embedding_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(b) -> None:  # noqa: ANN001
        loss = loss_fn(model(b.sparse, b.dense).logits, b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _train_epoch(loader, step) -> tuple[float, int]:  # noqa: ANN001
    t0, n = time.perf_counter(), 0
    for b in loader:
        step(b)
        n += b.size
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--repeats", type=int, default=7, help="timed epochs of each variant")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--train-epochs", type=int, default=3, help="timed training epochs of each variant (0 = skip)")
    ap.add_argument("--cache-dir", default=None, help="where to build the caches (default: a temp dir)")
    ap.add_argument("--config", default=str(REPO / "configs" / "ml100k_plain.yaml"),
                    help="the student config: its spec is the data set, its model the training step's")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from appdistill.cache import CacheJoin, TeacherCache, get_or_build_cache
    from appdistill.cache.testing import FakeTeacher
    from appdistill.config import load_config
    from appdistill.features import BatchBuilder, BatchLoader, Dataset

    cfg = load_config(args.config)
    spec = cfg.load_spec()
    ds = Dataset.build(spec)
    teachers = [FakeTeacher(spec, "fake_h64", float_taps={"h": 64}),
                FakeTeacher(spec, "fake_h128", float_taps={"h": 128}),
                FakeTeacher(spec, "fake_leaves", float_taps={}, int_taps={"leaves": 300}, leaves=31)]
    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="bench_cache_"))
    build_s, open_s, caches = {}, {}, {}
    for t in teachers:
        t0 = time.perf_counter()
        get_or_build_cache(t, ds, root, progress=False)
        build_s[t.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        caches[t.name] = TeacherCache.open(root, t.name, t.identity(), ds.fingerprint, verify="size")
        open_s[t.name] = time.perf_counter() - t0
    verify_checksum_s = {}
    for t in teachers:
        t0 = time.perf_counter()
        TeacherCache.open(root, t.name, t.identity(), ds.fingerprint, verify="checksum")
        verify_checksum_s[t.name] = time.perf_counter() - t0

    builder = BatchBuilder(ds, spec.visible("student"))
    rows = ds.splits["train"]
    mk = lambda hooks: BatchLoader(builder, rows, args.batch_size, shuffle=True, prefetch=0, hooks=hooks)  # noqa: E731
    variants = {"plain": mk(None), "join_split": mk([CacheJoin(caches, split="train")]),
                "join_nosplit": mk([CacheJoin(caches)]),
                "join_split_noupcast": mk([CacheJoin(caches, split="train", upcast=False)])}
    # sanity: the joined outputs equal the live teachers on one batch
    b = next(iter(variants["join_split"]))
    for t in teachers:
        live = t.predict(ds, b.row_ids.numpy())
        assert torch.equal(b.teacher[t.name].logits, live.logits)
        assert all(torch.equal(b.teacher[t.name].hidden[k], live.hidden[k]) for k in live.hidden)
    secs: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    n_rows = 0
    for _ in range(1):  # warm-up: page cache, allocator
        for ld in variants.values():
            _epoch(ld)
    for r in range(args.repeats):
        for k, ld in variants.items():
            ld.set_epoch(r)
            s, n_rows = _epoch(ld, cpus[k])
            secs[k].append(s)
    rps = {k: n_rows / statistics.median(v) for k, v in secs.items()}
    best = {k: n_rows / min(v) for k, v in secs.items()}  # least disturbed epoch (shared machines)
    per_batch_ms = {k: 1e3 * statistics.median(v) / len(variants[k]) for k, v in secs.items()}
    cpu_ms = {k: 1e3 * min(v) / len(variants[k]) for k, v in cpus.items()}
    train_res: dict = {}
    step = _student_step(cfg, ds) if args.train_epochs > 0 else None
    if step is not None:
        tl = {"plain": BatchLoader(builder, rows, args.batch_size, shuffle=True, prefetch=4),
              "join_split": BatchLoader(builder, rows, args.batch_size, shuffle=True, prefetch=4,
                                        hooks=[CacheJoin(caches, split="train")])}
        for ld in tl.values():  # warm-up
            _train_epoch(ld, step)
        tsecs: dict[str, list[float]] = {k: [] for k in tl}
        for r in range(args.train_epochs):
            for k, ld in tl.items():
                ld.set_epoch(r)
                s_, n_ = _train_epoch(ld, step)
                tsecs[k].append(s_)
        train_res = {"prefetch": 4, "samples_per_s": {k: round(n_ / statistics.median(v)) for k, v in tsecs.items()},
                     "samples_per_s_best": {k: round(n_ / min(v)) for k, v in tsecs.items()},
                     "epoch_seconds": {k: [round(x, 4) for x in v] for k, v in tsecs.items()}}
        train_res["slowdown"] = round(statistics.median(tsecs["join_split"]) / statistics.median(tsecs["plain"]) - 1, 4)
    res = {
        "dataset": spec.name, "config": args.config, "split": "train", "rows": n_rows, "batch_size": args.batch_size,
        "prefetch": 0,
        "teachers": {t.name: caches[t.name].hidden_shapes() for t in teachers},
        "rows_per_s": {k: round(v) for k, v in rps.items()},
        "rows_per_s_best": {k: round(v) for k, v in best.items()},
        "ms_per_batch": {k: round(v, 3) for k, v in per_batch_ms.items()},
        "join_overhead_ms_per_batch": round(per_batch_ms["join_split"] - per_batch_ms["plain"], 3),
        "cpu_ms_per_batch_min": {k: round(v, 3) for k, v in cpu_ms.items()},
        "join_cpu_overhead_ms_per_batch": round(cpu_ms["join_split"] - cpu_ms["plain"], 3),
        "slowdown_join_split": round(rps["plain"] / rps["join_split"] - 1, 4),
        "slowdown_join_nosplit": round(rps["plain"] / rps["join_nosplit"] - 1, 4),
        "slowdown_join_split_noupcast": round(rps["plain"] / rps["join_split_noupcast"] - 1, 4),
        "training": train_res,
        "epoch_seconds": {k: [round(x, 4) for x in v] for k, v in secs.items()},
        "cache_build_s": {k: round(v, 3) for k, v in build_s.items()},
        "cache_open_size_s": {k: round(v, 4) for k, v in open_s.items()},
        "cache_open_checksum_s": {k: round(v, 4) for k, v in verify_checksum_s.items()},
        "cache_mb": {k: round(c.nbytes / 2**20, 1) for k, c in caches.items()},
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "machine": platform.machine(),
    }
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = ["| loader (prefetch=0) | rows/s (median) | rows/s (best) | ms/batch (median) | CPU ms/batch (min) |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {k} | {rps[k]:,.0f} | {best[k]:,.0f} | {per_batch_ms[k]:.3f} | {cpu_ms[k]:.3f} |" for k in variants]
    md += ["", f"Join overhead {res['join_overhead_ms_per_batch']} ms/batch "
           f"({100 * res['slowdown_join_split']:.1f}% with split='train', "
           f"{100 * res['slowdown_join_nosplit']:.1f}% with split=None); "
           f"caches: {res['cache_mb']} MB, built in {res['cache_build_s']} s."]
    if train_res:
        md += ["", "| training epoch (student step, prefetch=4) | samples/s (median) | samples/s (best) |",
               "|---|---:|---:|"]
        md += [f"| {k} | {v:,} | {train_res['samples_per_s_best'][k]:,} |" for k, v in train_res["samples_per_s"].items()]
        md += ["", f"Training slowdown with the join: {100 * train_res['slowdown']:.1f}%."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if args.cache_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
