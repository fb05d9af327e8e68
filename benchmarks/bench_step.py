"""Training-step cost of each method with 3 cached teachers, as a ratio to the plain student's step.

Batches (with the teachers' cached outputs already joined) are prebuilt, so the timing is the step
itself: student forward, method loss terms, backward, optimiser steps. All methods are timed in the
same run, interleaved round by round (median round). Target: ``diverse_distill`` <= 1.5x plain; it is
timed as the config trains it and, as ``dd_committee``, with its committee path on. It also trains
DiverseDistill's committee path with and without gating (``--gating-seeds``, 3 by default) to report
the fraction of teacher answers skipped and the mean validation-AUC difference (target: >= 30%
skipped, |ΔAUC| <= 0.001).

``--transfer``: the batches are drawn from the training rows plus the config's transfer set (``transfer:``,
enabled here; unlabelled rows the teachers label, teacher terms only) as ``train()`` mixes them, and each
method is built as ``train()`` builds it (with the committee's held-out validation outputs: DiverseDistill's
default ``kd_weights: auto`` distils the held-out stack). A transfer row counts as a row: the plain
student's step is timed on batches of the same size from the labelled rows.

Usage:
    python benchmarks/bench_step.py --out DIR [--teachers-dir DIR_WITH_FITTED_TEACHERS] [--transfer]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from appdistill.cache import CacheJoin
from appdistill.config import REPO_ROOT, load_config
from appdistill.features.batch import BatchBuilder, BatchLoader
from appdistill.features.dataset import Dataset
from appdistill.distributed import DistContext, shard_model
from appdistill.pipeline import fit_committee, load_committee, train
from appdistill.train.loop import (build_method, build_model_for_run, method_optimizer, train_loader, train_step,
                                   with_transfer)

METHODS = {"none": {}, "kd": {"teacher": "dlrm"}, "avg_kd": {}, "taid": {"teacher": "dlrm"}, "talking": {},
           "diverse_distill": {}}


def with_path(kwargs: dict, fields: dict | None) -> dict:
    """DiverseDistill ``kwargs`` with the committee path on: its fields in ``kwargs`` (if a map) updated
    by ``fields`` (``None``: ``kwargs`` unchanged)."""
    if fields is None:
        return kwargs
    cp = kwargs.get("committee_path")
    return {**kwargs, "committee_path": {**(cp if isinstance(cp, dict) else {}), **fields}}


def make_step(cfg, ds, key: str, kwargs: dict, committee, caches=None):
    """A fresh student + method with their optimisers, as ``train()`` builds them (given ``caches``: with
    the held-out outputs ``train()`` hands the methods); returns ``step(batch)``."""
    torch.manual_seed(0)
    model = build_model_for_run(cfg, ds)
    c = cfg.model_copy(update={"method": cfg.method.model_copy(update={"key": key, "kwargs": kwargs})})
    method = build_method(c, committee, model.over_arch.in_dim, ds if caches else None, caches)
    model, opt = shard_model(model, DistContext(), cfg.train.lr, cfg.train.embedding_lr)
    mopt = method_optimizer(method, cfg.train.lr)
    counter = itertools.count()

    def step(b) -> None:
        loss, _ = train_step(model, method, opt, mopt, b)
        method.on_step_end(loss.detach(), next(counter), 10**6)  # TAID's t update is part of its step

    return step


def time_steps(steps: dict, batches: list, rounds: int, round_steps: int) -> dict[str, list[float]]:
    """Seconds per step of each variant: ``rounds`` rounds, each running every variant for
    ``round_steps`` consecutive steps, in a new random order each round (a fixed order favoured the
    variant that ran first by ~5%). The median round is robust to the bursts of a shared machine, and
    a round spans whole periods of ``committee_every`` when it divides ``round_steps``."""
    for step in steps.values():  # warm-up, whole rounds so committee_every stays in phase
        for b in batches[:round_steps]:
            step(b)
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = random.Random(0)
    for r in range(rounds):
        for name in order.sample(list(steps), len(steps)):
            step = steps[name]
            t0 = time.perf_counter()
            for j in range(round_steps):
                step(batches[(r * round_steps + j) % len(batches)])
            times[name].append((time.perf_counter() - t0) / round_steps)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs/ml100k_committee.yaml"))
    ap.add_argument("--teachers-dir", default=None, help="fitted teachers (default: fit them into OUT)")
    ap.add_argument("--rounds", type=int, default=25, help="rounds; the median round is reported")
    ap.add_argument("--round-steps", type=int, default=16,
                    help="consecutive steps of one variant per round (a multiple of committee_every)")
    ap.add_argument("--no-gating-check", action="store_true")
    ap.add_argument("--gating-seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="seeds of the gated / ungated training runs (validation AUC averaged)")
    ap.add_argument("--transfer", action="store_true",
                    help="batches mix the transfer set's rows in (methods built as train() builds them)")
    ap.add_argument("--dd-variant", action="append", default=[], metavar="JSON",
                    help='also time diverse_distill with these kwargs merged in (committee_path maps merged '
                         'too), e.g. \'{"committee_path": {"every": 1}}\'')
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tdir = Path(a.teachers_dir or out)
    # the additions pinned (the shipped configs train with a transfer set and a content table): the
    # student is the same for every method, and transfer rows only with --transfer
    cfg = load_config(a.config, [f"teachers_dir={tdir}", f"transfer.enabled={str(a.transfer).lower()}",
                                 "student.content.enabled=false"])
    ds = Dataset.build(cfg.load_spec())
    fit_committee(cfg, tdir, ds=ds)
    if a.transfer:
        ds = with_transfer(cfg, cfg.load_spec(), ds)
    # every tap (the config's method may read logits only, or one kind of tap): each method reads its own
    parts = load_committee(cfg, ds, tdir, DistContext(), hidden=True)
    committee, hooks = parts.teachers, [CacheJoin(parts.caches)]
    builder = BatchBuilder(ds, cfg.load_spec().visible("student"))
    n = 40 * cfg.train.batch_size
    plain_batches = list(BatchLoader(builder, ds.splits["train"][:n], cfg.train.batch_size, hooks=hooks, prefetch=0))
    # with a transfer set: train()'s own first batches (labelled and transfer rows shuffled together)
    batches = list(itertools.islice(train_loader(cfg, ds, builder, DistContext(), hooks, prefetch=0), 40)) \
        if a.transfer else plain_batches
    variants = {k: (k, kw) for k, kw in METHODS.items()}
    dd = dict(cfg.method.kwargs) if cfg.method.key == "diverse_distill" else {}
    variants["diverse_distill"] = ("diverse_distill", dd)  # as the config trains it
    variants["dd_committee"] = ("diverse_distill", with_path(dd, {}))  # its committee path on
    for v in a.dd_variant:
        extra = json.loads(v)
        variants[f"diverse_distill {v}"] = ("diverse_distill", with_path({**dd, **{k: x for k, x in extra.items()
                                                                                  if k != "committee_path"}},
                                                                      extra.get("committee_path")))
    steps = {name: make_step(cfg, ds, k, kw, committee, parts.caches if a.transfer else None)
             for name, (k, kw) in variants.items()}
    if a.transfer:  # the plain student never reads transfer rows: its step on labelled batches of that size
        plain = steps["none"]
        steps["none"] = lambda b, _it=itertools.count(): plain(plain_batches[next(_it) % len(plain_batches)])
    times = time_steps(steps, batches, a.rounds, a.round_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    # each round's ratio to the plain student's round of the same round, then the median: slow
    # drifts of the machine's speed cancel within a round
    ratio = {k: statistics.median(t / p for t, p in zip(v, times["none"])) for k, v in times.items()}
    res = {"benchmark": "step_cost", "teachers": list(committee), "batch_size": cfg.train.batch_size,
           "transfer": bool(a.transfer),
           "transfer_share": round(float(np.mean([np.isnan(b.labels.numpy()).mean() for b in batches])), 3),
           "rounds": a.rounds, "round_steps": a.round_steps,
           "step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
           "ratio_to_plain": {k: round(v, 3) for k, v in ratio.items()},
           "target_diverse_distill_ratio": 1.5}
    res["pass_step"] = res["ratio_to_plain"]["diverse_distill"] <= 1.5
    if not a.no_gating_check:
        # one training run has ~0.001 of seed noise in validation AUC, the size of the target itself:
        # compare the mean over seeds (each seed trains both variants)
        diffs, gated_auc, ungated_auc, skipped = [], [], [], []
        for seed in a.gating_seeds:
            c = cfg.model_copy(update={"seed": seed})

            def path(gating: bool):
                kw = with_path(dict(c.method.kwargs), {"gating": gating})
                return c.model_copy(update={"method": c.method.model_copy(update={"kwargs": kw})})

            gated = train(path(True), out / f"dd_gated_seed{seed}", dataset=ds, progress=False)
            ungated = train(path(False), out / f"dd_ungated_seed{seed}", dataset=ds, progress=False)
            gated_auc.append(gated["valid"]["auc"])
            ungated_auc.append(ungated["valid"]["auc"])
            diffs.append(gated_auc[-1] - ungated_auc[-1])
            skipped.append(gated["train"]["teacher_passes_skipped"])
        res["gating"] = {"seeds": a.gating_seeds, "skipped": statistics.mean(skipped),
                         "valid_auc_gated": statistics.mean(gated_auc), "valid_auc_ungated": statistics.mean(ungated_auc),
                         "valid_auc_diff": statistics.mean(diffs), "valid_auc_diff_per_seed": diffs}
        res["pass_gating"] = res["gating"]["skipped"] >= 0.3 and abs(res["gating"]["valid_auc_diff"]) <= 0.001
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = "| method | step ms | ratio to plain |\n|---|---|---|\n" + "".join(
        f"| {k} | {res['step_ms'][k]:.2f} | {res['ratio_to_plain'][k]:.2f} |\n" for k in variants)
    md += f"\ndiverse_distill as {Path(a.config).name} trains it: {json.dumps(dd)}\n"
    if a.transfer:
        md += (f"\nbatches of {cfg.train.batch_size} rows, {res['transfer_share']:.0%} of them transfer rows (the "
               "plain student: labelled rows only)\n")
    if "gating" in res:
        g = res["gating"]
        md += (f"\nDiverseDistill's committee path, gating: {g['skipped']:.1%} of teacher answers skipped; validation AUC "
               f"(mean of seeds {g['seeds']}) {g['valid_auc_gated']:.4f} gated vs {g['valid_auc_ungated']:.4f} "
               f"ungated (diff {g['valid_auc_diff']:+.4f}; per seed "
               + ", ".join(f"{d:+.4f}" for d in g["valid_auc_diff_per_seed"]) + ")\n")
    (out / "results.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
