"""The feature spec's flavour-tagging parts: lifetime-signed impact parameters, the two-level
link jet → JetPFCands → PFCands (hand-made and real PFNano files), named columns, sorting by
a computed column, and specs written before these fields existed."""

from __future__ import annotations

import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml

from bsym.configs import shipped_config, shipped_features
from bsym.errors import BadValueError, SpecMismatchError
from bsym.features import (
    Constituents,
    DeltaR,
    Feature,
    FeatureBatch,
    FeatureSpec,
    LifetimeSign,
    build_features,
    detect_layout,
    required_branches,
)
from bsym.simulate.rootwrite import tree_data, write_branches
from bsym.training.config import load_config

SIGNED = [
    Feature(
        branch="PFCands_d0",
        divide_by="PFCands_d0Err",
        lifetime_sign=LifetimeSign(plane="transverse", track="PFCands_phi", axis="Jet_phi"),
        name="sd0sig",
    ),
    Feature(
        branch="PFCands_dz",
        divide_by="PFCands_dzErr",
        lifetime_sign=LifetimeSign(plane="longitudinal", track="PFCands_eta", axis="Jet_eta"),
        name="sz0sig",
    ),
]


def signed_spec(**constituents: object) -> FeatureSpec:
    return FeatureSpec(
        tree="Jets",
        objects="Jet",
        constituents=Constituents(features=SIGNED, max_count=8, **constituents),  # type: ignore[arg-type]
        label=None,
    )


def dips_spec() -> FeatureSpec:
    return FeatureSpec.model_validate(yaml.safe_load(shipped_features("flavour_dips").read_text()))


def straight_track(vertex: np.ndarray, eta: float, phi: float) -> tuple[float, float]:
    """CMS's d0 and dz of a straight track through ``vertex`` (primary vertex at the origin):
    d0 = -x·sin φ + y·cos φ and dz = z at the transverse point of closest approach."""
    x, y, z = vertex
    step = -(x * np.cos(phi) + y * np.sin(phi))
    return float(-x * np.sin(phi) + y * np.cos(phi)), float(z + step * np.sinh(eta))


def one_jet_of_tracks(
    jet_eta: float, jet_phi: float, tracks: list[tuple[float, float, float, float]]
) -> ak.Array:
    """Object layout, one jet with tracks given as (eta, phi, d0, dz), unit errors."""
    eta, phi, d0, dz = (np.array([t[i] for t in tracks]) for i in range(4))
    ones = np.ones(len(tracks))
    return ak.Array(
        {
            "Jet_eta": [jet_eta],
            "Jet_phi": [jet_phi],
            "PFCands_eta": [eta],
            "PFCands_phi": [phi],
            "PFCands_d0": [d0],
            "PFCands_d0Err": [ones],
            "PFCands_dz": [dz],
            "PFCands_dzErr": [ones],
        }
    )


def test_signed_impact_parameters_by_hand() -> None:
    # jet along +x (η = 0, φ = 0); tracks at φ = ±0.1 from a vertex 1 cm along +x (a decay
    # downstream on the jet axis) and from 1 cm along −x (upstream, against the jet)
    tracks = []
    for x in (1.0, -1.0):
        for phi in (0.1, -0.1):
            d0, dz = straight_track(np.array([x, 0.0, 0.0]), 0.0, phi)
            tracks.append((0.0, phi, d0, dz))
    # CMS's geometric d0 of the downstream tracks: −sin(0.1) and +sin(0.1): opposite signs
    assert tracks[0][2] == pytest.approx(-np.sin(0.1)) and tracks[1][2] == pytest.approx(
        0.0998, abs=1e-4
    )
    batch = build_features(one_jet_of_tracks(0.0, 0.0, tracks), signed_spec(), "object")
    assert batch.constituents is not None
    sd0 = batch.constituents[0, :4, 0]
    assert sd0 == pytest.approx([np.sin(0.1), np.sin(0.1), -np.sin(0.1), -np.sin(0.1)], rel=1e-5)
    # longitudinal: jet at η = 0.5; tracks more forward (η 0.8) and more central (η 0.2) from
    # a vertex on the jet axis downstream, then upstream
    axis = np.array([1 / np.cosh(0.5), 0.0, np.tanh(0.5)])
    tracks = []
    for length in (0.5, -0.5):
        for eta in (0.8, 0.2):
            d0, dz = straight_track(length * axis, eta, 0.0)
            tracks.append((eta, 0.0, d0, dz))
    assert tracks[0][3] < 0 < tracks[1][3]  # the geometric dz has either sign downstream
    batch = build_features(one_jet_of_tracks(0.5, 0.0, tracks), signed_spec(), "object")
    assert batch.constituents is not None
    sz0 = batch.constituents[0, :4, 1]
    assert np.all(sz0[:2] > 0) and np.all(sz0[2:] < 0)
    assert np.abs(sz0) == pytest.approx(np.abs([t[3] for t in tracks]), rel=1e-5)


def test_decays_along_the_jet_axis_are_positive_whatever_the_direction() -> None:
    rng = np.random.default_rng(3)
    n = 400
    jet_eta, jet_phi = rng.uniform(-2, 2, n), rng.uniform(-np.pi, np.pi, n)
    rows = []
    lengths = rng.choice([-1.0, 1.0], n) * rng.exponential(0.3, n)
    for k in range(n):
        axis = np.array([np.cos(jet_phi[k]), np.sin(jet_phi[k]), np.sinh(jet_eta[k])])
        axis /= np.cosh(jet_eta[k])
        eta = jet_eta[k] + rng.normal(0, 0.2)
        # odd rows: the track in the jet's azimuth (d0 = 0), where the longitudinal sign is exact
        phi = jet_phi[k] + (rng.normal(0, 0.2) if k % 2 == 0 else 0.0)
        rows.append((eta, phi, *straight_track(lengths[k] * axis, eta, phi)))
    jets = ak.Array(
        {
            "Jet_eta": jet_eta,
            "Jet_phi": jet_phi,
            "PFCands_eta": [[r[0]] for r in rows],
            "PFCands_phi": [[(r[1] + np.pi) % (2 * np.pi) - np.pi] for r in rows],
            "PFCands_d0": [[r[2]] for r in rows],
            "PFCands_d0Err": [[1.0] for _ in rows],
            "PFCands_dz": [[r[3]] for r in rows],
            "PFCands_dzErr": [[1.0] for _ in rows],
        }
    )
    batch = build_features(jets, signed_spec(), "object")
    assert batch.constituents is not None
    signs = np.sign(batch.constituents[:, 0, :2])
    expected = np.sign(lengths)
    assert np.array_equal(signs[::2, 0], expected[::2])
    assert np.array_equal(signs[1::2, 1], expected[1::2])
    # off the jet's azimuth the longitudinal sign is the usual approximation: mostly right
    assert np.mean(signs[::2, 1] == expected[::2]) > 0.8


def hand_made_events() -> ak.Array:
    """Two PFNano-like events; links out of candidate order, one candidate in no jet, one
    jet without candidates, and a link-level branch."""
    return ak.Array(
        {
            "nJet": np.array([2, 1], dtype=np.uint32),
            "Jet_pt": [[50.0, 30.0], [40.0]],
            "Jet_eta": [[0.0, 1.0], [-0.5]],
            "Jet_phi": [[0.0, 2.0], [-1.0]],
            "nPFCands": np.array([5, 2], dtype=np.uint32),
            "PFCands_pt": [[10.0, 5.0, 4.0, 2.0, 1.0], [3.0, 6.0]],
            "PFCands_eta": [[0.1, 0.9, -0.1, 1.2, 3.0], [-0.4, -0.6]],
            "PFCands_phi": [[0.1, 2.1, -0.2, 1.9, 0.0], [-1.1, -0.9]],
            "PFCands_d0": [[0.05, -0.02, 0.03, 0.04, 0.05], [0.001, -0.002]],
            "PFCands_d0Err": [[0.01, 0.01, 0.01, 0.01, 0.01], [0.001, 0.001]],
            "PFCands_dz": [[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0]],
            "PFCands_dzErr": [[1.0] * 5, [1.0, 1.0]],
            "nJetPFCands": np.array([4, 2], dtype=np.uint32),
            "JetPFCands_jetIdx": [[1, 0, 1, 0], [0, 0]],
            "JetPFCands_pFCandsIdx": [[3, 2, 1, 0], [1, 0]],
            "JetPFCands_weight": [[0.5, 0.6, 0.7, 0.8], [0.9, 1.0]],
        }
    )


def link_spec(sort_by: str | None = None) -> FeatureSpec:
    return FeatureSpec(
        tree="Events",
        objects="Jet",
        constituents=Constituents(
            features=[
                Feature(branch="PFCands_pt"),
                SIGNED[0],
                Feature(branch="JetPFCands_weight"),
                Feature(branch="PFCands_pt", ratio_to="Jet_pt", transform="log", name="lpt"),
                Feature(
                    branch="PFCands_eta",
                    delta_r=DeltaR(phi="PFCands_phi", axis_eta="Jet_eta", axis_phi="Jet_phi"),
                    name="dr",
                ),
                Feature(branch="Jet_pt", from_object=True, name="jet_pt"),
            ],
            max_count=3,
            link="JetPFCands_jetIdx",
            index="JetPFCands_pFCandsIdx",
            sort_by=sort_by,
        ),
        label=None,
    )


def test_two_level_link_on_a_hand_made_file(tmp_path: Path) -> None:
    events = hand_made_events()
    path = tmp_path / "events.root"
    write_branches(path, "Events", tree_data(events, {"nJet", "nPFCands", "nJetPFCands"}))
    spec = link_spec(sort_by="PFCands_pt")
    with uproot.open(path) as file:
        tree = file["Events"]
        assert detect_layout(tree.keys(), spec) == "event"
        arrays = tree.arrays(required_branches(spec, "event", with_label=False))
    batch = build_features(arrays, spec, "event")
    assert batch.constituents is not None and batch.mask is not None
    assert batch.counts is not None and batch.counts.tolist() == [2, 1]
    # jet 0 of event 0: candidates 2 (pT 4) and 0 (pT 10); jet 1: 3 (pT 2) and 1 (pT 5)
    assert batch.mask.tolist() == [[True, True, False], [True, True, False], [True, True, False]]
    pt = batch.constituents[..., 0]
    assert pt[:, :2].tolist() == [[10.0, 4.0], [5.0, 2.0], [6.0, 3.0]]
    weight = batch.constituents[..., 2]
    np.testing.assert_allclose(weight[:, :2], [[0.8, 0.6], [0.7, 0.5], [0.9, 1.0]], 1e-6)
    np.testing.assert_allclose(
        batch.constituents[..., 3][:, :2],
        np.log([[10 / 50, 4 / 50], [5 / 30, 2 / 30], [6 / 40, 3 / 40]]),
        1e-5,
    )
    assert batch.constituents[0, 0, 4] == pytest.approx(np.hypot(0.1, 0.1), rel=1e-6)
    assert batch.constituents[..., 5][batch.mask].tolist() == [50, 50, 30, 30, 40, 40]
    # candidate 0 of event 0: d0 > 0 at φ = 0.1 beside a jet at φ = 0: sin(0 − 0.1) < 0
    assert batch.constituents[0, 0, 1] == pytest.approx(-5.0)


def test_sorting_by_a_computed_column_and_its_absolute_value() -> None:
    events = hand_made_events()
    spec = link_spec(sort_by="sd0sig")
    by_value = build_features(events, spec, "event")
    assert by_value.constituents is not None
    # signed d0 significances worked out by hand from hand_made_events
    np.testing.assert_allclose(by_value.constituents[:, :2, 1], [[3, -5], [4, 2], [2, 1]], 1e-5)
    assert by_value.constituents[:, :2, 0].tolist() == [[4, 10], [2, 5], [6, 3]]
    data = spec.model_dump()
    data["constituents"]["sort_abs"] = True
    by_size = build_features(events, FeatureSpec.model_validate(data), "event")
    assert by_size.constituents is not None
    np.testing.assert_allclose(by_size.constituents[:, :2, 1], [[-5, 3], [4, 2], [2, 1]], 1e-5)


def test_index_outside_the_candidates_is_refused() -> None:
    events = hand_made_events()
    broken = ak.with_field(events, [[3, 2, 1, 5], [1, 0]], "JetPFCands_pFCandsIdx")
    with pytest.raises(BadValueError, match=r"JetPFCands_pFCandsIdx.*PFCands_pt.*entry 0: 5"):
        build_features(broken, link_spec(), "event")


def real_pfnano_batch(path: Path) -> tuple[FeatureBatch, ak.Array]:
    spec = dips_spec().model_copy(update={"weight": None})  # PFNano has no Jet_weight
    with uproot.open(path) as file:
        tree = file["Events"]
        arrays = tree.arrays(required_branches(spec, "event", with_label=True))
    return build_features(arrays, spec, "event", with_label=True), arrays


def test_two_level_link_on_the_real_pfnano_file(nanoaod_dir: Path, tmp_path: Path) -> None:
    shutil.copy(nanoaod_dir / "pfnano.root", tmp_path / "pfnano.root")
    with uproot.open(tmp_path / "pfnano.root") as file:
        assert detect_layout(file["Events"].keys(), dips_spec()) == "event"
    batch, arrays = real_pfnano_batch(tmp_path / "pfnano.root")
    assert batch.constituents is not None and batch.mask is not None and batch.counts is not None
    assert batch.counts.tolist() == np.asarray(arrays.nJet).tolist()
    assert batch.truth is not None and set(batch.truth) <= {0, 4, 5} and 4 in batch.truth
    # an independent computation, jet by jet, with loops over the links
    max_count = 25
    row = 0
    for record in ak.to_list(arrays):
        for jet in range(record["nJet"]):
            links = zip(record["JetPFCands_jetIdx"], record["JetPFCands_pFCandsIdx"], strict=True)
            expected = []
            for c in (c for j, c in links if j == jet):
                d0, err = record["PFCands_d0"][c], record["PFCands_d0Err"][c]
                side = np.sin(record["Jet_phi"][jet] - record["PFCands_phi"][c])
                expected.append(abs(d0 / err) * (-1.0 if d0 * side < 0 else 1.0))
            expected = sorted(expected, key=abs, reverse=True)[:max_count]
            assert int(batch.mask[row].sum()) == len(expected)
            got = batch.constituents[row, : len(expected), 0]
            np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), rtol=1e-5)
            row += 1
    assert row == batch.n_rows == 64
    # CMS simulation has displaced tracks (b and c decays, K0s, Λ) on the jet's side: with the
    # convention right, large positive signed significances outnumber negative ones
    significance = batch.constituents[..., 0][batch.mask]
    assert np.sum(significance > 3) > 1.5 * np.sum(significance < -3) > 0


@pytest.mark.slow
def test_the_real_pfnano_rntuple_gives_the_tensors_of_its_ttree(
    nanoaod_dir: Path, tmp_path: Path
) -> None:
    """Slow: uproot lists the RNTuple's 1800 fields in about a minute."""
    for name in ("pfnano.root", "pfnano_rntuple.root"):
        shutil.copy(nanoaod_dir / name, tmp_path / name)
    tree, _ = real_pfnano_batch(tmp_path / "pfnano.root")
    rntuple, _ = real_pfnano_batch(tmp_path / "pfnano_rntuple.root")
    assert tree.constituents is not None and tree.mask is not None and tree.mask.sum() > 500
    assert np.array_equal(tree.constituents, rntuple.constituents)
    assert np.array_equal(tree.mask, rntuple.mask)
    assert np.array_equal(tree.truth, rntuple.truth)


def test_specs_without_the_new_fields_serialise_as_before() -> None:
    spec = load_config(shipped_config("isolation_pfn")).features
    text = spec.to_json()
    for key in (
        "index",
        "sort_abs",
        "name",
        "ratio_to",
        "divide_by",
        "delta_r",
        "lifetime_sign",
        "from_object",
    ):
        assert f'"{key}"' not in text
    assert FeatureSpec.from_json(text).to_json() == text
    assert Feature(branch="x").model_dump() == {
        "branch": "x",
        "transform": "none",
        "relative_to": None,
        "periodic": False,
    }
    dips = dips_spec()
    assert FeatureSpec.from_json(dips.to_json()) == dips
    assert '"sort_abs":true' in dips.to_json()


def test_column_names_and_their_lookup() -> None:
    spec = FeatureSpec.model_validate(
        yaml.safe_load(shipped_features("flavour_vector").read_text())
    )
    assert spec.constituent_names[:6] == [
        "PFCands_px",
        "PFCands_py",
        "PFCands_pz",
        "PFCands_vx",
        "PFCands_vy",
        "PFCands_vz",
    ]
    assert spec.constituent_column("PFCands_vz") == 5
    assert spec.global_column("Jet_pz") == 2
    assert spec.global_names[-1] == "log(Jet_pt)"
    with pytest.raises(
        SpecMismatchError, match=r"no column 'PFCands_pzz'.*did you mean 'PFCands_pz'"
    ):
        spec.constituent_column("PFCands_pzz")
    plain = Feature(branch="CaloCell_eta", relative_to="Muon_eta", transform="none")
    assert plain.column_name == "CaloCell_eta - Muon_eta"
    assert SIGNED[0].model_copy(update={"name": None}).column_name == (
        "signed(PFCands_d0/PFCands_d0Err)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"features": [{**SIGNED[0].model_dump(), "transform": "log"}]},
            "transform must be 'none'",
        ),
        ({"features": [SIGNED[0].model_dump(), SIGNED[0].model_dump()]}, "not unique"),
        ({"index": "JetPFCands_pFCandsIdx", "link": None}, "needs the link branch"),
        ({"index": "Other_idx"}, "one collection"),
        (
            {"features": [{"branch": "Jet_pt", "from_object": True, "ratio_to": "Jet_pt"}]},
            "from_object takes the object's value as is, without ratio_to",
        ),
        (
            {
                "features": [
                    {
                        "branch": "PFCands_eta",
                        "divide_by": "PFCands_etaErr",
                        "delta_r": {
                            "phi": "PFCands_phi",
                            "axis_eta": "Jet_eta",
                            "axis_phi": "Jet_phi",
                        },
                    }
                ]
            },
            "delta_r replaces the value",
        ),
    ],
)
def test_invalid_options_are_refused(change: dict[str, object], message: str) -> None:
    constituents = {
        "features": [f.model_dump() for f in SIGNED],
        "link": "JetPFCands_jetIdx",
        "index": "JetPFCands_pFCandsIdx",
        **change,
    }
    with pytest.raises(ValueError, match=message):
        FeatureSpec.model_validate({"objects": "Jet", "constituents": constituents})


def test_constituent_options_on_globals_are_refused() -> None:
    with pytest.raises(ValueError, match="constituent features only"):
        FeatureSpec.model_validate(
            {"globals": [{"branch": "Jet_pt", "divide_by": "Jet_ptErr"}], "label": None}
        )
