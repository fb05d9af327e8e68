"""Teacher-output cache: build, reuse, refusal of stale caches, corruption, atomicity, join."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from appdistill.cache import (
    CacheCorruptError,
    CacheError,
    CacheJoin,
    CacheMismatchError,
    CacheMissingError,
    CacheRebuildWarning,
    TeacherCache,
    build_teacher_cache,
    get_or_build_cache,
)
from appdistill.cache.testing import FakeTeacher
from appdistill.features import BatchBuilder, BatchLoader, Dataset, FeatureSpecSet

REPO = Path(__file__).resolve().parents[1]
BS = 1024  # predict chunk: several chunks per split, so chunking is exercised


def _spec(n_interactions: int = 5000) -> FeatureSpecSet:
    raw = yaml.safe_load((REPO / "feature_specs" / "synthetic.yaml").read_text())
    raw["source"]["kwargs"].update(n_users=200, n_items=100, n_interactions=n_interactions)
    return FeatureSpecSet.from_dict(raw, source="synthetic.yaml", base_dir=str(REPO / "feature_specs"))


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return Dataset.build(_spec())


def _teacher(ds: Dataset, name: str = "lgbm", seed: int = 0) -> FakeTeacher:
    return FakeTeacher(ds.spec, name, float_taps={"h": 16}, int_taps={"leaves": 30}, seed=seed)


def _build(t: FakeTeacher, ds: Dataset, root: Path, **kw) -> TeacherCache:  # noqa: ANN003
    return get_or_build_cache(t, ds, root, batch_size=BS, progress=False, **kw)


def _assert_same(a, b) -> None:  # noqa: ANN001 - TeacherOutput
    assert torch.equal(a.logits, b.logits)
    assert a.hidden.keys() == b.hidden.keys()
    for k in a.hidden:
        assert a.hidden[k].dtype == b.hidden[k].dtype, k
        assert torch.equal(a.hidden[k], b.hidden[k]), k


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]


class _Recording(FakeTeacher):
    """A fake teacher that keeps the rows of every ``predict`` call, in the order asked."""

    def __init__(self, *args, asked: list, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kw)
        self.asked = asked

    def predict(self, ds, rows):  # noqa: ANN001, ANN202
        self.asked.append(np.asarray(rows).copy())
        return super().predict(ds, rows)


def _split_dir(cache: TeacherCache, split: str) -> Path:
    return cache.path / split


# ============================================================================= build + lookup
def test_build_then_lookup_equals_predict(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    assert cache.built == ["train", "valid", "test"] and not cache.rebuilt
    assert cache.n_rows == ds.n and cache.taps == ["h", "leaves"]
    assert cache.hidden_shapes() == {"h": (16,), "leaves": (30,)}
    # chunked: ceil(4000/1024) + 1 + 1 predict calls, every row exactly once
    assert t.calls == 4 + 1 + 1 and t.rows_predicted == ds.n
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        ids = rng.choice(ds.splits[split], 300)  # random order, duplicates included
        live = t.predict(ds, ids)
        _assert_same(cache.lookup(split, ids), live)
        _assert_same(cache.lookup(None, torch.from_numpy(ids)), live)
    mixed = rng.choice(ds.n, 500)  # rows of all three splits in one call
    _assert_same(cache.lookup(None, mixed), t.predict(ds, mixed))
    out = cache.lookup("train", ds.splits["train"][:7], taps=["leaves"], upcast=False)
    assert list(out.hidden) == ["leaves"] and out.hidden["leaves"].dtype == torch.int8  # "auto": the smallest type holding the declared leaf count


def test_rows_are_predicted_in_item_order_and_written_back_in_place(ds, tmp_path, monkeypatch):
    import appdistill.cache.builder as builder_mod

    monkeypatch.setattr(builder_mod, "RELEASE_ROWS", 2 * BS)  # windows of two predict chunks
    asked: list[np.ndarray] = []
    t = _Recording(ds.spec, "rec", float_taps={"h": 4}, int_taps={"leaves": 3}, asked=asked)
    cache = _build(t, ds, tmp_path, splits=["train"])
    train = ds.splits["train"]
    for w, lo in enumerate(range(0, len(train), 2 * BS)):
        got = np.concatenate(asked[2 * w:2 * w + 2])  # the window's rows, in the order they were asked
        assert np.array_equal(np.sort(got), train[lo:lo + 2 * BS])
        key = ds.item_ids[got] * (ds.user_ids.max() + 1) + ds.user_ids[got]
        assert (np.diff(key) >= 0).all()  # by item, then user: neighbouring table entries
        assert not np.array_equal(got, train[lo:lo + 2 * BS])  # the order did change
    _assert_same(cache.lookup("train", train), FakeTeacher.predict(t, ds, train))


def test_predict_all_asks_in_item_order_and_returns_in_the_callers_order(ds):
    asked: list[np.ndarray] = []
    t = _Recording(ds.spec, "rec", float_taps={"h": 4}, int_taps={"leaves": 3}, asked=asked)
    rows = np.random.default_rng(1).choice(ds.n, 3000)  # any order, duplicates included
    _assert_same(t.predict_all(ds, rows, batch_size=700), FakeTeacher.predict(t, ds, rows))
    got = np.concatenate(asked)
    key = ds.item_ids[got] * (ds.user_ids.max() + 1) + ds.user_ids[got]
    assert len(asked) == 5 and (np.diff(key) >= 0).all()


def test_layout_and_manifest(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    assert cache.path == tmp_path / "lgbm" / f"{t.identity_hash()}-{ds.fingerprint}"
    d = _split_dir(cache, "valid")
    assert sorted(p.name for p in d.iterdir()) == ["hidden.h.npy", "hidden.leaves.npy", "logits.npy",
                                                   "manifest.json", "rows.npy"]
    man = json.loads((d / "manifest.json").read_text())
    assert man["identity"] == json.loads(json.dumps(t.identity())) and man["fingerprint"] == ds.fingerprint
    assert man["split"] == "valid" and man["n_rows"] == len(ds.splits["valid"]) and man["appdistill_version"]
    n = len(ds.splits["valid"])
    expect = {"rows": ([n], "int64"), "logits": ([n], "float32"), "hidden.h": ([n, 16], "float32"),
              "hidden.leaves": ([n, 30], "int8")}
    import hashlib

    for key, (shape, dtype) in expect.items():
        info = man["shards"][key]
        f = d / info["file"]
        assert (info["shape"], info["dtype"]) == (shape, dtype)
        assert info["bytes"] == f.stat().st_size
        assert info["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    np.testing.assert_array_equal(np.load(d / "rows.npy"), ds.splits["valid"])


def test_float16_storage_and_upcast(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path, float_dtype="float16", int_dtype="int64")
    ids = ds.splits["test"][:50]
    out, live = cache.lookup("test", ids), t.predict(ds, ids)
    assert out.hidden["h"].dtype == torch.float32  # upcast: what a live teacher returns
    torch.testing.assert_close(out.hidden["h"], live.hidden["h"], atol=1e-3, rtol=1e-3)
    assert torch.equal(out.logits, live.logits)  # logits are always float32
    raw = cache.lookup("test", ids, upcast=False)
    assert raw.hidden["h"].dtype == torch.float16 and raw.hidden["leaves"].dtype == torch.int64
    # asking for float32 afterwards rebuilds (quietly: a setting changed, nothing is corrupt)
    calls = t.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        again = _build(t, ds, tmp_path)
    assert again.built == ["train", "valid", "test"] and t.calls > calls
    assert again.lookup("test", ids).hidden["h"].dtype == torch.float32


def test_int32_overflow_is_a_clear_error(ds, tmp_path):
    t = FakeTeacher(ds.spec, "big", float_taps={}, int_taps={"leaves": 2}, leaves=2**40, seed=2**35)
    with pytest.raises(CacheError, match=r"'leaves'.*outside int32.*int_dtype='int64'"):
        _build(t, ds, tmp_path)
    assert not _leftovers(tmp_path)
    assert _build(t, ds, tmp_path, int_dtype="int64").lookup("train", [0, 1]).hidden["leaves"].dtype == torch.int64


def test_absent_row_is_a_clear_error(ds, tmp_path):
    cache = _build(_teacher(ds), ds, tmp_path, splits=("train",))
    valid_row = int(ds.splits["valid"][0])
    with pytest.raises(CacheError, match=rf"teacher 'lgbm': 1 row ids are not in the cache's split 'train'.*"
                                         rf"{valid_row}"):
        cache.lookup("train", np.array([ds.splits["train"][0], valid_row]))
    with pytest.raises(CacheError, match=r"not in the cache's splits \['train'\]"):
        cache.lookup(None, np.array([ds.n + 5]))
    with pytest.raises(CacheError, match=r"split 'test' is not cached \(cached: \['train'\]\)"):
        cache.lookup("test", np.array([0]))
    full = _build(_teacher(ds), ds, tmp_path)
    with pytest.raises(CacheError, match=r"1 row ids are not in the cache's split 'train'.*in cached split\(s\) "
                                         r"\['valid'\]"):
        full.lookup("train", np.array([valid_row]))
    with pytest.raises(CacheError, match=r"no hidden taps \['nope'\]"):
        cache.lookup("train", ds.splits["train"][:2], taps=["nope"])


# ============================================================================= reuse + refusal
def test_second_get_or_build_reuses_without_predict(ds, tmp_path):
    _build(_teacher(ds), ds, tmp_path)
    t2 = _teacher(ds)  # a fresh object with the same identity (e.g. the teacher reloaded from disk)
    cache = _build(t2, ds, tmp_path, verify="checksum")
    assert t2.calls == 0 and cache.built == [] and not cache.rebuilt
    ids = ds.splits["train"][::37]
    _assert_same(cache.lookup("train", ids), t2.predict(ds, ids))
    reopened = TeacherCache.open(tmp_path, "lgbm", t2.identity(), ds.fingerprint, verify="checksum")
    assert reopened.splits == ["train", "valid", "test"] and reopened.n_rows == ds.n


def test_changed_identity_is_refused_with_clear_message(ds, tmp_path):
    old = _teacher(ds, seed=0)
    _build(old, ds, tmp_path)
    new = _teacher(ds, seed=1)  # refitted: another artefact hash
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache.open(tmp_path, "lgbm", new.identity(), ds.fingerprint)
    msg = str(e.value)
    assert "teacher 'lgbm'" in msg and "artifact hash" in msg
    assert repr(old.artifact_hash) in msg and repr(new.artifact_hash) in msg and "refusing" in msg
    # changed hyper-parameters are named too
    other = FakeTeacher(ds.spec, "lgbm", float_taps={"h": 16}, int_taps={"leaves": 30}, num_leaves=63)
    with pytest.raises(CacheMismatchError, match=r"identity field 'kwargs.num_leaves' absent \(cache\) vs 63"):
        TeacherCache.open(tmp_path, "lgbm", other.identity(), ds.fingerprint)
    # get_or_build never reuses the old outputs: it builds the new identity beside them
    cache = _build(new, ds, tmp_path)
    assert cache.built == ["train", "valid", "test"] and new.calls > 0
    _assert_same(cache.lookup("test", ds.splits["test"][:9]), new.predict(ds, ds.splits["test"][:9]))


def test_changed_fingerprint_is_refused_with_clear_message(ds, tmp_path):
    t = _teacher(ds)
    _build(t, ds, tmp_path)
    ds2 = Dataset.build(_spec(n_interactions=4000))  # other data
    assert ds2.fingerprint != ds.fingerprint
    with pytest.raises(CacheMismatchError) as e:
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds2.fingerprint)
    msg = str(e.value)
    assert "teacher 'lgbm'" in msg and "data fingerprint" in msg
    assert ds.fingerprint in msg and ds2.fingerprint in msg
    with pytest.raises(CacheMissingError, match="no cache"):
        TeacherCache.open(tmp_path, "nobody", t.identity(), ds.fingerprint)


def test_edited_manifest_identity_is_refused_and_rebuilt(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    mpath = _split_dir(cache, "test") / "manifest.json"
    man = json.loads(mpath.read_text())
    man["identity"]["artifact"] = "something-else"
    mpath.write_text(json.dumps(man))
    with pytest.raises(CacheMismatchError, match=r"artifact hash 'something-else' \(cache\)"):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint)
    t.calls = 0
    with pytest.warns(CacheRebuildWarning, match="artifact hash"):
        again = _build(t, ds, tmp_path)
    assert again.built == ["test"] and t.calls == 1
    TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="checksum")


# ============================================================================= corruption
def test_truncated_shard_detected_and_rebuilt(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    f = _split_dir(cache, "train") / "hidden.leaves.npy"
    size = f.stat().st_size
    del cache  # drop the memmaps before touching the file
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CacheCorruptError, match=rf"'{f}' has {size - 1000} bytes, its manifest says {size}"):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint)
    t.calls = 0
    with pytest.warns(CacheRebuildWarning, match="hidden.leaves.npy"):
        again = _build(t, ds, tmp_path)
    assert again.built == ["train"] and list(again.rebuilt) == ["train"]
    assert t.calls == 4  # only the train split is predicted again
    assert f.stat().st_size == size
    ids = ds.splits["train"][::13]
    _assert_same(again.lookup("train", ids), t.predict(ds, ids))
    assert not _leftovers(tmp_path)


def test_edited_byte_detected_with_checksum(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    f = _split_dir(cache, "valid") / "hidden.h.npy"
    del cache
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of data flipped
    f.write_bytes(bytes(data))
    TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="size")  # sizes only: not seen
    with pytest.raises(CacheCorruptError, match=rf"'{f}' fails its sha256 check"):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="checksum")
    t.calls = 0
    with pytest.warns(CacheRebuildWarning, match="sha256"):
        again = _build(t, ds, tmp_path, verify="checksum")
    assert again.built == ["valid"] and t.calls == 1
    TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="checksum")


def test_broken_npy_header_detected(ds, tmp_path):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    f = _split_dir(cache, "test") / "logits.npy"
    del cache
    data = bytearray(f.read_bytes())
    data[:6] = b"XXXXXX"  # magic string gone, size unchanged
    f.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=rf"'{f}' has an unreadable .npy header"):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="size")
    with pytest.warns(CacheRebuildWarning):
        assert _build(t, ds, tmp_path).built == ["test"]


# ============================================================================= atomicity
def test_crash_mid_build_leaves_no_half_cache(ds, tmp_path):
    t = _teacher(ds)
    t.fail_after = 2  # dies in the middle of the train split
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(t, ds, tmp_path)
    assert not _leftovers(tmp_path)
    kdir = tmp_path / "lgbm" / f"{t.identity_hash()}-{ds.fingerprint}"
    assert not (kdir / "train").exists()
    with pytest.raises(CacheMissingError):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint)
    # a crash while *re*building keeps the previous complete split
    t.fail_after = None
    good = _build(t, ds, tmp_path)
    before = (good.path / "train" / "manifest.json").read_text()
    t.fail_after, t.calls = 1, 0
    with pytest.raises(RuntimeError):
        build_teacher_cache(t, ds, tmp_path, batch_size=BS, progress=False)
    assert (good.path / "train" / "manifest.json").read_text() == before
    TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="checksum")
    assert not _leftovers(tmp_path)


def test_leftover_temp_dirs_of_killed_builds_are_cleaned(ds, tmp_path):
    t = _teacher(ds)
    kdir = tmp_path / "lgbm" / f"{t.identity_hash()}-{ds.fingerprint}"
    junk = kdir / ".train.deadbeef.tmp"  # the stage of a killed build, and a replaced split it left
    junk.mkdir(parents=True)
    (junk / "logits.npy").write_bytes(b"half")
    (kdir / ".train.abc.old" / "x").mkdir(parents=True)
    _build(t, ds, tmp_path)
    assert not _leftovers(tmp_path)
    # and the forced rebuild replaces a complete split without leaving anything behind
    cache = build_teacher_cache(t, ds, tmp_path, splits=("valid",), batch_size=BS, progress=False)
    assert cache.built == ["valid"] and not _leftovers(tmp_path)


# ============================================================================= join
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cache_join_fills_batches_via_loader_hooks(ds, tmp_path, prefetch):
    ta = _teacher(ds, "lgbm")
    tb = FakeTeacher(ds.spec, "dlrm", float_taps={"h": 32, "over": 8}, seed=3)
    caches = {"lgbm": _build(ta, ds, tmp_path), "dlrm": _build(tb, ds, tmp_path)}
    builder = BatchBuilder(ds, ds.spec.visible("student"))
    for split, join in (("train", CacheJoin(caches, split="train")), ("valid", CacheJoin(caches))):
        loader = BatchLoader(builder, ds.splits[split], 512, shuffle=True, prefetch=prefetch, hooks=[join])
        seen = 0
        for batch in loader:
            assert set(batch.teacher) == {"lgbm", "dlrm"}
            ids = batch.row_ids.numpy()
            _assert_same(batch.teacher["lgbm"], ta.predict(ds, ids))
            _assert_same(batch.teacher["dlrm"], tb.predict(ds, ids))
            assert batch.teacher["dlrm"].hidden["h"].shape == (batch.size, 32)
            seen += batch.size
        assert seen == len(ds.splits[split])


def test_cache_join_taps_and_errors(ds, tmp_path):
    cache = _build(_teacher(ds), ds, tmp_path)
    builder = BatchBuilder(ds, ds.spec.visible("student"))
    join = CacheJoin({"lgbm": cache}, split="test", taps={"lgbm": ["leaves"]})
    batch = next(iter(BatchLoader(builder, ds.splits["test"], 64, prefetch=0, hooks=[join])))
    assert list(batch.teacher["lgbm"].hidden) == ["leaves"]
    with pytest.raises(CacheError, match="unknown teachers"):
        CacheJoin({"lgbm": cache}, taps={"dlrm": ["h"]})
    # select(): only the teachers and taps a method reads (Method.cache_taps())
    logits_only = CacheJoin({"lgbm": cache}, split="test").select({"lgbm": []})
    batch = next(iter(BatchLoader(builder, ds.splits["test"], 64, prefetch=0, hooks=[logits_only])))
    assert batch.teacher["lgbm"].hidden == {} and batch.teacher["lgbm"].logits.shape == (64,)
    with pytest.raises(CacheError, match="no cache for teachers"):
        CacheJoin({"lgbm": cache}).select({"dlrm": []})
    wrong = BatchLoader(builder, ds.splits["train"], 64, prefetch=2, hooks=[join])  # train rows, test join
    with pytest.raises(CacheError, match="not in the cache's split 'test'"):
        next(iter(wrong))


# ============================================================================= pipeline
def test_build_caches_from_config(ds, tmp_path, capsys):
    from appdistill.config import config_from_dict
    from appdistill.pipeline import build_caches

    cfg = config_from_dict({"spec": str(REPO / "feature_specs" / "synthetic.yaml"),
                            "teachers": {"lightgbm": {"key": "lightgbm"}, "dlrm": {"key": "dlrm"}}})
    made = {n: FakeTeacher(ds.spec, n, float_taps={"h": 4}, seed=len(n)) for n in cfg.teachers}
    caches = build_caches(cfg, tmp_path, ds, teachers=made, progress=False)  # loaded teachers are used as given
    assert list(caches) == ["lightgbm", "dlrm"]
    out = capsys.readouterr().out
    assert "teacher cache lightgbm: built train,valid,test" in out and f"{ds.n:,} rows" in out and "MB" in out
    assert "taps {'h': (4,)}" in out if caches["lightgbm"].taps else "logits only" in out
    assert (tmp_path / "cache" / "dlrm").is_dir()
    calls = {n: t.calls for n, t in made.items()}
    caches = build_caches(cfg, tmp_path, ds, teachers=made, progress=False)
    assert "teacher cache dlrm: reused" in capsys.readouterr().out
    assert {n: t.calls for n, t in made.items()} == calls, "a reused cache asks no teacher anything"


def test_recycled_buffers_never_overwrite_live_outputs(ds, tmp_path):
    # big enough for the buffer pool (>= 64 KiB per tap): outputs still referenced must stay intact
    t = FakeTeacher(ds.spec, "wide", float_taps={"h": 64}, int_taps={"leaves": 32})
    cache = _build(t, ds, tmp_path)
    rows = ds.splits["train"]
    a_ids, b_ids = rows[:512], rows[512:1024]
    a = cache.lookup("train", a_ids)
    a_view = a.hidden["leaves"][3:9]  # a view keeps the buffer alive too
    a_h = a.hidden["h"]
    del a
    b = cache.lookup("train", b_ids)
    live_a = t.predict(ds, a_ids)
    assert torch.equal(a_h, live_a.hidden["h"]) and torch.equal(a_view, live_a.hidden["leaves"][3:9])
    assert a_h.data_ptr() != b.hidden["h"].data_ptr()
    ptr = b.hidden["h"].data_ptr()
    del b
    c = cache.lookup("train", a_ids)  # nothing holds b's buffers any more: they are reused
    assert c.hidden["h"].data_ptr() == ptr
    _assert_same(c, live_a)


def test_teacher_without_hidden_taps(ds, tmp_path):
    t = FakeTeacher(ds.spec, "logits_only", float_taps={})
    cache = _build(t, ds, tmp_path, splits=("test",))
    ids = ds.splits["test"][:20]
    out = cache.lookup("test", ids)
    assert out.hidden == {} and torch.equal(out.logits, t.predict(ds, ids).logits)


def test_auto_int_dtype_is_the_smallest_holding_the_declared_leaves(ds, tmp_path):
    for leaves, want in ((63, torch.int8), (128, torch.int8), (129, torch.int16), (40_000, torch.int32)):
        t = FakeTeacher(ds.spec, f"l{leaves}", float_taps={}, int_taps={"leaves": 3}, leaves=leaves)
        cache = _build(t, ds, tmp_path)
        got = cache.lookup("train", ds.splits["train"][:50], upcast=False).hidden["leaves"]
        assert got.dtype == want, leaves
        assert torch.equal(got.long(), t.predict(ds, ds.splits["train"][:50]).hidden["leaves"].long())
    # a cache stored with int32 earlier is rebuilt as int8 (asked for), not reinterpreted
    t = FakeTeacher(ds.spec, "old", float_taps={}, int_taps={"leaves": 3}, leaves=63)
    _build(t, ds, tmp_path, int_dtype="int32")
    assert _build(t, ds, tmp_path).built == ["train", "valid", "test"]


def test_cache_join_releases_mapped_pages_and_reads_the_same_after(ds, tmp_path, monkeypatch):
    import appdistill.cache.reader as reader

    ta = _teacher(ds, "lgbm")
    cache = _build(ta, ds, tmp_path)
    released = []
    for sh in cache.shards.values():
        real = sh.release
        monkeypatch.setattr(sh, "release", lambda real=real: released.append(1) or real())
    monkeypatch.setattr(reader, "RELEASE_ROWS", 200)
    builder = BatchBuilder(ds, ds.spec.visible("student"))
    loader = BatchLoader(builder, ds.splits["train"], 64, shuffle=True, prefetch=0,
                         hooks=[CacheJoin({"lgbm": cache}, split="train")])
    for batch in loader:  # values read through pages released and faulted back in are the same
        _assert_same(batch.teacher["lgbm"], ta.predict(ds, batch.row_ids.numpy()))
    assert len(released) >= len(ds.splits["train"]) // (200 + 64) * len(cache.shards) > 0
    assert all(sh.maps for sh in cache.shards.values())  # the memmaps behind every view are known


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's header line: "start-end perms offset dev inode path"
                inside = line.rstrip().endswith(str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps (Linux)")
def test_large_hidden_shards_are_read_without_mapping_them(ds, tmp_path, monkeypatch):
    import appdistill.cache.format as fmt

    monkeypatch.setattr(fmt, "MAP_BYTES", 0)  # every hidden shard counts as large
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    assert all(set(sh.files) == {"h", "leaves"} for sh in cache.shards.values())
    sh = cache.shards["train"]
    sh.release()
    ids = ds.splits["train"][::3]
    _assert_same(cache.lookup("train", ids), t.predict(ds, ids))
    _assert_same(cache.lookup("train", ids, upcast=False), cache.lookup("train", ids, upcast=False))
    # a batch spanning splits takes the per-split path
    mixed = np.concatenate([ds.splits["valid"][:40], ds.splits["train"][:70], ds.splits["test"][:5]])
    _assert_same(cache.lookup(None, mixed), t.predict(ds, mixed))
    assert _mapped_kb(sh.path / "hidden.h.npy") == 0, "positional reads must not map the shard"
    assert _mapped_kb(sh.path / "logits.npy") > 0  # logits are still read through the map
    # a shard cut short after it was opened is an error naming it, never short rows
    with open(sh.path / "hidden.h.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(CacheCorruptError, match="hidden.h.npy' ended before row"):
        cache.lookup("train", ids)


def test_cache_join_gathers_hidden_taps_only_when_read(ds, tmp_path, monkeypatch):
    t = _teacher(ds)
    cache = _build(t, ds, tmp_path)
    calls: list[str] = []
    real = cache.gather_tap
    monkeypatch.setattr(cache, "gather_tap", lambda loc, tap, upcast=True: calls.append(tap) or real(loc, tap, upcast))
    builder = BatchBuilder(ds, ds.spec.visible("student"))
    loader = BatchLoader(builder, ds.splits["train"], 256, shuffle=True, prefetch=2,
                         hooks=[CacheJoin({"lgbm": cache}, split="train")])
    batches = list(loader)
    assert calls == [] and all(b.teacher["lgbm"].logits.shape == (b.size,) for b in batches)
    b = batches[3]
    want = t.predict(ds, b.row_ids.numpy())
    assert torch.equal(b.teacher["lgbm"].hidden["h"], want.hidden["h"]) and calls == ["h"]
    assert b.teacher["lgbm"].hidden["h"] is b.teacher["lgbm"].hidden["h"] and calls == ["h"]  # read once
    moved = b.teacher["lgbm"].hidden.to("cpu")  # what Batch.to does on a device: still lazy
    assert calls == ["h"] and torch.equal(moved["leaves"], want.hidden["leaves"]) and calls == ["h", "leaves"]
    with pytest.raises(KeyError):
        b.teacher["lgbm"].hidden["nope"]
    eager = next(iter(BatchLoader(builder, ds.splits["train"][:256], 256, prefetch=0,
                                  hooks=[CacheJoin({"lgbm": cache}, split="train", lazy=False)])))
    assert isinstance(eager.teacher["lgbm"].hidden, dict) and calls[2:] == ["h", "leaves"]


def test_pages_released_while_writing_still_reach_the_files(ds, tmp_path, monkeypatch):
    import appdistill.cache.builder as builder_mod

    monkeypatch.setattr(builder_mod, "RELEASE_ROWS", 1)  # release after every predicted chunk
    t = _teacher(ds, "lgbm")
    cache = _build(t, ds, tmp_path)
    for split in ("train", "valid", "test"):
        rows = ds.splits[split]
        _assert_same(cache.lookup(split, rows), t.predict(ds, rows))
    TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint, verify="checksum")


# ============================================================================= logits-only caches
def test_logits_only_cache_and_taps_on_demand(ds, tmp_path):
    t = _teacher(ds)
    lean = _build(t, ds, tmp_path, hidden=False)
    assert lean.taps == [] and lean.built == ["train", "valid", "test"]
    assert sorted(p.name for p in _split_dir(lean, "train").iterdir()) == ["logits.npy", "manifest.json", "rows.npy"]
    ids = ds.splits["valid"][::7]
    assert torch.equal(lean.lookup("valid", ids).logits, t.predict(ds, ids).logits)
    assert lean.lookup("valid", ids).hidden == {}
    with pytest.raises(CacheMissingError, match="holds logits only; every hidden tap was asked"):
        TeacherCache.open(tmp_path, "lgbm", t.identity(), ds.fingerprint)
    # a method that reads taps: every split is built again with them, no corruption warning
    t.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        full = _build(t, ds, tmp_path, hidden=True)
    assert full.built == ["train", "valid", "test"] and t.calls > 0 and full.taps == ["h", "leaves"]
    _assert_same(full.lookup("valid", ids), t.predict(ds, ids))
    # a logits-only reader reuses the full cache and never reads its taps: a flipped byte in a
    # hidden shard is not its concern (and is caught by the next reader of the taps)
    f = _split_dir(full, "valid") / "hidden.h.npy"
    del full
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    t.calls = 0
    again = _build(t, ds, tmp_path, hidden=False, verify="checksum")
    assert again.built == [] and t.calls == 0 and again.taps == []
    assert torch.equal(again.lookup("valid", ids).logits, t.predict(ds, ids).logits)
    with pytest.warns(CacheRebuildWarning, match="sha256"):
        fixed = _build(t, ds, tmp_path, hidden=True, verify="checksum")
    assert fixed.built == ["valid"]


def test_taps_of_some_kinds_only_and_taps_a_teacher_declares_later(ds, tmp_path):
    """``hidden=("leaves",)`` stores that kind's taps only; a full request rebuilds, a request for
    those taps reuses a full cache; a split built before the teacher declared a tap is rebuilt."""
    t = _teacher(ds)
    some = _build(t, ds, tmp_path, hidden=("leaves",))
    assert some.taps == ["leaves"] and "hidden.h.npy" not in {p.name for p in _split_dir(some, "train").iterdir()}
    ids = ds.splits["valid"][::7]
    torch.testing.assert_close(some.lookup("valid", ids).hidden["leaves"], t.predict(ds, ids).hidden["leaves"])
    t.calls = 0
    assert _build(t, ds, tmp_path, hidden=("leaves",)).built == [] and t.calls == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        full = _build(t, ds, tmp_path, hidden=True)
    assert full.built == ["train", "valid", "test"] and full.taps == ["h", "leaves"]
    t.calls = 0
    again = _build(t, ds, tmp_path, hidden=("leaves",))
    assert again.built == [] and t.calls == 0 and again.taps == ["leaves"]
    assert _build(t, ds, tmp_path, hidden=("parts",)).taps == []  # no tap of that kind: logits only
    # the teacher now declares (and returns) one more tap, as LightGBM's "parts" came after its leaves
    t.float_taps = {**t.float_taps, "extra": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        grown = _build(t, ds, tmp_path, hidden=True)
    assert grown.path == full.path and grown.built == ["train", "valid", "test"]
    assert sorted(grown.taps) == ["extra", "h", "leaves"]


def test_build_caches_stores_taps_only_for_methods_that_read_them(ds, tmp_path):
    from appdistill.config import config_from_dict
    from appdistill.pipeline import build_caches

    def cfg(method):  # noqa: ANN001, ANN202
        return config_from_dict({"spec": str(REPO / "feature_specs" / "synthetic.yaml"), "method": method,
                                 "teachers": {"lightgbm": {"key": "lightgbm"}}})

    t = {"lightgbm": FakeTeacher(ds.spec, "lightgbm", float_taps={"h": 4})}
    lean = build_caches(cfg({"key": "diverse_distill"}), tmp_path, ds, teachers=t, progress=False, echo=str)
    assert lean["lightgbm"].taps == []
    for method in ({"key": "diverse_distill", "kwargs": {"committee_path": {"every": 2}}}, {"key": "talking"}):
        full = build_caches(cfg(method), tmp_path, ds, teachers=t, progress=False, echo=str)
        assert full["lightgbm"].taps == ["h"], method
    assert build_caches(cfg({"key": "kd"}), tmp_path, ds, teachers=t, progress=False, echo=str)["lightgbm"].built == []
