"""The encoded data set: tables -> labels, split, fitted processor and model-ready arrays.

Arrays are kept where they live: ``sparse_id`` ids are materialised per interaction (one int64
gather per batch), ``id_list`` and ``dense`` features stay on their own table (items, users) and
are gathered through ``table_rows`` at batch time, so a 10M-interaction log does not copy the item
catalogue 10M times. Each side table gets one extra *missing* row (OOV ids, empty lists, the
training mean) for interactions whose key is absent from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from appdistill.errors import ConfigError
from appdistill.features.processor import FeatureProcessor, Jagged
from appdistill.features.spec import FeatureSpec, FeatureSpecSet
from appdistill.features.tables import check_joins, load_tables, make_labels, split_rows, table_location
from appdistill.features.vocab import KeyIndex
from appdistill.io import release_mapped

#: rows a streamed data set's whole-split reads (evaluation gathers, training counts) take at a time,
#: its mapped pages released between them
WINDOW_ROWS = 1 << 22


@dataclass
class Dataset:
    """Everything the loader, teachers and evaluation need about one spec's data.

    Attributes:
        labels: ``[N]`` float32 0/1.
        splits: ``{"train"|"valid"|"test": row indices}``.
        table_rows: ``{table: [N] int64}`` row of each interaction in that table (missing -> last row).
        sparse: ``{feature: [N] int64}`` encoded ``sparse_id`` features (0 = OOV).
        lists: ``{feature: Jagged}`` encoded ``id_list`` features over their table's rows (+1 missing).
        dense: ``{feature: [rows + 1] float32}`` transformed dense features over their table's rows.
        user_ids / item_ids: ``[N]`` int64 dense codes of the interaction keys (for grouping).
        cold: ``[N]`` bool, the item never occurs in the training split.
    """

    spec: FeatureSpecSet
    tables: dict[str, pd.DataFrame]
    labels: np.ndarray
    splits: dict[str, np.ndarray]
    processor: FeatureProcessor
    table_rows: dict[str, np.ndarray]
    user_ids: np.ndarray
    item_ids: np.ndarray
    cold: np.ndarray
    sparse: dict[str, np.ndarray] = field(default_factory=dict)
    lists: dict[str, Jagged] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprint: str = ""
    #: per side table: interactions whose key it holds (``tables.check_joins``)
    join_coverage: dict[str, dict[str, object]] = field(default_factory=dict)
    #: the folder of memory-mapped columns when the interactions were streamed from a folder of parquet
    #: files (:mod:`appdistill.features.streamed`; ``tables`` then holds the side tables only), else ""
    streamed: str = ""
    _counts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.labels)

    @classmethod
    def build(cls, spec: FeatureSpecSet, tables: dict[str, pd.DataFrame] | None = None,
              transfer: Callable[[FeatureSpecSet, dict[str, pd.DataFrame], dict[str, np.ndarray]], pd.DataFrame]
              | None = None) -> Dataset:
        """Load (unless given), split, fit on train, encode every servable feature.

        An interactions ``path`` that is a folder of parquet files is read in chunks into memory-mapped
        columns instead (:mod:`appdistill.features.streamed`): the same split, processor, fingerprint
        and encoded values as the same rows in one file.

        Args:
            transfer: makes unlabelled rows from ``(spec, tables, splits)``
                (:mod:`appdistill.features.transfer`); they are appended to the interactions table,
                encoded like every row, labelled NaN and listed as ``splits["transfer"]``. Labels,
                splits and the fitted processor of the real rows are unchanged.
        """
        if tables is None:
            from appdistill.features.streamed import build_streamed, stream_files

            files = stream_files(spec)
            if files is not None:
                if transfer is not None:
                    raise ConfigError(f"file '{table_location(spec, 'interactions')}': a transfer set needs the "
                                      "interactions in memory (one file); this spec streams a folder")
                return build_streamed(spec, files)
        tables = tables if tables is not None else load_tables(spec)
        coverage, joined = check_joins(spec, tables)  # refuses key-dtype mismatches and joins that match nothing
        inter = tables["interactions"]
        labels = make_labels(spec, inter)
        splits = split_rows(spec, inter)
        if transfer is not None:
            extra = transfer(spec, tables, splits)
            n0 = len(inter)
            inter = pd.concat([inter, extra[list(inter.columns)]], ignore_index=True)
            tables = {**tables, "interactions": inter}
            labels = np.concatenate([labels, np.full(len(extra), np.nan, np.float32)])
            splits = {**splits, "transfer": np.arange(n0, n0 + len(extra), dtype=np.int64)}
        train = splits["train"]

        table_rows: dict[str, np.ndarray] = {"interactions": np.arange(len(inter), dtype=np.int64)}
        for name, t in spec.tables.items():
            if name == "interactions":
                continue
            idx, key = joined[name], t.keys[0]
            if len(idx) < len(inter):  # the transfer rows, appended after the join
                extra_idx = KeyIndex(tables[name][key]).get_indexer(inter[key].iloc[len(idx):])
                idx = np.concatenate([idx, extra_idx])
            table_rows[name] = np.where(idx < 0, len(tables[name]), idx).astype(np.int64)

        # fit on the training rows of each table (side tables: rows referenced by training data)
        train_tables = {}
        for name, df in tables.items():
            train_tables[name] = df.iloc[referenced_rows(table_rows[name][train], len(df))]
        locs = {n: table_location(spec, n) for n in tables}
        servable = [f for f in spec.features if f.kind in ("sparse_id", "id_list", "dense")]
        proc = FeatureProcessor.fit(servable, train_tables, locs)

        user_ids = pd.factorize(inter[spec.user_key])[0].astype(np.int64)
        item_codes, item_uniq = pd.factorize(inter[spec.item_key])
        seen = np.zeros(len(item_uniq), bool)
        seen[item_codes[train]] = True
        ds = cls(spec, tables, labels, splits, proc, table_rows, user_ids, item_codes.astype(np.int64),
                 ~seen[item_codes])
        for f in servable:
            df = tables[f.table]
            if f.kind == "sparse_id":
                enc = np.append(proc.encode_sparse(f.name, df[f.col]), 0) if f.table != "interactions" \
                    else proc.encode_sparse(f.name, df[f.col])
                ds.sparse[f.name] = enc[table_rows[f.table]] if f.table != "interactions" else enc
            elif f.kind == "id_list":
                ds.lists[f.name] = encode_list_table(proc, f, df)
            else:
                ds.dense[f.name] = encode_dense_table(proc, f, df, missing_row=f.table != "interactions")
        ds.fingerprint = ds._fingerprint()
        ds.join_coverage = coverage
        return ds

    def gather(self, arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``arr[rows]`` for a per-row column ``arr``; on a streamed data set a window of rows at a time,
        releasing the mapped pages between windows (evaluation reads whole splits)."""
        if not self.streamed:
            return arr[rows]
        out = np.empty(len(rows), arr.dtype)
        step = WINDOW_ROWS
        for lo in range(0, len(rows), step):
            out[lo:lo + step] = arr[rows[lo:lo + step]]
            self.release_pages()
        return out

    def locality_order(self, rows: np.ndarray) -> np.ndarray:
        """Positions of ``rows`` sorted by (item, user) code: the order to predict many rows in.

        Id models look rows up in tables as large as the catalogue (embedding rows, a GBDT's
        categorical bitsets); in split order each lookup lands anywhere in them, and once they
        outgrow the CPU caches the cost per row rises with the data. In this order consecutive
        rows read neighbouring entries. Callers write outputs back to their rows' places.

        Example:
            >>> order = ds.locality_order(rows)          # doctest: +SKIP
            >>> out[order] = teacher.predict(ds, rows[order]).logits
        """
        return np.lexsort((self.gather(self.user_ids, rows), self.gather(self.item_ids, rows)))

    def train_counts(self, kind: str) -> np.ndarray:
        """Training rows per ``"items"`` or ``"users"`` code, ``[max code + 1]`` int64 (memoised).

        Computed a window of rows at a time, so a streamed data set never holds (or maps) a whole
        column of codes for it.
        """
        if kind not in self._counts:
            codes = {"items": self.item_ids, "users": self.user_ids}[kind]
            step, n_codes = WINDOW_ROWS, 0
            for lo in range(0, len(codes), step):
                n_codes = max(n_codes, int(codes[lo:lo + step].max(initial=-1)) + 1)
            counts = np.zeros(n_codes, np.int64)
            train = self.splits["train"]
            for lo in range(0, len(train), step):
                counts += np.bincount(codes[train[lo:lo + step]], minlength=n_codes)
                self.release_pages()
            self._counts[kind] = counts
        return self._counts[kind]

    def train_rows_of(self, table: str) -> np.ndarray:
        """Rows of side table ``table`` that training rows reference, sorted (the missing row excluded)."""
        return referenced_rows(self.gather(self.table_rows[table], self.splits["train"]), len(self.tables[table]))

    def release_pages(self) -> None:
        """Unmap the pages of the memory-mapped columns read so far (a streamed data set; otherwise
        nothing): the loaders call it every window of rows, so resident memory stays bounded by what a
        window touches instead of growing to every column's size (the page cache keeps the pages)."""
        if self.streamed:
            arrays = [self.labels, self.user_ids, self.item_ids, self.cold, *self.splits.values(),
                      *self.table_rows.values(), *self.sparse.values(), *self.dense.values()]
            release_mapped([a for a in arrays if isinstance(a, np.memmap)])

    def rows_of(self, table: str, rows: np.ndarray) -> np.ndarray:
        """Rows of ``table`` for interaction rows ``rows``."""
        return self.table_rows[table][rows]

    def _fingerprint(self) -> str:
        """Hash of spec + table contents + split: equal fingerprints mean equal training data."""
        h = hashlib.sha256(self.spec.fingerprint().encode())
        for name in sorted(self.tables):
            h.update(name.encode())
            h.update(_hash_table(self.tables[name]).tobytes())
        for k in ("train", "valid", "test"):
            h.update(self.splits[k].tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, object]:
        return {
            "interactions": self.n,
            "positive_rate": round(float(np.nanmean(self.labels)), 4),
            "splits": {k: int(len(v)) for k, v in self.splits.items()},
            "cold_test_rows": int(self.cold[self.splits["test"]].sum()),
            "vocab_sizes": {k: len(v) for k, v in self.processor.vocabs.items()},
            "nan_imputed": dict(self.processor.nan_imputed),
            "fingerprint": self.fingerprint,
            "join_coverage": self.join_coverage,
        }


def referenced_rows(refs: np.ndarray, n: int) -> np.ndarray:
    """The distinct values of ``refs`` below ``n``, sorted: ``np.unique`` through a mask of ``n + 1``
    flags, which is linear where ``np.unique`` sorts every reference (half of encoding at 10M rows).

    Example:
        >>> referenced_rows(np.array([4, 1, 4, 9]), 5).tolist()
        [1, 4]
    """
    seen = np.zeros(n + 1, bool)
    seen[np.minimum(refs, n)] = True
    return np.flatnonzero(seen[:n])


def encode_list_table(proc: FeatureProcessor, f: FeatureSpec, df: pd.DataFrame) -> Jagged:
    """``id_list`` feature ``f`` over the rows of its table, plus an empty row for a missing join."""
    j = proc.encode_list(f, df[f.col])
    return Jagged(np.append(j.offsets, j.offsets[-1]), j.values)


def encode_dense_table(proc: FeatureProcessor, f: FeatureSpec, df: pd.DataFrame, missing_row: bool) -> np.ndarray:
    """Dense feature ``f`` over the rows of its table; a side table's gets a last row holding the imputed
    value (a missing join)."""
    v = proc.encode_dense(f.name, df[f.col].to_numpy(np.float64, na_value=np.nan))  # nullable dtypes: NA -> NaN
    if not missing_row:
        return v
    return np.append(v, proc.dense[f.name].apply(np.array([np.nan]))[0])


def _hash_table(df: pd.DataFrame) -> np.ndarray:
    """Row hashes ``[rows]`` uint64; list-valued cells (``id_list`` columns) are hashed by content."""
    try:
        return pd.util.hash_pandas_object(df, index=False).to_numpy()
    except TypeError:  # unhashable cells: lists / arrays
        as_text = lambda v: str(np.asarray(v).tolist()) if isinstance(v, (list, tuple, np.ndarray)) else v  # noqa: E731
        df = df.apply(lambda c: c.map(as_text) if c.dtype == object else c)
        return pd.util.hash_pandas_object(df, index=False).to_numpy()
