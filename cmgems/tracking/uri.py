"""Where MLflow writes: the store a user named, else one SQLite store per runs root.

Everything a user runs from one folder logs to one store, `runs/mlflow.db` (pretraining's runs
root is the parent of its output folder, `runs/` by default; finetuning's is --runs-root, `runs/`
by default), so the one `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows them all.
Its artifacts live beside it in `runs/mlartifacts/`. MLflow keeps them as absolute paths; after
the runs folder is moved, `relocate_artifacts` (called whenever a cmgems command opens the store,
or by hand) points them to their new place.

This module imports neither mlflow nor torch: a URI is checked in a config's validation, before
anything starts.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import unquote, urlparse

from cmgems.errors import InputError

log = logging.getLogger("cmgems.tracking")

STORE_NAME, ARTIFACTS_NAME = "mlflow.db", "mlartifacts"
# The tracking store schemes MLflow 3 registers itself (a database scheme may carry a driver,
# postgresql+psycopg2); plugins add theirs as "mlflow.tracking_store" entry points.
MLFLOW_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                  "databricks-uc", "uc", "file")


def known_schemes() -> tuple[str, ...]:
    plugins = tuple(ep.name for ep in entry_points(group="mlflow.tracking_store"))
    return MLFLOW_SCHEMES + plugins


def check_tracking_uri(uri: str, source: str = "MLflow tracking URI") -> str:
    """The URI, or InputError naming `source` for one MLflow cannot open: an unknown scheme, or
    a file store (./mlruns), which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true."""
    if uri in ("databricks", "databricks-uc"):  # the default Databricks profile
        return uri
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if len(scheme) == 1:  # a Windows drive letter, C:\...: a path
        scheme = ""
    if scheme and scheme not in known_schemes():
        raise InputError(f"{source} {uri!r}: unknown scheme {scheme!r}; MLflow stores are "
                         f"{', '.join(s + '://' for s in known_schemes())} "
                         f"(e.g. sqlite:///runs/mlflow.db, http://host:5000)")
    allow_files = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    if scheme in ("", "file") and not allow_files:
        raise InputError(f"{source} {uri!r}: a file store, which MLflow 3 refuses unless "
                         f"MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///PATH/mlflow.db or a server")
    return uri


def resolve_tracking_uri(runs_root: str | Path | None = None, uri: str = "") -> str:
    """`uri` if given, else MLFLOW_TRACKING_URI (a shared server or any store), else
    sqlite:///<runs_root>/mlflow.db (runs_root: ./runs by default), one store for every run under
    that root so `mlflow ui` compares them side by side. InputError for a URI MLflow cannot open."""
    if uri:
        return check_tracking_uri(uri, "--tracking-uri")
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return check_tracking_uri(env, "MLFLOW_TRACKING_URI")
    root = Path(runs_root if runs_root is not None else "runs").resolve()
    root.mkdir(parents=True, exist_ok=True)
    relocate_artifacts(root / STORE_NAME)
    return f"sqlite:///{root / STORE_NAME}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it, not in ./mlruns of whatever the working
    directory was; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / ARTIFACTS_NAME).resolve().as_uri()
    return None


# Every column of MLflow's SQLite schema that holds an artifact location.
_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
              ("logged_models", "artifact_location"), ("model_versions", "source"),
              ("model_versions", "storage_location"))


def relocate_artifacts(db_path: str | Path) -> int:
    """Point the artifact locations of a moved SQLite store at the mlartifacts/ beside it.

    Locations under some other `.../mlartifacts` folder that no longer exists (where the store
    was made before the move) are rewritten to the one beside the store; returns the rows
    changed. A store that has not moved, is not there yet, or cannot be read is left alone.
    """
    db_path = Path(db_path)
    here = (db_path.parent / ARTIFACTS_NAME).resolve()
    if not db_path.is_file() or not here.is_dir():
        return 0
    new = here.as_uri()
    try:
        with sqlite3.connect(db_path, timeout=30) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if "experiments" not in tables:  # a store MLflow is still creating
                return 0
            rows = db.execute("SELECT artifact_location FROM experiments").fetchall()
            # only folders that are gone: a copied store may still share the original's
            old = {r for r in {_root_of(r[0]) for r in rows} - {None, new}
                   if not Path(unquote(urlparse(r).path)).exists()}
            changed = 0
            for prefix in old:
                for table, column in _LOCATIONS:
                    if table in tables:
                        changed += db.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new, len(prefix) + 1, len(prefix), prefix)).rowcount
    except sqlite3.Error as e:
        log.warning("MLflow store %s: artifact locations not checked (%s)", db_path, e)
        return 0
    if changed:
        log.warning("MLflow store %s was moved: %d artifact locations now point to %s",
                    db_path, changed, new)
    return changed


def _root_of(location: str | None) -> str | None:
    """The `.../mlartifacts` prefix of an artifact location (file URI), if it has one."""
    if not location or not location.startswith("file://"):
        return None
    head, sep, _ = location.partition(f"/{ARTIFACTS_NAME}/")
    if sep:
        return head + "/" + ARTIFACTS_NAME
    return location if location.endswith("/" + ARTIFACTS_NAME) else None
