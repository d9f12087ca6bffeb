"""cmgems.deepspeed_env: stale compile locks in a fake extension cache (TORCH_EXTENSIONS_DIR), and
DeepSpeed's notices that are not about the run, silenced in a real DeepSpeed import."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmgems.pretrain import deepspeed_env
from conftest import ROOT


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fake extension cache with one op's build folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "ext" / "deepspeed_shm_comm").mkdir(parents=True)
    return tmp_path / "ext"


def test_a_lock_whose_owner_is_gone_is_removed_with_a_warning(cache, caplog):
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()  # as torch's FileBaton leaves it when the compiling process is killed
    assert deepspeed_env.extensions_root() == cache
    with caplog.at_level(logging.INFO, logger="cmgems"):
        assert deepspeed_env.clear_stale_locks() == {lock: "removed"}
    assert not lock.exists()
    assert f"{lock}: removed a stale compile lock of DeepSpeed's deepspeed_shm_comm op" \
        in caplog.text
    assert deepspeed_env.clear_stale_locks() == {}  # nothing left to find


def test_a_lock_held_by_a_compiling_process_stays(cache, caplog):
    lock = cache / "deepspeed_shm_comm" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               f"fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); "
                               "print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ok\n"
        with caplog.at_level(logging.INFO, logger="cmgems"):
            assert deepspeed_env.clear_stale_locks() == {lock: "held"}
        assert lock.exists()
        assert f"pid {holder.pid} is compiling DeepSpeed's deepspeed_shm_comm op" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    # its owner killed, the lock is stale now
    assert deepspeed_env.clear_stale_locks() == {lock: "removed"}


def test_on_a_network_file_system_only_an_old_lock_is_removed(cache, caplog):
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()
    with caplog.at_level(logging.WARNING, logger="cmgems"):
        assert deepspeed_env.check_lock(lock, network=True) == "unsure"
    assert lock.exists() and f"rm {lock}" in caplog.text and "another host" in caplog.text
    old = time.time() - deepspeed_env.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    assert deepspeed_env.check_lock(lock, network=True) == "removed" and not lock.exists()


def test_only_local_rank_0_removes(cache, monkeypatch):
    lock = cache / "deepspeed_shm_comm" / "lock"
    lock.touch()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert deepspeed_env.clear_stale_locks() == {lock: "stale"} and lock.exists()


def test_file_system_type_of_a_path(tmp_path):
    assert deepspeed_env.file_system(Path("/proc/self")) == "proc"
    assert deepspeed_env.file_system(tmp_path) not in ("", "proc")


QUIET = """
import logging, torch
from cmgems.pretrain import deepspeed_env
deepspeed_env.quiet_notices()
import deepspeed
from deepspeed.accelerator import real_accelerator
from deepspeed.runtime.lr_schedules import WarmupLR
from deepspeed.utils import logger
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
WarmupLR(opt, warmup_num_steps=2)
logger.warning("a warning about this run")
print("--- without the filter", flush=True)
logger.filters.clear()
WarmupLR(opt, warmup_num_steps=2)
if not torch.cuda.is_available():
    real_accelerator.ds_accelerator = None
    real_accelerator.get_accelerator()
"""


@pytest.mark.slow
def test_deepspeed_notices_not_about_the_run_are_dropped_and_others_kept():
    res = subprocess.run([sys.executable, "-c", QUIET], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    quiet, loud = (res.stdout + res.stderr).split("--- without the filter")
    assert "a warning about this run" in quiet
    for notice in deepspeed_env.NOT_ABOUT_THE_RUN:
        assert notice not in quiet, quiet
    # the same DeepSpeed, unfiltered, still says them word for word: the filter is not stale
    assert deepspeed_env.NOT_ABOUT_THE_RUN[1] in loud, loud
    import torch
    if not torch.cuda.is_available():
        assert deepspeed_env.NOT_ABOUT_THE_RUN[0] in loud, loud


def _shm_buildable() -> bool:
    import deepspeed.ops
    return bool(deepspeed.ops.__compatible_ops__.get(deepspeed_env.SHM_COMM_OP))


def test_several_cpu_ranks_say_the_op_build_before_it_starts(cache, caplog):
    if not _shm_buildable():
        pytest.skip(reason="DeepSpeed cannot build its CPU communication op on this machine")
    with caplog.at_level(logging.INFO, logger="cmgems"):
        assert deepspeed_env.prepare_comm_op(2, "cpu") == "building"
    assert "building DeepSpeed's CPU communication op (deepspeed_shm_comm) into " \
        f"{cache / 'deepspeed_shm_comm'}: once per environment" in caplog.text
    caplog.clear()
    (cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()  # as a finished build
    with caplog.at_level(logging.INFO, logger="cmgems"):
        assert deepspeed_env.prepare_comm_op(2, "cpu") == "built"
    assert caplog.text == ""
    assert deepspeed_env.prepare_comm_op(2, "cuda") == ""


ONE_RANK = r"""
import torch
from cmgems.pretrain import distributed
info = distributed.init()
t = torch.ones(3)
distributed.all_reduce_sum(t)  # the collective still works, through gloo
print("SUM", t.tolist(), info.world_size)
distributed.shutdown()
"""


def test_one_rank_builds_no_op_into_an_empty_cache(tmp_path):
    cache = tmp_path / "ext"
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(cache)
    res = subprocess.run([sys.executable, "-c", ONE_RANK], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SUM [1.0, 1.0, 1.0] 1" in res.stdout
    assert not deepspeed_env.is_built(deepspeed_env.SHM_COMM_OP, cache)
    assert "built successfully" not in res.stdout + res.stderr
