"""A rotation-invariant reference for the calo-rotation study: how far can invariants go?

Each event becomes the energy-weighted histograms of the distances between all pairs of its
points (weight E_i·E_j / (ΣE)², 24 bins from 0 to 1.2) and of the distance of each point from
the origin, the centre of the rotations (weight E_i / ΣE, the same bins), plus the number of
points and log ΣE; none of these changes under rotations about the origin. They are not
sufficient statistics, so the reference is a lower bound on the invariant ideal, not the
ideal itself. A small MLP (24+24+2 → 64 → 64 → 1) trained on
many events gives the AUC an invariant classifier reaches on pre-detector particles (close
to the rotation-invariant ideal, which the networks of the study cannot beat) and on the
detector's cells (what the detector leaves of it).
"""

from __future__ import annotations

import copy

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bsym.simulate.calo_rotation import Hits
from bsym.training.metrics import roc_auc

DISTANCE_EDGES = np.linspace(0.0, 1.2, 25)
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
    """Test AUC of the MLP on invariant features, kept at its best validation epoch."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        (torch.from_numpy(invariant_features(hits)), labels) for hits, labels in (train, val, test)
    )
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    model = nn.Sequential(nn.Linear(x_train.shape[1], 64), nn.ReLU(), nn.Linear(64, 64))
    model.append(nn.ReLU())
    model.append(nn.Linear(64, 1))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    target = torch.from_numpy(y_train.astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    best_auc, best_state = -1.0, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(target), generator=generator)
        for start in range(0, len(order), 128):
            index = order[start : start + 128]
            logits = model((x_train[index] - mean) / std)[:, 0]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, target[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
        model.eval()
        with torch.no_grad():
            auc = roc_auc(y_val, model((x_val - mean) / std)[:, 0].numpy())
        if auc > best_auc:
            best_auc, best_state = auc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    with torch.no_grad():
        return roc_auc(y_test, model((x_test - mean) / std)[:, 0].numpy())
