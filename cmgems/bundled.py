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

_PACKAGE = Path(__file__).resolve().parent
# A checkout holds the shipped files in the project's own folders beside cmgems/. An installed
# distribution holds them inside the package (setup.cfg's package_dir): launchers/ is
# cmgems/launchers/, ds_configs/ is cmgems/ds_configs/, data/ is cmgems/genomes/ (cmgems/data/loader.py
# is the loader).
CHECKOUT = _PACKAGE.parent if (_PACKAGE.parent / "setup.cfg").is_file() else None
INSTALLED_FOLDERS = {"launchers": "launchers", "ds_configs": "ds_configs", "data": "genomes"}


def path(relative: str) -> Path:
    """The shipped file `relative`, named as in a checkout (e.g. "launchers/configs/quick.yaml")."""
    if CHECKOUT is not None:
        return CHECKOUT / relative
    folder, _, rest = relative.partition("/")
    return _PACKAGE / INSTALLED_FOLDERS.get(folder, folder) / rest


def preprocessing_module() -> str:
    """`python -m` name of the preprocessing package: top-level in a checkout, inside cmgems
    when installed."""
    return "preprocessing" if CHECKOUT is not None else "cmgems.preprocessing"


def resolve(value: str, what: str) -> str:
    """`value` as the user means it: itself if it exists (or is absolute, or empty), else the
    shipped file of that relative name if there is one, else itself (for the caller's error)."""
    given = Path(value)
    if not value or given.is_absolute() or given.exists():
        return value
    shipped = path(given.as_posix())
    if shipped.exists():
        log.info("%s: %s is not in %s; using the one shipped with cmgems, %s", what, value,
                 Path.cwd(), shipped)
        return str(shipped)
    return value
