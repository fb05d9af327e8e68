"""Embedding store: reuse, incremental rebuilds, identity changes, corruption, atomic writes.

A deterministic counting encoder stands in for a real model, so these tests take well under a
second; tests/test_foundation.py runs the store with the real MiniLM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appdistill.errors import AppDistillError
from appdistill.foundation import ENCODERS, EmbeddingStore, Encoder, StoreError, StoreRebuildWarning
from appdistill.foundation.base import EncodedBatch, hash_strings


class CountingEncoder(Encoder):
    """Text -> deterministic vector; counts how many inputs it encoded and in how many calls."""

    name = "counting"
    modality = "text"

    def __init__(self, version: str = "v1", dim: int = 8, fail_after: int | None = None) -> None:
        super().__init__()
        self.version, self.dim, self.fail_after = version, dim, fail_after
        self.encoded = 0
        self.calls = 0

    @property
    def outputs(self) -> list[str]:
        return ["final", "layer1"]

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def weights_digest(self) -> str:
        return self.version

    def input_keys(self, inputs: Sequence[Any]) -> np.ndarray:
        return hash_strings([str(v) for v in inputs])

    def output_dims(self) -> dict[str, int]:
        return {"final": self.dim, "layer1": self.dim}

    def vector(self, text: str) -> np.ndarray:
        raw = hashlib.sha256((self.version + text).encode()).digest()[: self.dim]
        return np.frombuffer(raw, np.uint8).astype(np.float32) / 255.0

    def encode_batches(self, inputs: Sequence[Any]) -> Iterator[EncodedBatch]:
        self.calls += 1
        for s in range(0, len(inputs), 3):
            if self.fail_after is not None and self.encoded >= self.fail_after:
                raise RuntimeError("encoder crashed")
            pos = np.arange(s, min(len(inputs), s + 3))
            v = np.stack([self.vector(str(inputs[i])) for i in pos])
            self.encoded += len(pos)
            yield pos, {"final": v, "layer1": v * 2}


def texts(n: int) -> list[str]:
    return [f"item number {i} " + "x" * (i % 5) for i in range(n)]


@pytest.fixture()
def store(tmp_path: Path) -> EmbeddingStore:
    return EmbeddingStore(tmp_path / "emb", dtype="float32", progress=False)


def test_first_build_then_second_build_encodes_nothing(store: EmbeddingStore) -> None:
    enc, ids, xs = CountingEncoder(), list(range(100, 110)), texts(10)
    e1 = store.get_or_build_all(enc, "title", ids, xs)
    assert enc.encoded == 10 and e1["final"].n_encoded == 10 and e1["final"].reason == "new store"
    assert e1["final"].matrix.shape == (10, 8) and isinstance(e1["final"].matrix, np.memmap)
    np.testing.assert_allclose(e1["final"].matrix[3], enc.vector(xs[3]))
    np.testing.assert_allclose(e1["layer1"].matrix[3], 2 * enc.vector(xs[3]))
    assert e1["final"].index[103] == 3

    enc2 = CountingEncoder()  # a fresh process would build a fresh encoder
    e2 = store.get_or_build(enc2, "title", ids, xs)
    assert enc2.calls == 0 and enc2.encoded == 0 and e2.n_encoded == 0 and e2.reason is None
    np.testing.assert_array_equal(e2.matrix, e1["final"].matrix)


def test_manifest_records_identity_ids_fingerprint_and_checksum(store: EmbeddingStore) -> None:
    enc = CountingEncoder()
    e = store.get_or_build(enc, "title", ["a", "b", "c"], ["x", "y", "z"])
    man = json.loads((e.path.parent / "manifest.json").read_text())
    assert man["encoder"] == enc.identity() and man["field"] == "title" and man["layer"] == "final"
    assert man["item_ids"] == ["a", "b", "c"] and man["dim"] == 8 and man["dtype"] == "float32"
    assert man["files"]["matrix.npy"] == hashlib.sha256(e.path.read_bytes()).hexdigest()
    assert len(man["data_fingerprint"]) == 64
    np.testing.assert_array_equal(e.rows(["c", "zz"]), [2, -1])
    assert not e.lookup(["zz"]).any()


def test_changed_catalogue_encodes_only_changed_rows(store: EmbeddingStore) -> None:
    enc, ids, xs = CountingEncoder(), list(range(20)), texts(20)
    store.get_or_build_all(enc, "title", ids, xs)
    xs2 = list(xs)
    xs2[5] = "an edited description"
    ids2, xs2 = ids + [99], xs2 + ["a brand new item"]
    enc.encoded = 0
    e = store.get_or_build_all(enc, "title", ids2, xs2)
    assert enc.encoded == 2 and e["final"].n_encoded == 2 and e["final"].n_reused == 19
    assert e["final"].reason == "catalogue changed"
    fresh = EmbeddingStore(store.root.parent / "fresh", dtype="float32", progress=False)
    ref = fresh.get_or_build_all(CountingEncoder(), "title", ids2, xs2)
    for layer in ("final", "layer1"):
        np.testing.assert_array_equal(e[layer].matrix, ref[layer].matrix)
    # reordering the catalogue reuses every row
    enc.encoded = 0
    e3 = store.get_or_build(enc, "title", ids2[::-1], xs2[::-1])
    assert enc.encoded == 0 and e3.n_reused == 21
    np.testing.assert_array_equal(e3.matrix[0], ref["final"].matrix[-1])


def test_duplicate_inputs_are_encoded_once_and_duplicate_ids_refused(store: EmbeddingStore) -> None:
    enc = CountingEncoder()
    e = store.get_or_build(enc, "title", [1, 2, 3, 4], ["same", "same", "other", "same"])
    assert enc.encoded == 2
    np.testing.assert_array_equal(e.matrix[3], e.matrix[0])
    with pytest.raises(AppDistillError, match="duplicate item id 1"):
        store.get_or_build(enc, "title", [1, 1], ["a", "b"])


def test_changed_model_rebuilds_only_its_store(store: EmbeddingStore) -> None:
    ids, xs = list(range(6)), texts(6)
    store.get_or_build(CountingEncoder("v1"), "title", ids, xs)
    other = store.get_or_build(CountingEncoder("v1"), "description", ids, xs)
    other_manifest = (other.path.parent / "manifest.json").read_bytes()
    enc2 = CountingEncoder("v2")  # same config, different weights
    e = store.get_or_build(enc2, "title", ids, xs)
    assert e.reason == "encoder changed" and enc2.encoded == 6 and e.n_reused == 0
    np.testing.assert_allclose(e.matrix[0], enc2.vector(xs[0]))
    assert (other.path.parent / "manifest.json").read_bytes() == other_manifest
    enc3 = CountingEncoder("v1")
    assert store.get_or_build(enc3, "description", ids, xs).n_encoded == 0 and enc3.calls == 0


def test_truncated_store_is_detected_and_rebuilt(store: EmbeddingStore) -> None:
    ids, xs = list(range(9)), texts(9)
    e = store.get_or_build(CountingEncoder(), "title", ids, xs)
    good = np.array(e.matrix)
    data = e.path.read_bytes()
    e.path.write_bytes(data[: len(data) - 20])
    enc = CountingEncoder()
    with pytest.warns(StoreRebuildWarning, match="truncated"):
        e2 = store.get_or_build(enc, "title", ids, xs)
    # the view is rebuilt from the content pool: nothing is encoded again
    assert enc.encoded == 0 and e2.n_reused == 9 and e2.reason.startswith("corrupt")
    np.testing.assert_array_equal(e2.matrix, good)


def test_edited_store_is_detected_by_checksum(store: EmbeddingStore) -> None:
    ids, xs = list(range(9)), texts(9)
    e = store.get_or_build(CountingEncoder(), "title", ids, xs)
    data = bytearray(e.path.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    e.path.write_bytes(bytes(data))
    strict = EmbeddingStore(store.root, dtype="float32", rebuild_corrupt=False, progress=False)
    with pytest.raises(StoreError, match="does not match its checksum"):
        strict.get_or_build(CountingEncoder(), "title", ids, xs)
    with pytest.raises(StoreError, match="not usable"):
        strict.load(CountingEncoder(), "title")
    enc = CountingEncoder()
    with pytest.warns(StoreRebuildWarning, match="sha256"):
        assert store.get_or_build(enc, "title", ids, xs).n_encoded == 0  # rebuilt from the pool
    assert store.load(CountingEncoder(), "title").matrix.shape == (9, 8)
    np.testing.assert_allclose(store.load(CountingEncoder(), "title").matrix[2], enc.vector(xs[2]))


def test_atomic_writes_leave_no_temp_files_even_when_encoding_fails(store: EmbeddingStore) -> None:
    ids, xs = list(range(12)), texts(12)
    e = store.get_or_build_all(CountingEncoder(), "title", ids, xs)
    d = e["final"].path.parent.parent
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == [
        ".lock", "final", "final/keys.npy", "final/manifest.json", "final/matrix.npy",
        "layer1", "layer1/keys.npy", "layer1/manifest.json", "layer1/matrix.npy"]
    before = e["final"].path.read_bytes()
    with pytest.raises(RuntimeError, match="crashed"):
        store.get_or_build_all(CountingEncoder(fail_after=3), "title", ids, [x + "!" for x in xs])
    assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")]
    assert e["final"].path.read_bytes() == before  # the old store is intact and still valid
    assert store.get_or_build(CountingEncoder(), "title", ids, xs).n_encoded == 0


def test_float16_storage_and_registry_names(tmp_path: Path) -> None:
    s = EmbeddingStore(tmp_path, progress=False)
    e = s.get_or_build(CountingEncoder(), "title", [1, 2], ["a", "b"])
    assert e.matrix.dtype == np.float16 and e.manifest.dtype == "float16"
    # a dtype change is a rebuild, not a silent reinterpretation
    assert EmbeddingStore(tmp_path, dtype="float32", progress=False).get_or_build(
        CountingEncoder(), "title", [1, 2], ["a", "b"]).reason.startswith("dtype changed")
    assert {"minilm", "sentence_transformer", "clip"} <= set(ENCODERS.names())
    with pytest.raises(AppDistillError, match="no outputs"):
        s.get_or_build(CountingEncoder(), "title", [1], ["a"], layer="layer9")


def test_alternating_data_sets_encode_nothing_already_encoded(store: EmbeddingStore) -> None:
    """Two data sets that both have a ``title`` feature share its view; the content pool keeps every
    vector, so switching back and forth only copies rows (and a text shared by both is encoded once)."""
    a_ids, a_xs = list(range(10)), texts(10)
    b_ids, b_xs = [f"m{i}" for i in range(8)], [f"another catalogue {i}" for i in range(7)] + [a_xs[3]]
    enc = CountingEncoder()
    store.get_or_build(enc, "title", a_ids, a_xs)
    b = store.get_or_build(enc, "title", b_ids, b_xs)
    assert enc.encoded == 17 and b.n_encoded == 7 and b.n_reused == 1  # a_xs[3] came from the pool
    for _ in range(2):
        enc2 = CountingEncoder()
        a = store.get_or_build(enc2, "title", a_ids, a_xs)
        b = store.get_or_build(enc2, "title", b_ids, b_xs)
        assert enc2.encoded == 0 and enc2.calls == 0 and a.reason == "catalogue changed"
    np.testing.assert_allclose(a.matrix[4], enc.vector(a_xs[4]))
    np.testing.assert_allclose(b.matrix[7], enc.vector(a_xs[3]))
    # another field with the same inputs reads the same pool; another model never does
    assert store.get_or_build(CountingEncoder(), "description", a_ids, a_xs).n_encoded == 0
    assert store.get_or_build(CountingEncoder("v2"), "title", a_ids, a_xs).n_encoded == 10


def test_pool_segments_are_merged_and_a_corrupt_one_is_dropped(store: EmbeddingStore) -> None:
    from appdistill.foundation.pool import MAX_SEGMENTS, ContentPool

    enc = CountingEncoder()
    for i in range(MAX_SEGMENTS + 2):  # every build that encodes adds one segment
        store.get_or_build(enc, "title", [0, 1], [f"text {i}", f"other {i}"])
    pool = ContentPool(store.root, enc.identity(), "float32", "final")
    assert 1 <= len(pool.segments()) <= MAX_SEGMENTS
    assert (pool.find(enc.input_keys(["text 0", "other 9"]))[0] >= 0).all()
    # flip a byte of one segment: it is refused (strict) or dropped with a warning, its inputs encoded again
    seg = pool.segments()[0]
    data = bytearray((seg.path / "vectors.npy").read_bytes())
    data[-1] ^= 0xFF
    (seg.path / "vectors.npy").write_bytes(bytes(data))
    strict = EmbeddingStore(store.root, dtype="float32", rebuild_corrupt=False, progress=False)
    with pytest.raises(StoreError, match="vectors.npy' does not match its checksum"):
        strict.get_or_build(CountingEncoder(), "title", [5], ["text 0"])
    enc2 = CountingEncoder()
    with pytest.warns(StoreRebuildWarning, match="does not match its checksum"):
        e = store.get_or_build(enc2, "title", [5], ["text 0"])
    assert not seg.path.exists()
    np.testing.assert_allclose(e.matrix[0], enc2.vector("text 0"))
