"""Checkpoints: DeepSpeed's per-rank files under checkpoints/<tag>/, our record of them and our
pointer.

A save: every rank writes its DeepSpeed files; once all have (a collective that also carries any
rank's failure), rank 0 writes `<tag>/complete.json` (step, every file's size, the dataset's
manifest checksum, the config) and then moves `checkpoints/latest_complete` to the tag, both
atomically. A checkpoint killed half-way therefore has no record and is never pointed to; a
checkpoint whose files were cut short later no longer matches its record.

Resuming reads the pointer and refuses, naming the file and the newest complete checkpoint, a
pointer that is unreadable, empty, names no checkpoint, or names one whose files do not match its
record: a damaged pointer must never look like "no checkpoint yet" (a restart from step 0 whose
pruning would then delete the valid checkpoints). Pruning keeps the newest `keep` complete
checkpoints and never touches the one just written.

Fault injection (tests, docs/faults.md): CMGEMS_FAULT_PAUSE_CHECKPOINT=SECONDS[@STEP] makes every
rank sleep after its DeepSpeed files are written and before the pointer moves (at every checkpoint,
or only at STEP), so that a kill -9 can land reliably "during a checkpoint write".
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import shutil
import time
from pathlib import Path

from cmgems.pretrain import distributed
from cmgems.errors import InputError
from cmgems.io import atomic_path

log = logging.getLogger("cmgems")

POINTER = "latest_complete"
RECORD = "complete.json"
FAULT_PAUSE_ENV = "CMGEMS_FAULT_PAUSE_CHECKPOINT"
_TAG = re.compile(r"step_(\d{8,})")
# Free space below which a failed write is reported as a full disk: the write that failed took
# the last of it, and what is left is filesystem slack.
FULL_DISK_BYTES = 64 << 20


class CheckpointError(InputError):
    """A checkpoint directory that cannot be resumed from as it is, or a checkpoint that could not
    be written; the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(_TAG.fullmatch(tag).group(1))


def _tags(ckpt_dir: Path) -> list[str]:
    """Every step_* directory, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if _TAG.fullmatch(p.name) and p.is_dir()),
                  key=step_of)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag the pointer names, if that directory exists (no checks: for watching a run)."""
    pointer = Path(ckpt_dir) / POINTER
    try:
        tag = pointer.read_text().strip()
    except OSError:
        return None
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def holds_checkpoints(ckpt_dir: str | Path) -> bool:
    """A pointer or any step directory: what a fresh run must not write over."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / POINTER).exists() or bool(_tags(ckpt_dir))


def refuse_earlier_run(out: Path, ckpt_dir: Path, resume: bool) -> None:
    """Raise InputError when a fresh run (no --resume) would write over an earlier run's
    checkpoints in `ckpt_dir`, the checkpoints of run directory `out`."""
    if not resume and holds_checkpoints(ckpt_dir):
        raise InputError(f"{out}: holds checkpoints of an earlier run; pass --resume to continue "
                         f"it, or choose another --output-dir")


def _files(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != RECORD}


def read_record(tag_dir: str | Path) -> dict | None:
    try:
        record = json.loads((Path(tag_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def damage(tag_dir: str | Path) -> str | None:
    """Why the checkpoint in tag_dir is not complete (its record missing or its files not those
    recorded), or None."""
    tag_dir = Path(tag_dir)
    record = read_record(tag_dir)
    if record is None:
        return f"record {tag_dir / RECORD} is missing or unreadable (the write was interrupted)"
    for rel, size in record["files"].items():
        path = tag_dir / rel
        try:
            actual = path.stat().st_size
        except OSError:
            return f"file {path} is missing"
        if actual != size:
            return f"file {path} is truncated or altered ({actual} bytes, {size} when written)"
    return None


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags of the complete checkpoints, newest first."""
    return [t for t in reversed(_tags(Path(ckpt_dir))) if damage(Path(ckpt_dir) / t) is None]


def _instead(ckpt_dir: Path, bad: str | None = None) -> str:
    """What the user can do: point at the newest complete checkpoint, or start elsewhere."""
    good = [t for t in complete_tags(ckpt_dir) if t != bad]
    pointer = ckpt_dir / POINTER
    if good:
        return (f"the newest complete checkpoint is {good[0]}: `echo {good[0]} > {pointer}` "
                f"resumes from it")
    return (f"no complete checkpoint is left in {ckpt_dir}: remove it to start again from "
            f"step 0, or use another --output-dir")


def resumable_tag(ckpt_dir: str | Path) -> str | None:
    """The tag --resume continues from; None when the run never completed a checkpoint (killed
    before its first one: a fresh start). Raises CheckpointError for a damaged pointer."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / POINTER
    if not pointer.exists():
        if complete_tags(ckpt_dir):
            raise CheckpointError(f"{pointer}: missing, although {ckpt_dir} holds complete "
                                  f"checkpoints; {_instead(ckpt_dir)}")
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({e}); {_instead(ckpt_dir)}") from None
    if not tag:
        raise CheckpointError(f"{pointer}: empty; {_instead(ckpt_dir)}")
    if not _TAG.fullmatch(tag):
        raise CheckpointError(f"{pointer}: names {tag[:80]!r}, not a checkpoint tag "
                              f"(step_NNNNNNNN); {_instead(ckpt_dir)}")
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{pointer}: names {tag}, which does not exist; "
                              f"{_instead(ckpt_dir)}")
    if not (tag_dir / RECORD).exists() and any(tag_dir.glob("*model_states.pt")):
        log.warning("%s: written before checkpoints carried a record of their files; its files "
                    "cannot be checked before loading", tag_dir)
        return tag
    reason = damage(tag_dir)
    if reason:
        raise CheckpointError(f"{pointer}: names {tag}, whose {reason}; "
                              f"{_instead(ckpt_dir, tag)}")
    return tag


def check_compatible(ckpt_dir: Path, saved: dict, now: dict, fields, data: dict,
                     identity: dict) -> None:
    """Raise InputError unless a checkpoint may be continued by this run.

    Args:
        ckpt_dir: the checkpoints directory (named in the message).
        saved: the config the checkpoint was made with (PretrainConfig.to_dict()).
        now: this run's config, the same form.
        fields: the fields a resumed run must keep (cmgems.options.resume_fields).
        data: the checkpoint's dataset identity; identity: this run's (data_identity()).
    """
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in fields if k in saved and saved[k] != now[k]]
    if diff:
        raise InputError(f"{ckpt_dir}: the checkpoint was made with another config ("
                         + "; ".join(diff) + "); resume with the original settings")
    if data.get("manifest_checksum") not in (None, identity["manifest_checksum"]):
        raise InputError(
            f"{ckpt_dir}: the checkpoint was trained on the dataset in "
            f"{data.get('data_dir', '?')} (manifest checksum "
            f"{data['manifest_checksum'][:12]}), not on {identity['data_dir']} (manifest "
            f"checksum {identity['manifest_checksum'][:12]}); resume with --data-dir "
            f"{data.get('data_dir', '?')}")


def data_identity(manifest_checksum: str, data_dir: str | Path) -> dict:
    """What a checkpoint records of its dataset, to refuse resuming it on another."""
    return {"manifest_checksum": manifest_checksum, "data_dir": str(Path(data_dir).resolve())}


def write_failure(err: BaseException, directory: Path) -> str:
    """Why a write into `directory` failed, in the user's terms. torch.save reports a full disk
    only as 'unexpected pos' (the errno is lost), so the free space is measured here: the
    failed write has just taken the last of it."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full ({os.strerror(e.errno)})"
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < FULL_DISK_BYTES:
        return f"disk full ({free >> 20} MiB free on the filesystem of {directory})"
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"file size limit reached (ulimit -f: {limit} bytes)"
    return " ".join(str(err).split())[:300] or type(err).__name__


def _fault_pause(step: int) -> None:
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    if not spec:
        return
    seconds, _, at = spec.partition("@")
    if not at or int(at) == step:
        time.sleep(float(seconds))


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, is_main: bool,
         keep: int, record: dict | None = None) -> str:
    """Write the checkpoint of `step` on every rank (collective); raise CheckpointError on every
    rank if any rank could not, leaving the previous checkpoints and the pointer as they were.
    `record` (manifest checksum, config) goes into complete.json beside the files' sizes."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if is_main and tag_dir.exists():  # a leftover of a run killed while writing this step
        _remove(tag_dir)
    distributed.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state,
                               save_latest=False)
        _fault_pause(step)
    except Exception as e:  # noqa: BLE001 - torch.save and DeepSpeed raise many kinds
        failure = write_failure(e, ckpt_dir)
    except BaseException:  # Ctrl-C while writing: no half-written directory stays behind
        if is_main:
            _remove(tag_dir)
        raise
    # Every rank's files are on disk (or some rank failed) before the pointer moves.
    if distributed.any_rank(failure is not None):
        failure = failure or "another rank could not write its files"
    elif is_main:
        try:
            with atomic_path(tag_dir / RECORD) as tmp:
                tmp.write_text(json.dumps({"step": step, "files": _files(tag_dir),
                                           **(record or {})}, indent=1) + "\n")
            reason = damage(tag_dir)
            if reason:
                raise RuntimeError(f"checkpoint changed while its record was written: {reason}")
            with atomic_path(ckpt_dir / POINTER) as tmp:
                tmp.write_text(tag + "\n")
        except Exception as e:  # noqa: BLE001
            failure = write_failure(e, ckpt_dir)
    failure = distributed.broadcast_object(failure)  # rank 0's word, the same on every rank
    if failure is not None:
        if is_main:
            _remove(tag_dir)
        distributed.barrier()
        raise CheckpointError(f"{tag_dir}: cannot write the checkpoint of step {step}: {failure};"
                              f" the previous checkpoints are kept")
    if is_main:
        kept = complete_tags(ckpt_dir)[:max(keep, 1)]
        for old in _tags(ckpt_dir):
            if step_of(old) < step and old not in kept:
                _remove(ckpt_dir / old)
    distributed.barrier()
    return tag


def load(engine, ckpt_dir: str | Path, tag: str) -> dict:
    """Load checkpoint `tag` into the engine on every rank; its client state. A file DeepSpeed
    cannot read (damage its record could not see) is a CheckpointError on every rank."""
    ckpt_dir = Path(ckpt_dir)
    failure = None
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            failure = "DeepSpeed found no checkpoint files in it"
    except Exception as e:  # noqa: BLE001
        failure = " ".join(str(e).split())[:300] or type(e).__name__
    if distributed.any_rank(failure is not None):
        raise CheckpointError(f"{ckpt_dir / tag}: cannot load this checkpoint "
                              f"({failure or 'failed on another rank'}); "
                              f"{_instead(ckpt_dir, tag)}")
    return client_state
