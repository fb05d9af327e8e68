"""Vocabularies, dense transforms, splits, the encoded Dataset, and the built-in data sources."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from appdistill.data.movielens import load_ml100k
from appdistill.data.synthetic import generate, load_synthetic
from appdistill.errors import SpecError
from appdistill.features.dataset import Dataset
from appdistill.features.processor import FeatureProcessor, split_lists
from appdistill.features.spec import FeatureSpec, FeatureSpecSet
from appdistill.features.tables import load_tables, split_rows
from appdistill.features.vocab import DenseTransform, KeyIndex, Vocabulary, normalize_ids
from tests.conftest import make_tiny_tables

REPO = Path(__file__).resolve().parents[1]
TRAIN_YEARS = np.array([1990.0, 2000.0, 2010.0, 1995.0])  # items 10-14 in training; 13 has no year


def _hash_tables(tables: dict[str, pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for name in sorted(tables):
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(tables[name], index=False).to_numpy().tobytes())
    return h.hexdigest()


def _log_spec(split: dict, item_extra: dict | None = None) -> FeatureSpecSet:
    """A one-table spec (interactions only) for split / vocabulary tests on generated logs."""
    return FeatureSpecSet.from_dict({
        "name": "log",
        "tables": {"interactions": {"path": "log.parquet", "key": ["user_id", "item_id"],
                                    "label": {"column": "y"}}},
        "features": [{"name": "user_id", "kind": "sparse_id", "table": "interactions"},
                     {"name": "item_id", "kind": "sparse_id", "table": "interactions", **(item_extra or {})}],
        "visibility": {"student": ["user_id", "item_id"]},
        "split": split,
    })


def _log(n: int = 1000, n_users: int = 50, n_items: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, n_users, n),
        "item_id": (rng.zipf(1.5, n) % n_items).astype(np.int64),
        "y": rng.integers(0, 2, n).astype(np.int8),
        "timestamp": rng.permutation(n).astype(np.int64) * 10 + 1_000,
    })


@pytest.fixture
def tiny_ds(tiny_spec) -> Dataset:
    return Dataset.build(tiny_spec)


# ============================================================================== vocabularies
def test_vocabularies_fit_on_training_split_only(tiny_ds):
    v = tiny_ds.processor.vocabs
    assert v["user_id"].values.tolist() == [1, 2, 3, 4] and len(v["user_id"]) == 5
    assert v["item_id"].values.tolist() == [10, 11, 12, 13, 14] and len(v["item_id"]) == 6  # not 15
    assert v["genres"].values.tolist() == ["a", "b", "c"]
    assert v["gender"].values.tolist() == ["f", "m"]
    # item 15 only occurs in the test rows 16 and 17: OOV row 0 there, known rows elsewhere
    items = tiny_ds.tables["interactions"]["item_id"].to_numpy()
    assert tiny_ds.sparse["item_id"].tolist() == [0 if i == 15 else i - 9 for i in items]
    assert tiny_ds.processor.encode_sparse("item_id", [15, 10, 999]).tolist() == [0, 1, 0]


def test_vocabulary_equals_training_ids_on_random_split():
    log = _log()
    ds = Dataset.build(_log_spec({"by": "random", "valid": 0.2, "test": 0.2, "seed": 3}), {"interactions": log})
    train_items = np.unique(log["item_id"].to_numpy()[ds.splits["train"]])
    assert ds.processor.vocabs["item_id"].values.tolist() == train_items.tolist()
    test_only = ~np.isin(log["item_id"].to_numpy(), train_items)
    assert test_only.any()  # the fixture is big enough to have test-only items
    assert (ds.sparse["item_id"][test_only] == 0).all()
    assert (ds.sparse["item_id"][~test_only] >= 1).all()
    assert ds.cold.tolist() == test_only.tolist()


def test_min_count_sends_rare_ids_to_oov(spec_file, tiny_spec_dict):
    next(f for f in tiny_spec_dict["features"] if f["name"] == "item_id")["min_count"] = 3
    ds = Dataset.build(FeatureSpecSet.from_yaml(spec_file(tiny_spec_dict)))
    # training rows 0-11: items 10 and 11 three times, 12, 13, 14 twice
    vocab = ds.processor.vocabs["item_id"]
    assert vocab.values.tolist() == [10, 11] and len(vocab) == 3
    assert ds.processor.encode_sparse("item_id", [10, 11, 12, 13, 14, 15]).tolist() == [1, 2, 0, 0, 0, 0]


def test_hashing_is_stable_and_in_range():
    f = FeatureSpec(name="h", kind="sparse_id", table="t", hashing=True, num_embeddings=1001)
    vi = Vocabulary.fit(f, normalize_ids(pd.Series([1, 2, 3])))
    vs = Vocabulary.fit(f, normalize_ids(pd.Series(["a", "b"])))
    assert vi.values.size == 0 and len(vi) == 1001 and vi.hashing and vi.is_int and not vs.is_int
    # pinned: a changed hash would silently scramble every trained embedding table
    assert vi.encode([0, 1, 2, 12345, -7]).tolist() == [1, 790, 731, 874, 692]
    assert vs.encode(["a", "b", "zz", "user_42"]).tolist() == [521, 227, 461, 138]
    # int ids given as strings hash like the ints; string ids given as ints hash like the strings
    assert vi.encode(["0", "1", "2", "12345", "-7"]).tolist() == [1, 790, 731, 874, 692]
    assert vs.encode(pd.Series([42])).tolist() == vs.encode(["42"]).tolist()
    # range [1, n - 1] (0 stays the OOV/missing row) and a reasonable spread
    small = Vocabulary.fit(FeatureSpec(name="s", kind="sparse_id", table="t", hashing=True, num_embeddings=101),
                           np.arange(3, dtype=np.int64))
    codes = small.encode(np.arange(20_000))
    assert codes.min() >= 1 and codes.max() <= 100
    counts = np.bincount(codes, minlength=101)[1:]
    assert (counts > 0).all() and counts.max() < 2 * counts.mean()
    # hashing ignores the training ids: unseen ids are not OOV
    assert (vi.encode([10**12, 10**12 + 1]) > 0).all()


def test_int_ids_given_as_strings_map_correctly(tiny_ds):
    p = tiny_ds.processor
    assert p.vocabs["item_id"].is_int
    assert p.encode_sparse("item_id", ["10", "14", "12"]).tolist() == [1, 5, 3]
    assert p.encode_sparse("item_id", pd.Series(["11", "15", "x", "1.5", "10.5"])).tolist() == [2, 0, 0, 0, 0]
    assert p.encode_sparse("item_id", np.array([13.0, 12.0])).tolist() == [4, 3]
    with pytest.raises(SpecError, match="feature 'item_id'.*non-integral"):
        p.encode_sparse("item_id", [10.5])
    with pytest.raises(SpecError, match="feature 'item_id'.*NaN/missing id at row 1"):
        p.encode_sparse("item_id", [10.0, np.nan])


def test_string_ids_given_as_ints_map_correctly():
    f = FeatureSpec(name="zip", kind="sparse_id", table="users")
    v = Vocabulary.fit(f, normalize_ids(pd.Series(["7", "8", "x"])))
    assert not v.is_int and v.values.tolist() == ["7", "8", "x"]
    assert v.encode([8, 7, 9]).tolist() == [2, 1, 0]
    assert v.encode(["x", "8"]).tolist() == [3, 2]


def test_processor_json_round_trip(tiny_ds, tiny_spec):
    p = tiny_ds.processor
    q = FeatureProcessor.from_json(p.to_json())
    assert q.to_json() == p.to_json()
    tables = tiny_ds.tables
    for f in tiny_spec.features:
        col = tables[f.table][f.col]
        if f.kind == "sparse_id":
            a, b = p.encode_sparse(f.name, col), q.encode_sparse(f.name, col)
            np.testing.assert_array_equal(a, b)
            assert b.dtype == np.int64
        elif f.kind == "id_list":
            ja, jb = p.encode_list(f, col), q.encode_list(f, col)
            np.testing.assert_array_equal(ja.offsets, jb.offsets)
            np.testing.assert_array_equal(ja.values, jb.values)
        elif f.kind == "dense":
            np.testing.assert_array_equal(p.encode_dense(f.name, col.to_numpy()),
                                          q.encode_dense(f.name, col.to_numpy()))
    # unseen and string-typed ids behave the same after the round trip
    assert q.encode_sparse("item_id", ["10", 15, 99]).tolist() == [1, 0, 0]
    assert q.encode_sparse("gender", ["m", "f", "?"]).tolist() == [2, 1, 0]


def test_hashed_vocabulary_round_trip():
    f = FeatureSpec(name="h", kind="sparse_id", table="t", hashing=True, num_embeddings=64)
    p = FeatureProcessor.fit([f], {"t": pd.DataFrame({"h": ["a", "b", "c"]})})
    q = FeatureProcessor.from_json(p.to_json())
    ids = [f"id{i}" for i in range(500)]
    np.testing.assert_array_equal(p.encode_sparse("h", ids), q.encode_sparse("h", ids))


def test_split_lists_separator_and_list_cells():
    lengths, flat = split_lists(pd.Series(["a|b", "", None, "c||a"]), "|")
    assert lengths.tolist() == [2, 0, 0, 2] and flat.tolist() == ["a", "b", "c", "a"]
    # list cells: null elements and null cells are dropped consistently from lengths and values
    lengths, flat = split_lists(pd.Series([[1, None, 2], None, np.array([3]), []], dtype=object), None)
    assert lengths.tolist() == [2, 0, 1, 0] and flat.tolist() == [1, 2, 3]


def test_list_valued_id_list_column_from_parquet(tmp_path):
    pd.DataFrame({"user_id": [1, 2, 1, 2, 3, 3, 1, 2, 3, 1], "item_id": [1, 1, 2, 2, 3, 1, 3, 3, 2, 1],
                  "y": [1, 0] * 5}).to_parquet(tmp_path / "log.parquet")
    pd.DataFrame({"item_id": [1, 2, 3], "tags": [[5, 6], [7, None], None]}).to_parquet(tmp_path / "items.parquet")
    spec = FeatureSpecSet.from_dict({
        "name": "lists",
        "tables": {"interactions": {"path": "log.parquet", "key": ["user_id", "item_id"], "label": {"column": "y"}},
                   "items": {"path": "items.parquet", "key": "item_id"}},
        "features": [{"name": "user_id", "kind": "sparse_id", "table": "interactions"},
                     {"name": "tags", "kind": "id_list", "table": "items"}],
        "visibility": {"student": ["user_id", "tags"]},
        "split": {"by": "random", "valid": 0.1, "test": 0.1, "seed": 0}}, base_dir=str(tmp_path))
    ds = Dataset.build(spec)
    j = ds.lists["tags"]
    assert j.lengths.tolist() == [2, 1, 0, 0]  # 3 items + the missing row
    assert len(j.values) == j.offsets[-1]
    assert len(ds.fingerprint) == 16 and Dataset.build(spec).fingerprint == ds.fingerprint


# ============================================================================== dense transforms
def test_standardize_uses_training_statistics(tiny_ds):
    t = tiny_ds.processor.dense["year"]
    assert t.mean == pytest.approx(TRAIN_YEARS.mean()) == pytest.approx(1998.75)  # item 15 (2005) not used
    assert t.std == pytest.approx(TRAIN_YEARS.std())
    years = np.array([1990.0, 2000.0, 2010.0, np.nan, 1995.0, 2005.0])
    expected = np.where(np.isnan(years), 0.0, (years - 1998.75) / TRAIN_YEARS.std())
    np.testing.assert_allclose(tiny_ds.dense["year"][:6], expected, rtol=1e-6)
    assert tiny_ds.dense["year"][6] == 0.0  # missing-item row = the training mean
    assert tiny_ds.dense["year"].dtype == np.float32


def test_log1p_and_nan_imputation_counted(tiny_ds):
    logs = np.log1p([20.0, 30.0, 50.0])
    t = tiny_ds.processor.dense["age"]
    assert t.kind == "log1p" and t.std == 1.0
    assert t.mean == pytest.approx(logs.mean())  # NaN is imputed with the training mean (in log space)
    np.testing.assert_allclose(tiny_ds.dense["age"], [logs[0], logs[1], logs.mean(), logs[2], logs.mean()],
                               rtol=1e-6)
    assert tiny_ds.processor.nan_imputed == {"year": 1, "age": 1}
    assert tiny_ds.summary()["nan_imputed"] == {"year": 1, "age": 1}


@pytest.mark.parametrize("kind, expected", [
    ("none", [1.0, 3.0, 5.0, 3.0, 3.0]),
    ("log1p", list(np.log1p([1.0, 3.0, 5.0])) + [np.log1p([1.0, 3.0, 5.0]).mean()] * 2),
    ("standardize", [-np.sqrt(1.5), 0.0, np.sqrt(1.5), 0.0, 0.0]),
])
def test_dense_transform_kinds(kind, expected):
    f = FeatureSpec(name="x", kind="dense", table="t", transform=kind)
    t = DenseTransform.fit(f, np.array([1.0, 3.0, 5.0, np.nan]))
    v, n_nan = t.apply(np.array([1.0, 3.0, 5.0, np.nan, np.inf]))
    assert n_nan == 2 and v.dtype == np.float32
    np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-7)
    assert DenseTransform.from_dict(t.to_dict()) == t


def test_log1p_standardize_is_zero_mean_unit_std_on_train():
    f = FeatureSpec(name="x", kind="dense", table="t", transform="log1p_standardize")
    x = np.random.default_rng(0).lognormal(3, 1, 1000)
    v, _ = DenseTransform.fit(f, x).apply(x)
    assert abs(v.mean()) < 1e-5 and v.std() == pytest.approx(1.0, abs=1e-5)


def test_log1p_feature_with_negative_values_is_refused_naming_the_row(spec_file, capsys):
    """``log1p`` clips at 0: a column with negative values (refunds, deltas) would silently lose its sign,
    every negative value becoming the same 0. Validation refuses it, naming file, feature, column and row."""
    from appdistill.cli import main

    tables = make_tiny_tables()
    tables["users"].loc[3, "age"] = -5.0  # users.csv, feature 'age' has transform: log1p
    path = spec_file(tables=tables)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "users.csv', feature 'age', column 'age', row 3: value -5.0 is negative" in err, err
    assert "transform: standardize" in err and "Traceback" not in err
    tables["users"].loc[3, "age"] = 0.0  # zero is in log1p's domain
    assert main(["validate", str(spec_file(tables=tables))]) == 0


def test_pandas_categorical_id_columns_encode_like_plain_ones(tmp_path):
    """A parquet file written from pandas' ``category`` columns (common for tabular data) reads back as
    categoricals: they were refused ("got dtype category") while requests with the same column were
    scored; they now give the same vocabulary and codes as the plain column."""
    rng = np.random.default_rng(0)
    n = 200
    plain = pd.DataFrame({"row_id": [f"r{i}" for i in range(n)], "shop": rng.choice(["a", "b", "c", None], n),
                          "code": rng.integers(0, 5, n), "label": rng.integers(0, 2, n)})
    cat = plain.astype({"shop": "category", "code": "category"})
    cat.to_parquet(tmp_path / "t.parquet")
    assert isinstance(pd.read_parquet(tmp_path / "t.parquet")["shop"].dtype, pd.CategoricalDtype)
    raw = {"name": "cats", "tables": {"interactions": {"path": "t.parquet", "key": "row_id", "label": {"column": "label"}}},
           "features": [{"name": "shop", "kind": "sparse_id", "table": "interactions", "missing": "oov"},
                        {"name": "code", "kind": "sparse_id", "table": "interactions"}],
           "visibility": {"student": ["shop", "code"]}}
    spec = FeatureSpecSet.from_dict(raw, base_dir=str(tmp_path))
    ds_cat, ds_plain = Dataset.build(spec), Dataset.build(spec, {"interactions": plain})
    for f in ("shop", "code"):
        np.testing.assert_array_equal(ds_cat.sparse[f], ds_plain.sparse[f])
        assert ds_cat.processor.vocabs[f].to_dict() == ds_plain.processor.vocabs[f].to_dict()
    assert ds_cat.processor.vocabs["code"].is_int  # the categories' own type, not their string form
    np.testing.assert_array_equal(normalize_ids(cat["code"]), plain["code"].to_numpy())


def test_nullable_boolean_and_integer_dense_columns_are_imputed_not_a_traceback():
    """pandas' nullable ``boolean`` column with a missing value (a parquet file written from one) made
    ``Dataset.build`` fail with a TypeError traceback (``float()`` of ``pd.NA``); like the streamed fit, the
    in-memory one now reads NA as NaN and imputes it with the training mean."""
    n = 40
    t = pd.DataFrame({"row_id": np.arange(n), "c": np.arange(n) % 3, "label": np.arange(n) % 2,
                      "flag": pd.array([None if i % 10 == 0 else i % 4 == 0 for i in range(n)], dtype="boolean"),
                      "cnt": pd.array([None if i % 7 == 0 else i % 5 for i in range(n)], dtype="Int64")})
    spec = FeatureSpecSet.from_dict({
        "name": "nullable", "tables": {"interactions": {"path": "given.parquet", "key": "row_id", "label": {"column": "label"}}},
        "features": [{"name": "flag", "kind": "dense", "table": "interactions", "transform": "none"},
                     {"name": "cnt", "kind": "dense", "table": "interactions", "transform": "none"},
                     {"name": "c", "kind": "sparse_id", "table": "interactions"}],
        "visibility": {"student": ["flag", "cnt", "c"]}})
    ds = Dataset.build(spec, {"interactions": t})
    tr = ds.splits["train"]
    flag = t.flag.to_numpy(np.float64, na_value=np.nan)
    assert ds.processor.dense["flag"].mean == pytest.approx(np.nanmean(flag[tr]))
    np.testing.assert_allclose(ds.dense["flag"], np.where(np.isnan(flag), np.nanmean(flag[tr]), flag), rtol=1e-6)
    assert np.isfinite(ds.dense["cnt"]).all()


def test_constant_dense_column_does_not_divide_by_zero():
    f = FeatureSpec(name="x", kind="dense", table="t")
    t = DenseTransform.fit(f, np.full(5, 7.0))
    assert t.std == 1.0 and t.apply(np.array([7.0, 8.0]))[0].tolist() == [0.0, 1.0]


def test_encode_dense_rejects_strings(tiny_ds):
    with pytest.raises(SpecError, match="feature 'year'.*numeric"):
        tiny_ds.processor.encode_dense("year", np.array(["old", "new"], dtype=object))


def test_missing_side_table_rows_get_oov_and_imputed_values(tiny_spec, tiny_tables):
    inter = tiny_tables["interactions"]
    extra = pd.DataFrame({"user_id": [9], "item_id": [99], "rating": [5.0], "timestamp": [50]})  # first in time
    tables = {**tiny_tables, "interactions": pd.concat([extra, inter], ignore_index=True)}
    ds = Dataset.build(tiny_spec, tables)
    assert ds.table_rows["users"][0] == 4 and ds.table_rows["items"][0] == 6  # the extra "missing" rows
    assert ds.sparse["gender"][0] == 0 and ds.sparse["user_id"][0] > 0  # user 9 is a training interaction id
    assert ds.lists["genres"].lengths[6] == 0
    assert ds.dense["year"][6] == 0.0
    assert ds.dense["age"][4] == pytest.approx(np.log1p([20.0, 30.0, 50.0]).mean())


# ============================================================================== dataset
def test_dataset_summary_numbers(tiny_ds):
    s = tiny_ds.summary()
    assert s["interactions"] == 20 and s["positive_rate"] == 0.55
    assert s["splits"] == {"train": 12, "valid": 4, "test": 4}
    assert s["cold_test_rows"] == 2
    assert s["vocab_sizes"] == {"user_id": 5, "item_id": 6, "genres": 4, "gender": 3}
    assert tiny_ds.labels.dtype == np.float32
    assert tiny_ds.labels.tolist() == [float(r >= 4) for r in tiny_ds.tables["interactions"]["rating"]]
    assert tiny_ds.user_ids.tolist()[:4] == [0, 0, 1, 1] and tiny_ds.item_ids.tolist()[:4] == [0, 1, 0, 2]
    assert "title" not in tiny_ds.sparse and "title" not in tiny_ds.dense  # text is never encoded here


def test_dataset_fingerprint_tracks_data(tiny_spec, tiny_tables):
    a = Dataset.build(tiny_spec, {k: v.copy() for k, v in tiny_tables.items()})
    b = Dataset.build(tiny_spec, {k: v.copy() for k, v in tiny_tables.items()})
    assert a.fingerprint == b.fingerprint
    tiny_tables["items"].loc[0, "year"] = 1991.0
    assert Dataset.build(tiny_spec, tiny_tables).fingerprint != a.fingerprint


# ============================================================================== splits
def test_random_split_sizes():
    log = _log(1000)
    spec = _log_spec({"by": "random", "valid": 0.15, "test": 0.1, "seed": 7})
    s = split_rows(spec, log)
    assert {k: len(v) for k, v in s.items()} == {"train": 750, "valid": 150, "test": 100}
    allrows = np.concatenate(list(s.values()))
    assert np.array_equal(np.sort(allrows), np.arange(1000))
    assert all(np.array_equal(v, np.sort(v)) for v in s.values())
    again = split_rows(spec, log)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = split_rows(_log_spec({"by": "random", "valid": 0.15, "test": 0.1, "seed": 8}), log)
    assert not np.array_equal(s["test"], other["test"])


def test_time_split_orders_by_timestamp():
    log = _log(1000)
    ts = log["timestamp"].to_numpy()
    s = split_rows(_log_spec({"by": "time", "column": "timestamp", "valid": 0.1, "test": 0.2}), log)
    assert {k: len(v) for k, v in s.items()} == {"train": 700, "valid": 100, "test": 200}
    assert ts[s["test"]].min() >= ts[s["train"]].max()
    assert ts[s["valid"]].min() >= ts[s["train"]].max() and ts[s["test"]].min() >= ts[s["valid"]].max()


def test_time_split_with_ties_keeps_test_not_earlier_than_train():
    log = _log(1000)
    log["timestamp"] = log["timestamp"] // 500  # heavy ties
    ts = log["timestamp"].to_numpy()
    s = split_rows(_log_spec({"by": "time", "column": "timestamp", "valid": 0.1, "test": 0.1}), log)
    assert ts[s["test"]].min() >= ts[s["train"]].max()


def test_time_split_parses_date_strings_and_refuses_missing_or_junk_times():
    log = _log(1000)
    ts = log["timestamp"].to_numpy()
    days = pd.Timestamp("2020-01-01") + pd.to_timedelta(ts, unit="s")
    spec = _log_spec({"by": "time", "column": "timestamp", "valid": 0.1, "test": 0.2})
    want = split_rows(spec, log)
    # month/day/year strings sort wrongly as text ("12/..." before "2/..."); as dates they split as the numbers
    as_text = log.assign(timestamp=[f"{d.month}/{d.day}/{d.year} {d:%H:%M:%S}" for d in days])
    assert all(np.array_equal(split_rows(spec, as_text)[k], want[k]) for k in want)
    aware = log.assign(timestamp=pd.Series(days).dt.tz_localize("Europe/Paris"))
    assert all(np.array_equal(split_rows(spec, aware)[k], want[k]) for k in want)
    with pytest.raises(SpecError, match=r"column 'timestamp', row 7: missing time \(1 rows\)"):
        split_rows(spec, log.assign(timestamp=log["timestamp"].astype(float).where(log.index != 7)))
    junk = as_text.copy()
    junk.loc[3, "timestamp"] = "yesterday-ish"
    with pytest.raises(SpecError, match=r"column 'timestamp', row 3: 'yesterday-ish' is neither a number nor"):
        split_rows(spec, junk)


def test_cold_item_split():
    log = _log(2000, n_items=120)
    spec = _log_spec({"by": "cold_item", "valid": 0.1, "test": 0.1, "seed": 1})
    ds = Dataset.build(spec, {"interactions": log})
    s, items = ds.splits, log["item_id"].to_numpy()
    train_items = set(items[s["train"]])
    assert not train_items & set(items[s["test"]])
    assert not train_items & set(items[s["valid"]])
    assert not set(items[s["valid"]]) & set(items[s["test"]])
    assert len(s["test"]) >= 200 and len(s["valid"]) >= 1
    assert sum(len(v) for v in s.values()) == 2000
    assert ds.cold[s["test"]].all() and ds.cold[s["valid"]].all() and not ds.cold[s["train"]].any()
    assert (ds.sparse["item_id"][s["test"]] == 0).all()
    assert ds.summary()["cold_test_rows"] == len(s["test"])


def test_split_too_small_is_an_error():
    log = _log(3)
    with pytest.raises(SpecError, match="split 'random': the (valid|test) split is empty"):
        split_rows(_log_spec({"by": "random", "valid": 0.1, "test": 0.1}), log)


# ============================================================================== MovieLens-100K
def test_ml100k_loader():
    t = load_ml100k()
    inter, items, users = t["interactions"], t["items"], t["users"]
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943 == len(users)
    assert inter["item_id"].nunique() == 1682 == len(items)
    assert (inter["rating"] >= 4).mean() == pytest.approx(0.5537, abs=1e-4)
    assert set(inter["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert items["item_id"].is_unique and users["user_id"].is_unique
    assert items["genres"].str.contains("Action").sum() == 251  # MovieLens-100K has 251 action films
    assert items.loc[items["item_id"] == 1, "genres"].item() == "Animation|Children's|Comedy"
    assert users["gender"].isin(["M", "F"]).all() and users["age"].between(7, 73).all()


def test_ml100k_spec_builds():
    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs" / "ml100k.yaml")
    ds = Dataset.build(spec)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert float(ds.labels.mean()) == pytest.approx(0.5537, abs=1e-4)
    assert len(ds.processor.vocabs["user_id"]) == 944
    assert len(ds.processor.vocabs["genres"]) == 20  # 19 genres + OOV
    assert ds.processor.nan_imputed["year"] == 2  # two films without a release year


# ============================================================================== synthetic
SMALL = {"n_users": 1000, "n_items": 500, "n_interactions": 50_000}


def test_synthetic_tables_shape_and_types():
    t = generate(**SMALL, seed=0)
    inter, items, users = t["interactions"], t["items"], t["users"]
    assert len(inter) == 50_000 and len(items) == 500 and len(users) == 1000
    assert list(inter.columns) == ["user_id", "item_id", "click", "timestamp"]
    assert inter["user_id"].between(0, 999).all() and inter["item_id"].between(0, 499).all()
    assert set(inter["click"].unique()) == {0, 1}
    assert inter["timestamp"].is_monotonic_increasing
    assert items["text"].str.len().min() > 10 and items["genres"].str.len().min() > 0
    assert (items["image"] == [f"{i}.png" for i in range(500)]).all()


def test_synthetic_is_deterministic():
    a, b, c = generate(**SMALL, seed=0), generate(**SMALL, seed=0), generate(**SMALL, seed=1)
    assert _hash_tables(a) == _hash_tables(b)
    assert _hash_tables(a) != _hash_tables(c)
    assert not a["interactions"]["click"].equals(c["interactions"]["click"])


def test_synthetic_long_tail():
    inter = generate(**SMALL, seed=0)["interactions"]
    counts = np.sort(np.bincount(inter["item_id"], minlength=500))[::-1]
    top10 = counts[:50].sum() / counts.sum()
    assert top10 > 0.5  # measured ~0.74
    assert (counts > 0).sum() > 400  # but most of the catalogue is seen at least once


def test_synthetic_cold_items_only_in_late_part():
    def late_only(cold_fraction: float) -> tuple[int, float]:
        inter = generate(**SMALL, seed=2, cold_fraction=cold_fraction)["interactions"]
        q = np.quantile(inter["timestamp"], 0.9)
        early = set(inter.loc[inter["timestamp"] < q, "item_id"])
        late = inter[inter["timestamp"] >= q]
        new = ~late["item_id"].isin(early)
        return late.loc[new, "item_id"].nunique(), float(new.mean())

    n_new, share = late_only(0.1)
    assert 25 <= n_new <= 75  # ~10% of 500 items are released late
    assert 0.1 < share < 0.4  # and take ~30% of the late traffic
    n_new0, share0 = late_only(0.0)
    assert n_new0 <= 3 and share0 < 0.01


def test_synthetic_labels_follow_topic_taste():
    """A user's best topic (estimated on half of the log) predicts clicks on the other half."""
    t = generate(**SMALL, seed=0)
    inter = t["interactions"]
    primary = t["items"]["genres"].str.split("|").str[0].to_numpy()[inter["item_id"]]
    df = pd.DataFrame({"u": inter["user_id"], "topic": primary, "y": inter["click"]})
    half = (np.arange(len(df)) % 2 == 0)
    rate = df[half].groupby(["u", "topic"])["y"].agg(["mean", "size"]).reset_index()
    best = rate[rate["size"] >= 3].sort_values("mean").groupby("u").tail(1)
    other = df[~half]
    match = other["u"].map(dict(zip(best["u"], best["topic"]))) == other["topic"]
    assert match.mean() > 0.05
    assert other.loc[match, "y"].mean() > other.loc[~match, "y"].mean() + 0.2  # measured 0.75 vs 0.39


def test_synthetic_images(tmp_path):
    t = generate(n_users=20, n_items=12, n_interactions=300, seed=0, image_dir=str(tmp_path))
    from PIL import Image

    files = sorted(tmp_path.iterdir(), key=lambda p: int(p.stem))
    assert [p.name for p in files] == [f"{i}.png" for i in range(12)]
    assert all(p.stat().st_size < 8_000 for p in files)
    pixels = []
    for p in files:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
            pixels.append(np.asarray(im, dtype=np.float32))
    # the hue encodes the primary topic: images of different primary topics differ
    primary = t["items"]["genres"].str.split("|").str[0].to_numpy()
    a, b = next((i, j) for i in range(12) for j in range(12) if primary[i] != primary[j])
    assert np.abs(pixels[a].mean((0, 1)) - pixels[b].mean((0, 1))).max() > 5
    # images are written once and not rewritten
    mtimes = [p.stat().st_mtime_ns for p in files]
    generate(n_users=20, n_items=12, n_interactions=300, seed=0, image_dir=str(tmp_path))
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_synthetic_source_with_images(tmp_path, monkeypatch):
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path))
    t = load_synthetic(images=True, n_users=10, n_items=5, n_interactions=100, seed=0)
    paths = [Path(p) for p in t["items"]["image"]]
    assert all(p.is_file() and p.is_relative_to(tmp_path) for p in paths)
    assert _hash_tables({"i": t["interactions"]}) == _hash_tables(
        {"i": generate(n_users=10, n_items=5, n_interactions=100, seed=0)["interactions"]})


def test_synthetic_spec_loads_through_source():
    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs" / "synthetic.yaml")
    tables = load_tables(spec)
    assert len(tables["interactions"]) == 100_000 and len(tables["items"]) == 1000


def test_synthetic_interactions_are_those_of_earlier_versions():
    """The method benchmarks' synthetic tables were measured on these draws: a faster generator must
    draw the same (digest taken before the draws were rewritten for speed)."""
    inter = generate(**SMALL, seed=0)["interactions"]
    h = hashlib.sha256()
    for c in inter.columns:
        h.update(np.ascontiguousarray(inter[c].to_numpy()).tobytes())
    assert h.hexdigest()[:16] == "784240ec5dfe583e"


@pytest.mark.parametrize("weights", ["lognormal", "zipf_with_zeros", "one", "spiky"])
@pytest.mark.parametrize("size", [0, 1, 70_001])
def test_synthetic_choice_draws_what_numpy_choice_draws(weights, size):
    from appdistill.data.synthetic import _choice

    rng = np.random.default_rng(5)
    n = {"lognormal": 3_000, "zipf_with_zeros": 5_000, "one": 1, "spiky": 2_000}[weights]
    if weights == "lognormal":
        w = rng.lognormal(0, 2, n)
    elif weights == "zipf_with_zeros":
        w = (1.0 / np.arange(1, n + 1) ** 1.1)[rng.permutation(n)]
        w[rng.random(n) < 0.3] = 0  # flat stretches of the cumulative weights
    elif weights == "one":
        w = np.ones(1)
    else:  # a few huge weights among tiny ones: thousands of categories share one slice of the guide
        w = np.full(n, 1e-9)
        w[[3, 1000, 1999]] = 1.0
    p = w / w.sum()
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    assert np.array_equal(_choice(a, n, size, p), b.choice(n, size, p=p))
    assert a.random() == b.random()  # the stream is left where numpy leaves it


def test_synthetic_affinity_is_the_dense_topic_product():
    from appdistill.data.synthetic import _affinity

    rng = np.random.default_rng(0)
    n_users, n_items, n_topics = 300, 200, 6
    taste = rng.dirichlet(np.full(n_topics, 0.5), n_users).astype(np.float32)
    primary, secondary = rng.integers(0, n_topics, n_items), rng.integers(0, n_topics, n_items)
    secondary[:20] = primary[:20]  # one-topic items
    mix = np.zeros((n_items, n_topics), np.float32)
    mix[np.arange(n_items), primary] += 0.75
    mix[np.arange(n_items), secondary] += 0.25
    u, i = rng.integers(0, n_users, 100_000), rng.integers(0, n_items, 100_000)
    dense = (taste[u] * mix[i]).sum(1).astype(np.float64)
    assert np.array_equal(_affinity(taste, primary, secondary, mix, u, i), dense)  # bit for bit


@pytest.mark.slow
def test_synthetic_10m_interactions_is_fast():
    start = time.perf_counter()
    t = generate(n_users=200_000, n_items=50_000, n_interactions=10_000_000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(t["interactions"]) == 10_000_000 and len(t["items"]) == 50_000
    assert elapsed < 300, f"generate() took {elapsed:.0f} s for 10M interactions"  # measured ~8 s on 2 cores



@pytest.mark.parametrize("keys", [
    np.array([7, 3, 0, 12, 5], np.int64),                     # dense integer keys: the lookup table
    np.array([7, 3, 10**12], np.int64),                        # too sparse for a table: pandas' path
    np.array(["a", "7", "b"], dtype=object),                    # string keys
    pd.Series([4, 1, 9], dtype="int32"),                        # a key column of another integer width
])
def test_key_index_answers_as_pandas_get_indexer(keys) -> None:
    rng = np.random.default_rng(0)
    queries = [rng.integers(-5, 20, 500), np.array([10**12, -(2**62), 3]), np.array(["a", "x", "7"], dtype=object),
               pd.Series([1.0, 7.0, np.nan]), pd.Series(rng.integers(0, 15, 50), dtype="int16")]
    for q in queries:
        got = KeyIndex(keys).get_indexer(q)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, pd.Index(keys).get_indexer(q))
    assert KeyIndex(np.array([7, 3, 0, 12, 5]))._table is not None  # the fast path is taken where it can be
    with pytest.raises(Exception, match="unique"):  # duplicate keys are refused as pandas refuses them
        KeyIndex(np.array([1, 2, 2])).get_indexer(np.array([2]))


def test_non_numeric_label_or_dense_value_is_named_with_its_row(tmp_path):
    spec = FeatureSpecSet.from_dict({
        "name": "log",
        "tables": {"interactions": {"path": str(tmp_path / "log.csv"), "key": ["user_id", "item_id"],
                                    "label": {"column": "y"}}},
        "features": [{"name": "user_id", "kind": "sparse_id", "table": "interactions"},
                     {"name": "item_id", "kind": "sparse_id", "table": "interactions"},
                     {"name": "price", "kind": "dense", "table": "interactions"}],
        "visibility": {"student": ["user_id", "item_id", "price"]},
        "split": {"by": "random", "valid": 0.1, "test": 0.1},
    })
    log = _log(200).assign(price=np.linspace(0, 1, 200))
    bad_y = log.astype({"y": object})
    bad_y.loc[5, "y"] = "yes"
    bad_y.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(SpecError, match=r"column 'y', row 5 \(value 'yes'\): the label must be numeric"):
        Dataset.build(spec)
    bad_x = log.astype({"price": object})
    bad_x.loc[9, "price"] = "n/a?"
    bad_x.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(SpecError, match=r"feature 'price', column 'price', row 9 \(value 'n/a\?'\): kind 'dense' needs"):
        Dataset.build(spec)
