"""Build the embedding stores a feature spec's foundation-visible text/image features need.

Each ``text``/``image`` feature that ``spec.visible(model)`` lists is encoded over the rows of its
own table (items, users): one row per key, never per interaction. The feature's ``encoder`` names
an :data:`~appdistill.foundation.base.ENCODERS` entry (default ``minilm`` for text, ``clip`` for
images); its kwargs come from ``encoder_kwargs``, looked up by feature name first, then encoder name
(an experiment config's ``foundation.encoders`` block), because a feature spec is data only.

Image paths are resolved here: relative paths against the feature's ``root:``, itself relative to
the spec's ``base_dir`` (the spec file's directory); absolute paths are kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.foundation.base import ENCODERS, Encoder, json_digest
from appdistill.foundation.store import EmbeddingStore, StoreEntry

if TYPE_CHECKING:  # appdistill.features imports torchrec; keep `import appdistill.foundation` light
    from appdistill.features.dataset import Dataset
    from appdistill.features.spec import FeatureSpec, FeatureSpecSet

DEFAULT_ENCODERS = {"text": "minilm", "image": "clip"}


def foundation_features(spec: FeatureSpecSet, model: str = "foundation") -> list[FeatureSpec]:
    """The ``text``/``image`` features ``model`` may see, in spec order."""
    return [f for f in spec.visible(model) if f.kind in ("text", "image")]


def image_root(spec: FeatureSpecSet, feature: FeatureSpec) -> Path:
    """Directory relative image paths of ``feature`` resolve against."""
    base = Path(spec.base_dir)
    if feature.root is None:
        return base
    root = Path(feature.root).expanduser()
    return root if root.is_absolute() else base / root


def _resolve_image(value: Any, root: Path) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        return None
    p = Path(str(value).strip()).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def feature_inputs(spec: FeatureSpecSet, tables: Mapping[str, pd.DataFrame],
                   feature: FeatureSpec) -> tuple[list[Any], list[Any]]:
    """``(keys [n], inputs [n])`` of one text/image feature over the rows of its table.

    Image inputs come back as absolute path strings (``None`` for empty cells).
    """
    if feature.table == "interactions":
        raise SpecError(f"feature '{feature.name}': {feature.kind} features must live on a side table "
                        "(items, users): foundation encoding is per item, never per interaction")
    df = tables[feature.table]
    key = spec.tables[feature.table].keys[0]
    keys = df[key].tolist()
    values = df[feature.col].tolist()
    if feature.kind == "image":
        root = image_root(spec, feature)
        values = [_resolve_image(v, root) for v in values]
    return keys, values


def make_encoder(feature: FeatureSpec, encoder_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> Encoder:
    """Build the encoder of ``feature`` from the registry (kwargs by feature name, then encoder name)."""
    name = feature.encoder or DEFAULT_ENCODERS[feature.kind]
    kw = dict((encoder_kwargs or {}).get(feature.name) or (encoder_kwargs or {}).get(name) or {})
    if name == "clip" and feature.kind == "text":
        kw.setdefault("modality", "text")  # CLIP text tower for a text feature
    enc: Encoder = ENCODERS.build(name, kw, f"feature '{feature.name}'")
    if enc.modality != feature.kind:
        raise SpecError(f"feature '{feature.name}': encoder '{name}' encodes {enc.modality}, "
                        f"but the feature is kind '{feature.kind}'")
    return enc


def build_foundation_stores(data: Dataset | FeatureSpecSet, store: EmbeddingStore | str | Path,
                            tables: Mapping[str, pd.DataFrame] | None = None, model: str = "foundation",
                            encoder_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                            encoders: Mapping[str, Encoder] | None = None) -> dict[str, dict[str, StoreEntry]]:
    """Build (or open, when up to date) every store ``model``'s text/image features need.

    Args:
        data: a built :class:`Dataset` (its spec and tables are used) or a spec.
        store: an :class:`EmbeddingStore` or its root directory.
        tables: the spec's tables when ``data`` is a spec (default: ``load_tables(spec)``).
        model: visibility entry whose features are encoded (``foundation``, ``lightgbm``...).
        encoder_kwargs: ``{feature or encoder name: kwargs}`` (e.g. ``{"clip": {"pretrained": PATH}}``).
        encoders: ready encoders by feature name (override the registry, e.g. in tests).

    Returns:
        ``{feature: {output: StoreEntry}}``; ``entry.matrix`` is ``[rows of the feature's table, dim]``
        in table row order, so ``Dataset.table_rows[table]`` indexes it directly (its "missing" row
        ``len(table)`` needs one appended zero row, as the dataset does for dense features).
    """
    if hasattr(data, "tables") and hasattr(data, "spec"):  # a Dataset
        spec, tables = data.spec, data.tables
    else:
        spec = data
        if tables is None:
            from appdistill.features.tables import load_tables

            tables = load_tables(spec)
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    shared: dict[str, Encoder] = {}
    out: dict[str, dict[str, StoreEntry]] = {}
    for f in foundation_features(spec, model):
        enc = _encoder_for(f, encoder_kwargs, encoders, shared)
        ids, inputs = feature_inputs(spec, tables, f)
        out[f.name] = store.get_or_build_all(enc, f.name, ids, inputs)
    return out


def text_embeddings(data: Dataset, features: Sequence[FeatureSpec] | None = None,
                    store: EmbeddingStore | str | Path | None = None,
                    encoder_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """Final sentence embeddings of text features, through the store (e.g. LightGBM's text columns).

    Args:
        data: the dataset (spec + tables).
        features: text features to encode (default: every ``text`` feature of the spec).
        store: store or root (default: :func:`default_store_root`).
        encoder_kwargs: as in :func:`build_foundation_stores`.

    Returns:
        ``{feature: [n_table_rows, dim] float32}`` in the feature's table row order.
    """
    feats = features if features is not None else [f for f in data.spec.features if f.kind == "text"]
    return {k: m for k, (m, _) in item_encodings(data.spec, data.tables, feats, store, encoder_kwargs).items()}


def item_encodings(spec: FeatureSpecSet, tables: Mapping[str, pd.DataFrame], features: Sequence[FeatureSpec],
                   store: EmbeddingStore | str | Path | None = None,
                   encoder_kwargs: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, tuple[np.ndarray, Encoder]]:
    """``{feature: ([n_table_rows, dim] float32 final encodings, encoder)}`` through the store.

    The one path from a text/image column to per-item vectors outside the foundation teacher: LightGBM's
    text columns and the student's content table (:mod:`appdistill.features.content`) both come here.
    """
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store or default_store_root())
    shared: dict[str, Encoder] = {}
    out: dict[str, tuple[np.ndarray, Encoder]] = {}
    for f in features:
        enc = _encoder_for(f, encoder_kwargs, None, shared)
        ids, inputs = feature_inputs(spec, tables, f)
        out[f.name] = (np.asarray(store.get_or_build(enc, f.name, ids, inputs).matrix, dtype=np.float32), enc)
    return out


def default_store_root() -> Path:
    """``$APPDISTILL_CACHE/store`` (default ``~/.cache/appdistill/store``; the foundation teacher's too)."""
    return Path(os.environ.get("APPDISTILL_CACHE", Path.home() / ".cache" / "appdistill")) / "store"


def _encoder_for(f: FeatureSpec, encoder_kwargs: Mapping[str, Mapping[str, Any]] | None,
                 encoders: Mapping[str, Encoder] | None, shared: dict[str, Encoder]) -> Encoder:
    """A ready encoder for ``f``: given by feature name, or one model per (encoder, kwargs) shared."""
    if encoders and f.name in encoders:
        return encoders[f.name]
    name = f.encoder or DEFAULT_ENCODERS[f.kind]
    kw = (encoder_kwargs or {}).get(f.name) or (encoder_kwargs or {}).get(name) or {}
    k = f"{name}:{f.kind}:{json_digest(kw)}"
    if k not in shared:
        shared[k] = make_encoder(f, encoder_kwargs)
    return shared[k]
