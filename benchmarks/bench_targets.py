"""How good a target can the committee make? The functions a student could distil, scored on test.

A distilled student can beat single-teacher KD only by learning a better function than the best
teacher, and averaged KD only by learning a better one than the committee average. This script
scores the candidate targets on the fitted committee's cached outputs, before any student trains:

- each teacher, the best on validation, the committee average (of logits, of probabilities);
- the **held-out stack** DiverseDistill distils (per item segment, fitted on validation:
  :class:`appdistill.methods.stack.SegmentStack`);
- two richer stackers a per-sample weighting could reach: *feature-weighted linear stacking*
  (Sill et al. 2009: the teachers' weights linear in per-row meta-features: the committee's
  spread, its mean confidence, the item's segment and log training frequency) and a small LightGBM
  over the teachers' logits and the same meta-features.

Stackers are fitted on the validation split (no teacher trained on it) and scored on test; their
5-fold cross-validated AUC on validation is reported too. Where the held-out stack is level with
the best teacher, DiverseDistill and ``kd`` distil nearly the same function; where the richer
stackers are level with the held-out stack, per-sample routing has nothing to find.

Usage:
    appdistill teachers fit CONFIG --run-dir R          # the committee, once
    python benchmarks/bench_targets.py CONFIG --run-dir R --out D [--set KEY=VALUE ...]

Writes ``D/results.json`` and ``D/results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _meta(z: np.ndarray, items: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """``[N, K]`` per-row meta-features: the committee's spread and mean confidence, and where items
    have frequency segments the item's segment (one-hot, cold as the base) and log training rows."""
    from appdistill.eval.segments import BUCKETS, Segmenter

    feats = [z.std(1, keepdims=True), np.abs(z.mean(1, keepdims=True))]
    seg = Segmenter.from_counts(freq)
    if seg.reason is None:
        known = (items >= 0) & (items < len(freq))
        codes = np.where(known, items, 0)
        s = np.where(known, seg.index(codes), BUCKETS.index("cold"))
        feats.append(np.eye(len(BUCKETS))[s][:, 1:])
        feats.append(np.log1p(np.where(known, freq[codes], 0))[:, None])
    return np.concatenate(feats, 1)


def _fwls_design(z: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Feature-weighted linear stacking: ``[z, z * m_k for each k, m]``."""
    zc = np.clip(z, -30, 30)
    return np.concatenate([zc] + [zc * m[:, [k]] for k in range(m.shape[1])] + [m], 1)


def _fit_fwls(x: np.ndarray, y: np.ndarray):  # noqa: ANN202 - a scoring closure
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-9
    lr = LogisticRegression(C=0.1, max_iter=2000).fit((x - mu) / sd, y)
    return lambda xt: lr.decision_function((xt - mu) / sd)


def _fit_lgb(x: np.ndarray, y: np.ndarray):  # noqa: ANN202
    import lightgbm as lgb

    g = lgb.LGBMClassifier(n_estimators=200, learning_rate=0.03, num_leaves=7, min_child_samples=100,
                           n_jobs=2, verbose=-1).fit(x, y)
    return lambda xt: g.predict(xt, raw_score=True)


def _cv_auc(fit, x: np.ndarray, y: np.ndarray, folds: int = 5) -> float | None:  # noqa: ANN001
    """Mean AUC over ``folds`` stratified folds of the validation rows (fitted on the others)."""
    from sklearn.model_selection import StratifiedKFold

    from appdistill.eval.metrics import auc

    if min(int(y.sum()), int(len(y) - y.sum())) < folds:
        return None  # too few rows of a class to cross-validate
    out = [auc(fit(x[tr], y[tr])(x[te]), y[te])
           for tr, te in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y)]
    return float(np.mean(out))


def targets(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Score every candidate target of ``cfg``'s committee fitted in ``run_dir`` (caches built if missing)."""
    from appdistill.eval.metrics import auc, logloss
    from appdistill.features.dataset import Dataset
    from appdistill.methods.stack import HeldOut, SegmentStack
    from appdistill.pipeline import build_caches

    ds = Dataset.build(cfg.load_spec())
    caches = build_caches(cfg, run_dir, ds, progress=False, echo=lambda *_: None)
    names = list(caches)
    z, y, items = {}, {}, {}
    for split in ("valid", "test"):
        rows = ds.splits[split]
        z[split] = np.column_stack([caches[n].lookup(split, rows, taps=[]).logits.numpy() for n in names]
                                   ).astype(np.float64)
        y[split], items[split] = ds.labels[rows].astype(np.float64), np.asarray(ds.item_ids[rows], np.int64)
    freq = np.asarray(ds.train_counts("items"), np.int64)
    rows: dict[str, dict[str, float | None]] = {}

    def add(name: str, test: np.ndarray, valid: np.ndarray | None = None, cv: float | None = None) -> None:
        rows[name] = {"test_auc": auc(test, y["test"]), "test_logloss": logloss(test, y["test"]),
                      "valid_auc": None if valid is None else auc(valid, y["valid"]), "valid_cv_auc": cv}

    for j, n in enumerate(names):
        add(f"teacher `{n}`", z["test"][:, j], z["valid"][:, j])
    best = max(range(len(names)), key=lambda j: auc(z["valid"][:, j], y["valid"]))
    pm = np.clip((1 / (1 + np.exp(-np.clip(z["test"], -30, 30)))).mean(1), 1e-7, 1 - 1e-7)
    add("committee average (logits)", z["test"].mean(1), z["valid"].mean(1))
    add("committee average (probabilities)", np.log(pm) - np.log1p(-pm))
    stack = SegmentStack.fit(HeldOut.of(ds, {n: z["valid"][:, j] for j, n in enumerate(names)}), names, freq)
    add("held-out stack (DiverseDistill's target)",
        stack.score({n: z["test"][:, j] for j, n in enumerate(names)}, items["test"]))
    mv, mt = _meta(z["valid"], items["valid"], freq), _meta(z["test"], items["test"], freq)
    xv, xt = _fwls_design(z["valid"], mv), _fwls_design(z["test"], mt)
    add("feature-weighted linear stacking", _fit_fwls(xv, y["valid"])(xt), cv=_cv_auc(_fit_fwls, xv, y["valid"]))
    gv, gt = np.concatenate([z["valid"], mv], 1), np.concatenate([z["test"], mt], 1)
    add("LightGBM stacker", _fit_lgb(gv, y["valid"])(gt), cv=_cv_auc(_fit_lgb, gv, y["valid"]))
    return {"config": cfg.name, "teachers": names, "best_on_valid": names[best], "stack": stack.describe(),
            "valid_rows": int(len(y["valid"])), "test_rows": int(len(y["test"])), "targets": rows}


def report(res: dict[str, Any]) -> str:
    t = res["targets"]
    best = t[f"teacher `{res['best_on_valid']}`"]["test_auc"]
    lines = [f"# Targets the committee can make: {res['config']}", "",
             f"Teachers {', '.join(f'`{n}`' for n in res['teachers'])}; best on validation "
             f"`{res['best_on_valid']}`; stackers fitted on {res['valid_rows']:,} validation rows, scored on "
             f"{res['test_rows']:,} test rows.", "",
             "| target | test AUC | vs best teacher | test logloss | valid AUC (5-fold CV for stackers) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in t.items():
        v = r["valid_cv_auc"] if r["valid_cv_auc"] is not None else r["valid_auc"]
        lines.append(f"| {name} | {r['test_auc']:.4f} | {r['test_auc'] - best:+.4f} | {r['test_logloss']:.4f} | "
                     + (f"{v:.4f}" if v is not None else "") + " |")
    lines += ["", "Held-out stack weights per item segment: `" + json.dumps(res["stack"]) + "`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--run-dir", required=True, help="run directory whose teachers are fitted")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    from appdistill.config import load_config
    from appdistill.io import atomic_write_text

    cfg = load_config(a.config, a.set)
    if not cfg.teachers:
        print(f"file '{a.config}': no `teachers:` configured", file=sys.stderr)
        return 2
    res = targets(cfg, Path(a.run_dir))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    md = report(res)
    atomic_write_text(out / "results.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
