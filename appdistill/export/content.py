"""``appdistill content refresh EXPORT --items FILE``: content vectors for new (or edited) items.

A student trained with ``student.content`` scores an item through its content vector, looked up by
item key in the export's ``content/`` table. An item added to the catalogue after training has no
vector yet (it scores as the mean item). Refresh encodes the items of ``FILE`` offline through the
embedding store (the same encoder, checked by identity: another encoder's vectors would be read
through a projection fitted on a different space), applies the saved projection, appends new keys
and replaces the vectors of known ones. The student's weights are untouched; no retraining.

All or nothing: the refreshed export is written to a staging copy, checked by loading it like
``score`` does, and only then swapped in; a refused or failed refresh leaves the export as it was.

Example:
    >>> refresh_content("runs/x/export", "new_items.csv")
    {'added': 120, 'updated': 3, 'items': 1805}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from appdistill.errors import AppDistillError
from appdistill.export.format import CONTENT_FILES, MANIFEST
from appdistill.export.ranker import Ranker
from appdistill.features.content import CONTENT_DIR
from appdistill.features.tables import _read_file, repeated_columns
from appdistill.foundation.catalog import _resolve_image, make_encoder
from appdistill.foundation.store import EmbeddingStore
from appdistill.io import atomic_write_text, file_digests, locked, staged_dir


def refresh_content(export_dir: str | Path, items: str | Path, store: str | Path | None = None,
                    encoder_kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """Add/replace the content vectors of the items in ``items`` (parquet/CSV) in an export.

    Args:
        export_dir: an ``appdistill export`` directory whose student reads a content table.
        items: one row per item: the key column and every source feature's column.
        store: embedding store root (default: ``$APPDISTILL_CACHE/store``).
        encoder_kwargs: ``{feature or encoder name: kwargs}`` (e.g. a CLIP checkpoint path).

    Returns:
        ``{"added", "updated", "items"}`` (items: known keys after the refresh).
    """
    out = Path(export_dir)
    if not out.is_dir():
        raise AppDistillError(f"export directory '{out}' not found")
    # one refresh at a time: a second one waits, then reads the first one's table
    with locked(out.parent / f".{out.name}.refresh"):
        return _refresh(out, items, store, encoder_kwargs)


def _refresh(out: Path, items: str | Path, store: str | Path | None, encoder_kwargs: dict[str, Any] | None
             ) -> dict[str, int]:
    from appdistill.foundation.catalog import default_store_root

    ranker = Ranker(out, compiled=False)  # every checksum verified before anything is read
    table = ranker.content
    if table is None:
        raise AppDistillError(f"export directory '{out}': its student has no content table (trained without "
                              "student.content); nothing to refresh")
    path = Path(items)
    strs = {table.key: str} if not table.vocab.is_int else {}
    df = _read_file(path, {"dtype": strs} if path.suffix.lower() in (".csv", ".tsv", ".gz") else {})
    need = [table.key, *(s.feature.col for s in table.sources)]
    dup = repeated_columns(df, need)
    if dup:
        raise AppDistillError(f"file '{path}': columns {dup} appear more than once; each column must be given once")
    missing = [c for c in dict.fromkeys(need) if c not in df.columns]
    if missing:
        raise AppDistillError(f"file '{path}': missing columns {missing} (refresh needs the item key "
                              f"'{table.key}' and {[s.feature.col for s in table.sources]})")
    if len(df) == 0:
        raise AppDistillError(f"file '{path}': no rows")
    nan = df[table.key].isna().to_numpy()
    if nan.any():
        raise AppDistillError(f"file '{path}', column '{table.key}', row {int(np.flatnonzero(nan)[0])}: missing item key")
    keys = df[table.key].tolist()
    st = EmbeddingStore(store or default_store_root())
    emb = {}
    for s in table.sources:
        f = s.feature
        enc = make_encoder(f, encoder_kwargs)
        ident = json.loads(json.dumps(enc.identity(), default=str))
        if s.encoder and ident != json.loads(json.dumps(s.encoder, default=str)):
            raise AppDistillError(f"content feature '{f.name}': the encoder here ({ident.get('name')}, weights "
                                  f"{str(ident.get('weights'))[:12]}) is not the one the table was fitted with "
                                  f"({s.encoder.get('name')}, weights {str(s.encoder.get('weights'))[:12]}); its "
                                  "vectors would not match the projection")
        values = df[f.col].tolist()
        if f.kind == "image":
            root = Path(f.root).expanduser() if f.root else path.parent
            root = root if root.is_absolute() else path.parent / root
            values = [_resolve_image(v, root) for v in values]
        emb[f.name] = np.asarray(st.get_or_build(enc, f.name, keys, values).matrix, np.float32)
    new, added, updated = table.with_items(keys, emb)
    with staged_dir(out) as stage:
        shutil.copytree(out, stage, dirs_exist_ok=True)
        shutil.rmtree(stage / CONTENT_DIR)
        new.save(stage / CONTENT_DIR)
        man = json.loads((stage / MANIFEST).read_text())
        man["files"].update(file_digests(stage, CONTENT_FILES))
        man["content_refreshed"] = {"items_file": str(path), "added": added, "updated": updated}
        atomic_write_text(stage / MANIFEST, json.dumps(man, indent=1, default=str))
        Ranker(stage, compiled=False)  # the refreshed export loads like `score` loads it
    return {"added": added, "updated": updated, "items": int(new.vocab.num_embeddings - 1)}
