"""Small file-system helpers shared by every module that writes or checks files."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from cmgems.errors import InputError

log = logging.getLogger("cmgems")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds.

    Durable as git and sqlite publish a file: the new file's data is fsynced before the rename
    (else a node crash can leave `path` naming an empty file) and the directory after it (else
    the rename itself can be lost). A few milliseconds per file on a disk (docs/faults.md)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockHeld(InputError):
    """Another live process holds the lock: two writers must never share one output."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock file `path` for the block, or raise LockHeld naming the holder's pid and host.

    The lock is the kernel's flock on the file, so it dies with its process (kill -9 included): a
    lock file whose owner is gone is simply taken over, with a warning naming the old owner. The
    file records pid, host and start time for the next process's message, and is removed on exit.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = _holder(path)
            raise LockHeld(f"{path}: {what} is in use by pid {h.get('pid', '?')} on host "
                           f"{h.get('host', '?')} (since {h.get('since', '?')}); wait for it to "
                           f"end, or use another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock
    old = _holder(path)
    if old.get("pid"):
        log.warning("%s: taking over the lock of pid %s on host %s, which is no longer running",
                    path, old.get("pid"), old.get("host", "?"))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    try:
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
