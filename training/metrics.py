"""ROC curve, the area under it and the working points on it, weighted and tie-aware.

A working point reads the ROC curve of the cut ``score >= threshold`` at a fixed signal or
background efficiency, interpolated linearly between the curve's points; where the curve
runs flat through the target (ties, or events of one class only), the best cut at that
efficiency is taken: the least background at a signal efficiency, the most signal at a
background efficiency.
"""

from __future__ import annotations

import math

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


def signal_efficiency(fpr: FloatArray, tpr: FloatArray, background_efficiency: float) -> float:
    """ε_S of the ROC curve ``(fpr, tpr)`` where it reaches ``background_efficiency``."""
    if not 0 <= background_efficiency <= 1:
        raise ValueError(f"background efficiency must lie in [0, 1], got {background_efficiency}")
    # np.interp takes the last of repeated fpr values: the most signal at that background
    return float(np.interp(background_efficiency, fpr, tpr))


def background_rejection(fpr: FloatArray, tpr: FloatArray, signal_efficiency: float) -> float:
    """1/ε_B of the ROC curve ``(fpr, tpr)`` where it reaches ``signal_efficiency``.

    Infinite where no background passes at that efficiency.
    """
    if not 0 < signal_efficiency <= 1:
        raise ValueError(f"signal efficiency must lie in (0, 1], got {signal_efficiency}")
    # The first ROC point reaching the efficiency, and the one before it, bracket the target;
    # searching from the left skips flat stretches where only background is added.
    above = int(np.searchsorted(tpr, signal_efficiency, side="left"))
    above = min(above, len(tpr) - 1)
    if above == 0 or tpr[above] == tpr[above - 1]:
        background = float(fpr[above])
    else:
        fraction = (signal_efficiency - tpr[above - 1]) / (tpr[above] - tpr[above - 1])
        background = float(fpr[above - 1] + fraction * (fpr[above] - fpr[above - 1]))
    return math.inf if background <= 0 else 1.0 / background


def signal_efficiency_at(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    background_efficiency: float,
    weights: npt.ArrayLike | None = None,
) -> float:
    """Signal efficiency where the background efficiency reaches ``background_efficiency``."""
    fpr, tpr, _ = roc_curve(labels, scores, weights)
    return signal_efficiency(fpr, tpr, background_efficiency)


def rejection_at(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    signal_efficiency: float,
    weights: npt.ArrayLike | None = None,
) -> float:
    """Background rejection 1/ε_B where the signal efficiency reaches ``signal_efficiency``."""
    fpr, tpr, _ = roc_curve(labels, scores, weights)
    return background_rejection(fpr, tpr, signal_efficiency)


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


B_EFFICIENCIES = (0.70, 0.77)
"""The b-jet efficiencies at which flavour taggers quote their light and c rejection."""


def flavour_figures(
    label: npt.ArrayLike,
    discriminant: npt.ArrayLike,
    backgrounds: dict[str, int],
    signal: int,
    weights: npt.ArrayLike | None = None,
    efficiencies: tuple[float, ...] = B_EFFICIENCIES,
) -> dict[str, float]:
    """A multi-class tagger's figures on its discriminant (D_b), signal against each
    background class alone: ``<name>_rej<eff%>`` (1/ε of that background at each signal
    efficiency) and ``<name>_auc``, for every ``name: class index`` of ``backgrounds``."""
    y = np.asarray(label).reshape(-1)
    d = np.asarray(discriminant, dtype=np.float64).reshape(-1)
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    figures: dict[str, float] = {}
    for name, background in backgrounds.items():
        rows = (y == signal) | (y == background)
        binary = (y[rows] == signal).astype(np.int64)
        chosen = None if w is None else w[rows]
        fpr, tpr, _ = roc_curve(binary, d[rows], chosen)
        for efficiency in efficiencies:
            figures[f"{name}_rej{round(100 * efficiency)}"] = background_rejection(
                fpr, tpr, efficiency
            )
        figures[f"{name}_auc"] = roc_auc(binary, d[rows], chosen)
    return figures
