"""Interactions streamed from a folder of parquet files (``appdistill.features.streamed``): the same data
set as one file, cached columns reused and checked, bad chunks named by file and row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import appdistill.features.streamed as streamed
from appdistill.cli import main
from appdistill.config import load_config
from appdistill.data.synthetic import generate
from appdistill.errors import SpecError
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.pipeline import train

FEATURES = [
    {"name": "user_id", "kind": "sparse_id", "table": "interactions", "dim": 4},
    {"name": "item_id", "kind": "sparse_id", "table": "interactions", "dim": 4},
    {"name": "device", "kind": "sparse_id", "table": "interactions", "dim": 4, "missing": "oov"},
    {"name": "dwell", "kind": "dense", "table": "interactions", "transform": "log1p_standardize"},
    {"name": "genres", "kind": "id_list", "table": "items", "separator": "|", "dim": 4},
    {"name": "year", "kind": "dense", "table": "items"},
    {"name": "age", "kind": "dense", "table": "users"},
    {"name": "country", "kind": "sparse_id", "table": "users", "dim": 4},
]


def _spec_dict(interactions: str, by: str = "random") -> dict:
    return {"name": "streamy",
            "tables": {"interactions": {"path": interactions, "key": ["user_id", "item_id"], "label": {"column": "click"},
                                        "time_column": "timestamp"},
                       "items": {"path": "items.parquet", "key": "item_id"},
                       "users": {"path": "users.parquet", "key": "user_id"}},
            "features": FEATURES, "visibility": {"student": [f["name"] for f in FEATURES]},
            "split": {"by": by, "valid": 0.2, "test": 0.2, "column": "timestamp", "seed": 0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("streamed")
    t = generate(n_users=200, n_items=100, n_interactions=5000, seed=0)
    inter = t["interactions"]
    r = np.arange(len(inter))
    inter["dwell"] = np.where(r % 7 == 0, np.nan, r % 13).astype(float)  # NaN: imputed, counted
    inter["device"] = pd.Series(np.where(r % 5 == 0, None, np.array(["ios", "web", "tv"])[r % 3]), dtype=object)
    inter.to_parquet(d / "one.parquet", index=False)
    (d / "many").mkdir()
    for i, part in enumerate(np.array_split(r, 3)):
        inter.iloc[part].to_parquet(d / "many" / f"part-{i}.parquet", index=False)
    t["items"].to_parquet(d / "items.parquet", index=False)
    t["users"].to_parquet(d / "users.parquet", index=False)
    return d


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(streamed, "CHUNK_ROWS", 700)  # several chunks per file, chunks across file ends
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "cache"))


def _build(data: Path, interactions: str, by: str = "random") -> Dataset:
    return Dataset.build(FeatureSpecSet.from_dict(_spec_dict(interactions, by), base_dir=str(data)))


@pytest.mark.parametrize("by", ["random", "time", "cold_item"])
def test_a_folder_gives_the_data_set_of_one_file(data: Path, by: str) -> None:
    a, b = _build(data, "one.parquet", by), _build(data, "many", by)
    assert not a.streamed and b.streamed and isinstance(b.labels, np.memmap)
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.splits[k], b.splits[k])
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.cold, b.cold)
    for k in a.table_rows:
        np.testing.assert_array_equal(a.table_rows[k], b.table_rows[k])
    for k in a.sparse:
        np.testing.assert_array_equal(a.sparse[k], b.sparse[k], err_msg=k)
    for k in a.dense:
        np.testing.assert_allclose(a.dense[k], b.dense[k], atol=1e-6, err_msg=k)
    for k in a.lists:
        np.testing.assert_array_equal(a.lists[k].offsets, b.lists[k].offsets)
        np.testing.assert_array_equal(a.lists[k].values, b.lists[k].values)
    pa, pb = json.loads(a.processor.to_json()), json.loads(b.processor.to_json())
    assert pa["vocabs"] == pb["vocabs"]
    for k, v in pa["dense"].items():  # streamed moments: the same statistics up to float rounding
        assert pb["dense"][k]["kind"] == v["kind"]
        assert (pb["dense"][k]["mean"], pb["dense"][k]["std"]) == pytest.approx((v["mean"], v["std"]), rel=1e-12)
    assert a.processor.nan_imputed == b.processor.nan_imputed and a.processor.nan_imputed["dwell"] > 0
    assert a.join_coverage == b.join_coverage
    # user and item codes: another numbering of the same groups
    for x, y in ((a.user_ids, b.user_ids), (a.item_ids, b.item_ids)):
        assert len(set(zip(x.tolist(), y.tolist()))) == len(set(x.tolist())) == len(set(y.tolist()))
    a.spec = b.spec  # the fingerprint hashes the spec (its paths differ) and the same table contents
    assert a._fingerprint() == b.fingerprint


@pytest.mark.parametrize("shuffle", ["rows", "blocks"])
def test_training_from_a_folder_equals_training_from_one_file(data: Path, tmp_path: Path, shuffle: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import appdistill.features.batch as batch

    monkeypatch.setattr(batch, "SHUFFLE_BLOCK_ROWS", 256)  # several windows of several blocks
    monkeypatch.setattr(batch, "SHUFFLE_WINDOW_BLOCKS", 3)
    monkeypatch.setattr(batch, "RELEASE_ROWS", 500)
    released = []
    import appdistill.features.dataset as dataset

    monkeypatch.setattr(dataset, "release_mapped", lambda maps: released.append(len(maps)))
    metrics = []
    for inter in ("one.parquet", "many"):
        (data / f"spec-{inter}.yaml").write_text(yaml.safe_dump(_spec_dict(inter)))
        cfg_path = tmp_path / f"{inter}.yaml"
        cfg_path.write_text(yaml.safe_dump({"name": "s", "spec": str(data / f"spec-{inter}.yaml"), "seed": 0,
                                            "student": {"dense_arch": [8], "over_arch": [16]},
                                            "train": {"epochs": 2, "batch_size": 256, "prefetch": 0,
                                                      "shuffle": shuffle}}))
        metrics.append(train(load_config(cfg_path), tmp_path / f"run-{inter}", progress=False))
    a, b = metrics
    assert a["train"]["steps"] == b["train"]["steps"] > 0
    for split in ("test", "valid"):
        for k, v in a[split].items():
            if isinstance(v, float):
                assert b[split][k] == pytest.approx(v, abs=1e-9), (split, k)
    assert a["test"]["auc"] > 0.55
    # the streamed run releases its mapped columns while training and evaluating; in memory nothing is mapped
    assert len(released) > 12 and min(released) >= 8


def test_block_order_visits_every_row_once_a_window_of_blocks_at_a_time() -> None:
    from appdistill.features.batch import block_order

    # a short last block
    assert sorted(block_order(10_007, np.random.default_rng(0), block=100, window=4).tolist()) == list(range(10_007))
    rows = np.arange(1000, 1000 + 10_000) * 3
    a = rows[block_order(len(rows), np.random.default_rng(0), block=100, window=4)]
    assert sorted(a.tolist()) == rows.tolist() and not np.array_equal(a, rows)
    pos = {int(r): i for i, r in enumerate(rows)}
    for w in range(0, len(a), 400):  # each window: rows of at most 4 blocks of 100 consecutive entries
        assert len({pos[int(r)] // 100 for r in a[w:w + 400]}) <= 4
    assert not np.array_equal(a, rows[block_order(len(rows), np.random.default_rng(1), block=100, window=4)])


def test_columns_are_reused_and_a_damaged_one_is_rebuilt(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _build(data, "many")
    root = Path(first.streamed)
    labels = np.array(first.labels)
    encode = streamed._encode

    def refuse(*a, **k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(streamed, "_encode", refuse)
    again = _build(data, "many")  # reused: nothing encoded
    assert again.streamed == first.streamed
    np.testing.assert_array_equal(again.labels, labels)
    # a damaged column is never read: it fails its checksum and the columns are encoded again
    p = root / "labels.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(AssertionError, match="encoded again"):
        _build(data, "many")
    monkeypatch.setattr(streamed, "_encode", encode)
    fixed = _build(data, "many")
    np.testing.assert_array_equal(fixed.labels, labels)
    # a manifest cut short (valid JSON, keys missing) is not trusted either
    man = json.loads((root / streamed.MANIFEST).read_text())
    (root / streamed.MANIFEST).write_text(json.dumps({k: v for k, v in man.items() if k != "processor"}))
    np.testing.assert_array_equal(_build(data, "many").labels, labels)
    assert "processor" in json.loads((root / streamed.MANIFEST).read_text())
    # another file content (size, mtime) is another key: a new set of columns
    part = data / "many" / "part-0.parquet"
    st = part.stat()
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert _build(data, "many").streamed != first.streamed
    finally:
        os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))


def _folder(tmp: Path, data: Path, edit) -> Path:
    """A copy of ``data`` whose folder's second part file is ``edit(frame)``."""
    d = tmp / "edited"
    (d / "many").mkdir(parents=True)
    for name in ("items.parquet", "users.parquet"):
        (d / name).write_bytes((data / name).read_bytes())
    for i in range(3):
        df = pd.read_parquet(data / "many" / f"part-{i}.parquet")
        (edit(df) if i == 1 else df).to_parquet(d / "many" / f"part-{i}.parquet", index=False)
    return d


def _set(df: pd.DataFrame, row: int, col: str, value) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    df[col] = df[col].astype(object) if value is None else df[col].astype(type(value))
    df.loc[row, col] = value
    return df


@pytest.mark.parametrize("edit, message", [
    (lambda df: _set(df, 1500, "click", None), r"part-1\.parquet', column 'click', row 1500: missing label"),
    (lambda df: _set(df, 1200, "item_id", 1.5), r"part-1\.parquet', column 'item_id', row 1200: id 1\.5 is a non-int"),
    (lambda df: df.assign(user_id=df["user_id"].astype(str)), r"part-1\.parquet' holds string values"),
    (lambda df: df.drop(columns=["dwell"]), r"part-1\.parquet': columns .* differ from those of"),
])
def test_a_bad_part_file_is_named_with_its_row(data: Path, tmp_path: Path, edit, message: str) -> None:
    d = _folder(tmp_path, data, edit)
    with pytest.raises(SpecError, match=message):
        _build(d, "many")
    assert not any((tmp_path / "cache" / "columns").glob("streamy-*")), "a refused build leaves no columns"


def test_cli_validate_reads_a_folder_and_refuses_an_empty_one(data: Path, tmp_path: Path, capsys) -> None:
    spec = data / "spec-cli.yaml"
    spec.write_text(yaml.safe_dump(_spec_dict("many")))
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "5,000 rows" in out and "a folder: streamed" in out
    (tmp_path / "empty").mkdir()
    spec2 = tmp_path / "spec.yaml"
    spec2.write_text(yaml.safe_dump({**_spec_dict("empty"), "tables": {
        **_spec_dict("empty")["tables"], "items": {"path": str(data / "items.parquet"), "key": "item_id"},
        "users": {"path": str(data / "users.parquet"), "key": "user_id"}}}))
    assert main(["validate", str(spec2)]) == 2
    assert "is a directory without .parquet files" in capsys.readouterr().err


def test_a_negative_log1p_value_in_a_part_file_is_refused_with_its_row(data: Path, tmp_path: Path) -> None:
    d = _folder(tmp_path, data, lambda df: _set(df, 900, "dwell", -2.0))
    with pytest.raises(SpecError, match=r"part-1\.parquet'.*'dwell'.*row 900: value -2\.0 is negative"):
        _build(d, "many")


def test_counts_summed_over_chunks_equal_one_count() -> None:
    rng = np.random.default_rng(0)
    acc, chunks = streamed._Counts(), []
    for i in range(30):  # a growing id space: merges happen at irregular points
        chunks.append(rng.integers(0, 1000 * (i + 1), 500))
        acc.add(chunks[-1])
    u, c = acc.result()
    u2, c2 = np.unique(np.concatenate(chunks), return_counts=True)
    np.testing.assert_array_equal(u, u2)
    np.testing.assert_array_equal(c, c2)
    words = streamed._Counts()
    for w in (["b", "a"], ["c", "a"], []):
        words.add(np.array(w, dtype=object))
    assert words.result()[0].tolist() == ["a", "b", "c"] and words.result()[1].tolist() == [2, 1, 1]


def test_a_resume_with_another_training_order_is_refused(tmp_path: Path) -> None:
    from appdistill.errors import AppDistillError
    from appdistill.train import checkpoint as ckpt

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": "s", "spec": "x.yaml", "train": {"shuffle": "auto"}}))
    auto = load_config(cfg_path)
    blocks = auto.model_copy(update={"train": auto.train.model_copy(update={"shuffle": "blocks"})})
    rows = auto.model_copy(update={"train": auto.train.model_copy(update={"shuffle": "rows"})})
    ident = lambda cfg, streamed=False: ckpt.identity(cfg, "s", "d", {}, streamed)  # noqa: E731
    assert "shuffle" not in ident(auto) and ident(auto) == ident(rows)  # older checkpoints keep their identity
    assert ident(auto, streamed=True) == ident(blocks) != ident(rows)
    with pytest.raises(AppDistillError, match=r"training order \(train.shuffle\) differs"):
        ckpt._compare(tmp_path / "r.pt", ident(blocks), ident(rows))
    with pytest.raises(AppDistillError, match="training order"):
        ckpt._compare(tmp_path / "r.pt", ident(rows), ident(blocks))


def test_a_part_file_with_one_class_is_fine_the_folder_needs_both(data: Path, tmp_path: Path) -> None:
    # the rows sorted by label: part-0 (and its first chunks) holds negatives only
    d = tmp_path / "sorted"
    (d / "many").mkdir(parents=True)
    for name in ("items.parquet", "users.parquet"):
        (d / name).write_bytes((data / name).read_bytes())
    inter = pd.read_parquet(data / "one.parquet").sort_values("click", kind="stable").reset_index(drop=True)
    for i, part in enumerate(np.array_split(np.arange(len(inter)), 3)):
        inter.iloc[part].to_parquet(d / "many" / f"part-{i}.parquet", index=False)
    assert pd.read_parquet(d / "many" / "part-0.parquet")["click"].max() == 0
    ds = _build(d, "many")
    np.testing.assert_array_equal(ds.labels, inter["click"].to_numpy(np.float32))
    only_neg = tmp_path / "neg"
    (only_neg / "many").mkdir(parents=True)
    for name in ("items.parquet", "users.parquet"):
        (only_neg / name).write_bytes((data / name).read_bytes())
    inter[inter["click"] == 0].to_parquet(only_neg / "many" / "part-0.parquet", index=False)
    with pytest.raises(SpecError, match="every label is 0 after the transform; need both classes"):
        _build(only_neg, "many")
