"""Vocabularies and dense transforms, fitted on the training split only.

Index 0 of every sparse table is the OOV/missing bucket: unseen ids at evaluation or serving time
map there and never crash. ``hashing: true`` maps ids by a stable 64-bit hash
(:func:`pandas.util.hash_array`, fixed key) into ``num_embeddings - 1`` buckets instead, for id
spaces too large to enumerate. All operations are vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.features.spec import FeatureSpec


#: the largest float32: dense values beyond it (or infinite) become inf in the model and NaN scores
F32_MAX = float(np.finfo(np.float32).max)


def odd_id(arr: np.ndarray) -> tuple[int, Any, str] | None:
    """``(position, value, what it is)`` of the first element of ``arr`` that cannot be an id, or ``None``.

    Ids are integers, integral floats and strings; missing values (NaN, None, NA) are left to the
    caller. Refused: booleans (``True`` would silently become id 1), infinite floats, dates and times,
    complex numbers, bytes, and containers (lists, dicts, sets: a list-valued column is an ``id_list``).
    Fractional floats are reported by the callers' own check (it says "fractional part").
    """
    arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
    k = arr.dtype.kind
    if k in "iuU" or len(arr) == 0:
        return None
    if k == "f":
        inf = np.isinf(arr)
        return (int(np.flatnonzero(inf)[0]), arr[inf][0].item(), "not finite") if inf.any() else None
    if k != "O":
        what = {"b": "a boolean", "M": "a date/time", "m": "a time span", "c": "a complex number",
                "S": "bytes"}.get(k, f"of dtype {arr.dtype}")
        return 0, arr[0].item() if hasattr(arr[0], "item") else arr[0], what
    if pd.api.types.infer_dtype(arr, skipna=True) in ("string", "integer", "empty"):
        return None  # the common object columns: no Python loop
    for i, v in enumerate(arr):
        what = odd_id_value(v)
        if what is not None:
            return i, v, what
    return None


def odd_id_value(v: Any) -> str | None:
    """What ``v`` is when it cannot be an id (see :func:`odd_id`); ``None`` for ids and missing values."""
    if isinstance(v, (bool, np.bool_)):
        return "a boolean"
    if isinstance(v, (str, int, np.integer)):
        return None
    if isinstance(v, (float, np.floating)):
        return "not finite" if np.isinf(v) else None
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    return f"a {type(v).__name__}"


def odd_id_message(where: str, found: tuple[int, Any, str], rows: np.ndarray | None = None) -> str:
    i, v, what = found
    row = int(rows[i]) if rows is not None else i
    return (f"{where}, row {row}: {v!r} is {what}, not an id; ids are integers or strings (several ids per row "
            "are an id_list feature)")


def first_out_of_float32(x: np.ndarray) -> int | None:
    """Position of the first infinite value or value beyond float32 in ``x`` (NaN is fine), else ``None``."""
    with np.errstate(invalid="ignore"):
        bad = np.abs(x) > F32_MAX  # inf too; NaN compares False
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def negative_rows(x: np.ndarray) -> np.ndarray:
    """Positions of the values below 0 in ``x`` (NaN is not): what a ``log1p`` transform refuses, in the
    training tables and in scored rows alike."""
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(x < 0)


def out_of_float32_message(where: str, row: int, value: Any) -> str:
    return (f"{where}, row {row}: value {value!r} is infinite or beyond float32 (|x| <= {F32_MAX:.4g}); dense "
            "values must be finite numbers in that range (a missing value, NaN or empty, is imputed with the "
            "training mean)")


def normalize_ids(values: Any, *, as_int: bool | None = None, what: str = "") -> np.ndarray:
    """Return ids as int64 (when integral) or as an object array of str. NaN is an error."""
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    if isinstance(s.dtype, pd.CategoricalDtype):
        # a pandas categorical (what a parquet dictionary column written from pandas reads back as): its
        # values in the categories' own type, so a categorical column and the same plain column give one
        # vocabulary (training read parquet files, requests send plain columns)
        s = pd.Series(s.cat.categories.take(s.cat.codes.clip(lower=0)), index=s.index).where(s.notna())
    if s.isna().any():
        bad = int(np.flatnonzero(s.isna().to_numpy())[0])
        raise SpecError(f"{what}: NaN/missing id at row {bad}; ids must be integers or strings")
    if pd.api.types.is_float_dtype(s.dtype) and np.isinf(s.to_numpy(np.float64)).any():
        bad = int(np.flatnonzero(np.isinf(s.to_numpy(np.float64)))[0])
        raise SpecError(f"{what}: id {s.iloc[bad]!r} at row {bad} is not finite; ids must be integers or strings")
    if as_int is None:
        as_int = pd.api.types.is_integer_dtype(s.dtype) or (
            pd.api.types.is_float_dtype(s.dtype) and bool((s % 1 == 0).all()))
    if as_int:
        if pd.api.types.is_numeric_dtype(s.dtype):
            if pd.api.types.is_float_dtype(s.dtype) and not bool((s % 1 == 0).all()):
                raise SpecError(f"{what}: ids must be integers or strings, found non-integral floats")
            return s.to_numpy().astype(np.int64)
        conv = pd.to_numeric(s, errors="coerce")
        if pd.api.types.is_float_dtype(conv.dtype):
            conv = conv.where(conv % 1 == 0)  # "1.5" is not id 1
        # strings that are not integers can never match an integer vocabulary: give them a sentinel (OOV)
        return conv.fillna(-(2**62)).astype(np.int64).to_numpy()
    if not (pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype)
            or pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)):
        raise SpecError(f"{what}: ids must be integers or strings, got dtype {s.dtype}")
    return s.astype(str).to_numpy(dtype=object)


class KeyIndex:
    """Positions of distinct keys, as ``pd.Index(keys).get_indexer``: ``[N]`` int64, -1 where absent.

    Why: at 10M rows the hash lookups of joins and vocabularies were a quarter of encoding and grew
    2.5x faster than the rows (the hash tables of 10^5-10^6 keys leave the CPU caches). Integer keys
    in ``[0, max(2**20, 8 * len(keys)))`` are looked up in a dense table instead (one gather per query,
    at most 64 bytes per key); other keys, non-integer queries and duplicate keys (which
    ``get_indexer`` refuses) take pandas' path.

    Example:
        >>> KeyIndex(np.array([7, 3])).get_indexer(np.array([3, 5, 7, -1])).tolist()
        [1, -1, 0, -1]
    """

    def __init__(self, keys: Any) -> None:
        self.index = pd.Index(keys)
        self._table: np.ndarray | None = None
        k = self.index.to_numpy()
        if (k.dtype.kind == "i" and len(k) and int(k.min()) >= 0 and int(k.max()) < max(1 << 20, 8 * len(k))
                and self.index.is_unique):
            self._table = np.full(int(k.max()) + 2, -1, np.int64)  # the last slot answers every absent key
            self._table[k] = np.arange(len(k))

    def __len__(self) -> int:
        return len(self.index)

    def get_indexer(self, queries: Any) -> np.ndarray:
        q = queries.to_numpy() if isinstance(queries, (pd.Series, pd.Index)) else np.asarray(queries)
        if self._table is None or q.dtype.kind != "i":
            return self.index.get_indexer(queries).astype(np.int64, copy=False)
        top = len(self._table) - 1
        return self._table[np.where((q < 0) | (q > top), top, q)]


@dataclass
class Vocabulary:
    """Maps raw ids of one feature to embedding rows (0 = OOV).

    Args:
        feature: feature name.
        values: known ids (int64 or str), row ``k + 1`` for ``values[k]``; empty when hashing.
        num_embeddings: table size including the OOV row.
        hashing: map by hash instead of lookup.
    """

    feature: str
    values: np.ndarray
    num_embeddings: int
    hashing: bool = False
    is_int: bool = True
    _index: KeyIndex | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, spec: FeatureSpec, ids: np.ndarray, file: str = "") -> Vocabulary:
        uniq, counts = np.unique(ids, return_counts=True)
        return cls.from_counts(spec, uniq, counts, ids.dtype != object, file)

    @classmethod
    def from_counts(cls, spec: FeatureSpec, uniq: np.ndarray, counts: np.ndarray, is_int: bool,
                    file: str = "") -> Vocabulary:
        """From the sorted distinct training ids and their counts (a streamed fit sums them over chunks)."""
        if spec.hashing:
            assert isinstance(spec.num_embeddings, int)
            return cls(spec.name, uniq[:0], spec.num_embeddings, True, is_int)
        uniq = uniq[counts >= spec.min_count]
        n = len(uniq) + 1
        if spec.num_embeddings != "auto":
            if spec.num_embeddings < n:
                raise SpecError(
                    f"file '{file}', feature '{spec.name}': num_embeddings={spec.num_embeddings} is smaller "
                    f"than the training vocabulary ({len(uniq)} ids + 1 OOV row = {n}); raise it, use "
                    "`num_embeddings: auto`, or set `hashing: true`")
            n = spec.num_embeddings
        return cls(spec.name, uniq, n, False, is_int)

    @property
    def index(self) -> KeyIndex:
        if self._index is None:
            self._index = KeyIndex(self.values)
        return self._index

    def encode(self, ids: Any) -> np.ndarray:
        """Raw ids ``[N]`` -> embedding rows ``[N]`` int64 (0 for unseen ids)."""
        arr = normalize_ids(ids, as_int=self.is_int, what=f"feature '{self.feature}'")
        if self.hashing:
            h = pd.util.hash_array(arr, hash_key="appdistill000000", categorize=False)
            return (h % np.uint64(self.num_embeddings - 1)).astype(np.int64) + 1
        return self.index.get_indexer(arr).astype(np.int64) + 1

    def __len__(self) -> int:
        return self.num_embeddings

    # serialisation (json-friendly, no pickle)
    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "num_embeddings": self.num_embeddings, "hashing": self.hashing,
                "is_int": self.is_int, "values": self.values.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        vals = np.asarray(d["values"], dtype=np.int64 if d["is_int"] else object)
        return cls(d["feature"], vals, int(d["num_embeddings"]), bool(d["hashing"]), bool(d["is_int"]))


@dataclass
class DenseTransform:
    """``log1p`` and/or standardisation with training statistics; NaN -> the training mean."""

    feature: str
    kind: str
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, spec: FeatureSpec, x: np.ndarray) -> DenseTransform:
        t = cls(spec.name, spec.transform)
        return t.with_moments(DenseMoments().add(t._pre(x)))

    def with_moments(self, m: DenseMoments) -> DenseTransform:
        """Set the training statistics from the moments of the pre-transformed values (``_pre``)."""
        if m.n:  # the mean also imputes NaN for ``none``/``log1p``
            self.mean = m.mean
            if "standardize" in self.kind:
                self.std = float(np.sqrt(m.m2 / m.n)) or 1.0
        return self

    def _pre(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if "log1p" in self.kind:
            with np.errstate(invalid="ignore"):
                x = np.log1p(np.clip(x, 0, None))
        return x

    def apply(self, x: Any) -> tuple[np.ndarray, int]:
        """Return the transformed ``[N]`` float32 values and the number of NaNs imputed."""
        v = self._pre(x)
        nan = ~np.isfinite(v)
        v = np.where(nan, self.mean, v)
        if "standardize" in self.kind:
            v = (v - self.mean) / self.std
        return v.astype(np.float32), int(nan.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseTransform:
        return cls(**d)


@dataclass
class DenseMoments:
    """Count, mean and summed squared deviations of a dense feature's finite values, merged a chunk at a
    time (Chan et al.'s pairwise update), so a streamed fit needs no second pass. One chunk gives
    ``mean()`` and ``std()`` of numpy exactly."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, v: np.ndarray) -> DenseMoments:
        v = v[np.isfinite(v)]
        if len(v):
            k, mu = len(v), float(v.mean())
            q, d, tot = float(((v - mu) ** 2).sum()), mu - self.mean, self.n + len(v)
            self.mean += d * (k / tot)
            self.m2 += q + d * d * (self.n * k / tot)
            self.n = tot
        return self
