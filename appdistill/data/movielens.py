"""MovieLens-100K, read from the files the ``recbole==1.2.1`` wheel ships.

The data set is not redistributed by this project: it is located inside the installed recbole
package with :mod:`importlib` (recbole itself is never imported) and read with pandas. The
GroupLens terms apply (research use, cite Harper & Konstan 2015, no redistribution).

Tables:
    interactions: user_id, item_id, rating (1-5), timestamp
    items: item_id, title, year, genres ("Action|Comedy"), text ("title. genres") [, poster ("<id>.jpg")]
    users: user_id, age, gender, occupation, zip_prefix
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from appdistill.data import SOURCES
from appdistill.errors import AppDistillError


def ml100k_dir() -> Path:
    """Directory ``recbole/dataset_example/ml-100k`` inside the installed recbole wheel."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise AppDistillError(
            "MovieLens-100K comes from the recbole wheel: run `pip install --no-deps recbole==1.2.1` "
            "(make install does this)")
    d = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not d.is_dir():
        raise AppDistillError(f"recbole is installed but '{d}' is missing (need recbole==1.2.1)")
    return d


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read a recbole atomic file: TSV whose header cells are ``name:type``."""
    if not path.is_file():
        raise AppDistillError(f"file '{path}': MovieLens-100K file missing from the recbole wheel")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


@SOURCES.register("ml100k")
def load_ml100k(posters: bool = False) -> dict[str, pd.DataFrame]:
    """Load the three ML-100K tables (100,000 ratings, 943 users, 1,682 items).

    Args:
        posters: add an items column ``poster`` = ``"<item_id>.jpg"``, the file name of the item's
            poster for an ``image`` feature whose ``root`` is a folder of posters named by item id
            (``feature_specs/ml100k_posters.yaml``). Off by default so the tables, and every
            fingerprint derived from them, do not change for specs without posters.
    """
    d = ml100k_dir()
    inter = _read_atomic(d / "ml-100k.inter")
    inter = pd.DataFrame({
        "user_id": inter["user_id"].astype("int64"),
        "item_id": inter["item_id"].astype("int64"),
        "rating": inter["rating"].astype("float32"),
        "timestamp": inter["timestamp"].astype("float64").astype("int64"),
    })
    it = _read_atomic(d / "ml-100k.item")
    genres = it["class"].str.split().str.join("|")
    year = pd.to_numeric(it["release_year"], errors="coerce")
    items = pd.DataFrame({
        "item_id": it["item_id"].astype("int64"),
        "title": it["movie_title"],
        "year": year.astype("float32"),
        "genres": genres,
        "text": it["movie_title"] + ". " + genres.str.replace("|", ", ", regex=False),
    })
    if posters:
        items["poster"] = items["item_id"].astype(str) + ".jpg"
    us = _read_atomic(d / "ml-100k.user")
    users = pd.DataFrame({
        "user_id": us["user_id"].astype("int64"),
        "age": us["age"].astype("float32"),
        "gender": us["gender"],
        "occupation": us["occupation"],
        "zip_prefix": us["zip_code"].str[:1],
    })
    return {"interactions": inter, "items": items, "users": users}
