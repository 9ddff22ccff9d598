"""ROC curve and area under it, weighted and tie-aware, in numpy alone."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def roc_auc(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> float:
    """Probability that a positive outscores a negative (ties count one half), weighted.

    Equal to the Mann-Whitney U statistic with mid-ranks; weights may be negative
    (sWeights), as long as each class sums to a positive total.
    """
    positive, negative, _ = _grouped(labels, scores, weights, descending=False)
    negative_below = np.cumsum(negative) - negative
    total = positive.sum() * negative.sum()
    return float(np.sum(positive * (negative_below + 0.5 * negative)) / total)


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """False and true positive rates for a cut ``score >= threshold`` at every distinct score.

    Returns ``(fpr, tpr, thresholds)``, thresholds descending and starting at +inf, where
    nothing is selected, so the curve runs from (0, 0) to (1, 1).
    """
    positive, negative, distinct = _grouped(labels, scores, weights, descending=True)
    tpr = np.concatenate(([0.0], np.cumsum(positive) / positive.sum()))
    fpr = np.concatenate(([0.0], np.cumsum(negative) / negative.sum()))
    thresholds = np.concatenate(([np.inf], distinct))
    return fpr, tpr, thresholds


def _grouped(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    weights: npt.ArrayLike | None,
    *,
    descending: bool,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Summed positive and negative weight per distinct score, and those scores, in order."""
    y, s, w = _validated(labels, scores, weights)
    order = np.argsort(-s if descending else s, kind="stable")
    s, y, w = s[order], y[order], w[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1))
    return np.add.reduceat(w * y, starts), np.add.reduceat(w * (1 - y), starts), s[starts]


def _validated(
    labels: npt.ArrayLike, scores: npt.ArrayLike, weights: npt.ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not len(y) == len(s) == len(w):
        raise ValueError(f"labels ({len(y)}), scores ({len(s)}) and weights ({len(w)}) differ")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not (np.isfinite(s).all() and np.isfinite(w).all()):
        raise ValueError("scores and weights must be finite")
    y = y.astype(np.float64)
    if not (np.sum(w * y) > 0 and np.sum(w * (1 - y)) > 0):
        raise ValueError("a ROC curve needs both classes with positive total weight")
    return y, s, w
