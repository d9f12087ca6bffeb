"""DeepSpeed started cleanly: its notices that say nothing about the user's run are silenced where
they come from, and a compile lock that a killed run left in the extension cache is found before
DeepSpeed would wait on it forever, without a word.

DeepSpeed compiles its ops at run time into torch's extension cache
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<ver>_<cpu|cuXXX>/<op>/). torch guards
each op's build with an empty file `lock` that the compiling process creates, holds open and
removes when it is done; a process killed mid-build (kill -9, a Slurm time limit) leaves it
behind, and every later run waits for it to disappear.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("cmgems")

# DeepSpeed's logger lines that every normal run would print, and why they are noise:
NOT_ABOUT_THE_RUN = (
    # torch sees no GPU, so DeepSpeed falls back to its CPU accelerator: the device is the run's
    # choice, and distributed.init logs it.
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect "
    "it.",
    # WarmupLR's own constructor asks for the learning rate of step -1, on every start.
    "Attempting to get learning rate from scheduler before it has started",
)
# File systems where another host may hold a lock: there this host's processes are not all.
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs",
                        "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "afs", "9p"}
# No compile of DeepSpeed's ops takes this long: an older lock is stale on any file system.
STALE_AFTER_S = 15 * 60


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in NOT_ABOUT_THE_RUN


def quiet_notices() -> None:
    """Drop NOT_ABOUT_THE_RUN from DeepSpeed's logger; call before `import deepspeed` (the
    accelerator notice comes at import). Every other DeepSpeed line is kept."""
    logger = logging.getLogger("DeepSpeed")  # the object DeepSpeed configures when imported
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())


def extensions_root() -> Path:
    """The folder holding one build folder per op, as torch.utils.cpp_extension chooses it."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def lock_holders(lock: Path) -> list[int]:
    """Processes on this host that have `lock` open (the compiling one keeps it open)."""
    target = os.path.realpath(lock)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's: not one compiling into our cache
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    pids.append(int(proc.name))
                    break
            except OSError:
                continue
    return pids


def file_system(path: Path) -> str:
    """The type of the file system holding `path` (from /proc/mounts; "" where unknown)."""
    real, best, kind = os.path.realpath(path), "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def check_lock(lock: Path, *, network: bool | None = None, remove: bool = True) -> str:
    """Look at one op's compile lock; returns what was found: "held" (a process of this host is
    compiling: DeepSpeed waits for it, and we say so), "removed" (stale: its owner is gone),
    "stale" (stale, left in place because remove=False), or "unsure" (no process here holds
    it, but it is young and on a network file system where another host may be compiling).

    network: whether the cache is on a network file system (None: from /proc/mounts).
    """
    op = lock.parent.name
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    holders = lock_holders(lock)
    if holders:
        log.info("%s: pid %s is compiling DeepSpeed's %s op; this run waits for it", lock,
                 ",".join(map(str, holders)), op)
        return "held"
    if network is None:
        network = file_system(lock) in NETWORK_FILE_SYSTEMS
    if network and age < STALE_AFTER_S:
        log.warning("%s: a compile lock of DeepSpeed's %s op, %.0f s old, held by no process on "
                    "this host; another host sharing this cache may be compiling it, and "
                    "DeepSpeed waits until it is done. If none is, remove the lock: rm %s",
                    lock, op, age, lock)
        return "unsure"
    if not remove:
        return "stale"
    try:
        lock.unlink()
    except FileNotFoundError:
        return "gone"
    log.warning("%s: removed a stale compile lock of DeepSpeed's %s op, %.0f s old: no running "
                "process holds it (a run was killed while compiling); DeepSpeed would have waited "
                "on it forever", lock, op, age)
    return "removed"


def clear_stale_locks(remove: bool | None = None) -> dict[Path, str]:
    """check_lock for every op's lock in the extension cache; {lock: outcome}. Only one process
    per host removes (local rank 0, unless `remove` says otherwise): the others find the same
    locks and DeepSpeed's own wait sees them go."""
    if remove is None:
        remove = os.environ.get("LOCAL_RANK", "0") == "0"
    root = extensions_root()
    if not root.is_dir():
        return {}
    return {lock: check_lock(lock, remove=remove) for lock in sorted(root.glob("*/lock"))}


# DeepSpeed's shared-memory allreduce for CPU ranks of one host, a C++ op it compiles on its
# first use in every environment (half a minute to two, silently), whatever the world size.
SHM_COMM_OP = "deepspeed_shm_comm"


def is_built(op: str, root: Path | None = None) -> bool:
    """Whether the extension cache already holds a build of `op` (torch reuses it)."""
    folder = (root or extensions_root()) / op
    return any(folder.glob("*.so"))


def prepare_comm_op(world_size: int, device_type: str, announce: bool = True) -> str:
    """Before deepspeed.init_distributed: one rank has no collective to speed up, so the op is
    not built at all ("skipped"); for several CPU ranks, a build still to come is said before
    it starts ("building"), not after a silent minute. Returns what it found: "skipped",
    "building", "built" or "" (not a CPU run, or the op cannot be built here)."""
    if device_type != "cpu":
        return ""
    import deepspeed.ops

    # DeepSpeed asks this table before building the op (deepspeed.comm.torch.build_shm_op) and
    # keeps one copy of it per process, edits included.
    compatible = deepspeed.ops.__compatible_ops__
    if not compatible.get(SHM_COMM_OP):
        return ""
    if world_size == 1:
        compatible[SHM_COMM_OP] = False
        return "skipped"
    if is_built(SHM_COMM_OP):
        return "built"
    if announce:
        log.warning("building DeepSpeed's CPU communication op (%s) into %s: once per "
                    "environment, about 1-2 min (install.sh builds it up front)", SHM_COMM_OP,
                    extensions_root() / SHM_COMM_OP)
    return "building"


def prebuild() -> str:
    """Build the CPU communication op now (install.sh), so no run waits for it; returns where."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return "not used on this accelerator"
    if not is_built(SHM_COMM_OP):
        builder.load(verbose=False)
    return str(extensions_root() / SHM_COMM_OP)


if __name__ == "__main__":  # python -m cmgems.pretrain.deepspeed_env: the build of prebuild()
    quiet_notices()
    print(f"DeepSpeed's CPU communication op: {prebuild()}")
