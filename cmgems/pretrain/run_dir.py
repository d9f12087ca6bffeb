"""A training's output directory: one training at a time, nothing left behind by a run that
failed, and exports that appear whole or not at all.

Rank 0 holds the run's lock file (RunLayout.lock, through cmgems.io.exclusive_lock) from before
the first check until the run ends; a second training into the same directory fails on every
rank with the holder's pid and host. The kernel drops the lock with its process, so the lock of a
killed run is taken over (with a warning) by the next one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from cmgems.pretrain import checkpoint, distributed
from cmgems.errors import InputError
from cmgems.io import exclusive_lock
from cmgems.pretrain.layout import RunLayout


class RunDir:
    def __init__(self, out: Path, is_main: bool):
        self.out, self.is_main = out, is_main
        self.layout = RunLayout(out)
        self.ckpt_dir = self.layout.checkpoints
        self._held = contextlib.ExitStack()
        self._created: list[Path] = []   # directories this run made, outermost first

    def _mkdir(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{path}: cannot create the run directory "
                             f"({e.strerror or e})") from None
        self._created += missing

    def acquire(self, resume: bool) -> None:
        """Lock the directory and refuse to start over an earlier run's checkpoints without
        --resume (collective: every rank raises rank 0's error)."""
        def take():
            self._mkdir(self.out)
            self._held.enter_context(exclusive_lock(self.layout.lock, f"run directory {self.out}"))
            checkpoint.refuse_earlier_run(self.out, self.ckpt_dir, resume)
            self._mkdir(self.ckpt_dir)
        distributed.on_main(take, self.is_main, catch=(InputError,))

    def release(self, failed: bool) -> None:
        """Drop the lock; after a failure also the directories this run made and left empty, and
        an empty checkpoints/ (nothing in it could be resumed)."""
        self._held.close()
        if not failed or not self.is_main:
            return
        for path in [*reversed(self._created), self.ckpt_dir]:
            try:
                path.rmdir()   # only if empty
            except OSError:
                pass


def publish_dir(build, dest: Path) -> Path:
    """Run build(tmp) to fill a temporary sibling of `dest`, then put it in place of `dest` in
    one rename (a kill leaves the old `dest` or the new, never a mix). Returns dest."""
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    old = dest.with_name(f".old-{os.getpid()}-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest
