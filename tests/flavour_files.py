"""A hand-made file of jets and tracks in the PFNano event layout, and a small three-class
flavour tagger's training config for it, shared by the multi-class tests.

Each event holds 0–4 jets of flavour 0, 4 or 5 (``Jet_hadronFlavour``) and a few entries of
``JetPFCands`` linked to their jet by ``JetPFCands_jetIdx``; a track's
``JetPFCands_btagSip3dVal`` grows with its jet's flavour, so a tagger can tell them apart.
The spec reads only branches the real PFNano file has too, so the model scores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np

from bsym.simulate.rootwrite import write_branches
from bsym.training.config import TrainConfig, config_from_dict

FLAVOURS = (0, 4, 5)
CLASS_LABELS = ["pu", "pc", "pb"]
MEAN_SIGNIFICANCE = {0: 0.0, 4: 2.0, 5: 4.0}


def write_jets(path: Path, events: int, *, seed: int, odd_flavour: int | None = None) -> Path:
    """``events`` events of the PFNano jet layout; ``odd_flavour`` gives one jet in ten that
    flavour (a value of no class)."""
    rng = np.random.default_rng(seed)
    n_jet = rng.integers(0, 5, events)
    jets = int(n_jet.sum())
    flavour = rng.choice(FLAVOURS, jets, p=[0.5, 0.2, 0.3]).astype(np.int32)
    if odd_flavour is not None:
        flavour[rng.random(jets) < 0.1] = odd_flavour
    pt = rng.exponential(40, jets).astype(np.float32) + 20
    eta = rng.uniform(-2.4, 2.4, jets).astype(np.float32)
    tracks = rng.integers(1, 7, jets)
    jet_of = np.repeat(np.arange(jets), tracks)
    centre = np.array([MEAN_SIGNIFICANCE.get(int(f), 1.0) for f in flavour])[jet_of]
    significance = (centre + rng.normal(0, 1.5, jet_of.size)).astype(np.float32)
    track_pt = (pt[jet_of] * rng.uniform(0.02, 0.3, jet_of.size)).astype(np.float32)
    first_jet = np.concatenate(([0], np.cumsum(n_jet)[:-1]))
    event_of_jet = np.repeat(np.arange(events), n_jet)
    local = (np.arange(jets) - first_jet[event_of_jet]).astype(np.int32)
    tracks_per_event = np.bincount(event_of_jet, weights=tracks, minlength=events).astype(int)

    def per_event(values: Any, counts: Any) -> ak.Array:
        return ak.unflatten(values, counts)

    return write_branches(
        path,
        "Events",
        {
            "Jet": ak.zip(
                {
                    "pt": per_event(pt, n_jet),
                    "eta": per_event(eta, n_jet),
                    "hadronFlavour": per_event(flavour, n_jet),
                }
            ),
            "JetPFCands": ak.zip(
                {
                    "pt": per_event(track_pt, tracks_per_event),
                    "btagSip3dVal": per_event(significance, tracks_per_event),
                    "jetIdx": per_event(local[jet_of], tracks_per_event),
                }
            ),
        },
    )


def flavour_config(train: list[str], out: Path, *overrides: tuple[str, Any]) -> TrainConfig:
    """A small PFN with three outputs (light, c, b), balanced class weights and D_b."""
    data: dict[str, Any] = {
        "name": "flavour_pfn",
        "model": {"type": "pfn", "phi_sizes": [16, 16], "f_sizes": [16]},
        "features": {
            "tree": "Events",
            "objects": "Jet",
            "constituents": {
                "features": [
                    {"branch": "JetPFCands_pt", "transform": "log"},
                    {"branch": "JetPFCands_btagSip3dVal"},
                ],
                "max_count": 8,
                "link": "JetPFCands_jetIdx",
            },
            "globals": [{"branch": "Jet_pt", "transform": "log"}, {"branch": "Jet_eta"}],
            "label": {"branch": "Jet_hadronFlavour", "classes": [[0], [4], [5]]},
        },
        "data": {"train": train, "test_fraction": 0.25},
        "class_labels": CLASS_LABELS,
        "class_weights": "balanced",
        "discriminant": {"f_c": 0.1},
        "optimizer": {"epochs": 4, "batch_size": 128},
        "output_dir": str(out),
    }
    for key, value in overrides:
        data[key] = value
    return config_from_dict(data)
