"""Loading and checking the tables a feature spec names.

Each check fails with a message naming the file, the feature and the column, so a user can fix
the spec or the data without reading code.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.features.spec import FeatureSpecSet
from appdistill.features.vocab import (KeyIndex, first_out_of_float32, negative_rows, odd_id, odd_id_message,
                                       out_of_float32_message)

log = logging.getLogger("appdistill.data")

#: a side table whose key matches fewer than this share of the interactions gets a JoinCoverageWarning
JOIN_WARN_BELOW = 0.5


class JoinCoverageWarning(RuntimeWarning):
    """A side table matches few interactions (its features are missing -- OOV/mean -- for the rest)."""


def table_location(spec: FeatureSpecSet, name: str) -> str:
    t = spec.tables[name]
    if t.path is None:
        return f"{spec.source.key}:{name}" if spec.source else name
    p = Path(t.path)
    return str(p if p.is_absolute() else Path(spec.base_dir) / p)


def _read_file(path: Path, csv_options: dict) -> pd.DataFrame:
    if path.is_dir():
        raise SpecError(f"file '{path}': is a directory, not a table file; give the path of one .parquet, .csv "
                        "or .tsv file (only the interactions table may be a folder of parquet files, read in chunks)")
    if not path.is_file():
        raise SpecError(f"file '{path}': table file not found")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            if len(set(names)) < len(names):  # pandas' reader refuses these with an arrow dump: keep the names
                return pq.ParquetFile(path).read().to_pandas()
            return pd.read_parquet(path)
        if suffix.endswith(".csv") or suffix.endswith(".csv.gz") or suffix.endswith(".tsv"):
            opts = {"sep": "\t"} if suffix.endswith(".tsv") else {}
            opts.update(csv_options)
            df = pd.read_csv(path, **opts)
            header = _csv_header(path, opts)
            if header is not None and len(header) == df.shape[1] and len(set(header)) < len(header):
                df.columns = header  # pandas renamed a repeated 'a' to 'a.1': give the names as written
            return df
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise SpecError(f"file '{path}': cannot be read as a table: {e}") from e
    raise SpecError(f"file '{path}': unsupported table format (use .parquet, .csv or .tsv)")


#: ``read_csv`` options that only shape the columns' values, left out when reading the header row as written
_VALUE_OPTIONS = ("dtype", "converters", "parse_dates", "date_format", "na_values", "keep_default_na", "na_filter",
                  "true_values", "false_values", "nrows", "index_col", "usecols", "header", "names")


def _csv_header(path: Path, opts: dict) -> list[str] | None:
    """The header row of a CSV as written (``read_csv`` renames a repeated name ``a`` to ``a.1``, so a column
    given twice would silently be read from its first copy); ``None`` where the options give no header row."""
    if opts.get("names") is not None or opts.get("header", "infer") not in ("infer", 0) or opts.get("usecols"):
        return None
    try:
        head = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False,
                           **{k: v for k, v in opts.items() if k not in _VALUE_OPTIONS})
    except Exception:  # noqa: BLE001 - the full read succeeded; keep its names
        return None
    return [str(v) for v in head.iloc[0]] if len(head) else None


def repeated_columns(df: pd.DataFrame, wanted: Iterable[str]) -> list[str]:
    """Sorted names among ``wanted`` that ``df`` holds more than once (which copy would be meant?)."""
    wanted = set(wanted)
    return sorted({str(c) for c in df.columns[df.columns.duplicated()] if c in wanted})


def _spec_columns(spec: FeatureSpecSet, name: str) -> set[str]:
    """Every column of table ``name`` the spec reads: keys, features, label, time and split columns."""
    t = spec.tables[name]
    cols = set(t.keys) | {f.col for f in spec.features if f.table == name}
    cols |= {c for c in (t.label.column if t.label else None, t.time_column) if c}
    if name == "interactions" and spec.split.column:
        cols.add(spec.split.column)
    return cols


def _unique_columns(spec: FeatureSpecSet, name: str, df: pd.DataFrame, loc: str) -> pd.DataFrame:
    """Refuse a column the spec reads that appears more than once (which copy is meant?); drop the other
    repeated columns, which nothing reads."""
    rep = df.columns.duplicated(keep=False)
    if not rep.any():
        return df
    used = repeated_columns(df, _spec_columns(spec, name))
    if used:
        raise SpecError(f"file '{loc}': column{'s' if len(used) > 1 else ''} {', '.join(repr(c) for c in used)} "
                        f"of table '{name}' appear{'' if len(used) > 1 else 's'} more than once; give each "
                        "column once")
    return df.loc[:, ~rep]


def load_tables(spec: FeatureSpecSet, skip: tuple[str, ...] = ()) -> dict[str, pd.DataFrame]:
    """Read every table of ``spec`` (files or the spec's built-in source) but those in ``skip``, and check it."""
    from appdistill.data import SOURCES

    source_tables: dict[str, pd.DataFrame] = {}
    if spec.source is not None and any(t.path is None for n, t in spec.tables.items() if n not in skip):
        fn = SOURCES.get(spec.source.key, context=f"spec '{spec.name}' source")
        source_tables = fn(**spec.source.kwargs)
    out: dict[str, pd.DataFrame] = {}
    for name, t in spec.tables.items():
        if name in skip:
            continue
        loc = table_location(spec, name)
        if t.path is None:
            if name not in source_tables:
                raise SpecError(f"spec '{spec.name}': source '{spec.source.key}' has no table '{name}' "
                                f"(it has {sorted(source_tables)})")
            df = source_tables[name]
        else:
            df = _read_file(Path(loc), t.csv_options)
        df = _unique_columns(spec, name, df, loc)
        if len(df) == 0:
            raise SpecError(f"file '{loc}': table '{name}' is empty")
        check_table(spec, name, df, loc)
        out[name] = df.reset_index(drop=True)
    return out


def check_table(spec: FeatureSpecSet, name: str, df: pd.DataFrame, loc: str, first_row: int = 0,
                whole: bool = True) -> np.ndarray | None:
    """Check table ``name`` (or, with ``whole=False``, a chunk of it whose first row is row ``first_row``
    of file ``loc``): key columns, every feature's column, and for the interactions the labels, which
    it returns (``None`` for other tables). A chunk may hold one class only. Errors name the file, the
    column and the row counted from the file's start."""
    try:
        return _check_table(spec, name, df, loc, whole)
    except SpecError as e:
        if not first_row:
            raise
        # positions are the chunk's: report the file's row
        raise SpecError(re.sub(r"\brow (\d+)", lambda m: f"row {int(m.group(1)) + first_row}", str(e))) from None


def _check_table(spec: FeatureSpecSet, name: str, df: pd.DataFrame, loc: str, whole: bool) -> np.ndarray | None:
    t = spec.tables[name]
    for k in t.keys:
        if k not in df.columns:
            raise SpecError(f"file '{loc}': key column '{k}' of table '{name}' is missing "
                            f"(columns: {list(df.columns)})")
        if df[k].isna().any():
            row = int(np.flatnonzero(df[k].isna().to_numpy())[0])
            raise SpecError(f"file '{loc}', column '{k}', row {row}: NaN in an id column (a key column: "
                            "keys join the tables, every row needs one)")
        _check_ids(df[k], f"file '{loc}', column '{k}'")
    if name != "interactions" and df[t.keys[0]].duplicated().any():
        row = int(np.flatnonzero(df[t.keys[0]].duplicated().to_numpy())[0])
        raise SpecError(f"file '{loc}', column '{t.keys[0]}', row {row}: duplicate key in table '{name}'")
    for f in spec.features:
        if f.table != name:
            continue
        if f.col not in df.columns:
            raise SpecError(f"file '{loc}', feature '{f.name}': column '{f.col}' is missing "
                            f"(columns: {list(df.columns)})")
        col = df[f.col]
        where = f"file '{loc}', feature '{f.name}', column '{f.col}'"
        if f.kind == "dense":
            if not pd.api.types.is_numeric_dtype(col.dtype) or col.dtype.kind == "c":
                raise SpecError(f"{where}{_first_non_number(col)}: kind 'dense' needs a numeric column, got dtype "
                                f"{col.dtype}")
            x = col.to_numpy(np.float64, na_value=np.nan)
            r = first_out_of_float32(x)
            if r is not None:
                raise SpecError(out_of_float32_message(where, r, x[r].item()))
            if "log1p" in f.transform:
                # the transform clips at 0 (log1p(x) for x < 0 is NaN or -inf): a negative value would
                # silently become the same 0 as every other negative one, so the column's sign is lost
                neg = negative_rows(x)
                if len(neg):
                    r = int(neg[0])
                    raise SpecError(f"{where}, row {r}: value {x[r].item()!r} is negative ({len(neg):,} rows "
                                    f"are); the '{f.transform}' transform needs values >= 0 and would map every "
                                    "negative value to 0: use `transform: standardize` (or `none`), or shift the "
                                    "column")
        if f.kind == "sparse_id":
            if col.isna().any() and f.missing != "oov":
                row = int(np.flatnonzero(col.isna().to_numpy())[0])
                raise SpecError(f"{where}, row {row}: NaN in an id column (a missing category); set `missing: oov` "
                                f"on feature '{f.name}' to map missing ids to the OOV row, or fill them")
            _check_ids(col, where)
        if f.kind == "id_list":
            _check_list_ids(col, where, f.separator)
        if f.kind == "id_list" and f.separator is None and not col.map(
                lambda v: isinstance(v, (list, tuple, np.ndarray)) or v is None
                or (isinstance(v, float) and np.isnan(v))).all():  # a null cell is an empty list
            raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind 'id_list' needs a "
                            "`separator` for string columns, or list-valued cells")
        if f.kind in ("text", "image") and not (pd.api.types.is_object_dtype(col.dtype)
                                                 or pd.api.types.is_string_dtype(col.dtype)):
            raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind '{f.kind}' needs a "
                            f"string column, got dtype {col.dtype}")
    if name == "interactions":
        return make_labels(spec, df, loc=loc, both_classes=whole)  # validates early
    return None


def _check_ids(col: pd.Series, where: str) -> None:
    """Ids are integers, integral floats or strings (NaN is the caller's business): name the first row that
    is not (a boolean, inf, a fractional float, a date, a list...)."""
    arr = col.to_numpy()
    found = odd_id(arr)
    if found is not None:
        raise SpecError(odd_id_message(where, found))
    if arr.dtype.kind == "f":
        frac = np.isfinite(arr) & (arr % 1 != 0)
        if frac.any():
            r = int(np.flatnonzero(frac)[0])
            raise SpecError(f"{where}, row {r}: id {arr[r].item()!r} is a non-integral float; ids are integers or "
                            "strings (is this a dense feature?)")


def _check_list_ids(col: pd.Series, where: str, separator: str | None) -> None:
    """The cells of an ``id_list`` column: separator strings (or single ids), or lists of ids."""
    if separator is not None:
        cells = col.dropna().to_numpy()
        found = odd_id(cells)
        if found is not None:
            i, v, what = found
            raise SpecError(f"{where}, row {int(np.flatnonzero(col.notna().to_numpy())[i])}: {v!r} is {what}; "
                            f"cells are strings of ids separated by {separator!r}")
        return
    flat = col.explode()  # one element per row, index = the row (nested lists stay lists: refused)
    flat = flat[flat.notna().to_numpy()] if len(flat) else flat
    found = odd_id(flat.to_numpy())
    if found is not None:
        i, v, what = found
        raise SpecError(f"{where}, row {int(flat.index[i])}: list element {v!r} is {what}, not an id; ids are "
                        "integers or strings")


def check_joins(spec: FeatureSpecSet, tables: dict[str, pd.DataFrame]
                ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Join every side table to the interactions: its coverage, ``{table: {"matched": rows, "rows":
    interactions, "coverage": share}}``, and the joined rows, ``{table: [N] int64 side-table row per
    interaction, -1 where none}`` (the encoder's join, computed once).

    Refuses (naming both files and columns) key columns of different kinds -- integers in one file,
    strings or a mix in the other: such a join matches nothing, and every row would silently get the
    side table's "missing" row -- and a join that matches no interaction at all. Warns
    (:class:`JoinCoverageWarning`) below :data:`JOIN_WARN_BELOW`.
    """
    inter, iloc = tables["interactions"], table_location(spec, "interactions")
    out: dict[str, dict[str, Any]] = {}
    joined: dict[str, np.ndarray] = {}
    for name, t in spec.tables.items():
        if name == "interactions":
            continue
        key, side = t.keys[0], tables[name]
        check_key_kinds(spec, name, inter[key], side[key], iloc)
        idx = joined[name] = np.asarray(KeyIndex(side[key]).get_indexer(inter[key]), np.int64)
        out[name] = join_report(spec, name, int((idx >= 0).sum()), len(inter), iloc,
                                inter[key].head(3).tolist(), side[key].head(3).tolist())
    return out, joined


def check_key_kinds(spec: FeatureSpecSet, name: str, inter_key: pd.Series, side_key: pd.Series, iloc: str) -> None:
    """Refuse a join of side table ``name`` whose key columns hold different kinds of ids."""
    key, loc = spec.tables[name].keys[0], table_location(spec, name)
    a, b = _key_kind(inter_key), _key_kind(side_key)
    if a != b or "mixed" in (a, b):
        raise SpecError(
            f"table '{name}': key column '{key}' of file '{loc}' holds {b} values but column '{key}' of file "
            f"'{iloc}' holds {a} values, so no row can join; make both integers or both strings (for a CSV, "
            f"e.g. `csv_options: {{dtype: {{{key}: str}}}}` on both tables)")


def join_report(spec: FeatureSpecSet, name: str, matched: int, rows: int, iloc: str, inter_examples: list,
                side_examples: list) -> dict[str, Any]:
    """``{"matched", "rows", "coverage"}`` of side table ``name``; refuses a join that matches nothing and
    warns (:class:`JoinCoverageWarning`) below :data:`JOIN_WARN_BELOW`."""
    key, loc = spec.tables[name].keys[0], table_location(spec, name)
    cov = matched / max(rows, 1)
    if matched == 0:
        raise SpecError(
            f"table '{name}': no interaction joins: column '{key}' of file '{iloc}' (e.g. "
            f"{inter_examples}) matches no value of column '{key}' of file '{loc}' (e.g. {side_examples})")
    if cov < JOIN_WARN_BELOW:
        warnings.warn(f"table '{name}': only {matched:,} of {rows:,} interactions ({cov:.1%}) find their "
                      f"'{key}' in file '{loc}'; the others get its missing row (OOV ids, training means)",
                      JoinCoverageWarning, stacklevel=3)
    log.info("table %s: %d of %d interactions joined (%.1f%%)", name, matched, rows, 100 * cov)
    return {"matched": matched, "rows": int(rows), "coverage": round(cov, 4)}


def _key_kind(col: pd.Series) -> str:
    """``integer`` (ints, integral floats), ``string``, ``boolean`` or ``mixed`` (several kinds)."""
    kind = pd.api.types.infer_dtype(col, skipna=True)
    if kind in ("integer", "floating", "mixed-integer-float", "decimal"):
        return "integer"
    if kind in ("string", "boolean", "empty"):
        return kind
    return "mixed" if kind.startswith("mixed") else kind


def make_labels(spec: FeatureSpecSet, inter: pd.DataFrame, loc: str | None = None,
                both_classes: bool = True) -> np.ndarray:
    """Binary labels ``[N]`` float32 from the interactions' label spec; errors if not 0/1 (and, with
    ``both_classes``, when one class is absent: a chunk of a streamed table may hold one class).

    ``positive`` (a value or a list): label 1 where the column equals one of them (numbers compare as
    numbers, anything else as stripped strings, so ``" >50K"`` equals ``">50K"``), 0 elsewhere.
    """
    lab = spec.tables["interactions"].label
    assert lab is not None
    loc = loc or table_location(spec, "interactions")
    if lab.column not in inter.columns:
        raise SpecError(f"file '{loc}': label column '{lab.column}' is missing (columns: {list(inter.columns)})")
    col = inter[lab.column]
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise SpecError(f"file '{loc}', column '{lab.column}', row {row}: missing label")
    if lab.positive is not None:
        return _positive_labels(col, lab.positive, f"file '{loc}', column '{lab.column}'", both_classes)
    if not pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        raise SpecError(f"file '{loc}', column '{lab.column}'{_first_non_number(col)}: the label must be numeric, "
                        f"got dtype {col.dtype}; "
                        f"for string labels give the positive value, e.g. `label: {{column: {lab.column}, "
                        f"positive: {str(col.iloc[0])!r}}}`")
    x = col.to_numpy().astype(np.float64)
    ops = {"ge": np.greater_equal, "gt": np.greater, "le": np.less_equal, "lt": np.less, "eq": np.equal}
    y = x if lab.op == "identity" else ops[lab.op](x, lab.threshold).astype(np.float64)
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SpecError(f"file '{loc}', column '{lab.column}', row {row}: label is {x[row].item()!r}, not 0/1 after its "
                        f"transform (op={lab.op}); add `op`/`threshold` to the label spec")
    if both_classes and len(np.unique(y)) < 2:
        raise SpecError(one_class_message(f"file '{loc}', column '{lab.column}'", y[0]))
    return y.astype(np.float32)


def split_rows(spec: FeatureSpecSet, inter: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row indices of ``train``/``valid``/``test`` by the spec's split (sorted, disjoint)."""
    s, n = spec.split, len(inter)
    rng = np.random.default_rng(s.seed)
    n_test, n_valid = int(round(n * s.test)), int(round(n * s.valid))
    if s.by == "random":
        perm = rng.permutation(n)
        parts = {"test": perm[:n_test], "valid": perm[n_test:n_test + n_valid], "train": perm[n_test + n_valid:]}
    elif s.by == "time":
        if s.column not in inter.columns:
            raise SpecError(f"file '{table_location(spec, 'interactions')}': split column '{s.column}' is missing")
        order = np.argsort(_time_keys(inter[s.column], f"file '{table_location(spec, 'interactions')}', column "
                                                     f"'{s.column}'"), kind="stable")
        parts = {"train": order[:n - n_test - n_valid], "valid": order[n - n_test - n_valid:n - n_test],
                 "test": order[n - n_test:]}
    else:  # cold_item: whole items go to test (then valid); none of their rows is in train
        items = inter[spec.item_key].to_numpy()
        uniq, inv, counts = np.unique(items, return_inverse=True, return_counts=True)
        order = rng.permutation(len(uniq))
        cum = np.cumsum(counts[order])
        test_items = order[: int(np.searchsorted(cum, n_test)) + 1]
        valid_items = order[len(test_items): int(np.searchsorted(cum, n_test + n_valid)) + 1]
        role = np.zeros(len(uniq), np.int8)
        role[test_items], role[valid_items] = 2, 1
        r = role[inv]
        parts = {"train": np.flatnonzero(r == 0), "valid": np.flatnonzero(r == 1), "test": np.flatnonzero(r == 2)}
    out = {k: np.sort(v).astype(np.int64) for k, v in parts.items()}
    for k, v in out.items():
        if len(v) == 0:
            raise SpecError(f"split '{s.by}': the {k} split is empty ({n} interactions)")
    return out


def first_non_number(col: pd.Series) -> tuple[pd.Series, int | None]:
    """``(pd.to_numeric(col, errors="coerce"), R)``: R is the row of the first present value that is not
    a number (``None`` if there is none). Training tables and the serving row encoder both ask here."""
    conv = pd.to_numeric(col, errors="coerce")
    bad = (conv.isna() & col.notna()).to_numpy()
    return conv, (int(np.flatnonzero(bad)[0]) if bad.any() else None)


def _first_non_number(col: pd.Series) -> str:
    """``", row R (value 'x')"`` for the first value of ``col`` that is not a number (empty if none is:
    e.g. a complex column)."""
    _, r = first_non_number(col)
    return "" if r is None else f", row {r} (value {str(col.iloc[r])[:40]!r})"


def _time_keys(col: pd.Series, where: str) -> np.ndarray:
    """``[N]`` sortable times of a time-split column: numbers, datetimes, or strings that parse as
    dates/times. A missing or unparsable time is refused with its row: sorting would put it first or
    last and silently move the row into train or test."""
    if pd.api.types.is_bool_dtype(col.dtype):
        raise SpecError(f"{where}: a time split needs numbers or dates/times, got booleans")
    if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_datetime64_any_dtype(col.dtype):
        t = col
    else:
        with warnings.catch_warnings():  # "could not infer format": each value parsed on its own, fine here
            warnings.simplefilter("ignore", UserWarning)
            t = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
        num = pd.to_numeric(col, errors="coerce")
        if num.notna().sum() > t.notna().sum():  # mostly numbers stored as text (a CSV column with a stray value)
            t = num
        bad = t.isna() & col.notna()
        if bad.any():  # the first value the column's majority reading cannot parse
            r = int(np.flatnonzero(bad.to_numpy())[0])
            raise SpecError(f"{where}, row {r}: {col.iloc[r]!r} is neither a number nor a date/time (a time split "
                            "orders the rows by this column)")
    missing = t.isna().to_numpy()
    if missing.any():
        raise SpecError(f"{where}, row {int(np.flatnonzero(missing)[0])}: missing time ({int(missing.sum())} rows); a "
                        "time split orders every row by this column")
    if pd.api.types.is_datetime64_any_dtype(t.dtype):
        if getattr(t.dt, "tz", None) is not None:  # aware times: compare in UTC (numpy has no time zones)
            t = t.dt.tz_convert("UTC").dt.tz_localize(None)
        return t.to_numpy("datetime64[ns]")
    return t.to_numpy()


def one_class_message(where: str, label: float) -> str:
    return f"{where}: every label is {label:.0f} after the transform; need both classes"


def _positive_labels(col: pd.Series, positive: Any, where: str, both_classes: bool = True) -> np.ndarray:
    values = positive if isinstance(positive, list) else [positive]
    nums = pd.to_numeric(pd.Series([None if isinstance(v, bool) else v for v in values], dtype=object),
                         errors="coerce")
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype) and nums.notna().all():
        y = np.isin(col.to_numpy(np.float64), nums.to_numpy(np.float64))  # 5, 5.0 and "5" are the same label
    else:
        text = col.astype(str).str.strip()
        y = text.isin([str(v).strip() for v in values]).to_numpy()
    if both_classes and (y.all() or not y.any()):
        seen = col.astype(str).str.strip().value_counts().index[:8].tolist()
        raise SpecError(f"{where}: every label is {int(y[0])} with `positive: {positive!r}`; need both classes "
                        f"(values seen: {seen})")
    return y.astype(np.float32)
