"""Evaluation of a CWoLa-trained model: sWeighted AUC always, true AUC where truth exists.

The rows are those CWoLa keeps (selection passed, mass in the signal region or a sideband):
the model's held-out test rows, or every such row of the given files. The dimuon mass of
these rows is fitted (Voigt peak + exponential in the window the regions span) and the
score's ROC AUC computed with the peak's sWeights as signal and the background's as
background (:mod:`bsym.training.sweights`). Where the files carry the truth label the
headline figures of ``bsym evaluate`` (AUC, rejections) are against the truth, unweighted;
without it they are those of the sWeighted ROC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from bsym.rootio import TreeSource, input_path, parse_inputs
from bsym.training.cwola import CwolaRows, read_cwola_rows
from bsym.training.sweights import MassFit, sweighted_auc, sweighted_roc_inputs, sweights

if TYPE_CHECKING:
    from bsym.training.checkpoint import LoadedModel

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CwolaEvaluation:
    """What ``bsym evaluate`` reports for a CWoLa model, and the ROC inputs it ranks by."""

    labels: npt.NDArray[np.int64]
    scores: FloatArray
    weights: FloatArray | None
    has_truth: bool
    auc_sweighted: float
    auc_sweighted_err: float
    fit: MassFit


def evaluation_rows(loaded: LoadedModel, data: Sequence[str] | None) -> CwolaRows:
    """The CWoLa rows a model is evaluated on, aligned with ``bsym evaluate``'s feature rows."""
    config = loaded.config
    if not data:
        sources = [TreeSource(input_path(r.path), r.tree) for r in loaded.split.sources]
        rows = read_cwola_rows(
            sources, config.features, config.supervision, max_rows=config.data.max_rows
        )
        return rows.take(loaded.split.test)
    sources = parse_inputs(data, default_tree=config.data.tree or config.features.tree)
    return read_cwola_rows(sources, config.features, config.supervision)


def evaluate_cwola(
    scores: FloatArray,
    rows: CwolaRows,
    *,
    window: tuple[float, float],
    n_bootstrap: int,
    seed: int,
) -> CwolaEvaluation:
    """sWeighted AUC of ``scores`` on ``rows``, and the labels the headline metrics use."""
    result = sweighted_auc(
        scores, rows.mass, low=window[0], high=window[1], n_bootstrap=n_bootstrap, seed=seed
    )
    if rows.truth is not None:
        known = rows.truth >= 0  # rows of neither class have no place in the truth ROC
        return CwolaEvaluation(
            rows.truth[known], scores[known], None, True, result.auc, result.auc_err, result.fit
        )
    signal, background = sweights(rows.mass, result.fit)
    labels, doubled, weights = sweighted_roc_inputs(scores, signal, background)
    return CwolaEvaluation(labels, doubled, weights, False, result.auc, result.auc_err, result.fit)
