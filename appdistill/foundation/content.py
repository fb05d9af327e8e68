"""Fit the student's content table (:mod:`appdistill.features.content`) from the foundation store.

The item encodings come from the same per-item store as the foundation teacher's and LightGBM's
text columns (:func:`~appdistill.foundation.catalog.item_encodings`): an item is encoded once, whoever
asks. Only the projection is fitted here; the encoder never runs at serving.

Example:
    >>> table = build_content_table(cfg.student.content, ds)      # None when disabled
    >>> table.dim                                                  # dim x number of features
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from appdistill.features.content import ContentTable, content_features
from appdistill.foundation.catalog import item_encodings

if TYPE_CHECKING:
    from appdistill.features.dataset import Dataset

log = logging.getLogger(__name__)


def build_content_table(section: Any, ds: Dataset, store: Any = None,
                        encoder_kwargs: dict[str, Any] | None = None) -> ContentTable | None:
    """The content table a config's ``student.content`` section asks for, or ``None`` when disabled.

    Args:
        section: ``cfg.student.content`` (``enabled``, ``features``, ``dim``).
        ds: the data set (its spec, tables and training split).
        store: an :class:`~appdistill.foundation.store.EmbeddingStore` or root (default: the shared store).
        encoder_kwargs: ``{feature or encoder name: kwargs}`` as for the foundation stores.
    """
    if not section.enabled:
        return None
    feats = content_features(list(section.features), ds.spec)
    enc = item_encodings(ds.spec, ds.tables, feats, store, encoder_kwargs)
    table = ContentTable.fit(ds, {n: m for n, (m, _) in enc.items()}, section.dim,
                             {n: e.identity() for n, (_, e) in enc.items()})
    log.info("content table: %d items x %d columns from %s", table.vectors.shape[0] - 1, table.dim,
             ", ".join(f.name for f in feats))
    return table
