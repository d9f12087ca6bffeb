"""Checkpoints: DeepSpeed's per-rank files under checkpoints/<tag>/, plus our own pointer
`checkpoints/latest_complete`, rewritten atomically only after every rank finished writing. A
checkpoint killed half-way is never taken as the latest: its tag was never pointed to.

Fault injection (tests, docs/faults.md): CMGEMS_FAULT_PAUSE_CHECKPOINT=SECONDS[@STEP] makes every
rank sleep after its DeepSpeed files are written and before the pointer moves (at every checkpoint,
or only at STEP), so that a kill -9 can land reliably "during a checkpoint write".
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cmgems import distributed
from cmgems.io import atomic_path

POINTER = "latest_complete"
FAULT_PAUSE_ENV = "CMGEMS_FAULT_PAUSE_CHECKPOINT"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _fault_pause(step: int) -> None:
    spec = os.environ.get(FAULT_PAUSE_ENV, "")
    if not spec:
        return
    seconds, _, at = spec.partition("@")
    if not at or int(at) == step:
        time.sleep(float(seconds))


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, is_main: bool,
         keep: int) -> str:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    _fault_pause(step)
    distributed.barrier()  # every rank's shard is on disk before the pointer moves
    if is_main:
        with atomic_path(ckpt_dir / POINTER) as tmp:
            tmp.write_text(tag + "\n")
        tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-keep] if keep else []:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()
    return tag


def load(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the latest complete checkpoint into the engine; its client state, or None if none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{Path(ckpt_dir) / tag}: DeepSpeed could not load this checkpoint")
    return client_state
