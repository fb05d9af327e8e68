"""Shared fixtures: a tiny hand-made data set (three tables) and a feature spec over it.

``tiny_tables`` returns fresh DataFrames (mutate freely), ``tiny_dir`` writes them to ``tmp_path``
(interactions + items as parquet, users as CSV), ``tiny_spec_dict`` is the matching spec as a plain
dict (paths relative to the spec file) and ``tiny_spec`` is it parsed against ``tiny_dir``.

The interactions are in time order; with ``split: time, valid 0.2, test 0.2`` rows 0-11 train,
12-15 valid and 16-19 test, and item 15 occurs only in the test rows (a cold item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

#      user item rating
_INTERACTIONS = [
    (1, 10, 5), (1, 11, 3), (2, 10, 4), (2, 12, 1), (3, 13, 5), (3, 11, 2),
    (4, 14, 4), (4, 10, 3), (1, 12, 5), (2, 13, 2), (3, 14, 4), (4, 11, 1),
    (1, 13, 4), (2, 14, 3), (3, 10, 5), (4, 12, 2),
    (1, 15, 4), (2, 15, 5), (3, 12, 1), (4, 13, 4),
]


def make_tiny_tables() -> dict[str, pd.DataFrame]:
    inter = pd.DataFrame(_INTERACTIONS, columns=["user_id", "item_id", "rating"])
    inter["rating"] = inter["rating"].astype(np.float64)
    inter["timestamp"] = np.arange(100, 100 + len(inter), dtype=np.int64)
    items = pd.DataFrame({
        "item_id": [10, 11, 12, 13, 14, 15],
        "genres": ["a|b", "b", "", "c|a|b", "a", "b|c"],
        "year": [1990.0, 2000.0, 2010.0, np.nan, 1995.0, 2005.0],
        "title": ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta"],
    })
    users = pd.DataFrame({
        "user_id": [1, 2, 3, 4],
        "age": [20.0, 30.0, np.nan, 50.0],
        "gender": ["m", "f", "f", "m"],
    })
    return {"interactions": inter, "items": items, "users": users}


TABLE_FILES = {"interactions": "interactions.parquet", "items": "items.parquet", "users": "users.csv"}


def write_tables(directory: Path, tables: dict[str, pd.DataFrame]) -> Path:
    """Write ``tables`` under ``directory`` with the names in ``TABLE_FILES``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        path = directory / TABLE_FILES[name]
        if path.suffix == ".csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
    return directory


def make_tiny_spec_dict() -> dict[str, Any]:
    return {
        "name": "tiny",
        "tables": {
            "interactions": {"path": TABLE_FILES["interactions"], "key": ["user_id", "item_id"],
                             "label": {"column": "rating", "op": "ge", "threshold": 4},
                             "time_column": "timestamp"},
            "items": {"path": TABLE_FILES["items"], "key": "item_id"},
            "users": {"path": TABLE_FILES["users"], "key": "user_id"},
        },
        "features": [
            {"name": "user_id", "kind": "sparse_id", "table": "interactions", "dim": 4},
            {"name": "item_id", "kind": "sparse_id", "table": "interactions", "dim": 4},
            {"name": "genres", "kind": "id_list", "table": "items", "separator": "|", "dim": 4},
            {"name": "year", "kind": "dense", "table": "items", "transform": "standardize"},
            {"name": "age", "kind": "dense", "table": "users", "transform": "log1p"},
            {"name": "gender", "kind": "sparse_id", "table": "users", "dim": 4},
            {"name": "title", "kind": "text", "table": "items", "encoder": "minilm"},
        ],
        "visibility": {
            "student": ["user_id", "item_id", "genres", "year", "age", "gender"],
            "foundation": ["item_id", "title"],
        },
        "split": {"by": "time", "column": "timestamp", "valid": 0.2, "test": 0.2},
    }


def write_spec(directory: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_tables() -> dict[str, pd.DataFrame]:
    return make_tiny_tables()


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_tables: dict[str, pd.DataFrame]) -> Path:
    return write_tables(tmp_path, tiny_tables)


@pytest.fixture
def tiny_spec_dict() -> dict[str, Any]:
    return make_tiny_spec_dict()


@pytest.fixture
def tiny_spec(tiny_dir: Path, tiny_spec_dict: dict[str, Any]):
    from appdistill.features.spec import FeatureSpecSet

    return FeatureSpecSet.from_dict(tiny_spec_dict, source="tiny", base_dir=str(tiny_dir))


@pytest.fixture
def spec_file(tmp_path: Path):
    """Factory: ``spec_file(spec_dict=None, tables=None) -> Path`` writes tables + YAML to tmp_path."""

    def make(spec: dict[str, Any] | None = None, tables: dict[str, pd.DataFrame] | None = None,
             name: str = "spec.yaml") -> Path:
        write_tables(tmp_path, tables if tables is not None else make_tiny_tables())
        return write_spec(tmp_path, spec if spec is not None else make_tiny_spec_dict(), name)

    return make
