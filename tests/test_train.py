"""Training loop, run directory, CLI and the torchrun path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from appdistill.cli import main
from appdistill.errors import ConfigError
from appdistill.config import config_from_dict, load_config
from appdistill.io import load_checkpoint
from appdistill.pipeline import train

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path: Path, **overrides) -> Path:
    spec = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    spec["source"]["kwargs"] = {"n_users": 300, "n_items": 150, "n_interactions": 20000, "seed": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cfg = {"name": "tiny", "spec": "spec.yaml", "seed": 0,
           "student": {"dense_arch": [8], "over_arch": [16]},
           "train": {"epochs": 2, "batch_size": 512, "prefetch": 2}}
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_writes_run_directory(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path))
    m = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("metrics.json", "config.yaml", "checkpoint.pt", "curve.png", "history.json", "processor.json"):
        assert (run / f).is_file(), f
    disk = json.loads((run / "metrics.json").read_text())
    for key in ("dataset", "split", "method", "seed", "test", "valid", "teachers", "student", "train"):
        assert key in disk
    for key in ("auc", "logloss", "gauc", "ndcg@10", "recall@10", "cold"):
        assert key in disk["test"]
    assert disk["test"]["auc"] == pytest.approx(m["test"]["auc"])
    assert 0.6 < m["test"]["auc"] <= 1.0  # the synthetic labels are learnable from ids
    assert m["student"]["params"] > 0 and m["student"]["bytes"] == 4 * m["student"]["params"]
    ck = load_checkpoint(run / "checkpoint.pt")
    assert set(ck) >= {"model", "config", "spec_fingerprint", "data_fingerprint"}
    assert any(k.startswith("ebc.") for k in ck["model"])
    assert not list(run.glob("*.tmp")), "atomic writes leave no temporary files"
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path), ["train.epochs=1"])
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    assert a["test"]["auc"] == b["test"]["auc"]


def test_dot_interaction_and_override(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path), ["student.interaction.key=dot", "student.embedding_dim=8",
                                              "train.epochs=1"])
    m = train(cfg, tmp_path / "dot", progress=False)
    assert m["test"]["auc"] > 0.55


def test_dot_with_unequal_dims_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(tiny_config(tmp_path), ["student.interaction.key=dot", "train.epochs=1"])
    with pytest.raises(ConfigError, match="Set student.embedding_dim"):
        train(cfg, tmp_path / "x", progress=False)


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_config(tmp_path, method={"key": "no_such_method"})
    assert main(["train", str(p), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'no_such_method'" in err and "known:" in err
    p2 = tiny_config(tmp_path, train={"epochz": 3})
    assert main(["train", str(p2), "--run-dir", str(tmp_path / "r")]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown interaction 'fm'"):
        train(config_from_dict({"spec": str(tmp_path / "spec.yaml"), "student": {"interaction": {"key": "fm"}}}),
              tmp_path / "r2", progress=False)


@pytest.mark.parametrize("ov, needle", [
    ("train.epochs=[1", "--set 'train.epochs=[1': the value not valid YAML"),
    ("train.epochs=&a [*a]", "--set 'train.epochs=&a [*a]': the value refused"),
    ("=3", "--set '=3': empty key"),
    ("train..epochs=3", "--set 'train..epochs=3': empty key"),
])
def test_malformed_set_override_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], ov: str,
                                                  needle: str) -> None:
    p = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("*", r"\*")):
        load_config(p, [ov])
    assert main(["validate", str(p), "--set", ov]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_run_dir_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_config(tmp_path, train={"epochs": 1})
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for run in (blocker, blocker / "sub"):
        assert main(["train", str(p), "--run-dir", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"run directory '{run}'" in err and "Traceback" not in err, err
    assert blocker.read_text() == "x"


def test_refused_train_leaves_no_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_config(tmp_path, spec="nope.yaml")  # found missing only once training has begun
    run = tmp_path / "runs" / "r"
    assert main(["train", str(p), "--run-dir", str(run), "--no-progress"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_config_or_spec_that_is_not_utf8_text_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_config(tmp_path)
    spec = tmp_path / "spec.yaml"
    bad = b"\xff\xfe\x00name: x\n"
    for file, argv in ((p, ["train", str(p), "--run-dir", str(tmp_path / "r"), "--no-progress"]),
                       (p, ["validate", str(p)]), (spec, ["validate", str(spec)])):
        good = file.read_bytes()
        file.write_bytes(bad)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"file '{file}': cannot be read as text" in err and "Traceback" not in err, err
        file.write_bytes(good)
    assert not (tmp_path / "r").exists()


def test_cli_validate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "feature_specs/ml100k.yaml")]) == 0
    out = capsys.readouterr().out
    assert "100,000 rows" in out and "positive rate 0.5537" in out


@pytest.mark.slow
def test_ml100k_plain_reaches_target_auc(tmp_path: Path) -> None:
    """Issue target: the plain student on ML-100K random split, test AUC >= 0.76."""
    m = train(load_config(REPO / "configs/ml100k_plain.yaml"), tmp_path / "run", progress=False)
    assert m["test"]["auc"] >= 0.76
    assert m["dataset"] == "ml100k" and m["split"] == "random"


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_matches_single_process(tmp_path: Path) -> None:
    """2 gloo ranks with DistributedModelParallel (table-wise sharding) vs one process, same seed."""
    cfg = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 512, "prefetch": 2})
    single = train(load_config(cfg), tmp_path / "single", progress=False)
    from tests.test_resume import _torchrun

    r = _torchrun(["train", str(cfg), "--run-dir", str(tmp_path / "dist"), "--no-progress"], 29533)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert m["train"]["world_size"] == 2
    # the issue asks for 0.01; with the embedding order fixed (RankingModel.embed) they agree far closer
    assert abs(m["test"]["auc"] - single["test"]["auc"]) < 1e-3
    # the checkpoint written by the sharded run is a full, unsharded state dict
    ck = load_checkpoint(tmp_path / "dist" / "checkpoint.pt")
    single_ck = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    for k, v in single_ck["model"].items():
        assert ck["model"][k].shape == v.shape, k
    assert isinstance(next(iter(ck["model"].values())), torch.Tensor)


def test_demo_comparison_table() -> None:
    from appdistill.cli import format_comparison

    t = {"auc": 0.8, "logloss": 0.5, "cold": {"auc": 0.6}}
    dd = {"method": "diverse_distill", "test": t, "student": {"params": 1234},
          "train": {"teacher_passes_skipped": 0.25}, "teachers": {"dlrm": {"test": {**t, "auc": 0.79}}}}
    plain = {"test": {**t, "auc": 0.78}, "student": {"params": 1234}}
    out = format_comparison(dd, plain)
    assert "| teacher `dlrm` | 0.7900 |" in out and "| student, plain (`none`) | 0.7800 |" in out
    assert "| student, `diverse_distill` | 0.8000 |" in out and "1,234" in out and "25.0%" in out
