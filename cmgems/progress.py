"""Progress of a long loop that a person at a terminal and a log file can both read.

On a terminal: a tqdm bar; while it is open, log records and Python warnings are written above it
(tqdm's logging redirect), never glued onto its line. Elsewhere (a Slurm .out file, CI, a pipe) a
bar is a smear of carriage returns, so none is drawn: a plain line every `every` units and/or
`seconds`, and one when the loop ends, e.g.

    logo-cm_gems: 50/200 steps (25%) [00:12<00:36, 4.07 steps/s] loss=8.104, stage=genemask

Used by pretraining (a line every log_interval steps) and preprocessing (every 10 s of a pass):

    with Progress(total, "sharding", unit="bp", unit_scale=True, seconds=10) as bar:
        for piece in pieces:
            ...
            bar.update(len(piece))
            bar.set_postfix(shards=n)     # shown on the bar, appended to plain lines
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import IO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_LINE = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"
_LINE_NO_TOTAL = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}]"


def is_terminal(stream: IO) -> bool:
    """A terminal a bar can be drawn on: a tty with a width. A pseudo-terminal of 0 columns
    (`script -qc ... file`, some CI runners and job schedulers) is a tty where tqdm draws
    nothing at all, so it gets the plain lines of a log file."""
    try:
        if not stream.isatty():
            return False
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # no isatty/fileno, closed, no size
        return False


def _console_loggers() -> list[logging.Logger]:
    """The root logger and every logger with its own handler onto stdout/stderr (DeepSpeed's and
    MLflow's do not propagate to the root): all of them must write above the bar."""
    loggers = [logging.getLogger()]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and any(
                type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
                for h in logger.handlers):
            loggers.append(logger)
    return loggers


@contextlib.contextmanager
def _warnings_to_logging():
    """Python warnings through logging while the bar is open (so above it), as before after."""
    already = getattr(warnings.showwarning, "__module__", None) == "logging"
    if not already:
        logging.captureWarnings(True)
    try:
        yield
    finally:
        if not already:
            logging.captureWarnings(False)


class Progress:
    """A progress display: update(n), set_postfix(**values), close() (or use it as a context).

    total: units to reach (None: unknown, no percentage); desc: the line's name; unit: what is
    counted ("step", "bp"); initial: units already done (a resumed run); every / seconds: when a
    plain line is written where there is no terminal: each time the count passes a multiple of
    `every`, and once `seconds` have gone by since the last line (neither: only the final line);
    leave: keep the finished bar on the terminal; file: default sys.stderr; terminal: force the
    bar (True) or plain lines (False), default whether `file` is a terminal.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 every: int | None = None, seconds: float | None = None,
                 unit_scale: bool = False, leave: bool = True, file: IO | None = None,
                 terminal: bool | None = None):
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.file = sys.stderr if file is None else file
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self._last_n = initial
        # the counted thing after a number: "50/200 steps", but "4.6M/4.6Mbp" with unit_scale
        self._units = unit if unit_scale else f" {unit}s"
        self.every, self.seconds = every, seconds
        self.postfix: dict[str, object] = {}
        self.terminal = is_terminal(self.file) if terminal is None else terminal
        self._start = self._last_t = time.monotonic()
        self._initial = initial
        self._closed = False
        self._bar = None
        self._stack = contextlib.ExitStack()
        if self.terminal:
            self._stack.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))
            self._stack.enter_context(_warnings_to_logging())
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             unit_scale=unit_scale, leave=leave, dynamic_ncols=True,
                             file=self.file)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if (self.every and self.n // self.every > self._last_n // self.every
                or self.seconds is not None and now - self._last_t >= self.seconds):
            self._write_line(now)

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (loss=..., stage=...), kept until replaced."""
        self.postfix = {k: v for k, v in values.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def update_postfix(self, **values) -> None:
        """Replace some of the values, keep the others (a stage that changed between lines)."""
        self.set_postfix(**{**self.postfix, **values})

    def line(self, now: float | None = None) -> str:
        """The plain line for the current count (rate and time left from this process's units)."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        template = _LINE if self.total else _LINE_NO_TOTAL
        text = tqdm.format_meter(self.n, self.total or None, elapsed, prefix=self.desc,
                                 unit=self.unit, unit_scale=self.unit_scale, initial=self._initial,
                                 bar_format=template.replace("{unit}", self._units))
        if self.postfix:
            text += " " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _write_line(self, now: float) -> None:
        self.file.write(self.line(now) + "\n")
        self.file.flush()
        self._last_n, self._last_t = self.n, now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._bar is not None:
                self._bar.close()
            elif self.n != self._last_n:
                self._write_line(time.monotonic())
        finally:
            self._stack.close()


def quiet_library_bars() -> None:
    """Turn off the progress bars of the Hugging Face libraries (e.g. save_pretrained's "Writing
    model shards") where stderr is not a terminal: in a log file each is a line of carriage
    returns. On a terminal they stay."""
    if is_terminal(sys.stderr):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
