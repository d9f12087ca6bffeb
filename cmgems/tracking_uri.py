"""Where MLflow writes: a shared server if the user named one, else one SQLite store per runs root."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_tracking_uri(runs_root: str | Path = "runs") -> str:
    """MLFLOW_TRACKING_URI wins (a shared server or any store); else sqlite:///<runs_root>/mlflow.db,
    one store for every run under that root so `mlflow ui` compares them side by side."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(runs_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"
