"""The student's content table: one frozen vector per catalogue item, projected from the
foundation store, looked up by item key at training and at serving.

Serving cannot run a text or image encoder per request, but it can look up a per-item vector that
was computed offline when the item entered the catalogue. A :class:`ContentTable` holds those
vectors (``[num_embeddings, C]``, row 0 = an unknown item = zeros), the vocabulary that maps raw
item keys to rows (the same :class:`~appdistill.features.vocab.Vocabulary` every sparse feature
uses, fitted on the *whole* catalogue table, not only on items seen in training: that is what lets
a cold item carry its content), and the projection that made them: per text/image feature, the
mean, the top principal directions and a per-direction scale fitted on the items seen in training.
``appdistill content refresh`` applies the same projection to new items' encodings and appends
them, so a new item gets its vector with no retraining and no encoder at request time.

The vectors reach the student as extra dense columns (after the spec's dense features), so the
batch and the serving encoder carry them like any dense feature; the student projects them into one
more embedding slot of its interaction (``content_proj``). The table is frozen: a fine-tuned row of
a warm item would drift away from the space cold items live in, which is the space the projection
learns to read.

Files (no pickle anywhere; ``np.load(allow_pickle=False)``):

* ``table.json``: table, key column, the source features (their spec entries and encoder identity),
  the vocabulary;
* ``vectors.npy``: ``[num_embeddings, C]`` float32;
* ``projection.npz``: per feature ``<name>.mean`` ``[d]``, ``<name>.components`` ``[d, k]``,
  ``<name>.scale`` ``[k]``.

Example:
    >>> table = ContentTable.fit(ds, {"title": emb}, dim=16)       # emb: [rows of items, 384]
    >>> table.lookup(ds.tables["items"]["item_id"]).shape           # [N, 16]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from appdistill.errors import AppDistillError
from appdistill.features.spec import FeatureSpec
from appdistill.features.vocab import Vocabulary, normalize_ids

if TYPE_CHECKING:
    from appdistill.features.dataset import Dataset

FORMAT = "appdistill-content/1"
FILES = ("table.json", "vectors.npy", "projection.npz")
#: the table's directory inside a run directory and an export
CONTENT_DIR = "content"


def pca_projection(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [d], components [d, k'])`` of the rows of ``x`` ``[n, d]``, ``k' = min(k, d, n)``.

    The one PCA of item encodings in the project (LightGBM's text columns and the content table).
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    k = min(k, x.shape[1], x.shape[0])
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k].T


def content_features(names: list[str], spec: Any) -> list[FeatureSpec]:
    """The features a content section names (``[]``: every text/image feature of the item table).

    Raises:
        AppDistillError: an unknown name, a feature that is not text/image, features on several tables
            or on the interactions table, or no feature at all.
    """
    if names:
        known = {f.name: f for f in spec.features}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise AppDistillError(f"student.content.features: unknown features {unknown} (the spec's text/image "
                                  f"features: {[f.name for f in spec.features if f.kind in ('text', 'image')]})")
        feats = [known[n] for n in names]
        bad = [f.name for f in feats if f.kind not in ("text", "image")]
        if bad:
            raise AppDistillError(f"student.content.features: {bad} are not text/image features; the content table "
                                  "holds foundation encodings (id and dense features reach the student directly)")
    else:
        item_tables = [n for n, t in spec.tables.items() if n != "interactions" and spec.item_key in t.keys]
        feats = [f for f in spec.features if f.kind in ("text", "image") and f.table in item_tables]
        if not feats:
            raise AppDistillError("student.content is enabled, but the spec has no text/image feature on the item "
                                  f"table (the side table keyed by '{spec.item_key}'); name features in "
                                  "student.content.features or disable it")
    tables = sorted({f.table for f in feats})
    if len(tables) != 1 or tables[0] == "interactions":
        raise AppDistillError(f"student.content.features: {[f.name for f in feats]} must all live on one keyed side "
                              f"table (found {tables}); a per-item vector is looked up by key, never computed per "
                              "request")
    return feats


@dataclass
class ContentSource:
    """One text/image feature of the table: how its encodings become ``dim`` columns.

    Args:
        feature: the spec entry (name, table, column, kind, encoder).
        encoder: the encoder's identity (``Encoder.identity()``); refresh refuses another encoder.
        mean / components / scale: ``[d]``, ``[d, k]``, ``[k]``; columns ``k..dim`` are zero.
    """

    feature: FeatureSpec
    encoder: dict[str, Any]
    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    dim: int

    def project(self, emb: np.ndarray) -> np.ndarray:
        """Encodings ``[n, d]`` -> ``[n, dim]`` float32 (zero-padded past the fitted directions)."""
        emb = np.asarray(emb, np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.mean.shape[0]:
            raise AppDistillError(f"content feature '{self.feature.name}': encodings of shape {emb.shape}, the "
                                  f"projection expects [n, {self.mean.shape[0]}] (another encoder?)")
        out = np.zeros((len(emb), self.dim), np.float32)
        out[:, :self.components.shape[1]] = ((emb - self.mean) @ self.components) / self.scale
        return out


@dataclass
class ContentTable:
    """Frozen per-item vectors keyed by the raw item key (module doc).

    Args:
        table: the spec table the sources live on (``items``).
        key: its key column (also the request column the lookup reads).
        vocab: raw key -> row (0 = unknown).
        vectors: ``[vocab.num_embeddings, C]`` float32, row 0 zeros.
        sources: one :class:`ContentSource` per feature, in column order.
    """

    table: str
    key: str
    vocab: Vocabulary
    vectors: np.ndarray
    sources: list[ContentSource] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def lookup(self, keys: Any) -> np.ndarray:
        """Raw item keys ``[N]`` -> vectors ``[N, C]`` (unknown keys: zeros, the mean item)."""
        return self.vectors[self.vocab.encode(keys)]

    def lookup_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vocabulary rows (``_Lookup`` output at serving) -> vectors ``[N, C]``."""
        return self.vectors[rows]

    def project(self, embeddings: dict[str, np.ndarray]) -> np.ndarray:
        """``{feature: [n, d]}`` -> ``[n, C]``: every source projected, side by side."""
        missing = [s.feature.name for s in self.sources if s.feature.name not in embeddings]
        if missing:
            raise AppDistillError(f"content table: no encodings given for features {missing}")
        return np.concatenate([s.project(embeddings[s.feature.name]) for s in self.sources], 1)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, ds: Dataset, embeddings: dict[str, np.ndarray], dim: int,
            encoders: dict[str, dict[str, Any]] | None = None) -> ContentTable:
        """Fit on ``ds``: PCA of each feature's encodings over the items seen in training.

        Args:
            ds: the data set; every source feature must live on one keyed side table.
            embeddings: ``{feature: [rows of its table, d]}`` in table row order (the store's layout).
            dim: columns per feature.
            encoders: ``{feature: encoder identity}`` recorded for refresh.
        """
        feats = content_features(list(embeddings), ds.spec)  # text/image features on one keyed side table
        table = feats[0].table
        key = ds.spec.tables[table].keys[0]
        df = ds.tables[table]
        n = len(df)
        used = ds.train_rows_of(table)  # items seen in training; cold items are projected, not fitted on
        if len(used) < 2:
            raise AppDistillError(f"content table: only {len(used)} item(s) of table '{table}' appear in training rows")
        sources = []
        for f in feats:
            emb = np.asarray(embeddings[f.name], np.float64)
            if emb.ndim != 2 or emb.shape[0] not in (n, n + 1):
                raise AppDistillError(f"content feature '{f.name}': encodings must be [{n} rows of table '{table}', "
                                      f"d], got {emb.shape}")
            mean, comps = pca_projection(emb[used], dim)
            scale = ((emb[used] - mean) @ comps).std(0)
            sources.append(ContentSource(f, dict((encoders or {}).get(f.name, {})), mean, comps,
                                         np.where(scale > 1e-12, scale, 1.0), dim))
        ids = normalize_ids(df[key], what=f"table '{table}', key column '{key}'")
        spec = FeatureSpec(name=f"content:{table}", kind="sparse_id", table=table, column=key)
        vocab = Vocabulary.fit(spec, ids)
        vectors = np.zeros((vocab.num_embeddings, sum(src.dim for src in sources)), np.float32)
        vectors[vocab.encode(ids)] = np.concatenate(
            [src.project(np.asarray(embeddings[src.feature.name])[:n]) for src in sources], 1)
        return cls(table, key, vocab, vectors, sources)

    def with_items(self, keys: Any, embeddings: dict[str, np.ndarray]) -> tuple[ContentTable, int, int]:
        """A copy with ``keys`` (re)projected from ``embeddings``: ``(table, added, updated)``.

        Known keys get their vector replaced (edited text), new keys are appended to the vocabulary.
        """
        what = f"content table, key column '{self.key}'"
        ids = normalize_ids(pd.Series(keys), as_int=self.vocab.is_int, what=what)
        if len(pd.unique(ids)) != len(ids):
            raise AppDistillError(f"{what}: duplicate item keys in the refresh input")
        if self.vocab.is_int and (ids == -(2**62)).any():
            bad = int(np.flatnonzero(ids == -(2**62))[0])
            raise AppDistillError(f"{what}, row {bad}: {list(keys)[bad]!r} is not an integer key (this table's keys "
                                  "are integers)")
        vec = self.project(embeddings)
        rows = self.vocab.encode(ids)
        new = rows == 0
        vocab = Vocabulary(self.vocab.feature, np.concatenate([self.vocab.values, ids[new]]),
                           self.vocab.num_embeddings + int(new.sum()), False, self.vocab.is_int)
        vectors = np.concatenate([self.vectors, np.zeros((int(new.sum()), self.dim), np.float32)])
        rows = vocab.encode(ids)
        vectors[rows] = vec
        return ContentTable(self.table, self.key, vocab, vectors, self.sources), int(new.sum()), int((~new).sum())

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        """Write the three files into ``directory`` (each atomically)."""
        import io

        from appdistill.io import atomic_write_bytes, atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "table": self.table, "key": self.key, "vocab": self.vocab.to_dict(),
                "sources": [{"feature": s.feature.model_dump(), "encoder": s.encoder, "dim": s.dim}
                            for s in self.sources]}
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.vectors, np.float32), allow_pickle=False)
        atomic_write_bytes(d / "vectors.npy", buf.getvalue())
        buf = io.BytesIO()
        arrays = {}
        for i, s in enumerate(self.sources):
            arrays.update({f"{i}.mean": s.mean, f"{i}.components": s.components, f"{i}.scale": s.scale})
        np.savez(buf, **arrays)
        atomic_write_bytes(d / "projection.npz", buf.getvalue())
        atomic_write_text(d / "table.json", json.dumps(meta, default=str))

    @classmethod
    def load(cls, directory: str | Path) -> ContentTable:
        """Read a table written by :meth:`save`; a missing, foreign or inconsistent file is an error naming it."""
        d = Path(directory)
        for f in FILES:
            if not (d / f).is_file():
                raise AppDistillError(f"content table '{d}': missing file '{f}'")
        try:
            meta = json.loads((d / "table.json").read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} table")
            vocab = Vocabulary.from_dict(meta["vocab"])
            vectors = np.load(d / "vectors.npy", allow_pickle=False)
            with np.load(d / "projection.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            sources = []
            for i, s in enumerate(meta["sources"]):
                sources.append(ContentSource(FeatureSpec.model_validate(s["feature"]), dict(s["encoder"]),
                                             arrays[f"{i}.mean"], arrays[f"{i}.components"], arrays[f"{i}.scale"],
                                             int(s["dim"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AppDistillError(f"content table '{d}': unreadable or corrupt ({type(e).__name__}: {e})") from e
        if vectors.ndim != 2 or vectors.dtype != np.float32 or len(vectors) != vocab.num_embeddings \
                or vectors.shape[1] != sum(s.dim for s in sources) or not np.isfinite(vectors).all():
            raise AppDistillError(f"content table '{d}': vectors.npy {vectors.shape} {vectors.dtype} does not match "
                                  f"table.json ({vocab.num_embeddings} rows, {sum(s.dim for s in sources)} columns, "
                                  "finite float32)")
        return cls(meta["table"], meta["key"], vocab, vectors, sources)
