"""Continual-learning metrics over the accuracy matrix of a stream.

Notation (0-based): ``A[t][i]`` is the accuracy, measured after training on segment ``t``, on the
test rows that belong to segment ``i`` (its classes, or its domains). Row ``t`` is produced by
:func:`accuracy_matrix_row` after segment ``t``; ``T`` is the number of rows so far. Because our
probes classify over all classes, entries with ``i > t`` (segments not yet seen) are defined too
and feed forward transfer. NaN entries (a segment with no test rows) are ignored by every average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def accuracy_matrix_row(
    preds: np.ndarray,
    labels: np.ndarray,
    segment_classes: Sequence[Sequence[Any]],
    *,
    groups: np.ndarray | None = None,
) -> list[float]:
    """Accuracy restricted to each segment: entry ``i`` is the fraction of correct predictions
    among test rows whose label is in ``segment_classes[i]``.

    For domain-incremental streams pass ``groups`` (one domain value per test row) and list the
    domains of each segment in ``segment_classes``; membership is then tested on ``groups``.
    A segment with no test rows gets NaN.
    """
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape")
    key = labels if groups is None else np.asarray(groups)
    if key.shape != labels.shape:
        raise ValueError(f"groups {key.shape} and labels {labels.shape} differ in shape")
    correct = preds == labels
    row = []
    for members in segment_classes:
        mask = np.isin(key, list(members))
        row.append(float(correct[mask].mean()) if mask.any() else float("nan"))
    return row


def _as_matrix(A: Matrix) -> np.ndarray:
    """Rows may have different lengths (a row per segment seen so far); pad with NaN."""
    rows = [np.asarray(r, dtype=np.float64).ravel() for r in A]
    if not rows:
        raise ValueError("accuracy matrix is empty")
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for t, r in enumerate(rows):
        out[t, : len(r)] = r
    if width < len(rows):
        raise ValueError(f"accuracy matrix needs at least as many columns as rows, got {out.shape}")
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def average_accuracy(A: Matrix) -> float:
    """``mean_{i <= T-1} A[T-1][i]``: accuracy on all segments seen so far, after the last one."""
    M = _as_matrix(A)
    T = M.shape[0]
    return _nanmean(M[T - 1, :T])


def average_forgetting(A: Matrix, *, since_learned: bool = False) -> float:
    """Average forgetting (Chaudhry et al., 2018, "Riemannian Walk"):

    ``f_i = max_{l in 0..T-2} A[l][i] - A[T-1][i]`` for each earlier segment ``i < T-1``, and the
    result is ``mean_i f_i``. With ``since_learned=True`` the max runs over ``l in i..T-2`` only
    (accuracy before segment ``i`` was trained on cannot be "forgotten"), a common variant.
    Positive = the encoder got worse on old segments. NaN when ``T < 2``.
    """
    M = _as_matrix(A)
    T = M.shape[0]
    if T < 2:
        return float("nan")
    f = []
    for i in range(T - 1):
        past = M[(i if since_learned else 0) : T - 1, i]
        past = past[~np.isnan(past)]
        if past.size and not np.isnan(M[T - 1, i]):
            f.append(past.max() - M[T - 1, i])
    return float(np.mean(f)) if f else float("nan")


def backward_transfer(A: Matrix) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017, GEM):

    ``BWT = mean_{i < T-1} (A[T-1][i] - A[i][i])``: how much training on later segments changed
    accuracy on segment ``i`` relative to right after learning it. Negative = forgetting.
    NaN when ``T < 2``.
    """
    M = _as_matrix(A)
    T = M.shape[0]
    if T < 2:
        return float("nan")
    return _nanmean(np.array([M[T - 1, i] - M[i, i] for i in range(T - 1)]))


def forward_transfer(A: Matrix, baseline: Sequence[float]) -> float:
    """Forward transfer (Lopez-Paz & Ranzato, 2017):

    ``FWT = mean_{1 <= i <= T-1} (A[i-1][i] - b[i])``, where ``b[i]`` is the accuracy on segment
    ``i`` of the encoder before any training (random init or the HPT starting point): how much
    the segments before ``i`` already help on ``i``. NaN when ``T < 2``.
    """
    M = _as_matrix(A)
    T = M.shape[0]
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape[0] < T:
        raise ValueError(f"baseline needs one accuracy per segment (>= {T}), got {b.shape[0]}")
    if T < 2:
        return float("nan")
    return _nanmean(np.array([M[i - 1, i] - b[i] for i in range(1, T)]))


def continual_summary(A: Matrix, baseline: Sequence[float] | None = None, *, prefix: str = "eval/") -> dict[str, float]:
    """The metrics above as one flat dict for logging (``fwt`` only when a baseline is given)."""
    out = {
        f"{prefix}avg_acc": average_accuracy(A),
        f"{prefix}forgetting": average_forgetting(A),
        f"{prefix}bwt": backward_transfer(A),
    }
    if baseline is not None:
        out[f"{prefix}fwt"] = forward_transfer(A, baseline)
    return out


def forgetting_and_accuracy(A: np.ndarray) -> tuple[float, float]:
    """(average forgetting, average accuracy) of one matrix, NaN for a matrix with no value:
    what ``results.json``, reports and logged stream metrics all show, so they agree."""
    if np.isnan(A).all():
        return float("nan"), float("nan")
    return average_forgetting(A), average_accuracy(A)
