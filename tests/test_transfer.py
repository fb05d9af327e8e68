"""Transfer sets: unlabelled rows the teachers label, encoded by the same join as real rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from appdistill.config import load_config
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.features.transfer import make_transfer_rows
from appdistill.methods.base import label_bce
from tests.test_bench import CONFIG, SPEC


@pytest.fixture(scope="module")
def syn() -> tuple[FeatureSpecSet, Dataset]:
    spec = FeatureSpecSet.from_dict(SPEC)
    return spec, Dataset.build(spec)


def test_pairs_are_unobserved_pairs_of_training_users(syn) -> None:
    spec, ds = syn
    inter = ds.tables["interactions"]
    rows = make_transfer_rows(spec, ds.tables, ds.splits, ratio=0.5, seed=3)
    assert list(rows.columns) == list(inter.columns)
    assert 0.8 * 0.5 * len(ds.splits["train"]) <= len(rows) <= 0.5 * len(ds.splits["train"])
    train_users = set(inter.user_id.to_numpy()[ds.splits["train"]])
    assert set(rows.user_id) <= train_users
    seen = set(zip(inter.user_id, inter.item_id))
    assert not any(p in seen for p in zip(rows.user_id, rows.item_id))
    assert rows.item_id.isin(ds.tables["items"].item_id).all()
    again = make_transfer_rows(spec, ds.tables, ds.splits, ratio=0.5, seed=3)
    pd.testing.assert_frame_equal(rows, again)  # deterministic


def test_perturbed_rows_are_new_entities_near_the_training_rows() -> None:
    rng = np.random.default_rng(0)
    n = 400
    t = pd.DataFrame({"row_id": np.arange(n), "x": rng.normal(size=n), "c": rng.integers(0, 5, n),
                      "label": rng.integers(0, 2, n)})
    spec = FeatureSpecSet.from_dict({
        "name": "tab", "tables": {"interactions": {"path": "given.parquet", "key": "row_id", "label": {"column": "label"}}},
        "features": [{"name": "x", "kind": "dense", "table": "interactions"},
                     {"name": "c", "kind": "sparse_id", "table": "interactions", "dim": 4}],
        "visibility": {"student": ["x", "c"]}, "split": {"by": "random", "valid": 0.1, "test": 0.1}})
    ds = Dataset.build(spec, {"interactions": t})
    rows = make_transfer_rows(spec, ds.tables, ds.splits, ratio=2.0, seed=0)
    assert len(rows) == 2 * len(ds.splits["train"])
    assert rows.row_id.min() > t.row_id.max() and rows.row_id.is_unique  # new keys
    assert set(rows.c) <= set(t.c.to_numpy()[ds.splits["train"]])       # swapped, not invented
    tx = t.x.to_numpy()[ds.splits["train"]]
    assert tx.min() <= rows.x.min() and rows.x.max() <= tx.max()          # mixup stays in the hull
    donor_like = rows.merge(t, on=["x", "c"], how="inner")
    assert len(donor_like) < len(rows)                                     # most rows are perturbed


def test_perturbed_integer_and_boolean_dense_columns_keep_their_distribution() -> None:
    """Mixing a 0/1 or count column with a partner row and casting back truncated (0.6 -> 0: the column
    drifts down) and made any nonzero boolean mix True (a False row with a True partner always became
    True): the transfer rows' flags and counts no longer looked like the training rows'."""
    rng = np.random.default_rng(0)
    n = 4000
    t = pd.DataFrame({"row_id": np.arange(n), "flag": rng.random(n) < 0.4, "bin": rng.integers(0, 2, n),
                      "cnt": rng.poisson(2, n), "c": rng.integers(0, 5, n), "label": rng.integers(0, 2, n)})
    dense = ["flag", "bin", "cnt"]
    spec = FeatureSpecSet.from_dict({
        "name": "tab", "tables": {"interactions": {"path": "given.parquet", "key": "row_id", "label": {"column": "label"}}},
        "features": [*({"name": c, "kind": "dense", "table": "interactions"} for c in dense),
                     {"name": "c", "kind": "sparse_id", "table": "interactions", "dim": 4}],
        "visibility": {"student": [*dense, "c"]}, "split": {"by": "random", "valid": 0.1, "test": 0.1}})
    ds = Dataset.build(spec, {"interactions": t})
    rows = make_transfer_rows(spec, ds.tables, ds.splits, ratio=1.0, seed=0)
    train = t.iloc[ds.splits["train"]]
    for c in dense:
        assert rows[c].dtype == t[c].dtype, c
        assert rows[c].astype(float).mean() == pytest.approx(train[c].astype(float).mean(), abs=0.05), c
    assert set(rows.bin) <= {0, 1} and rows.cnt.min() >= 0


def test_perturbed_rows_of_nullable_integer_and_boolean_columns() -> None:
    """pandas' nullable ``Int64`` / ``boolean`` columns (what a parquet file written from them reads back as)
    crashed the mixup with a traceback (``Cannot interpret 'Int64Dtype()' as a data type``); they now keep
    their type, their missing values stay missing, and the data set encodes them."""
    rng = np.random.default_rng(0)
    n = 1000
    cnt = pd.array(np.where(rng.random(n) < 0.1, None, rng.poisson(2, n)), dtype="Int64")
    flag = pd.array(np.where(rng.random(n) < 0.1, None, rng.random(n) < 0.4), dtype="boolean")
    t = pd.DataFrame({"row_id": np.arange(n), "cnt": cnt, "flag": flag, "c": rng.integers(0, 5, n),
                      "label": rng.integers(0, 2, n)})
    spec = FeatureSpecSet.from_dict({
        "name": "tab", "tables": {"interactions": {"path": "given.parquet", "key": "row_id", "label": {"column": "label"}}},
        "features": [{"name": "cnt", "kind": "dense", "table": "interactions"},
                     {"name": "flag", "kind": "dense", "table": "interactions"},
                     {"name": "c", "kind": "sparse_id", "table": "interactions", "dim": 4}],
        "visibility": {"student": ["cnt", "flag", "c"]}, "split": {"by": "random", "valid": 0.1, "test": 0.1}})
    ds = Dataset.build(spec, {"interactions": t})
    rows = make_transfer_rows(spec, ds.tables, ds.splits, ratio=1.0, seed=0)
    assert str(rows.cnt.dtype) == "Int64" and str(rows.flag.dtype) == "boolean"
    assert 0 < rows.cnt.isna().mean() < 0.2 and rows.cnt.min() >= 0
    full = Dataset.build(spec, {"interactions": t},
                         transfer=lambda sp, tb, sl: make_transfer_rows(sp, tb, sl, 1.0, seed=0))
    assert len(full.splits["transfer"]) == len(rows) and np.isfinite(full.dense["cnt"]).all()


def test_dataset_with_transfer_keeps_real_rows_and_encodes_the_new_ones_alike(syn) -> None:
    spec, ds = syn
    ext = Dataset.build(spec, ds.tables, transfer=lambda sp, tb, sl: make_transfer_rows(sp, tb, sl, 0.5, seed=1))
    n = ds.n
    assert ext.n > n and np.isnan(ext.labels[n:]).all() and (ext.labels[:n] == ds.labels).all()
    for k in ("train", "valid", "test"):
        assert (ext.splits[k] == ds.splits[k]).all()
    assert (ext.splits["transfer"] == np.arange(n, ext.n)).all()
    assert ext.processor.to_json() == ds.processor.to_json()  # fitted on the same training rows
    for f, v in ds.sparse.items():
        assert (ext.sparse[f][:n] == v).all()
    # transfer rows go through the same join and encoder as real rows
    extra = ext.tables["interactions"].iloc[n:]
    assert (ext.sparse["item_id"][n:] == ds.processor.encode_sparse("item_id", extra.item_id)).all()
    items = ds.tables["items"].item_id.to_numpy()
    assert (items[ext.table_rows["items"][n:]] == extra.item_id.to_numpy()).all()
    assert ext.fingerprint != ds.fingerprint


def test_label_bce_ignores_unlabelled_rows() -> None:
    z = torch.tensor([0.3, -1.0, 2.0, 0.5])
    y = torch.tensor([1.0, float("nan"), 0.0, float("nan")])
    want = F.binary_cross_entropy_with_logits(z[[0, 2]], y[[0, 2]])
    assert torch.allclose(label_bce(z, y), want)
    full = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(label_bce(z, full), F.binary_cross_entropy_with_logits(z, full))
    z.requires_grad_(True)
    label_bce(z, y).backward()
    assert z.grad[1] == 0 and z.grad[3] == 0 and torch.isfinite(z.grad).all()


def test_training_with_a_transfer_set(tmp_path) -> None:
    from appdistill.pipeline import fit_committee
    from appdistill.pipeline import train

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "epochs": 1}}))
    base = load_config(tmp_path / "c.yaml", [f"teachers_dir={tmp_path / 't'}"])
    fit_committee(base, tmp_path / "t", progress=False)
    plain = train(load_config(tmp_path / "c.yaml", [f"teachers_dir={tmp_path / 't'}", "method.key=kd",
                                                     "method.kwargs={}"]), tmp_path / "kd", progress=False)
    cfg = load_config(tmp_path / "c.yaml", [f"teachers_dir={tmp_path / 't'}", "method.key=kd", "method.kwargs={}",
                                           "transfer.enabled=true", "transfer.ratio=1.0"])
    m = train(cfg, tmp_path / "kd_transfer", progress=False)
    assert m["train"]["steps"] > 1.7 * plain["train"]["steps"]  # transfer rows are in the epoch
    assert np.isfinite(m["test"]["auc"]) and m["test"]["n"] == plain["test"]["n"]
    caches = list((tmp_path / "t" / "cache").glob("*/*/transfer"))
    assert len(caches) == 2  # both teachers labelled the transfer rows, cached like any split
    # the plain student ignores the transfer set (no teacher to label it)
    none = train(load_config(tmp_path / "c.yaml", [f"teachers_dir={tmp_path / 't'}", "method.key=none",
                                                    "method.kwargs={}", "transfer.enabled=true"]),
                 tmp_path / "none", progress=False)
    assert none["train"]["steps"] == plain["train"]["steps"]
