"""Atomic writes, checksummed checkpoints, verified file hashes and run-directory locks.

- Atomic writes: write a temporary file in the target directory, fsync, then ``os.replace``. A crash
  leaves either the old file or the new one, never half of one.
- Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) carry a sha256 of their *content*
  (structure, keys, scalars and every tensor's bytes) under the key ``"checksum"``: ``torch.load``
  does not check the zip's CRCs, so one flipped byte in a tensor would otherwise load (and be
  exported) without a word. The digest is over the content, not the file, so the file stays a
  plain ``torch.save`` dict that ``torch.load(..., weights_only=True)`` reads as before.
- :func:`sha256_verified`: a file's sha256, computed once per file per process (the teacher-output
  cache verifies its shards on every open with it).
- :func:`run_lock`: one writer per run directory (train, distill, export).
- The store kernel, shared by the teacher cache, the embedding store, saved teachers and exports:
  :func:`staged_dir` (write a directory's files into a stage beside it, swap it in whole on success,
  remove it on failure) and :func:`file_digests` / :func:`digest_problem` (the sha256 of each file,
  recorded in a manifest when written and checked before anything is read).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def directory_in_the_way(paths: Sequence[str | Path]) -> None:
    """Refuse (``AppDistillError``, naming it) the first of ``paths`` that exists and is not a file: a
    command that writes there would fail at its end, after the work, with the rename's traceback."""
    from appdistill.errors import AppDistillError

    for p in paths:
        if Path(p).exists() and not Path(p).is_file():
            raise AppDistillError(f"file '{p}': a directory (or other non-file) is where this command writes a "
                                  "file; remove or rename it")


def _atomic(path: Path, write: Any) -> None:
    directory_in_the_way([path])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


CHECKSUM_KEY = "checksum"


def json_digest(obj: Any, length: int | None = None) -> str:
    """sha256 of ``obj`` as sorted-key JSON (non-JSON values by ``str``), hex, first ``length`` digits.

    The one hash behind every identity key: cache directories, teacher identities, encoder configs,
    bench run directories, synthetic-data cache names.
    """
    import json

    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length] if length else digest


def content_digest(obj: Any) -> str:
    """``"sha256:<hex>"`` of a checkpoint's content: dict keys (sorted), list/tuple order, scalars by type
    and value, tensors by dtype, shape and bytes. Independent of how ``torch.save`` lays out the zip."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def _feed(h: Any, o: Any) -> None:
    if isinstance(o, torch.Tensor):
        t = o.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, any dtype (bf16 too)
    elif isinstance(o, dict):
        h.update(f"D{len(o)};".encode())
        for k in sorted(o, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, o[k])
    elif isinstance(o, (list, tuple)):
        h.update(f"{'L' if isinstance(o, list) else 'U'}{len(o)};".encode())
        for x in o:
            _feed(h, x)
    else:  # str, int, float (repr round-trips exactly), bool, None
        h.update(f"S{type(o).__name__}:{o!r};".encode())


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """``torch.save`` atomically, with a content checksum under ``"checksum"`` (tensors, dicts, lists, str
    and numbers only: loadable with weights_only)."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    data = {**body, CHECKSUM_KEY: content_digest(body)}
    _atomic(Path(path), lambda f: torch.save(data, f))


class ChecksumWarning(RuntimeWarning):
    """A checkpoint written before checkpoints carried a checksum: its content cannot be verified."""


def load_checkpoint(path: str | Path, warn_unverified: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` (never unpickles arbitrary objects), then the content checksum.

    Returns the checkpoint dict without its ``"checksum"`` entry. A file without one (written by an
    older appdistill, or a plain ``torch.save`` such as a teacher's weights, which its identity hash
    checks) is returned as is; ``warn_unverified`` says so with a :class:`ChecksumWarning`.

    Raises:
        AppDistillError: missing, unreadable/truncated, or content that fails its checksum (a flipped
            byte on disk, an edit): such a checkpoint is never used.
    """
    from appdistill.errors import AppDistillError

    path = Path(path)
    if not path.is_file():
        raise AppDistillError(f"file '{path}': checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AppDistillError(f"file '{path}': checkpoint is unreadable or truncated ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict):
        return ck
    want = ck.pop(CHECKSUM_KEY, None)
    if want is None:
        if warn_unverified:  # a run from before checkpoints were checksummed: usable, but say so
            warnings.warn(f"file '{path}': checkpoint has no checksum (written by an older appdistill); its "
                          "content cannot be verified", ChecksumWarning, stacklevel=2)
        return ck
    got = content_digest(ck)
    if got != want:
        raise AppDistillError(f"file '{path}': checkpoint fails its checksum (content {got[:19]}..., recorded "
                              f"{str(want)[:19]}...): corrupted on disk or edited after it was written; it is not "
                              "used. Restore it from a backup or re-run training")
    return ck


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (stores, caches and exports checksum their files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _make_directory(directory: str | Path) -> Path:
    """``directory`` created if needed (with its parents); a clear error where it cannot be."""
    from appdistill.errors import AppDistillError

    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise AppDistillError(f"run directory '{d}' exists and is not a directory; choose another --run-dir")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only file system
        raise AppDistillError(f"run directory '{d}': cannot be created ({e.strerror or e}: '{e.filename or d}')") from e
    return d


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Exclusive lock on ``directory`` (created if needed) so two processes never build the same store or
    cache at once. Without POSIX ``fcntl`` it does nothing: atomic replaces still keep each file whole."""
    d = _make_directory(directory)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(d / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------- verified hashes
_VERIFIED: dict[tuple[Any, ...], str] = {}
#: a file changed less than this long before it was hashed is not memoised: a later write within the
#: file system's timestamp granularity could leave size and mtime as they were ("racy git")
_RACY_NS = 2_000_000_000


def sha256_verified(path: str | Path) -> str:
    """:func:`sha256_file`, computed once per file per process.

    Later calls reuse the digest while the file's device, inode, size, mtime and ctime are those it had
    when it was hashed; any write changes mtime/ctime (or the inode, for an atomic replace), so an
    edited file is hashed again. Files modified in the last 2 seconds are always hashed.
    """
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        now = time.time_ns()
        digest = sha256_file(p)
        if st.st_mtime_ns + _RACY_NS < now:  # any later write sets mtime (and ctime) past this: a new key
            _VERIFIED[key] = digest
    return digest


# ---------------------------------------------------------------------------------------- run-directory lock
_HELD: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [fd, depth]: locks this process holds
_HELD_MUTEX = threading.Lock()


def _busy_error(d: Path, ino: int, what: str) -> Exception:
    from appdistill.errors import AppDistillError

    return AppDistillError(
        f"run directory '{d}' is in use by another appdistill process{_holder(ino)}: refusing to {what} into it "
        "(two writers would both claim it). Wait for that process to finish, or choose another directory")


def _holder(ino: int) -> str:
    """`` (pid N)`` of the process holding a flock on inode ``ino``, from /proc/locks (best effort)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
            i = parts.index("FLOCK") if "FLOCK" in parts else -1
            if i >= 0 and parts[i + 4].rsplit(":", 1)[-1] == str(ino):
                return f" (pid {parts[i + 3]})"
    return ""


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so ``path`` cannot be created), else ``None``."""
    above = next((p for p in Path(path).absolute().parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


@contextlib.contextmanager
def run_lock(directory: str | Path, what: str = "write") -> Iterator[None]:
    """:func:`_run_lock`; a directory it created is removed again (with the parents it created) when the
    block fails before anything was written into it, so a refused command leaves no empty run directory."""
    d = Path(directory)
    created = [p for p in (d, *d.parents) if not p.exists()]  # what the lock's mkdir is about to create
    try:
        with _run_lock(d, what):
            yield
    except BaseException:
        for p in created:  # innermost first; stops at the first one that holds something
            try:
                p.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def _run_lock(directory: str | Path, what: str = "write") -> Iterator[None]:
    """Exclusive, non-blocking lock on a run directory (created if needed) for its writers.

    A second writer (another ``train``/``distill``/``export`` on the same directory) fails at once with
    an :class:`~appdistill.errors.AppDistillError` (CLI exit 2) instead of both claiming the directory.

    ``flock`` on the directory itself: no lock file is created, so a refused command leaves the
    directory byte for byte as it was, and the kernel drops the lock when its holder dies (a
    ``kill -9``'d run never blocks the next one). Re-entrant within a process (``distill`` ->
    ``train`` -> ``export``). Where directories cannot be flocked (some network file systems) a
    ``.appdistill.lock`` file inside it is locked instead; without ``fcntl`` it does nothing.
    """
    d = _make_directory(directory)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes still keep every file whole
        yield
        return
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _HELD_MUTEX:
        if key in _HELD:
            _HELD[key][1] += 1
            os.close(fd)
        else:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _busy_error(d, st.st_ino, what) from None
                except OSError:  # no flock on directories here: lock a file inside instead
                    os.close(fd)
                    fd = os.open(d / ".appdistill.lock", os.O_RDWR | os.O_CREAT, 0o644)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise _busy_error(d, os.fstat(fd).st_ino, what) from None
            except BaseException:
                os.close(fd)
                raise
            _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        with _HELD_MUTEX:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # closing the descriptor releases the flock


# ---------------------------------------------------------------------------------------- the store kernel
def fsync_dir(d: str | Path) -> None:
    """Make the renames inside ``d`` durable (best effort: not possible on every platform)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _claim(d: Path) -> int:
    """Open and ``flock`` a stage this process created: while the descriptor is open the stage is in use;
    once its writer ends or dies the lock is gone and :func:`clean_stale` may remove it."""
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def clean_stale(final: str | Path) -> None:
    """Remove the stages (``.<name>.*.tmp``) and replaced copies (``.<name>.*.old``) of ``final`` that a
    killed writer left behind; one whose lock is held belongs to a live writer and is left alone."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    try:
        import fcntl
    except ImportError:
        return
    for p in final.parent.iterdir():
        if not (p.name.startswith(f".{final.name}.") and p.name.endswith((".tmp", ".old")) and p.is_dir()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(d)


def swap_dir(stage: Path, final: Path) -> None:
    """Move the finished ``stage`` directory to ``final``, replacing what was there (two renames when
    ``final`` is a non-empty directory: at no point does ``final`` hold a mix of old and new files)."""
    _fsync_tree(stage)
    if not final.exists():
        os.rename(stage, final)
    elif final.is_dir() and not any(final.iterdir()):
        os.replace(stage, final)  # an empty directory is replaced atomically
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        fd = _claim(old)
        try:
            os.rename(final, old / "x")
            os.rename(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    fsync_dir(final.parent)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A fresh stage beside ``final``; when the block ends without an error it replaces ``final`` whole,
    and it is removed either way. How every store here writes a directory: a crash leaves the old
    directory (or none), never half of a new one, and the stale stage is removed by the next writer.

    Example:
        >>> with staged_dir(run / "teachers" / "dlrm") as stage:
        ...     teacher.save(stage)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    fd = _claim(stage)
    try:
        yield stage
        swap_dir(stage, final)
    finally:
        os.close(fd)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def file_digests(d: str | Path, names: Any) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` (paths relative to ``d``): what a manifest records."""
    return {str(n): sha256_file(Path(d) / n) for n in names}


def digest_problem(d: str | Path, digests: dict[str, str], sizes: dict[str, int] | None = None) -> str | None:
    """The first file named in ``digests`` or ``sizes`` (a manifest's records) that is missing, of the
    wrong size or whose sha256 differs (``"file 'PATH' ..."``); ``None`` when all match. Hashes are
    memoised per process (:func:`sha256_verified`)."""
    sizes = sizes or {}
    for name in {**sizes, **digests}:
        p = Path(d) / name
        if not p.is_file():
            return f"file '{p}' is missing"
        if name in sizes and p.stat().st_size != sizes[name]:
            return f"file '{p}' has {p.stat().st_size} bytes, not {sizes[name]} (truncated?)"
        if name in digests and sha256_verified(p) != digests[name]:
            return f"file '{p}' does not match its checksum (sha256; edited, truncated or corrupted)"
    return None


def release_mapped(maps: Sequence[Any]) -> None:
    """``madvise(MADV_DONTNEED)`` over each ``np.memmap`` in ``maps``: unmap its resident pages.

    Safe for shared file mappings, read or written: their pages (dirty ones included) stay in the
    page cache and reach the file; only this process's mapping of them is dropped.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    for m in maps:
        mm = getattr(m, "_mmap", None)
        if advice is not None and mm is not None and not mm.closed:
            mm.madvise(advice)
