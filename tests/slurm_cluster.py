"""A real Slurm cluster on this host for tests: munged, slurmctld and one slurmd per simulated node.

Everything lives in one directory (config, state, spool, logs, a private munge key and socket) and
uses free ports, so it touches no system-wide Slurm or munge setup. Daemons are stopped by the PIDs
in their pid files.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue",
            "sinfo")


def missing_binaries() -> list[str]:
    found = {b: shutil.which(b) or next((p for p in (f"/usr/sbin/{b}", f"/usr/bin/{b}")
                                          if os.access(p, os.X_OK)), None) for b in BINARIES}
    return [b for b, path in found.items() if path is None]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """Slurm with `nodes` simulated nodes, each with `cpus` CPUs, all on 127.0.0.1."""

    def __init__(self, root: Path, nodes=("n1", "n2"), cpus: int = 2):
        self.root = Path(root)
        self.nodes = list(nodes)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pidfiles: list[Path] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._daemon([_sbin("slurmctld")], self.root / "slurmctld.pid")
        for node in self.nodes:
            self._daemon([_sbin("slurmd"), "-N", node], self.root / f"slurmd-{node}.pid")
        self._wait_idle(timeout)
        return self

    def stop(self) -> None:
        """Cancel jobs, then stop every daemon by PID (slurmds first, munged last)."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.5)
        for pidfile in reversed(self._pidfiles):
            self._kill(pidfile)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
            os.chmod(key, 0o400)
        pidfile = self.munge_dir / "munged.pid"
        # --force: munged otherwise refuses to run as root; a private key and socket keep this
        # cluster apart from any munged already running on the host.
        self._daemon([_sbin("munged"), "--force", f"--socket={self.munge_socket}",
                      f"--key-file={key}", f"--pid-file={pidfile}",
                      f"--log-file={self.munge_dir / 'munged.log'}",
                      f"--seed-file={self.munge_dir / 'munged.seed'}"], pidfile)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=cmgemstest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2",
            # The simulated nodes together claim more CPUs than the host has.
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "KillWait=5", "MinJobAge=600",
            # Job ids of their own: pretrain.sbatch takes its rendezvous port from the job id, and
            # clusters that all count from 1 (test runs side by side on one host) would pick the
            # same ports and fail with EADDRINUSE. The control port is a free one, so it differs.
            f"FirstJobId={1000 + ctld_port % 18000}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=10000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, cmd: list[str], pidfile: Path) -> None:
        self._pidfiles.append(pidfile)
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd} exited {res.returncode}: {res.stderr}\n{self.logs()}")
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    @staticmethod
    def _kill(pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env,
                                 capture_output=True, text=True)
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            if res.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout}s\n{self.logs()}")

    # -- jobs ------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True,
                             text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{cmd} exited {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        res = self.run("sbatch", "--parsable", *args, env=dict(self.env, **(env or {})), cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The job record as `scontrol show job` prints it (empty once Slurm forgot the job)."""
        res = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}

    def squeue(self) -> list[str]:
        res = self.run("squeue", "-h", "-o", "%i %T", check=False)
        return [line for line in res.stdout.splitlines() if line.strip()]

    def wait_state(self, job_id: int, states: set[str], timeout: float = 180.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        rec: dict[str, str] = {}
        while time.monotonic() < deadline:
            rec = self.job(job_id)
            if rec.get("JobState") in states:
                return rec
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {rec}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + [self.munge_dir / "munged.log"]:
            if f.exists():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
