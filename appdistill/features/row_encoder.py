"""Raw request rows -> the exported student's inputs, with the training transforms.

The serving half of the feature encoding (the training half is :class:`~appdistill.features.processor.FeatureProcessor`
over whole tables); both read the same fitted vocabularies and dense transforms, and
``tests/test_export.py`` encodes the same raw rows both ways and compares.

Input rows (one per candidate, raw values as in the training tables, joined like the training
data: interactions columns + the item's and the user's side-table columns) follow the training
transforms exactly:

=====================  ==================================================================================
column kind             serving rule (same as training unless noted)
=====================  ==================================================================================
missing column          error naming the file and the columns
duplicate column        a needed column that appears twice: error naming it
extra columns           ignored
``sparse_id``           unseen id -> OOV row; ids are categorical and cast to the vocabulary's key type
                        (``50``, ``50.0`` and ``"50"`` are the same integer id; a string that is not an
                        integer is an unseen id -> OOV); a number with a fractional part (``50.5``),
                        ``inf``, a boolean, a date/time, bytes, a complex number or a container
                        (list, dict, set) is an error naming file, column and first bad row
NaN ``sparse_id``       side-table feature (``users``/``items``: gender, occupation...) or a feature with
                        ``missing: oov``: OOV, exactly what training gives a row whose key is missing
                        from that table (a failed left join); otherwise (the request keys
                        ``user_id``/``item_id``): error naming file, column and row (training refuses
                        NaN there too)
``id_list``             separator strings or list cells; NaN/empty cell -> empty list (training's missing
                        row); unseen ids -> OOV; elements follow the ``sparse_id`` rules
``dense``               ints, floats, booleans (0/1) and numeric strings; NaN/None -> the training mean
                        (the fitted transform's imputation, as in training); ``inf``, a value beyond
                        float32 (``|x| > 3.4e38``) or one the transform takes beyond it, a value that is
                        not a number (``"abc"``, a date, a list, a complex number) -> error naming file,
                        column, row, value
=====================  ==================================================================================

Rows are numbered from 0 in file order (row 0 = the first data row of a CSV).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from appdistill.errors import AppDistillError
from appdistill.features.content import ContentTable
from appdistill.features.processor import FeatureProcessor
from appdistill.features.spec import FeatureSpec
from appdistill.features.tables import first_non_number, repeated_columns
from appdistill.features.vocab import (Vocabulary, first_out_of_float32, negative_rows, normalize_ids, odd_id,
                                       odd_id_message, odd_id_value, out_of_float32_message)

# ---------------------------------------------------------------------------------------- encoding
class _Lookup:
    """Raw ids -> embedding rows of one vocabulary, without pandas per call (batch-1 latency).

    Integer vocabularies use a sorted array + ``searchsorted``, string ones a dict; hashing
    vocabularies go through :meth:`Vocabulary.encode` (the training code path).
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.is_int, self.hashing = vocab.is_int, vocab.hashing
        if not self.hashing and self.is_int:
            v = np.asarray(vocab.values, np.int64)
            self.order = np.argsort(v, kind="stable")
            self.sorted = v[self.order]
        elif not self.hashing:
            self.table = {str(x): i + 1 for i, x in enumerate(vocab.values)}

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """``keys``: int64 (integer vocabulary) or object array of str -> rows ``[N]`` int64, 0 = OOV."""
        if self.hashing:
            return self.vocab.encode(keys) if len(keys) else np.zeros(0, np.int64)
        if self.is_int:
            if len(self.sorted) == 0:
                return np.zeros(len(keys), np.int64)
            pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
            return np.where(self.sorted[pos] == keys, self.order[pos] + 1, 0).astype(np.int64)
        get = self.table.get
        return np.fromiter((get(k, 0) for k in keys), np.int64, count=len(keys))


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _id_str(v: Any) -> str:
    """A raw id as the string key of a string vocabulary (``8.0`` -> ``"8"``)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _missing(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        return np.isnan(arr)
    if arr.dtype.kind in "iub":
        return np.zeros(len(arr), bool)
    return pd.isna(arr)


class RowEncoder:
    """Raw request rows -> the exported model's inputs, with the training transforms (module doc).

    Args:
        feats: the student's features (``features.json``).
        proc: their fitted vocabularies and transforms (``processor.json``).
        content: the student's content table (``content/``), looked up by the item key column; its
            vectors follow the dense features. An unknown or missing key gets zeros (the mean item).
    """

    def __init__(self, feats: list[FeatureSpec], proc: FeatureProcessor, content: ContentTable | None = None) -> None:
        self.feats, self.proc, self.content = feats, proc, content
        self.lookups = {f.name: _Lookup(proc.vocabs[f.name]) for f in feats if f.kind in ("sparse_id", "id_list")}
        self.dense = {f.name: proc.dense[f.name] for f in feats if f.kind == "dense"}
        self.content_key: FeatureSpec | None = None
        if content is not None:  # the key column read like any sparse_id column, through the table's vocabulary
            self.content_key = FeatureSpec(name=f"content:{content.table}", kind="sparse_id", table=content.table,
                                           column=content.key, missing="oov")
            self.lookups[self.content_key.name] = _Lookup(content.vocab)

    @property
    def columns(self) -> list[str]:
        cols = [f.col for f in self.feats]
        return cols + [self.content_key.col] if self.content_key is not None else cols

    def string_columns(self) -> list[str]:
        """Columns whose ids are strings (read them as text from CSV so ``"08"`` stays ``"08"``)."""
        ids = [f for f in (*self.feats, self.content_key) if f is not None and f.kind in ("sparse_id", "id_list")]
        return list(dict.fromkeys(f.col for f in ids if not self.lookups[f.name].is_int))

    # ------------------------------------------------------------------ key casting
    def _keys(self, f: FeatureSpec, arr: np.ndarray, where: str, rows: np.ndarray | None = None,
              all_str: bool = False) -> np.ndarray:
        """Cast non-missing raw ids to the vocabulary's key type (int64 or str objects).

        ``all_str``: the caller knows every element is a ``str`` already (string dtype, split lists).
        Booleans, inf, dates, complex numbers, bytes and containers are refused (naming the row):
        ``True`` would otherwise become id 1 (or ``"True"``), a list its ``str()``.
        """
        if not all_str:
            found = odd_id(arr)
            if found is not None:
                raise AppDistillError(odd_id_message(where, found, rows))
        if not self.lookups[f.name].is_int:  # string vocabulary: integral numbers print as "8", not "8.0"
            if all_str:
                return arr
            if arr.dtype.kind in "iub":
                return arr.astype(str).astype(object)
            return np.array([v if type(v) is str else _id_str(v) for v in arr], dtype=object)
        if arr.dtype.kind in "iub":
            return arr.astype(np.int64)
        num = arr.astype(np.float64) if arr.dtype.kind == "f" else pd.to_numeric(
            pd.Series(arr, dtype=object), errors="coerce").to_numpy(np.float64)
        frac = np.isfinite(num) & (num % 1 != 0)
        if frac.any():
            r = _first(frac)
            row = int(rows[r]) if rows is not None else r
            v = arr[r].item() if isinstance(arr[r], np.generic) else arr[r]
            raise AppDistillError(f"{where}, row {row}: id {v!r} is a number with a fractional part; ids are "
                                  "integers or strings (is this a dense column?)")
        if arr.dtype.kind == "f":  # inf can never be a known id: OOV
            return np.where(np.isfinite(arr), np.nan_to_num(arr, posinf=0.0, neginf=0.0), -(2.0**62)).astype(np.int64)
        return normalize_ids(pd.Series(arr, dtype=object), as_int=True, what=where)

    def _list_cells(self, f: FeatureSpec, arr: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(lengths ``[N]``, flat raw ids) of an ``id_list`` column; null cells are empty lists."""
        if f.separator is not None:
            sep = f.separator
            miss = _missing(arr)
            found = odd_id(arr[~miss])
            if found is not None:
                r = int(np.flatnonzero(~miss)[found[0]])
                raise AppDistillError(f"{where}, row {r}: {found[1]!r} is {found[2]}; cells are strings of ids "
                                      f"separated by {sep!r}")
            cells = ["" if m else (v if type(v) is str else _id_str(v)) for v, m in zip(arr, miss)]
            lists = [[x for x in c.split(sep) if x != ""] for c in cells]
        else:
            lists = []
            for r, v in enumerate(arr):
                if isinstance(v, (list, tuple, np.ndarray)):
                    for x in v:  # elements are ids: no nested lists, booleans, dates...
                        what = odd_id_value(x)
                        if what is not None:
                            raise AppDistillError(f"{where}, row {r}: list element {x!r} is {what}, not an id; ids "
                                                  "are integers or strings")
                    lists.append([x for x in v if not pd.isna(x)])
                elif v is None or (isinstance(v, float) and np.isnan(v)):
                    lists.append([])
                else:
                    raise AppDistillError(f"{where}, row {r}: expected a list of ids, got {v!r} (feature "
                                          f"'{f.name}' has no separator)")
        lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        flat = [x for xs in lists for x in xs]
        if f.separator is not None and not self.lookups[f.name].is_int:
            return lengths, np.array(flat, dtype=object)
        return lengths, (np.array(flat) if flat else np.zeros(0, np.int64))

    # ------------------------------------------------------------------ encoding
    def encode(self, df: pd.DataFrame, source: str = "input") -> tuple[torch.Tensor, ...]:
        """``(values_0, offsets_0, ..., dense)`` for the rows of ``df`` (see the module doc for the rules)."""
        if not isinstance(df, pd.DataFrame):
            raise AppDistillError(f"file '{source}': expected a pandas DataFrame of raw rows, got {type(df).__name__}")
        dup = repeated_columns(df, self.columns)
        if dup:
            raise AppDistillError(f"file '{source}': columns {dup} appear more than once; each input column must be "
                                  "given once")
        missing = [c for c in dict.fromkeys(self.columns) if c not in df.columns]
        if missing:
            raise AppDistillError(f"file '{source}': missing columns {missing} (the student needs {self.columns}; "
                                  "other columns are ignored)")
        n = len(df)
        out: list[torch.Tensor] = []
        dense: list[np.ndarray] = []
        for f in self.feats:
            where = f"file '{source}', feature '{f.name}', column '{f.col}'"
            col = df[f.col]
            try:
                if f.kind == "sparse_id":
                    out += [torch.from_numpy(self._sparse_rows(f, col, where)), torch.arange(n, dtype=torch.long)]
                elif f.kind == "id_list":
                    lengths, flat = self._list_cells(f, col.to_numpy(), where)
                    keys = self._keys(f, flat, where + " (list element)", all_str=f.separator is not None)
                    vals = self.lookups[f.name](keys) if len(flat) else np.zeros(0, np.int64)
                    offsets = np.zeros(n, np.int64)
                    np.cumsum(lengths[:-1], out=offsets[1:])
                    out += [torch.from_numpy(np.ascontiguousarray(vals, np.int64)), torch.from_numpy(offsets)]
                elif f.kind == "dense":
                    x = self._numbers(col, where)
                    t = self.dense[f.name]
                    if "log1p" in t.kind:  # refused in training too: log1p would map every negative value to 0
                        neg = negative_rows(x)
                        if len(neg):
                            r = int(neg[0])
                            raise AppDistillError(f"{where}, row {r}: value {x[r].item()!r} is negative; the "
                                                  f"feature's '{t.kind}' transform takes values >= 0 (training "
                                                  "refuses negative ones too)")
                    v = t.apply(x)[0]
                    if not np.isfinite(v).all():  # within float32 raw, beyond it once standardised
                        r = _first(~np.isfinite(v))
                        raise AppDistillError(f"{where}, row {r}: value {x[r].item()!r} overflows float32 after the "
                                              f"feature's '{t.kind}' transform (mean {t.mean:.4g}, std {t.std:.4g})")
                    dense.append(v)
            except AppDistillError:
                raise
            except Exception as e:  # noqa: BLE001 - name the column
                raise AppDistillError(f"{where}: cannot encode the values ({type(e).__name__}: {e})") from e
        d = np.stack(dense, 1) if dense else np.zeros((n, 0), np.float32)
        if self.content is not None:
            d = np.concatenate([d.astype(np.float32, copy=False), self._content(df, source)], 1)
        out.append(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)))
        return tuple(out)

    def _sparse_rows(self, f: FeatureSpec, col: pd.Series, where: str) -> np.ndarray:
        """Rows ``[N]`` of one ``sparse_id`` column in ``f``'s vocabulary (module doc: NaN and unseen ids)."""
        arr = col.to_numpy()
        strs = isinstance(col.dtype, pd.StringDtype)
        miss = _missing(arr)
        if not miss.any():
            return self.lookups[f.name](self._keys(f, arr, where, all_str=strs))
        if f.table == "interactions" and f.missing != "oov":
            raise AppDistillError(f"{where}, row {_first(miss)}: missing id (NaN/null); the "
                                  "request keys must be present (unknown ids are fine: OOV; a "
                                  "feature with `missing: oov` maps missing ids to OOV)")
        rows = np.zeros(len(arr), np.int64)
        ok = np.flatnonzero(~miss)  # side-table NaN: training's "missing row" -> OOV
        rows[ok] = self.lookups[f.name](self._keys(f, arr[ok], where, ok, strs))
        return rows

    def _content(self, df: pd.DataFrame, source: str) -> np.ndarray:
        """The content vectors ``[N, C]`` of the rows' item keys (missing or unknown key: zeros)."""
        f, table = self.content_key, self.content
        assert f is not None and table is not None  # f: a side-table key with `missing: oov`
        where = f"file '{source}', column '{f.col}' (the content table's item key)"
        return table.lookup_rows(self._sparse_rows(f, df[f.col], where))

    @staticmethod
    def _numbers(col: pd.Series, where: str) -> np.ndarray:
        """Raw dense values as float64 (NaN = missing): numbers, booleans and numeric strings; anything
        else (dates, complex numbers, lists, "abc"), inf and values beyond float32 are refused."""
        kind = col.dtype.kind
        if kind == "c":
            raise AppDistillError(f"{where}: complex numbers (dtype {col.dtype}) are not dense values")
        if kind in "Mm" or isinstance(col.dtype, (pd.PeriodDtype, pd.IntervalDtype)):
            raise AppDistillError(f"{where}: dense values must be numbers, got dates/times (dtype {col.dtype}); "
                                  "convert them as the training table did")
        if pd.api.types.is_bool_dtype(col.dtype) or pd.api.types.is_numeric_dtype(col.dtype):
            x = col.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            arr = col.to_numpy()
            if pd.api.types.infer_dtype(arr, skipna=True) not in ("string", "integer", "floating", "boolean",
                                                                   "mixed-integer-float", "empty"):
                for r, v in enumerate(arr):
                    if not (v is None or v is pd.NA or isinstance(v, (str, int, float, bool, np.integer, np.floating,
                                                                      np.bool_))):
                        raise AppDistillError(f"{where}, row {r}: expected a number, got {v!r} (a "
                                              f"{type(v).__name__})")
            conv, r = first_non_number(col)
            if r is not None:
                raise AppDistillError(f"{where}, row {r}: expected a number, got {col.iloc[r]!r}")
            x = conv.to_numpy(dtype=np.float64, na_value=np.nan)
        r = first_out_of_float32(x)
        if r is not None:
            raise AppDistillError(out_of_float32_message(where, r, x[r].item()))
        return x

    def example(self) -> tuple[torch.Tensor, ...]:
        """Two rows of OOV ids (one id per list): the example inputs the program is traced with."""
        ex = {}
        for f in self.feats:
            if f.kind == "id_list":
                ex[f.col] = [[0], [0]] if f.separator is None else [f"a{f.separator}b", "c"]
            elif f.kind == "sparse_id":
                ex[f.col] = [0, 0]
            else:
                ex[f.col] = [0.0, 0.0]
        if self.content_key is not None:
            ex.setdefault(self.content_key.col, [0, 0])
        return self.encode(pd.DataFrame(ex), "example")


def serving_inputs(feats: list[FeatureSpec], proc: FeatureProcessor, df: pd.DataFrame,
                   source: str = "input") -> tuple[torch.Tensor, ...]:
    """Encode raw rows into the exported model's inputs (values/offsets per sparse feature, dense)."""
    return RowEncoder(feats, proc).encode(df, source)


