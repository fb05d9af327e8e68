"""The report of one ``appdistill bench`` config: results.csv / results.json / results.md and plots.

Every figure is a best-epoch model; means are over seeds with the sample standard deviation, and a
difference within one standard deviation is called a tie. Gap recovered is
``(AUC_method - AUC_plain) / (AUC_ref - AUC_plain)`` per seed, with the reference the single teacher
best on *validation*; where the reference does not lead the plain student there is no gap to
recover and the figure is omitted, not a ratio of noise.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
import pandas as pd

from appdistill.bench.variants import VARIANTS
from appdistill.eval.segments import BUCKETS
from appdistill.io import atomic_write_text

MIN_LEAD = 1e-3  # a reference teacher leading by less has no gap worth a ratio


def add_gap(df: pd.DataFrame) -> pd.DataFrame:
    """``gap_recovered`` per row against the plain student of the same split and seed."""
    if df.empty or "none" not in set(df.method):
        df["gap_recovered"] = np.nan
        return df
    none = df[df.method == "none"].set_index(["split", "seed"])["auc"]
    gaps = []
    for a, s, sd, ref in zip(df.auc, df.split, df.seed, df.ref_teacher_auc):
        base = none.get((s, sd))
        ok = base is not None and ref is not None and not pd.isna(ref) and ref - base >= MIN_LEAD
        gaps.append((a - base) / (ref - base) if ok else np.nan)
    df["gap_recovered"] = gaps
    return df


def _ms(x: pd.Series) -> tuple[float, float]:
    """Mean and sample standard deviation; the std is NaN (printed as no "±") for a single value: one
    seed says nothing about the spread, and a std of 0 would make every difference "better"/"worse"."""
    x = x.dropna().astype(float)
    if x.empty:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _fmt(m: float, s: float | None = None, pct: bool = False) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "n/a"
    if pct:
        return f"{100 * m:.0f}%" + (f" ± {100 * s:.0f}%" if s is not None and not math.isnan(s) else "")
    return f"{m:.4f}" + (f" ± {s:.4f}" if s is not None and not math.isnan(s) else "")


def verdict(df: pd.DataFrame, method: str) -> str:
    """Mean AUC difference to the plain student, and whether it exceeds one standard deviation."""
    if method == "none" or "none" not in set(df.method):
        return ""
    return compare(df, method, "none")


BASELINES = ("kd", "avg_kd", "taid")


def compare(df: pd.DataFrame, a: str, b: str) -> str:
    """Mean test-AUC difference ``a - b`` and whether it exceeds the larger of their two stds."""
    (ma, sa), (mb, sb) = _ms(df[df.method == a].auc), _ms(df[df.method == b].auc)
    d, sd = ma - mb, max(sa, sb)
    if math.isnan(d):
        return "n/a"
    if math.isnan(sa) or math.isnan(sb):  # a single seed: no spread to judge the difference against
        return f"{d:+.4f} (one seed: no std)"
    return f"{d:+.4f} ({'tie' if abs(d) <= sd else ('better' if d > 0 else 'worse')})"


def against_baselines(sub: pd.DataFrame) -> list[str]:
    """DiverseDistill (with each suffix that ran: ``+content+transfer`` ...) against ``kd``, ``avg_kd`` and
    ``taid`` with the same suffix: the comparison its claim rests on, each under the same budget."""
    names = set(sub.method)
    out: list[str] = []
    for name in [n for n in dict.fromkeys(sub.method) if n.split("+", 1)[0] == "diverse_distill"]:
        suffix = name[len("diverse_distill"):]
        cells = [f"`{b}{suffix}` {compare(sub, name, b + suffix)}" for b in BASELINES if b + suffix in names]
        if cells:
            out.append(f"- `{name}` against " + "; ".join(cells))
    if out:
        out = ["", "DiverseDistill against the single-teacher and averaged baselines with the same additions "
                   "(test AUC difference; *better* / *worse* only beyond the larger std):", "", *out]
    return out


def summary(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for (split, method), g in df.groupby(["split", "method"], sort=False):
        auc_m, auc_s = _ms(g.auc)
        vm, vs = _ms(g.valid_auc)
        gm, gs = _ms(g.gap_recovered)
        out.append({"split": split, "method": method, "auc": auc_m, "auc_std": auc_s, "valid_auc": vm,
                    "valid_auc_std": vs, "gap_recovered": gm, "gap_recovered_std": gs, "seeds": len(g),
                    "vs_plain": verdict(df[df.split == split], method)})
    return out


def markdown(b: Any, df: pd.DataFrame, seconds: float) -> str:
    o = b.o
    spec = b.base.load_spec()
    cmd = " ".join(["appdistill bench", b.path, "--methods", *o.methods,
                    *(["--splits", *o.splits] if o.splits else []), "--seeds", *map(str, o.seeds),
                    *(["--vary-data"] if o.vary_data else []), *([f"--budget {o.budget}"] if o.budget else []),
                    *(["--no-tune"] if not o.tune else []), *[f"--set {s}" for s in o.overrides]])
    budgets = {n: len(t["tuned"]) for c in b.choices.values() for n, t in c.items() if t["tuned"]}
    lines = [f"# Benchmark: {b.name} (spec `{spec.name}`)", "", f"`{cmd}` ({seconds / 60:.1f} min)", "",
             f"- Every figure is the best-epoch model on validation ({b.base.train.epochs} epochs, batch "
             f"{b.base.train.batch_size}, the same data for every method); mean ± sample std over "
             f"{len(o.seeds)} seed(s); a difference within one std is a tie"
             + (" (one seed has no std: no difference is called better or worse; pass several --seeds)."
                if len(o.seeds) < 2 else "."),
             ("- Seeds vary the student, the split and the teachers (`--vary-data`)." if o.vary_data else
              f"- Seeds {o.seeds} vary the student only (initialisation, batch order); the split and the "
              "teachers are fixed by the config."),
             (f"- Tuning budget: each method tried {sorted(set(budgets.values())) or [1]} setting(s) of its "
              f"grid on the validation split of seed {o.seeds[0]}; the best on validation ran on every seed. "
              "Ablations (`dd_*`, `*+transfer`, `*+content`) reuse the setting of the method they ablate." if o.tune else
              "- No tuning (`--no-tune`): config / class defaults for every method."),
             "- Gap recovered = (AUC - plain) / (reference teacher - plain), reference = the teacher best on "
             "validation; omitted where it does not lead the plain student by 0.001."]
    # a variant has a transfer set / content table only when its name says so (variants.ADDITIONS):
    # say so where the config trains with them and no variant here does
    on = [n for n, enabled in (("a transfer set", b.base.transfer.enabled),
                               ("a content table", b.base.student.content.enabled)) if enabled]
    if on and not any("+" in m for m in o.methods):
        lines.append(f"- The config trains with {' and '.join(on)}; every method here ran without them (a "
                     "variant adds them when its name says so: `--methods additions` compares both).")
    for tag in dict.fromkeys(df.split) if not df.empty else []:
        sub = df[df.split == tag]
        t = b.teachers.get(tag) or {}
        lines += ["", f"## split: {tag}", ""]
        plain = _ms(sub[sub.method == "none"].auc)[0] if "none" in set(sub.method) else math.nan
        if t:
            mem = t["members"]
            lines.append("Teachers (test / valid AUC): " + ", ".join(
                f"`{n}` {v['test_auc']:.4f} / {v['valid_auc']:.4f}" for n, v in mem.items())
                + f"; best on validation: `{t['best']}`.")
            if not math.isnan(plain):
                lead = mem[t["best"]]["test_auc"] - plain
                top = max(mem, key=lambda n: mem[n]["test_auc"])
                lines.append(f"Best teacher's lead over the best-epoch plain student: **{lead:+.4f}** test AUC "
                             f"(`{t['best']}`; the best on test, `{top}`: {mem[top]['test_auc'] - plain:+.4f}).")
            so, po = t.get("segment_oracle"), t.get("sample_oracle")
            bounds = []
            if so:
                bounds.append(f"segment oracle {so['auc']:.4f} (" + ", ".join(f"{k}: `{v}`" for k, v in so["choice"].items())
                              + ")")
            if po:
                bounds.append(f"per-sample oracle {po['auc']:.4f} (closest member: "
                              + ", ".join(f"`{k}` {v:.0%}" for k, v in po["share"].items()) + ")")
            if bounds:
                lines.append("Upper bounds, not servable models: " + "; ".join(bounds) + ".")
            st = t.get("stack")
            if st:
                top = max(mem, key=lambda n: mem[n]["test_auc"])
                avg = st.get("average_auc")
                lines.append(f"DiverseDistill's target, the committee's held-out stack: test AUC {st['auc']:.4f} "
                             f"({st['auc'] - mem[top]['test_auc']:+.4f} over the best teacher on test, `{top}`"
                             + (f"; {st['auc'] - avg:+.4f} over the committee's average logit, {avg:.4f}"
                                if avg is not None else "")
                             + "); where it is level with one teacher DiverseDistill and `kd` distil nearly the "
                             "same function, where it is level with the average it and `avg_kd` do.")
        lines += ["", "| method | test AUC | valid AUC | vs plain (test) | gap recovered | cold-item AUC | "
                      "skipped answers | train s | setting |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
        for name, g in sub.groupby("method", sort=False):
            am, as_ = _ms(g.auc)
            vm, vs = _ms(g.valid_auc)
            gm, gs = _ms(g.gap_recovered)
            cm, cs = _ms(g.cold_auc)
            lines.append(f"| `{name}` | {_fmt(am, as_)} | {_fmt(vm, vs)} | {verdict(sub, name)} | {_fmt(gm, gs, True)} "
                         f"| {_fmt(cm, cs)} | {g.skipped.mean():.0%} | {g.train_seconds.mean():.1f} | "
                         f"`{g.setting.iloc[0]}` |")
        lines += against_baselines(sub)
        lines += segment_table(sub, t)
        lines += routing_table(sub, t)
        choices = b.choices.get(tag, {})
        tuned = {n: c for n, c in choices.items() if c["tuned"]}
        if tuned:
            lines += ["", "Tuning (validation AUC of each setting, seed " + str(o.seeds[0]) + "):"]
            for n, c in tuned.items():
                lines.append(f"- `{n}`: " + "; ".join(f"{json.dumps(x['setting'])} {x['valid_auc']:.4f}"
                                                       for x in c["tuned"]))
    if not df.empty and df.cold_auc.isna().all():
        lines += ["", "Cold-item AUC: n/a where no test row is cold, or where every one is (a one-row-per-entity "
                      "table: then it is the test AUC)."]
    if b.skipped:
        lines += ["", "Not run:"] + [f"- `{k}`: {v}" for k, v in b.skipped.items()]
    sizes = df.student_params.dropna() if not df.empty else []
    if len(sizes):
        lines += ["", f"Student parameters: {int(sizes.iloc[0]):,}" + _teacher_sizes(b, int(sizes.iloc[0])) + "."]
    return "\n".join(lines) + "\n"


def segment_table(sub: pd.DataFrame, t: dict[str, Any]) -> list[str]:
    """Item (and user) segment AUCs of the teachers, the bounds and every method."""
    out: list[str] = []
    for kind in ("items", "users"):
        cols = [b for b in BUCKETS if f"{kind}_{b}_auc" in sub.columns and sub[f"{kind}_{b}_auc"].notna().any()]
        if not cols:
            edges = (t.get("segment_edges") or {}).get(kind)
            if isinstance(edges, str):
                out += ["", f"No {kind[:-1]} segments: {edges}."]
            continue
        edges = (t.get("segment_edges") or {}).get(kind) or {}
        out += ["", f"Test AUC per {kind[:-1]} segment (training rows per {kind[:-1]}: "
                + ", ".join(f"{c} {edges.get(c, '?')}" for c in cols) + "):", "",
                "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        teach = t.get("members", {}) if t else {}
        for n, v in teach.items():
            segs = v["segments"].get(kind, {})
            out.append(f"| teacher `{n}` | " + " | ".join(_fmt((segs.get(c) or {}).get("auc") or math.nan)
                                                         for c in cols) + " |")
        if kind == "items" and t:
            for label, key in (("held-out stack (DiverseDistill's target)", "stack"),
                               ("segment oracle (bound)", "segment_oracle"),
                               ("per-sample oracle (bound)", "sample_oracle")):
                segs = (t.get(key) or {}).get("segments") or {}
                if segs:
                    out.append(f"| {label} | " + " | ".join(_fmt((segs.get(c) or {}).get("auc") or math.nan)
                                                            for c in cols) + " |")
        for name, g in sub.groupby("method", sort=False):
            out.append(f"| `{name}` | " + " | ".join(_fmt(*_ms(g[f"{kind}_{c}_auc"])) for c in cols) + " |")
        first = next(iter(teach.values()))["segments"].get(kind, {}) if teach else {}
        n_row = {c: first.get(c, {}).get("n") for c in cols}
        if any(n_row.values()):
            out.append("| rows | " + " | ".join(f"{n_row[c]:,}" if n_row[c] else "" for c in cols) + " |")
        se = {c: first.get(c, {}).get("auc_se") for c in cols}
        if any(v is not None for v in se.values()):
            out.append("| AUC std. error of the test rows | " + " | ".join(f"±{se[c]:.4f}" if se[c] is not None else ""
                                                                      for c in cols) + " |")
            small = [c for c in cols if se[c] is not None and se[c] >= 0.02]
            if small:
                out += ["", f"Segments {', '.join(small)}: an AUC over so few test rows moves by the standard error "
                            "above between test sets of that size (Hanley & McNeil; the seed spread of one fixed "
                            "test set does not show it): differences there are not evidence either way."]
    return out


def routing_table(sub: pd.DataFrame, t: dict[str, Any]) -> list[str]:
    """Each teacher's mean share of the distilled target per item segment (over seeds) beside the
    segment oracle's choice."""
    if "routing" not in sub.columns:
        return []
    choice = ((t or {}).get("segment_oracle") or {}).get("choice", {})
    out: list[str] = []
    for name, g in sub.groupby("method", sort=False):
        reps = [json.loads(x) for x in g.routing.dropna()]
        if not reps or not all(r.get("segments") for r in reps):
            continue
        names = reps[0]["teachers"]
        if not out:
            out += ["", "Routing: each teacher's mean share of the distilled target (the gate's weights, or the "
                        "held-out stack's modulated by them) on the test rows of each item segment (mean "
                        "over seeds), and the teacher the segment oracle picks there:", "",
                    "| method | segment | " + " | ".join(f"`{n}`" for n in names) + " | oracle's pick |",
                    "|---|---|" + "---:|" * len(names) + "---|"]
        for seg in [s for s in BUCKETS if s in reps[0]["segments"]]:
            vals = [np.mean([r["segments"].get(seg, {}).get(n, np.nan) for r in reps]) for n in names]
            out.append(f"| `{name}` | {seg} | " + " | ".join(f"{v:.2f}" for v in vals)
                       + f" | `{choice.get(seg, '?')}` |")
    return out


def plots(b: Any, df: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if df.empty:
        return
    splits, methods = list(dict.fromkeys(df.split)), list(dict.fromkeys(df.method))
    w = 0.8 / len(splits)
    for metric, fname in (("auc", "auc_per_method.png"), ("gap_recovered", "gap_recovered.png")):
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 4))
        for i, s in enumerate(splits):
            g = df[df.split == s].groupby("method")[metric]
            mean, std = g.mean().reindex(methods), g.std(ddof=1).reindex(methods).fillna(0)
            ax.bar(np.arange(len(methods)) + i * w, mean.fillna(0), w, yerr=std, label=s, capsize=3)
        if metric == "auc":
            for i, s in enumerate(splits):
                for n, v in (b.teachers.get(s) or {}).get("members", {}).items():
                    ax.axhline(v["test_auc"], ls=":", lw=1, color=f"C{i}")
            ax.set_ylim(df.auc.min() - 0.02, max(df.auc.max(), *[v["test_auc"] for t in b.teachers.values()
                                                                  for v in (t or {}).get("members", {}).values()],
                                                 df.auc.max()) + 0.01)
            ax.set_title(f"{b.name}: test AUC (mean ± std over seeds; dotted: teachers)")
        else:
            ax.set_title(f"{b.name}: gap recovered")
        ax.set_xticks(np.arange(len(methods)) + w * (len(splits) - 1) / 2, methods, rotation=30, ha="right")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        fig.savefig(b.dir / fname, dpi=100)
        plt.close(fig)
    cols = [c for c in BUCKETS if f"items_{c}_auc" in df.columns and df[f"items_{c}_auc"].notna().any()]
    if not cols:
        return
    fig, axes = plt.subplots(1, len(splits), figsize=(max(6, 5 * len(splits)), 4), squeeze=False)
    for ax, s in zip(axes[0], splits):
        sub = df[df.split == s]
        names = list(dict.fromkeys(sub.method))
        members = (b.teachers.get(s) or {}).get("members", {})
        series = {f"T:{n}": [(v["segments"].get("items", {}).get(c) or {}).get("auc") or np.nan for c in cols]
                  for n, v in members.items()}
        series.update({n: [sub[sub.method == n][f"items_{c}_auc"].mean() for c in cols] for n in names})
        ww = 0.8 / max(1, len(series))
        for i, (n, vals) in enumerate(series.items()):
            ax.bar(np.arange(len(cols)) + i * ww, vals, ww, label=n)
        ax.set_xticks(np.arange(len(cols)) + ww * (len(series) - 1) / 2, cols)
        vals = [v for vs in series.values() for v in vs if not pd.isna(v)]
        if vals:
            ax.set_ylim(min(vals) - 0.02, max(vals) + 0.01)
        ax.set_title(f"{s}: test AUC per item segment")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(b.dir / "segments.png", dpi=100)
    plt.close(fig)


def write_report(b: Any, seconds: float) -> dict[str, Any]:
    """Write ``b.dir/results.{csv,json,md}`` and the plots; returns the results.json dict."""
    df = add_gap(pd.DataFrame(b.rows))
    if not df.empty:
        atomic_write_text(b.dir / "results.csv", df.to_csv(index=False))
    res = {"config": b.path, "name": b.name, "spec": b.base.load_spec().name, "seeds": b.o.seeds,
           "vary_data": b.o.vary_data, "budget": b.o.budget, "tuned": b.o.tune, "methods": b.o.methods,
           "variants": {m: VARIANTS[m].doc for m in b.o.methods}, "choices": b.choices, "teachers": b.teachers,
           "skipped": b.skipped, "summary": summary(df) if not df.empty else [],
           "rows": df.astype(object).where(df.notna(), None).to_dict("records"), "seconds": round(seconds, 1), "argv": sys.argv}
    atomic_write_text(b.dir / "results.json", json.dumps(res, indent=1, default=_json))
    atomic_write_text(b.dir / "results.md", markdown(b, df, seconds))
    plots(b, df)
    return res


def _json(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)  # paths and anything else json cannot write


def _teacher_sizes(b: Any, student: int) -> str:
    """``"; teachers: `foundation` 22,926,308 parameters (335x the student; 22,713,216 in frozen
    encoders), ..."`` from the first split's teacher report (empty without one)."""
    t = next((v for v in (getattr(b, "teachers", None) or {}).values() if v), None)
    parts = []
    for n, m in ((t or {}).get("members") or {}).items():
        z = m.get("size") or {}
        if z.get("params"):
            frozen = z.get("frozen_encoder_params")
            parts.append(f"`{n}` {z['params']:,} parameters ({z['params'] / max(student, 1):.0f}x the student"
                         + (f"; {frozen:,} in frozen encoders" if frozen else "") + ")")
        elif z.get("trees"):
            parts.append(f"`{n}` {z['trees']:,} trees, {z['leaves']:,} leaves")
    return ("; teachers: " + ", ".join(parts)) if parts else ""
