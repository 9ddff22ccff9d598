"""Flavour models: DIPS, RNNIP, IP3D, the scalar PFN and the SO(2)_ĵ networks on a toy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flavour_toy import TRACK_BRANCHES, toy_batch, toy_spec
from pydantic import TypeAdapter, ValidationError

from bsym.export.onnx_export import check_parity, to_onnx
from bsym.features import FeatureBatch
from bsym.training.fit import OptimizerConfig, Rows, fit
from bsym.training.metrics import roc_auc
from bsym.training.models import build_model
from bsym.training.models.base import BsymModel, ModelSettings, NetworkModel, model_inputs
from bsym.training.models.flavour import (
    DIPS,
    RNNIP,
    MaskedBatchNorm,
    significance_bin,
)
from bsym.training.models.registry import model_config_annotation

SO2_COLUMNS: dict[str, Any] = {
    "scalars": ["PFCands_charge", "PFCands_sd0sig"],
    "vectors": [
        ["PFCands_px", "PFCands_py", "PFCands_pz"],
        ["PFCands_vx", "PFCands_vy", "PFCands_vz"],
    ],
    "axis": ["Jet_eta", "Jet_phi"],
}
TINY: dict[str, dict[str, Any]] = {
    "dips": {"type": "dips", "phi_sizes": [16, 16], "f_sizes": [16, 8]},
    "rnnip": {"type": "rnnip", "order_by": "PFCands_sd0sig", "hidden": 12, "f_sizes": [8]},
    "ip3d": {
        "type": "ip3d",
        "d0_significance": "PFCands_sd0sig",
        "z0_significance": "PFCands_sz0sig",
        "bins": 10,
    },
    "flavour_pfn": {"type": "flavour_pfn", "phi_sizes": [16, 16], "f_sizes": [16, 16]},
    "vector_pfn": {
        "type": "vector_pfn",
        **SO2_COLUMNS,
        "width": 4,
        "f_blocks": 1,
        "head_sizes": [16],
    },
    "tensor_pfn": {
        "type": "tensor_pfn",
        **SO2_COLUMNS,
        "width": 4,
        "f_blocks": 1,
        "head_sizes": [16],
    },
}


def settings(config: dict[str, Any]) -> ModelSettings:
    parsed: ModelSettings = TypeAdapter(model_config_annotation()).validate_python(config)
    return parsed


def built(kind: str, batch: FeatureBatch, **overrides: Any) -> BsymModel:
    torch.manual_seed(0)
    config = settings({**TINY[kind], **overrides})
    config.check_features(toy_spec())
    return build_model(config, toy_spec(), batch)


@pytest.fixture(scope="module")
def train_batch() -> FeatureBatch:
    return toy_batch(600, seed=1)


@pytest.fixture(scope="module")
def test_batch() -> FeatureBatch:
    return toy_batch(400, seed=2)


def permuted(inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """The same jets with their track slots (padding included) in another order."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(inputs[0].shape[1]))
    return (inputs[0][:, order], inputs[1][:, order], *inputs[2:])


def with_garbage_padding(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    constituents, mask = inputs[0].clone(), inputs[1]
    constituents[~mask] = 1e3
    return (constituents, mask, *inputs[2:])


@pytest.mark.parametrize("kind", list(TINY))
def test_scores_are_three_class_probabilities_that_ignore_padding(
    kind: str, train_batch: FeatureBatch
) -> None:
    model = built(kind, train_batch).eval()
    inputs = model_inputs(model, train_batch)
    with torch.no_grad():
        score = model(*inputs)
        assert score.shape == (train_batch.n_rows, 3)
        assert torch.allclose(score.sum(dim=1), torch.ones(train_batch.n_rows), atol=1e-5)
        assert torch.allclose(model(*with_garbage_padding(inputs)), score, atol=1e-5)


@pytest.mark.parametrize("kind", ["dips", "rnnip", "ip3d", "flavour_pfn"])
def test_track_order_does_not_matter(kind: str, train_batch: FeatureBatch) -> None:
    model = built(kind, train_batch).eval()
    inputs = model_inputs(model, train_batch)
    with torch.no_grad():
        assert torch.allclose(model(*permuted(inputs, 3)), model(*inputs), atol=1e-5)


def test_dips_is_the_configured_network(train_batch: FeatureBatch) -> None:
    model = build_model(settings({"type": "dips"}), toy_spec(), train_batch)
    assert isinstance(model, DIPS)
    phi = [linear.out_features for linear in model.phi.linears]
    head = [m for m in model.f if isinstance(m, torch.nn.Linear)]
    dropouts = [m.p for m in model.f if isinstance(m, torch.nn.Dropout)]
    assert phi == [100, 100, 128]
    assert [m.out_features for m in head] == [100, 100, 100, 30, 3]
    assert dropouts == [0.1] * 4


def test_masked_batch_norm_uses_only_real_tracks() -> None:
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(3.0, 2.0, (50, 6, 4)).astype(np.float32))
    mask = torch.from_numpy(rng.random((50, 6)) < 0.5)
    real = mask.float().unsqueeze(-1)
    norm = MaskedBatchNorm(4, momentum=1.0).train()
    garbage = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e4))
    y = norm(garbage, real)
    rows = x[mask]
    assert torch.allclose(norm.running_mean, rows.mean(dim=0), atol=1e-4)
    assert torch.allclose(norm.running_var, rows.var(dim=0), rtol=1e-4)
    normalised = y[mask]
    assert torch.allclose(normalised.mean(dim=0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(normalised.std(dim=0, unbiased=False), torch.ones(4), atol=1e-3)
    norm.eval()
    expected = (x - rows.mean(dim=0)) / torch.sqrt(rows.var(dim=0) + norm.eps)
    assert torch.allclose(norm(x, real), expected, atol=1e-4)


def test_rnnip_reads_tracks_by_decreasing_absolute_d0_significance(
    train_batch: FeatureBatch,
) -> None:
    model = built("rnnip", train_batch).eval()
    assert isinstance(model, RNNIP)
    constituents, mask = model_inputs(model, train_batch)
    jet = int(np.argmax(train_batch.mask.sum(axis=1)))  # type: ignore[union-attr]
    tracks = constituents[jet : jet + 1, mask[jet]]
    n = tracks.shape[1]
    order = torch.argsort(torch.abs(tracks[0, :, 0]), descending=True)
    normalised = model.norm(tracks[:, order])
    states, _ = model.lstm(normalised)
    expected = torch.softmax(model.f(states[:, -1]), dim=-1)
    with torch.no_grad():
        assert n > 1
        assert torch.allclose(model(constituents[jet : jet + 1], mask[jet : jet + 1]), expected)


def test_ip3d_is_the_sum_of_track_log_likelihood_ratios(train_batch: FeatureBatch) -> None:
    model = built("ip3d", train_batch, z0_significance=None, bins=6, pseudocount=0.5)
    assert not model.trainable
    tracks, mask, label = train_batch.constituents, train_batch.mask, train_batch.label
    assert tracks is not None and mask is not None and label is not None
    psi = np.sign(tracks[..., 0]) * np.log1p(np.abs(tracks[..., 0]))
    edges = np.linspace(-math.log1p(40.0), math.log1p(40.0), 7)
    cell = np.clip(np.digitize(psi, edges) - 1, 0, 5)
    counts = np.stack(
        [np.bincount(cell[mask & (label[:, None] == c)], minlength=6) for c in range(3)], -1
    )
    log_pdf = np.log((counts + 0.5) / (counts + 0.5).sum(axis=0))
    llr = (np.where(mask, (log_pdf[cell, 2] - log_pdf[cell, 0]), 0.0)).sum(axis=1)
    with torch.no_grad():
        score = model(*model_inputs(model, train_batch)).numpy().astype(np.float64)
    assert np.allclose(np.log(score[:, 2] / score[:, 0]), llr, atol=1e-4)


def test_significance_bins_are_equal_in_signed_log() -> None:
    x = torch.tensor([-1e6, -40.0, -0.5, 0.0, 0.5, 39.0, 1e6])
    bins = significance_bin(x, 4, 40.0).tolist()
    assert bins == [0, 0, 1, 2, 2, 3, 3]


# nn.LSTM checks its input size with a Python comparison that the tracer warns about, and the
# exporter warns about batch sizes for any LSTM without state inputs; the parity check runs
# batches of 4096, 333 and 1 rows, which is what both warnings are about.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning:torch.nn.modules.rnn")
@pytest.mark.filterwarnings("ignore:Exporting a model to ONNX with a batch_size:UserWarning")
@pytest.mark.parametrize("kind", list(TINY))
def test_onnx_parity(kind: str, test_batch: FeatureBatch, train_batch: FeatureBatch) -> None:
    model = built(kind, train_batch).eval()
    inputs = {
        name: np.ascontiguousarray(tensor.numpy())
        for name, tensor in zip(model.input_names, model_inputs(model, test_batch), strict=True)
    }
    proto = to_onnx(model, inputs, tuple(model.input_names), ("score",), opset=17)
    report = check_parity(model, proto, inputs, ("score",), tolerance=1e-5)
    assert report.worst <= 1e-5


@pytest.mark.parametrize("kind", ["dips", "rnnip", "flavour_pfn", "vector_pfn", "tensor_pfn"])
def test_networks_learn_the_toy_through_fit(
    kind: str, train_batch: FeatureBatch, test_batch: FeatureBatch
) -> None:
    model = built(kind, train_batch)
    assert isinstance(model, NetworkModel) and model.n_classes == 3
    schedule = OptimizerConfig(lr=5e-3, batch_size=100, epochs=10, patience=10)
    state = fit(
        model,
        Rows.of(model, train_batch),
        Rows.of(model, test_batch),
        schedule,
        seed=0,
    )
    assert state.epoch >= 1
    with torch.no_grad():
        score = model(*model_inputs(model, test_batch)).numpy()
    is_b = (test_batch.label == 2).astype(np.int64)  # type: ignore[operator]
    not_c = test_batch.label != 1  # type: ignore[operator]
    auc = roc_auc(is_b[not_c], np.log(score[not_c, 2] / score[not_c, 0]), None)
    assert auc > 0.7, f"{kind}: b against light AUC {auc:.3f}"


def test_ip3d_separates_b_from_light(train_batch: FeatureBatch, test_batch: FeatureBatch) -> None:
    model = built("ip3d", train_batch)
    with torch.no_grad():
        score = model(*model_inputs(model, test_batch)).numpy()
    not_c = test_batch.label != 1  # type: ignore[operator]
    is_b = (test_batch.label == 2).astype(np.int64)  # type: ignore[operator]
    assert roc_auc(is_b[not_c], np.log(score[not_c, 2] / score[not_c, 0]), None) > 0.75


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "rnnip", "order_by": "PFCands_d0"}, "model.order_by 'PFCands_d0'"),
        ({"type": "ip3d", "d0_significance": "nope"}, "model.d0_significance 'nope'"),
        ({**TINY["tensor_pfn"], "axis": ["Jet_eta", "Jet_phii"]}, "model.axis 'Jet_phii'"),
        ({**TINY["vector_pfn"], "scalars": ["charge"]}, "model.scalars 'charge'"),
    ],
)
def test_unknown_columns_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        settings(config).check_features(toy_spec())
    assert TRACK_BRANCHES[0] in str(error.value) or "Jet_eta" in str(error.value)


def test_the_axis_needs_two_or_three_globals() -> None:
    with pytest.raises(ValidationError, match="2 \\(eta, phi\\) or 3"):
        settings({**TINY["vector_pfn"], "axis": ["Jet_eta"]})
