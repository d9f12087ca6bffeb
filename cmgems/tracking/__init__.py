"""MLflow: the tracker that never stops a run, where the store is, plots."""
