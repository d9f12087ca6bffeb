"""One line format for a run's log: cmgems', DeepSpeed's and MLflow's lines share a timestamp,
so a Slurm log reads in order whoever wrote the line. DeepSpeed and MLflow each attach their own
handler, with their own format, to their own logger when imported; `adopt` gives those handlers
ours (their streams stay as they are)."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Libraries whose loggers carry a handler of their own (propagate=False).
LIBRARIES = ("DeepSpeed", "mlflow")


def formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, DATE_FORMAT)


def configure(level: int = logging.INFO) -> None:
    """The root logger's format for a run (logging.basicConfig: a handler already there wins)."""
    logging.basicConfig(level=level, format=FORMAT, datefmt=DATE_FORMAT)


def adopt(names: tuple[str, ...] = LIBRARIES) -> None:
    """Our format on the handlers of the libraries' loggers; call once they are imported."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter())
