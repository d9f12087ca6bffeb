"""Progress of an evaluation's runs on stderr: a tqdm bar over the runs (epoch and loss of the run
under way as its postfix) on a terminal; one plain line per finished run elsewhere (a Slurm .out
file, CI, a pipe), where a redrawn bar would be noise."""
from __future__ import annotations

import contextlib
import sys
import time


class RunProgress:
    def __init__(self, name: str, runs: int, enabled: bool = True):
        self.name, self.runs, self.enabled = name, runs, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self._redirect = contextlib.ExitStack()
        self._t0 = time.time()
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=runs, desc=name, unit="run", file=sys.stderr, leave=True,
                            dynamic_ncols=True)
            # Log records print above the bar instead of gluing onto it.
            self._redirect.enter_context(logging_redirect_tqdm())

    def epoch(self, run: int, epoch: int, epochs: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"run {run + 1}/{self.runs} epoch {epoch}/{epochs} "
                                     f"loss {loss:.4f}")

    def run_done(self, run: int, res: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            m = res["metrics"]
            print(f"{self.name}: run {run + 1}/{self.runs} (seed {res['seed']}, {res['steps']} "
                  f"steps) accuracy {100 * m['accuracy']:.2f} % F1 {100 * m['f1']:.2f} % MCC "
                  f"{m['mcc']:.3f} ({time.time() - self._t0:.0f} s)", file=sys.stderr,
                  flush=True)
            self._t0 = time.time()

    def close(self) -> None:
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()
