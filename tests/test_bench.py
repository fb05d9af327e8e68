"""``appdistill bench`` end to end on a tiny text-free config (LightGBM + DLRM committee).

Checks what a user relies on: every method tuned with the same budget on validation only (the
chosen setting is the grid's best validation AUC), teachers fitted once per split, a report named
after the config with tables and plots, ablations that do not apply are reported (not a
traceback), and a second invocation reuses every finished run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from appdistill.cli import main

SPEC = {
    "name": "tinysyn",
    "source": {"key": "synthetic", "kwargs": {"n_users": 300, "n_items": 150, "n_interactions": 5000, "seed": 1}},
    "tables": {"interactions": {"key": ["user_id", "item_id"], "label": {"column": "click"}, "time_column": "timestamp"},
               "items": {"key": "item_id"}, "users": {"key": "user_id"}},
    "features": [{"name": "user_id", "kind": "sparse_id", "table": "interactions", "dim": 8},
                 {"name": "item_id", "kind": "sparse_id", "table": "interactions", "dim": 8},
                 {"name": "genres", "kind": "id_list", "table": "items", "separator": "|", "dim": 8},
                 {"name": "year", "kind": "dense", "table": "items"},
                 {"name": "age", "kind": "dense", "table": "users"}],
    "visibility": {"student": ["user_id", "item_id", "genres", "year", "age"]},
    "split": {"by": "random", "valid": 0.1, "test": 0.1, "seed": 0},
}
CONFIG = {
    "name": "tinybench", "spec": "spec.yaml", "student": {"dense_arch": [8], "over_arch": [16]},
    "method": {"key": "diverse_distill", "kwargs": {}},
    "train": {"epochs": 2, "batch_size": 256, "prefetch": 0},
    "teachers": {"lightgbm": {"key": "lightgbm", "kwargs": {"num_leaves": 15, "num_boost_round": 30, "n_jobs": 1}},
                 "dlrm": {"key": "dlrm", "kwargs": {"embedding_dim": 8, "dense_arch": [8], "over_arch": [16],
                                                    "epochs": 2}}},
}
METHODS = ["none", "kd", "diverse_distill", "dd_committee", "kd+transfer", "dd_no_stack", "dd_foundation_only"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cfg = tmp / "my_table.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    args = ["bench", str(cfg), "--out", str(tmp / "out"), "--methods", *METHODS, "--seeds", "0", "1",
            "--budget", "2", "--no-progress"]
    assert main(args) == 0
    return tmp, tmp / "out" / "my_table", args


def test_report_is_named_after_the_config_and_complete(bench) -> None:
    _, out, _ = bench
    for f in ("results.md", "results.csv", "results.json", "auc_per_method.png", "gap_recovered.png",
              "segments.png"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert md.startswith("# Benchmark: my_table (spec `tinysyn`)")
    assert "Tuning budget: each method tried [2] setting(s)" in md
    assert "Best teacher's lead over the best-epoch plain student" in md
    assert "segment oracle" in md and "per-sample oracle" in md and "Upper bounds" in md
    assert re.search(r"DiverseDistill's target, the committee's held-out stack: test AUC 0\.\d{4} \([+-]0\.\d{4} over "
                     r"the best teacher on test, `\w+`; [+-]0\.\d{4} over the committee's average logit, 0\.\d{4}\)", md)
    assert "| held-out stack (DiverseDistill's target) | 0." in md
    assert re.search(r"Student parameters: [\d,]+; teachers: .*`dlrm` [\d,]+ parameters \(\d+x the student\)", md)
    assert re.search(r"`lightgbm` \d+ trees, [\d,]+ leaves", md)
    assert "Test AUC per item segment" in md
    assert re.search(r"\| AUC std\. error of the test rows \| ±0\.\d{4}", md)
    assert "dd_foundation_only`: the committee has no foundation teacher" in md  # reported, not a traceback
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in METHODS[:6] for s in (0, 1)}
    assert all(r["best_epoch"] >= 1 for r in rows)


def test_each_method_is_tuned_on_validation_with_the_same_budget(bench) -> None:
    _, out, _ = bench
    res = json.loads((out / "results.json").read_text())
    choices = res["choices"]["random"]
    for name in ("none", "kd", "diverse_distill"):
        tried = choices[name]["tuned"]
        assert len(tried) == 2, name
        best = max(tried, key=lambda t: t["valid_auc"])
        assert choices[name]["setting"] == best["setting"], name
    assert choices["dd_committee"]["setting"] == choices["diverse_distill"]["setting"]
    assert choices["dd_committee"]["tuned"] == []
    assert choices["kd+transfer"]["setting"] == choices["kd"]["setting"]
    # the held-out stack (the default): the loop hands DiverseDistill the committee's cached validation
    # outputs, and the routing report shows the stack's weights; the committee path's gate modulates them
    for name in ("diverse_distill", "dd_committee", "dd_no_stack"):
        rows = [r for r in res["rows"] if r["method"] == name]
        assert len(rows) == 2 and all(0.5 < r["auc"] < 1 for r in rows), name
    assert all(r["skipped"] == 0 for r in res["rows"] if r["method"] == "diverse_distill")
    assert any(r["skipped"] > 0 for r in res["rows"] if r["method"] == "dd_committee")  # top-k skips answers
    # seed 0's reported run is the chosen tuning run itself (same validation AUC)
    row = next(r for r in res["rows"] if r["method"] == "kd" and r["seed"] == 0)
    assert row["valid_auc"] == max(t["valid_auc"] for t in choices["kd"]["tuned"])


def test_teachers_are_fitted_once_and_a_rerun_reuses_every_run(bench, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, out, args = bench
    fitted = sorted(p.name for p in (out / "random" / "teachers").iterdir())
    assert fitted == ["dlrm", "lightgbm"]
    runs = sorted((out / "random" / "runs").glob("*/seed*/metrics.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    before = json.loads((out / "results.json").read_text())["rows"]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "valid AUC" not in printed  # nothing trained again
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == before


def test_bad_options_exit_2_before_any_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["bench", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--methods", "kdd"]) == 2
    assert "unknown method(s) ['kdd']" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_two_configs_of_one_file_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Results go to OUT/<file stem>: a/config.yaml and b/config.yaml would share one folder, the second
    report silently replacing the first."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "spec.yaml").write_text(yaml.safe_dump(SPEC))
        (tmp_path / d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    a, b = str(tmp_path / "a" / "config.yaml"), str(tmp_path / "b" / "config.yaml")
    assert main(["bench", a, b, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"configs '{a}' and '{b}' have the same file name" in err and "Traceback" not in err, err
    assert main(["bench", a, a, "--out", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_set_teacher_null_drops_a_committee_member() -> None:
    from appdistill.config import REPO_ROOT, load_config

    cfg = load_config(REPO_ROOT / "configs/ml100k_committee.yaml", ["teachers.foundation=null"])
    assert sorted(cfg.teachers) == ["dlrm", "lightgbm"]


def test_config_values_and_kwargs_are_typed_and_checked_before_data(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Every config value has a type and range; method and teacher kwargs are checked by name,
    type and range when the config loads; `validate CONFIG` checks the whole config."""
    from appdistill.config import REPO_ROOT, load_config
    from appdistill.errors import ConfigError

    committee = REPO_ROOT / "configs/ml100k_committee.yaml"
    bad = {"train.epochs=-3": "train.epochs", "train.batch_size=0": "train.batch_size",
           "train.lr=.nan": "train.lr", "train.lr=-1": "train.lr", "student.over_arch=[-4]": "student.over_arch",
           "method.kwargs.lamda_t=1": "method.kwargs.lamda_t: unknown key",
           "method.kwargs.committee_path.top_k=0": "method.kwargs.committee_path.top_k",
           "method.kwargs.committee_path.tau=-1": "method.kwargs.committee_path.tau",
           "method.kwargs.committee_every=2": "method.kwargs.committee_every: moved to committee_path.every",
           "method.kwargs.kd_weights=soft": "method.kwargs.kd_weights: 'soft' weighs the teachers by the committee",
           "teachers.lightgbm.kwargs.num_leavs=3": "teachers.lightgbm.kwargs.num_leavs: unknown key",
           "teachers.dlrm.kwargs.dropout=1.5": "teachers.dlrm.kwargs.dropout"}
    for ov, where in bad.items():
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            load_config(committee, [ov])
    # switching the method starts from its defaults (DiverseDistill's kwargs are not carried over)
    assert load_config(committee, ["method.key=kd"]).method.kwargs == {}
    assert load_config(committee, ["method.key=kd", "method.kwargs.alpha=0.7"]).method.kwargs == {"alpha": 0.7}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(committee.read_text().replace("lambda_t: 4.0", "lamda_t: 4.0")
                   .replace("../feature_specs/ml100k.yaml", str(REPO_ROOT / "feature_specs/ml100k.yaml")))
    assert main(["validate", str(cfg)]) == 2
    assert "method.kwargs.lamda_t: unknown key" in capsys.readouterr().err
    # validate takes the overrides train and distill take, and checks the config they produce
    assert main(["validate", str(cfg), "--set", "method.key=kd", "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "method=kd" in out and f"({REPO_ROOT / 'feature_specs/ml100k.yaml'}): OK" in out  # the spec's file
    assert main(["validate", str(cfg), "--set", "method.key=kd", "--set", "method.kwargs.alpa=1"]) == 2
    assert "method.kwargs.alpa: unknown key" in capsys.readouterr().err


def test_runs_are_keyed_by_the_resolved_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default that changes between releases changes the run key, so bench never reuses a run made
    with the old default (the config as written would be the same)."""
    from appdistill.config import REPO_ROOT, load_config, resolved_kwargs
    from appdistill.methods.kd import KD

    cfg = load_config(REPO_ROOT / "configs/ml100k_committee.yaml", ["method.key=kd"])
    before = resolved_kwargs(cfg)
    assert cfg.method.kwargs == {} and "alpha" in before["method"]  # defaults filled in
    assert before["teachers"]["lightgbm"]["num_leaves"] == 63
    defaults = list(KD.__init__.__defaults__)
    monkeypatch.setattr(KD.__init__, "__defaults__", tuple(0.123 if d == before["method"]["alpha"] else d
                                                          for d in defaults))
    from appdistill.registry import kwargs_model

    kwargs_model(KD)  # cached per class: make sure there is one for monkeypatch to put back afterwards
    monkeypatch.delattr(KD, "_kwargs_model")
    assert resolved_kwargs(cfg)["method"]["alpha"] == 0.123 and resolved_kwargs(cfg) != before


def test_sub_committee_content_variants_share_diverse_distills_setting() -> None:
    from appdistill.bench.variants import VARIANTS, ordered

    for kind in ("foundation", "complementary"):
        v = VARIANTS[f"dd_{kind}_only+content"]
        assert (v.key, v.teachers, v.follows) == ("diverse_distill", kind, "diverse_distill")
        assert v.config == {"student.content.enabled": True}
    assert ordered(["dd_foundation_only+content"]) == ["diverse_distill", "dd_foundation_only+content"]


def test_content_transfer_variants_follow_their_method_up_the_whole_chain() -> None:
    from appdistill.bench.variants import VARIANTS, ordered

    v = VARIANTS["dd_committee+content+transfer"]
    assert v.kwargs == VARIANTS["dd_committee"].kwargs and v.follows == "dd_committee"
    assert v.config == {"student.content.enabled": True, "transfer.enabled": True}
    assert VARIANTS["dd_foundation_only+content+transfer"].teachers == "foundation"
    # an ablation of an ablation: every variant it follows runs first, once
    assert ordered(["dd_committee+content+transfer", "kd+content+transfer", "diverse_distill"]) == [
        "diverse_distill", "dd_committee", "dd_committee+content+transfer", "kd", "kd+content+transfer"]


def test_report_compares_diverse_distill_with_each_baseline_under_the_same_additions() -> None:
    import pandas as pd

    from appdistill.bench.report import against_baselines

    rows = [(m, s, a) for m, base in (("none", 0.70), ("kd", 0.71), ("avg_kd", 0.7195), ("diverse_distill", 0.72),
                                      ("kd+transfer", 0.73), ("diverse_distill+transfer", 0.725))
            for s, a in enumerate((base - 0.001, base, base + 0.001))]
    lines = against_baselines(pd.DataFrame(rows, columns=["method", "seed", "auc"]))
    assert "- `diverse_distill` against `kd` +0.0100 (better); `avg_kd` +0.0005 (tie)" in lines
    assert "- `diverse_distill+transfer` against `kd+transfer` -0.0050 (worse)" in lines
    assert against_baselines(pd.DataFrame(rows[:6], columns=["method", "seed", "auc"])) == []  # no DD: no block


def test_a_single_seed_has_no_std_and_no_verdict() -> None:
    """One seed gives no spread: the report must not print "± 0.0000" and call a 0.0006 difference
    "worse" (a std of 0 made every difference beyond noise)."""
    import math

    import pandas as pd

    from appdistill.bench.report import _fmt, _ms, against_baselines, summary, verdict

    df = pd.DataFrame([("none", 0, 0.7605, 0.7485), ("kd", 0, 0.7514, 0.7382), ("diverse_distill", 0, 0.7599, 0.7457)],
                      columns=["method", "seed", "auc", "valid_auc"]).assign(split="time", gap_recovered=math.nan)
    m, s = _ms(df[df.method == "kd"].auc)
    assert m == 0.7514 and math.isnan(s) and _fmt(m, s) == "0.7514"
    assert verdict(df, "diverse_distill") == "-0.0006 (one seed: no std)"
    assert against_baselines(df)[-1] == "- `diverse_distill` against `kd` +0.0085 (one seed: no std)"
    assert all(math.isnan(r["auc_std"]) and r["vs_plain"] in ("", "-0.0091 (one seed: no std)",
                                                              "-0.0006 (one seed: no std)") for r in summary(df))
    two = pd.concat([df, df.assign(seed=1, auc=df.auc + 0.002)])  # two seeds: a std, and verdicts again
    assert verdict(two, "kd") == "-0.0091 (worse)"


def test_methods_groups_expand_once_each() -> None:
    from appdistill.bench.variants import DEFAULT, VARIANTS, expand

    assert expand(None) == DEFAULT and expand(["all"]) == list(VARIANTS)
    got = expand(["additions", "dd_committee", "kd"])
    assert got[:6] == ["none", "none+content", "kd", "avg_kd", "taid", "diverse_distill"]
    assert "diverse_distill+content+transfer" in got and "taid+transfer" in got
    assert got[-1] == "dd_committee" and len(got) == len(set(got)) and all(m in VARIANTS for m in got)


def test_variants_switch_the_additions_their_names_say_whatever_the_config(tmp_path: Path) -> None:
    """A config that trains with a transfer set and a content table (as the shipped regime configs do)
    still benchmarks `none` as the student alone and `kd` as KD alone; `+transfer` / `+content` add them."""
    from appdistill.bench.runner import BenchOptions, ConfigBench
    from appdistill.config import REPO_ROOT

    cfg = str(REPO_ROOT / "configs/ml100k_committee.yaml")
    b = ConfigBench(cfg, BenchOptions([cfg], str(tmp_path), overrides=[
        "transfer.enabled=true", "student.content.enabled=true", "transfer.ratio=2"]))
    assert b.base.transfer.enabled and b.base.student.content.enabled
    base = b.split_config("random", None)
    on = {}
    for name in ("none", "kd", "diverse_distill", "diverse_distill+transfer", "none+content",
                 "kd+content+transfer"):
        c = b.run_config(base, name, {}, 0, "dlrm", tmp_path)
        on[name] = (c.transfer.enabled, c.student.content.enabled)
        assert c.transfer.ratio == 2  # the config's other transfer and content settings stay
    assert on == {"none": (False, False), "kd": (False, False), "diverse_distill": (False, False),
                  "diverse_distill+transfer": (True, False), "none+content": (False, True),
                  "kd+content+transfer": (True, True)}


def test_report_says_when_the_config_trains_with_additions_no_variant_has(tmp_path: Path) -> None:
    import pandas as pd

    from appdistill.bench.report import markdown
    from appdistill.bench.runner import BenchOptions, ConfigBench
    from appdistill.config import REPO_ROOT

    cfg = str(REPO_ROOT / "configs/ml100k_committee.yaml")  # trains with a transfer set and a content table
    empty = pd.DataFrame(columns=["split", "method", "seed", "auc", "valid_auc", "gap_recovered"])
    plain = markdown(ConfigBench(cfg, BenchOptions([cfg], str(tmp_path), methods=["none", "kd"])), empty, 60.0)
    assert "The config trains with a transfer set and a content table; every method here ran without them" in plain
    both = markdown(ConfigBench(cfg, BenchOptions([cfg], str(tmp_path), methods=["none", "kd+content+transfer"])),
                    empty, 60.0)
    assert "The config trains with" not in both
