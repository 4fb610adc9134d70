"""Durable writes, in one place: a file either absent, old or complete (write, fsync, rename, fsync
the folder), fsync of files, folders and trees, the one message for a failed write, and the
points where a crash test may stop the process (a hook only tests install)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

from .errors import OutputError

fault_hook: Callable[[str, int], None] | None = None  # set by crash tests (tests/crash_at.py), never by the tool


def fault_point(point: str, count: int) -> None:
    """A place a crash test may kill the run: "units" once `count` work units are recorded as
    done, "stats" once `count` statistics rounds are saved."""
    if fault_hook is not None:
        fault_hook(point, count)


def write_failed(path: str, e: OSError) -> OutputError:
    """The one message for a failed write: what failed and how to continue."""
    return OutputError(f"{path}: write failed ({e.strerror or e}); free space or fix the cause, then rerun with --resume")


def write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(fd, view[done:])


def write_atomic(path: str, data: bytes) -> None:
    """Write a file so that it is either absent, the old version or complete: write a temporary
    file, fsync it, rename it over `path`, fsync the folder."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_failed(path, e) from None


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    _fsync(path, 0)


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    _fsync(folder or ".", os.O_DIRECTORY)


def fsync_tree(folder: str) -> None:
    """Make a written folder durable: its files, then its folders."""
    for root, _, files in os.walk(folder):
        for f in files:
            fsync_file(os.path.join(root, f))
        fsync_dir(root)
