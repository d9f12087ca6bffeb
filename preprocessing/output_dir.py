"""The output directory of a build (and of the job array's finish): one writer at a time, up
to date or refused, written into a hidden sibling and published whole by renames.

  Interrupts / INTERRUPTS  SIGINT and SIGTERM remembered, so an interrupted build never publishes,
                           and deferred while a publish renames
  output_lock              OUT_DIR held by one build at a time; leftovers of killed builds
  check_target             up to date, refused, or free to write
  Staging                  the hidden sibling written into, then published, manifest last
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from cmgems.errors import InputError
from cmgems.io import exclusive_lock, sha256_file
from cmgems.data.layout import DATASET_FILES, MANIFEST_NAME, TABLE_NAME
from cmgems.data.shards import FORMAT_VERSION, Manifest, ShardError, verify

PARTIAL_TAG = ".partial-"
OLD_TAG = ".replaced-"     # a dataset being replaced, set aside until the new one is in place

log = logging.getLogger("cmgems.preprocessing")


class Interrupts:
    """SIGINT/SIGTERM raise KeyboardInterrupt as usual, and are also remembered: Python drops
    an exception raised inside a finalizer or fork hook, so the build checks `check()` after
    every piece and before publishing, and an interrupted build never publishes.

    Inside `deferred()` (the renames that publish a dataset) a signal is only remembered, and
    raised once the block is done: a publish is never left half-way by Ctrl-C. `published` is
    the directory published last, so the message after an interrupt can tell the truth.
    """

    def __init__(self):
        self.received: int | None = None
        self.saved = {}
        self.deferring = False
        self.published: Path | None = None

    def __enter__(self):
        self.received, self.published = None, None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if first and not self.deferring:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.check()

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved, self.received = {}, None


INTERRUPTS = Interrupts()   # active while a dataset is written; check() is a no-op outside it


def _up_to_date(out_dir: Path, params: dict, source_sha: str) -> Manifest | None:
    try:
        m = Manifest.load(out_dir)
        # a manifest from before --sampling existed was cut by the DNABERT rule
        if {"sampling": "dnabert", **m.params} != params or m.source.get("sha256") != source_sha:
            return None
        verify(out_dir, m)
        if sha256_file(out_dir / TABLE_NAME) != m.npmi_table_sha256:
            return None
    except (ShardError, OSError):
        return None
    return m


def _describe_difference(out: Path, params: dict, source_sha: str) -> str:
    try:
        m = Manifest.load(out)
    except ShardError:
        if not (out / MANIFEST_NAME).is_file():
            return "it is not empty and holds no finished dataset"
        try:
            version = json.loads((out / MANIFEST_NAME).read_text()).get("format_version")
        except (OSError, ValueError, AttributeError):
            version = None
        if version != FORMAT_VERSION and isinstance(version, int):
            return (f"it holds a dataset of format version {version} (this cmgems reads and "
                    f"writes version {FORMAT_VERSION})")
        return f"it holds an invalid {MANIFEST_NAME}"
    diff = [k for k in params if m.params.get(k) != params[k]]
    if m.source.get("sha256") != source_sha:
        diff.insert(0, f"source ({m.source.get('name')})")
    if not diff:
        return "its files differ from its manifest"
    return "it holds a dataset built with different " + ", ".join(diff)


def check_target(out_dir: Path, overwrite: bool, params: dict, source_sha: str, out=sys.stdout,
                 overwrite_flag: str = "--overwrite") -> Manifest | None:
    """The finished dataset if OUT_DIR already holds exactly this one ("up to date"), None if it
    may be written; refuses a non-empty OUT_DIR holding anything else unless `overwrite`."""
    if (m := _up_to_date(out_dir, params, source_sha)) is not None:
        print(f"{out_dir}: up to date ({len(m.shards)} shards, nothing rewritten)", file=out)
        return m
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir}: refusing to write: "
                             f"{_describe_difference(out_dir, params, source_sha)}; "
                             f"pass {overwrite_flag} to replace it")
        if foreign := _foreign_files(out_dir):
            raise InputError(f"{out_dir}: refusing to replace: it holds "
                             f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                             f"which are not part of a dataset and would be deleted with it; "
                             f"move them out first")
    return None


def _cannot_create(out_dir: Path, e: OSError) -> InputError:
    at = Path(out_dir).absolute()
    while not at.exists() and at != at.parent:
        at = at.parent
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and not at.is_dir():
        reason = f"{at} is a file, not a directory"
    else:
        reason = e.strerror or str(e)
    return InputError(f"{out_dir}: cannot create the output directory ({reason})")


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[Path]:
    """Hold OUT_DIR for a whole build (or the array's finish): its parent is created, the lock
    file .OUT_DIR.lock beside it is taken (cmgems.io.exclusive_lock: a second build into the same
    OUT_DIR fails naming the holder's pid and host; a dead holder's lock is taken over), and what
    killed builds left beside OUT_DIR is set right: hidden partial directories are removed, and
    a dataset set aside by a publish killed between its two renames is put back. Yields OUT_DIR
    resolved. An OSError while creating the parent or the lock (a file in the way, a read-only
    directory, a name too long) becomes an InputError naming OUT_DIR."""
    out = Path(out_dir).resolve()     # "." or "x/" still has a parent and a name
    with contextlib.ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(out.parent / f".{out.name}.lock",
                                               f"the dataset directory {out_dir}"))
            _set_right(out)
        except OSError as e:
            raise _cannot_create(out_dir, e) from None
        yield out


def _set_right(out: Path) -> None:
    """Under the lock, anything beside OUT_DIR from a build of it was left by a dead process."""
    for left in out.parent.glob(f".{out.name}{OLD_TAG}*"):
        if out.exists():
            shutil.rmtree(left, ignore_errors=True)     # the new dataset was published
        else:
            log.warning("%s: putting back the dataset that an interrupted --overwrite set "
                        "aside as %s", out, left.name)
            os.replace(left, out)
    for left in out.parent.glob(f".{out.name}{PARTIAL_TAG}*"):
        shutil.rmtree(left, ignore_errors=True)


def _foreign_files(out: Path) -> list[str]:
    """Entries of OUT_DIR that are not a dataset's (replacing OUT_DIR would delete them)."""
    ours = {p.name for pattern in DATASET_FILES for p in out.glob(pattern)}
    return sorted(p.name for p in out.iterdir() if p.name not in ours)


class Staging:
    """A hidden sibling of OUT_DIR (`dir`) that a dataset is written into and then published
    from, manifest last: OUT_DIR itself never holds a manifest for partial data. Used under
    output_lock. A block that fails removes `dir` again, and an OSError in it (a full disk, a
    read-only directory) becomes an InputError naming OUT_DIR."""

    def __init__(self, out_dir: Path):
        self.out = out_dir.resolve()
        self.dir = self.out.parent / f".{self.out.name}{PARTIAL_TAG}{os.getpid()}"

    def __enter__(self) -> "Staging":
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.mkdir()
        except OSError as e:
            raise _cannot_create(self.out, e) from None
        return self

    def __exit__(self, exc_type, e, tb) -> None:
        if exc_type is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise InputError(f"{self.out}: cannot write the dataset ({e.strerror or e})") from None

    def publish(self, manifest: Manifest) -> None:
        """Save the manifest, then (unless interrupted) put the finished directory in OUT_DIR's
        place by renames: an old dataset there is renamed aside first and removed once the new
        one is in place. Signals wait until this is done, so OUT_DIR always holds the old
        dataset or the new one, whole."""
        manifest.save(self.dir)
        INTERRUPTS.check()
        work, out = self.dir, self.out
        replacing = out.exists() and any(out.iterdir())
        if replacing and (foreign := _foreign_files(out)):     # appeared during the build
            raise InputError(f"{out}: refusing to replace: it holds {', '.join(foreign[:5])}"
                             f"{' ...' if len(foreign) > 5 else ''}, which are not part of a "
                             f"dataset and would be deleted with it; move them out first")
        with INTERRUPTS.deferred():
            if not replacing:
                os.replace(work, out)       # one rename: the dataset appears whole
            else:
                aside = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
                os.replace(out, aside)
                os.replace(work, out)
                shutil.rmtree(aside)
            INTERRUPTS.published = out
