"""Transfer sets: rows the teachers label that have no ground truth.

A student sees its teachers' function only on the labelled training rows; a transfer set shows it
the function elsewhere too (ranking distillation samples unobserved pairs; GBDT-to-NN distillation
perturbs rows). The rows are raw table rows, appended to the interactions table and encoded by the
same feature join as real rows (``Dataset.build(..., transfer=...)``), so there is one encoder.
Their labels are NaN: methods train them with their teacher terms only.

Two ways to make rows, chosen by the data model (``strategy: auto``):

- ``pairs`` (interaction data, user key != item key): a donor training row gives the user and the
  row's other columns (time, context); the item is drawn by training popularity for half the rows
  and uniformly over the item catalogue for the other half, so rare and unseen-in-training items
  get teacher labels too. Pairs observed anywhere in the data are redrawn once and then dropped.
- ``perturb`` (a one-row-per-entity table): a donor training row, each feature column replaced with
  probability ``SWAP_PROB`` by the same column of another random training row (resampling from the
  training marginals; categorical values swapped), dense columns additionally mixed up with a
  partner row (``λ·a + (1-λ)·b``, ``λ ~ U(0.6, 1)``); each row gets a new key.

Example:
    >>> rows = make_transfer_rows(spec, tables, splits, ratio=1.0, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from appdistill.errors import ConfigError
from appdistill.features.spec import FeatureSpecSet

Strategy = Literal["auto", "pairs", "perturb"]
SWAP_PROB = 0.3      # per feature; high enough to leave the training manifold, low enough to stay near it
POPULAR_SHARE = 0.5  # pairs: items drawn by training popularity (the rest uniformly over the catalogue)


def resolve_strategy(spec: FeatureSpecSet, strategy: Strategy) -> str:
    if strategy != "auto":
        return strategy
    return "perturb" if spec.user_key == spec.item_key else "pairs"


def make_transfer_rows(spec: FeatureSpecSet, tables: dict[str, pd.DataFrame], splits: dict[str, np.ndarray],
                       ratio: float, strategy: Strategy = "auto", seed: int = 0) -> pd.DataFrame:
    """``round(ratio · len(train))`` new interaction rows (same columns as the interactions table).

    Args:
        spec / tables / splits: the data set's spec, raw tables and split rows.
        ratio: transfer rows per training row (> 0).
        strategy: ``auto`` | ``pairs`` | ``perturb`` (see the module doc).
        seed: the only randomness; equal arguments give equal rows.
    """
    if not ratio > 0:
        raise ConfigError(f"transfer.ratio must be > 0, got {ratio}")
    inter = tables["interactions"]
    train = splits["train"]
    n = int(round(ratio * len(train)))
    rng = np.random.default_rng(seed)
    how = resolve_strategy(spec, strategy)
    if how == "pairs":
        if spec.user_key == spec.item_key:
            raise ConfigError("transfer.strategy 'pairs' needs distinct user and item keys; use 'perturb'")
        return _pairs(spec, tables, inter, train, n, rng)
    return _perturb(spec, inter, train, n, rng)


def _pairs(spec: FeatureSpecSet, tables: dict[str, pd.DataFrame], inter: pd.DataFrame, train: np.ndarray, n: int,
           rng: np.random.Generator) -> pd.DataFrame:
    ik = spec.item_key
    donors = inter.iloc[rng.choice(train, n)].reset_index(drop=True)
    train_items = inter[ik].to_numpy()[train]
    catalogue = tables["items"][ik].to_numpy() if "items" in tables and ik in tables["items"] else np.unique(train_items)
    popular = rng.random(n) < POPULAR_SHARE
    items = np.where(popular, train_items[rng.integers(0, len(train_items), n)],
                     catalogue[rng.integers(0, len(catalogue), n)])
    # unobserved pairs only: a pair present anywhere in the data is redrawn once, then dropped
    seen = pd.MultiIndex.from_arrays([inter[spec.user_key].to_numpy(), inter[ik].to_numpy()])
    users = donors[spec.user_key].to_numpy()
    hit = pd.MultiIndex.from_arrays([users, items]).isin(seen)
    items[hit] = catalogue[rng.integers(0, len(catalogue), int(hit.sum()))]
    hit = pd.MultiIndex.from_arrays([users, items]).isin(seen)
    donors[ik] = items.astype(inter[ik].dtype, copy=False)
    return donors[~hit].reset_index(drop=True)


def _perturb(spec: FeatureSpecSet, inter: pd.DataFrame, train: np.ndarray, n: int,
             rng: np.random.Generator) -> pd.DataFrame:
    out = inter.iloc[rng.choice(train, n)].reset_index(drop=True)
    cols = {f.col for f in spec.features if f.table == "interactions" and f.kind in ("sparse_id", "id_list", "dense")}
    dense = {f.col for f in spec.features if f.table == "interactions" and f.kind == "dense"}
    keys = set(spec.tables["interactions"].keys)
    for c in sorted(cols - keys):
        dtype = inter[c].dtype
        other_rows = rng.choice(train, n)
        swap = rng.random(n) < SWAP_PROB
        if c in dense and pd.api.types.is_numeric_dtype(dtype):
            # mixed in float64 (NaN = missing) and cast back through pandas, so pandas' nullable
            # Int64/boolean columns (parquet files written from pandas) take the same path as numpy ones
            col = inter[c].to_numpy(np.float64, na_value=np.nan)
            own = out[c].to_numpy(np.float64, na_value=np.nan)
            lam = rng.uniform(0.6, 1.0, n)
            mixed = lam * own + (1 - lam) * col[rng.choice(train, n)]
            if pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
                # back to the column's integer/boolean type by rounding: a cast truncates (0.6 -> 0, counts
                # drift down) or, for booleans, makes any nonzero mix True (a False row with a True
                # partner always became True), shifting the column's distribution in the transfer rows
                mixed = np.rint(mixed)
            mixed = np.where(swap, col[other_rows], np.where(np.isnan(mixed), own, mixed))
            out[c] = pd.Series(mixed).astype(dtype)
            continue
        out[c] = np.where(swap, inter[c].to_numpy()[other_rows], out[c].to_numpy(copy=True))
    # each transfer row is a new entity: a fresh key that no real row has
    for k in keys:
        col = inter[k]
        if pd.api.types.is_integer_dtype(col.dtype):
            out[k] = np.arange(n, dtype=np.int64) + int(col.max()) + 1
        else:
            out[k] = [f"__transfer_{i}" for i in range(n)]
    return out
