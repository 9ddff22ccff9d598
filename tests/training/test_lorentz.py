"""Broken Lorentz symmetry: the dimuon simulator, the three networks, ONNX parity, the study."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import numpy.typing as npt
import onnxruntime
import pytest
import torch
import typer
import uproot
from torch import Tensor
from typer.testing import CliRunner

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.features import FeatureBatch, build_features, detect_layout, required_branches
from bsym.simulate.lorentz import simulate_lorentz, write_lorentz
from bsym.simulate.lorentz_cli import lorentz_command
from bsym.training.config import load_config
from bsym.training.fit import Budget, OptimizerConfig, Rows, budget, fit
from bsym.training.losses import classification_loss
from bsym.training.models.lorentz import (
    DualSubnet,
    InvariantNet,
    LorentzDualConfig,
    LorentzInvariantConfig,
    LorentzNetwork,
    UnconstrainedNet,
    lorentz_feature_spec,
)
from bsym.training.studies.cli import parse_sizes, study_app
from bsym.training.studies.learning_curve import (
    StudySettings,
    load_data,
    run_study,
    write_outputs,
)
from bsym.training.studies.plots import learning_curve_plots

Float64 = npt.NDArray[np.float64]
MUON_BRANCHES = ["Muon_px", "Muon_py", "Muon_pz", "Muon_E", "Muon_pt"]


def four_vectors(events: ak.Array) -> Float64:
    """[N, 2, 4] = (px, py, pz, E) of both muons, float64."""
    return np.stack(
        [ak.to_numpy(events[f"Muon_{c}"]).astype(np.float64) for c in ("px", "py", "pz", "E")],
        axis=-1,
    )


@dataclass
class Tensors:
    """Model inputs, labels and weights of a set of events."""

    constituents: Tensor
    mask: Tensor
    globals: Tensor
    label: Tensor
    weight: Tensor

    def inputs(self, model: LorentzNetwork) -> tuple[Tensor, ...]:
        by_name = {"constituents": self.constituents, "mask": self.mask, "globals": self.globals}
        return tuple(by_name[name] for name in model.input_names)

    def rows(self, model: LorentzNetwork) -> Rows:
        label = self.label.numpy().astype(np.int64)
        return Rows(self.inputs(model), label, self.weight.numpy())


def train_epochs(model: LorentzNetwork, data: Tensors, *, epochs: int, batch_size: int) -> None:
    """``epochs`` epochs of the one training loop on ``data`` (validated on itself)."""
    schedule = OptimizerConfig(batch_size=batch_size, epochs=epochs, patience=epochs)
    fit(model, data.rows(model), data.rows(model), schedule, seed=0)


def tensors(events: ak.Array) -> Tensors:
    n = len(events)
    return Tensors(
        constituents=torch.from_numpy(four_vectors(events).astype(np.float32)),
        mask=torch.ones(n, 2, dtype=torch.bool),
        globals=torch.from_numpy(ak.to_numpy(events.lead_pt)[:, None].copy()),
        label=torch.from_numpy(ak.to_numpy(events.label).astype(np.float32)),
        weight=torch.from_numpy(ak.to_numpy(events.weight).copy()),
    )


def random_lorentz(rng: np.random.Generator) -> Float64:
    """A random rotation followed by a boost (|β| up to 0.9), acting on (px, py, pz, E)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))
    if np.linalg.det(rotation) < 0:
        rotation[:, 0] *= -1
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    beta = rng.uniform(0.1, 0.9)
    gamma = 1 / np.sqrt(1 - beta**2)
    boost = np.eye(4)
    boost[:3, :3] += (gamma - 1) * np.outer(direction, direction)
    boost[:3, 3] = boost[3, :3] = -gamma * beta * direction
    boost[3, 3] = gamma
    spatial = np.eye(4)
    spatial[:3, :3] = rotation
    return boost @ spatial


def fitted(model: LorentzNetwork, data: Tensors) -> LorentzNetwork:
    """Model with normalisation and BatchNorm statistics taken from ``data``, in eval mode."""
    model.fit_normalisation(*data.inputs(model))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.logits(*data.inputs(model))
    return model.eval()


@pytest.fixture(scope="module")
def exact_events() -> ak.Array:
    return simulate_lorentz(3000, seed=5, breaking=0.0)


@pytest.fixture(scope="module")
def smeared_events() -> ak.Array:
    return simulate_lorentz(3000, seed=5, breaking=0.1)


# simulator


def test_fields_types_and_order(smeared_events: ak.Array) -> None:
    events = smeared_events
    assert set(events.fields) == {*MUON_BRANCHES, "lead_pt", "label", "weight", "mass_true"}
    assert ak.all(ak.num(events.Muon_px, axis=1) == 2)
    for name in MUON_BRANCHES:
        assert str(ak.type(events[name]).content) == "var * float32"
    assert events.label.type.content.primitive == "int32"
    pt = ak.to_numpy(events.Muon_pt)
    assert np.all(pt[:, 0] >= pt[:, 1]) and np.all(pt > 0)
    np.testing.assert_allclose(
        pt, np.hypot(ak.to_numpy(events.Muon_px), ak.to_numpy(events.Muon_py)), rtol=1e-5
    )
    np.testing.assert_array_equal(ak.to_numpy(events.lead_pt), pt[:, 0])
    assert set(np.unique(ak.to_numpy(events.label))) == {0, 1}
    mass = ak.to_numpy(events.mass_true)
    assert mass.min() >= 70 and mass.max() < 300
    assert np.any(pt[:, 0] < 20) and np.any(pt[:, 0] > 120)


def test_no_breaking_gives_exact_massless_muons(exact_events: ak.Array) -> None:
    p = four_vectors(exact_events)
    energy, momentum = p[..., 3], p[..., :3]
    np.testing.assert_allclose(energy, np.linalg.norm(momentum, axis=-1), rtol=1e-5)
    total = p.sum(axis=1)
    mass = np.sqrt(total[:, 3] ** 2 - np.sum(total[:, :3] ** 2, axis=-1))
    np.testing.assert_allclose(mass, ak.to_numpy(exact_events.mass_true), rtol=1e-3)


def test_breaking_shifts_both_pt_alike_and_keeps_phi_and_pz(
    exact_events: ak.Array, smeared_events: ak.Array
) -> None:
    exact, smeared = four_vectors(exact_events), four_vectors(smeared_events)
    np.testing.assert_array_equal(exact[..., 2], smeared[..., 2])
    np.testing.assert_allclose(
        np.arctan2(exact[..., 1], exact[..., 0]),
        np.arctan2(smeared[..., 1], smeared[..., 0]),
        atol=1e-5,
    )
    shift = ak.to_numpy(smeared_events.Muon_pt) - ak.to_numpy(exact_events.Muon_pt)
    np.testing.assert_allclose(shift[:, 0], shift[:, 1], atol=1e-3)
    relative = shift[:, 0] / ak.to_numpy(exact_events.lead_pt)
    assert 0.08 < np.std(relative) < 0.12
    np.testing.assert_allclose(
        smeared[..., 3], np.linalg.norm(smeared[..., :3], axis=-1), rtol=1e-5
    )


def test_weights_give_background_the_signal_lead_pt_spectrum(smeared_events: ak.Array) -> None:
    lead_pt = ak.to_numpy(smeared_events.lead_pt)
    label = ak.to_numpy(smeared_events.label)
    weight = ak.to_numpy(smeared_events.weight).astype(np.float64)
    assert np.all(weight[label == 1] == 1) and np.all(weight > 0)
    np.testing.assert_allclose(weight[label == 0].sum(), np.sum(label == 1), rtol=1e-4)
    edges = np.quantile(lead_pt[label == 1], np.linspace(0, 1, 11))
    edges[0], edges[-1] = 0, np.inf
    signal = np.histogram(lead_pt[label == 1], edges)[0] / np.sum(label == 1)
    raw = np.histogram(lead_pt[label == 0], edges)[0] / np.sum(label == 0)
    weighted = np.histogram(lead_pt[label == 0], edges, weights=weight[label == 0])[0]
    weighted /= weight[label == 0].sum()
    np.testing.assert_allclose(weighted, signal, atol=2e-3)
    assert np.max(np.abs(raw - signal)) > 0.03


def test_same_seed_same_events_and_bad_requests() -> None:
    first, second = simulate_lorentz(500, seed=3), simulate_lorentz(500, seed=3)
    assert ak.all(first.Muon_E == second.Muon_E)
    assert not ak.all(simulate_lorentz(500, seed=4).Muon_E == first.Muon_E)
    with pytest.raises(ConfigError, match="breaking"):
        simulate_lorentz(10, seed=1, breaking=-0.1)
    with pytest.raises(ConfigError, match="positive"):
        simulate_lorentz(0, seed=1)


def test_written_files_read_through_the_feature_spec(tmp_path: Path) -> None:
    paths = write_lorentz(tmp_path, 1000, seed=2, events_per_file=400)
    assert [p.name for p in paths] == ["lorentz_000.root", "lorentz_001.root", "lorentz_002.root"]
    assert not list(tmp_path.glob(".*"))
    spec = lorentz_feature_spec()
    with uproot.open(paths[0]) as file:
        tree = file["Events"]
        assert tree.num_entries == 400
        assert set(tree.keys()) == {
            "nMuon",
            *MUON_BRANCHES,
            "lead_pt",
            "label",
            "weight",
            "mass_true",
        }
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=True))
    assert layout == "object"
    batch = build_features(arrays, spec, layout, with_label=True)
    assert batch.constituents is not None and batch.mask is not None
    assert batch.constituents.shape == (400, 2, 4) and batch.mask.all()
    assert batch.globals is not None and batch.weight is not None
    np.testing.assert_array_equal(batch.globals[:, 0], ak.to_numpy(arrays.lead_pt))
    whole = simulate_lorentz(1000, seed=2)
    np.testing.assert_array_equal(batch.constituents[:, :, 3], ak.to_numpy(whole.Muon_E[:400]))


def test_simulate_command(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(lorentz_command)
    result = CliRunner().invoke(
        app, ["--events", "300", "--out", str(tmp_path), "--breaking", "0", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lorentz_000.root").is_file()
    result = CliRunner().invoke(app, ["--events", "10", "--out", str(tmp_path), "--breaking", "-1"])
    assert result.exit_code != 0


# networks


def test_invariant_net_is_lorentz_invariant(exact_events: ak.Array) -> None:
    data = tensors(exact_events[:512])
    torch.manual_seed(0)
    model = fitted(InvariantNet(), data).double()
    unconstrained = fitted(UnconstrainedNet(), data).double()
    p = data.constituents.double()
    rng = np.random.default_rng(7)
    with torch.no_grad():
        reference = model.logits(p, data.mask)
        for _ in range(5):
            transform = torch.from_numpy(random_lorentz(rng))
            moved = p @ transform.T
            torch.testing.assert_close(
                model.logits(moved, data.mask), reference, rtol=1e-6, atol=1e-6
            )
        # the test can fail: a network without the symmetry notices the same transformation
        changed = unconstrained.logits(moved, data.mask) - unconstrained.logits(p, data.mask)
        assert changed.abs().max() > 1e-2


def test_dual_outputs_and_weights_sum_to_one(smeared_events: ak.Array) -> None:
    data = tensors(smeared_events[:300])
    model = fitted(DualSubnet(), data)
    with torch.no_grad():
        score, weight = model(*data.inputs(model))
    assert score.shape == (300, 1) and weight.shape == (300, 2)
    assert torch.all((score > 0) & (score < 1))
    assert torch.all(weight >= 0)
    torch.testing.assert_close(weight.sum(dim=1), torch.ones(300), rtol=0, atol=1e-6)
    assert DualSubnet.output_names == ("score", "symmetry_weight")
    assert DualSubnet.input_names == ("constituents", "mask", "globals")


@pytest.mark.parametrize("model_type", [UnconstrainedNet, InvariantNet, DualSubnet])
def test_short_training_reduces_the_loss(
    model_type: type[LorentzNetwork], smeared_events: ak.Array
) -> None:
    data = tensors(smeared_events[:1024])
    torch.manual_seed(1)
    model = model_type()
    model.fit_normalisation(*data.inputs(model))

    def loss() -> float:
        """The training objective on all events, BatchNorm on batch statistics as in training."""
        model.train()
        with torch.no_grad():
            logits = model.logits(*data.inputs(model))[:, 0]
            return float(classification_loss(logits[:, None], data.label, data.weight))

    before = loss()
    train_epochs(model, data, epochs=6, batch_size=64)
    assert loss() < before - 0.01


def test_dual_subnet_onnx_parity(smeared_events: ak.Array) -> None:
    data = tensors(smeared_events[:1000])
    torch.manual_seed(2)
    model = DualSubnet()
    model.fit_normalisation(*data.inputs(model))
    train_epochs(model, data, epochs=1, batch_size=128)
    names = [*model.input_names, *model.output_names]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            model,
            tuple(t[:4] for t in data.inputs(model)),
            buffer,
            input_names=list(model.input_names),
            output_names=list(model.output_names),
            dynamic_axes={name: {0: "batch"} for name in names},
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(model.input_names, data.inputs(model), strict=True)}
    score, weight = session.run(list(model.output_names), feed)
    with torch.no_grad():
        expected_score, expected_weight = model(*data.inputs(model))
    assert score.shape == (1000, 1) and weight.shape == (1000, 2)
    np.testing.assert_allclose(score, expected_score.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(weight, expected_weight.numpy(), rtol=0, atol=1e-4)


def test_lorentz_configs_check_the_spec_and_build() -> None:
    spec = lorentz_feature_spec(("mass_true", "lead_pt"))
    batch = FeatureBatch(0, None, None, None, None, None, None)
    model = LorentzDualConfig().build(spec, batch)
    assert isinstance(model, DualSubnet) and model.gate_index == 1
    assert model.init_kwargs == {"gate_index": 1}
    assert isinstance(LorentzInvariantConfig().build(spec, batch), InvariantNet)
    with pytest.raises(ValueError, match="not among features"):
        LorentzDualConfig(gate="lead_eta").check_features(spec)
    too_few = spec.model_copy(
        update={"constituents": spec.constituents.model_copy(update={"max_count": 1})}
    )  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_count >= 2"):
        LorentzInvariantConfig().check_features(too_few)


# study


def test_parse_sizes() -> None:
    assert parse_sizes("8k, 16k,32000") == (8000, 16000, 32000)
    assert parse_sizes(None) is None
    with pytest.raises(typer.BadParameter):
        parse_sizes("eight")


def test_small_training_sets_get_more_epochs_within_bounds() -> None:
    schedule = StudySettings().schedule()
    assert budget(schedule, 80_000).stretch == 1
    assert budget(schedule, 8_000) == Budget(
        epochs=78, patience=16, lr_patience=6, stretch=2400 / 1240
    )
    assert budget(schedule, 600).stretch == 4


@pytest.mark.parametrize("model", ["unconstrained", "invariant", "dual"])
def test_bsym_train_uses_the_study_schedule(model: str) -> None:
    config = load_config(shipped_config(f"lorentz_{model}"))
    assert config.optimizer == StudySettings().schedule()


def test_tiny_study_writes_table_plots_and_json(tmp_path: Path) -> None:
    settings = StudySettings(
        sizes=(600, 1200), repeats=2, test_events=2000, val_events=1000, max_epochs=2, min_steps=0
    )
    result = run_study(settings, tmp_path / "data", threads=1)
    assert len(result.runs) == 2 * 2 * 3
    summary = result.summary()
    assert set(summary) == {"unconstrained", "invariant", "dual"}
    assert all(0.3 < mean < 1 for rows in summary.values() for mean, _ in rows.values())
    weights = result.weight_summary()
    assert set(weights) == {600, 1200} and len(weights[600]) == 7
    paths = write_outputs(result, tmp_path / "out") + learning_curve_plots(result, tmp_path / "out")
    assert {p.name for p in paths} == {
        "learning_curve.json",
        "auc_vs_size.png",
        "symmetry_weight_vs_pt.png",
    }
    numbers = json.loads(paths[0].read_text())
    assert numbers["auc"]["dual"]["600"]["mean"] == summary["dual"][600][0]
    # the sample is cached: reading it again writes nothing
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.root")}
    again = load_data(settings, tmp_path / "data")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.root")} == files
    assert again.n_rows == settings.total_events


def test_study_command_help() -> None:
    result = CliRunner().invoke(study_app, ["learning-curve", "--help"])
    assert result.exit_code == 0
    assert "--quick" in result.output and "lr 1e-3" in result.output
