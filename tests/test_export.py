"""Export and scoring: same scores as the trained student, OOV, clear errors, checksums.

Bad input end to end, through the CLI (exit code 2, a message naming the file and the
column/row/feature, nothing created or overwritten): scoring files with missing columns, wrong
dtypes, NaNs; truncated or foreign checkpoints; export directories with a missing or edited file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from appdistill.cli import main
from appdistill.config import load_config
from appdistill.errors import AppDistillError
from appdistill.eval.metrics import auc
from appdistill.export.artifact import Ranker, export_run, load_student
from appdistill.features.batch import BatchBuilder
from appdistill.features.dataset import Dataset
from appdistill.io import save_checkpoint
from appdistill.pipeline import train
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


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``path`` (a file or a directory)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def score_cli(out: Path, inp: Path, output: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["score", str(out), "--input", str(inp), "--output", str(output)])
    return rc, capsys.readouterr().err


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


def test_training_and_serving_encode_the_same_raw_rows_the_same_way(trained) -> None:
    """The training encoding (Dataset + BatchBuilder over whole tables) and the serving encoding
    (RowEncoder over raw request rows) give the same ids and dense values, feature by feature."""
    from appdistill.features.row_encoder import RowEncoder

    tmp, ds, out, df, rows = trained
    _, feats, proc, _ = load_student(tmp / "run")
    b = BatchBuilder(ds, feats).build(rows)
    x = RowEncoder(feats, proc).encode(df)
    kjt = b.sparse.to_dict()
    sparse = [f for f in feats if f.kind in ("sparse_id", "id_list")]
    assert len(x) == 2 * len(sparse) + 1
    for i, f in enumerate(sparse):
        values, offsets = x[2 * i], x[2 * i + 1]
        np.testing.assert_array_equal(values.numpy(), kjt[f.name].values().numpy(), err_msg=f.name)
        np.testing.assert_array_equal(offsets.numpy(), kjt[f.name].offsets()[:-1].numpy(), err_msg=f.name)
    np.testing.assert_allclose(x[-1].numpy(), b.dense.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_cli_score_of_raw_test_rows_reproduces_run_test_auc(trained, tmp_path: Path, fmt: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """export -> score the test split's raw rows (tables joined) -> the run's metrics.json test AUC."""
    tmp, ds, out, df, rows = trained
    inp = tmp_path / f"test_rows.{fmt}"
    df.to_parquet(inp, index=False) if fmt == "parquet" else df.to_csv(inp, index=False)
    rc, err = score_cli(out, inp, tmp_path / f"scores.{fmt}", capsys)
    assert rc == 0, err
    res = pd.read_parquet(tmp_path / f"scores.{fmt}") if fmt == "parquet" else pd.read_csv(tmp_path / f"scores.{fmt}")
    assert len(res) == len(rows)
    want = json.loads((tmp / "run" / "metrics.json").read_text())["test"]["auc"]
    assert auc(res["score"].to_numpy(), ds.labels[rows]) == pytest.approx(want, abs=1e-6)


def test_scoring_oov_batch1_and_extra_columns(trained) -> None:
    _, _, out, df, _ = trained
    r = Ranker.load(out)
    one = df.iloc[:1].copy()
    one["user_id"] = 10**9  # never seen: OOV row, no crash
    one["extra"] = "ignored"
    s = r.score(one)
    assert s.shape == (1,) and 0 < s[0] < 1
    assert r.score(df.iloc[:0]).shape == (0,)


def test_serving_dtype_and_nan_rules(trained) -> None:
    """The documented rules: ids cast to the vocabulary's key type, NaN/unseen -> the training
    transforms' imputation / OOV, exactly as training encodes a row with a missing side-table row."""
    _, ds, out, df, _ = trained
    r = Ranker.load(out)
    base = df.iloc[:6].reset_index(drop=True)
    ref = r.logits(base)

    def same(frame: pd.DataFrame, rows=slice(None)) -> None:
        np.testing.assert_allclose(r.logits(frame)[rows], ref[rows], atol=1e-6)

    # ids: 50, 50.0 and "50" are the same integer id
    same(base.assign(item_id=base["item_id"].astype("float64")))
    same(base.assign(item_id=base["item_id"].astype(str)))
    same(base.assign(user_id=base["user_id"].astype(object)))
    # a string that is not an integer can never be a known integer id: OOV like any unseen id
    unseen = r.logits(base.assign(user_id=10**9))
    np.testing.assert_allclose(r.logits(base.assign(user_id="abc")), unseen, atol=1e-6)
    # dense: numeric strings are numbers; NaN -> the training mean (standardize: raw mean); inf is refused
    # (issue 15: it is not a missing value, and imputing it hid NaN scores of values beyond float32)
    np.testing.assert_allclose(r.logits(base.assign(age=base["age"].astype(str))), ref, atol=1e-5)
    mean = r.processor.dense["age"].mean
    nan = r.logits(base.assign(age=np.nan))
    np.testing.assert_allclose(nan, r.logits(base.assign(age=mean)), atol=1e-5)
    with pytest.raises(AppDistillError, match="column 'age', row 0: value inf"):
        r.logits(base.assign(age=np.inf))
    np.testing.assert_allclose(r.logits(base.assign(age=pd.Series([None] * 6, dtype=object))), nan, atol=1e-6)
    # side-table id NaN -> OOV (training's "missing row"); id_list NaN -> empty list
    cnan = base.copy()
    cnan["country"] = pd.Series([np.nan] * 6, dtype=object)
    np.testing.assert_allclose(r.logits(cnan), r.logits(base.assign(country="never-seen")), atol=1e-6)
    gnan = base.copy()
    gnan["genres"] = pd.Series([np.nan] * 6, dtype=object)
    np.testing.assert_allclose(r.logits(gnan), r.logits(base.assign(genres="")), atol=1e-6)
    # a user absent from the users table (every user column NaN) scores like training's missing row
    absent = base.assign(age=np.nan, country=np.nan)
    assert np.isfinite(r.logits(absent)).all()
    # string vocabulary fed numbers: integral floats are cast like integers ("8", not "8.0")
    assert r.encoder._keys(next(f for f in r.features if f.name == "country"), np.array([8.0, 1.5]), "w").tolist() \
        == ["8", "1.5"]


BAD_CASES = {
    # name: (edit of the first 5 test rows, substrings the message must contain)
    "missing_column": (lambda d: d.drop(columns=["age"]), ["missing columns ['age']"]),
    "dense_not_a_number": (lambda d: d.assign(age=["30", "31", "32", "abc", "33"]),
                           ["column 'age', row 3: expected a number, got 'abc'"]),
    "fractional_id": (lambda d: d.assign(item_id=[1.0, 2.0, 12.5, 3.0, 4.0]),
                      ["feature 'item_id'", "column 'item_id', row 2", "fractional"]),
    "nan_request_key": (lambda d: d.assign(user_id=[1.0, np.nan, 2.0, 3.0, 4.0]),
                        ["column 'user_id', row 1: missing id"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bad_scoring_file_exits_2_names_the_place_and_writes_nothing(trained, tmp_path: Path, case: str, fmt: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, df, _ = trained
    edit, needles = BAD_CASES[case]
    inp = tmp_path / f"in.{fmt}"
    bad = edit(df.iloc[:5].reset_index(drop=True))
    bad.to_csv(inp, index=False) if fmt == "csv" else bad.to_parquet(inp, index=False)
    new = tmp_path / "new.csv"
    rc, err = score_cli(out, inp, new, capsys)
    assert rc == 2 and str(inp) in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not new.exists()
    # an existing output is neither overwritten nor touched
    old = tmp_path / "old.parquet"
    pd.DataFrame({"score": [0.5]}).to_parquet(old)
    before = snapshot(old)
    assert score_cli(out, inp, old, capsys)[0] == 2
    assert snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([inp.name, old.name])  # no temp files left


def test_score_cli_other_refusals(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, df, _ = trained
    inp = tmp_path / "in.parquet"
    df.iloc[:5].to_parquet(inp, index=False)
    rc, err = score_cli(out, inp, tmp_path / "o.txt", capsys)
    assert rc == 2 and "o.txt" in err and ".parquet or .csv" in err
    rc, err = score_cli(out, tmp_path / "nope.csv", tmp_path / "o.csv", capsys)
    assert rc == 2 and "nope.csv" in err
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    rc, err = score_cli(out, tmp_path / "junk.parquet", tmp_path / "o.csv", capsys)
    assert rc == 2 and "junk.parquet" in err
    rc, err = score_cli(out, inp, inp, capsys)  # would destroy the input
    assert rc == 2 and "--input" in err
    rc, err = score_cli(tmp_path / "no_export", inp, tmp_path / "o.csv", capsys)
    assert rc == 2 and "no_export" in err
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.txt").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_score_refuses_a_needed_column_written_twice(trained, tmp_path: Path, fmt: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """CSV: pandas renames the second 'age' to 'age.1' and the first would be scored silently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, _, out, df, _ = trained
    rows = df.iloc[:5].reset_index(drop=True)
    inp = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        rows.assign(**{"age.x": 99.0}).rename(columns={"age.x": "age"}).to_csv(inp, index=False)
    else:
        cols = [pa.array(rows[c]) for c in rows.columns]
        pq.write_table(pa.table(cols + [pa.array([99.0] * 5)], names=[*rows.columns, "age"]), inp)
    rc, err = score_cli(out, inp, tmp_path / "o.csv", capsys)
    assert rc == 2 and str(inp) in err and "['age'] appear more than once" in err, err
    assert not (tmp_path / "o.csv").exists()


def test_output_under_a_file_exits_2(trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out / --output below a path that is a file: exit 2 naming it, not a FileExistsError traceback."""
    tmp, _, out, df, _ = trained
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    inp = tmp_path / "in.parquet"
    df.iloc[:5].to_parquet(inp, index=False)
    rc, err = score_cli(out, inp, blocker / "scores.csv", capsys)
    assert rc == 2 and str(blocker) in err and "is a file" in err, err
    assert main(["export", str(tmp / "run"), "--out", str(blocker / "a" / "serve"), "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "is a file" in err, err
    assert blocker.read_text() == "x"


def test_score_output_is_written_atomically(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, df, _ = trained
    inp = tmp_path / "in.parquet"
    df.iloc[:5].to_parquet(inp, index=False)
    res = tmp_path / "scores.csv"
    res.write_text("score\n0.5\n")
    before = snapshot(res)

    def crash(*_a, **_k):  # the rename that publishes the new file fails (disk full, kill...)
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        main(["score", str(out), "--input", str(inp), "--output", str(res)])
    assert snapshot(res) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "scores.csv"]  # temp file removed
    monkeypatch.undo()
    assert main(["score", str(out), "--input", str(inp), "--output", str(res)]) == 0
    assert len(pd.read_csv(res)) == 5


def test_scoring_errors_are_clear(trained) -> None:
    _, _, out, df, _ = trained
    r = Ranker.load(out)
    with pytest.raises(AppDistillError, match=r"missing columns \['age'\]"):
        r.score(df.drop(columns=["age"]))
    with pytest.raises(AppDistillError, match=r"missing columns \['age'\]"):
        r.score(df.drop(columns=["age"]).iloc[:0])  # checked on empty input too
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


# ---------------------------------------------------------------------------------------- export refusals
@pytest.fixture
def run_copy(trained, tmp_path: Path) -> Path:
    tmp = trained[0]
    dst = tmp_path / "run"
    shutil.copytree(tmp / "run", dst)
    return dst


def test_export_of_truncated_checkpoint_exits_2_and_writes_nothing(trained, run_copy: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ck = run_copy / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    target = tmp_path / "serve"
    assert main(["export", str(run_copy), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "truncated" in err
    assert not target.exists()
    # an earlier export at --out is left exactly as it was
    earlier = tmp_path / "earlier"
    shutil.copytree(trained[2], earlier)
    before = snapshot(earlier)
    assert main(["export", str(run_copy), "--out", str(earlier)]) == 2
    assert snapshot(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "run"]  # no staging directory left


def test_export_of_checkpoint_from_another_spec_exits_2(trained, run_copy: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "serve"
    # spec.json edited after training (or the checkpoint copied from a run of another spec)
    spec_path = run_copy / "spec.json"
    original = spec_path.read_text()
    spec = json.loads(original)
    next(f for f in spec["features"] if f["name"] == "user_id")["dim"] = 8
    spec_path.write_text(json.dumps(spec))
    assert main(["export", str(run_copy), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(run_copy / "checkpoint.pt") in err and "spec.json" in err and "another run" in err
    assert not target.exists()
    # a foreign checkpoint without a spec fingerprint: caught by its parameter shapes
    spec_path.write_text(original)
    ck = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ck.pop("spec_fingerprint")
    key = next(k for k in ck["model"] if k.startswith("ebc.") and "user_id" in k)
    ck["model"][key] = torch.zeros(ck["model"][key].shape[0] + 7, ck["model"][key].shape[1])
    save_checkpoint(run_copy / "checkpoint.pt", ck)  # a well-formed (checksummed) checkpoint of another model
    assert main(["export", str(run_copy), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(run_copy / "checkpoint.pt") in err and "processor.json" in err and "do not fit" in err
    assert not target.exists()


def test_export_refuses_a_processor_json_edited_after_training(trained, run_copy: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A dense mean or a vocabulary edited in RUN_DIR/processor.json (still valid JSON, same sizes) would be
    exported and served silently: checkpoint.pt records the sha256 of the one the student was trained with."""
    proc_path = run_copy / "processor.json"
    proc = json.loads(proc_path.read_text())
    name = next(iter(proc["dense"]))
    proc["dense"][name]["mean"] += 100.0
    proc_path.write_text(json.dumps(proc))
    target = tmp_path / "serve"
    assert main(["export", str(run_copy), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(proc_path) in err and str(run_copy / "checkpoint.pt") in err and "not used" in err, err
    assert not target.exists()


def test_export_refuses_a_non_export_directory_and_replaces_an_earlier_export(
        trained, run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    own = tmp_path / "mine"
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    assert main(["export", str(run_copy), "--out", str(own)]) == 2
    assert "not an earlier export" in capsys.readouterr().err and (own / "notes.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "x")]) == 2
    assert "no_run" in capsys.readouterr().err and not (tmp_path / "x").exists()
    earlier = tmp_path / "earlier"
    shutil.copytree(trained[2], earlier)
    (earlier / "student.json").write_text("{}")  # stale/edited: replaced by the new export
    assert main(["export", str(run_copy), "--out", str(earlier), "--no-compile"]) == 0
    assert not (earlier / "model.pt2").exists()  # the earlier export was replaced whole, not merged into
    Ranker.load(earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "mine", "run"]


@pytest.mark.parametrize("damage", ["edit_processor", "delete_weights", "delete_manifest", "unlist_in_manifest",
                                    "truncate_program"])
def test_score_refuses_an_export_dir_with_a_missing_or_edited_file(trained, tmp_path: Path, damage: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, _, out, df, _ = trained
    copy = tmp_path / "e"
    shutil.copytree(out, copy)
    name = {"edit_processor": "processor.json", "delete_weights": "weights.pt", "delete_manifest": "manifest.json",
            "unlist_in_manifest": "weights.pt", "truncate_program": "model.pt2"}[damage]
    p = copy / name
    if damage == "edit_processor":
        p.write_text(p.read_text().replace("standardize", "log1p", 1))
    elif damage == "unlist_in_manifest":
        man = json.loads((copy / "manifest.json").read_text())
        del man["files"]["weights.pt"]
        (copy / "manifest.json").write_text(json.dumps(man))
    elif damage == "truncate_program":
        p.write_bytes(p.read_bytes()[:100])
    else:
        p.unlink()
    with pytest.raises(AppDistillError, match=name):
        Ranker.load(copy)
    inp = tmp_path / "in.parquet"
    df.iloc[:5].to_parquet(inp, index=False)
    old = tmp_path / "scores.parquet"
    pd.DataFrame({"score": [0.5]}).to_parquet(old)
    before = snapshot(old)
    rc, err = score_cli(copy, inp, old, capsys)
    assert rc == 2 and name in err and str(copy) in err, err
    assert snapshot(old) == before


@pytest.mark.slow
def test_export_after_diverse_distill_is_the_plain_student(tmp_path: Path) -> None:
    """A DiverseDistill run (teachers fitted and cached, question/answer nets, gate, leaf table) exports
    only the student: the same parameter names as a plain run, and the scores of its plain path."""
    from appdistill.pipeline import distill
    from tests.test_teachers import SMALL_DLRM, SMALL_LGB

    teachers = {"lightgbm": {"key": "lightgbm", "kwargs": SMALL_LGB}, "dlrm": {"key": "dlrm", "kwargs": SMALL_DLRM}}
    cfg = load_config(tiny_config(tmp_path, teachers=teachers, method={
        "key": "diverse_distill", "kwargs": {"committee_path": {"top_k": 1, "every": 2}}}), ["train.epochs=1"])
    m = distill(cfg, tmp_path / "dd", progress=False)
    assert m["train"]["teacher_passes_skipped"] == pytest.approx(0.5)  # top-1 of 2 teachers
    ds = Dataset.build(cfg.load_spec())
    model, feats, _, _ = load_student(tmp_path / "dd")
    rows = ds.splits["test"]
    b = BatchBuilder(ds, feats).build(rows)
    with torch.no_grad():
        want = model(b.sparse, b.dense).logits.numpy()
    t = ds.tables
    df = (t["interactions"].iloc[rows].merge(t["items"], on="item_id", how="left")
          .merge(t["users"], on="user_id", how="left"))
    np.testing.assert_allclose(Ranker.load(tmp_path / "dd" / "export").logits(df), want, atol=1e-5)
    assert auc(want, ds.labels[rows]) == pytest.approx(m["test"]["auc"], abs=1e-6)
    # the method's modules (ports, questions, answers, gate) trained but never reach the export
    sd = torch.load(tmp_path / "dd" / "export" / "weights.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())
    assert not any(k.split(".")[0] in {"ports", "E", "W", "Q", "P", "A", "answer_net"} for k in sd)
    # ... they live only in the resume checkpoint, for --resume
    from appdistill.train.checkpoint import RESUME_FILE
    from appdistill.io import load_checkpoint

    method = load_checkpoint(tmp_path / "dd" / RESUME_FILE)["method"]["params"]
    assert {"E", "W.weight", "ports.lightgbm.leaf_emb.weight", "Q.0.weight"} <= set(method)
