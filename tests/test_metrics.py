"""cmgems.metrics against scikit-learn (a test-only dependency) on random and edge-case labels."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from cmgems.evaluation import metrics


@pytest.mark.parametrize("n_classes", [2, 3, 9])
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn_on_random_labels(n_classes, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    t = rng.integers(0, n_classes, n)
    # Predictions correlated with the truth, so MCC is not always near 0.
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, n_classes, n))
    got = metrics.classification_metrics(t, p)
    assert got["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0), abs=1e-12)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(t, p), abs=1e-12)


@pytest.mark.parametrize("t,p", [
    ([0, 0, 0, 0], [0, 0, 0, 0]),          # one class everywhere: MCC defined as 0
    ([0, 1, 0, 1], [1, 1, 1, 1]),          # constant prediction
    ([0, 1, 2, 2], [2, 0, 1, 0]),          # all wrong
    ([0, 1, 0, 1], [0, 1, 0, 1]),          # perfect
    ([3, 3, 5, 7], [3, 4, 5, 7]),          # labels not 0-based, a predicted class absent from truth
])
def test_metrics_match_sklearn_on_edge_cases(t, p):
    got = metrics.classification_metrics(t, p)
    assert got["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert got["f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
    assert got["mcc"] == pytest.approx(matthews_corrcoef(t, p))


def test_length_mismatch_and_empty_are_rejected():
    with pytest.raises(ValueError):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        metrics.mcc([], [])


def test_summarize_mean_and_sample_std():
    runs = [{"mcc": 0.5, "accuracy": 0.7}, {"mcc": 0.7, "accuracy": 0.9}, {"mcc": 0.6, "accuracy": 0.8}]
    s = metrics.summarize(runs)
    assert s["mean"]["mcc"] == pytest.approx(0.6)
    assert s["std"]["mcc"] == pytest.approx(np.std([0.5, 0.7, 0.6], ddof=1))
    assert metrics.summarize(runs[:1])["std"]["accuracy"] == 0.0
