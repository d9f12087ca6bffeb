"""Classification metrics in numpy: accuracy, macro F1 and Matthews correlation (multi-class too).

Definitions follow scikit-learn's accuracy_score, f1_score(average="macro", zero_division=0) and
matthews_corrcoef, so numbers are comparable with DNABERT-2's GUE scripts, without depending on
sklearn at run time.
"""
from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "mcc")


def _as_labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
    if t.size == 0:
        raise ValueError("no labels")
    return t, p


def confusion_matrix(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """(classes, C) where C[i, j] counts true class classes[i] predicted as classes[j].

    classes is the sorted union of the labels in y_true and y_pred.
    """
    t, p = _as_labels(y_true, y_pred)
    classes, inv = np.unique(np.concatenate([t, p]), return_inverse=True)
    n = len(classes)
    ti, pi = inv[:t.size], inv[t.size:]
    cm = np.bincount(ti * n + pi, minlength=n * n).reshape(n, n)
    return classes, cm


def accuracy(y_true, y_pred) -> float:
    t, p = _as_labels(y_true, y_pred)
    return float(np.mean(t == p))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean of per-class F1 over every label present in y_true or y_pred.

    A class with no true and no predicted member cannot occur (it would not be in the union); a
    class with tp = 0 scores 0 (sklearn's zero_division=0).
    """
    _, cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def mcc(y_true, y_pred) -> float:
    """Matthews correlation, Gorodkin's multi-class R_K; 0 when either side has one class only."""
    _, cm = confusion_matrix(y_true, y_pred)
    cm = cm.astype(np.float64)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n_correct = np.trace(cm)
    n = cm.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """{"accuracy", "f1" (macro), "mcc"} of one prediction."""
    return {"accuracy": accuracy(y_true, y_pred), "f1": macro_f1(y_true, y_pred),
            "mcc": mcc(y_true, y_pred)}


def summarize(per_run: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of each metric over runs."""
    if not per_run:
        raise ValueError("no runs to summarize")
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for name in per_run[0]:
        v = np.array([r[name] for r in per_run], dtype=np.float64)
        out["mean"][name] = float(v.mean())
        out["std"][name] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return out


def mean_std(mean: float | None, std: float, scale: float = 100.0, digits: int = 2,
             with_std: bool = True) -> str:
    """A summary as a table cell: '61.50 ± 3.20' (x scale), the mean alone without with_std (a
    single run), 'n/a' when there is no finite mean."""
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if with_std else text
