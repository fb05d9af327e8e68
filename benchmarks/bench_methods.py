"""Every distillation method (plus DiverseDistill's ablations) on the same data, teachers, student and budget.

For each split and seed: the committee is fitted once (reused across methods), its caches built
once, then the student is trained with each method. Writes ``DIR/results.csv`` (one row per
method/split/seed), ``DIR/results.md`` (mean ± std per method and split), ``DIR/results.json`` and
plots (AUC per method, gap recovered).

Resumable: rows already in ``DIR/partial.csv`` (method, split, seed) are kept and not rerun, so an
interrupted run continues where it stopped (delete rows to rerun them); fitted teachers and caches
under ``DIR/<split>-seed<seed>/`` are reused.

Gap recovered = ``(AUC_method - AUC_none) / (AUC_ref - AUC_none)`` on test, where the reference is
the single teacher with the best *validation* AUC (no selection on test).

Usage:
    python benchmarks/bench_methods.py --dataset ml100k --split random cold_item --seeds 0 1 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from appdistill.config import REPO_ROOT, load_config
from appdistill.features.dataset import Dataset
from appdistill.pipeline import fit_committee
from appdistill.train.loop import train

CONFIGS = {"ml100k": "configs/ml100k_committee.yaml", "synthetic": "configs/synthetic_committee.yaml"}

#: method name -> (registry key, kwargs); "{best}" is replaced by the best single teacher on validation
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "kd": ("kd", {"teacher": "{best}", "alpha": 0.5}),
    "avg_kd": ("avg_kd", {"alpha": 0.5}),
    "taid": ("taid", {"teacher": "{best}"}),
    "talking": ("talking", {}),
    "diverse_distill": ("diverse_distill", {}),
    "dd_foundation_only": ("diverse_distill", {"complementary": False}),
    "dd_no_gating": ("diverse_distill", {"gating": False}),
    "dd_no_questions": ("diverse_distill", {"questions": False}),
    "dd_no_committee_path": ("diverse_distill", {"committee_path": False}),
    "dd_taid": ("diverse_distill", {"output_loss": "taid"}),
    # the committee config's earlier default: the committee path trains the student too (every step) and is distilled
    "dd_committee_trains_student": ("diverse_distill", {"committee_grad": 1.0, "lambda_kd": 0.5, "kd_weights": "gated",
                                                        "committee_every": 1}),
    # the committee path on every step and every row (the config runs it every 8th step)
    "dd_committee_every_step": ("diverse_distill", {"committee_every": 1, "committee_rows": None}),
}


def run(dataset: str, splits: list[str], seeds: list[int], methods: list[str], out: Path,
        overrides: list[str]) -> pd.DataFrame:
    # an interrupted run continues: rows already in OUT/partial.csv are kept and not rerun
    old = pd.read_csv(out / "partial.csv") if (out / "partial.csv").is_file() else pd.DataFrame()
    rows = old.to_dict("records")
    done = {(r["method"], r["split"], int(r["seed"])) for r in rows}
    for split in splits:
        for seed in seeds:
            base = load_config(REPO_ROOT / CONFIGS[dataset], [f"split.by={split}", f"seed={seed}", *overrides])
            ds = Dataset.build(base.load_spec())
            tdir = out / f"{split}-seed{seed}"
            tmetrics = fit_committee(base, tdir, ds=ds)
            best = max(tmetrics, key=lambda n: tmetrics[n]["valid"]["auc"])
            foundation_params = foundation_size(tdir)
            for name in methods:
                if (name, split, seed) in done:
                    continue
                key, kwargs = METHODS[name]
                kw = {k: (best if v == "{best}" else v) for k, v in kwargs.items()}
                if key == base.method.key:  # the config's tuned kwargs, then the variant's switches
                    kw = {**base.method.kwargs, **kw}
                cfg = base.model_copy(update={"method": base.method.model_copy(update={"key": key, "kwargs": kw}),
                                              "teachers_dir": str(tdir)})
                t0 = time.perf_counter()
                m = train(cfg, tdir / name, dataset=ds, progress=False)
                rows.append({
                    "method": name, "split": split, "seed": seed, "auc": m["test"]["auc"],
                    "logloss": m["test"]["logloss"], "gauc": m["test"]["gauc"], "ndcg@10": m["test"]["ndcg@10"],
                    "valid_auc": m["valid"]["auc"], "cold_auc": m["test"]["cold"]["auc"],
                    "student_params": m["student"]["params"], "train_seconds": m["train"]["seconds"],
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                    "skipped": m["train"]["teacher_passes_skipped"], "ref_teacher": best,
                    "ref_teacher_auc": tmetrics[best]["test"]["auc"], "foundation_params": foundation_params,
                    **{f"teacher_{n}_auc": t["test"]["auc"] for n, t in tmetrics.items()},
                })
                print(f"[{split} seed {seed}] {name:<22} test AUC {m['test']['auc']:.4f} "
                      f"(skipped {m['train']['teacher_passes_skipped']:.2f})", flush=True)
                pd.DataFrame(rows).to_csv(out / "partial.csv", index=False)  # survives an interrupted run
    return add_gap(pd.DataFrame(rows))


def foundation_size(tdir: Path) -> int:
    """Parameters of the fitted foundation teacher, encoder included (0 when there is none)."""
    p = tdir / "teachers" / "foundation" / "teacher.json"
    return int(json.loads(p.read_text()).get("params", 0)) if p.is_file() else 0


def add_gap(df: pd.DataFrame) -> pd.DataFrame:
    """``gap_recovered`` per row against the plain student and the reference teacher of its split/seed.

    When the plain student already matches or beats the reference teacher there is no gap to
    recover and the figure is undefined (NaN), not a meaningless ratio of noise.
    """
    none = df[df.method == "none"].set_index(["split", "seed"])["auc"]
    ref = df.groupby(["split", "seed"])["ref_teacher_auc"].first()
    key = list(zip(df.split, df.seed))
    df["gap_recovered"] = [(a - none[k]) / (ref[k] - none[k]) if ref[k] > none[k] + 1e-4 else np.nan
                           for a, k in zip(df.auc, key)]
    return df


def summarise(df: pd.DataFrame) -> str:
    cols = ["auc", "logloss", "gauc", "ndcg@10", "gap_recovered", "skipped", "train_seconds"]
    g = df.groupby(["split", "method"], sort=False)
    lines = []
    for split in df.split.unique():
        sub = df[df.split == split]
        tcols = [c for c in df.columns if c.startswith("teacher_") and c.endswith("_auc")]
        lines.append(f"\n### split: {split} (seeds {sorted(int(x) for x in sub.seed.unique())}; teachers' test AUC: "
                     + ", ".join(f"{c[8:-4]} {sub[c].mean():.4f}" for c in tcols) + ")\n")
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for (s, meth), grp in g:
            if s != split:
                continue
            cells = [f"{grp[c].mean():.4f} ± {grp[c].std(ddof=0):.4f}" if grp[c].notna().any() else "n/a"
                     for c in cols]
            lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    p = df.student_params.iloc[0]
    fp = df.foundation_params.iloc[0]
    lines.append(f"\nstudent parameters: {p:,}" + (f"; foundation teacher (encoder included): {fp:,} "
                                                    f"({fp / p:.0f}x)" if fp else ""))
    return "\n".join(lines)


def plots(df: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, fname in (("auc", "auc_per_method.png"), ("gap_recovered", "gap_recovered.png")):
        fig, ax = plt.subplots(figsize=(10, 4))
        splits = list(df.split.unique())
        methods = list(dict.fromkeys(df.method))
        w = 0.8 / len(splits)
        for i, s in enumerate(splits):
            g = df[df.split == s].groupby("method")[metric]
            mean, std = g.mean().reindex(methods), g.std(ddof=0).reindex(methods)
            ax.bar(np.arange(len(methods)) + i * w, mean, w, yerr=std, label=s)
        ax.set_xticks(np.arange(len(methods)) + w * (len(splits) - 1) / 2, methods, rotation=30, ha="right")
        ax.set_ylabel(metric)
        if metric == "auc":
            lo = df.auc.min()
            ax.set_ylim(lo - 0.02, df.auc.max() + 0.01)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml100k", choices=sorted(CONFIGS))
    ap.add_argument("--split", nargs="+", default=["random", "cold_item"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", required=True)
    ap.add_argument("--from-partial", action="store_true",
                    help="summarise OUT/partial.csv of an interrupted run instead of running")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.from_partial:
        df = add_gap(pd.read_csv(out / "partial.csv"))
    else:
        df = run(a.dataset, a.split, a.seeds, a.methods, out, a.set)
    df["foundation_params"] = [foundation_size(out / f"{sp}-seed{sd}") for sp, sd in zip(df.split, df.seed)]
    a.split, a.seeds = list(df.split.unique()), sorted(int(s) for s in df.seed.unique())
    df.to_csv(out / "results.csv", index=False)
    md = summarise(df)
    (out / "results.md").write_text(f"# bench_methods: {a.dataset}\n\n`python benchmarks/bench_methods.py "
                                    f"--dataset {a.dataset} --split {' '.join(a.split)} --seeds "
                                    f"{' '.join(map(str, a.seeds))}`\n{md}\n")
    summary = df.groupby(["split", "method"]).agg(auc=("auc", "mean"), gap=("gap_recovered", "mean")).reset_index()
    (out / "results.json").write_text(json.dumps({"rows": df.to_dict("records"),
                                                  "summary": summary.to_dict("records")}, indent=1, default=float))
    plots(df, out)
    print(md)


if __name__ == "__main__":
    main()
