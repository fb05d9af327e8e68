"""The per-item embedding store: encode each item once per (encoder, field, output), memory-map it.

Layout under the store root, one directory per (field, encoder, output)::

    <root>/<field>/<encoder.slug>/<output>/matrix.npy     [n_items, dim] float16|float32 (np.save format)
                                          /keys.npy       [n_items] uint64 content key of each row's input
                                          /manifest.json  StoreManifest
    <root>/_pool/...                                      the content pool (appdistill.foundation.pool)

The manifest records the encoder identity (name, config, hash of the weight files), field, output,
dim, dtype, the item ids in row order, the data fingerprint (item ids + input keys; an image's key
is its path + mtime + size) and the sha256 and size of both arrays. Each output's directory is
written through the store kernel (:func:`appdistill.io.staged_dir`): built in a stage beside it and
swapped in whole, so a crash never leaves a store that looks valid. On the next call:

- identity, fingerprint and checksum all match: the store is opened, nothing is encoded (and the
  model is never loaded);
- only the catalogue changed: rows whose input key is unchanged are copied, only new or edited
  inputs are encoded (duplicate inputs are encoded once). Every encoded vector is also kept in the
  content pool (:mod:`appdistill.foundation.pool`), keyed by its input's content: an input encoded
  for any field or catalogue before (another data set with a ``title`` feature, the previous
  catalogue of this one) is copied from there, so switching between data sets encodes nothing twice;
- the model changed: that store is rebuilt from scratch; other fields/encoders are untouched;
- a file is truncated or edited: a warning and a rebuild, or :class:`StoreError` with
  ``rebuild_corrupt=False``.

Example:
    >>> store = EmbeddingStore("runs/embeddings")
    >>> entry = store.get_or_build(ENCODERS.build("minilm"), "title", ids, texts)
    >>> entry.matrix.shape, entry.index[ids[0]]
    ((1682, 384), 0)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appdistill.errors import AppDistillError
from appdistill.foundation.base import Encoder
from appdistill.foundation.pool import ContentPool, key_rows
from appdistill.io import atomic_write_text, digest_problem, file_digests, locked, staged_dir

log = logging.getLogger("appdistill.foundation")
FORMAT_VERSION = 2
MATRIX, KEYS, MANIFEST = "matrix.npy", "keys.npy", "manifest.json"


class StoreError(AppDistillError):
    """An embedding store is missing, stale or corrupt and may not be rebuilt."""


class StoreRebuildWarning(UserWarning):
    """A corrupt store file was detected and the store is being rebuilt."""


@dataclass(frozen=True)
class StoreManifest:
    """What a store holds and how to check it (``<output>.json``)."""

    format: int
    encoder: dict[str, Any]
    field: str
    layer: str
    dim: int
    dtype: str
    n_rows: int
    item_ids: list[Any]
    data_fingerprint: str
    files: dict[str, str]
    bytes: dict[str, int]
    zero_rows: int
    created: str

    @classmethod
    def read(cls, path: Path) -> StoreManifest | None:
        """The manifest at ``path``, or ``None`` when absent or unparseable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class StoreEntry:
    """One opened store.

    Attributes:
        matrix: ``[n_items, dim]`` read-only ``np.memmap`` (float16 or float32).
        manifest: the store's manifest (ids in row order, identity, checksums).
        path: the ``.npy`` file.
        n_encoded: inputs encoded by the call that returned this entry (0 when reused as is).
        n_reused: rows copied from the previous version of the store.
        reason: why it was (re)built (``None`` when opened as is).
    """

    matrix: np.memmap
    manifest: StoreManifest
    path: Path
    n_encoded: int = 0
    n_reused: int = 0
    reason: str | None = None

    @cached_property
    def index(self) -> dict[Any, int]:
        """Item id -> row."""
        return {k: i for i, k in enumerate(self.manifest.item_ids)}

    def rows(self, item_ids: Sequence[Any]) -> np.ndarray:
        """``[len(item_ids)]`` int64 rows, ``-1`` for ids the store does not hold."""
        idx = self.index
        return np.fromiter((idx.get(_json_id(k), -1) for k in item_ids), np.int64, count=len(item_ids))

    def lookup(self, item_ids: Sequence[Any]) -> np.ndarray:
        """``[len(item_ids), dim]`` float32 embeddings; unknown ids get zero rows."""
        r = self.rows(item_ids)
        out = np.zeros((len(r), self.manifest.dim), np.float32)
        ok = r >= 0
        out[ok] = self.matrix[r[ok]]
        return out


def _json_id(v: Any) -> Any:
    """Ids as JSON keeps them: numpy ints -> int, everything else -> str."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    return str(v)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _npy_problem(path: Path, shape: tuple[int, ...], dtype: str) -> str | None:
    """Why ``path`` is not a ``shape``/``dtype`` ``.npy`` array (``None`` when it is); reads the header only."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # garbage, a pickle, an object array, a bad header
        return f"not a readable .npy array ({type(e).__name__}: {e})"
    if not isinstance(a, np.ndarray) or tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
        got = f"{getattr(a, 'shape', '?')} {getattr(a, 'dtype', type(a).__name__)}"
        return f"holds {got}, its manifest says {tuple(shape)} {dtype}"
    return None


class EmbeddingStore:
    """Per-item embedding stores under one root directory.

    Args:
        root: directory holding every store (created on demand).
        dtype: storage dtype, ``"float16"`` (half the disk and page cache) or ``"float32"``.
        verify: ``"checksum"`` (sha256 of the files on every open) or ``"size"`` (file sizes only,
            for very large stores).
        rebuild_corrupt: rebuild a store whose files fail verification (with a warning); ``False``
            raises :class:`StoreError` instead.
        progress: show a tqdm bar while encoding.

    Attributes:
        stats: ``encoded`` (inputs encoded), ``reused`` (rows copied), ``built``/``opened`` (stores).
    """

    def __init__(self, root: str | Path, dtype: Literal["float16", "float32"] = "float16",
                 verify: Literal["checksum", "size"] = "checksum", rebuild_corrupt: bool = True,
                 progress: bool = True) -> None:
        if dtype not in ("float16", "float32"):
            raise AppDistillError(f"embedding store dtype must be float16 or float32, got {dtype!r}")
        if verify not in ("checksum", "size"):
            raise AppDistillError(f"embedding store verify must be 'checksum' or 'size', got {verify!r}")
        self.root = Path(root)
        self.dtype, self.verify, self.rebuild_corrupt, self.progress = dtype, verify, rebuild_corrupt, progress
        self.stats: Counter[str] = Counter()

    def store_dir(self, encoder: Encoder, field: str) -> Path:
        return self.root / _safe(field) / _safe(encoder.slug)

    # ----------------------------------------------------------------- public API
    def get_or_build(self, encoder: Encoder, field: str, item_ids: Sequence[Any], inputs: Sequence[Any],
                     layer: str = "final") -> StoreEntry:
        """The up-to-date store of one output of ``encoder`` over ``inputs`` (see module docstring).

        Args:
            encoder: the encoder (its model is loaded only if something must be encoded).
            field: feature name (``title``, ``poster``...).
            item_ids: ``[n]`` unique ids; row ``i`` of the matrix is ``item_ids[i]``.
            inputs: ``[n]`` texts or image paths aligned with ``item_ids``.
            layer: which output (``"final"``, ``"layer4"``...).
        """
        return self.get_or_build_all(encoder, field, item_ids, inputs, layers=[layer])[layer]

    def get_or_build_all(self, encoder: Encoder, field: str, item_ids: Sequence[Any], inputs: Sequence[Any],
                         layers: Sequence[str] | None = None) -> dict[str, StoreEntry]:
        """Like :meth:`get_or_build` for several outputs, encoding stale ones in a single pass."""
        layers = list(layers or encoder.outputs)
        unknown = [x for x in layers if x not in encoder.outputs]
        if unknown:
            raise AppDistillError(f"encoder '{encoder.name}' has no outputs {unknown} (it has {encoder.outputs})")
        ids = [_json_id(v) for v in item_ids]
        inputs = list(inputs)  # positional access even for a pandas Series with a custom index
        if len(ids) != len(inputs):
            raise AppDistillError(f"field '{field}': {len(ids)} item ids but {len(inputs)} inputs")
        if not ids:
            raise AppDistillError(f"field '{field}': no items to encode")
        if len(set(ids)) != len(ids):
            dup = next(k for k, c in Counter(ids).items() if c > 1)
            raise AppDistillError(f"field '{field}': duplicate item id {dup!r}; the store holds one row per item")
        keys = encoder.input_keys(inputs)
        ident = encoder.identity()
        h = hashlib.sha256(json.dumps(ids).encode())
        h.update(keys.tobytes())
        fingerprint = h.hexdigest()
        d = self.store_dir(encoder, field)
        d.mkdir(parents=True, exist_ok=True)
        with locked(d):
            for layer in layers:  # format 1 kept three files per output here: superseded, remove them
                for old in (f"{layer}.npy", f"{layer}.keys.npy", f"{layer}.json"):
                    (d / old).unlink(missing_ok=True)
            entries: dict[str, StoreEntry] = {}
            stale: dict[str, tuple[str, StoreManifest | None]] = {}
            for layer in layers:
                man, why = self._check(d, layer, ident, field)
                if why is None and man is not None and man.data_fingerprint == fingerprint:
                    entries[layer] = self._open(d, layer, man)
                    self.stats["opened"] += 1
                else:
                    stale[layer] = (why or "catalogue changed", man if why is None else None)
            if stale:
                entries.update(self._build(d, encoder, field, ids, inputs, keys, fingerprint, ident, stale))
        return {x: entries[x] for x in layers}

    def load(self, encoder: Encoder, field: str, layer: str = "final") -> StoreEntry:
        """Open an existing store without inputs (read side); errors if it is missing, stale or corrupt."""
        d = self.store_dir(encoder, field)
        man, why = self._check(d, layer, encoder.identity(), field, quiet=True)
        if why is not None or man is None:
            raise StoreError(f"embedding store '{d / layer}.npy' for field '{field}' is not usable ({why}); "
                             "build it first (get_or_build / build_foundation_stores)")
        return self._open(d, layer, man)

    # ----------------------------------------------------------------- checks
    def _check(self, d: Path, layer: str, ident: dict[str, Any], field: str,
               quiet: bool = False) -> tuple[StoreManifest | None, str | None]:
        """``(manifest, None)`` when the files are intact and made by ``ident``; else ``(_, reason)``."""
        vdir = d / layer
        mpath = vdir / MANIFEST
        if not mpath.exists():
            return None, "new store"
        man = StoreManifest.read(mpath)
        if man is None:
            return None, self._corrupt(mpath, "unreadable manifest", quiet)
        if man.format != FORMAT_VERSION or man.field != field or man.layer != layer:
            return None, "store format changed"
        if man.encoder != ident:
            return None, "encoder changed"
        if man.dtype != self.dtype:
            return None, f"dtype changed ({man.dtype} -> {self.dtype})"
        # keys are always hashed (small); the matrix too unless verify="size"
        hashed = (MATRIX, KEYS) if self.verify == "checksum" else (KEYS,)
        problem = digest_problem(vdir, {f: man.files.get(f, "") for f in hashed}, man.bytes)
        if problem:
            return None, self._corrupt(vdir, problem, quiet)
        # the checksums can be rewritten along with the files (a tool, a hand edit of the manifest): the
        # arrays must still be what the manifest describes before any row is copied from them
        for f, shape, dtype in ((KEYS, (man.n_rows,), "uint64"), (MATRIX, (man.n_rows, man.dim), man.dtype)):
            problem = _npy_problem(vdir / f, shape, dtype)
            if problem:
                return None, self._corrupt(vdir / f, problem, quiet)
        return man, None

    def _corrupt(self, path: Path, problem: str, quiet: bool) -> str:
        msg = f"embedding store '{path}': {problem}"
        if quiet:
            return msg
        if not self.rebuild_corrupt:
            raise StoreError(f"{msg}; delete it or allow rebuilding (rebuild_corrupt=True)")
        warnings.warn(f"{msg}; rebuilding", StoreRebuildWarning, stacklevel=4)
        log.warning("%s; rebuilding", msg)
        return f"corrupt: {problem}"

    def _open(self, d: Path, layer: str, man: StoreManifest, **info: Any) -> StoreEntry:
        m = np.load(d / layer / MATRIX, mmap_mode="r")
        if m.shape != (man.n_rows, man.dim) or str(m.dtype) != man.dtype:
            raise StoreError(f"embedding store '{d / layer / MATRIX}': shape {m.shape} {m.dtype} does not match "
                             f"its manifest ({man.n_rows}, {man.dim}) {man.dtype}")
        return StoreEntry(m, man, d / layer / MATRIX, **info)

    # ----------------------------------------------------------------- building
    def _build(self, d: Path, encoder: Encoder, field: str, ids: list[Any], inputs: Sequence[Any],
               keys: np.ndarray, fingerprint: str, ident: dict[str, Any],
               stale: dict[str, tuple[str, StoreManifest | None]]) -> dict[str, StoreEntry]:
        """Rebuild the ``stale`` outputs: copy reusable rows, encode the rest once, write atomically."""
        from appdistill.progress import bar as progress_bar

        n = len(ids)
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        # per output: where each unique input's vector already is -- the old view (-1 = not there), else
        # the content pool (every input this encoder ever encoded, any field or catalogue)
        reuse: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        pooled: dict[str, tuple[ContentPool, np.ndarray, np.ndarray]] = {}
        need = np.zeros(len(uniq), bool)
        for layer, (_, old) in stale.items():
            old_rows = np.full(len(uniq), -1, np.int64)
            old_mat = None
            if old is not None:
                old_rows = key_rows(np.load(d / layer / KEYS), uniq)
                old_mat = np.load(d / layer / MATRIX, mmap_mode="r")
            pool = ContentPool(self.root, ident, self.dtype, layer, self.verify,
                               lambda path, problem: self._corrupt(path, problem, quiet=False))
            seg, prow = pool.find(uniq)
            seg[old_rows >= 0] = -1  # the old view is read first
            need |= (old_rows < 0) & (seg < 0)
            reuse[layer] = (old_rows, old_mat)
            pooled[layer] = (pool, seg, prow)
        need_u = np.flatnonzero(need)
        # nothing to encode: the dims are those of the vectors being copied (the model is never loaded)
        dims = encoder.output_dims() if len(need_u) else {
            x: stale[x][1].dim if stale[x][1] is not None else pooled[x][0].segments()[0].vectors.shape[1]  # type: ignore[union-attr]
            for x in stale}
        with contextlib.ExitStack() as stages:  # one stage per output, swapped in only if all succeed
            stage = {layer: stages.enter_context(staged_dir(d / layer)) for layer in stale}
            mats = {}
            for layer in stale:
                mats[layer] = np.lib.format.open_memmap(stage[layer] / MATRIX, mode="w+", dtype=self.dtype,
                                                        shape=(n, dims[layer]))
                old_rows, old_mat = reuse[layer]
                hit = np.flatnonzero((old_rows >= 0) & ~need)  # rows encoded anyway are not copied
                if len(hit):
                    mats[layer][first[hit]] = old_mat[old_rows[hit]]
                pool, seg, prow = pooled[layer]
                hit = np.flatnonzero((seg >= 0) & ~need)
                if len(hit):
                    mats[layer][first[hit]] = pool.gather(seg[hit], prow[hit])
            t0 = time.perf_counter()
            todo = [inputs[i] for i in first[need_u]]
            with progress_bar(total=len(todo), desc=f"{field}: encode ({encoder.name})", unit="item",
                              enabled=self.progress and bool(todo)) as bar:
                for pos, vals in (encoder.encode_batches(todo) if todo else ()):  # no model load for nothing
                    rows = first[need_u[pos]]
                    for layer in stale:
                        mats[layer][rows] = vals[layer]
                    bar.update(len(pos))
            secs = time.perf_counter() - t0
            for layer, m in mats.items():  # the pool keeps what was encoded, for any later catalogue
                pooled[layer][0].add(uniq[need_u], m[first[need_u]])
            dup = np.flatnonzero(first[inverse] != np.arange(n))  # repeated inputs: copy the first row
            mans = {}
            for layer, m in mats.items():
                if len(dup):
                    m[dup] = m[first[inverse[dup]]]
                zero_rows = int(np.count_nonzero(~np.asarray(m).any(axis=1)))
                m.flush()
                mans[layer] = self._write_view(stage[layer], layer, keys, ids, fingerprint, ident, field,
                                               dims[layer], zero_rows)
            del m
            mats.clear()  # close the memmaps before their directories are moved
        entries = {}
        for layer in stale:
            e = self._open(d, layer, mans[layer])
            e.n_encoded = len(need_u)
            e.n_reused = int(np.count_nonzero((((reuse[layer][0] >= 0) | (pooled[layer][1] >= 0)) & ~need)[inverse]))
            e.reason = stale[layer][0]
            entries[layer] = e
            log.info("store %s/%s: %s; encoded %d inputs in %.1fs, reused %d rows", field, layer,
                     e.reason, e.n_encoded, secs, e.n_reused)
        self.stats["encoded"] += len(need_u)
        self.stats["built"] += len(stale)
        self.stats["reused"] += sum(e.n_reused for e in entries.values())
        return entries

    def _write_view(self, stage: Path, layer: str, keys: np.ndarray, ids: list[Any], fingerprint: str,
                    ident: dict[str, Any], field: str, dim: int, zero_rows: int) -> StoreManifest:
        """Write the keys and (last) the manifest beside the finished matrix in ``stage``."""
        np.save(stage / KEYS, keys.astype(np.uint64), allow_pickle=False)
        man = StoreManifest(
            format=FORMAT_VERSION, encoder=ident, field=field, layer=layer, dim=dim, dtype=self.dtype,
            n_rows=len(ids), item_ids=ids, data_fingerprint=fingerprint, files=file_digests(stage, (MATRIX, KEYS)),
            bytes={f: (stage / f).stat().st_size for f in (MATRIX, KEYS)}, zero_rows=zero_rows,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_text(stage / MANIFEST, json.dumps(asdict(man)))
        return man
