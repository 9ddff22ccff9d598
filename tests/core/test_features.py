"""The one feature implementation: both layouts, padding, sorting, transforms, cones, bad values."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from bsym.errors import BadValueError, SpecMismatchError
from bsym.features import (
    Cones,
    Constituents,
    Feature,
    FeatureSpec,
    build_features,
    detect_layout,
    required_branches,
)

CELL_FEATURES = [
    Feature(branch="CaloCell_et", transform="log"),
    Feature(branch="CaloCell_eta", relative_to="Muon_eta"),
    Feature(branch="CaloCell_phi", relative_to="Muon_phi", periodic=True),
]


def make_spec(max_count: int = 3, **extra: object) -> FeatureSpec:
    return FeatureSpec(
        constituents=Constituents(
            features=CELL_FEATURES,
            max_count=max_count,
            sort_by="CaloCell_et",
            link="CaloCell_muonIdx",
        ),
        globals=[Feature(branch="Muon_pt", transform="log")],
        cones=Cones(radii=[0.1, 0.3]),
        **extra,  # type: ignore[arg-type]
    )


def random_muons(n: int, seed: int = 1) -> ak.Array:
    """Object layout: one entry per muon with jagged cells."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=n)
    total = int(counts.sum())
    eta = rng.uniform(-2, 2, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    cell_eta = np.repeat(eta, counts) + rng.normal(0, 0.2, total)
    cell_phi = np.repeat(phi, counts) + rng.normal(0, 0.2, total)
    cell_phi = (cell_phi + np.pi) % (2 * np.pi) - np.pi
    return ak.zip(
        {
            "Muon_pt": rng.uniform(20, 80, n),
            "Muon_eta": eta,
            "Muon_phi": phi,
            "Muon_genPartFlav": rng.choice([1, 4, 5], n),
            "CaloCell_et": ak.unflatten(rng.exponential(2.0, total) + 0.1, counts),
            "CaloCell_eta": ak.unflatten(cell_eta, counts),
            "CaloCell_phi": ak.unflatten(cell_phi, counts),
        },
        depth_limit=1,
    )


def to_event_layout(muons: ak.Array, muons_per_event: np.ndarray) -> ak.Array:
    """Group consecutive muons into events; cells of each event carry their muon's index."""
    cells_per_muon = ak.num(muons["CaloCell_et"])
    event_of_muon = np.repeat(np.arange(len(muons_per_event)), muons_per_event)
    first = np.concatenate(([0], np.cumsum(muons_per_event)[:-1]))
    local = np.arange(len(muons)) - first[event_of_muon]
    link = np.repeat(local, np.asarray(cells_per_muon))
    cells_per_event = np.bincount(
        event_of_muon, weights=np.asarray(cells_per_muon), minlength=len(muons_per_event)
    ).astype(np.int64)
    fields = {
        name: ak.unflatten(np.asarray(muons[name]), muons_per_event)
        for name in ("Muon_pt", "Muon_eta", "Muon_phi", "Muon_genPartFlav")
    }
    fields |= {
        name: ak.unflatten(np.asarray(ak.flatten(muons[name])), cells_per_event)
        for name in ("CaloCell_et", "CaloCell_eta", "CaloCell_phi")
    }
    fields["CaloCell_muonIdx"] = ak.unflatten(link, cells_per_event)
    fields["nMuon"] = muons_per_event
    return ak.zip(fields, depth_limit=1)


def test_layout_detection_and_required_branches() -> None:
    spec = make_spec()
    assert detect_layout(["nMuon", "Muon_pt"], spec) == "event"
    assert detect_layout(["Muon_pt"], spec) == "object"
    event_branches = required_branches(spec, "event", with_label=True)
    object_branches = required_branches(spec, "object", with_label=False)
    assert "CaloCell_muonIdx" in event_branches and "nMuon" in event_branches
    assert "CaloCell_muonIdx" not in object_branches
    assert "Muon_genPartFlav" in event_branches and "Muon_genPartFlav" not in object_branches
    assert len(set(event_branches)) == len(event_branches)


def test_padding_sorting_mask_and_relative_features() -> None:
    muons = ak.zip(
        {
            "Muon_pt": np.array([10.0, 20.0]),
            "Muon_eta": np.array([0.5, -1.0]),
            "Muon_phi": np.array([3.1, 0.0]),
            "Muon_genPartFlav": np.array([1, 5]),
            "CaloCell_et": ak.Array([[1.0, 5.0, 2.0, 4.0], []]),
            "CaloCell_eta": ak.Array([[0.5, 0.6, 0.7, 0.8], []]),
            "CaloCell_phi": ak.Array([[-3.1, 3.0, 3.1, 3.1], []]),
        },
        depth_limit=1,
    )
    batch = build_features(muons, make_spec(max_count=3), "object", with_label=True)
    assert batch.constituents is not None and batch.mask is not None and batch.globals is not None
    assert batch.constituents.shape == (2, 3, 3)
    assert batch.mask.tolist() == [[True, True, True], [False, False, False]]
    # kept by ET, descending: 5, 4, 2 (the 1 GeV cell is dropped)
    np.testing.assert_allclose(np.exp(batch.constituents[0, :, 0]), [5.0, 4.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(batch.constituents[0, :, 1], [0.1, 0.3, 0.2], atol=1e-6)
    assert batch.constituents[0, 0, 2] == pytest.approx(-0.1, abs=1e-6)
    wide = build_features(muons, make_spec(max_count=4), "object").constituents
    assert wide is not None
    # the 1 GeV cell at φ = -3.1 seen from φ = 3.1: -6.2 wraps to 2π - 6.2
    assert wide[0, 3, 2] == pytest.approx(2 * np.pi - 6.2, abs=1e-5)
    assert batch.constituents[1].sum() == 0
    assert batch.label is not None and batch.label.tolist() == [1, 0]
    assert batch.counts is None


def test_object_and_event_layouts_give_identical_tensors() -> None:
    muons = random_muons(40)
    per_event = np.array([2, 3, 1, 2, 0, 4] + [2] * 14)
    assert per_event.sum() == 40
    events = to_event_layout(muons, per_event)
    spec = make_spec()
    flat = build_features(muons, spec, "object", with_label=True)
    grouped = build_features(events, spec, "event", with_label=True)
    assert grouped.counts is not None and grouped.counts.tolist() == per_event.tolist()
    for name, tensor in flat.inputs().items():
        np.testing.assert_array_equal(tensor, grouped.inputs()[name], err_msg=name)
    assert flat.label is not None and grouped.label is not None
    np.testing.assert_array_equal(flat.label, grouped.label)


def test_cone_isolation_matches_brute_force() -> None:
    muons = random_muons(25, seed=3)
    spec = FeatureSpec(cones=Cones(radii=[0.05, 0.2, 0.45]))
    batch = build_features(muons, spec, "object")
    assert batch.globals is not None
    for row in range(len(muons)):
        muon = muons[row]
        d_phi = (np.asarray(muon["CaloCell_phi"]) - muon["Muon_phi"] + np.pi) % (2 * np.pi) - np.pi
        delta_r = np.hypot(np.asarray(muon["CaloCell_eta"]) - muon["Muon_eta"], d_phi)
        et = np.asarray(muon["CaloCell_et"])
        for column, radius in enumerate([0.05, 0.2, 0.45]):
            expected = et[delta_r < radius].sum() / muon["Muon_pt"]
            assert batch.globals[row, column] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert spec.global_names == ["cone0.05", "cone0.2", "cone0.45"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_names_the_branch(bad: float) -> None:
    muons = random_muons(5)
    pt = np.asarray(muons["Muon_pt"]).copy()
    pt[2] = bad
    muons = ak.with_field(muons, pt, "Muon_pt")
    spec = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    with pytest.raises(BadValueError, match="Muon_pt"):
        build_features(muons, spec, "object")


def test_log_of_non_positive_values_is_refused() -> None:
    muons = random_muons(5)
    muons = ak.with_field(muons, np.zeros(5), "Muon_pt")
    with pytest.raises(BadValueError, match=r"Muon_pt.*log"):
        build_features(
            muons, FeatureSpec(globals=[Feature(branch="Muon_pt", transform="log")]), "object"
        )


def test_link_outside_collection_is_refused() -> None:
    muons = random_muons(6)
    events = to_event_layout(muons, np.array([3, 3]))
    link = ak.to_list(events["CaloCell_muonIdx"])
    link[0] = [7 for _ in link[0]]
    events = ak.with_field(events, ak.Array(link), "CaloCell_muonIdx")
    with pytest.raises(BadValueError, match="CaloCell_muonIdx"):
        build_features(events, make_spec(), "event")


def test_jagged_branch_where_a_scalar_is_expected() -> None:
    muons = random_muons(4)
    spec = FeatureSpec(globals=[Feature(branch="CaloCell_et")])
    with pytest.raises(SpecMismatchError, match=r"CaloCell_et.*jagged"):
        build_features(muons, spec, "object")


def test_spec_round_trips_through_json_and_rejects_unknown_keys() -> None:
    spec = make_spec()
    assert FeatureSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="extra"):
        FeatureSpec.model_validate({"globals": [{"branch": "a"}], "globalz": []})
    with pytest.raises(ValueError, match="needs constituents"):
        FeatureSpec()


def test_event_layout_cells_in_any_order_within_the_event() -> None:
    muons = random_muons(30, seed=5)
    per_event = np.array([3] * 10)
    events = to_event_layout(muons, per_event)
    rng = np.random.default_rng(0)
    shuffled = {}
    for name in ("CaloCell_et", "CaloCell_eta", "CaloCell_phi", "CaloCell_muonIdx"):
        shuffled[name] = []
    for event in range(len(events)):
        order = rng.permutation(len(events[event]["CaloCell_et"]))
        for name in shuffled:
            shuffled[name].append(np.asarray(events[event][name])[order])
    for name, values in shuffled.items():
        events = ak.with_field(events, ak.Array(values), name)
    spec = make_spec(max_count=8)
    flat = build_features(muons, spec, "object")
    grouped = build_features(events, spec, "event")
    for name, tensor in flat.inputs().items():
        np.testing.assert_allclose(tensor, grouped.inputs()[name], rtol=1e-6, err_msg=name)
