"""Process group set-up for every way cmgems is launched: plain python, the deepspeed launcher,
torchrun, or srun (whose job script exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from cmgems.pretrain import deepspeed_env

log = logging.getLogger("cmgems")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU), after its
    extension cache is checked for stale compile locks (cmgems.pretrain.deepspeed_env)."""
    deepspeed_env.quiet_notices()
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python launchers/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if os.environ.get("LOCAL_SIZE") == "":  # DeepSpeed's init dies on int("")
        del os.environ["LOCAL_SIZE"]
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The deepspeed launcher leaves every rank on all cores: N ranks x all threads thrash.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    deepspeed_env.clear_stale_locks()
    deepspeed_env.prepare_comm_op(int(os.environ.get("WORLD_SIZE", "1")), device.type,
                                  announce=local_rank == 0)
    deepspeed.init_distributed(dist_backend=backend)
    info = DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank,
                    device)
    if info.is_main:
        log.info("%d rank(s) on %s (%s)%s", info.world_size, device.type, backend,
                 "" if device.type == "cuda" else ": torch sees no CUDA device")
    return info


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, in place (collective); returns it."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` maximised over all ranks, in place (collective); returns it."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (collective; a barrier too)."""
    if not torch.distributed.is_initialized():
        return bool(flag)
    t = torch.tensor([float(flag)])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def on_main(fn, is_main: bool, catch: tuple = (Exception,)):
    """Run fn() on rank 0 only and return its result on every rank; an exception of a `catch`
    type that fn raises there is raised on every rank (collective: the other ranks would
    otherwise wait in the next collective for a rank 0 that has given up)."""
    result, err = None, None
    if is_main:
        try:
            result = fn()
        except catch as e:
            err = e
    result, err = broadcast_object((result, err))
    if err is not None:
        raise err
    return result


def broadcast_object(obj, src: int = 0):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    torch.distributed.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave no process group and none of DeepSpeed's shared-memory allreduce buffers (66 MB per
    rank in /dev/shm, which DeepSpeed never removes). wait=False (a failing rank) leaves without
    the barrier: the other ranks may never reach it."""
    import glob

    if torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    local = os.environ.get("LOCAL_RANK", "0")
    if addr and port:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{local}"):
            try:
                os.unlink(path)
            except OSError:
                pass
