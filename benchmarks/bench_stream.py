"""Bigger than memory: the student trained from a folder of parquet files against the same student in memory.

Writes the synthetic interactions of ``bench_scale`` (users N/20, items N/50 of ``--rows`` N) once, as
part files of ``--file-rows`` rows (``generate(part=k)``: the same users and items, each part its own
draws), plus the items and users tables. Then, each in a fresh subprocess:

    memory   the first part file as the interactions ``path`` (one file: read whole into memory)
    stream   the folder of every part file (``--rows`` rows: read in chunks into memory-mapped columns,
             ``appdistill.features.streamed``)

and records per stage (encode = ``Dataset.build``; train; evaluate = per-epoch validation, test,
best-epoch reload; export) wall seconds, peak RSS and peak private memory (RssAnon), with the plain
student of ``configs/synthetic_committee.yaml`` (``method: none``, ``--epochs`` epochs, batch 1024). The
training throughput (samples/s) of both and their ratio go in ``OUT/results.md`` / ``results.json``.
A second run reuses the part files, and the streamed columns unless ``--cold`` (then their cache
folder under ``OUT/cache`` is removed first, so ``encode`` is measured from the parquet files).

Usage:
    python benchmarks/bench_stream.py --rows 100000000 --file-rows 10000000 --out DIR [--epochs 1]
        [--cold] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import Meter, train_and_evaluate  # noqa: E402


def write_data(out: Path, rows: int, file_rows: int) -> Path:
    """Items, users and ``rows / file_rows`` interaction part files under ``out/data`` (once)."""
    from appdistill.data.synthetic import generate

    data = out / "data"
    done = data / f".done-{rows}-{file_rows}"
    if done.is_file():
        return data
    parts = data / "interactions"
    shutil.rmtree(data, ignore_errors=True)
    parts.mkdir(parents=True)
    pop = {"n_users": max(100, rows // 20), "n_items": max(50, rows // 50), "seed": 0}
    n_parts = -(-rows // file_rows)
    t0 = time.perf_counter()
    for k in range(n_parts):
        n = min(file_rows, rows - k * file_rows)
        t = generate(n_interactions=n, part=k, **pop)
        if k == 0:
            t["items"][["item_id", "genres", "year"]].to_parquet(data / "items.parquet", index=False)
            t["users"].to_parquet(data / "users.parquet", index=False)
        t["interactions"].to_parquet(parts / f"part-{k:05d}.parquet", index=False)
        print(f"  wrote part {k + 1}/{n_parts} ({n:,} rows, {time.perf_counter() - t0:.0f} s)", flush=True)
    done.write_text("")
    return data


def spec_dict(data: Path, interactions: str) -> dict[str, Any]:
    return {
        "name": f"stream-{Path(interactions).stem}",
        "tables": {"interactions": {"path": interactions, "key": ["user_id", "item_id"], "label": {"column": "click"},
                                    "time_column": "timestamp"},
                   "items": {"path": "items.parquet", "key": "item_id"},
                   "users": {"path": "users.parquet", "key": "user_id"}},
        "features": [
            {"name": "user_id", "kind": "sparse_id", "table": "interactions", "dim": 16},
            {"name": "item_id", "kind": "sparse_id", "table": "interactions", "dim": 16},
            {"name": "genres", "kind": "id_list", "table": "items", "separator": "|", "dim": 16},
            {"name": "year", "kind": "dense", "table": "items"},
            {"name": "age", "kind": "dense", "table": "users"},
            {"name": "country", "kind": "sparse_id", "table": "users", "dim": 16}],
        "visibility": {"student": ["user_id", "item_id", "genres", "year", "age", "country"]},
        "split": {"by": "random", "valid": 0.1, "test": 0.1, "seed": 0},
    }


def run_one(mode: str, out: Path, epochs: int, overrides: list[str]) -> dict[str, Any]:
    from appdistill.config import REPO_ROOT, load_config
    from appdistill.export.artifact import export_run
    from appdistill.features.dataset import Dataset
    from appdistill.pipeline import train

    data = out / "data"
    first = sorted((data / "interactions").iterdir())[0]
    spec_path = data / f"spec-{mode}.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(data, "interactions" if mode == "stream" else
                                                  f"interactions/{first.name}")))
    cfg = load_config(REPO_ROOT / "configs/synthetic_committee.yaml",
                      [f"spec={spec_path.resolve()}", "method.key=none", "method.kwargs={}", "teachers={}",
                       "transfer.enabled=false", "student.content.enabled=false",  # the plain student alone
                       f"train.epochs={epochs}", *overrides])
    run = out / f"run-{mode}"
    shutil.rmtree(run, ignore_errors=True)
    meter = Meter([run, out / "cache"], out / f"{mode}.partial.json")
    with meter.stage("encode"):
        ds = Dataset.build(cfg.load_spec())
    metrics = train_and_evaluate(meter, lambda: train(cfg, run, dataset=ds, progress=False))
    with meter.stage("export"):
        export_run(run, run / "export")
    return {"mode": mode, "rows": int(ds.n), "train_rows": int(len(ds.splits["train"])), "stages": meter.stages,
            "test_auc": metrics["test"]["auc"], "samples_per_s": metrics["train"]["samples_per_s"],
            "streamed": bool(ds.streamed), "epochs": epochs, "overrides": overrides}


def report(res: dict[str, dict[str, Any]], out: Path) -> str:
    modes = [m for m in ("memory", "stream") if m in res]
    lines = ["| stage | " + " | ".join(f"{m} ({res[m]['rows']:,} rows): s / peak RSS GB (private)" for m in modes) + " |",
             "|---|" + "---:|" * len(modes)]
    for s in ("encode", "train", "evaluate", "export"):
        lines.append(f"| {s} | " + " | ".join(
            f"{res[m]['stages'][s]['seconds']:.1f} / {res[m]['stages'][s]['peak_rss_gb']:.2f} "
            f"({res[m]['stages'][s]['peak_private_gb']:.2f})" for m in modes) + " |")
    peak = {m: max(v["peak_rss_gb"] for v in res[m]["stages"].values()) for m in modes}
    priv = {m: max(v["peak_private_gb"] for v in res[m]["stages"].values()) for m in modes}
    lines.append("| **peak** | " + " | ".join(f"**{peak[m]:.2f} ({priv[m]:.2f})**" for m in modes) + " |")
    md = "\n".join(lines) + "\n\n" + "; ".join(
        f"{m}: {res[m]['samples_per_s']:,.0f} samples/s, test AUC {res[m]['test_auc']:.4f}" for m in modes)
    if len(modes) == 2:
        md += (f"\n\nthroughput stream / memory: {res['stream']['samples_per_s'] / res['memory']['samples_per_s']:.2f}x; "
               f"peak RSS stream / memory: {peak['stream'] / peak['memory']:.2f}x "
               f"(private {priv['stream'] / max(priv['memory'], 1e-9):.2f}x)")
    md += "\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000_000, help="interactions in the streamed folder")
    p.add_argument("--file-rows", type=int, default=10_000_000, help="rows per part file (and of the in-memory run)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream"])
    p.add_argument("--cold", action="store_true", help="encode the streamed columns again (drop OUT/cache first)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode here
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.one is not None:
        res = run_one(a.one, out, a.epochs, a.set)
        (out / f"{a.one}.json").write_text(json.dumps(res, indent=1))
        return
    print(f"[bench_stream] data: {a.rows:,} rows in files of {a.file_rows:,}", flush=True)
    write_data(out, a.rows, a.file_rows)
    if a.cold:
        shutil.rmtree(out / "cache", ignore_errors=True)
    env = {**os.environ, "APPDISTILL_CACHE": str(out / "cache")}
    res = {}
    for mode in a.modes:
        print(f"[bench_stream] {mode}", flush=True)
        subprocess.run([sys.executable, __file__, "--one", mode, "--out", str(out), "--epochs", str(a.epochs),
                        *(x for s in a.set for x in ("--set", s))], check=True, env=env)
        res[mode] = json.loads((out / f"{mode}.json").read_text())
    for mode in ("memory", "stream"):  # a mode measured by an earlier invocation (--modes) is reported too
        if mode not in res and (out / f"{mode}.json").is_file():
            res[mode] = json.loads((out / f"{mode}.json").read_text())
    print(report(res, out), flush=True)


if __name__ == "__main__":
    main()
