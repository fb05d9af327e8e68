"""The whole pipeline at growing sizes: wall time, peak memory and disk per stage.

Runs the committee of ``configs/synthetic_committee.yaml`` (DiverseDistill without the config's transfer
set and content table) on the synthetic multimodal data at each
``--rows N`` (users N/20, items N/50, as the shipped 1M spec) and records, per stage:

    data        generate the tables (the spec's built-in source)
    encode      vocabularies, split, encoding of every feature (``Dataset.build``)
    store       MiniLM over every item text (the per-item embedding store)
    fit:<name>  each teacher's fit (LightGBM, DLRM, foundation) and its own evaluation
    cache       every teacher's outputs for every row (train, valid, test)
    train       DiverseDistill, ``--epochs`` epochs (the method's step, batches, cache join)
    evaluate    per-epoch validation, the test split and the best-epoch reload (train() minus train)
    export      the serving artefact (student only)

wall seconds, peak RSS of the process during the stage (sampled every 50 ms from /proc) and bytes
written under the run directory and the embedding store. Each size runs in a fresh subprocess, so one
size's memory never counts towards the next. Results go to ``OUT/results.json``, ``OUT/results.md``
and ``OUT/scale.png`` (time and memory against rows, one line per stage); the growth column of the
table is time(N_last) / time(N_first) per stage, against N_last / N_first.

The budget is stated in the report: teachers and student train ``--epochs`` epochs (default 1) and
LightGBM ``--trees`` rounds at most, and the three teachers fit on a uniform sample of at most
``--fit-rows`` training rows (default 2M; ``max_train_rows``) while their outputs are cached for every
row, so that 10M rows fit a session on a 2-core machine; the shape of the cost (what grows how) is
what this measures, not the best AUC. Memory is reported twice: peak RSS (every resident page,
including mapped cache files) and, in parentheses, peak private memory (RssAnon: what the process
itself holds; mapped file pages are page cache the kernel can drop at any time).

Usage:
    python benchmarks/bench_scale.py --rows 1000000 10000000 --out DIR [--epochs 1] [--trees 200]
        [--fit-rows 2000000] [--store DIR] [--set KEY=VALUE ...] [--reuse] [--until STAGE] [--repeat R]

``--until data|encode`` stops each size after that stage (seconds, no teachers); ``--repeat R`` runs the
sizes R times, interleaved (1M, 10M, 1M, 10M, ...), and reports each stage's median seconds with the
range in brackets: the way to compare the cheap first stages across sizes on a VM whose timings move
by 10-25% from run to run (``--rows 1000000 10000000 --until data --repeat 3``: ~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

STAGES = ["data", "encode", "store", "fit:lightgbm", "fit:dlrm", "fit:foundation", "cache", "train", "evaluate",
          "export"]


# ------------------------------------------------------------------------------------------- measuring
def _rss() -> tuple[int, int]:
    """``(VmRSS, RssAnon)`` bytes: all resident pages, and the private (anonymous) ones among them."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got.get("VmRSS", 0), got.get("RssAnon", 0)


def _du(paths: list[Path]) -> int:
    total = 0
    for root in paths:
        if root.is_dir():
            for dirpath, _, files in os.walk(root):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
    return total


class Meter:
    """Per-stage wall seconds, peak RSS and peak private memory (a 50 ms sampler thread of
    ``/proc/self/status``: VmRSS counts mapped file pages too, RssAnon only the process's own memory)
    and bytes added under ``paths``."""

    def __init__(self, paths: list[Path], partial: Path | None = None) -> None:
        self.paths, self.stages, self._peak, self._stop = paths, {}, (0, 0), threading.Event()
        self.partial = partial  # stages so far, rewritten after each one (a killed run keeps them)
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = tuple(map(max, self._peak, _rss()))

    @contextmanager
    def stage(self, name: str):
        disk0, self._peak = _du(self.paths), _rss()
        t0 = time.perf_counter()
        yield
        secs = time.perf_counter() - t0
        self._peak = tuple(map(max, self._peak, _rss()))
        self.stages[name] = {"seconds": round(secs, 2), "peak_rss_gb": round(self._peak[0] / 2**30, 3),
                             "peak_private_gb": round(self._peak[1] / 2**30, 3),
                             "disk_gb": round((_du(self.paths) - disk0) / 2**30, 3)}
        print(f"  {name:<16} {secs:8.1f} s  peak RSS {self._peak[0] / 2**30:6.2f} GB (private "
              f"{self._peak[1] / 2**30:.2f})  disk +{self.stages[name]['disk_gb']:.3f} GB", flush=True)
        if self.partial is not None:
            self.partial.write_text(json.dumps(self.stages, indent=1))


def train_and_evaluate(meter: Meter, run: Any) -> dict[str, Any]:
    """``run()`` (a ``train()`` call) as stages ``train`` and ``evaluate``: train() validates every epoch
    and evaluates test at the end, so its wall time is split by the metrics' own training seconds."""
    t0 = time.perf_counter()
    with meter.stage("train"):
        metrics = run()
    total = time.perf_counter() - t0
    fit_s = metrics["train"]["seconds"]
    meter.stages["evaluate"] = {**meter.stages["train"], "seconds": round(total - fit_s, 2), "disk_gb": 0.0}
    meter.stages["train"]["seconds"] = round(fit_s, 2)
    return metrics


# ------------------------------------------------------------------------------------------- one size
def run_one(rows: int, out: Path, epochs: int, trees: int, overrides: list[str],
            fit_rows: int | None = None, reuse: bool = False, until: str | None = None) -> dict[str, Any]:
    """The whole pipeline at ``rows`` interactions, in this process; returns the stage table.

    ``reuse``: take the teachers and caches an earlier run left in ``OUT/rows-N`` (``teachers_dir``)
    and measure only data, encode, train, evaluate and export, into ``OUT/rows-N-reuse``: re-measures
    the student's stages after a change without the hour of store, fits and caches at 10M. ``until``
    (``"data"`` or ``"encode"``): stop after that stage; the result has no test AUC.
    """
    from appdistill.config import REPO_ROOT, load_config
    from appdistill.export.artifact import export_run
    from appdistill.features.dataset import Dataset
    from appdistill.features.tables import load_tables
    from appdistill.pipeline import build_caches, fit_teachers, text_embeddings_for, train

    run = out / f"rows-{rows}"
    store = Path(os.environ["APPDISTILL_CACHE"])
    src = {"n_users": max(100, rows // 20), "n_items": max(50, rows // 50), "n_interactions": rows}
    # DiverseDistill without the config's transfer set and content table: the pipeline the scale
    # table has measured since its first release (the additions are measured in "Methods")
    sets = ["transfer.enabled=false", "student.content.enabled=false", f"train.epochs={epochs}", "teachers.dlrm.kwargs.epochs=" + str(epochs),
            "teachers.foundation.kwargs.epochs=" + str(epochs), f"teachers.lightgbm.kwargs.num_boost_round={trees}",
            *(f"teachers.{t}.kwargs.max_train_rows={fit_rows}" for t in ("lightgbm", "dlrm", "foundation")
              if fit_rows), *overrides]
    spec_path = (out / f"spec-{rows}.yaml").resolve()
    if reuse:
        if not (run / "teachers").is_dir():
            raise SystemExit(f"--reuse: no teachers under '{run}'; run this size without --reuse first")
        sets.append(f"teachers_dir={run.resolve()}")
        shutil.rmtree(out / f"rows-{rows}-reuse", ignore_errors=True)
        run = out / f"rows-{rows}-reuse"  # a fresh student run; the teachers and caches stay where they are
    else:
        raw = yaml.safe_load((REPO_ROOT / "feature_specs/synthetic_1m.yaml").read_text())
        raw["name"], raw["source"]["kwargs"] = f"synthetic-{rows}", {**raw["source"]["kwargs"], **src}
        spec_path.write_text(yaml.safe_dump(raw))  # the shipped 1M spec, resized
    cfg = load_config(REPO_ROOT / "configs/synthetic_committee.yaml", [*sets, f"spec={spec_path}"])
    spec = cfg.load_spec()
    meter = Meter([run, store], out / f"{run.name}.partial.json")
    budget = {"epochs": epochs, "lightgbm_rounds": trees, "teacher_fit_rows": fit_rows, "overrides": overrides}
    with meter.stage("data"):
        tables = load_tables(spec)
    if until == "data":
        return {"rows": rows, "stages": meter.stages, "budget": budget}
    with meter.stage("encode"):
        ds = Dataset.build(spec, tables)
    if until == "encode":
        return {"rows": rows, "train_rows": int(len(ds.splits["train"])), "stages": meter.stages, "budget": budget}
    del tables
    if not reuse:
        with meter.stage("store"):
            emb = text_embeddings_for(cfg, ds)
        for name in cfg.teachers:
            with meter.stage(f"fit:{name}"):
                fit_teachers(cfg, run, [name], ds, text_embeddings=emb, progress=False)
        with meter.stage("cache"):
            build_caches(cfg, run, ds, progress=False, echo=lambda *_: None)
    metrics = train_and_evaluate(meter, lambda: train(cfg, run, dataset=ds, progress=False))
    with meter.stage("export"):
        export_run(run, run / "export")
    return {"rows": rows, "train_rows": int(len(ds.splits["train"])), "stages": meter.stages,
            "test_auc": metrics["test"]["auc"], "samples_per_s": metrics["train"]["samples_per_s"],
            "teachers": {n: m["test"]["auc"] for n, m in metrics["teachers"].items()}, "budget": budget}


# ------------------------------------------------------------------------------------------- report
def _private(stage: dict[str, Any]) -> str:
    v = stage.get("peak_private_gb", -1)
    return f" ({v:.2f})" if v >= 0 else ""


def _seconds(stage: dict[str, Any]) -> str:
    """``12.3`` or, over repeats, the median with the range: ``12.3 [11.8-14.0]``."""
    runs = stage.get("seconds_runs", [])
    spread = f" [{min(runs):.1f}-{max(runs):.1f}]" if len(runs) > 1 else ""
    return f"{stage['seconds']:.1f}{spread}"


def merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's repeated runs as one result: per stage the median seconds (``seconds_runs``: every
    run's), the largest peak memory and disk."""
    import statistics

    merged = {**runs[-1], "repeats": len(runs), "stages": {}}
    for s in runs[0]["stages"]:
        every = [r["stages"][s] for r in runs if s in r["stages"]]
        merged["stages"][s] = {
            **{k: max(v[k] for v in every) for k in every[0] if k != "seconds"},
            "seconds": round(statistics.median(v["seconds"] for v in every), 2),
            "seconds_runs": [v["seconds"] for v in every]}
    return merged


def report(results: list[dict[str, Any]], out: Path) -> str:
    results = sorted(results, key=lambda r: r["rows"])
    first, last = results[0], results[-1]
    stages = [s for s in STAGES if all(s in r["stages"] for r in results)]
    head = "| stage | " + " | ".join(f"{r['rows']:,} rows: s / peak RSS GB (private) / disk GB" for r in results)
    lines = [head + (" | growth |" if len(results) > 1 else " |"),
             "|---|" + "---:|" * len(results) + ("---:|" if len(results) > 1 else "")]
    for s in stages:
        cells = [f"{_seconds(r['stages'][s])} / {r['stages'][s]['peak_rss_gb']:.2f}{_private(r['stages'][s])} / "
                 f"{r['stages'][s]['disk_gb']:.2f}" for r in results]
        growth = ""
        if len(results) > 1:
            a, b = first["stages"][s]["seconds"], last["stages"][s]["seconds"]
            growth = f" {b / a:.1f}x |" if a > 0 else " - |"
        lines.append(f"| {s} | " + " | ".join(cells) + " |" + growth)
    tot = [sum(r["stages"][s]["seconds"] for s in stages) for r in results]
    peak = [max(r["stages"][s]["peak_rss_gb"] for s in stages) for r in results]
    priv = [_private({"peak_private_gb": max(r["stages"][s].get("peak_private_gb", -1) for s in stages)})
            for r in results]
    lines.append("| **total** | " + " | ".join(f"**{t / 60:.1f} min / {p:.2f} GB{q}**" for t, p, q in zip(tot, peak, priv))
                 + " |" + (f" {tot[-1] / tot[0]:.1f}x |" if len(results) > 1 else ""))
    md = "\n".join(lines)
    notes = [f"rows x{last['rows'] / first['rows']:.0f}" if len(results) > 1 else "",
             "; ".join(f"{r['rows']:,} rows: student test AUC {r['test_auc']:.4f}, "
                       f"{r['samples_per_s']:,.0f} samples/s" for r in results if "test_auc" in r),
             f"seconds: median of {first['repeats']} interleaved runs [range]" if first.get("repeats", 1) > 1 else "",
             
             f"budget: {first['budget']}"]
    md += "\n\n" + "\n".join(n for n in notes if n) + "\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [r["rows"] for r in results]
        for s in stages:
            ax1.plot(xs, [r["stages"][s]["seconds"] for r in results], marker="o", label=s)
            ax2.plot(xs, [r["stages"][s]["peak_rss_gb"] for r in results], marker="o", label=s)
        for ax, lab in ((ax1, "wall seconds"), (ax2, "peak RSS (GB)")):
            ax.set_xscale("log")
            ax.set_yscale("log" if ax is ax1 else "linear")
            ax.set_xlabel("interactions")
            ax.set_ylabel(lab)
        ax1.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=110)
    except ImportError:
        pass
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--trees", type=int, default=200, help="LightGBM rounds at most (early stopping as configured)")
    p.add_argument("--fit-rows", type=int, default=2_000_000,
                   help="teachers fit on a uniform sample of at most this many training rows (0: all)")
    p.add_argument("--store", default=None, help="embedding store / cache root (default: OUT/store, a cold start)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reuse", action="store_true",
                   help="reuse OUT/rows-N's teachers and caches: measure data, encode, train, evaluate and export "
                        "only (report in OUT/reuse)")
    p.add_argument("--until", choices=["data", "encode"], default=None,
                   help="stop each size after this stage (the cheap first stages, no teachers)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the sizes this many times, interleaved; report median seconds and range")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one size here
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.one is not None:
        res = run_one(a.one, out, a.epochs, a.trees, a.set, a.fit_rows or None, a.reuse, a.until)
        (out / f"rows-{a.one}{'-reuse' if a.reuse else ''}.json").write_text(json.dumps(res, indent=1))
        return
    env = {**os.environ, "APPDISTILL_CACHE": str(Path(a.store or out / "store").resolve())}
    if a.repeat < 1 or (a.repeat > 1 and not (a.until or a.reuse)):
        raise SystemExit("--repeat: at least 1, and above 1 only with --until or --reuse (a full run fits the "
                         "teachers once per size)")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in a.rows}
    for r in range(a.repeat):
        for n in a.rows:
            print(f"[bench_scale] {n:,} rows" + (f" (run {r + 1} of {a.repeat})" if a.repeat > 1 else ""), flush=True)
            cmd = [sys.executable, __file__, "--one", str(n), "--out", str(out), "--epochs", str(a.epochs),
                   "--trees", str(a.trees), "--fit-rows", str(a.fit_rows), *(x for s in a.set for x in ("--set", s)),
                   *(["--reuse"] if a.reuse else []), *(["--until", a.until] if a.until else [])]
            subprocess.run(cmd, check=True, env=env)
            runs[n].append(json.loads((out / f"rows-{n}{'-reuse' if a.reuse else ''}.json").read_text()))
            results = [merge_repeats(v) if a.repeat > 1 else v[0] for v in runs.values() if v]
            rep = out / "reuse" if a.reuse else out
            rep.mkdir(exist_ok=True)
            print(report(results, rep), flush=True)

if __name__ == "__main__":
    main()
