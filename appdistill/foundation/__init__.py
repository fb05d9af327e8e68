"""Frozen foundation encoders and the per-item embedding store.

- :mod:`~appdistill.foundation.text`: sentence-transformers (default: the bundled all-MiniLM-L6-v2),
  optional mean-pooled hidden layers.
- :mod:`~appdistill.foundation.image`: open_clip image encoder (and its text tower), checkpoints
  from local files; tags only when already cached.
- :mod:`~appdistill.foundation.store`: one memory-mapped matrix + manifest per (field, encoder,
  output), rebuilt only when its inputs, model or files change.
- :mod:`~appdistill.foundation.catalog`: build the stores a spec's foundation features need.

Encoders are registered in :data:`ENCODERS` (``minilm``, ``sentence_transformer``, ``clip``) so a
spec's ``encoder: minilm`` resolves. Nothing here downloads weights: the Hugging Face libraries are
forced offline before any model loads (``APPDISTILL_ALLOW_NETWORK=1`` opts out).

Images (optional): given a folder of posters named ``<item_id>.jpg``, a spec variant can give the foundation teacher an image feature. The built-in ``ml100k`` source
has no path column, so the items table needs one (``poster = item_id.astype(str) + ".jpg"``, e.g.
in an items parquet file next to the spec), then::

    tables:
      items: {path: ml100k_items_with_posters.parquet, key: item_id}
    features:
      - {name: poster, kind: image, table: items, encoder: clip, root: posters/}
    visibility:
      foundation: [user_id, item_id, title, genres, poster]

with ``encoder_kwargs={"clip": {"arch": "ViT-B-32", "pretrained": "/path/to/open_clip_model.bin"}}``
passed to :func:`build_foundation_stores`. Items without a poster file get zero vectors and one
counted warning. A relative ``root:`` resolves against the spec file's directory.
"""

from appdistill.foundation.base import ENCODERS, EmptyInputWarning, Encoder, force_offline
from appdistill.foundation.catalog import (build_foundation_stores, feature_inputs, foundation_features,
                                           text_embeddings)
from appdistill.foundation.image import ClipEncoder
from appdistill.foundation.store import EmbeddingStore, StoreEntry, StoreError, StoreManifest, StoreRebuildWarning
from appdistill.foundation.text import SentenceTransformerEncoder, minilm_dir

__all__ = [
    "ENCODERS", "ClipEncoder", "EmbeddingStore", "EmptyInputWarning", "Encoder", "SentenceTransformerEncoder",
    "StoreEntry", "StoreError", "StoreManifest", "StoreRebuildWarning", "build_foundation_stores",
    "feature_inputs", "force_offline", "foundation_features", "minilm_dir", "text_embeddings",
]
