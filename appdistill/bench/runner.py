"""``appdistill bench``: methods x splits x seeds on any config, with equal tuning budgets.

For each config and split (and, with ``vary_data``, each data seed):

1. the committee of the config is fitted once (``fit_committee``; reused across seeds and methods and
   across invocations: a teacher is refitted only when its config, spec or data changed);
2. every method is tuned on the **validation** split of the first seed: each declares a grid
   (``Method.grid``) of the same size, and the setting with the best validation AUC (best epoch)
   is kept; ablations reuse the setting of the method they ablate;
3. the chosen setting is trained on every seed; each run's ``metrics.json`` (best epoch) is a row.

Every run has its own directory named by a hash of its resolved config: a finished run is read
back, an interrupted one resumes from its checkpoint, and a changed config starts afresh. The
report is written by :mod:`appdistill.bench.report`.

Example:
    >>> rows = run_bench(BenchOptions(configs=["configs/ml100k_committee.yaml"], out="bench/",
    ...                               methods=["none", "kd"], seeds=[0, 1, 2]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appdistill.bench.variants import ADDITIONS, BEST, DEFAULT, GROUPS, VARIANTS, grid_points, ordered
from appdistill.config import ExperimentConfig, config_from_dict, load_config, resolved_kwargs
from appdistill.errors import AppDistillError, ConfigError
from appdistill.eval.metrics import auc
from appdistill.eval.segments import sample_oracle, segment_metrics, segment_oracle, split_buckets
from appdistill.features.content import content_features
from appdistill.features.dataset import Dataset
from appdistill.io import atomic_write_text, json_digest
from appdistill.pipeline import fit_committee
from appdistill.teachers.fit import teacher_class


@dataclass
class BenchOptions:
    """Args:
        configs: experiment config paths (each is benchmarked on its own data).
        out: output directory (``OUT/<config name>/``: runs, teachers, report).
        methods: variant names (:data:`~appdistill.bench.variants.VARIANTS`).
        splits: ``split.by`` values to run (default: the spec's own split).
        seeds: student seeds; with ``vary_data`` also the split and teacher seeds.
        budget: settings per method taken from its grid (``None``: the whole grid); ``tune=False``
            runs every method with the config's / class defaults instead.
        overrides: ``--set`` overrides applied to every config.
    """

    configs: list[str]
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT))
    splits: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    vary_data: bool = False
    budget: int | None = None
    tune: bool = True
    overrides: list[str] = field(default_factory=list)
    progress: bool = True


def check_options(o: BenchOptions) -> None:
    """Refuse bad options before any data is read (exit 2 through the CLI)."""
    unknown = [m for m in o.methods if m not in VARIANTS]
    if unknown:
        raise ConfigError(f"bench: unknown method(s) {unknown}; known: {', '.join(VARIANTS)}; "
                          f"groups: {', '.join(GROUPS)}")
    if not o.seeds:
        raise ConfigError("bench: --seeds needs at least one seed")
    if len(set(o.seeds)) != len(o.seeds):
        raise ConfigError(f"bench: --seeds has duplicates: {o.seeds}")
    if o.budget is not None and o.budget < 1:
        raise ConfigError(f"bench: --budget must be >= 1, got {o.budget}")
    # each config's report, teachers and runs live in OUT/<file stem>: two configs of one stem (a/config.yaml,
    # b/config.yaml) would share that folder, the second report overwriting the first
    stems: dict[str, str] = {}
    for c in o.configs:
        other = stems.setdefault(Path(c).stem, c)
        if other != c:
            raise ConfigError(f"bench: configs '{other}' and '{c}' have the same file name, so their results would "
                              f"share '{Path(o.out) / Path(c).stem}'; rename one, or bench them with separate --out")
    if len(set(o.configs)) != len(o.configs):
        raise ConfigError(f"bench: a config is given twice: {o.configs}")
    for c in o.configs:
        load_config(c, o.overrides)  # a bad config fails here, in seconds


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _hash(obj: Any) -> str:
    return json_digest(obj, 10)


def _say(msg: str) -> None:
    print(msg, flush=True)  # one line per run, on a terminal or redirected: a bench takes long


class ConfigBench:
    """The benchmark of one config: fits, tunes, runs and collects rows (see the module doc)."""

    def __init__(self, path: str, o: BenchOptions) -> None:
        self.path, self.o = path, o
        self.base = load_config(path, o.overrides)
        self.name = Path(path).stem
        self.dir = Path(o.out) / self.name
        self.rows: list[dict[str, Any]] = []
        self.choices: dict[str, dict[str, Any]] = {}
        self.teachers: dict[str, dict[str, Any]] = {}
        self.bounds: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}

    # ------------------------------------------------------------------ configs
    def split_config(self, split: str, data_seed: int | None) -> ExperimentConfig:
        ov = [f"split.by={split}"]
        if data_seed is not None:
            ov.append(f"split.seed={data_seed}")
            ov += [f"teachers.{n}.kwargs.seed={data_seed}" for n in self.base.teachers]
        return load_config(self.path, [*self.o.overrides, *ov])

    def run_config(self, cfg: ExperimentConfig, name: str, setting: dict[str, Any], seed: int,
                   best: str | None, tdir: Path) -> ExperimentConfig:
        """The config of one run: the variant's method (the config's kwargs only when it is the
        config's own method), its committee subset, its additions (:data:`ADDITIONS`: on only where
        its name says so), the grid setting, the student seed."""
        v = VARIANTS[name]
        raw = cfg.model_dump()
        kwargs = dict(cfg.method.kwargs) if v.key == cfg.method.key else {}
        kwargs.update({k: (best if val == BEST else val) for k, val in v.kwargs.items()})
        if v.teachers:
            kinds = {n: teacher_class(b.key, context=f"teachers.{n}.key").kind for n, b in cfg.teachers.items()}
            keep = [n for n, k in kinds.items() if k == v.teachers]
            if not keep:
                raise ConfigError(f"the committee has no {v.teachers} teacher")
            if len(keep) == len(kinds):
                raise ConfigError(f"every teacher of the committee is {v.teachers}: same as {v.follows}")
            kwargs["teachers"] = keep
        for k, val in {**ADDITIONS, **v.config, **setting}.items():
            if "." in k:
                _set(raw, k, val)
            else:
                kwargs[k] = val
        raw["method"] = {"key": v.key, "kwargs": kwargs}
        raw["seed"] = seed
        raw["teachers_dir"] = str(tdir.resolve())
        out = config_from_dict(raw, source=self.path)
        if out.student.content.enabled:  # e.g. `+content` on a table without text: not run, with the reason
            content_features(list(out.student.content.features), out.load_spec())
        return out

    # ------------------------------------------------------------------ one run
    def train_one(self, cfg: ExperimentConfig, ds: Dataset, tdir: Path, label: str) -> dict[str, Any]:
        from appdistill.pipeline import train

        # the resolved kwargs too: a method's changed default must not reuse runs made with the old one
        ident = {"config": cfg.stable_dump(), "resolved": resolved_kwargs(cfg), "data": ds.fingerprint}
        run = tdir / "runs" / f"{cfg.method.key}-{_hash(ident)}" / f"seed{cfg.seed}"
        if (run / "metrics.json").is_file():
            return json.loads((run / "metrics.json").read_text())
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "bench.json", json.dumps(ident, indent=1, default=str))
        t0 = time.perf_counter()
        m = train(cfg, run, dataset=ds, progress=False, resume=True)
        _say(f"  {label:<44} valid AUC {m['valid']['auc']:.4f}  test AUC {m['test']['auc']:.4f}  "
                     f"(best epoch {m['train']['best_epoch']}, {time.perf_counter() - t0:.0f} s)")
        return m

    # ------------------------------------------------------------------ a split
    def run(self) -> None:
        splits = self.o.splits or [self.base.load_spec().split.by]
        for split in splits:
            for data_seed in (self.o.seeds if self.o.vary_data else [None]):
                self.run_split(split, data_seed)

    def run_split(self, split: str, data_seed: int | None) -> None:
        o = self.o
        tag = split if data_seed is None else f"{split}-data{data_seed}"
        cfg = self.split_config(split, data_seed)
        ds = Dataset.build(cfg.load_spec())
        tdir = self.dir / tag
        _say(f"[{self.name} / {tag}] {len(ds.splits['train']):,} train, {len(ds.splits['valid']):,} valid, "
                f"{len(ds.splits['test']):,} test rows; committee: {', '.join(cfg.teachers) or '(none)'}")
        tmetrics = fit_committee(cfg, tdir, ds=ds, progress=o.progress) if cfg.teachers else {}
        best = max(tmetrics, key=lambda n: tmetrics[n]["valid"]["auc"]) if tmetrics else None
        self.teachers[tag] = self.teacher_report(cfg, ds, tdir, best)
        seeds = [data_seed] if data_seed is not None else o.seeds
        choices: dict[str, Any] = {}
        for name in ordered(o.methods):
            v = VARIANTS[name]
            try:
                if v.key != "none" and not cfg.teachers:
                    raise ConfigError("the config has no teachers")
                setting, tuned = self.choose(cfg, ds, tdir, name, v, best, seeds[0], choices, tag)
            except AppDistillError as e:
                self.skipped[f"{tag}/{name}"] = str(e).splitlines()[0]
                _say(f"  {name}: not run ({self.skipped[f'{tag}/{name}']})")
                continue
            choices[name] = {"setting": setting, "tuned": tuned}
            for seed in seeds:
                m = self.train_one(self.run_config(cfg, name, setting, seed, best, tdir), ds, tdir,
                                   f"{name} seed {seed}")
                self.rows.append(self.row(tag, split, data_seed, name, seed, m, best, tmetrics, setting))
        self.choices[tag] = choices

    def choose(self, cfg: ExperimentConfig, ds: Dataset, tdir: Path, name: str, v: Any, best: str | None,
               seed: int, choices: dict[str, Any], tag: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The setting of ``name``: its grid's best on validation (seed ``seed``), or its master's."""
        if v.follows:
            if v.follows not in choices:
                raise ConfigError(f"{v.follows} (which it ablates) did not run")
            self.run_config(cfg, name, choices[v.follows]["setting"], seed, best, tdir)  # applicable?
            return choices[v.follows]["setting"], []
        points = grid_points(v.key, self.o.budget) if self.o.tune else [{}]
        tried = []
        for p in points:
            m = self.train_one(self.run_config(cfg, name, p, seed, best, tdir), ds, tdir,
                               f"{name} {json.dumps(p) if p else '(defaults)'} seed {seed}")
            tried.append({"setting": p, "valid_auc": m["valid"]["auc"]})
        pick = max(tried, key=lambda t: t["valid_auc"])  # first of equals: grids list defaults first
        return pick["setting"], tried

    # ------------------------------------------------------------------ records
    def teacher_report(self, cfg: ExperimentConfig, ds: Dataset, tdir: Path, best: str | None) -> dict[str, Any]:
        """Each teacher's valid/test AUC and test segments, and the two oracle bounds."""
        if not cfg.teachers:
            return {}
        from appdistill.teachers.fit import load_teacher

        va, te = ds.splits["valid"], ds.splits["test"]
        zs: dict[str, dict[str, np.ndarray]] = {"valid": {}, "test": {}}
        sizes: dict[str, dict[str, int]] = {}
        for n in cfg.teachers:
            t = load_teacher(tdir, n, ds.spec, ds)
            sizes[n] = t.size()
            for split, rows in (("valid", va), ("test", te)):
                zs[split][n] = t.predict_all(ds, rows).logits.double().numpy()
        bv, bt = split_buckets(ds, va), split_buckets(ds, te)
        out: dict[str, Any] = {"best": best, "members": {}}
        for n in cfg.teachers:
            out["members"][n] = {"valid_auc": auc(zs["valid"][n], ds.labels[va]),
                                 "test_auc": auc(zs["test"][n], ds.labels[te]), "size": sizes[n],
                                 "segments": {k: segment_metrics(zs["test"][n], ds.labels[te], b)
                                              for k, b in bt.items()}}
        items_v, items_t = bv.get("items"), bt.get("items")
        out["segment_oracle"] = (segment_oracle(zs["valid"], ds.labels[va], items_v, zs["test"], ds.labels[te], items_t)
                                 if items_t is not None else None)
        out["sample_oracle"] = sample_oracle(zs["test"], ds.labels[te], items_t)
        out["stack"] = _stack_target(zs, ds, list(cfg.teachers), items_t)
        from appdistill.eval.segments import segmenters

        out["segment_edges"] = {k: (s.edges() if s.reason is None else s.reason) for k, s in segmenters(ds).items()}
        return out

    def row(self, tag: str, split: str, data_seed: int | None, name: str, seed: int, m: dict[str, Any],
            best: str | None, tmetrics: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
        t = m["test"]
        r: dict[str, Any] = {
            "config": self.name, "split": tag, "split_by": split, "data_seed": data_seed, "method": name,
            "seed": seed, "auc": t["auc"], "valid_auc": m["valid"]["auc"], "logloss": t["logloss"],
            "gauc": t.get("gauc"), "ndcg@10": t.get("ndcg@10"),
            # on a one-row-per-entity table every test row is cold: the figure would repeat test AUC
            "cold_auc": t["cold"]["auc"] if t.get("cold", {}).get("n") and t["cold"].get("share", 0) < 1 else None,
            "best_epoch": m["train"]["best_epoch"], "epochs": m["train"]["epochs"],
            "train_seconds": m["train"]["seconds"], "skipped": m["train"]["teacher_passes_skipped"],
            "student_params": m["student"]["params"], "setting": json.dumps(setting, sort_keys=True),
            "ref_teacher": best, "ref_teacher_auc": tmetrics[best]["test"]["auc"] if best else None,
        }
        if m.get("routing"):
            r["routing"] = json.dumps(m["routing"], sort_keys=True)
        for kind, segs in (t.get("segments") or {}).items():
            for b, s in segs.items():
                r[f"{kind}_{b}_auc"] = s["auc"]
        return r


def run_bench(o: BenchOptions) -> list[dict[str, Any]]:
    """Run every config of ``o`` and write its report; returns the report dicts (one per config)."""
    from appdistill.bench.report import write_report

    check_options(o)
    reports = []
    for path in o.configs:
        b = ConfigBench(path, o)
        b.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        b.run()
        reports.append(write_report(b, time.perf_counter() - t0))
        _say(f"report: {b.dir / 'results.md'}")
    return reports


def _stack_target(zs: dict[str, dict[str, np.ndarray]], ds: Dataset, names: list[str],
                  items: np.ndarray | None) -> dict[str, Any]:
    """DiverseDistill's target, the committee's held-out stack (fitted on validation), scored on test:
    where it is no better than the best teacher, DiverseDistill and single-teacher KD distil nearly
    the same function, and a tie between them is what to expect."""
    from appdistill.methods.stack import HeldOut, SegmentStack

    te = ds.splits["test"]
    stack = SegmentStack.fit(HeldOut.of(ds, zs["valid"]), names, ds.train_counts("items"))
    z = stack.score(zs["test"], ds.item_ids[te])
    avg = np.mean([zs["test"][n] for n in names], 0)
    out: dict[str, Any] = {"auc": auc(z, ds.labels[te]), "average_auc": auc(avg, ds.labels[te]),
                           "weights": stack.describe()}
    if items is not None:
        out["segments"] = segment_metrics(z, ds.labels[te], items)
    return out
