"""The fitted feature processor: raw column values -> model-ready arrays.

The same object encodes training tables and serving requests, so a feature is transformed one way
everywhere. It is fitted on the training split only and serialises to JSON (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.features.spec import FeatureSpec
from appdistill.features.vocab import DenseTransform, Vocabulary, normalize_ids


@dataclass
class Jagged:
    """Ragged ids of one ``id_list`` feature: ``values[offsets[r]:offsets[r+1]]`` belong to row r."""

    offsets: np.ndarray  # [N + 1] int64
    values: np.ndarray  # [nnz] int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised gather: (lengths ``[B]``, values ``[sum(lengths)]``) of ``rows``."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return lengths, self.values[:0]
        # position of each output value = its row's start + rank within the row
        csum = np.cumsum(lengths)
        idx = np.arange(total, dtype=np.int64) - np.repeat(csum - lengths, lengths) + np.repeat(starts, lengths)
        return lengths, self.values[idx]


def split_lists(col: pd.Series, sep: str | None) -> tuple[np.ndarray, pd.Series]:
    """(lengths ``[N]``, exploded values) of a string-with-separator or list-valued column."""
    if sep is not None:
        s = col.fillna("").astype(str)
        lists = s.str.split(sep, regex=False)
        lists = lists.map(lambda xs: [x for x in xs if x != ""])
    else:
        # null elements are dropped here, not after ``explode``, so lengths and values agree
        lists = col.map(lambda v: [x for x in v if not pd.isna(x)] if isinstance(v, (list, tuple, np.ndarray))
                        else [])
    lengths = lists.map(len).to_numpy().astype(np.int64)
    flat = lists.explode().dropna()
    return lengths, flat


@dataclass
class FeatureProcessor:
    """Fitted vocabularies (sparse features) and transforms (dense features).

    Example:
        >>> proc = FeatureProcessor.fit(spec.features, {"interactions": inter_train, "items": items_train})
        >>> ids = proc.encode_sparse("item_id", df["item_id"])        # [N] int64, 0 = OOV
    """

    vocabs: dict[str, Vocabulary] = field(default_factory=dict)
    dense: dict[str, DenseTransform] = field(default_factory=dict)
    nan_imputed: dict[str, int] = field(default_factory=dict)
    #: ``sparse_id`` features with ``missing: oov``: a NaN id encodes to the OOV row (0). Training only:
    #: serving reads the policy from ``features.json``, so it is not serialised.
    oov_missing: set[str] = field(default_factory=set)

    @classmethod
    def fit(cls, features: list[FeatureSpec], train_tables: dict[str, pd.DataFrame],
            locations: dict[str, str] | None = None) -> FeatureProcessor:
        """Fit on the training rows of each table (``train_tables[f.table]``)."""
        p = cls()
        for f in features:
            df = train_tables[f.table]
            loc = (locations or {}).get(f.table, f.table)
            if f.kind == "sparse_id":
                col = df[f.col]
                if f.missing == "oov":  # missing ids are OOV rows: they are not part of the vocabulary
                    p.oov_missing.add(f.name)
                    col = col.dropna()
                ids = normalize_ids(col, what=f"file '{loc}', feature '{f.name}', column '{f.col}'")
                p.vocabs[f.name] = Vocabulary.fit(f, ids, file=loc)
            elif f.kind == "id_list":
                _, flat = split_lists(df[f.col], f.separator)
                ids = normalize_ids(flat.reset_index(drop=True), what=f"file '{loc}', feature '{f.name}'")
                p.vocabs[f.name] = Vocabulary.fit(f, ids, file=loc)
            elif f.kind == "dense":
                # float64 with NaN for missing, as the streamed fit reads it: ``to_numpy()`` of pandas' nullable
                # ``boolean`` column is an object array holding ``pd.NA``, which numpy cannot make a float
                p.dense[f.name] = DenseTransform.fit(f, df[f.col].to_numpy(np.float64, na_value=np.nan))
        return p

    def encode_sparse(self, name: str, values: Any) -> np.ndarray:
        if name in self.oov_missing:
            s = values if isinstance(values, pd.Series) else pd.Series(values)
            miss = s.isna().to_numpy()
            if miss.any():
                out = np.zeros(len(s), np.int64)
                ok = np.flatnonzero(~miss)
                if len(ok):
                    out[ok] = self.vocabs[name].encode(s.iloc[ok].reset_index(drop=True))
                return out
        return self.vocabs[name].encode(values)

    def encode_list(self, f: FeatureSpec, col: pd.Series) -> Jagged:
        lengths, flat = split_lists(col, f.separator)
        vals = self.vocabs[f.name].encode(flat.reset_index(drop=True)) if len(flat) else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return Jagged(offsets, vals)

    def encode_dense(self, name: str, values: Any) -> np.ndarray:
        try:
            v, n_nan = self.dense[name].apply(values)
        except (TypeError, ValueError) as e:
            raise SpecError(f"feature '{name}': dense values must be numeric ({e})") from e
        if not np.isfinite(v).all():  # load_tables keeps raw values within float32; say so if a transform does not
            r = int(np.flatnonzero(~np.isfinite(v))[0])
            raise SpecError(f"feature '{name}', row {r}: value {np.asarray(values)[r]!r} overflows float32 after the "
                            f"'{self.dense[name].kind}' transform")
        self.nan_imputed[name] = self.nan_imputed.get(name, 0) + n_nan
        return v

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        return json.dumps({"vocabs": {k: v.to_dict() for k, v in self.vocabs.items()},
                           "dense": {k: v.to_dict() for k, v in self.dense.items()}})

    @classmethod
    def from_json(cls, s: str) -> FeatureProcessor:
        d = json.loads(s)
        return cls({k: Vocabulary.from_dict(v) for k, v in d["vocabs"].items()},
                   {k: DenseTransform.from_dict(v) for k, v in d["dense"].items()})
