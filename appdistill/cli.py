"""Command line: ``appdistill <command>`` (also ``python -m appdistill``).

Every user-input problem exits with code 2 and a message naming file/feature/column/row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from appdistill.errors import AppDistillError, ConfigError

DEMO_CONFIG = "configs/ml100k_committee.yaml"


def _quiet() -> None:
    """Keep third-party chatter off the user's terminal (progress bars and our messages stay)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("torchrec", "torch.fx", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def format_metrics(m: dict[str, Any]) -> str:
    """A small markdown table of the headline metrics of one run."""
    t = m["test"]
    rows = [("test AUC", t["auc"]), ("test logloss", t["logloss"]), ("test GAUC", t.get("gauc")),
            ("test NDCG@10", t.get("ndcg@10")), ("test recall@10", t.get("recall@10")),
            *_cold_row(t.get("cold") or {}),
            *((f"test AUC, {kind[:-1]} segment {b} (n={v['n']:,})", v["auc"])
              for kind, segs in (t.get("segments") or {}).items() for b, v in segs.items()),
            ("valid AUC", m["valid"]["auc"]), ("student params", m["student"]["params"]),
            ("student bytes", m["student"]["bytes"]), ("train samples/s", m["train"]["samples_per_s"])]
    for name, tm in m.get("teachers", {}).items():
        rows.append((f"teacher {name} test AUC", tm.get("test", {}).get("auc")))
    w = max(len(r[0]) for r in rows)
    out = [f"| {'metric'.ljust(w)} | value    |", f"|{'-' * (w + 2)}|----------|"]
    for k, v in rows:
        if v is None or (isinstance(v, float) and v != v):  # absent or undefined: never print NaN
            continue
        s = (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}") if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
        out.append(f"| {k.ljust(w)} | {s:<8} |")
    if str(t.get("per_user", "")).startswith("omitted"):
        out.append(f"GAUC / NDCG / recall {t['per_user']}")
    return "\n".join(out)


def _cold_row(cold: dict[str, Any]) -> list[tuple[str, Any]]:
    """The cold-item line, saying what it covers (all of test on a one-row-per-entity table)."""
    if not cold.get("n"):
        return []
    if cold.get("share") == 1.0:
        return [("cold-item AUC (every test row is cold: = test AUC)", cold["auc"])]
    return [(f"cold-item AUC (n={cold['n']:,}, {cold.get('share', 0):.1%} of test)", cold["auc"])]


def _spec_of(path: str, overrides: list[str] | None = None) -> tuple[Any, str]:
    """The feature spec of ``path`` and its file: a spec file, or a config file (fully checked first, after
    ``overrides``: sections, ranges, method and teacher kwargs) whose ``spec:`` is then validated with
    its data."""
    from appdistill.config import load_config
    from appdistill.features.spec import FeatureSpecSet, load_yaml

    p = Path(path)
    try:
        raw = load_yaml(p.read_text(), path) if p.is_file() else None
    except (OSError, UnicodeDecodeError):  # not text: read again as a spec below, which names the problem
        raw = None
    if isinstance(raw, dict) and "spec" in raw and "features" not in raw:
        cfg = load_config(p, overrides)
        teachers = ", ".join(f"{n} ({b.key})" for n, b in cfg.teachers.items()) or "none"
        print(f"config '{cfg.name}' ({path}): OK  method={cfg.method.key}  teachers: {teachers}  "
              f"epochs={cfg.train.epochs}  transfer={'on' if cfg.transfer.enabled else 'off'}")
        spec = cfg.load_spec()
        from appdistill.student.model import check_interaction

        check_interaction(cfg.student, spec)
        if cfg.student.content.enabled:
            from appdistill.features.content import content_features

            feats = content_features(list(cfg.student.content.features), spec)
            print(f"  content table: {', '.join(f.name for f in feats)} x {cfg.student.content.dim} dims")
        return spec, str(cfg.resolve_path(cfg.spec))
    if overrides:
        raise ConfigError(f"--set applies to a config file; '{path}' is a feature spec")
    return FeatureSpecSet.from_yaml(path), path


def cmd_validate(a: argparse.Namespace) -> int:
    from appdistill.features.dataset import Dataset
    from appdistill.features.tables import table_location

    spec, spec_path = _spec_of(a.spec, a.set)
    ds = Dataset.build(spec)
    s = ds.summary()
    print(f"spec '{spec.name}' ({spec_path}): OK")
    if ds.streamed:
        print(f"  table {'interactions':<13} {ds.n:>9,} rows  key={spec.tables['interactions'].keys}  from "
              f"{table_location(spec, 'interactions')} (a folder: streamed into memory-mapped columns in {ds.streamed})")
    for name, df in ds.tables.items():
        print(f"  table {name:<13} {len(df):>9,} rows  key={spec.tables[name].keys}  from {table_location(spec, name)}")
    for name, cov in ds.join_coverage.items():
        print(f"  join {name:<14} " + ", ".join(f"{k}={v}" for k, v in cov.items()))
    print(f"  label: {spec.tables['interactions'].label.column} -> positive rate {s['positive_rate']:.4f}")
    print(f"  split: {spec.split.by}  " + "  ".join(f"{k}={v:,}" for k, v in s["splits"].items())
          + f"  (cold test rows: {s['cold_test_rows']:,})")
    print("  features:")
    for f in spec.features:
        who = [m for m, feats in spec.visibility.items() if f.name in feats]
        extra = ""
        if f.name in ds.processor.vocabs:
            v = ds.processor.vocabs[f.name]
            extra = f"num_embeddings={v.num_embeddings}{' (hashed)' if v.hashing else ''} dim={f.dim}"
        elif f.kind == "dense":
            extra = f"transform={f.transform} nan_imputed={s['nan_imputed'].get(f.name, 0)}"
        elif f.encoder:
            extra = f"encoder={f.encoder}"
        print(f"    {f.name:<14} {f.kind:<9} {f.table:<12} {extra:<40} seen by: {', '.join(who)}")
    # "seen by" lists the spec's entries only; a teacher without one falls back to the student's features
    # (FeatureSpecSet.visible), which the list above would otherwise hide
    print(f"  visibility: entries for {', '.join(spec.visibility)}; a model without an entry (e.g. a teacher) "
          "sees the student's features")
    print(f"  data fingerprint: {s['fingerprint']}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from appdistill.config import load_config
    from appdistill.pipeline import train

    cfg = load_config(a.config, a.set)
    m = train(cfg, a.run_dir, progress=not a.no_progress, resume=a.resume)
    if _is_main():
        print(format_metrics(m))
        print(f"run directory: {a.run_dir}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The committee on MovieLens-100K: fit (or reuse) the three teachers, distil them with
    DiverseDistill into the compact student, train the plain student on the same budget, compare."""
    from appdistill.config import REPO_ROOT, load_config
    from appdistill.features.dataset import Dataset
    from appdistill.pipeline import distill, train

    cfg = load_config(REPO_ROOT / DEMO_CONFIG, a.set)
    run = Path(a.run_dir)
    print(f"appdistill demo: teaching committee -> DiverseDistill -> TorchRec student on MovieLens-100K "
          f"({DEMO_CONFIG})")
    ds = Dataset.build(cfg.load_spec())
    dd = distill(cfg, run, ds=ds)  # teachers, caches, student, evaluation, export (run/export)
    # the student trained alone: no teachers, no transfer set, no content table
    student = cfg.student.model_copy(update={"content": cfg.student.content.model_copy(update={"enabled": False})})
    plain_cfg = cfg.model_copy(update={"method": cfg.method.model_copy(update={"key": "none", "kwargs": {}}),
                                       "teachers_dir": str(run.resolve()), "student": student,
                                       "transfer": cfg.transfer.model_copy(update={"enabled": False})})
    plain = train(plain_cfg, run / "plain", dataset=ds)
    additions = "".join(s for s, on in (("+content", cfg.student.content.enabled),
                                        ("+transfer", cfg.transfer.enabled)) if on)
    print(format_comparison(dd, plain, additions))
    print(f"run directory: {run}  (teachers/, cache/, metrics.json, curve.png, export/; plain student in plain/)")
    return 0


def format_comparison(dd: dict[str, Any], plain: dict[str, Any], additions: str = "") -> str:
    """Teachers vs the plain student vs the distilled student (``additions``: ``+content+transfer``
    when it trained with them), as a markdown table."""
    rows = ["| model | test AUC | test logloss | cold-item AUC | params |", "|---|---:|---:|---:|---:|"]
    for name, t in dd.get("teachers", {}).items():
        rows.append(f"| teacher `{name}` | {t['test']['auc']:.4f} | {t['test'].get('logloss', float('nan')):.4f} "
                    f"| {t['test'].get('cold', {}).get('auc', float('nan')):.4f} | "
                    f"{format(t['params'], ',') if 'params' in t else '-'} |")
    for label, m in (("student, plain (`none`)", plain), (f"student, `{dd['method']}{additions}`", dd)):
        rows.append(f"| {label} | {m['test']['auc']:.4f} | {m['test']['logloss']:.4f} "
                    f"| {m['test']['cold']['auc']:.4f} | {m['student']['params']:,} |")
    return "\n".join(rows) + f"\n\nteacher answers skipped by the gate: {dd['train']['teacher_passes_skipped']:.1%}"


def cmd_teachers_fit(a: argparse.Namespace) -> int:
    from appdistill.config import load_config
    from appdistill.pipeline import fit_committee

    cfg = load_config(a.config, a.set)
    res = fit_committee(cfg, a.run_dir, names=a.only or None, force=a.force, progress=not a.no_progress)
    print(format_teachers(res))
    return 0


def format_teachers(res: dict[str, Any]) -> str:
    out = ["| teacher | test AUC | cold AUC (n) | valid AUC | fit s | reused |", "|---|---|---|---|---|---|"]
    for name, m in res.items():
        cold = m["test"].get("cold", {})
        out.append(f"| {name} | {m['test']['auc']:.4f} | {cold.get('auc', float('nan')):.4f} ({cold.get('n', 0)}) "
                   f"| {m['valid']['auc']:.4f} | {m.get('fit_seconds', 0):.1f} | {m.get('reused', False)} |")
    return "\n".join(out)


def cmd_cache_build(a: argparse.Namespace) -> int:
    from appdistill.config import load_config
    from appdistill.pipeline import build_caches

    cfg = load_config(a.config, a.set)
    if not cfg.teachers:
        raise AppDistillError(f"file '{a.config}': no `teachers:` configured, nothing to cache")
    build_caches(cfg, a.run_dir, progress=not a.no_progress, hidden=True if a.hidden else None)
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from appdistill.config import load_config
    from appdistill.pipeline import distill

    cfg = load_config(a.config, a.set)
    m = distill(cfg, a.run_dir, export=not a.no_export, progress=not a.no_progress, resume=a.resume)
    if _is_main():
        print(format_metrics(m))
        print(f"run directory: {a.run_dir}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from appdistill.export.artifact import export_run

    # all or nothing: a failed export (exit 2) leaves --out exactly as it was
    out = export_run(a.run_dir, a.out, compile=not a.no_compile)
    man = json.loads((out / "manifest.json").read_text())
    print(f"exported the student of {a.run_dir} to {out}: {man['params']['params']:,} parameters, "
          f"compiled with {man['compiled']}; files: {', '.join(man['files'])}")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    """Score a parquet/CSV file of raw rows. The output is written atomically (temporary file, then
    rename) and only after every row scored: on any error (exit 2) an existing output is untouched."""
    import io

    import pandas as pd

    from appdistill.export.artifact import Ranker
    from appdistill.features.tables import _read_file
    from appdistill.io import atomic_write_bytes, file_in_the_way

    src, out = Path(a.input), Path(a.output)
    kind = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}.get(out.suffix.lower())
    if kind is None:
        raise AppDistillError(f"file '{out}': output must be .parquet or .csv")
    if out.is_dir():
        raise AppDistillError(f"file '{out}': --output is a directory")
    above = file_in_the_way(out)
    if above is not None:
        raise AppDistillError(f"file '{out}': '{above}' is a file, so --output cannot be written there")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise AppDistillError(f"file '{out}': --output is the --input file; write the scores elsewhere")
    ranker = Ranker.load(a.export_dir)
    # CSV: string-keyed id columns are read as text, so "08" stays "08" (not the integer 8)
    df = _read_file(src, {"dtype": {c: str for c in ranker.encoder.string_columns()}}
                    if src.suffix.lower() in (".csv", ".tsv", ".gz") else {})
    scores = ranker.score(df, str(src))
    res = pd.DataFrame({"score": scores})
    if a.keep_columns:
        if "score" in df.columns:
            raise AppDistillError(f"file '{src}': has a column 'score' already; --keep-columns would duplicate it")
        res = pd.concat([df.reset_index(drop=True), res], axis=1)
    buf = io.BytesIO()
    try:
        res.to_parquet(buf, index=False) if kind == "parquet" else res.to_csv(buf, index=False)
    except Exception as e:  # noqa: BLE001 - e.g. --keep-columns with mixed-type cells
        raise AppDistillError(f"file '{out}': cannot write the scores as {kind} ({type(e).__name__}: {e})") from e
    atomic_write_bytes(out, buf.getvalue())
    print(f"scored {len(res):,} rows from {src} -> {out}")
    return 0


def cmd_content_refresh(a: argparse.Namespace) -> int:
    from appdistill.export.content import refresh_content

    r = refresh_content(a.export_dir, a.items, store=a.store)
    print(f"content table of {a.export_dir}: {r['added']:,} items added, {r['updated']:,} updated "
          f"({r['items']:,} items known)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from appdistill.bench.runner import BenchOptions, run_bench
    from appdistill.bench.variants import expand

    methods = expand(a.methods)
    run_bench(BenchOptions(configs=a.configs, out=a.out, methods=methods, splits=a.splits or None, seeds=a.seeds,
                           vary_data=a.vary_data, budget=a.budget, tune=not a.no_tune, overrides=a.set,
                           progress=not a.no_progress))
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appdistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a feature spec (or a whole config and its spec) and the tables; "
                                        "print a summary")
    v.add_argument("spec")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (config files only), as train and distill take it")
    v.set_defaults(fn=cmd_validate)
    t = sub.add_parser("train", help="train the student with the configured method")
    t.add_argument("config")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoints/last.pt if it exists (refused if the spec, data, "
                        "teachers, student or method changed)")
    t.set_defaults(fn=cmd_train)
    tf = sub.add_parser("teachers", help="teacher commands").add_subparsers(dest="sub", required=True)
    f = tf.add_parser("fit", help="fit (or reuse) the configured teachers into RUN_DIR/teachers/<name>/")
    f.add_argument("config")
    f.add_argument("--run-dir", required=True)
    f.add_argument("--only", action="append", default=[], metavar="NAME", help="fit only this teacher")
    f.add_argument("--force", action="store_true", help="refit even if a matching fitted teacher exists")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.set_defaults(fn=cmd_teachers_fit)
    cb = sub.add_parser("cache", help="teacher-output cache commands").add_subparsers(dest="sub", required=True)
    c = cb.add_parser("build", help="compute every teacher's outputs once into RUN_DIR/cache")
    c.add_argument("config")
    c.add_argument("--run-dir", required=True)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--hidden", action="store_true",
                   help="also store the teachers' hidden taps when the config's method reads logits only "
                        "(by default a cache holds what the method reads)")
    c.set_defaults(fn=cmd_cache_build)
    di = sub.add_parser("distill", help="whole pipeline: teachers, cache, student, evaluation, export")
    di.add_argument("config")
    di.add_argument("--run-dir", required=True)
    di.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    di.add_argument("--no-export", action="store_true")
    di.add_argument("--no-progress", action="store_true")
    di.add_argument("--resume", action="store_true", help="continue the student's training from its last checkpoint")
    di.set_defaults(fn=cmd_distill)
    d = sub.add_parser("demo", help="the default pipeline on the embedded MovieLens-100K")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(fn=cmd_demo)
    e = sub.add_parser("export", help="write the serving artefact of a run (plain student only)")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--no-compile", action="store_true", help="skip the torch.export program")
    e.set_defaults(fn=cmd_export)
    s = sub.add_parser("score", help="score rows of raw feature values (parquet or csv) with an export")
    s.add_argument("export_dir")
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--keep-columns", action="store_true", help="copy the input columns into the output")
    s.set_defaults(fn=cmd_score)
    ct = sub.add_parser("content", help="the student's content table (student.content)").add_subparsers(
        dest="sub", required=True)
    cr = ct.add_parser("refresh", help="encode new or edited items offline and add their vectors to an export",
                       description="Encode the items of FILE (their key and text/image columns) through the embedding "
                                   "store with the encoder the table was fitted with, project them, and add or "
                                   "replace their vectors in EXPORT_DIR/content (all or nothing; no retraining).")
    cr.add_argument("export_dir")
    cr.add_argument("--items", required=True, help="parquet/CSV with the item key and the content features' columns")
    cr.add_argument("--store", default=None, help="embedding store root (default: $APPDISTILL_CACHE/store)")
    cr.set_defaults(fn=cmd_content_refresh)
    bn = sub.add_parser("bench", help="compare methods on your configs: methods x splits x seeds, equal tuning budgets",
                        description="Fit each config's committee once per split, tune every method on the same budget "
                                    "(its grid, on seed 0's validation split), run the chosen setting on every seed, and "
                                    "write OUT/<config>/results.{md,csv,json} with plots.")
    bn.add_argument("configs", nargs="+", metavar="CONFIG")
    bn.add_argument("--out", required=True, help="output directory (resumable: finished runs are reused)")
    bn.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                    help="methods and ablations to run, or groups: 'all' (every one), 'additions' (kd, avg_kd, taid "
                         "and diverse_distill plain, +transfer and +content+transfer); default: none kd avg_kd "
                         "taid talking diverse_distill")
    bn.add_argument("--splits", nargs="+", default=None, metavar="BY",
                    help="split.by values (random, time, cold_item); default: the spec's split")
    bn.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="student seeds (default 0 1 2)")
    bn.add_argument("--vary-data", action="store_true",
                    help="seeds also vary the split and the teachers (teachers fitted per seed)")
    bn.add_argument("--budget", type=int, default=None,
                    help="settings per method taken from its grid (default: the whole grid, the same size for all)")
    bn.add_argument("--no-tune", action="store_true", help="config / class defaults for every method, no grid")
    bn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every config")
    bn.add_argument("--no-progress", action="store_true")
    bn.set_defaults(fn=cmd_bench)
    # every command that can run long takes --no-progress (bars also stay off when stderr is not a terminal)
    for parser in (v, f, c, d, e, s, cr):
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    from appdistill import progress

    progress.set_enabled(not getattr(args, "no_progress", False))
    try:
        return int(args.fn(args) or 0)
    except AppDistillError as e:
        print(f"appdistill: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("appdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
