"""Loading and checking the tables a feature spec names.

Each check fails with a message naming the file, the feature and the column, so a user can fix
the spec or the data without reading code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.features.spec import FeatureSpecSet


def table_location(spec: FeatureSpecSet, name: str) -> str:
    t = spec.tables[name]
    if t.path is None:
        return f"{spec.source.key}:{name}" if spec.source else name
    p = Path(t.path)
    return str(p if p.is_absolute() else Path(spec.base_dir) / p)


def _read_file(path: Path, csv_options: dict) -> pd.DataFrame:
    if not path.is_file():
        raise SpecError(f"file '{path}': table file not found")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            return pd.read_parquet(path)
        if suffix.endswith(".csv") or suffix.endswith(".csv.gz") or suffix.endswith(".tsv"):
            opts = {"sep": "\t"} if suffix.endswith(".tsv") else {}
            opts.update(csv_options)
            return pd.read_csv(path, **opts)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise SpecError(f"file '{path}': cannot be read as a table: {e}") from e
    raise SpecError(f"file '{path}': unsupported table format (use .parquet, .csv or .tsv)")


def load_tables(spec: FeatureSpecSet) -> dict[str, pd.DataFrame]:
    """Read every table of ``spec`` (files or the spec's built-in source) and check it."""
    from appdistill.data import SOURCES

    source_tables: dict[str, pd.DataFrame] = {}
    if spec.source is not None and any(t.path is None for t in spec.tables.values()):
        fn = SOURCES.get(spec.source.key, context=f"spec '{spec.name}' source")
        source_tables = fn(**spec.source.kwargs)
    out: dict[str, pd.DataFrame] = {}
    for name, t in spec.tables.items():
        loc = table_location(spec, name)
        if t.path is None:
            if name not in source_tables:
                raise SpecError(f"spec '{spec.name}': source '{spec.source.key}' has no table '{name}' "
                                f"(it has {sorted(source_tables)})")
            df = source_tables[name]
        else:
            df = _read_file(Path(loc), t.csv_options)
        if len(df) == 0:
            raise SpecError(f"file '{loc}': table '{name}' is empty")
        for k in t.keys:
            if k not in df.columns:
                raise SpecError(f"file '{loc}': key column '{k}' of table '{name}' is missing "
                                f"(columns: {list(df.columns)})")
            if df[k].isna().any():
                row = int(np.flatnonzero(df[k].isna().to_numpy())[0])
                raise SpecError(f"file '{loc}', column '{k}', row {row}: NaN in an id column")
        if name != "interactions" and df[t.keys[0]].duplicated().any():
            row = int(np.flatnonzero(df[t.keys[0]].duplicated().to_numpy())[0])
            raise SpecError(f"file '{loc}', column '{t.keys[0]}', row {row}: duplicate key in table '{name}'")
        out[name] = df.reset_index(drop=True)
    for f in spec.features:
        df, loc = out[f.table], table_location(spec, f.table)
        if f.col not in df.columns:
            raise SpecError(f"file '{loc}', feature '{f.name}': column '{f.col}' is missing "
                            f"(columns: {list(df.columns)})")
        col = df[f.col]
        if f.kind == "dense" and not pd.api.types.is_numeric_dtype(col.dtype):
            raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind 'dense' needs a "
                            f"numeric column, got dtype {col.dtype}")
        if f.kind == "sparse_id":
            if col.isna().any():
                row = int(np.flatnonzero(col.isna().to_numpy())[0])
                raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}', row {row}: NaN in an id column")
            if pd.api.types.is_float_dtype(col.dtype) and not bool((col % 1 == 0).all()):
                raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind 'sparse_id' needs "
                                "integer or string ids, got non-integral floats (is this a dense feature?)")
        if f.kind == "id_list" and f.separator is None and not col.map(
                lambda v: isinstance(v, (list, tuple, np.ndarray)) or v is None
                or (isinstance(v, float) and np.isnan(v))).all():  # a null cell is an empty list
            raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind 'id_list' needs a "
                            "`separator` for string columns, or list-valued cells")
        if f.kind in ("text", "image") and not (pd.api.types.is_object_dtype(col.dtype)
                                                 or pd.api.types.is_string_dtype(col.dtype)):
            raise SpecError(f"file '{loc}', feature '{f.name}', column '{f.col}': kind '{f.kind}' needs a "
                            f"string column, got dtype {col.dtype}")
    make_labels(spec, out["interactions"])  # validates early
    return out


def make_labels(spec: FeatureSpecSet, inter: pd.DataFrame) -> np.ndarray:
    """Binary labels ``[N]`` float32 from the interactions' label spec; errors if not 0/1."""
    lab = spec.tables["interactions"].label
    assert lab is not None
    loc = table_location(spec, "interactions")
    if lab.column not in inter.columns:
        raise SpecError(f"file '{loc}': label column '{lab.column}' is missing (columns: {list(inter.columns)})")
    col = inter[lab.column]
    if not pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        raise SpecError(f"file '{loc}', column '{lab.column}': the label must be numeric, got dtype {col.dtype}")
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise SpecError(f"file '{loc}', column '{lab.column}', row {row}: missing label")
    x = col.to_numpy().astype(np.float64)
    ops = {"ge": np.greater_equal, "gt": np.greater, "le": np.less_equal, "lt": np.less, "eq": np.equal}
    y = x if lab.op == "identity" else ops[lab.op](x, lab.threshold).astype(np.float64)
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SpecError(f"file '{loc}', column '{lab.column}', row {row}: label is {x[row]!r}, not 0/1 after its "
                        f"transform (op={lab.op}); add `op`/`threshold` to the label spec")
    if len(np.unique(y)) < 2:
        raise SpecError(f"file '{loc}', column '{lab.column}': every label is {y[0]:.0f} after the transform; "
                        "need both classes")
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
        order = np.argsort(inter[s.column].to_numpy(), kind="stable")
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
