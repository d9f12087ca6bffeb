"""cmgems.progress: plain lines where stderr is a log file, a bar with log records above it (never
glued onto it) on a real terminal (a pty)."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from cmgems.progress import Progress
from conftest import ROOT, run_module


def test_plain_lines_every_n_units_and_at_the_end():
    out = io.StringIO()
    with Progress(12, "run", unit="step", every=5, file=out) as p:
        for i in range(12):
            p.set_postfix(loss=f"{8 - i / 10:.1f}", stage="genemask")
            p.update()
    lines = out.getvalue().splitlines()
    assert [re.match(r"run: (\d+)/12 steps \((\d+)%\)", ln).groups() for ln in lines] == [
        ("5", "42"), ("10", "83"), ("12", "100")]
    assert lines[-1].endswith("] loss=6.9, stage=genemask")
    assert "\r" not in out.getvalue()


def test_a_resumed_loop_counts_from_its_start_and_rates_its_own_units():
    out = io.StringIO()
    p = Progress(200, "run", unit="step", initial=150, every=25, file=out)
    for _ in range(50):
        p.update()
    p.close()
    p.close()  # closing twice writes nothing more
    assert [ln.split(" [")[0] for ln in out.getvalue().splitlines()] == [
        "run: 175/200 steps (88%)", "run: 200/200 steps (100%)"]


def test_time_based_lines_and_scaled_units_without_a_total():
    out = io.StringIO()
    with Progress(None, "counting", unit="bp", unit_scale=True, seconds=0.05, file=out) as p:
        p.update(1_000_000)          # too soon for a line
        time.sleep(0.06)
        p.update(1_500_000)          # a line: 2.5 Mbp
        p.update(500_000)            # the final line: 3 Mbp
    lines = out.getvalue().splitlines()
    assert [ln.split(" [")[0] for ln in lines] == ["counting: 2.50Mbp", "counting: 3.00Mbp"]
    assert re.search(r"\[\d\d:\d\d, [\d.]+Mbp/s\]$", lines[0]), lines[0]


def test_nothing_but_the_end_without_every_or_seconds():
    out = io.StringIO()
    with Progress(3, "x", file=out) as p:
        p.update(3)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("x: 3/3 its (100%)")
    with pytest.raises(ValueError, match="every must be >= 1"):
        Progress(3, "x", every=0, file=out)


SCRIPT = """
import logging, sys, time, warnings
from cmgems.progress import Progress
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
with Progress(6, "run", unit="step", every=2) as p:
    for i in range(6):
        p.set_postfix(i=i)
        p.update(1)
        time.sleep(0.15)  # past tqdm's refresh interval: the bar is drawn before each record
        logging.getLogger("cmgems").info("record %d", i)
        if i == 2:
            warnings.warn("careful")
logging.getLogger("cmgems").info("after the bar")
warnings.warn("plain again")
"""


def run_on_a_terminal(script: str, columns: int = 100) -> str:
    """What `python -c script` writes to a pseudo-terminal (its stdout and stderr) of `columns`
    (a new pty has 0 x 0, where tqdm draws nothing)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode()


def test_on_a_terminal_log_records_and_warnings_are_written_above_the_bar():
    text = run_on_a_terminal(SCRIPT)
    # What a terminal shows: every \r returns to the line's start, so each piece between \r and
    # \n is drawn from column 0. A record glued onto the bar would sit inside a bar's piece.
    pieces = [p for p in re.split(r"[\r\n]", text) if p.strip()]
    assert any(p.startswith("run:") and "|" in p for p in pieces), text  # a bar was drawn
    for i in range(6):
        assert f"LOG cmgems record {i}" in pieces, text
    warned = [p for p in pieces if "careful" in p]
    assert warned and all(p.startswith("LOG py.warnings") for p in warned), text
    assert all(p.startswith("LOG") or p.startswith("run:") or "warnings.warn" in p
               for p in pieces if "plain again" not in p), pieces
    # after the bar: warnings are Python's own again (not through logging)
    assert any("UserWarning: plain again" in p and not p.startswith("LOG") for p in pieces)


LOG_LINES = r"""
import logging, sys
from cmgems import logs
from launchers.pretrain import one_log_format
logs.configure(logging.INFO)
one_log_format()
logging.getLogger("cmgems").info("ours")
logging.getLogger("DeepSpeed").warning("theirs")
logging.getLogger("mlflow").warning("tracking")
"""


def test_cmgems_deepspeed_and_mlflow_lines_share_one_timestamp_format():
    res = run_module("-c", LOG_LINES, cwd=ROOT, timeout=120)
    out = res.stdout + res.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for name, level, message in (("cmgems", "INFO", "ours"), ("DeepSpeed", "WARNING", "theirs"),
                                 ("mlflow", "WARNING", "tracking")):
        assert re.search(rf"^{stamp} {name} {level} {message}$", out, re.M), out


def test_a_terminal_of_no_columns_gets_the_plain_lines():
    """`script -qc ... file` and some job schedulers run a command on a 0-column pty."""
    text = run_on_a_terminal(SCRIPT, columns=0)
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.startswith("run: ")]
    assert [ln.split(" steps")[0] for ln in lines] == ["run: 2/6", "run: 4/6", "run: 6/6"], text
    assert "\r" not in text.replace("\r\n", "\n")
