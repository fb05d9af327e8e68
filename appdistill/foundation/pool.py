"""The content-keyed pool behind the embedding store: every vector an encoder produced, keyed by the
content key of its input, so that no input is encoded twice -- across fields, catalogues and data sets.

The per-field stores (:mod:`appdistill.foundation.store`) are views: ``<field>/<encoder>`` holds the
rows of one catalogue in its item order. When the catalogue changes (an edited title, another data
set that also has a ``title`` feature) the view is rebuilt, but every input whose key is in the pool
is copied from it instead of being encoded; alternating between two data sets encodes nothing after
the first pass over each.

Layout, one directory per encoder identity (name, config, weights) and storage dtype::

    <root>/_pool/<identity digest>-<dtype>/<output>/<segment>/vectors.npy   [m, dim]
                                                             /keys.npy      [m] uint64 content keys
                                                             /manifest.json identity, shapes, sha256s

A segment is written once through :func:`appdistill.io.staged_dir` (the store kernel) and never
changed; each build that encodes something adds one, and more than :data:`MAX_SEGMENTS` are merged
into one. A segment that fails its checks is removed (its inputs are simply encoded again) or, with
``rebuild_corrupt=False``, refused.

Example:
    >>> pool = ContentPool(root, encoder.identity(), "float16", "final")
    >>> seg, row = pool.find(keys)     # [k] segment index / row, -1 where the pool lacks the key
    >>> pool.add(new_keys, new_vectors)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appdistill.io import atomic_write_text, digest_problem, file_digests, json_digest, locked, staged_dir

POOL_DIR = "_pool"
MAX_SEGMENTS = 8
FORMAT_VERSION = 1
FILES = ("vectors.npy", "keys.npy")


def key_rows(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``[len(want)]`` row of each wanted key in ``have`` (unsorted keys), ``-1`` where it is absent."""
    out = np.full(len(want), -1, np.int64)
    if not len(have):
        return out
    order = np.argsort(have, kind="stable")
    at = np.minimum(np.searchsorted(have[order], want), len(order) - 1)
    hit = have[order][at] == want
    out[hit] = order[at][hit]
    return out


@dataclass
class Segment:
    """One immutable segment: ``keys [m]`` uint64 and ``vectors [m, dim]`` (a read-only memmap)."""

    path: Path
    keys: np.ndarray
    vectors: np.ndarray


class ContentPool:
    """The pool of one encoder output.

    Args:
        root: the embedding store's root directory.
        identity: the encoder's identity (``Encoder.identity()``): another model is another pool.
        dtype: storage dtype of the vectors (``"float16"`` / ``"float32"``).
        layer: the encoder output (``"final"``...).
        verify: ``"checksum"`` (sha256 of each segment, once per process) or ``"size"``.
        on_corrupt: ``(path, problem)`` callback for a segment that fails its checks; it raises to refuse,
            returns to have the segment removed.
    """

    def __init__(self, root: Path, identity: dict[str, Any], dtype: str, layer: str, verify: str = "checksum",
                 on_corrupt: Callable[[Path, str], Any] | None = None) -> None:
        self.identity, self.dtype, self.layer, self.verify = identity, dtype, layer, verify
        self.dir = Path(root) / POOL_DIR / f"{json_digest(identity, 16)}-{dtype}" / layer
        self.on_corrupt = on_corrupt or (lambda path, problem: None)
        self._segments: list[Segment] | None = None

    # ----------------------------------------------------------------- reading
    def segments(self) -> list[Segment]:
        """The intact segments (checked once per pool object; corrupt ones reported and removed).
        Read under the pool's lock, so a merge in another process never removes one mid-read."""
        if self._segments is None:
            if not self.dir.is_dir():
                return []
            with locked(self.dir):
                self._load()
        return self._segments or []

    def _load(self) -> None:
        """(Re)read the segments; the caller holds the pool's lock."""
        self._segments = []
        for d in sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            seg, problem = self._open(d)
            if seg is not None:
                self._segments.append(seg)
            else:
                self.on_corrupt(d, problem or "unreadable")
                shutil.rmtree(d, ignore_errors=True)

    def _open(self, d: Path) -> tuple[Segment | None, str | None]:
        try:
            man = json.loads((d / "manifest.json").read_text())
            ok = (man["format"] == FORMAT_VERSION and man["encoder"] == self.identity and man["layer"] == self.layer
                  and man["dtype"] == self.dtype)
            n, dim, digests, sizes = int(man["n_rows"]), int(man["dim"]), dict(man["files"]), dict(man["bytes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"unreadable manifest ({type(e).__name__})"
        if not ok:
            return None, "manifest of another encoder, output or dtype"
        problem = digest_problem(d, digests if self.verify == "checksum" else {}, sizes)
        if problem:
            return None, problem
        try:
            keys = np.load(d / "keys.npy", allow_pickle=False)
            vectors = np.load(d / "vectors.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return None, f"not a readable .npy array ({type(e).__name__})"
        if keys.shape != (n,) or keys.dtype != np.uint64 or vectors.shape != (n, dim) or str(vectors.dtype) != self.dtype:
            return None, f"arrays {keys.shape}/{vectors.shape} {vectors.dtype} do not match the manifest"
        return Segment(d, keys, vectors), None

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(segment [k], row [k])`` of each key in the pool; ``-1`` where no segment holds it."""
        seg = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        for i, s in enumerate(self.segments()):
            todo = np.flatnonzero(seg < 0)
            if not len(todo):
                break
            found = key_rows(s.keys, keys[todo])
            hit = found >= 0
            seg[todo[hit]], row[todo[hit]] = i, found[hit]
        return seg, row

    def gather(self, seg: np.ndarray, row: np.ndarray) -> np.ndarray:
        """``[k, dim]`` vectors at ``(seg, row)`` positions (all ``>= 0``), in that order."""
        segments = self.segments()
        out = np.empty((len(seg), segments[0].vectors.shape[1] if segments else 0), self.dtype)
        for i in np.unique(seg):
            at = np.flatnonzero(seg == i)
            out[at] = segments[int(i)].vectors[row[at]]
        return out

    # ----------------------------------------------------------------- writing
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add one segment of newly encoded ``keys [m]`` / ``vectors [m, dim]`` (then merge if too many)."""
        if not len(keys):
            return
        with locked(self.dir):
            self._write(np.asarray(keys, np.uint64), np.asarray(vectors, self.dtype))
            self._load()
            if len(self._segments or []) > MAX_SEGMENTS:
                self._merge()

    def _write(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        name = json_digest([len(keys), keys[:8].tolist(), time.time_ns()], 16)  # unique; content is in keys.npy
        with staged_dir(self.dir / name) as stage:
            np.save(stage / "keys.npy", keys, allow_pickle=False)
            np.save(stage / "vectors.npy", np.ascontiguousarray(vectors), allow_pickle=False)
            man = {"format": FORMAT_VERSION, "encoder": self.identity, "layer": self.layer, "dtype": self.dtype,
                   "n_rows": len(keys), "dim": int(vectors.shape[1]), "files": file_digests(stage, FILES),
                   "bytes": {f: (stage / f).stat().st_size for f in FILES}}
            atomic_write_text(stage / "manifest.json", json.dumps(man))

    def _merge(self) -> None:
        """Rewrite every segment as one (first occurrence of each key wins), then drop the old ones;
        the caller holds the pool's lock."""
        segments = self._segments or []
        keys = np.concatenate([s.keys for s in segments])
        uniq, first = np.unique(keys, return_index=True)
        vectors = np.concatenate([np.asarray(s.vectors) for s in segments])[first]
        self._write(uniq, vectors)
        for s in segments:
            shutil.rmtree(s.path, ignore_errors=True)
        self._load()
