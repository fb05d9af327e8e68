"""Batches (KJT + dense + labels) and the BatchLoader (ranks, drop_last, prefetch, hooks)."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch, BatchBuilder, BatchLoader, TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.processor import Jagged


@pytest.fixture
def tiny_ds(tiny_spec) -> Dataset:
    return Dataset.build(tiny_spec)


@pytest.fixture
def builder(tiny_ds, tiny_spec) -> BatchBuilder:
    return BatchBuilder(tiny_ds, tiny_spec.visible("student"))


def _rows(batch: Batch) -> list[int]:
    return batch.row_ids.tolist()


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.sparse.keys() == b.sparse.keys()
    for x, y in ((a.sparse.values(), b.sparse.values()), (a.sparse.lengths(), b.sparse.lengths()),
                 (a.dense, b.dense), (a.labels, b.labels), (a.row_ids, b.row_ids),
                 (a.user_ids, b.user_ids), (a.item_ids, b.item_ids)):
        assert torch.equal(x, y)


def _no_loader_thread() -> bool:
    return not any(t.name == "appdistill-loader" and t.is_alive() for t in threading.enumerate())


# ============================================================================== Batch contents
def test_kjt_matches_hand_computed_values(builder):
    # rows: (user 1, item 10), (2, 12), (3, 13), (1, 15: cold)
    # vocabularies (train rows 0-11): users 1..4 -> 1..4; items 10..14 -> 1..5, 15 -> OOV 0;
    # genres a, b, c -> 1, 2, 3; gender f, m -> 1, 2
    b = builder.build(np.array([0, 3, 4, 16]))
    kjt = b.sparse
    assert kjt.keys() == ["user_id", "item_id", "genres", "gender"]
    assert kjt.lengths().tolist() == [1, 1, 1, 1,  1, 1, 1, 1,  2, 0, 3, 2,  1, 1, 1, 1]
    assert kjt.values().tolist() == [1, 2, 3, 1,  1, 3, 4, 0,  1, 2, 3, 1, 2, 2, 3,  2, 1, 1, 2]
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int64
    per_key = kjt.to_dict()
    assert [x.tolist() for x in per_key["genres"].to_dense()] == [[1, 2], [], [3, 1, 2], [2, 3]]
    assert per_key["item_id"].values().tolist() == [1, 3, 4, 0]
    assert kjt.stride() == 4


def test_batch_dense_labels_and_ids(builder):
    rows = np.array([0, 3, 4, 16, 19])
    b = builder.build(rows)
    assert b.size == 5 and builder.dense_dim == 2
    assert b.dense.shape == (5, 2) and b.dense.dtype == torch.float32
    std = np.std([1990.0, 2000.0, 2010.0, 1995.0])
    log_mean = np.log1p([20.0, 30.0, 50.0]).mean()
    # items 10, 12, 13 (year NaN), 15, 13; users 1, 2, 3 (age NaN), 1, 4
    expected = [[(1990 - 1998.75) / std, np.log1p(20)], [(2010 - 1998.75) / std, np.log1p(30)],
                [0.0, log_mean], [(2005 - 1998.75) / std, np.log1p(20)], [0.0, np.log1p(50)]]
    np.testing.assert_allclose(b.dense.numpy(), expected, rtol=1e-6)
    assert b.labels.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0] and b.labels.dtype == torch.float32
    assert b.row_ids.tolist() == [0, 3, 4, 16, 19]
    assert b.user_ids.tolist() == [0, 1, 2, 0, 3] and b.item_ids.tolist() == [0, 2, 3, 5, 3]
    assert b.teacher == {} and b.to("cpu") is b


def test_batch_without_dense_features(tiny_ds, tiny_spec):
    b = BatchBuilder(tiny_ds, [tiny_spec.feature("item_id"), tiny_spec.feature("title")]).build(np.arange(3))
    assert b.dense.shape == (3, 0) and b.sparse.keys() == ["item_id"]  # text is not a batch feature
    assert b.sparse.values().tolist() == [1, 2, 1]


def test_empty_batch(builder):
    b = builder.build(np.zeros(0, np.int64))
    assert b.size == 0 and b.dense.shape == (0, 2) and b.sparse.values().numel() == 0
    assert b.sparse.lengths().tolist() == []


def test_jagged_take_matches_naive_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, 200)
    lengths[:10] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    j = Jagged(offsets, rng.integers(1, 1000, offsets[-1]).astype(np.int64))
    assert j.lengths.tolist() == lengths.tolist()
    for rows in (rng.integers(0, 200, 500), np.array([3, 3, 3]), np.arange(10), np.zeros(0, np.int64),
                 np.array([199, 0, 150])):
        got_len, got_val = j.take(rows)
        naive = [j.values[j.offsets[r]:j.offsets[r + 1]] for r in rows]
        assert got_len.tolist() == [len(x) for x in naive]
        assert got_val.tolist() == (np.concatenate(naive).tolist() if naive else [])


# ============================================================================== BatchLoader
def test_loader_covers_split_once(builder, tiny_ds):
    rows = tiny_ds.splits["train"]
    loader = BatchLoader(builder, rows, 5, prefetch=0)
    batches = list(loader)
    assert len(loader) == 3 and [b.size for b in batches] == [5, 5, 2]
    assert sum((_rows(b) for b in batches), []) == rows.tolist()  # no shuffle: in order


@pytest.mark.parametrize("n_rows, batch_size", [(20, 6), (20, 8), (19, 8), (20, 4), (3, 8)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_split_each_global_batch(builder, n_rows, batch_size, drop_last):
    rows = np.arange(n_rows)
    kw = dict(shuffle=True, seed=5, drop_last=drop_last, prefetch=0)
    single = [_rows(b) for b in BatchLoader(builder, rows, batch_size, **kw)]
    r0 = [_rows(b) for b in BatchLoader(builder, rows, batch_size, rank=0, world_size=2, **kw)]
    r1 = [_rows(b) for b in BatchLoader(builder, rows, batch_size, rank=1, world_size=2, **kw)]
    assert len(r0) == len(r1) == len(single)  # every rank steps together
    for a, b, s in zip(r0, r1, single):
        assert not set(a) & set(b)
        assert a + b == s
        assert abs(len(a) - len(b)) <= 1
        if len(s) == batch_size:
            assert len(a) == len(b) == batch_size // 2
    if drop_last:
        assert all(len(s) == batch_size for s in single)


def test_world_size_must_divide_batch_size(builder):
    with pytest.raises(ConfigError, match=r"divisible by the number of ranks \(4\)"):
        BatchLoader(builder, np.arange(20), 6, world_size=4)


def test_drop_last(builder):
    rows = np.arange(20)
    keep = BatchLoader(builder, rows, 6, prefetch=0)
    drop = BatchLoader(builder, rows, 6, drop_last=True, prefetch=0)
    assert len(keep) == 4 and [b.size for b in keep] == [6, 6, 6, 2]
    assert len(drop) == 3 and [b.size for b in drop] == [6, 6, 6]
    assert sum((_rows(b) for b in drop), []) == list(range(18))
    too_big = BatchLoader(builder, rows, 32, drop_last=True)
    assert len(too_big) == 0 and list(too_big) == []


def test_shuffle_per_epoch_and_resume(builder):
    rows = np.arange(20)
    loader = BatchLoader(builder, rows, 4, shuffle=True, seed=1, prefetch=0)
    e0 = [_rows(b) for b in loader]
    assert [_rows(b) for b in loader] == e0  # same epoch, same order
    assert sorted(sum(e0, [])) == list(range(20)) and sum(e0, []) != list(range(20))
    loader.set_epoch(1)
    e1 = [_rows(b) for b in loader]
    assert e1 != e0 and sorted(sum(e1, [])) == list(range(20))
    loader.set_epoch(1, start_step=3)
    assert [_rows(b) for b in loader] == e1[3:]


def test_prefetch_on_and_off_yield_identical_batches(builder):
    rows = np.arange(20)
    hook = lambda b: Batch(**{**b.__dict__, "teacher": {"t": TeacherOutput(b.labels * 2)}})  # noqa: E731
    kw = dict(shuffle=True, seed=3, hooks=[hook])
    inline = list(BatchLoader(builder, rows, 6, prefetch=0, **kw))
    for prefetch in (1, 4):
        threaded = list(BatchLoader(builder, rows, 6, prefetch=prefetch, **kw))
        assert len(threaded) == len(inline) == 4
        for a, b in zip(inline, threaded):
            _assert_batches_equal(a, b)
            assert torch.equal(a.teacher["t"].logits, b.teacher["t"].logits)
            assert torch.equal(b.teacher["t"].logits, b.labels * 2)
    assert _no_loader_thread()


@pytest.mark.parametrize("block_rows", [1, 7, 10_000])
def test_block_building_yields_the_same_batches(builder, block_rows):
    # blocks of 1 batch, of batches that straddle a block edge, and one block for the whole split;
    # the ragged last batch (20 rows, batch 6) is in every case
    rows = np.arange(20)
    one = list(BatchLoader(builder, rows, 6, shuffle=True, seed=1, prefetch=0, block_rows=1))
    got = list(BatchLoader(builder, rows, 6, shuffle=True, seed=1, prefetch=0, block_rows=block_rows))
    assert [b.size for b in got] == [6, 6, 6, 2]
    for a, b in zip(one, got):
        _assert_batches_equal(a, b)
    for b in got:
        # the per-key dict the loader fills must equal what torchrec computes from values/lengths
        fresh = KeyedJaggedTensor(keys=b.sparse.keys(), values=b.sparse.values(), lengths=b.sparse.lengths())
        ours, ref = b.sparse.to_dict(), fresh.to_dict()
        assert b.sparse.stride() == b.size and b.sparse.length_per_key() == fresh.length_per_key()
        assert b.sparse.offset_per_key() == fresh.offset_per_key()
        for k in ref:
            for x, y in ((ours[k].values(), ref[k].values()), (ours[k].lengths(), ref[k].lengths()),
                         (ours[k].offsets(), ref[k].offsets())):
                assert torch.equal(x, y), k


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("prefetch", [0, 2])
def test_hook_exception_propagates(builder, prefetch):
    calls = []

    def hook(batch: Batch) -> Batch:
        calls.append(batch.size)
        if len(calls) == 2:
            raise Boom("cache miss at step 1")
        return batch

    loader = BatchLoader(builder, np.arange(20), 4, prefetch=prefetch, hooks=[hook])
    seen = []
    with pytest.raises(Boom, match="cache miss at step 1"):
        for b in loader:
            seen.append(_rows(b))
    assert seen == [[0, 1, 2, 3]]
    assert calls == [4, 4]  # nothing is built after the failure
    for t in threading.enumerate():
        if t.name == "appdistill-loader":
            t.join(timeout=5)
    assert _no_loader_thread()


def test_breaking_out_of_a_prefetching_loader_stops_its_thread(builder):
    loader = BatchLoader(builder, np.arange(20), 2, prefetch=1)
    it = iter(loader)
    first = next(it)
    assert _rows(first) == [0, 1]
    it.close()
    assert _no_loader_thread()
    assert [_rows(b) for b in loader][-1] == [18, 19]  # a fresh iteration starts over


def test_serving_refuses_a_negative_value_of_a_log1p_feature_as_training_does(tiny_ds, tiny_spec) -> None:
    """Training refuses a negative value under log1p (it would become 0 like every other one); a
    request must not be clipped silently either: the row encoder names the column and row."""
    from appdistill.errors import AppDistillError
    from appdistill.features.row_encoder import RowEncoder

    feats = tiny_spec.visible("student")
    assert tiny_ds.processor.dense["age"].kind == "log1p"
    enc = RowEncoder(feats, tiny_ds.processor)
    rows = pd.DataFrame({f.col: [1.0, 1.0] if f.kind == "dense" else ["x", "y"] for f in feats})
    rows["user_id"], rows["item_id"] = [1, 2], [10, 12]
    rows["age"] = [20.0, np.nan]
    enc.encode(rows)  # NaN is a missing value, imputed as in training
    with pytest.raises(AppDistillError, match=r"column 'age', row 1: value -3\.0 is negative"):
        enc.encode(rows.assign(age=[20.0, -3.0]))
