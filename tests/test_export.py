"""Export and scoring: same scores as the trained student, OOV, clear errors, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from appdistill.cli import main
from appdistill.config import load_config
from appdistill.errors import AppDistillError
from appdistill.export.artifact import Ranker, export_run, load_student
from appdistill.features.batch import BatchBuilder
from appdistill.features.dataset import Dataset
from appdistill.train.loop import train
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(tiny_config(tmp), ["train.epochs=1"])
    train(cfg, tmp / "run", progress=False)
    ds = Dataset.build(cfg.load_spec())
    out = export_run(tmp / "run", tmp / "export")
    t = ds.tables
    rows = ds.splits["test"]
    df = (t["interactions"].iloc[rows].merge(t["items"], on="item_id", how="left")
          .merge(t["users"], on="user_id", how="left"))
    return tmp, ds, out, df, rows


def test_export_scores_match_trained_student(trained) -> None:
    tmp, ds, out, df, rows = trained
    model, feats, _, _ = load_student(tmp / "run")
    b = BatchBuilder(ds, feats).build(rows)
    with torch.no_grad():
        want = model(b.sparse, b.dense).logits.numpy()
    for compiled in (True, False):
        got = Ranker.load(out, compiled=compiled).logits(df)
        np.testing.assert_allclose(got, want, atol=1e-5)
    man = json.loads((out / "manifest.json").read_text())
    assert man["compiled"] == "torch.export" and set(man["files"]) >= {"model.pt2", "weights.pt"}
    # only student parameters travel
    sd = torch.load(out / "weights.pt", weights_only=True)
    assert all(k.startswith(("ebc.", "dense_arch.", "interaction.", "over_arch.")) for k in sd)


def test_scoring_oov_batch1_and_extra_columns(trained) -> None:
    _, _, out, df, _ = trained
    r = Ranker.load(out)
    one = df.iloc[:1].copy()
    one["user_id"] = 10**9  # never seen: OOV row, no crash
    one["extra"] = "ignored"
    s = r.score(one)
    assert s.shape == (1,) and 0 < s[0] < 1
    assert r.score(df.iloc[:0]).shape == (0,)


def test_scoring_errors_are_clear(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, df, _ = trained
    r = Ranker.load(out)
    with pytest.raises(AppDistillError, match=r"missing columns \['age'\]"):
        r.score(df.drop(columns=["age"]))
    bad = df.iloc[:3].copy()
    bad["age"] = bad["age"].astype(object)
    bad.loc[bad.index[1], "age"] = "old"
    with pytest.raises(AppDistillError, match="column 'age', row 1: expected a number"):
        r.score(bad)
    nan = df.iloc[:3].copy()
    nan["item_id"] = nan["item_id"].astype("float64")
    nan.loc[nan.index[2], "item_id"] = np.nan
    with pytest.raises(AppDistillError, match="column 'item_id', row 2"):
        r.score(nan)
    # CLI: exit 2 and the output is not written
    p = tmp_path / "in.csv"
    df.drop(columns=["age"]).iloc[:5].to_csv(p, index=False)
    assert main(["score", str(out), "--input", str(p), "--output", str(tmp_path / "o.csv")]) == 2
    assert "missing columns" in capsys.readouterr().err and not (tmp_path / "o.csv").exists()
    df.iloc[:5].to_csv(p, index=False)
    assert main(["score", str(out), "--input", str(p), "--output", str(tmp_path / "o.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "o.csv")) == 5


def test_edited_or_missing_export_file_is_refused(trained, tmp_path: Path) -> None:
    _, _, out, _, _ = trained
    import shutil

    copy = tmp_path / "e"
    shutil.copytree(out, copy)
    p = copy / "processor.json"
    p.write_text(p.read_text().replace("standardize", "log1p", 1))
    with pytest.raises(AppDistillError, match="'processor.json' does not match its checksum"):
        Ranker.load(copy)
    (copy / "weights.pt").unlink()
    with pytest.raises(AppDistillError, match="missing file 'weights.pt'"):
        Ranker.load(copy)
