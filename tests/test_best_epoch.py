"""Best-epoch selection (``train.select_best``) end to end.

A run whose validation AUC peaks before the last epoch must report, checkpoint and export the best
epoch's model, also after a SIGKILL + ``--resume`` and under torchrun. The state kept for the best
epoch once shared storage with the live weights (``.detach().cpu()`` is a view on CPU), so every
run silently reported and exported its last epoch while metrics.json named an earlier best epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from appdistill.cli import main
from appdistill.eval.metrics import auc
from appdistill.features.dataset import Dataset
from appdistill.config import load_config
from tests.test_resume import _cli, _torchrun
from tests.test_train import tiny_config

EPOCHS = 6


@pytest.fixture(scope="module")
def overfit_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # few rows, a large learning rate: validation AUC peaks at epoch 3 of 6 and falls after
    tmp = tmp_path_factory.mktemp("best")
    p = tiny_config(tmp, train={"epochs": EPOCHS, "batch_size": 256, "prefetch": 0, "lr": 0.01,
                                "embedding_lr": 0.3, "checkpoint_every": 7})
    spec = yaml.safe_load((tmp / "spec.yaml").read_text())
    spec["source"]["kwargs"]["n_interactions"] = 4000
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return p


def _read(run: Path) -> tuple[dict, list[dict]]:
    return (json.loads((run / "metrics.json").read_text()),
            json.loads((run / "history.json").read_text())["epochs"])


def _check_best(run: Path) -> dict:
    m, hist = _read(run)
    aucs = [e["valid_auc"] for e in hist]
    best = max(range(len(aucs)), key=aucs.__getitem__)
    assert best + 1 < EPOCHS, f"fixture must peak before the last epoch: {aucs}"
    assert m["train"]["best_epoch"] == best + 1
    # the reported model is the best epoch's, not the last one's
    assert m["valid"]["auc"] == pytest.approx(aucs[best], abs=1e-9), aucs
    assert abs(m["valid"]["auc"] - aucs[-1]) > 1e-4
    return m


@pytest.fixture(scope="module")
def reference(overfit_cfg: Path) -> dict:
    run = overfit_cfg.parent / "ref"
    r = _cli(["train", str(overfit_cfg), "--run-dir", str(run), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    return _check_best(run)


def test_metrics_report_the_best_epoch(reference: dict) -> None:
    assert reference["train"]["epochs"] == EPOCHS


def test_export_scores_the_best_epoch(overfit_cfg: Path, reference: dict, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """export + score of the raw test rows reproduce metrics.json's test AUC (the best epoch's)."""
    run = overfit_cfg.parent / "ref"
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    ds = Dataset.build(load_config(overfit_cfg).load_spec())
    rows = ds.splits["test"]
    t = ds.tables
    df = (t["interactions"].iloc[rows].merge(t["items"], on="item_id", how="left")
          .merge(t["users"], on="user_id", how="left"))
    df.to_parquet(tmp_path / "test.parquet", index=False)
    rc = main(["score", str(tmp_path / "export"), "--input", str(tmp_path / "test.parquet"),
               "--output", str(tmp_path / "scores.parquet")])
    assert rc == 0, capsys.readouterr().err
    scores = pd.read_parquet(tmp_path / "scores.parquet")["score"].to_numpy()
    assert auc(scores, ds.labels[rows]) == pytest.approx(reference["test"]["auc"], abs=1e-6)


def test_resume_after_the_best_epoch_keeps_the_best_state(overfit_cfg: Path, reference: dict) -> None:
    """SIGKILL after the best epoch has passed: the resumed run restores the kept best state."""
    run = overfit_cfg.parent / "killed"
    steps_per_epoch = reference["train"]["steps"] // EPOCHS
    step = (reference["train"]["best_epoch"] + 1) * steps_per_epoch + 2
    r = _cli(["train", str(overfit_cfg), "--run-dir", str(run), "--no-progress"], {"APPDISTILL_FAULT": f"0:{step}"})
    assert r.returncode == -9, r.stderr[-2000:]
    r = _cli(["train", str(overfit_cfg), "--run-dir", str(run), "--no-progress", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    m = _check_best(run)
    assert m["valid"] == reference["valid"] and m["test"]["auc"] == reference["test"]["auc"]


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_reports_the_best_epoch(overfit_cfg: Path, reference: dict) -> None:
    run = overfit_cfg.parent / "dist"
    r = _torchrun(["train", str(overfit_cfg), "--run-dir", str(run), "--no-progress"], 29561)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _check_best(run)
    assert m["train"]["world_size"] == 2


def test_teachers_keep_their_best_epoch(tmp_path: Path) -> None:
    """The DLRM teacher's early stopping restores its best epoch (a copy, not a view)."""
    from appdistill.teachers.dlrm import DLRMTeacher

    cfg = load_config(tiny_config(tmp_path))
    ds = Dataset.build(cfg.load_spec())
    t = DLRMTeacher(ds.spec, name="dlrm", epochs=5, patience=5, lr=0.02, embedding_lr=0.5, batch_size=256,
                    embedding_dim=8, dense_arch=[8], over_arch=[16], seed=0)
    t.progress = False
    t.fit(ds)
    aucs = [e["valid_auc"] for e in t.history]
    got = auc(t.predict_all(ds, ds.splits["valid"]).logits.numpy(), ds.labels[ds.splits["valid"]])
    assert got == pytest.approx(max(aucs), abs=1e-6), aucs
