"""Files that ship with cmgems (the default run's config, DeepSpeed configs, the genomes in data/),
found next to the code wherever the user runs it.

A path a user gives is read as given, relative to their working directory. Only where it does
not exist there and names a shipped file (`launchers/configs/reference.yaml`,
`ds_configs/zero2.json`, `data/ecoli_k12_mg1655.fa.gz`: the names the docs use) is the shipped
file meant; the substitution is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("cmgems")

# Everything shipped lives under the project root (the checkout, or the installed tree).
PROJECT = Path(__file__).resolve().parents[1]


def path(relative: str) -> Path:
    """The shipped file `relative` (e.g. "launchers/configs/quick.yaml")."""
    return PROJECT / relative


def resolve(value: str, what: str) -> str:
    """`value` as the user means it: itself if it exists (or is absolute, or empty), else the
    shipped file of that relative name if there is one, else itself (for the caller's error)."""
    given = Path(value)
    if not value or given.is_absolute() or given.exists():
        return value
    shipped = PROJECT / given
    if shipped.exists():
        log.info("%s: %s is not in %s; using the one shipped with cmgems, %s", what, value,
                 Path.cwd(), shipped)
        return str(shipped)
    return value
