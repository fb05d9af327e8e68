"""The teacher-output cache, part 3 of 3: building splits atomically and reusing intact ones
(``get_or_build_cache``).

Layout and safety rules: :mod:`appdistill.cache.format`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appdistill.cache.format import (CacheCorruptError, CacheError, CacheManifest, CacheMismatchError,
                                     CacheMissingError, CacheRebuildWarning, DEFAULT_SPLITS, FORMAT_VERSION,
                                     FloatDtype, IntDtype, MANIFEST, ShardInfo, SplitShards, Verify,
                                     _normalise, _open_split, _safe, _to_numpy, _version, release_mapped)
from appdistill.cache.reader import RELEASE_ROWS, TeacherCache
from appdistill.io import atomic_write_text, file_digests, locked, staged_dir

if TYPE_CHECKING:  # heavy / cyclic imports only for annotations
    from appdistill.features.dataset import Dataset
    from appdistill.teachers.base import Teacher

log = logging.getLogger("appdistill.cache")


# ====================================================================================== building
def _int_dtype(int_dtype: str, cardinality: int) -> np.dtype:
    """``int_dtype``, or for ``"auto"`` the smallest signed type holding a tap's declared cardinality
    (LightGBM leaf indices below 63 leaves: int8, a quarter of int32's disk and read bandwidth)."""
    if int_dtype != "auto":
        return np.dtype(int_dtype)
    for dt in (np.int8, np.int16, np.int32):
        if 0 < cardinality <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    return np.dtype(np.int32)


def _store_dtype(a: np.ndarray, tap: str, teacher: str, float_dtype: FloatDtype, int_dtype: IntDtype,
                 cardinality: int = 0) -> np.dtype:
    kind = a.dtype.kind
    if kind == "f":
        return np.dtype(float_dtype)
    if kind in "iu":
        return _int_dtype(int_dtype, cardinality)
    if kind == "b":
        return np.dtype(bool)
    raise CacheError(f"teacher '{teacher}': hidden tap '{tap}' has dtype {a.dtype}; only float, int and bool "
                     "taps can be cached")


def _check_int_range(a: np.ndarray, dtype: np.dtype, tap: str, teacher: str) -> None:
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise CacheError(f"teacher '{teacher}': hidden tap '{tap}' has values outside {dtype} "
                         f"[{a.min()}, {a.max()}] (its declared cardinality is too small?); build the cache with "
                         "int_dtype='int64'")


def _split_rows(ds: Dataset, split: str) -> np.ndarray:
    """``[N]`` int64 rows of ``split``, sorted and unique (the join binary-searches them)."""
    rows = np.asarray(ds.splits[split], np.int64)
    if len(rows) > 1 and not (np.diff(rows) > 0).all():  # Dataset keeps splits sorted; be safe anyway
        rows = np.unique(rows)
    return rows


def _write_split(teacher: Teacher, ds: Dataset, split: str, tmp: Path, batch_size: int,
                 float_dtype: FloatDtype, int_dtype: IntDtype, progress: bool,
                 hidden: bool | list[str] = True) -> CacheManifest:
    """Predict every row of ``split`` in chunks of ``batch_size`` straight into ``.npy`` memmaps in ``tmp``
    (the logits only when ``hidden`` is false, only the taps it names when it is a list), each window
    of :data:`RELEASE_ROWS` rows in :meth:`~appdistill.features.dataset.Dataset.locality_order`."""
    from appdistill.progress import bar as progress_bar

    t0 = time.perf_counter()
    rows = _split_rows(ds, split)
    n = len(rows)
    name = teacher.name
    if n == 0:
        raise CacheError(f"teacher '{name}': split '{split}' is empty; nothing to cache")
    np.save(tmp / "rows.npy", rows)
    logits_mm = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float32, shape=(n,))
    hidden_mm: dict[str, np.memmap] = {}
    taps: list[str] = []
    returned: list[str] = []  # the taps the teacher returns (``taps``: those stored)
    f16_overflow = 0
    window = max(1, RELEASE_ROWS // batch_size) * batch_size
    with progress_bar(total=n, desc=f"cache {name}/{split}", unit="row", enabled=progress, leave=False) as bar:
        for w0 in range(0, n, window):
            win = rows[w0:w0 + window]
            order = ds.locality_order(win)  # neighbouring table entries; written back in place
            for a in range(0, len(win), batch_size):
                pos = order[a:a + batch_size]  # positions in the window: written back where they belong
                at = w0 + pos
                b = len(pos)
                out = teacher.predict(ds, win[pos])
                lg = _to_numpy(out.logits)
                if lg.shape not in ((b,), (b, 1)):
                    raise CacheError(f"teacher '{name}': predict returned logits of shape {lg.shape} for {b} rows; "
                                     f"expected [{b}]")
                logits_mm[at] = lg.reshape(b)
                if hidden and w0 == 0 and a == 0:  # the first batch fixes the taps, their widths and dtypes
                    returned = list(out.hidden)
                    taps = returned if hidden is True else [t for t in returned if t in hidden]
                    declared = teacher.taps()
                    if len({_safe(t) for t in taps}) != len(taps):
                        raise CacheError(f"teacher '{name}': hidden tap names {taps} collide once made file-safe")
                    for t in taps:
                        h = _to_numpy(out.hidden[t])
                        dt = _store_dtype(h, t, name, float_dtype, int_dtype,
                                          declared[t].cardinality if t in declared else 0)
                        hidden_mm[t] = np.lib.format.open_memmap(tmp / f"hidden.{_safe(t)}.npy", mode="w+",
                                                                 dtype=dt, shape=(n, *h.shape[1:]))
                if hidden and list(out.hidden) != returned:
                    raise CacheError(f"teacher '{name}': predict returned taps {list(out.hidden)} for rows among "
                                     f"{w0}..{w0 + len(win) - 1} of split '{split}', but {returned} before")
                for t in taps:
                    h = _to_numpy(out.hidden[t])
                    mm = hidden_mm[t]
                    if h.shape != (b, *mm.shape[1:]):
                        raise CacheError(f"teacher '{name}': hidden tap '{t}' has shape {h.shape} for {b} rows; "
                                         f"expected {(b, *mm.shape[1:])}")
                    if mm.dtype.kind in "iu":
                        _check_int_range(h, mm.dtype, t, name)
                    stored = h.astype(mm.dtype, copy=False)
                    if mm.dtype == np.float16:  # values above 65504 become inf: say so instead of training on it
                        f16_overflow += int(np.count_nonzero(np.isinf(stored) & np.isfinite(h)))
                    mm[at] = stored
                bar.update(b)
            release_mapped([logits_mm, *hidden_mm.values()])  # written pages: out of the resident set
    if f16_overflow:
        warnings.warn(f"teacher '{name}', split '{split}': {f16_overflow} hidden values overflow float16 and "
                      "were stored as inf; use float_dtype='float32'", RuntimeWarning, stacklevel=3)
    for mm in (logits_mm, *hidden_mm.values()):
        mm.flush()
    del mm
    hidden_files = {t: f"hidden.{_safe(t)}.npy" for t in taps}
    shapes = {"rows": ((n,), "int64"), "logits": ((n,), "float32")}
    shapes.update({f"hidden.{t}": (hidden_mm[t].shape, str(hidden_mm[t].dtype)) for t in taps})
    logits_mm = None  # noqa: F841 - drop the memmaps before hashing/moving the files
    hidden_mm.clear()
    files = {"rows": "rows.npy", "logits": "logits.npy", **{f"hidden.{t}": f for t, f in hidden_files.items()}}
    digests = file_digests(tmp, files.values())  # fsynced with the whole stage by staged_dir
    shards = {key: ShardInfo(fname, list(shapes[key][0]), shapes[key][1], (tmp / fname).stat().st_size,
                             digests[fname]) for key, fname in files.items()}
    return CacheManifest(
        format=FORMAT_VERSION, teacher=name, identity=_normalise(teacher.identity()),
        identity_hash=teacher.identity_hash(), fingerprint=ds.fingerprint, split=split, n_rows=n, shards=shards,
        taps=taps, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), appdistill_version=_version(),
        # ``hidden``: every tap the teacher returns is here (a split holding some of them serves
        # requests for those only)
        build_seconds=round(time.perf_counter() - t0, 3), hidden=bool(hidden) and taps == returned)


def _build_split(teacher: Teacher, ds: Dataset, kdir: Path, split: str, batch_size: int,
                 float_dtype: FloatDtype, int_dtype: IntDtype, progress: bool,
                 hidden: bool | list[str] = True) -> None:
    """Write one split into a stage beside ``kdir/split`` and swap it in whole (:func:`staged_dir`)."""
    with staged_dir(kdir / split) as tmp:
        man = _write_split(teacher, ds, split, tmp, batch_size, float_dtype, int_dtype, progress, hidden)
        atomic_write_text(tmp / MANIFEST, man.to_json())


def _check_args(teacher: Teacher, ds: Dataset, splits: Sequence[str], batch_size: int, float_dtype: str,
                int_dtype: str, verify: str) -> None:
    if not ds.fingerprint:
        raise CacheError("the data set has no fingerprint (build it with Dataset.build)")
    if not splits or len(set(splits)) != len(splits):
        raise CacheError(f"teacher '{teacher.name}': splits must be a non-empty list of distinct names, got "
                         f"{list(splits)}")
    unknown = [s for s in splits if s not in ds.splits]
    if unknown:
        raise CacheError(f"teacher '{teacher.name}': unknown splits {unknown} (data set has {sorted(ds.splits)})")
    if batch_size <= 0:
        raise CacheError(f"batch_size must be positive, got {batch_size}")
    if float_dtype not in ("float32", "float16"):
        raise CacheError(f"float_dtype must be 'float32' or 'float16', got {float_dtype!r}")
    if int_dtype not in ("auto", "int32", "int64"):
        raise CacheError(f"int_dtype must be 'auto', 'int32' or 'int64', got {int_dtype!r}")
    if verify not in ("size", "checksum"):
        raise CacheError(f"verify must be 'size' or 'checksum', got {verify!r}")


def build_teacher_cache(teacher: Teacher, ds: Dataset, root_dir: str | Path,
                        splits: Sequence[str] = DEFAULT_SPLITS, batch_size: int = 8192, progress: bool = True,
                        float_dtype: FloatDtype = "float32", int_dtype: IntDtype = "auto",
                        hidden: bool | tuple[str, ...] = True) -> TeacherCache:
    """Compute ``teacher``'s outputs for every row of ``splits`` and write them (replacing any old cache).

    Memory stays bounded by one chunk: each ``teacher.predict(ds, rows[i:i + batch_size])`` result is
    written straight into ``.npy`` memmaps.

    Args:
        teacher: a fitted teacher.
        ds: the data set (``ds.fingerprint`` and ``ds.splits`` key and order the cache).
        root_dir: cache root; files go to ``root_dir/<teacher.name>/<identity_hash>-<fingerprint>/<split>/``.
        splits: which splits to cache.
        batch_size: rows per ``predict`` call.
        progress: tqdm bar per split.
        float_dtype: storage dtype of float taps (logits are always float32).
        int_dtype: storage dtype of integer taps; ``"auto"`` (default) takes the smallest signed type
            holding the tap's declared cardinality (LightGBM leaf indices: int8 up to 128 leaves).
        hidden: also store the teacher's hidden taps (default). ``False`` stores the logits only, for
            methods that read nothing else (``Method.reads_hidden``): at 10M rows the taps are ~14 GB
            of a cache whose logits are 40 MB. A tuple of tap kinds (``("parts",)``) stores the taps of
            those kinds only (:class:`~appdistill.teachers.base.Tap`).

    Returns:
        The opened cache (``built`` = ``list(splits)``).
    """
    _check_args(teacher, ds, splits, batch_size, float_dtype, int_dtype, "size")
    return _get_or_build(teacher, ds, root_dir, splits, batch_size, progress, float_dtype, int_dtype, "size",
                         force=True, hidden=hidden)


def get_or_build_cache(teacher: Teacher, ds: Dataset, root_dir: str | Path,
                       splits: Sequence[str] = DEFAULT_SPLITS, batch_size: int = 8192, progress: bool = True,
                       float_dtype: FloatDtype = "float32", int_dtype: IntDtype = "auto",
                       verify: Verify = "checksum", hidden: bool | tuple[str, ...] = True) -> TeacherCache:
    """The cache of ``teacher`` on ``ds``: reused when intact, built when missing, rebuilt when corrupt.

    A reused cache costs no teacher call (its shards are hashed once per process). A corrupt split
    (size, header, rows or -- with the default ``verify="checksum"`` -- sha256 mismatch) is rebuilt with
    a :class:`CacheRebuildWarning`. A split
    stored with other dtypes than asked is rebuilt too, and so is a logits-only split when ``hidden``
    asks for the taps; with ``hidden=False`` a split holding taps is reused for its logits (the taps
    are neither hashed nor mapped). Caches of other identities / fingerprints are never touched (they
    live in other directories).

    Args: as :func:`build_teacher_cache`, plus ``verify`` (see :meth:`TeacherCache.open`).
    """
    _check_args(teacher, ds, splits, batch_size, float_dtype, int_dtype, verify)
    return _get_or_build(teacher, ds, root_dir, splits, batch_size, progress, float_dtype, int_dtype, verify,
                         force=False, hidden=hidden)


def _get_or_build(teacher: Teacher, ds: Dataset, root_dir: str | Path, splits: Sequence[str], batch_size: int,
                  progress: bool, float_dtype: FloatDtype, int_dtype: IntDtype, verify: Verify,
                  force: bool, hidden: bool | tuple[str, ...] = True) -> TeacherCache:
    t0 = time.perf_counter()
    name, ident, ihash = teacher.name, _normalise(teacher.identity()), teacher.identity_hash()
    declared = teacher.taps()
    if not isinstance(hidden, bool):  # tap kinds -> this teacher's taps of those kinds (none: logits only)
        kinds = set(hidden)
        hidden = [t for t, spec in declared.items() if spec.kind in kinds] or False
    tdir = Path(root_dir) / _safe(name)
    kdir = tdir / f"{ihash}-{ds.fingerprint}"
    built: list[str] = []
    rebuilt: dict[str, str] = {}
    with locked(tdir):
        shards: dict[str, SplitShards] = {}
        for s in splits:
            if not force:
                try:
                    sh = _open_split(kdir / s, name, ident, ds.fingerprint, s, verify, hidden)
                    if not np.array_equal(sh.rows, _split_rows(ds, s)):
                        raise CacheCorruptError(f"teacher '{name}': cache shard '{sh.path / 'rows.npy'}' does not "
                                                f"hold the rows of split '{s}'")
                    other = _dtype_change(sh, float_dtype, int_dtype, teacher)
                    lacking = [t for t in declared if t not in sh.hidden] if hidden is True else []
                    if lacking and other is None:  # built before the teacher declared these taps
                        other = f"it lacks the declared taps {lacking}"
                    if other is None:
                        shards[s] = sh
                        continue
                    log.info("teacher '%s', split '%s': %s; rebuilding", name, s, other)  # asked for, not a fault
                except CacheMissingError as e:
                    if (kdir / s).is_dir():  # a logits-only split, the taps asked for now
                        log.info("%s; rebuilding", e)
                except (CacheCorruptError, CacheMismatchError) as e:
                    # a mismatch *inside* the keyed directory means an edited manifest: never reuse it
                    warnings.warn(f"{e}; rebuilding", CacheRebuildWarning, stacklevel=3)
                    log.warning("%s; rebuilding", e)
                    rebuilt[s] = str(e)
            _build_split(teacher, ds, kdir, s, batch_size, float_dtype, int_dtype, progress, hidden)
            built.append(s)
            shards[s] = _open_split(kdir / s, name, ident, ds.fingerprint, s, "size", hidden)
    cache = TeacherCache(name, ident, ds.fingerprint, kdir, shards)
    cache.built, cache.rebuilt, cache.seconds = built, rebuilt, time.perf_counter() - t0
    return cache


def _dtype_change(sh: SplitShards, float_dtype: str, int_dtype: str, teacher: Teacher) -> str | None:
    """Which tap is stored with another dtype than asked (``None`` = reuse the split)."""
    declared = teacher.taps() if int_dtype == "auto" else {}
    for t, h in sh.hidden.items():
        if h.dtype.kind == "f":
            want = float_dtype
        elif h.dtype.kind in "iu":
            want = str(_int_dtype(int_dtype, declared[t].cardinality if t in declared else 0))
        else:
            want = str(h.dtype)
        if str(h.dtype) != want:
            return f"tap '{t}' is stored as {h.dtype}, {want} was asked"
    return None
