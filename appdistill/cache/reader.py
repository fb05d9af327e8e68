"""The teacher-output cache, part 2 of 3: reading (``TeacherCache``) and the batch join (``CacheJoin``).

Layout and safety rules: :mod:`appdistill.cache.format`.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appdistill.cache.format import (CacheCorruptError, CacheError, CacheMismatchError, CacheMissingError,
                                     DEFAULT_SPLITS, SplitShards, Verify, _closest_sibling, _ids, _mismatch_message,
                                     _normalise, _open_split, _safe, identity_key)
from appdistill.features.batch import Batch, TeacherOutput

log = logging.getLogger("appdistill.cache")

#: rows a CacheJoin gathers between releases of the mapped pages: bounds the resident pages at about
#: RELEASE_ROWS x shards x 64 KiB (a random row's page fault also maps up to 15 neighbouring pages:
#: the kernel's fault-around), whatever the cache's size; re-faults cost ~2 s per million rows
RELEASE_ROWS = 1 << 16


class _BufferPool:
    """Output arrays recycled once nothing references them any more.

    Why: a fresh multi-MB array is mapped page by page on first touch (a [1024, 300] int64 batch is
    600 page faults, ~3.5 ms on a VM: more than the gather itself). A buffer is handed out again
    only when its reference count shows that the pool is its sole owner -- every tensor made
    with ``torch.from_numpy`` (and every view of it) keeps a reference to the array -- so a batch
    a consumer still holds is never overwritten. Small arrays are left to malloc.
    """

    MIN_BYTES = 1 << 16

    def __init__(self, per_key: int = 16) -> None:
        self.per_key = per_key
        self._bufs: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        self._lock = threading.Lock()  # two loader threads must never claim the same free buffer
        # free-threaded CPython counts references differently: no recycling there
        self.enabled = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
        probe = [np.empty(1)]
        self._free_refs = next(sys.getrefcount(a) for a in probe)  # list slot + loop variable + argument

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape``/``dtype`` that nobody else references."""
        dtype = np.dtype(dtype)
        if not self.enabled or math.prod(shape) * dtype.itemsize < self.MIN_BYTES:
            return np.empty(shape, dtype)
        key = (tuple(shape), dtype)
        with self._lock:
            bufs = self._bufs.setdefault(key, [])
            for a in bufs:
                if sys.getrefcount(a) <= self._free_refs:
                    return a
            a = np.empty(shape, dtype)
            if len(bufs) < self.per_key:
                bufs.append(a)
            return a


@dataclass
class _Located:
    """Where the rows of one batch live: ``parts`` of ``(split, batch indices | None = all, positions)``."""

    n: int
    parts: list[tuple[str, np.ndarray | None, np.ndarray]]


class TeacherCache:
    """Cached outputs of one teacher on one data set, split by split.

    Build with :func:`build_teacher_cache` / :func:`get_or_build_cache`, reopen with :meth:`open`.

    Attributes:
        name: teacher name (the directory under the cache root).
        identity: the teacher identity dict the cache was built for.
        fingerprint: the data fingerprint (``Dataset.fingerprint``).
        path: ``<root>/<name>/<identity_hash>-<fingerprint>``.
        shards: ``{split: SplitShards}``.
        built: splits computed by the call that returned this object (empty when all were reused).
        rebuilt: ``{split: reason}`` for splits rebuilt because they were corrupt.
        seconds: wall time of that call.
    """

    def __init__(self, name: str, identity: dict[str, Any], fingerprint: str, path: Path,
                 shards: dict[str, SplitShards]) -> None:
        self.name, self.identity, self.fingerprint, self.path = name, identity, fingerprint, path
        self.shards = shards
        self.built: list[str] = []
        self.rebuilt: dict[str, str] = {}
        self.seconds = 0.0
        if not shards:
            raise CacheMissingError(f"teacher '{name}': no split to open under '{path}'")
        first = next(iter(shards.values()))
        # per tap: (row shape, stored dtype, dtype handed out when upcasting or None if the same)
        self._taps = list(first.manifest.taps)
        self._tap_info: dict[str, tuple[tuple[int, ...], np.dtype, np.dtype | None]] = {}
        for t in self._taps:
            dt = first.hidden[t].dtype
            wide = np.dtype(np.float32) if dt.kind == "f" else np.dtype(np.int64) if dt.kind in "iu" else dt
            self._tap_info[t] = (tuple(first.hidden[t].shape[1:]), dt, None if wide == dt else wide)
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        self._index_lock = threading.Lock()
        self._pool = _BufferPool()
        for s in shards.values():  # every split must look the same to a consumer
            if s.manifest.taps != first.manifest.taps or any(
                    s.hidden[t].shape[1:] != first.hidden[t].shape[1:] or s.hidden[t].dtype != first.hidden[t].dtype
                    for t in first.manifest.taps):
                raise CacheCorruptError(
                    f"teacher '{name}': cache splits '{first.split}' and '{s.split}' under '{path}' have different "
                    f"hidden taps/shapes/dtypes (built with different settings); rebuild the cache")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root_dir: str | Path, teacher_name: str, identity: Mapping[str, Any], fingerprint: str,
             verify: Verify = "checksum", splits: Sequence[str] | None = None,
             identity_hash: str | None = None, hidden: bool = True) -> TeacherCache:
        """Open an existing cache, refusing anything that does not match.

        Args:
            root_dir: cache root (``run_dir/cache``).
            teacher_name: teacher name (``teacher.name``).
            identity: expected ``teacher.identity()``.
            fingerprint: expected ``ds.fingerprint``.
            verify: ``"checksum"`` (default: also the sha256 of every shard, once per file per process)
                or ``"size"`` (file sizes + ``.npy`` headers only; an opt-out that misses a flipped byte).
            splits: splits to open; ``None`` = every split present.
            identity_hash: directory key; defaults to :func:`identity_key` of ``identity`` (pass
                ``teacher.identity_hash()`` if a teacher overrides it).
            hidden: open the hidden taps too (default); ``False`` opens the logits only (the taps are
                not checked or mapped).

        Raises:
            CacheMismatchError: identity or fingerprint differ (names the teacher and each difference).
            CacheMissingError: nothing cached for this teacher (or a requested split).
            CacheCorruptError: a truncated/edited/unreadable shard (names the file).
        """
        if verify not in ("size", "checksum"):
            raise CacheError(f"verify must be 'size' or 'checksum', got {verify!r}")
        ident = _normalise(identity)
        tdir = Path(root_dir) / _safe(teacher_name)
        kdir = tdir / f"{identity_hash or identity_key(identity)}-{fingerprint}"
        if not kdir.is_dir():
            other = _closest_sibling(tdir, kdir.name, fingerprint)
            if other is not None:
                msg = _mismatch_message(teacher_name, other[0], other[1], ident, fingerprint)
                if msg:
                    raise CacheMismatchError(msg)
            raise CacheMissingError(f"teacher '{teacher_name}': no cache at '{kdir}'; build it first "
                                    "(`appdistill cache build`, or get_or_build_cache)")
        if splits is None:
            splits = sorted((p.name for p in kdir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            key=lambda s: (DEFAULT_SPLITS.index(s) if s in DEFAULT_SPLITS else 99, s))
            if not splits:
                raise CacheMissingError(f"teacher '{teacher_name}': cache directory '{kdir}' holds no split")
        shards = {s: _open_split(kdir / s, teacher_name, ident, fingerprint, s, verify, hidden) for s in splits}
        return cls(teacher_name, ident, fingerprint, kdir, shards)

    # ------------------------------------------------------------------ info
    @property
    def splits(self) -> list[str]:
        return list(self.shards)

    @property
    def taps(self) -> list[str]:
        return list(self._taps)

    def hidden_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each tap (``{"h": (64,), "leaves": (300,)}``)."""
        first = next(iter(self.shards.values()))
        return {t: tuple(first.hidden[t].shape[1:]) for t in first.manifest.taps}

    @property
    def n_rows(self) -> int:
        return sum(s.manifest.n_rows for s in self.shards.values())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards.values())

    def __repr__(self) -> str:
        return (f"TeacherCache({self.name!r}, splits={self.splits}, rows={self.n_rows}, taps={self.hidden_shapes()}, "
                f"path='{self.path}')")

    # ------------------------------------------------------------------ join
    def _row_index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(split code [R] int8 (-1 = not cached), position in that split [R])`` over row ids ``0..R-1``.

        Built on first use (5 bytes per interaction row): two small gathers per batch instead of a
        binary search per id (~10x cheaper; ``searchsorted`` cost ~0.15 ms per 1024 ids here).
        """
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    shards = list(self.shards.values())
                    hi = max((int(sh.rows[-1]) + 1 for sh in shards if len(sh.rows)), default=0)
                    code = np.full(hi, -1, np.int8)
                    big = max(len(sh.rows) for sh in shards) >= 2**31
                    pos = np.zeros(hi, np.int64 if big else np.int32)
                    for k, sh in enumerate(shards):
                        code[sh.rows] = k
                        pos[sh.rows] = np.arange(len(sh.rows))
                    self._index = (code, pos)
        return self._index

    def locate(self, split: str | None, row_ids: np.ndarray | torch.Tensor | Sequence[int]) -> _Located:
        """Positions of ``row_ids`` ``[B]`` in the shards; raises :class:`CacheError` for absent rows."""
        ids = _ids(row_ids)
        n = len(ids)
        names = self.splits
        code, posx = self._row_index()
        inside = (ids >= 0) & (ids < len(code))
        if inside.all():
            c, p = np.take(code, ids), np.take(posx, ids)
        else:  # ids beyond every cached row: mark them absent instead of failing on the gather
            safe = np.where(inside, ids, 0)
            c, p = np.where(inside, np.take(code, safe), -1), np.take(posx, safe)
        if split is not None:
            want = self._split_code(split)
            bad = c != want
            if bad.any():
                self._absent(ids[bad], f"split '{split}'", c[bad])
            return _Located(n, [(split, None, p)])
        if n and c[0] >= 0 and (c == c[0]).all():  # batches come split by split: the common case
            return _Located(n, [(names[c[0]], None, p)])
        if (c < 0).any():
            self._absent(ids[c < 0], f"splits {names}", c[c < 0])
        parts: list[tuple[str, np.ndarray | None, np.ndarray]] = []
        for k in np.unique(c):
            idx = np.flatnonzero(c == k)
            parts.append((names[k], idx, p[idx]))
        return _Located(n, parts)

    def gather(self, loc: _Located, taps: Sequence[str] | None = None, upcast: bool = True,
               lazy: bool = False) -> TeacherOutput:
        """Materialise the rows found by :meth:`locate` (see :meth:`lookup` for ``taps``/``upcast``).

        ``lazy=True`` gathers the logits now and each hidden tap when a consumer first reads it
        (:class:`LazyTaps`).
        """
        if taps is None:
            taps = self._taps
        elif any(t not in self._tap_info for t in taps):
            unknown = [t for t in taps if t not in self._tap_info]
            raise CacheError(f"teacher '{self.name}': the cache has no hidden taps {unknown} (it has {self._taps})")
        if len(loc.parts) == 1 and loc.parts[0][1] is None:  # the usual case: one split covers the batch
            s, _, pos = loc.parts[0]
            logits = np.take(self.shards[s].logits, pos)
        else:
            logits = np.empty(loc.n, np.float32)
            for s, idx, pos in loc.parts:
                logits[idx] = np.take(self.shards[s].logits, pos)
        hidden: Mapping[str, torch.Tensor] = (LazyTaps(self, loc, list(taps), upcast) if lazy
                                              else {t: self.gather_tap(loc, t, upcast) for t in taps})
        return TeacherOutput(torch.from_numpy(logits), hidden)

    def gather_tap(self, loc: _Located, tap: str, upcast: bool = True) -> torch.Tensor:
        """One hidden tap of the rows found by :meth:`locate`: ``[B, *row]``."""
        row_shape, dtype, wide_dtype = self._tap_info[tap]
        out = self._pool.get((loc.n, *row_shape), dtype)
        if len(loc.parts) == 1 and loc.parts[0][1] is None:
            s, _, pos = loc.parts[0]
            self.shards[s].take(tap, pos, out)
        else:
            for s, idx, pos in loc.parts:
                out[idx] = self.shards[s].take(tap, pos, np.empty((len(pos), *row_shape), dtype))
        if upcast and wide_dtype is not None:  # consumers get what a live teacher gives: float32, int64
            wide = self._pool.get(out.shape, wide_dtype)
            np.copyto(wide, out)
            out = wide  # the narrow buffer is free again once this call returns
        return torch.from_numpy(out)

    def release_pages(self) -> None:
        """Drop the cache's pages from this process's resident set (see :meth:`SplitShards.release`)."""
        for sh in self.shards.values():
            sh.release()

    def lookup(self, split: str | None, row_ids: np.ndarray | torch.Tensor | Sequence[int],
               taps: Sequence[str] | None = None, upcast: bool = True) -> TeacherOutput:
        """Teacher outputs for interaction rows ``row_ids``, in their order.

        Args:
            split: the split the rows come from, or ``None`` to search every cached split.
            row_ids: ``[B]`` int interaction rows (``Batch.row_ids``); duplicates allowed.
            taps: hidden taps to gather (``None`` = all); leaving out unused wide taps saves time.
            upcast: return float taps as float32 and integer taps as int64 (what a live teacher
                returns); ``False`` keeps the stored dtypes (float16 / int32).

        Returns:
            ``TeacherOutput(logits [B] float32, hidden {tap: [B, d]})`` on CPU.

        Raises:
            CacheError: a row id is not in the split(s), naming a few of them.
        """
        return self.gather(self.locate(split, row_ids), taps, upcast)

    def _shard(self, split: str) -> SplitShards:
        if split not in self.shards:
            raise CacheError(f"teacher '{self.name}': split '{split}' is not cached (cached: {self.splits})")
        return self.shards[split]

    def _split_code(self, split: str) -> int:
        self._shard(split)
        return self.splits.index(split)

    def _absent(self, missing: np.ndarray, where: str, codes: np.ndarray) -> None:
        elsewhere = sorted({self.splits[k] for k in codes.tolist() if k >= 0})
        hint = f"; some are in cached split(s) {elsewhere}" if elsewhere else ""
        raise CacheError(f"teacher '{self.name}': {len(missing)} row ids are not in the cache's {where} "
                         f"(e.g. {missing[:5].tolist()}{hint}); the rows must come from the data set and split "
                         f"the cache was built on (fingerprint {self.fingerprint})")


class LazyTaps(Mapping[str, torch.Tensor]):
    """A batch's hidden taps, each gathered from the cache the first time a consumer reads it.

    Why: a method may read hidden states on some steps only (DiverseDistill's committee path runs on
    every ``committee_path.every``-th step): gathering them for every batch would read 8x the bytes it
    uses. The rows are fixed when the batch is built, so a late read returns what an eager one would.

    Args:
        cache: the teacher's cache.
        loc: the batch's rows (:meth:`TeacherCache.locate`).
        taps: the taps the mapping holds.
        upcast: see :meth:`TeacherCache.lookup`.
        device: move each tap there once gathered (``Batch.to``).

    Example:
        >>> out = cache.gather(cache.locate("train", rows), lazy=True)
        >>> out.hidden["h"].shape   # gathered now: [B, d]
    """

    def __init__(self, cache: TeacherCache, loc: _Located, taps: list[str], upcast: bool = True,
                 device: torch.device | None = None, non_blocking: bool = False) -> None:
        self._cache, self._loc, self._taps, self._upcast = cache, loc, taps, upcast
        self._device, self._non_blocking = device, non_blocking
        self._got: dict[str, torch.Tensor] = {}

    def __getitem__(self, tap: str) -> torch.Tensor:
        h = self._got.get(tap)
        if h is None:
            if tap not in self._taps:
                raise KeyError(tap)
            h = self._cache.gather_tap(self._loc, tap, self._upcast)
            if self._device is not None:
                h = h.to(self._device, non_blocking=self._non_blocking)
            self._got[tap] = h
        return h

    def __iter__(self) -> Iterator[str]:
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LazyTaps:
        """The same taps, each moved to ``device`` when it is read."""
        moved = LazyTaps(self._cache, self._loc, self._taps, self._upcast, torch.device(device), non_blocking)
        moved._got = {t: h.to(device, non_blocking=non_blocking) for t, h in self._got.items()}
        return moved


class CacheJoin:
    """``BatchLoader`` hook: fills ``batch.teacher[name]`` from cached outputs for ``batch.row_ids``.

    Args:
        caches: ``{teacher name: TeacherCache}``.
        split: the split the loader walks, checked for every row (``None`` = any cached split;
            same cost).
        taps: optional ``{teacher name: taps to gather}`` (default: all taps of every teacher).
        upcast: see :meth:`TeacherCache.lookup`.
        lazy: gather each hidden tap when the method first reads it (:class:`LazyTaps`); the logits
            are gathered with the batch either way.

    Example:
        >>> join = CacheJoin({"dlrm": dlrm_cache, "lightgbm": lgbm_cache}, split="train")
        >>> loader = BatchLoader(builder, ds.splits["train"], 1024, hooks=[join])
        >>> next(iter(loader)).teacher["dlrm"].hidden["h"].shape   # [1024, d]
    """

    def __init__(self, caches: Mapping[str, TeacherCache], split: str | None = None,
                 taps: Mapping[str, Sequence[str]] | None = None, upcast: bool = True, lazy: bool = True) -> None:
        if not caches:
            raise CacheError("CacheJoin needs at least one teacher cache")
        self.caches, self.split, self.upcast, self.lazy = dict(caches), split, upcast, lazy
        self._since_release = 0  # rows gathered since the mapped pages were last released
        self.taps = {k: list(v) for k, v in (taps or {}).items()}
        unknown = sorted(set(self.taps) - set(self.caches))
        if unknown:
            raise CacheError(f"CacheJoin: taps given for unknown teachers {unknown} (teachers: {sorted(self.caches)})")

    def select(self, taps: Mapping[str, Sequence[str]]) -> CacheJoin:
        """Join only the teachers in ``taps`` (``{teacher: hidden taps}``, e.g. ``Method.cache_taps()``),
        gathering only those taps; returns ``self``."""
        unknown = sorted(set(taps) - set(self.caches))
        if unknown:
            raise CacheError(f"CacheJoin: no cache for teachers {unknown} (teachers: {sorted(self.caches)})")
        self.caches = {n: c for n, c in self.caches.items() if n in taps}
        self.taps = {n: list(v) for n, v in taps.items()}
        return self

    def __call__(self, batch: Batch) -> Batch:
        ids = _ids(batch.row_ids)
        # caches built on the same data and splits hold identical rows arrays: search once per group
        located: dict[tuple[str, tuple[str, ...]], _Located] = {}
        outs: dict[str, TeacherOutput] = {}
        for name, cache in self.caches.items():
            key = (cache.fingerprint, tuple(cache.splits))
            loc = located.get(key)
            if loc is None:
                loc = located[key] = cache.locate(self.split, ids)
            outs[name] = cache.gather(loc, self.taps.get(name), self.upcast, self.lazy)
        batch.teacher = {**batch.teacher, **outs}
        # random rows touch a new page per row and shard: release the mapped pages every
        # RELEASE_ROWS rows so resident memory stays bounded instead of growing to the whole cache
        self._since_release += len(ids)
        if self._since_release >= RELEASE_ROWS:
            for cache in self.caches.values():
                cache.release_pages()
            self._since_release = 0
        return batch


