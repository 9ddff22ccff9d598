"""The toy flavour simulation: lifetimes, impact parameters, spectra and weights, the two
layouts, the files and the command."""

from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
import yaml
from typer.testing import CliRunner

from bsym.cli import app
from bsym.configs import shipped_features
from bsym.errors import ConfigError
from bsym.features import FeatureSpec, build_features, detect_layout, required_branches
from bsym.simulate.flavour import B_HADRONS, C_HADRONS, Hadron, simulate_flavour
from bsym.simulate.flavour_config import FlavourConfig

JETS = 30_000


@pytest.fixture(scope="module")
def sample() -> tuple[ak.Array, ak.Array]:
    return simulate_flavour(JETS, seed=5)


def fitted_ctau(flight: np.ndarray, beta_gamma: np.ndarray) -> tuple[float, float]:
    """Unbinned maximum-likelihood fit of an exponential to the proper decay lengths
    L/βγ: the estimate is their mean, with error mean/√n."""
    proper = flight / beta_gamma
    return float(proper.mean()), float(proper.mean() / np.sqrt(proper.size))


@pytest.mark.parametrize("prefix", ["hadron", "cascade"])
def test_fitted_lifetimes_match_the_input(sample: tuple[ak.Array, ak.Array], prefix: str) -> None:
    jets = sample[0]
    ids = np.asarray(jets[f"Jet_{prefix}Id"])
    flight = np.asarray(jets[f"Jet_{prefix}Flight"], dtype=np.float64)
    beta_gamma = np.asarray(jets[f"Jet_{prefix}BetaGamma"], dtype=np.float64)
    table: tuple[Hadron, ...] = (*B_HADRONS, *C_HADRONS) if prefix == "hadron" else C_HADRONS
    fitted = 0
    for hadron in table:
        chosen = ids == hadron.pdg_id
        if chosen.sum() < 1500:
            continue
        ctau, error = fitted_ctau(flight[chosen], beta_gamma[chosen])
        assert abs(ctau / hadron.ctau - 1) < 0.05, (hadron, ctau, error)
        fitted += 1
    assert fitted >= (4 if prefix == "hadron" else 2)
    # every heavy hadron species, pooled: proper decay length over its own cτ is Exp(1)
    known = {h.pdg_id: h.ctau for h in table}
    heavy = ids > 0
    scaled = flight[heavy] / beta_gamma[heavy] / np.vectorize(known.__getitem__)(ids[heavy])
    assert abs(scaled.mean() - 1) < 0.02
    assert abs(np.median(scaled) - np.log(2)) < 0.03


def test_b_jets_carry_a_b_hadron_and_its_charm_c_jets_one_charm_hadron(
    sample: tuple[ak.Array, ak.Array],
) -> None:
    jets = sample[0]
    flavour = np.asarray(jets.Jet_hadronFlavour)
    hadron = np.asarray(jets.Jet_hadronId)
    cascade = np.asarray(jets.Jet_cascadeId)
    b_ids = {h.pdg_id for h in B_HADRONS}
    c_ids = {h.pdg_id for h in C_HADRONS}
    assert set(hadron[flavour == 5]) <= b_ids and set(cascade[flavour == 5]) <= c_ids
    assert set(hadron[flavour == 4]) <= c_ids and set(cascade[flavour == 4]) == {0}
    assert set(hadron[flavour == 0]) == {0}
    fractions = [np.mean(flavour == f) for f in (5, 4, 0)]
    assert np.allclose(fractions, 1 / 3, atol=0.015)


def test_impact_parameters_tell_the_flavours_apart(sample: tuple[ak.Array, ak.Array]) -> None:
    jets = sample[0]
    flavour = np.asarray(jets.Jet_hadronFlavour)
    origin = ak.flatten(jets.PFCands_origin).to_numpy()
    d0 = ak.flatten(jets.PFCands_d0).to_numpy().astype(np.float64)
    error = ak.flatten(jets.PFCands_d0Err).to_numpy().astype(np.float64)
    dz = ak.flatten(jets.PFCands_dz).to_numpy().astype(np.float64)
    dz_error = ak.flatten(jets.PFCands_dzErr).to_numpy().astype(np.float64)
    lost = ak.flatten(jets.PFCands_lostInnerHits).to_numpy()
    # prompt tracks: pulls of unit width in the Gaussian core (2 % tails are wider)
    prompt = origin == 0
    for value, sigma in ((d0, error), (dz, dz_error)):
        pull = value[prompt] / sigma[prompt]
        core = np.percentile(pull, 84) - np.percentile(pull, 16)
        assert 1.9 < core < 2.2
    assert np.all(lost[prompt] <= 0)
    # decay tracks of B hadrons: a few hundred µm; of charm: less
    median_b = np.median(np.abs(d0[origin == 1]))
    median_c = np.median(np.abs(d0[origin == 2]))
    assert 0.005 < median_c < median_b < 0.05
    # the jets' largest significances, by flavour
    spec = FeatureSpec.model_validate(yaml.safe_load(shipped_features("flavour_dips").read_text()))
    batch = build_features(jets, spec, "object", with_label=True)
    significance = np.where(batch.mask, batch.constituents[..., 0], -np.inf)
    second = np.sort(significance, axis=1)[:, -2]
    tagged = {f: np.mean(second[flavour == f] > 2.5) for f in (5, 4, 0)}
    assert tagged[5] > 0.4 > tagged[4] > 0.1 > 0.03 > tagged[0] > 0.0


def test_weights_make_the_spectra_of_all_flavours_the_b_spectrum(
    sample: tuple[ak.Array, ak.Array],
) -> None:
    jets = sample[0]
    flavour = np.asarray(jets.Jet_hadronFlavour)
    weight = np.asarray(jets.Jet_weight, dtype=np.float64)
    pt = np.asarray(jets.Jet_pt)
    eta = np.asarray(jets.Jet_eta)
    assert np.allclose(weight[flavour == 5], 1)
    edges = (np.array([20, 25, 32, 45, 70, 1000]), np.linspace(-2.5, 2.5, 6))

    def shares(chosen: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bin shares of the (pT, η) plane and their variances."""
        total = np.histogram2d(pt[chosen], eta[chosen], edges, weights=w[chosen])[0]
        squares = np.histogram2d(pt[chosen], eta[chosen], edges, weights=w[chosen] ** 2)[0]
        return total / total.sum(), squares / total.sum() ** 2

    def chi2_per_bin(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
        return float(np.mean((a[0] - b[0]) ** 2 / (a[1] + b[1])))

    ones = np.ones_like(weight)
    b_shares = shares(flavour == 5, ones)
    for f in (4, 0):
        chosen = flavour == f
        assert abs(weight[chosen].mean() - 1) < 0.05
        assert chi2_per_bin(shares(chosen, weight), b_shares) < 2
        assert chi2_per_bin(shares(chosen, ones), b_shares) > 10  # the weights had work to do


def test_both_layouts_hold_the_same_jets_and_give_the_same_tensors(
    sample: tuple[ak.Array, ak.Array],
) -> None:
    jets, events = sample
    assert int(ak.sum(ak.num(events.Jet_pt))) == len(jets) == JETS
    assert set(ak.num(events.Jet_pt)) <= {1, 2, 3, 4}
    # more candidates than links: some belong to no jet, so the link is not the identity
    assert ak.sum(ak.num(events.PFCands_pt)) > ak.sum(ak.num(events.JetPFCands_jetIdx))
    pt = ak.flatten(events.Jet_pt)
    assert np.array_equal(pt.to_numpy(), np.asarray(jets.Jet_pt))
    assert ak.all(events.Jet_pt[:, :-1] >= events.Jet_pt[:, 1:])
    for name in ("flavour_dips", "flavour_pfn12", "flavour_vector"):
        spec = FeatureSpec.model_validate(yaml.safe_load(shipped_features(name).read_text()))
        a = build_features(jets, spec, "object", with_label=True)
        b = build_features(events, spec, "event", with_label=True)
        assert a.constituents is not None and b.constituents is not None
        assert np.array_equal(a.constituents, b.constituents)
        assert np.array_equal(a.mask, b.mask) and a.mask.any(axis=1).mean() > 0.97
        assert np.array_equal(a.label, b.label) and np.array_equal(a.weight, b.weight)


def test_measured_closest_approach_and_momentum_agree_with_d0_dz_pt(
    sample: tuple[ak.Array, ak.Array],
) -> None:
    jets = sample[0]

    def flat(name: str) -> np.ndarray:
        return ak.flatten(jets[f"PFCands_{name}"]).to_numpy().astype(np.float64)

    phi, d0, pt = flat("phi"), flat("d0"), flat("pt")
    # CMS's d0 sign: d0 = -x·sin φ + y·cos φ at the closest approach (x, y)
    assert np.allclose(-flat("vx") * np.sin(phi) + flat("vy") * np.cos(phi), d0, atol=1e-6)
    assert np.allclose(flat("vx") * np.cos(phi) + flat("vy") * np.sin(phi), 0, atol=1e-6)
    assert np.allclose(flat("vz"), flat("dz"))
    assert np.allclose(np.hypot(flat("px"), flat("py")), pt, rtol=1e-5)
    assert np.allclose(flat("pz"), pt * np.sinh(flat("eta")), rtol=1e-4, atol=1e-5)
    assert np.allclose(np.hypot(jets.Jet_px, jets.Jet_py), jets.Jet_pt, rtol=1e-5)


def test_same_seed_same_jets_and_bad_requests() -> None:
    first = simulate_flavour(300, seed=9)[1]
    again = simulate_flavour(300, seed=9)[1]
    other = simulate_flavour(300, seed=10)[1]
    assert ak.array_equal(first, again)
    assert not ak.array_equal(first.PFCands_d0, other.PFCands_d0)
    with pytest.raises(ConfigError, match="n_jets"):
        simulate_flavour(0, seed=1)
    with pytest.raises(ConfigError, match="b_fraction"):
        FlavourConfig(b_fraction=0.8, c_fraction=0.5)
    with pytest.raises(ConfigError, match="jet_pt_min"):
        FlavourConfig(jet_pt_min=100, jet_pt_max=50)


def test_the_shared_sample_reads_through_every_flavour_spec(flavour_sample: Path) -> None:
    files = sorted(p.name for p in flavour_sample.iterdir())
    assert files == [f"flavour_{kind}_00{k}.root" for kind in ("events", "jets") for k in range(3)]
    for name in ("flavour_dips", "flavour_dips_linear", "flavour_pfn12", "flavour_vector"):
        spec = FeatureSpec.model_validate(yaml.safe_load(shipped_features(name).read_text()))
        with uproot.open(flavour_sample / "flavour_events_002.root") as file:
            arrays = file["Events"].arrays(required_branches(spec, "event", with_label=True))
        batch = build_features(arrays, spec, "event", with_label=True)
        assert batch.n_rows == 2000 and batch.label is not None and 0 < batch.label.mean() < 1


def test_command_writes_both_layouts_with_pfnano_types(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "flavour",
            "--jets",
            "900",
            "--out",
            str(tmp_path),
            "--seed",
            "4",
            "--jets-per-file",
            "500",
        ],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "flavour_events_000.root",
        "flavour_events_001.root",
        "flavour_jets_000.root",
        "flavour_jets_001.root",
    ]
    with uproot.open(tmp_path / "flavour_events_001.root") as file:
        events = file["Events"]
        config = json.loads(str(file["bsym/flavour"]))
        assert config == json.loads(FlavourConfig().model_dump_json())
        assert sum(events["nJet"].array(library="np")) == 400
        names = events.keys()
        types = {name: events[name].typename for name in names}
    with uproot.open(tmp_path / "flavour_jets_000.root") as file:
        assert file["Jets"].num_entries == 500
    light_only = CliRunner().invoke(
        app,
        [
            "simulate",
            "flavour",
            "-n",
            "200",
            "-o",
            str(tmp_path / "light"),
            "--b-fraction",
            "0",
            "--c-fraction",
            "0",
        ],
    )
    assert light_only.exit_code == 0, light_only.output
    with uproot.open(tmp_path / "light" / "flavour_jets_000.root") as file:
        assert set(file["Jets"]["Jet_hadronFlavour"].array(library="np")) == {0}
    too_many = CliRunner().invoke(
        app,
        [
            "simulate",
            "flavour",
            "-o",
            str(tmp_path / "bad"),
            "--b-fraction",
            "0.7",
            "--c-fraction",
            "0.7",
        ],
    )
    assert too_many.exit_code == 1 and "b_fraction + c_fraction" in too_many.output
    assert not (tmp_path / "bad").exists()
    expected = {
        "Jet_pt": "float[]",
        "Jet_hadronFlavour": "int32_t[]",
        "PFCands_d0": "float[]",
        "PFCands_d0Err": "float[]",
        "PFCands_dz": "float[]",
        "PFCands_charge": "int32_t[]",
        "PFCands_lostInnerHits": "int32_t[]",
        "JetPFCands_jetIdx": "int32_t[]",
        "JetPFCands_pFCandsIdx": "int32_t[]",
    }
    assert {k: types[k] for k in expected} == expected
    spec = FeatureSpec.model_validate(yaml.safe_load(shipped_features("flavour_dips").read_text()))
    assert detect_layout(types, spec) == "event"
    assert set(required_branches(spec, "event", with_label=True)) <= set(types)
