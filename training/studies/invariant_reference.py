"""A rotation-invariant reference for the calo-rotation study: how far can invariants go?

Each event becomes the energy-weighted histograms of the distances between all pairs of its
points (weight E_i·E_j / (ΣE)², 24 bins from 0 to 1.2) and of the distance of each point from
the origin, the centre of the rotations (weight E_i / ΣE, the same bins), plus the number of
points and log ΣE; none of these changes under rotations about the origin. They are not
sufficient statistics, so the reference is a lower bound on the invariant ideal, not the
ideal itself. A small MLP (24+24+2 → 64 → 64 → 1, model type ``dnn``) trained on
many events gives the AUC an invariant classifier reaches on pre-detector particles (close
to the rotation-invariant ideal, which the networks of the study cannot beat) and on the
detector's cells (what the detector leaves of it).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from bsym.features import FeatureBatch
from bsym.simulate.calo_rotation import Hits
from bsym.training.fit import OptimizerConfig, Rows, classifier_auc, fit, predict_logits
from bsym.training.models import DNN

DISTANCE_EDGES = np.linspace(0.0, 1.2, 25)
HIDDEN = (64, 64)
# the two histograms, the number of points and log ΣE
N_FEATURES = 2 * (len(DISTANCE_EDGES) - 1) + 2
Floats = npt.NDArray[np.float64]


def invariant_features(hits: Hits) -> npt.NDArray[np.float32]:
    """[N, 50]: the pair-distance and radial histograms, the number of points and log ΣE."""
    n_points = int(hits.counts.max()) if hits.n_events else 0
    offsets = np.concatenate(([0], np.cumsum(hits.counts)))
    position = np.arange(len(hits.x)) - np.repeat(offsets[:-1], hits.counts)
    event = hits.event_index
    padded = np.zeros((hits.n_events, max(n_points, 1), 3))
    padded[event, position] = np.stack([hits.x, hits.y, hits.energy], axis=1)
    x, y, energy = padded[..., 0], padded[..., 1], padded[..., 2]
    total = np.maximum(energy.sum(axis=1), 1e-12)
    weight = energy[:, :, None] * energy[:, None, :] / total[:, None, None] ** 2
    distance = np.hypot(x[:, :, None] - x[:, None, :], y[:, :, None] - y[:, None, :])
    upper = np.triu(np.ones((padded.shape[1], padded.shape[1]), dtype=bool), k=1)
    bins = np.clip(np.digitize(distance, DISTANCE_EDGES) - 1, 0, len(DISTANCE_EDGES) - 2)
    histogram = np.zeros((hits.n_events, len(DISTANCE_EDGES) - 1))
    rows = np.broadcast_to(np.arange(hits.n_events)[:, None, None], distance.shape)
    chosen = np.broadcast_to(upper, distance.shape)
    np.add.at(histogram, (rows[chosen], bins[chosen]), weight[chosen])
    radial_bins = np.clip(
        np.digitize(np.hypot(hits.x, hits.y), DISTANCE_EDGES) - 1, 0, len(DISTANCE_EDGES) - 2
    )
    radial = np.zeros_like(histogram)
    np.add.at(radial, (event, radial_bins), hits.energy / total[event])
    extra = np.stack([hits.counts.astype(np.float64), np.log(total)], axis=1)
    features: npt.NDArray[np.float32] = np.concatenate([histogram, radial, extra], axis=1).astype(
        np.float32
    )
    return features


def reference_auc(
    train: tuple[Hits, npt.NDArray[np.int64]],
    val: tuple[Hits, npt.NDArray[np.int64]],
    test: tuple[Hits, npt.NDArray[np.int64]],
    *,
    epochs: int = 30,
    seed: int = 0,
) -> float:
    """Test AUC of the MLP on invariant features, kept at its best validation epoch: a
    ``dnn`` (standardised inputs, 64 → 64 → 1) fitted by the one training loop, with no
    early stop (patience = epochs), batches of 128, Adam at lr 1e-3."""
    train_rows, val_rows, test_rows = (
        _rows(invariant_features(hits), labels) for hits, labels in (train, val, test)
    )
    torch.manual_seed(seed)
    model = DNN(N_FEATURES, HIDDEN)
    model.prepare(train_rows)
    schedule = OptimizerConfig(lr=1e-3, batch_size=128, epochs=epochs, patience=epochs)
    fit(model, Rows.of(model, train_rows), Rows.of(model, val_rows), schedule, seed=seed)
    rows = Rows.of(model, test_rows)
    return classifier_auc(rows.label, predict_logits(model, rows.inputs), None)


def _rows(features: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]) -> FeatureBatch:
    return FeatureBatch(len(labels), None, None, features, labels, None, None)
