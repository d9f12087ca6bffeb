"""The few-shot draw: which rows of a training pool each run trains on.

GeneMask / CM-GEMS repeat every few-shot experiment ten times, "selecting a random seed and a set
of n data points for each class, corresponding to each run". Run r therefore draws its own n
examples of every class, without replacement, from the training pool, with
numpy.random.default_rng([seed, r]); the draw depends on nothing else, so every model evaluated
with the same seed trains on the same sets, and anyone can recompute a run's rows outside cmgems.

Rows are 0-based indices of the pool's examples (row 0 = the first line after the header; blank
lines are not rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.errors import InputError

DRAW_RULE = ("n per class without replacement; run r: numpy.random.default_rng([seed, r])"
             ".permutation of the pool, the first n of each class in that order")


def class_counts(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes)[:classes]


@dataclass(frozen=True)
class ShotPool:
    """A training pool and the number n of examples per class each run draws from it."""

    path: Path
    labels: np.ndarray  # [N] class of each pool row
    classes: int
    shots: int  # n per class

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def per_class(self) -> list[int]:
        return class_counts(self.labels, self.classes).tolist()

    @property
    def single_draw(self) -> bool:
        """The pool holds exactly n of every class: every run trains on all of it."""
        return all(c == self.shots for c in self.per_class)

    def rows(self, seed: int, run: int) -> np.ndarray:
        """Sorted pool rows of run `run`: n of every class."""
        perm = np.random.default_rng([seed, run]).permutation(self.size)
        order = perm[np.argsort(self.labels[perm], kind="stable")]
        first = np.searchsorted(self.labels[order], np.arange(self.classes))
        take = (first[:, None] + np.arange(self.shots)[None, :]).ravel()
        return np.sort(order[take])

    def describe(self) -> dict:
        return {"path": str(self.path), "size": self.size, "per_class": self.per_class,
                "shots": self.shots, "draw": DRAW_RULE}


def infer_shots(path: Path, labels: np.ndarray, classes: int) -> int:
    """n of a file that holds exactly n examples of every class (one draw, as Prom-core's
    10/train.tsv); any other file needs the number given. A file in a folder named by a number
    (GeneMask's <n>/train.tsv layout) must hold that many per class: a "10-shot" file of 100 per
    class trained whole would be a 100-shot run reported as 10-shot."""
    counts = class_counts(labels, classes)
    if not (counts == counts[0]).all():
        raise InputError(f"{path}: holds {counts.tolist()} examples per class, not one draw of n "
                         f"per class: give the number of shots (--shots N) to draw from it")
    n = int(counts[0])
    folder = Path(path).parent.name
    if folder.isdigit() and int(folder) != n:
        raise InputError(f"{path}: holds {n} examples of every class but sits in a folder named "
                         f"{folder}: give --shots ({folder} to draw {folder} per class in each "
                         f"run from it, {n} to train every run on the whole file)")
    return n


def shot_pool(path: Path, labels: np.ndarray, classes: int, shots: int | None,
              shot_file: tuple[Path, np.ndarray] | None = None) -> ShotPool:
    """The pool at `path` with n = shots, or n inferred from shot_file (path, labels) or else
    from the pool itself. A class with fewer than n examples in the pool is an error."""
    if shots is None:
        src = shot_file or (path, labels)
        shots = infer_shots(src[0], src[1], classes)
    if shots < 1:
        raise InputError(f"shots must be >= 1, got {shots}")
    counts = class_counts(labels, classes)
    short = np.flatnonzero(counts < shots)
    if short.size:
        c = int(short[0])
        raise InputError(f"{path}: class {c} has {counts[c]} examples, fewer than the {shots} "
                         f"shots each run draws per class (the pool holds {counts.tolist()} "
                         f"per class)")
    return ShotPool(Path(path), labels, classes, int(shots))
