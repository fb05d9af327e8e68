"""Atomic writes: write a temporary file in the target directory, fsync, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write: Any) -> None:
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


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """``torch.save`` atomically (tensors, dicts, lists, str and numbers only: loadable with weights_only)."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: never unpickles arbitrary objects."""
    from appdistill.errors import AppDistillError

    path = Path(path)
    if not path.is_file():
        raise AppDistillError(f"file '{path}': checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AppDistillError(f"file '{path}': checkpoint is unreadable or truncated ({type(e).__name__}: {e})") from e


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (stores, caches and exports checksum their files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Exclusive lock on ``directory`` (created if needed) so two processes never build the same store or
    cache at once. Without POSIX ``fcntl`` it does nothing: atomic replaces still keep each file whole."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
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
