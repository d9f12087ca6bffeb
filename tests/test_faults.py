"""Faults: kill -9 at three points (one and two ranks), SIGTERM preemption, an MLflow server that
goes away mid-run, corrupted shards, a full disk. Real processes, real DeepSpeed engines, a real
MLflow server, real HDF5 files; each scenario records what happened for benchmarks/fault_report.py.

The kill points are made reliable by watching the run from outside, plus one injection point:
  mid-step              train/loss of step 3 is in the store -> kill (step 4 is being computed;
                        the last checkpoint is step 2)
  during a checkpoint   CMGEMS_FAULT_PAUSE_CHECKPOINT=120@4 (cmgems/pretrain/checkpoint.py) holds every
                        rank after DeepSpeed wrote step 4's files, before the pointer moves; the
                        step_00000004 directory appears -> kill
  right after one       checkpoints/latest_complete names step 4 -> kill
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import LAMBDA, ROOT, run_module
from mlflow_server import MlflowServer
from cmgems.pretrain.checkpoint import FAULT_PAUSE_ENV, latest_tag
from cmgems.data.shards import Manifest, ShardSet

PRETRAIN = str(ROOT / "launchers" / "pretrain.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
MAX_STEPS = 6
WAIT_S = 600          # a hang guard only: no assertion is about time


# ---------------------------------------------------------------------- the record for the report
def record(scenario: str, happened: str, steps_lost: str, data_lost: str) -> None:
    """One row of benchmarks/fault_report.py's table (appended only when it asks for them)."""
    path = os.environ.get("CMGEMS_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": scenario, "happened": happened,
                                "steps_lost": steps_lost, "data_lost": data_lost}) + "\n")


# ---------------------------------------------------------------------- runs
def fault_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Six LOGO steps on 64-token blocks (2 samples a step), a checkpoint every 2 steps, metrics at every step; the
    cm_gems switch falls at step 4 (threshold 1e9: the second evaluation switches)."""
    return [PRETRAIN, "--data-dir", str(data), "--output-dir", str(out),
            "--max-steps", str(MAX_STEPS), "--micro-batch-size", "2", "--grad-accum", "1",
            "--max-length", "64", "--eval-interval", "2", "--eval-batches", "1",
            "--log-interval", "1", "--save-interval", "2", "--keep-checkpoints", "3",
            "--num-workers", "0", "--threshold", "1e9", "--warmup-steps", "2", "--zero-stage", "0",
            *extra]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One launch (plain python for one rank, the deepspeed launcher for two) in its own session,
    so that kill -9 takes the whole job, as a lost node or the OOM killer would."""

    def __init__(self, args: list[str], ranks: int, log: Path, env: dict | None = None):
        self.port = free_port()
        cmd = [sys.executable, *args] if ranks == 1 else \
            [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(self.port), *args]
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(self.port),
                     # one thread per rank: on a shared 2-core machine more threads thrash (x10)
                     "OMP_NUM_THREADS": "1", **(env or {})})

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended (exit {self.proc.returncode}) before {what}:\n"
                                     f"{self.text()[-3000:]}")
            assert time.monotonic() < deadline, f"hang guard: never saw {what}"
            time.sleep(0.05)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._clean_shm()

    def finish(self) -> int:
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._clean_shm()
        return rc

    def _clean_shm(self) -> None:
        # DeepSpeed's shared-memory allreduce buffers of killed ranks stay behind (66 MB each)
        for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{self.port}_*"):
            p.unlink(missing_ok=True)


_TEMPLATE: list[Path] = []


def fresh_store(runs_root: Path) -> None:
    """An empty MLflow SQLite store in runs_root, copied from one made once: creating a store runs
    every schema migration (5 s on this machine), once per test session instead of once per run."""
    if not _TEMPLATE:
        import tempfile
        path = Path(tempfile.mkdtemp(prefix="cmgems-store-")) / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()
        _TEMPLATE.append(path)
    runs_root.mkdir(parents=True, exist_ok=True)
    shutil.copy(_TEMPLATE[0], runs_root / "mlflow.db")


def run_to_end(args, ranks, log, env=None) -> None:
    r = Run(args, ranks, log, env)
    rc = r.finish()
    assert rc == 0, r.text()[-4000:]


def store(out: Path) -> Path:
    return out.parent / "mlflow.db"


def logged_steps(out: Path, key: str = "train/loss") -> list[int]:
    """Steps of `key` in the run's SQLite store (read directly: cheap enough to poll)."""
    db = store(out)
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return sorted(r[0] for r in con.execute("SELECT step FROM metrics WHERE key = ?", (key,)))
    except sqlite3.Error:   # not created yet, or locked: ask again
        return []


def pointer(out: Path) -> str | None:
    return latest_tag(out / "checkpoints")


def result_of(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "model.safetensors")


def assert_same_final_state(out: Path, ref: Path) -> None:
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"parameters differ from the uninterrupted run: {differ[:5]}"
    got, want = result_of(out), result_of(ref)
    assert got["step"] == want["step"] == MAX_STEPS
    assert got["stage"] == want["stage"] == "global"
    assert [e["step"] for e in got["events"]] == [e["step"] for e in want["events"]] == [4]


def assert_one_complete_run(out: Path) -> str:
    """One MLflow run in the store, FINISHED, every step of train/loss exactly once."""
    client = MlflowClient(f"sqlite:///{store(out)}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    assert run.data.tags["curriculum.switch_step"] == "4"
    assert result_of(out)["mlflow_run_id"] == run.info.run_id
    return run.info.run_id


# ---------------------------------------------------------------------- 1. kill -9, then --resume
@pytest.fixture(scope="module")
def references(tiny_dataset, tmp_path_factory):
    """One uninterrupted run per world size, made on first use and shared by the scenarios."""
    made: dict[int, Path] = {}

    def get(ranks: int) -> Path:
        if ranks not in made:
            out = tmp_path_factory.mktemp(f"ref{ranks}") / "run"
            fresh_store(out.parent)
            run_to_end(fault_args(tiny_dataset, out), ranks, out.parent / "log.txt")
            made[ranks] = out
        return made[ranks]
    return get


def _kill_chain(data: Path, tmp: Path, ranks: int) -> list[dict]:
    """Three kill -9s of the same run, each followed by --resume; returns what each kill left."""
    out = tmp / "run"
    fresh_store(tmp)
    kills = []

    def note(point: str, expect_tag: str):
        tag = pointer(out)
        kills.append({"point": point, "pointer": tag, "logged": max(logged_steps(out), default=0)})
        assert tag == expect_tag, f"{point}: latest checkpoint {tag}, expected {expect_tag}"

    # mid-step: step 3 is logged, step 4 is being computed; the last checkpoint is step 2 (the
    # pause at step 4 only keeps a slow poll from missing the moment: the kill lands long before)
    r = Run(fault_args(data, out), ranks, tmp / "log1.txt", {FAULT_PAUSE_ENV: "120@4"})
    r.wait_for(lambda: 3 in logged_steps(out), "train/loss of step 3")
    r.kill9()
    note("mid-step", "step_00000002")

    # during a checkpoint write: step 4's files are on disk, the pointer has not moved
    r = Run(fault_args(data, out, "--resume"), ranks, tmp / "log2.txt",
            {FAULT_PAUSE_ENV: "120@4"})
    r.wait_for(lambda: (out / "checkpoints" / "step_00000004").is_dir(), "checkpoint step 4 begun")
    time.sleep(1.0)
    r.kill9()
    assert (out / "checkpoints" / "step_00000004").is_dir()   # half-written, left on disk ...
    note("during a checkpoint write", "step_00000002")         # ... and never taken as latest

    # right after a checkpoint: the pointer just moved to step 4 (the pause at step 6 keeps the
    # run from reaching its next checkpoint however late the poll sees the pointer)
    r = Run(fault_args(data, out, "--resume"), ranks, tmp / "log3.txt", {FAULT_PAUSE_ENV: "120@6"})
    r.wait_for(lambda: pointer(out) == "step_00000004", "the step-4 pointer")
    r.kill9()
    note("right after a checkpoint", "step_00000004")

    run_to_end(fault_args(data, out, "--resume"), ranks, tmp / "log4.txt")
    return kills


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill9_at_three_points_then_resume_equals_uninterrupted(ranks, tiny_dataset, references,
                                                               tmp_path):
    ref = references(ranks)
    kills = _kill_chain(tiny_dataset, tmp_path, ranks)
    out = tmp_path / "run"
    assert_same_final_state(out, ref)
    run_id = assert_one_complete_run(out)
    assert result_of(out)["tracking"]["metrics_lost"] == 0
    for k in kills:
        resumed_from = int(k["pointer"].split("_")[1])
        record(f"kill -9, {ranks} rank{'s' * (ranks > 1)}, {k['point']}",
               f"resumed from {k['pointer']}; final weights bit-identical, switch at step 4, "
               f"MLflow run {run_id[:8]} continued, no duplicate or missing step",
               f"{max(k['logged'] - resumed_from, 0)} recomputed (logged {k['logged']}, "
               f"checkpoint {resumed_from})", "none")


# ---------------------------------------------------------------------- 2. SIGTERM (preemption)
@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_requeue_finishes_equal(tiny_dataset, references, tmp_path):
    ref = references(1)
    out = tmp_path / "run"
    fresh_store(tmp_path)
    r = Run(fault_args(tiny_dataset, out), 1, tmp_path / "log1.txt")
    r.wait_for(lambda: pointer(out) == "step_00000002", "the first checkpoint")
    sent_at = max(logged_steps(out), default=0)
    r.proc.send_signal(signal.SIGTERM)
    rc = r.finish()   # bounded: finish() gives up after WAIT_S
    assert rc == 0, r.text()[-3000:]
    res = result_of(out)
    assert res["stopped_by"] == "SIGTERM" and 2 <= res["step"] <= MAX_STEPS
    assert pointer(out) == f"step_{res['step']:08d}"   # the step it stopped at is checkpointed
    client = MlflowClient(f"sqlite:///{store(out)}")
    assert client.get_run(res["mlflow_run_id"]).info.status == "KILLED"
    stopped = res["step"]

    run_to_end(fault_args(tiny_dataset, out, "--resume"), 1, tmp_path / "log2.txt")
    assert_same_final_state(out, ref)
    assert assert_one_complete_run(out) == res["mlflow_run_id"]
    record("SIGTERM (Slurm preemption), 1 rank", f"signal after step {sent_at}: finished step "
           f"{stopped}, checkpointed it, exit 0, MLflow KILLED; --resume finished bit-identical, "
           f"same MLflow run", "0", "none")


# ---------------------------------------------------------------------- 3. MLflow server outage
@pytest.mark.slow
def test_mlflow_server_down_at_start_and_mid_run(tiny_dataset, tmp_path):
    """The server is down when the run starts (the run is created late, by the first flush that
    reaches it) and goes down again mid-run. The trainer is held with SIGSTOP while the server
    changes state, so each outage covers a known stretch of steps whatever the machine's load."""
    server = MlflowServer(tmp_path / "server")
    out = tmp_path / "runs" / "run"
    steps = 30
    args = fault_args(tiny_dataset, out, "--max-steps", str(steps), "--eval-interval", "10",
                      "--save-interval", "100")
    r = Run(args, 1, tmp_path / "log.txt", {"MLFLOW_TRACKING_URI": server.uri})
    try:
        r.wait_for(lambda: "MLflow: could not start the run" in r.text(), "the start-up failure")
        r.proc.send_signal(signal.SIGSTOP)
        server.start()
        r.proc.send_signal(signal.SIGCONT)
        r.wait_for(lambda: "created late" in r.text(), "the late run creation")
        client = MlflowClient(server.uri)

        def remote_steps():
            run_id = r.text().split("MLflow: run ", 1)[1].split()[0]
            return [m.step for m in client.get_metric_history(run_id, "train/loss")]
        r.wait_for(lambda: len(remote_steps()) >= 3, "three steps on the server")
        r.proc.send_signal(signal.SIGSTOP)
        server.stop()
        r.proc.send_signal(signal.SIGCONT)
        warnings = r.text().count("MLflow: could not")
        r.wait_for(lambda: r.text().count("MLflow: could not") > warnings, "the mid-run failure")
        r.proc.send_signal(signal.SIGSTOP)
        server.start()
        r.proc.send_signal(signal.SIGCONT)
        rc = r.finish()
        assert rc == 0, r.text()[-3000:]
        res = result_of(out)
        t = res["tracking"]
        # Everything logged during either outage was buffered and sent later: nothing lost.
        assert t["run_started_late"] is True
        assert t["metrics_retried"] > 0 and t["metrics_lost"] == 0 and t["metrics_pending"] == 0
        assert t["failed_calls"] >= 2
        run = client.get_run(res["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        got = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert got == list(range(1, steps + 1))
        record("MLflow server down at start, then stopped mid-run and restarted",
               f"training completed; run created late; {t['metrics_retried']} metric values "
               f"buffered and sent after the outages; {t['failed_calls']} failed calls (params, "
               f"tags, artifacts of the outage are not retried)", "0",
               f"metrics: none ({t['metrics_sent']} sent, 0 lost); params/tags sent during the "
               f"outage: lost")
    finally:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGCONT)
            r.kill9()
        server.stop()


# ---------------------------------------------------------------------- 4. corrupt shards
def _corrupt(dataset: Path, tmp: Path, how: str) -> tuple[Path, Path]:
    """A copy of the dataset with one shard damaged; returns (dataset, damaged file)."""
    data = tmp / f"data-{how}"
    shutil.copytree(dataset, data)
    if how == "truncated":
        victim = data / "train-00001.h5"
        os.truncate(victim, victim.stat().st_size // 2)
    elif how == "flipped":
        victim = data / "train-00000.h5"
        with h5py.File(victim, "r") as f:
            start, n = f["tokens"].id.get_offset(), f["tokens"].shape[0]
        with open(victim, "r+b") as f:
            # both bytes of one token in every 64: ids far outside the vocabulary
            for pos in range(start, start + 2 * n - 1, 128):
                f.seek(pos)
                pair = f.read(2)
                f.seek(pos)
                f.write(bytes(b ^ 0xFF for b in pair))
    else:
        victim = data / "valid-00000.h5"
        victim.unlink()
    return data, victim


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def error_line(stderr: str) -> str:
    """The one `error: ...` line (a progress bar may share its terminal line: cut it off)."""
    lines = [ln[ln.index("error: "):] for ln in stderr.replace("\r", "\n").splitlines()
             if "error: " in ln]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _assert_clean_exit2(res, victim: Path, out: Path) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    last = error_line(res.stderr)
    assert "Traceback" not in res.stderr and str(victim) in last, res.stderr[-3000:]
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True
    return last


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_corrupt_shard_is_refused_before_step_0(how, tiny_dataset, tmp_path):
    data, victim = _corrupt(tiny_dataset, tmp_path, how)
    out = tmp_path / "runs" / "run"
    res = run_module(*fault_args(data, out), env=ONE_THREAD, check=False)
    line = _assert_clean_exit2(res, victim, out)
    assert ("sha256 differs" in line) if how != "missing" else ("missing" in line)
    assert not store(out).exists()   # refused before the MLflow run was created
    record(f"shard {how}", f"exit 2 before step 0: `{line.replace(str(data) + '/', '')}`", "-",
           "none (nothing written)")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_skip_verify_then_what(how, tiny_dataset, tmp_path):
    """--skip-verify: a truncated shard still fails at start-up (HDF5 checks its own end of
    file); flipped token bytes are caught when a damaged sample is first read (its ids leave the
    vocabulary), after the steps before it have trained. Flipped bytes that keep ids in range (or
    hit the NPMI column) are not detected at all: that is what the checksum is for."""
    data, victim = _corrupt(tiny_dataset, tmp_path, how)
    out = tmp_path / "runs" / "run"
    res = run_module(*fault_args(data, out, "--skip-verify"), env=ONE_THREAD, check=False)
    last = _assert_clean_exit2(res, victim, out) if how == "truncated" else error_line(res.stderr)
    assert res.returncode == 2 and str(victim) in last, res.stderr[-3000:]
    if how == "truncated":
        assert "not a readable cmgems shard" in last
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    else:
        assert "outside the vocabulary" in last
    trained, ckpt = max(logged_steps(out), default=0), pointer(out)
    done = int(ckpt.split("_")[1]) if ckpt else 0
    record(f"shard {how}, --skip-verify", f"exit 2: `{last.replace(str(data) + '/', '')}`",
           "-" if how == "truncated" else
           f"{trained - done} (trained to step {trained}, last checkpoint {ckpt or 'none'})",
           "none" if how == "truncated" else "none (checkpoints before it are valid)")


# ---------------------------------------------------------------------- 6. disk full
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True)
    except OSError:   # no mount(8) at all
        return False
    return res.returncode == 0


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_disk_full_while_writing_shards(how, tmp_path):
    """The E. coli genome's shards (18 MB) into 2 MB: a one-line error, exit 2, and nothing that
    loads as a dataset (no manifest, no shard, no hidden partial directory)."""
    genome = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
    parent = tmp_path / "disk"
    pre = None
    if how == "tmpfs":
        if not _tmpfs(parent, "2m"):
            pytest.skip(reason="mounting a tmpfs is not permitted here (the rlimit case covers it)")
    else:
        parent.mkdir()
        pre = _limit_file_size(2 << 20)
    out = parent / "ecoli"
    try:
        res = subprocess.run([sys.executable, "-m", "preprocessing", "build", str(genome), str(out),
                              "--min-count", "5"], cwd=ROOT, capture_output=True, text=True,
                             preexec_fn=pre, timeout=WAIT_S)
        assert res.returncode == 2, res.stderr[-3000:]
        last = error_line(res.stderr)
        reason = "No space left on device" if how == "tmpfs" else "File too large"
        assert reason in last and ".h5" in last and "Traceback" not in res.stderr, last
        assert list(parent.iterdir()) == [], list(parent.iterdir())
        record(f"disk full while writing shards ({how})",
               f"exit 2: `{last.replace(str(parent) + '/', '')}`", "-",
               "none: no partial directory, no manifest")
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(parent)], capture_output=True)


def test_dataset_without_manifest_does_not_load(tiny_dataset, tmp_path):
    """What a killed build can leave (shards, no manifest) is not a dataset."""
    data = tmp_path / "partial"
    shutil.copytree(tiny_dataset, data)
    (data / "manifest.json").unlink()
    with pytest.raises(Exception, match="no manifest"):
        ShardSet(data, "train")
    assert Manifest.load(tiny_dataset).k == 6


# ---------------------------------------------------------------------- 7. damaged checkpoints
def _copy_run(ref: Path, tmp: Path) -> Path:
    """The reference run (checkpoints of steps 2, 4, 6; the pointer at 6) with its store."""
    out = tmp / "run"
    shutil.copytree(ref, out)
    shutil.copy(store(ref), store(out))
    return out


def _listing(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != "latest_complete"}


def _runs_in(out: Path) -> list:
    client = MlflowClient(f"sqlite:///{store(out)}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty", "names a missing tag", "missing", "truncated file"])
def test_damaged_pointer_is_refused_and_destroys_nothing(how, tiny_dataset, references, tmp_path):
    """Each used to restart from step 0 in a new MLflow run, whose pruning then deleted the
    valid checkpoints. Now: exit 2 naming the pointer and the newest complete checkpoint, no new
    MLflow run, every checkpoint file as it was."""
    out = _copy_run(references(1), tmp_path)
    ckpt = out / "checkpoints"
    pointer_file = ckpt / "latest_complete"
    suggested = "step_00000006"
    if how == "empty":
        pointer_file.write_text("")
    elif how == "names a missing tag":
        pointer_file.write_text("step_00000008\n")
    elif how == "missing":
        pointer_file.unlink()
    else:
        victim = ckpt / "step_00000006" / "mp_rank_00_model_states.pt"
        os.truncate(victim, victim.stat().st_size // 3)
        suggested = "step_00000004"
    before, runs_before = _listing(ckpt), len(_runs_in(out))
    res = run_module(*fault_args(tiny_dataset, out, "--resume"), env=ONE_THREAD, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    line = error_line(res.stderr)
    assert "Traceback" not in res.stderr
    assert line.startswith(f"error: {pointer_file}: ") and f"`echo {suggested} > " in line, line
    if how == "truncated file":
        assert str(victim) in line and "truncated" in line
    assert _listing(ckpt) == before            # nothing pruned, nothing written
    assert len(_runs_in(out)) == runs_before   # no new MLflow run
    assert not (out / ".cmgems.lock").exists()
    # the message holds a `command`: a double-backtick code span keeps the table's markdown
    record(f"checkpoint pointer {how}", f"exit 2: `` {line.replace(str(out) + '/', '')} ``", "-",
           "none (every checkpoint kept, no MLflow run started)")


@pytest.mark.slow
def test_resume_onto_another_dataset_is_refused(tiny_dataset, references, tmp_path):
    out = _copy_run(references(1), tmp_path)
    other = tmp_path / "other"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(other),
               "--min-count", "5", "--valid-fraction", "0.1", "--seed", "1",
               "--shard-tokens", "20000")
    res = run_module(*fault_args(other, out, "--resume"), env=ONE_THREAD, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    line = error_line(res.stderr)
    assert str(tiny_dataset.resolve()) in line and str(other.resolve()) in line, line
    assert "manifest checksum" in line and "Traceback" not in res.stderr
    record("--resume with another --data-dir", "exit 2: `" + line.replace(
        str(tmp_path) + "/", "").replace(str(tiny_dataset.resolve()), "DATA") + "`", "-", "none")


# ---------------------------------------------------------------------- 8. a full disk in training
@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_disk_full_while_checkpointing(how, tiny_dataset, tmp_path):
    """A LOGO checkpoint is 59 MB. tmpfs of 100 MB: step 2's fits, step 4's does not; a 30 MB
    file size limit: not even step 2's. Either way: exit 2 saying why, the MLflow run FAILED,
    no half-written checkpoint, the previous ones kept (or no empty checkpoints/ left)."""
    disk = tmp_path / "disk"
    pre = None
    if how == "tmpfs":
        if not _tmpfs(disk, "100m"):
            pytest.skip(reason="mounting a tmpfs is not permitted here (the rlimit case covers it)")
    else:
        disk.mkdir()
        pre = _limit_file_size(30 << 20)
    out = disk / "run"
    db = tmp_path / "elsewhere" / "mlflow.db"
    fresh_store(db.parent)
    try:
        res = subprocess.run([sys.executable, *fault_args(tiny_dataset, out)], cwd=ROOT,
                             capture_output=True, text=True, preexec_fn=pre, timeout=WAIT_S,
                             env={**os.environ, **ONE_THREAD,
                                  "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
        assert res.returncode == 2, res.stderr[-3000:]
        line = error_line(res.stderr)
        assert "Traceback" not in res.stderr
        expect = "step_00000004" if how == "tmpfs" else "step_00000002"
        assert line.startswith(f"error: {out / 'checkpoints' / expect}: cannot write"), line
        assert ("disk full" if how == "tmpfs" else "file size limit reached") in line, line
        if how == "tmpfs":
            assert pointer(out) == "step_00000002" and not (out / "checkpoints" / expect).exists()
        else:
            assert not (out / "checkpoints").exists()   # nothing in it: removed
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.status for r in runs] == ["FAILED"]
        record(f"disk full while writing a checkpoint ({how})",
               f"exit 2: `{line.replace(str(disk) + '/', '')}`; MLflow run FAILED",
               "2 (since the last checkpoint)" if how == "tmpfs" else "2 (no checkpoint yet)",
               "none: the partial checkpoint removed, earlier ones kept")
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------- 9. Ctrl-C
@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_resumes_equal(tiny_dataset, references, tmp_path):
    ref = references(1)
    out = tmp_path / "run"
    fresh_store(tmp_path)
    r = Run(fault_args(tiny_dataset, out), 1, tmp_path / "log1.txt")
    r.wait_for(lambda: pointer(out) == "step_00000002", "the first checkpoint")
    r.proc.send_signal(signal.SIGINT)
    rc = r.finish()
    assert rc == 130, r.text()[-3000:]
    assert "Traceback" not in r.text()
    res = result_of(out)
    assert res["stopped_by"] == "SIGINT" and pointer(out) == f"step_{res['step']:08d}"
    client = MlflowClient(f"sqlite:///{store(out)}")
    assert client.get_run(res["mlflow_run_id"]).info.status == "KILLED"
    run_to_end(fault_args(tiny_dataset, out, "--resume"), 1, tmp_path / "log2.txt")
    assert_same_final_state(out, ref)
    assert assert_one_complete_run(out) == res["mlflow_run_id"]
    record("Ctrl-C (SIGINT), 1 rank", f"finished step {res['step']}, checkpointed it, exit 130, "
           f"no traceback, MLflow KILLED; --resume finished bit-identical, same MLflow run",
           "0", "none")


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_a_half_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    fresh_store(tmp_path)
    r = Run(fault_args(tiny_dataset, out), 1, tmp_path / "log.txt", {FAULT_PAUSE_ENV: "120@2"})
    r.wait_for(lambda: (out / "checkpoints" / "step_00000002").is_dir(), "checkpoint 2 begun")
    time.sleep(1.0)   # inside the write (or the pause after it)
    r.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    r.proc.send_signal(signal.SIGINT)
    rc = r.finish()
    text = r.text()
    assert rc == 130 and "Traceback" not in text, text[-3000:]
    line = error_line(text)
    assert line.startswith("error: interrupted (Ctrl-C)"), line
    assert not (out / "checkpoints").exists()   # the half-written step 2 went, then the dir
    runs = _runs_in(out)
    assert [x.info.status for x in runs] == ["KILLED"]
    record("Ctrl-C twice, during the first checkpoint", f"exit 130: `{line}`; the half-written "
           "checkpoint removed, MLflow KILLED", "2 (no checkpoint yet)", "none")


# ---------------------------------------------------------------------- 10. two trainings
@pytest.mark.slow
def test_second_training_in_the_same_directory_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    fresh_store(tmp_path)
    first = Run(fault_args(tiny_dataset, out), 1, tmp_path / "log1.txt",
                {FAULT_PAUSE_ENV: "120@2"})
    try:
        first.wait_for(lambda: (out / "checkpoints" / "step_00000002").is_dir(), "checkpoint 2")
        res = run_module(*fault_args(tiny_dataset, out, "--resume"), env=ONE_THREAD,
                         check=False)
        assert res.returncode == 2, res.stderr[-3000:]
        line = error_line(res.stderr)
        import socket
        assert f"in use by pid {first.proc.pid} on host {socket.gethostname()}" in line, line
        assert str(out / ".cmgems.lock") in line
    finally:
        first.kill9()
    # the killed holder's lock file stays; the next run takes it over with a warning
    assert (out / ".cmgems.lock").exists()
    r = Run(fault_args(tiny_dataset, out, "--resume"), 1, tmp_path / "log2.txt")
    assert r.finish() == 0, r.text()[-3000:]
    assert f"taking over the lock of pid {first.proc.pid}" in r.text()
    assert result_of(out)["step"] == MAX_STEPS and not (out / ".cmgems.lock").exists()
    record("second training into a running one's directory",
           f"exit 2: `{line.replace(str(tmp_path) + '/', '')}`; after the first was killed "
           f"(kill -9) the next --resume took the stale lock over with a warning", "-", "none")


# ---------------------------------------------------------------------- 11. a diverging loss
@pytest.mark.slow
def test_non_finite_loss_stops_with_the_last_finite_step(tiny_dataset, references, tmp_path):
    """CMGEMS_FAULT_NAN_LOSS=5 makes step 5's loss NaN before its backward pass. The run stops
    before that update, checkpoints step 4 (not due by save_interval) with exactly the weights
    of the uninterrupted run's step 4, ends MLflow FAILED; --resume then finishes equal."""
    ref = references(1)
    out = tmp_path / "run"
    fresh_store(tmp_path)
    args = fault_args(tiny_dataset, out, "--save-interval", "100")
    res = run_module(*args, env={**ONE_THREAD, "CMGEMS_FAULT_NAN_LOSS": "5"}, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    line = error_line(res.stderr)
    assert "Traceback" not in res.stderr
    assert "the training loss of step 5 is not finite" in line and \
        f"{out / 'checkpoints' / 'step_00000004'} holds step 4" in line, line
    assert pointer(out) == "step_00000004"
    name = "mp_rank_00_model_states.pt"
    got = torch.load(out / "checkpoints" / "step_00000004" / name, weights_only=False)["module"]
    want = torch.load(ref / "checkpoints" / "step_00000004" / name, weights_only=False)["module"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    runs = _runs_in(out)
    assert [x.info.status for x in runs] == ["FAILED"]
    run_to_end(fault_args(tiny_dataset, out, "--resume"), 1, tmp_path / "log2.txt")
    assert_same_final_state(out, ref)
    assert_one_complete_run(out)
    record("loss NaN at step 5 (CMGEMS_FAULT_NAN_LOSS=5)",
           f"exit 2: `{line.replace(str(tmp_path) + '/', '')}`; the update was never applied; "
           f"MLflow FAILED; --resume finished bit-identical", "0 (step 4 checkpointed then)",
           "none")


def test_a_published_file_is_flushed_before_and_after_its_rename(tmp_path, monkeypatch):
    """atomic_path fsyncs the new file before it replaces the old one, then the directory that
    holds the rename: a node crash leaves the old file or the whole new one."""
    import cmgems.io as cio
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(cio.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(cio.os, "replace", lambda a, b: (events.append(("replace", str(b))),
                                                         real_replace(a, b))[1])
    target = tmp_path / "manifest.json"
    with cio.atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp-" + str(os.getpid()) + "-manifest.json")
    assert events[2][1] == str(tmp_path)
