"""The store kernel every store writes through (teacher cache, embedding store and its pool, saved
teachers, exports): a directory is replaced whole or not at all, and its files are checked against the
sha256 recorded when they were written."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from appdistill.errors import AppDistillError
from appdistill.io import atomic_write_text, digest_problem, file_digests, run_lock, staged_dir


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_staged_dir_replaces_a_directory_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "store"
    with staged_dir(final) as stage:
        (stage / "a.npy").write_bytes(b"one")
        (stage / "sub").mkdir()
        (stage / "sub" / "b.json").write_text("{}")
    assert _tree(final) == {"a.npy": b"one", "sub/b.json": b"{}"}
    with pytest.raises(RuntimeError), staged_dir(final) as stage:
        (stage / "a.npy").write_bytes(b"two")
        raise RuntimeError("killed half way")
    assert _tree(final) == {"a.npy": b"one", "sub/b.json": b"{}"}  # the old directory, untouched
    with staged_dir(final) as stage:
        (stage / "c.txt").write_text("new")
    assert _tree(final) == {"c.txt": b"new"}  # no file of the old directory survives a replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_stages_of_killed_writers_are_removed_but_a_live_one_is_not(tmp_path: Path) -> None:
    final = tmp_path / "store"
    dead, old = tmp_path / ".store.k1ll3d.tmp", tmp_path / ".store.0ld.old"
    live = tmp_path / ".store.l1ve.tmp"
    for d in (dead, old, live):
        (d / "x").mkdir(parents=True)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process still writing
    try:
        with staged_dir(final) as stage:
            (stage / "f").write_text("ok")
        assert not dead.exists() and not old.exists() and live.exists()
    finally:
        os.close(fd)
    with staged_dir(final) as stage:
        (stage / "f").write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_file_digests_and_digest_problem_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"def")
    digests = file_digests(tmp_path, ["a.bin", "b.bin"])
    assert digest_problem(tmp_path, digests) is None
    (tmp_path / "b.bin").write_bytes(b"deF")  # same size, one byte changed
    assert "b.bin' does not match its checksum" in digest_problem(tmp_path, digests)
    (tmp_path / "a.bin").write_bytes(b"ab")
    assert "a.bin' has 2 bytes, not 3 (truncated?)" in digest_problem(tmp_path, digests, {"a.bin": 3})
    (tmp_path / "a.bin").unlink()
    assert "a.bin' is missing" in digest_problem(tmp_path, digests)


def test_run_lock_removes_the_empty_directories_it_created_when_the_command_fails(tmp_path: Path) -> None:
    """A command refused after taking the lock (bad data found while loading) leaves no empty run directory."""
    with pytest.raises(ValueError), run_lock(tmp_path / "a" / "run"):
        raise ValueError("bad table")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ValueError), run_lock(kept):  # it existed before: left alone
        raise ValueError("bad table")
    assert kept.is_dir()
    with pytest.raises(ValueError), run_lock(tmp_path / "partial"):  # something was written: kept
        (tmp_path / "partial" / "config.yaml").write_text("x")
        raise ValueError("failed later")
    assert (tmp_path / "partial" / "config.yaml").is_file()
    with run_lock(tmp_path / "ok"):
        pass
    assert (tmp_path / "ok").is_dir()


def test_atomic_write_onto_a_directory_is_refused_and_leaves_it(tmp_path: Path) -> None:
    (tmp_path / "metrics.json" / "inner").mkdir(parents=True)
    with pytest.raises(AppDistillError, match="metrics.json': a directory"):
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["inner", "metrics.json"]  # no temp file left
