"""Pretraining as a child process: its command line (plain python, or the deepspeed launcher
for GPUs), its output into a log file, and SIGTERM/SIGUSR1 passed on to it.

A pretraining passed the signal checkpoints and exits cleanly, so a re-run of the parent's command
resumes it; between children the signal stops the parent at once.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path


class Interrupted(Exception):
    """SIGTERM/SIGUSR1 (a kill, Slurm preemption or time limit) reached the parent process."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalForwarder:
    """While entered, SIGTERM/SIGUSR1 go to the running child (`child`), or raise Interrupted when
    there is none; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> SignalForwarder:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        else:
            raise Interrupted(f"{signal.Signals(signum).name} received between runs; re-run the "
                              f"same command to continue", signum)


def pretrain_command(script: str | Path, num_gpus: int, args: list[str]) -> list[str]:
    """`python script args`, or under `deepspeed --num_gpus N` (on a free port) for N > 0."""
    if num_gpus > 0:
        from cmgems.pretrain.distributed import free_port
        launcher = Path(sys.executable).parent / "deepspeed"
        return [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(num_gpus),
                "--master_port", str(free_port()), str(script), *args]
    return [sys.executable, str(script), *args]


def run_logged(cmd: list[str], log_path: Path, forwarder: SignalForwarder, what: str,
               env: dict[str, str] | None = None) -> int:
    """Run cmd (in env, default this process's environment) with its output appended to log_path
    (after a `$ cmd` line); its exit code. If a signal was forwarded to it, Interrupted (naming
    `what` and the log) once it has exited."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        forwarder.child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = forwarder.child.wait()
        finally:
            if forwarder.child.poll() is None:  # the parent itself is dying: take it along
                forwarder.child.kill()
                forwarder.child.wait()
            forwarder.child = None
    if forwarder.received is not None:
        name = signal.Signals(forwarder.received).name
        raise Interrupted(f"{name} received: {what} was passed the signal and exited ({code}); "
                          f"re-run the same command to resume it from its last checkpoint "
                          f"(log: {log_path})", forwarder.received)
    return code
