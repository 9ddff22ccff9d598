"""Tests of the toy muon-isolation simulation and its ROOT output."""

from __future__ import annotations

import time
from pathlib import Path

import awkward as ak
import numpy as np
import numpy.typing as npt
import pytest
import uproot

from bsym.errors import ConfigError
from bsym.simulate import IsolationConfig, simulate_isolation, write_isolation
from bsym.simulate.isolation import CELL_DETA, CELL_DPHI, WINDOW_RADIUS

N_EVENTS = 3_000
SEED = 7

MUON_SCALARS = {
    "Muon_pt": "float32",
    "Muon_eta": "float32",
    "Muon_phi": "float32",
    "Muon_charge": "int32",
    "Muon_pfRelIso03_all": "float32",
    "Muon_pfRelIso04_all": "float32",
    "Muon_pfRelIso03_chg": "float32",
    "Muon_coneIso03": "float32",
    "Muon_coneIso04": "float32",
    "Muon_sumTrackPt03": "float32",
    "Muon_genPartFlav": "int32",
    "Muon_fromPair": "int32",
}
PAIR = {
    "dimuon_os": "int32",
    "dimuon_leadPt": "float32",
    "dimuon_leadEta": "float32",
    "dimuon_selected": "int32",
}
CELLS = {"CaloCell_eta": "float32", "CaloCell_phi": "float32", "CaloCell_et": "float32"}
TRAINING_BRANCHES = {
    **MUON_SCALARS,
    "dimuon_mass": "float32",
    "event": "int64",
    "nCaloCell": "int32",
    **CELLS,
    **PAIR,
}
EVENT_BRANCHES = {
    "nMuon": "int32",
    **MUON_SCALARS,
    "nCaloCell": "int32",
    **CELLS,
    "CaloCell_muonIdx": "int32",
    "dimuon_mass": "float32",
    "event": "int64",
    **PAIR,
}


@pytest.fixture(scope="module")
def layouts() -> tuple[ak.Array, ak.Array]:
    """The in-memory training and event layouts of a small sample."""
    return simulate_isolation(N_EVENTS, seed=SEED)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same sample written to ROOT files, split in two chunks."""
    out = tmp_path_factory.mktemp("isolation")
    return write_isolation(out, N_EVENTS, seed=SEED, events_per_file=2_000)


def _auc(signal: npt.NDArray[np.float64], background: npt.NDArray[np.float64]) -> float:
    """Rank-based ROC AUC: probability that a signal value exceeds a background value."""
    values = np.concatenate((signal, background))
    ranks = np.empty(values.size)
    ranks[np.argsort(values, kind="stable")] = np.arange(1, values.size + 1)
    n_s, n_b = signal.size, background.size
    return float((ranks[:n_s].sum() - n_s * (n_s + 1) / 2) / (n_s * n_b))


def _leaf_dtype(branch: uproot.TBranch) -> str:
    """The numpy dtype name of a (possibly jagged) branch's values."""
    interpretation = branch.interpretation
    content = getattr(interpretation, "content", interpretation)
    return str(content.to_dtype)


def _read(path: Path, tree: str) -> ak.Array:
    """All branches of ``tree`` in ``path``."""
    with uproot.open(path) as file:
        return file[tree].arrays()


def test_file_names_and_atomic_write(written: list[Path]) -> None:
    names = [p.name for p in written]
    assert names == [
        "isolation_muons_000.root",
        "isolation_events_000.root",
        "isolation_muons_001.root",
        "isolation_events_001.root",
    ]
    folder = written[0].parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(names), "temporary files left"


@pytest.mark.parametrize(
    ("tree", "expected"), [("Muons", TRAINING_BRANCHES), ("Events", EVENT_BRANCHES)]
)
def test_branch_names_and_dtypes(written: list[Path], tree: str, expected: dict[str, str]) -> None:
    path = written[0] if tree == "Muons" else written[1]
    with uproot.open(path) as file:
        branches = file[tree].branches
        assert [b.name for b in branches] == list(expected)
        for branch in branches:
            assert _leaf_dtype(branch) == expected[branch.name], branch.name


def test_readback_equals_memory(written: list[Path], layouts: tuple[ak.Array, ak.Array]) -> None:
    training, events = layouts
    read_training = ak.concatenate([_read(written[0], "Muons"), _read(written[2], "Muons")])
    read_events = ak.concatenate([_read(written[1], "Events"), _read(written[3], "Events")])
    assert read_training.fields == training.fields
    assert read_events.fields == events.fields
    for name in training.fields:
        assert ak.all(read_training[name] == training[name], axis=None), name
    for name in events.fields:
        assert ak.all(read_events[name] == events[name], axis=None), name


def test_training_layout_is_flattened_event_layout(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, events = layouts
    assert len(events) == N_EVENTS
    assert len(training) == ak.sum(events.nMuon)
    assert set(np.unique(events.nMuon.to_numpy())) == {2, 3}
    for name in MUON_SCALARS:
        assert np.array_equal(training[name].to_numpy(), ak.flatten(events[name]).to_numpy())
    muon_event = np.repeat(events.event.to_numpy(), events.nMuon.to_numpy())
    assert np.array_equal(training.event.to_numpy(), muon_event)
    muon_mass = np.repeat(events.dimuon_mass.to_numpy(), events.nMuon.to_numpy())
    assert np.array_equal(training.dimuon_mass.to_numpy(), muon_mass)
    for name in CELLS:
        assert np.array_equal(
            ak.flatten(training[name]).to_numpy(), ak.flatten(events[name]).to_numpy()
        )
    assert ak.all(ak.num(events.Muon_pt) == events.nMuon)
    assert ak.all(ak.num(events.CaloCell_et) == events.nCaloCell)
    assert ak.all(ak.num(training.CaloCell_et) == training.nCaloCell)


def test_cell_muon_index(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, events = layouts
    idx = events.CaloCell_muonIdx
    assert ak.all(idx >= 0)
    assert ak.all(idx < events.nMuon)
    # Cells of different muons follow each other: the index never decreases within an event.
    assert ak.all(idx[:, 1:] >= idx[:, :-1])
    per_muon = ak.flatten(ak.run_lengths(idx))
    non_empty = training.nCaloCell.to_numpy()
    assert np.array_equal(per_muon.to_numpy(), non_empty[non_empty > 0])


def test_cells_in_window_on_grid_and_above_threshold(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, _ = layouts
    config = IsolationConfig()
    deta = training.CaloCell_eta - training.Muon_eta
    dphi = (training.CaloCell_phi - training.Muon_phi + np.pi) % (2 * np.pi) - np.pi
    assert ak.all(np.hypot(deta, dphi) < WINDOW_RADIUS + 1e-4)
    assert ak.all(training.CaloCell_et >= np.float32(config.noise_threshold))
    steps_eta = ak.flatten(deta).to_numpy() / CELL_DETA
    steps_phi = ak.flatten(dphi).to_numpy() / CELL_DPHI
    assert np.allclose(steps_eta, np.rint(steps_eta), atol=1e-2)
    assert np.allclose(steps_phi, np.rint(steps_phi), atol=1e-2)
    assert ak.all(training.CaloCell_et[:, :-1] >= training.CaloCell_et[:, 1:]), "ET order"
    mean_cells = float(np.mean(training.nCaloCell.to_numpy()))
    assert 15 <= mean_cells <= 40


def test_determinism_by_seed(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, events = layouts
    again_training, again_events = simulate_isolation(N_EVENTS, seed=SEED)
    assert ak.array_equal(training, again_training)
    assert ak.array_equal(events, again_events)
    other, _ = simulate_isolation(N_EVENTS, seed=SEED + 1)
    assert not np.array_equal(other.Muon_pt.to_numpy()[:100], training.Muon_pt.to_numpy()[:100])


def test_prefix_of_longer_run_is_identical(layouts: tuple[ak.Array, ak.Array]) -> None:
    _, events = layouts
    _, longer = simulate_isolation(12_000, seed=SEED)
    assert ak.array_equal(longer[:N_EVENTS], events)


def test_same_seed_same_file_content(tmp_path: Path) -> None:
    first = write_isolation(tmp_path / "a", 500, seed=3)
    second = write_isolation(tmp_path / "b", 500, seed=3)
    for a, b in zip(first, second, strict=True):
        tree = "Muons" if "muons" in a.name else "Events"
        assert ak.array_equal(_read(a, tree), _read(b, tree))


def test_labels_charges_and_mass(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, events = layouts
    config = IsolationConfig()
    flav = training.Muon_genPartFlav.to_numpy()
    assert set(np.unique(flav)) == {1, 4, 5}
    mass = events.dimuon_mass.to_numpy()
    assert np.all((mass >= 70.0) & (mass < 110.0))
    leading_flav = events.Muon_genPartFlav
    prompt_pair = ak.sum(leading_flav == 1, axis=1) >= 2
    charges = events.Muon_charge
    # The two prompt muons of a Z are the two hardest muons of the event.
    prompt_charges = charges[prompt_pair][leading_flav[prompt_pair] == 1]
    assert ak.all(ak.sum(prompt_charges, axis=1) == 0)
    assert ak.all(ak.num(prompt_charges) == 2)
    # The Z peak sits in the middle of the window; the continuum falls.
    prompt_mass = mass[prompt_pair.to_numpy()]
    assert abs(np.median(prompt_mass) - config.z_mass) < 1.0
    continuum = mass[~prompt_pair.to_numpy()]
    assert np.mean(continuum < 90.0) > 0.6
    # Non-prompt pairs (the two hardest muons) are opposite sign about 70% of the time.
    hard = charges[~prompt_pair][:, :2]
    opposite = np.mean((ak.sum(hard, axis=1) == 0).to_numpy())
    assert 0.6 < opposite < 0.8
    assert np.all(np.abs(training.Muon_eta.to_numpy()) < config.max_abs_eta)


def test_classes_separable_but_not_trivially(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, _ = layouts
    prompt = training.Muon_genPartFlav.to_numpy() == 1
    iso = training.Muon_pfRelIso03_all.to_numpy().astype(np.float64)
    # Prompt muons are the isolated ones: a low isolation sum scores high.
    auc = _auc(-iso[prompt], -iso[~prompt])
    assert 0.7 < auc < 0.97
    deta = training.CaloCell_eta - training.Muon_eta
    dphi = (training.CaloCell_phi - training.Muon_phi + np.pi) % (2 * np.pi) - np.pi
    inside = np.hypot(deta, dphi) < 0.3
    cone = ak.sum(training.CaloCell_et[inside], axis=1).to_numpy() / training.Muon_pt.to_numpy()
    calo_auc = _auc(-cone[prompt], -cone[~prompt].astype(np.float64))
    assert 0.7 < calo_auc < 0.97
    tracks = training.Muon_sumTrackPt03.to_numpy()
    assert np.mean(tracks[prompt]) < np.mean(tracks[~prompt])


def test_isolation_cones_are_nested(layouts: tuple[ak.Array, ak.Array]) -> None:
    training, _ = layouts
    cone03 = training.Muon_coneIso03.to_numpy()
    cone04 = training.Muon_coneIso04.to_numpy()
    assert np.all(cone03 >= 0)
    assert np.all(cone04 >= cone03)
    # The Δβ-corrected sums are at least their charged part, and never above the raw cone.
    charged = training.Muon_pfRelIso03_chg.to_numpy()
    pf03 = training.Muon_pfRelIso03_all.to_numpy()
    assert np.all(pf03 >= charged)
    assert np.all(pf03 <= cone03 + 1e-6)
    assert np.all(training.Muon_pfRelIso04_all.to_numpy() <= cone04 + 1e-6)
    assert np.all(training.Muon_sumTrackPt03.to_numpy() >= 0)


@pytest.mark.parametrize(
    "overrides",
    [{"prompt_fraction": 1.5}, {"pileup_mean": -1.0}, {"mass_min": 120.0}, {"z_width": 0.0}],
)
def test_bad_config_is_rejected(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="IsolationConfig"):
        IsolationConfig(**overrides)  # type: ignore[arg-type]


def test_bad_request_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="n_events"):
        simulate_isolation(0, seed=1)
    with pytest.raises(ConfigError, match="events_per_file"):
        write_isolation(tmp_path, 10, seed=1, events_per_file=0)


def test_pure_prompt_sample() -> None:
    config = IsolationConfig(prompt_fraction=1.0, third_muon_fraction=0.0)
    training, events = simulate_isolation(200, seed=1, config=config)
    assert np.all(training.Muon_genPartFlav.to_numpy() == 1)
    assert np.all(events.nMuon.to_numpy() == 2)


@pytest.mark.slow
def test_speed_200k_muons() -> None:
    start = time.perf_counter()
    training, _ = simulate_isolation(95_000, seed=1)
    elapsed = time.perf_counter() - start
    assert len(training) > 190_000
    assert elapsed < 30.0
