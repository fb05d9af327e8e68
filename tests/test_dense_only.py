"""A student that sees only ``dense`` features: a GBDT-led table of numeric columns, one row per entity.

Such a student has no embedding tables (``RankingModel.ebc is None``). End to end through the CLI, as a
user runs it: ``validate``, ``train`` with ``none``, ``kd`` from LightGBM and ``diverse_distill`` from
LightGBM + DLRM (the DLRM teacher is the same ``RankingModel``, dense-only too), ``export``, ``score``
(the scored test AUC equals the run's), SIGKILL + ``--resume``, and a 2-rank ``torchrun`` (no tables to
shard: the model is replicated with DDP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from appdistill.cli import main
from appdistill.eval.metrics import auc
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.io import load_checkpoint
from appdistill.train.checkpoint import RESUME_FILE
from tests.test_teachers import SMALL_DLRM, SMALL_LGB

N_ROWS = 3000
COLUMNS = [f"x{i}" for i in range(5)]


def write_dense_table(directory: Path, n: int = N_ROWS, seed: int = 0) -> Path:
    """A tabular data set: ``row_id``, five numeric columns and a binary label that follows a linear
    part and a threshold XOR (learnable by a tree and, less well, by an MLP). Returns the CSV path."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(COLUMNS)))
    logit = 1.5 * x[:, 0] - x[:, 1] + 2.0 * ((x[:, 2] > 0) ^ (x[:, 3] > 0)) - 1.0
    df = pd.DataFrame(x, columns=COLUMNS)
    df.insert(0, "row_id", np.arange(n))
    df["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    directory.mkdir(parents=True, exist_ok=True)
    df.to_csv(directory / "rows.csv", index=False)
    return directory / "rows.csv"


def dense_spec() -> dict[str, Any]:
    return {
        "name": "dense-only",
        "tables": {"interactions": {"path": "rows.csv", "key": "row_id", "label": {"column": "label"}}},
        "features": [{"name": c, "kind": "dense", "table": "interactions", "transform": "standardize"}
                     for c in COLUMNS],
        "visibility": {"student": list(COLUMNS)},
        "split": {"by": "random", "valid": 0.1, "test": 0.2, "seed": 0},
    }


def dense_config(directory: Path, method: str = "none", teachers: dict[str, Any] | None = None,
                 **train: Any) -> Path:
    """Write table, spec and config under ``directory``; returns the config's path."""
    write_dense_table(directory)
    (directory / "spec.yaml").write_text(yaml.safe_dump(dense_spec(), sort_keys=False))
    cfg = {"name": "dense-only", "spec": "spec.yaml", "seed": 0,
           "student": {"dense_arch": [16], "over_arch": [16]},
           "method": {"key": method, "kwargs": {}},
           "train": {"epochs": 2, "batch_size": 256, "num_threads": 1, **train},
           "teachers": teachers or {}}
    p = directory / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _test_rows(cfg: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The test split's raw rows (as a user would hand them to ``score``) and their labels."""
    spec = FeatureSpecSet.from_yaml(cfg.parent / "spec.yaml")
    ds = Dataset.build(spec)
    rows = ds.splits["test"]
    return ds.tables["interactions"].iloc[rows].drop(columns="label"), ds.labels[rows]


def _export_score_parity(cfg: Path, run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """export RUN, score the test rows through the CLI: the scored AUC is the run's test AUC."""
    assert main(["export", str(run), "--out", str(run / "export")]) == 0, capsys.readouterr().err
    df, labels = _test_rows(cfg)
    inp, out = run.parent / f"{run.name}_test.csv", run.parent / f"{run.name}_scores.csv"
    df.to_csv(inp, index=False)
    assert main(["score", str(run / "export"), "--input", str(inp), "--output", str(out)]) == 0, \
        capsys.readouterr().err
    scores = pd.read_csv(out)["score"].to_numpy()
    m = json.loads((run / "metrics.json").read_text())
    assert len(scores) == len(labels)
    assert auc(scores, labels) == pytest.approx(m["test"]["auc"], abs=1e-6)
    return m


def _no_tables(run: Path, m: dict[str, Any]) -> None:
    """The student has no embedding tables: none in the checkpoint or the export, none counted."""
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["model"] and not any(k.startswith("ebc.") for k in ck["model"])
    assert m["student"]["embedding_params"] == 0 and m["student"]["params"] > 0
    man = json.loads((run / "export" / "manifest.json").read_text())
    assert man["compiled"] == "torch.export"


def test_dense_only_spec_and_config_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dense_config(tmp_path)
    assert main(["validate", str(cfg.parent / "spec.yaml")]) == 0, capsys.readouterr().err
    assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
    assert "x4             dense" in capsys.readouterr().out


def test_dense_only_plain_student_train_export_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dense_config(tmp_path)
    run = tmp_path / "plain"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    m = _export_score_parity(cfg, run, capsys)
    assert m["test"]["auc"] > 0.6  # learnable from the numeric columns
    _no_tables(run, m)


def test_dense_only_kd_from_lightgbm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dense_config(tmp_path, "kd", {"lightgbm": {"key": "lightgbm", "kwargs": SMALL_LGB}})
    run = tmp_path / "kd"
    assert main(["teachers", "fit", str(cfg), "--run-dir", str(run)]) == 0, capsys.readouterr().err
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    m = _export_score_parity(cfg, run, capsys)
    assert m["method"] == "kd" and m["teachers"]["lightgbm"]["test"]["auc"] > 0.75
    _no_tables(run, m)


@pytest.mark.slow
def test_dense_only_diverse_distill_from_lightgbm_and_dlrm(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The DLRM teacher is a dense-only ``RankingModel`` too; ``distill`` fits both, trains, exports."""
    teachers = {"lightgbm": {"key": "lightgbm", "kwargs": SMALL_LGB}, "dlrm": {"key": "dlrm", "kwargs": SMALL_DLRM}}
    cfg = dense_config(tmp_path, "diverse_distill", teachers)
    run = tmp_path / "dd"
    assert main(["distill", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["teachers"]["dlrm"]["test"]["auc"] > 0.6
    m = _export_score_parity(cfg, run, capsys)  # re-exports over distill's export: the same student
    _no_tables(run, m)


def test_dot_interaction_without_sparse_features_is_a_config_error(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``dot`` takes products of embedding pairs: refused before data is read or RUN_DIR exists."""
    cfg = dense_config(tmp_path)
    run = tmp_path / "dot"
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "student.interaction.key=dot"]) == 2
    err = capsys.readouterr().err
    assert "student.interaction" in err and "'dot' needs sparse features" in err and "dcn" in err, err
    assert not run.exists()
    assert main(["validate", str(cfg), "--set", "student.interaction.key=dot"]) == 2
    assert "student.interaction" in capsys.readouterr().err


def test_student_with_no_servable_feature_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dense_config(tmp_path)
    spec = dense_spec()
    spec["visibility"]["student"] = []
    (cfg.parent / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(cfg.parent / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "visibility.student" in err and "at least one servable feature" in err, err


def _cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appdistill", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_dense_only_sigkill_then_resume_is_identical(tmp_path: Path) -> None:
    """Checkpoint/resume of a student without embedding optimizer state: same metrics as uninterrupted."""
    cfg = dense_config(tmp_path, checkpoint_every=3)
    r = _cli(["train", str(cfg), "--run-dir", str(tmp_path / "ref"), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "killed"
    r = _cli(["train", str(cfg), "--run-dir", str(run), "--no-progress"], {"APPDISTILL_FAULT": "0:10"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert load_checkpoint(run / RESUME_FILE)["optim"]["embedding"] == {}
    r = _cli(["train", str(cfg), "--run-dir", str(run), "--no-progress", "--resume"])
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]
    ref, got = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", run))
    assert json.dumps(got["test"], sort_keys=True) == json.dumps(ref["test"], sort_keys=True)


@pytest.mark.slow
@pytest.mark.dist
def test_dense_only_torchrun_two_ranks_matches_single_process(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No tables to shard: the dense-only student is replicated with DDP under torchrun, and 2 ranks
    train what one process trains (the same global batches, all-reduced gradients)."""
    cfg = dense_config(tmp_path, "kd", {"lightgbm": {"key": "lightgbm", "kwargs": SMALL_LGB}})
    assert main(["teachers", "fit", str(cfg), "--run-dir", str(tmp_path / "dist")]) == 0, capsys.readouterr().err
    assert main(["teachers", "fit", str(cfg), "--run-dir", str(tmp_path / "single")]) == 0
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "single"), "--no-progress"]) == 0
    from tests.test_resume import _torchrun

    r = _torchrun(["train", str(cfg), "--run-dir", str(tmp_path / "dist"), "--no-progress"], 29562)
    assert r.returncode == 0, r.stderr[-3000:]
    single, dist = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "dist"))
    assert dist["train"]["world_size"] == 2
    assert abs(dist["test"]["auc"] - single["test"]["auc"]) < 1e-3
    ck, single_ck = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("dist", "single"))
    assert {k: v.shape for k, v in ck["model"].items()} == {k: v.shape for k, v in single_ck["model"].items()}
    _export_score_parity(cfg, tmp_path / "dist", capsys)
