"""A small toy of b, c and light jets as feature tensors, for the flavour model tests.

Columns of ``constituents``: signed d0 and z0 significances, log(pT fraction), charge, the
track 3-momentum and the 3-D point of closest approach; ``globals``: jet pT, η, φ. b jets have
the widest positive significance tails, c jets less, light jets none: every model can learn it.
"""

from __future__ import annotations

import numpy as np

from bsym.features import Constituents, Feature, FeatureBatch, FeatureSpec

TRACK_BRANCHES = (
    "PFCands_sd0sig",
    "PFCands_sz0sig",
    "PFCands_logptfrac",
    "PFCands_charge",
    "PFCands_px",
    "PFCands_py",
    "PFCands_pz",
    "PFCands_vx",
    "PFCands_vy",
    "PFCands_vz",
)
JET_BRANCHES = ("Jet_pt", "Jet_eta", "Jet_phi")
MAX_TRACKS = 8


def toy_spec() -> FeatureSpec:
    return FeatureSpec(
        tree="Events",
        objects="Jet",
        constituents=Constituents(
            features=[Feature(branch=b) for b in TRACK_BRANCHES], max_count=MAX_TRACKS
        ),
        globals=[Feature(branch=b) for b in JET_BRANCHES],
        label=None,
    )


def toy_batch(n_jets: int, seed: int) -> FeatureBatch:
    """``n_jets`` jets, labels 0 (light), 1 (c), 2 (b) in equal shares, some without tracks."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n_jets).astype(np.int64)
    n_tracks = rng.integers(0, MAX_TRACKS + 1, n_jets)
    n_tracks[: n_jets // 2] = np.maximum(n_tracks[: n_jets // 2], 2)
    mask = np.arange(MAX_TRACKS)[None, :] < n_tracks[:, None]
    pt = rng.uniform(30.0, 200.0, n_jets)
    eta = rng.uniform(-2.0, 2.0, n_jets)
    phi = rng.uniform(-np.pi, np.pi, n_jets)
    axis = np.stack([np.cos(phi) / np.cosh(eta), np.sin(phi) / np.cosh(eta), np.tanh(eta)], -1)
    shape = (n_jets, MAX_TRACKS)
    displaced = rng.random(shape) < np.array([0.05, 0.3, 0.6])[label][:, None]
    flight = np.where(displaced, rng.exponential(0.3, shape), 0.0)
    noise = rng.normal(0.0, 0.01, (*shape, 3))
    closest = flight[..., None] * perpendicular(axis, rng, shape) + noise
    fraction = rng.uniform(0.01, 0.5, shape)
    momentum = (fraction * pt[:, None])[..., None] * (
        axis[:, None, :] + 0.1 * rng.normal(size=(*shape, 3))
    )
    sd0 = (
        np.abs(rng.normal(0, 1, shape))
        * np.where(displaced, 8.0, 1.0)
        * rng.choice([-1, 1], shape, p=[0.3, 0.7])
    )
    sz0 = rng.normal(0, 1, shape) * np.where(displaced, 5.0, 1.0)
    charge = rng.choice([-1.0, 1.0], shape)
    tracks = np.concatenate(
        [np.stack([sd0, sz0, np.log(fraction), charge], -1), momentum, closest], -1
    )
    tracks = (tracks * mask[..., None]).astype(np.float32)
    globals_ = np.stack([pt, eta, phi], -1).astype(np.float32)
    return FeatureBatch(
        n_rows=n_jets,
        constituents=tracks,
        mask=mask,
        globals=globals_,
        label=label,
        weight=None,
        counts=None,
    )


def perpendicular(axis: np.ndarray, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random unit vectors perpendicular to each jet's axis, [N, T, 3]."""
    raw = rng.normal(size=(*shape, 3))
    raw -= (raw * axis[:, None, :]).sum(-1, keepdims=True) * axis[:, None, :]
    return raw / np.linalg.norm(raw, axis=-1, keepdims=True)
