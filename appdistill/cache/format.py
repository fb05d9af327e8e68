"""The teacher-output cache, part 1 of 3: layout, manifest, identities, errors, one split's shards.

Reading is :mod:`appdistill.cache.reader` (``TeacherCache``, ``CacheJoin``), building
:mod:`appdistill.cache.builder` (``get_or_build_cache``).

Teacher outputs are computed once per example.

Teachers are frozen during distillation, so each one predicts every row of every split exactly once
and the results are memory-mapped from then on. Layout, one directory per (teacher identity, data
fingerprint) and one sub-directory per split::

    <root>/<teacher name>/<identity_hash>-<fingerprint>/<split>/manifest.json
                                                              /rows.npy            [N] int64 (sorted; join key)
                                                              /logits.npy          [N] float32
                                                              /hidden.<tap>.npy    [N, d] float32|float16
                                                                                   [N, T] int8|16|32|64 (leaves)

``manifest.json`` records the teacher identity dict, the data fingerprint, the split, and the shape,
dtype, byte size and sha256 of every ``.npy`` file (plus creation time and appdistill version).

Safety:

- A split is written into a stage next to its final place and swapped in whole, manifest included
  (:func:`appdistill.io.staged_dir`, the store kernel every store here shares), so a crash leaves
  either the old split directory or a complete new one; a killed build's stage (``.<split>.*.tmp``)
  is removed by the next build of that split.
- :meth:`TeacherCache.open` refuses a cache whose identity or fingerprint differs from the expected
  ones (:class:`CacheMismatchError`, naming the teacher and each differing field) and a shard whose
  size, sha256 or ``.npy`` header is wrong (:class:`CacheCorruptError`, naming the file).
- Content is verified before use by default (``verify="checksum"``): a shard whose size is unchanged
  but whose bytes changed (a flipped bit, an edit) is never reused, since it would silently change
  the student. Each shard is hashed once per process (:func:`appdistill.io.sha256_verified`:
  reopening it while its inode, size and mtime are unchanged costs nothing). ``verify="size"`` (sizes
  and headers only) remains as an explicit opt-out for caches too large to read at every start.
- :func:`get_or_build_cache` reuses an intact cache (no teacher call at all), builds a missing split,
  and rebuilds a corrupt one with a :class:`CacheRebuildWarning`.

Join: :meth:`TeacherCache.lookup` gathers rows by ``row_ids`` through a row id -> (split, position)
index built from the splits' ``rows`` shards on first use (5 bytes per interaction), with ``np.take``
into recycled output buffers; :class:`CacheJoin` does it for several teachers as a ``BatchLoader``
hook. Cost on ML-100K, batch 1024, 2-core VM: ~0.85 ms of CPU per batch for three teachers with
``[B, 64]`` + ``[B, 128]`` float32 and ``[B, 300]`` int leaves (~3.2 KB gathered per row), about what
copying that many bytes from random rows costs (``benchmarks/bench_cache.py``). A hidden shard larger
than :data:`MAP_BYTES` is read with positional reads instead (:meth:`SplitShards.take`): a page
fault on a memory-mapped file maps the whole page-cache folio around the row (up to 2 MiB on recent
kernels), so random rows of a multi-GB shard would map nearly all of it into the resident set.

Example:
    >>> cache = get_or_build_cache(teacher, ds, run_dir / "cache")
    >>> out = cache.lookup("train", ds.splits["train"][:4])   # logits [4], hidden {"h": [4, 64]}
    >>> loader = BatchLoader(builder, ds.splits["train"], 1024, hooks=[CacheJoin({"dlrm": cache})])
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from appdistill.errors import AppDistillError
from appdistill.io import json_digest, release_mapped, sha256_verified

log = logging.getLogger("appdistill.cache")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SPLITS = ("train", "valid", "test")
#: hidden shards larger than this are read by positional reads, smaller ones through their memory map
#: (which then maps at most this much of each): see :meth:`SplitShards.take`
MAP_BYTES = 256 << 20
_PREADV = hasattr(os, "preadv")  # Linux, macOS 11+; elsewhere every shard is read through its map
Verify = Literal["size", "checksum"]
FloatDtype = Literal["float32", "float16"]
IntDtype = Literal["auto", "int32", "int64"]


# ====================================================================================== errors
class CacheError(AppDistillError):
    """A teacher-output cache cannot be used as asked."""


class CacheMissingError(CacheError):
    """No cache (or not the requested split) exists for this teacher and data."""


class CacheMismatchError(CacheError):
    """The cache was built by a different teacher identity or on different data: refused."""


class CacheCorruptError(CacheError):
    """A shard is truncated, edited or unreadable (the message names the file)."""


class CacheRebuildWarning(UserWarning):
    """A corrupt or inconsistent cache split was detected and is being rebuilt."""


# ====================================================================================== manifest
@dataclass(frozen=True)
class ShardInfo:
    """One ``.npy`` file of a split.

    Attributes:
        file: file name inside the split directory.
        shape: full array shape (first axis = rows of the split).
        dtype: numpy dtype name.
        bytes: file size in bytes (header included).
        sha256: hex digest of the whole file.
    """

    file: str
    shape: list[int]
    dtype: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class CacheManifest:
    """``manifest.json`` of one split: what produced the shards and how to check them.

    Attributes:
        shards: ``{"rows" | "logits" | "hidden.<tap>": ShardInfo}``.
        taps: hidden tap names in the teacher's order.
        hidden: whether the split holds the teacher's hidden taps (``False``: logits only, built for
            methods that read no hidden state; a method that does rebuilds the split with them).
    """

    format: int
    teacher: str
    identity: dict[str, Any]
    identity_hash: str
    fingerprint: str
    split: str
    n_rows: int
    shards: dict[str, ShardInfo]
    taps: list[str]
    created: str
    appdistill_version: str
    build_seconds: float
    hidden: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> CacheManifest:
        """Parse ``path``; raises :class:`CacheCorruptError` naming the file when it is unreadable."""
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = {k: ShardInfo(**v) for k, v in raw["shards"].items()}
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CacheCorruptError(f"teacher cache manifest '{path}' is unreadable ({type(e).__name__}: {e})") \
                from None


# ====================================================================================== helpers
def identity_key(identity: Mapping[str, Any]) -> str:
    """The 16-hex-digit hash of an identity dict; equals :meth:`Teacher.identity_hash` of the base class."""
    return json_digest(identity, 16)


def _normalise(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as the manifest stores it (JSON round trip: tuples -> lists, odd objects -> str)."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("appdistill")
    except Exception:  # noqa: BLE001 - not installed (source checkout): still build the cache
        return "0+unknown"


def _field_label(path: str) -> str:
    return {"artifact": "artifact hash", "spec": "feature-spec hash", "key": "teacher type",
            "name": "teacher name"}.get(path, f"identity field '{path}'")


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _identity_diff(cached: Any, expected: Any, path: str = "") -> list[str]:
    """Human-readable differences ``"<field> <cached> (cache) vs <expected> (expected)"``."""
    if isinstance(cached, dict) and isinstance(expected, dict):
        out: list[str] = []
        for k in sorted(set(cached) | set(expected), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in cached:
                out.append(f"{_field_label(p)} absent (cache) vs {_short(expected[k])} (expected)")
            elif k not in expected:
                out.append(f"{_field_label(p)} {_short(cached[k])} (cache) vs absent (expected)")
            else:
                out += _identity_diff(cached[k], expected[k], p)
        return out
    if cached == expected:
        return []
    return [f"{_field_label(path or 'identity')} {_short(cached)} (cache) vs {_short(expected)} (expected)"]


def _mismatch_message(teacher: str, where: Path, man: CacheManifest, identity: dict[str, Any],
                      fingerprint: str) -> str | None:
    diffs = _identity_diff(man.identity, identity)
    if man.fingerprint != fingerprint:
        diffs.append(f"data fingerprint {man.fingerprint!r} (cache) vs {fingerprint!r} (expected)")
    if not diffs:
        return None
    return (f"teacher '{teacher}': the cache at '{where}' was built by a different teacher or on different data "
            f"({'; '.join(diffs)}); refusing to reuse it. Rebuild the cache (`appdistill cache build`, or "
            "get_or_build_cache) for the current teacher and data.")


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _ids(row_ids: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    ids = _to_numpy(row_ids) if isinstance(row_ids, torch.Tensor) else np.asarray(row_ids)
    if ids.ndim != 1:
        raise CacheError(f"row_ids must be one-dimensional [B], got shape {tuple(ids.shape)}")
    return ids.astype(np.int64, copy=False)


# ====================================================================================== shards
@dataclass
class SplitShards:
    """The memory-mapped arrays of one split (read-only).

    Attributes:
        split: split name.
        path: the split directory.
        manifest: its manifest.
        rows: ``[N]`` int64 interaction rows, sorted (the join key).
        logits: ``[N]`` float32.
        hidden: ``{tap: [N, d]}`` float32/float16 or ``[N, T]`` int8..int64 (the smallest holding the declared cardinality by default).
    """

    split: str
    path: Path
    manifest: CacheManifest
    rows: np.ndarray
    logits: np.ndarray
    hidden: dict[str, np.ndarray]
    maps: list[Any] = field(default_factory=list, repr=False)  # the np.memmap objects behind the views
    #: ``{tap: (file, .npy header bytes)}`` of the hidden shards read by positional reads
    files: dict[str, tuple[Path, int]] = field(default_factory=dict, repr=False)
    _handles: dict[str, io.FileIO] = field(default_factory=dict, repr=False)
    _handles_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(s.bytes for s in self.manifest.shards.values())

    def take(self, tap: str, pos: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``pos`` of hidden tap ``tap`` into ``out`` (C-contiguous ``[len(pos), *row]``).

        Small shards are gathered from their memory map (``np.take``, one memcpy per row); a shard of
        more than :data:`MAP_BYTES` by one ``os.preadv`` per row straight into ``out`` (~3 us per row
        on a 2-core VM against ~1 us mapped), which maps nothing: random rows of a mapped multi-GB
        shard make most of it resident, however often the mapping is released.

        Raises:
            CacheCorruptError: the file is shorter than its header says (changed since it was opened).
        """
        if tap not in self.files:
            # mode="clip" skips numpy's bounce buffer -- TeacherCache.locate has checked every position
            return np.take(self.hidden[tap], pos, axis=0, out=out, mode="clip")
        path, offset = self.files[tap]
        f = self._handles.get(tap)
        if f is None:
            with self._handles_lock:
                f = self._handles.get(tap) or self._handles.setdefault(tap, io.FileIO(path, "r"))
        row = out.nbytes // max(len(pos), 1)
        buf = memoryview(out).cast("B")
        fd, preadv = f.fileno(), os.preadv
        for j, o in enumerate((offset + pos.astype(np.int64) * row).tolist()):
            if preadv(fd, [buf[j * row:(j + 1) * row]], o) != row:
                raise CacheCorruptError(f"cache shard '{path}' ended before row {int(pos[j])} (changed on disk "
                                        "since it was opened); rebuild the cache")
        return out

    def release(self) -> None:
        """Unmap the pages read so far (``madvise(MADV_DONTNEED)``); the next read faults them back in.

        Why: a training epoch gathers rows in random order, which touches every page of every shard
        within a few hundred batches, and each touched page of a mapping counts in the process's
        resident set until unmapped: without this, resident memory grows to the whole cache (tens of
        GB at 10M rows) even though the kernel could drop those pages at any time. The page cache
        keeps them, so a re-read is a minor fault, not disk I/O.
        """
        release_mapped(self.maps)


def _open_split(d: Path, teacher: str, identity: dict[str, Any], fingerprint: str, split: str,
                verify: Verify, hidden: bool | list[str] = True) -> SplitShards:
    """Open and check one split directory; raises Missing / Mismatch / Corrupt errors.

    ``hidden=False`` opens the logits only: the hidden shards are neither checked nor mapped (at 10M
    rows they are ~10 GB to hash), and the split reads as logits-only. ``hidden=True`` on a split built
    logits-only (or with some taps only) raises :class:`CacheMissingError` (the getter builds it again,
    with its taps); a list of tap names opens those taps only and raises it when one is absent."""
    mpath = d / MANIFEST
    if not mpath.is_file():
        if d.is_dir():  # a split directory only ever appears complete: someone removed the manifest
            raise CacheCorruptError(f"teacher '{teacher}': cache split '{split}' at '{d}' has no {MANIFEST}")
        raise CacheMissingError(f"teacher '{teacher}': no cache for split '{split}' at '{d}'")
    man = CacheManifest.read(mpath)
    if man.format != FORMAT_VERSION:
        raise CacheMismatchError(f"teacher '{teacher}': cache at '{d}' has format {man.format}, this appdistill "
                                 f"reads format {FORMAT_VERSION}; rebuild it")
    msg = _mismatch_message(teacher, d, man, identity, fingerprint)
    if msg:
        raise CacheMismatchError(msg)
    if man.split != split:
        raise CacheCorruptError(f"teacher '{teacher}': manifest '{mpath}' describes split '{man.split}', "
                                f"expected '{split}'")
    if hidden is True and not man.hidden:
        raise CacheMissingError(f"teacher '{teacher}': cache split '{split}' at '{d}' holds "
                                f"{'taps ' + str(man.taps) + ' only' if man.taps else 'logits only'}; "
                                "every hidden tap was asked")
    absent = [t for t in hidden if t not in man.taps] if isinstance(hidden, list) else []
    if absent:
        raise CacheMissingError(f"teacher '{teacher}': cache split '{split}' at '{d}' lacks the hidden taps "
                                f"{absent} that were asked")
    keep = man.taps if hidden is True else list(hidden) if hidden else []
    if keep != man.taps:  # the taps not asked for are neither hashed nor mapped
        man = replace(man, taps=[t for t in man.taps if t in keep], hidden=man.hidden and hidden is True,
                      shards={k: v for k, v in man.shards.items()
                              if k in ("rows", "logits") or k[len("hidden."):] in keep})
    arrays: dict[str, np.ndarray] = {}
    maps: list[Any] = []
    files: dict[str, tuple[Path, int]] = {}
    for key, info in man.shards.items():
        p = d / info.file
        if not p.is_file():
            raise CacheCorruptError(f"teacher '{teacher}': cache shard '{p}' is missing")
        size = p.stat().st_size
        if size != info.bytes:
            raise CacheCorruptError(f"teacher '{teacher}': cache shard '{p}' has {size} bytes, its manifest says "
                                    f"{info.bytes} (truncated or overwritten)")
        if verify == "checksum" and sha256_verified(p) != info.sha256:
            raise CacheCorruptError(f"teacher '{teacher}': cache shard '{p}' fails its sha256 check (edited or "
                                    "corrupted on disk)")
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CacheCorruptError(f"teacher '{teacher}': cache shard '{p}' has an unreadable .npy header "
                                    f"({type(e).__name__}: {e})") from None
        if list(a.shape) != list(info.shape) or str(a.dtype) != info.dtype or a.shape[:1] != (man.n_rows,):
            raise CacheCorruptError(f"teacher '{teacher}': cache shard '{p}' holds {a.shape} {a.dtype}, its "
                                    f"manifest says {tuple(info.shape)} {info.dtype} over {man.n_rows} rows")
        # a plain ndarray view: fancy indexing on np.memmap goes through slower subclass machinery
        arrays[key] = a.view(np.ndarray)
        maps.append(a)
        if key.startswith("hidden.") and a.nbytes > MAP_BYTES and _PREADV and a.flags.c_contiguous:
            files[key[len("hidden."):]] = (p, int(a.offset))
    missing = [k for k in ("rows", "logits", *(f"hidden.{t}" for t in man.taps)) if k not in arrays]
    if missing:
        raise CacheCorruptError(f"teacher '{teacher}': manifest '{mpath}' lists no shard for {missing}")
    hidden = {t: arrays[f"hidden.{t}"] for t in man.taps}
    return SplitShards(split, d, man, arrays["rows"], arrays["logits"], hidden, maps, files)


# ====================================================================================== the cache


def _closest_sibling(tdir: Path, key: str, fingerprint: str) -> tuple[Path, CacheManifest] | None:
    """An existing cache of the same teacher name, to explain why the expected one is absent.

    Prefers the same data (identity changed), then the same identity (data changed), then the newest.
    """
    if not tdir.is_dir():
        return None
    ihash = key.split("-", 1)[0]
    cands = [p for p in tdir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    cands.sort(key=lambda p: (not p.name.endswith(f"-{fingerprint}"), not p.name.startswith(f"{ihash}-"),
                              -p.stat().st_mtime))
    for p in cands:
        for sd in sorted(x for x in p.iterdir() if not x.name.startswith(".")):
            with contextlib.suppress(CacheError, OSError):
                if (sd / MANIFEST).is_file():
                    return sd, CacheManifest.read(sd / MANIFEST)
    return None


# ====================================================================================== building
