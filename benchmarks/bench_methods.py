"""Every distillation method on the shipped regimes: a thin wrapper of ``appdistill bench``.

``appdistill bench CONFIG...`` is the command (any config, your own data); this script names the
shipped regime configs by a short name and passes everything else through. See ``appdistill bench
--help`` and the README's "Benchmarking on your data".

Usage:
    python benchmarks/bench_methods.py --dataset ml100k --split random cold_item --seeds 0 1 2 --out DIR
    python benchmarks/bench_methods.py --config configs/tabular_gbdt.yaml --seeds 0 1 2 --out DIR
"""

from __future__ import annotations

import argparse

from appdistill.bench.runner import BenchOptions, run_bench
from appdistill.bench.variants import DEFAULT, VARIANTS
from appdistill.config import REPO_ROOT

#: the shipped regimes (README, "Methods")
CONFIGS = {"ml100k": "configs/ml100k_committee.yaml", "ml100k_small": "configs/ml100k_small_student.yaml",
           "synthetic": "configs/synthetic_committee.yaml", "tabular": "configs/tabular_gbdt.yaml"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", nargs="+", default=None, choices=sorted(CONFIGS), help="shipped regime(s)")
    ap.add_argument("--config", nargs="+", default=[], help="config file(s), e.g. your own")
    ap.add_argument("--split", nargs="+", default=None, help="split.by values (default: the spec's split)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT), choices=list(VARIANTS))
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--vary-data", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    configs = [str(REPO_ROOT / CONFIGS[d]) for d in (a.dataset or ([] if a.config else ["ml100k"]))] + a.config
    run_bench(BenchOptions(configs=configs, out=a.out, methods=a.methods, splits=a.split, seeds=a.seeds,
                           vary_data=a.vary_data, budget=a.budget, overrides=a.set))


if __name__ == "__main__":
    main()
