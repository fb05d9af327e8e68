"""Smoke runs of the documented benchmarks (``benchmarks/bench_*.py``) at tiny sizes.

Each test runs a benchmark's own ``main`` (the path ``python benchmarks/bench_X.py --out DIR`` takes)
on a small synthetic data set with few rows / steps / rounds, and checks that it writes its
``results.json`` and ``results.md`` with sane values: a change that breaks a documented benchmark
fails here instead of on the next person who runs it. The figures themselves are meaningless at
these sizes; only their presence, sign and internal consistency are checked.

``bench_methods.py`` has no smoke run here yet (it is being rewritten).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from tests.test_teachers import SMALL_DLRM, SMALL_LGB
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parent.parent

# the foundation teacher of the smoke runs: one hidden tap, a small net, two epochs
SMALL_FOUNDATION = {"layers": [3], "d_a": 16, "id_dim": 8, "head": [8], "epochs": 2, "batch_size": 512,
                    "patience": 1, "feat_dropout": 0.3}


def load_bench(name: str) -> ModuleType:
    """The benchmark script ``benchmarks/<name>.py`` as a module (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_config(tmp_path: Path, **overrides: Any) -> Path:
    """``tests.test_train.tiny_config`` on a smaller synthetic set (fewer users: per-user metrics
    dominate evaluation at this size) whose foundation teacher sees ids, an id list and dense features
    beside the item text (no image: CLIP weights are not installed)."""
    cfg = tiny_config(tmp_path, **overrides)
    spec = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    spec["source"]["kwargs"].update(n_users=60, n_items=100, n_interactions=6000)
    spec["visibility"]["foundation"] = ["user_id", "item_id", "genres", "year", "age", "country", "text"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return cfg


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Foundation stores under tmp_path (never the user's cache), and torch's thread count restored
    (the benchmarks set it for their timings)."""
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def written(out: Path, returned: dict[str, Any]) -> dict[str, Any]:
    """The ``results.json`` the run wrote (it must be what ``main`` returned), after checking that
    ``results.md`` is there too."""
    assert (out / "results.md").read_text().strip(), "results.md is empty"
    disk = json.loads((out / "results.json").read_text())
    assert disk == json.loads(json.dumps(returned))
    return disk


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_serving(tmp_path: Path) -> None:
    """Trains the student, fits the foundation teacher (ids, genres list, dense and text) and times
    both; the teacher's encoding path must score as its ``predict`` does."""
    cfg = bench_config(tmp_path, teachers={"foundation": {"key": "foundation", "kwargs": SMALL_FOUNDATION}})
    out = tmp_path / "bs"
    ret = load_bench("bench_serving").main([
        "--out", str(out), "--config", str(cfg), "--teacher-config", str(cfg), "--epochs", "1",
        "--rounds", "1", "--batch", "256", "--batch1-rows", "3", "--encode-batches", "1"])
    res = written(out, ret)
    assert res["batch"] == 256 and res["threads"] == 1
    assert set(res["timings"]) == {"student_score_256", "student_program_256", "student_eager_256",
                                   "teacher_precomputed_256", "teacher_encoding_256", "student_score_1",
                                   "student_program_1", "teacher_precomputed_1", "teacher_encoding_1"}
    for k, s in res["timings"].items():
        assert s["calls"] > 0 and s["batch"] == (1 if k.endswith("_1") else 256), k
        assert positive(s["rows_per_s"]) and s["p50_ms"] <= s["p99_ms"], (k, s)
    assert positive(res["ratio"]) and positive(res["ratio_vs_teacher_precomputed"])
    # the export scores the raw rows as the trained run did; the teacher learnt something
    assert res["auc_abs_diff"] < 1e-6 and 0.5 < res["run_test_auc"] <= 1.0
    assert 0.5 < res["teacher_test_auc"] <= 1.0
    # encoding the items on the fly gives the stored (float16) features' logits
    assert res["teacher_encoding_path_max_abs_logit_diff"] < 1e-3
    assert res["teacher_layers"] == ["text:final", "text:layer3"]
    assert "| **ratio at batch 256**" in (out / "results.md").read_text()


def test_bench_student(tmp_path: Path) -> None:
    out = tmp_path / "bst"
    ret = load_bench("bench_student").main(["--out", str(out), "--config", str(bench_config(tmp_path)),
                                            "--epochs", "1", "--repeats", "1"])
    res = written(out, ret)
    assert len(res["all_appdistill"]) == len(res["all_reference"]) == len(res["pair_ratios"]) == 1
    assert all(positive(x) for x in res["all_appdistill"] + res["all_reference"])
    assert positive(res["ratio"]) and positive(res["ratio_best_of"])
    assert (out / "run0" / "metrics.json").is_file()  # train() really ran, once per pair


def test_bench_step(tmp_path: Path) -> None:
    """Fits the three-teacher committee, times every method's step, and runs the gating check for one seed."""
    # LightGBM without text: its text embeddings would be a second MiniLM pass, not part of the step
    teachers = {"lightgbm": {"key": "lightgbm", "kwargs": {**SMALL_LGB, "use_text": False}},
                "dlrm": {"key": "dlrm", "kwargs": SMALL_DLRM},
                "foundation": {"key": "foundation", "kwargs": {**SMALL_FOUNDATION, "epochs": 1}}}
    cfg = bench_config(tmp_path, teachers=teachers, train={"epochs": 1},
                       method={"key": "diverse_distill",
                                                 "kwargs": {"committee_path": {"top_k": 2, "every": 2}}})
    out = tmp_path / "bstep"
    ret = load_bench("bench_step").main(["--out", str(out), "--config", str(cfg), "--rounds", "2",
                                         "--round-steps", "2", "--gating-seeds", "0"])
    res = written(out, ret)
    assert sorted(res["teachers"]) == ["dlrm", "foundation", "lightgbm"]
    methods = {"none", "kd", "avg_kd", "taid", "talking", "diverse_distill", "dd_committee"}
    assert set(res["step_ms"]) == set(res["ratio_to_plain"]) == methods
    assert all(positive(v) for v in res["step_ms"].values()) and res["ratio_to_plain"]["none"] == 1.0
    g = res["gating"]
    assert g["seeds"] == [0] and 0.0 < g["skipped"] < 1.0  # top-2 of 3 teachers skips some answers
    assert 0.5 < g["valid_auc_gated"] <= 1.0 and 0.5 < g["valid_auc_ungated"] <= 1.0
    # with a transfer set: batches mix unlabelled rows in, every method still steps on them
    out2 = tmp_path / "bstep2"
    res2 = written(out2, load_bench("bench_step").main([
        "--out", str(out2), "--config", str(cfg), "--teachers-dir", str(out), "--rounds", "2", "--round-steps", "2",
        "--no-gating-check", "--transfer"]))
    assert res2["transfer"] and 0.2 < res2["transfer_share"] < 0.8
    assert set(res2["step_ms"]) == methods and all(positive(v) for v in res2["step_ms"].values())
    # bench_targets on the same fitted committee (no refit): every candidate target scored on test
    out3 = tmp_path / "targets"
    assert load_bench("bench_targets").main([str(cfg), "--run-dir", str(out), "--out", str(out3)]) == 0
    res3 = json.loads((out3 / "results.json").read_text())
    t = res3["targets"]
    assert {"teacher `dlrm`", "committee average (logits)", "held-out stack (DiverseDistill's target)",
            "feature-weighted linear stacking", "LightGBM stacker"} <= set(t)
    assert all(0.0 <= r["test_auc"] <= 1.0 and r["test_logloss"] > 0 for r in t.values())
    assert res3["best_on_valid"] in res3["teachers"] and set(res3["stack"]) <= {"cold", "tail", "torso", "head", "all"}
    assert "| held-out stack (DiverseDistill's target) | 0." in (out3 / "results.md").read_text()


def test_bench_cache(tmp_path: Path) -> None:
    out = tmp_path / "bcache"
    ret = load_bench("bench_cache").main(["--out", str(out), "--config", str(bench_config(tmp_path)),
                                          "--repeats", "2", "--batch-size", "512", "--train-epochs", "1"])
    res = written(out, ret)
    assert res["dataset"] == "synthetic" and res["rows"] == 4800  # the 80% training split
    variants = {"plain", "join_split", "join_nosplit", "join_split_noupcast"}
    assert set(res["rows_per_s"]) == variants and all(positive(v) for v in res["rows_per_s"].values())
    assert res["teachers"]["fake_leaves"] == {"leaves": [300]}
    assert all(positive(v) for v in res["cache_mb"].values())
    assert set(res["training"]["samples_per_s"]) == {"plain", "join_split"}
    assert all(positive(v) for v in res["training"]["samples_per_s"].values())


def test_bench_store(tmp_path: Path) -> None:
    """The ML-100K item texts (the benchmark's own data, read from the installed wheel), first 32 only."""
    out = tmp_path / "bstore"
    ret = load_bench("bench_store").main(["--out", str(out), "--limit", "32", "--repeats", "1", "--chunks", "2",
                                          "--rounds", "1", "--batch-size", "16"])
    res = written(out, ret)
    assert res["items"] == 32 and len(res["paired"]["pair_ratios"]) == 2
    assert positive(res["ratio_store_over_direct"]) and positive(res["direct_encode"]["items_per_s"])
    assert res["max_abs_diff_vs_direct"] < 1e-2  # float16 storage of unit-norm embeddings
    # an unchanged catalogue encodes nothing (and never loads the model); 10 edits encode 10
    assert res["second_build"] == {**res["second_build"], "encoded": 0, "model_loaded": False}
    assert res["incremental_10_edits"]["encoded"] == 10 and res["incremental_10_edits"]["reused"] == 22
    assert not (out / "scratch").exists()


# ------------------------------------------------------------------------------------- bench_scale
def test_bench_scale_report_states_growth_per_stage(tmp_path: Path) -> None:
    mod = load_bench("bench_scale")

    def fake(rows: int, k: float) -> dict[str, Any]:
        return {"rows": rows, "train_rows": rows * 8 // 10, "test_auc": 0.7, "samples_per_s": 1000.0,
                "teachers": {}, "budget": {"epochs": 1, "lightgbm_rounds": 200, "overrides": []},
                "stages": {s: {"seconds": k * (i + 1), "peak_rss_gb": 0.5 * k, "disk_gb": 0.1 * k}
                           for i, s in enumerate(mod.STAGES)}}

    md = mod.report([fake(10_000_000, 9.0), fake(1_000_000, 1.0)], tmp_path)  # any order in
    assert "| stage | 1,000,000 rows" in md and "| train | 8.0 / 0.50 / 0.10 | 72.0 / 4.50 / 0.90 | 9.0x |" in md
    small = fake(1_000_000, 1.0)
    small["stages"]["train"]["peak_private_gb"] = 0.25  # private memory, when measured, in parentheses
    (tmp_path / "one").mkdir()
    assert "| train | 8.0 / 0.50 (0.25) / 0.10 |" in mod.report([small], tmp_path / "one")
    assert "rows x10" in md and (tmp_path / "results.json").is_file() and (tmp_path / "scale.png").is_file()
    assert [r["rows"] for r in json.loads((tmp_path / "results.json").read_text())] == [1_000_000, 10_000_000]


def test_bench_scale_repeats_report_the_median_and_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_bench("bench_scale")
    runs = [{"rows": 1000, "budget": {}, "stages": {"data": {"seconds": s, "peak_rss_gb": m, "disk_gb": 0.0}}}
            for s, m in ((3.0, 0.2), (1.0, 0.4), (2.0, 0.3))]
    merged = mod.merge_repeats(runs)
    assert merged["stages"]["data"]["seconds"] == 2.0 and merged["stages"]["data"]["peak_rss_gb"] == 0.4
    md = mod.report([merged], tmp_path)
    assert "| data | 2.0 [1.0-3.0] / 0.40 / 0.00 |" in md and "median of 3 interleaved runs" in md
    # --until data: the generator alone, through the spec's source, as the full run's first stage
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "store"))
    res = mod.run_one(2000, tmp_path, epochs=1, trees=5, overrides=[], until="data")
    assert list(res["stages"]) == ["data"] and "test_auc" not in res
    assert "| data |" in mod.report([res], tmp_path)


@pytest.mark.slow
def test_bench_scale_runs_the_whole_pipeline_at_a_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_bench("bench_scale")
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "store"))
    res = mod.run_one(4000, tmp_path, epochs=1, trees=5, overrides=[
        "teachers.dlrm.kwargs.over_arch=[16]", "teachers.foundation.kwargs.d_a=16"], fit_rows=1000)
    assert set(res["stages"]) == set(mod.STAGES)
    assert all(v["seconds"] >= 0 and v["peak_rss_gb"] > 0 for v in res["stages"].values())
    assert all(0 < v["peak_private_gb"] <= v["peak_rss_gb"] for v in res["stages"].values())
    assert res["stages"]["cache"]["disk_gb"] >= 0 and 0.3 < res["test_auc"] < 1
    cache = tmp_path / "rows-4000" / "cache"  # every teacher's logits on every split, and the one tap
    assert len(list(cache.rglob("logits.npy"))) == 9  # the config's DiverseDistill reads: LightGBM's parts
    assert sorted(p.relative_to(cache).parts[0] + "/" + p.name for p in cache.rglob("hidden.*.npy")) == \
        ["lightgbm/hidden.parts.npy"] * 3
    assert res["budget"]["teacher_fit_rows"] == 1000
    assert (tmp_path / "rows-4000" / "export" / "manifest.json").is_file()
    # --reuse: the student's stages again on the same teachers and caches, nothing refitted
    again = mod.run_one(4000, tmp_path, epochs=1, trees=5, overrides=[
        "teachers.dlrm.kwargs.over_arch=[16]", "teachers.foundation.kwargs.d_a=16"], fit_rows=1000, reuse=True)
    assert list(again["stages"]) == ["data", "encode", "train", "evaluate", "export"]
    assert abs(again["test_auc"] - res["test_auc"]) < 1e-9  # the same student from the same teachers
    assert (tmp_path / "rows-4000-reuse" / "export" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------- bench_stream
def test_bench_stream_trains_from_a_folder_and_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = load_bench("bench_stream")
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "cache"))
    mod.write_data(tmp_path, 6000, 2000)
    assert len(list((tmp_path / "data" / "interactions").glob("part-*.parquet"))) == 3
    res = {m: mod.run_one(m, tmp_path, 1, ["train.batch_size=256"]) for m in ("memory", "stream")}
    assert (res["memory"]["rows"], res["stream"]["rows"]) == (2000, 6000)
    assert res["stream"]["streamed"] and not res["memory"]["streamed"]
    assert all(r["samples_per_s"] > 0 and 0.3 < r["test_auc"] < 1 for r in res.values())
    md = mod.report(res, tmp_path)
    assert "throughput stream / memory" in md and (tmp_path / "results.json").is_file()
