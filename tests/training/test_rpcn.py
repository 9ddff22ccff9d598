"""Rotational particle convolution and the rotation dual: invariance on the grid of angles,
the bound off it, equivariant features, IRC safety, the symmetry weights, config checks,
and ONNX parity through bsym export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.export.onnx_export import DEFAULT_TOLERANCE, check_parity, export_onnx, to_onnx
from bsym.features import FeatureBatch
from bsym.training.checkpoint import load_checkpoint
from bsym.training.config import load_config
from bsym.training.models.rpcn import RPCN, RotationDual, circular_shift, rotation_bound
from bsym.training.train import train

N_ANGLES = 8


def cells(rows: int = 64, slots: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Float64 constituents (E, x, y) with E > 0 and a mask with 3 to ``slots`` real ones."""
    rng = np.random.default_rng(seed)
    values = np.stack(
        [rng.exponential(5.0, (rows, slots)), *rng.normal(0.0, 0.3, (2, rows, slots))], axis=-1
    )
    counts = rng.integers(3, slots + 1, rows)
    mask = np.arange(slots)[None, :] < counts[:, None]
    values[~mask] = 0.0
    return torch.from_numpy(values), torch.from_numpy(mask)


def rotate(constituents: Tensor, angle: float) -> Tensor:
    """The (x, y) columns 1 and 2 rotated by ``angle`` about the origin."""
    out = constituents.clone()
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = constituents[..., 1], constituents[..., 2]
    out[..., 1] = cos * x - sin * y
    out[..., 2] = sin * x + cos * y
    return out


def fitted_rpcn(*, pool: str = "max", energy: int | None = None, seed: int = 3) -> RPCN:
    constituents, mask = cells()
    torch.manual_seed(seed)
    model = RPCN(3, 0, (1, 2), N_ANGLES, (16, 16), (16, 16), 3, pool, (16,), energy, False)  # type: ignore[arg-type]
    batch = FeatureBatch(
        len(mask), constituents.float().numpy(), mask.numpy(), None, None, None, None
    )
    model.prepare(batch)
    return model.double().eval()


@pytest.mark.parametrize(("pool", "energy"), [("max", None), ("mean", None), ("max", 0)])
def test_invariant_under_rotations_by_multiples_of_the_grid(pool: str, energy: int | None) -> None:
    model = fitted_rpcn(pool=pool, energy=energy)
    constituents, mask = cells()
    with torch.no_grad():
        reference = model.logits(constituents, mask)
        for m in range(-N_ANGLES, 2 * N_ANGLES + 1):
            turned = model.logits(rotate(constituents, 2 * math.pi * m / N_ANGLES), mask)
            # the angles' cosines are float32 buffers: exact up to their rounding
            torch.testing.assert_close(turned, reference, rtol=0, atol=1e-7)
        off_grid = model.logits(rotate(constituents, 0.3), mask)
    assert (off_grid - reference).abs().max() > 1e-5


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_off_grid_rotations_stay_within_the_bound(pool: str) -> None:
    model = fitted_rpcn(pool=pool)
    constituents, mask = cells()
    rng = np.random.default_rng(4)
    with torch.no_grad():
        reference = model.logits(constituents, mask)[:, 0]
        for angle in rng.uniform(-math.pi, math.pi, 12):
            step = 2 * math.pi / N_ANGLES
            delta = angle - step * round(angle / step)
            bound = rotation_bound(model, constituents, mask, delta)
            change = (model.logits(rotate(constituents, angle), mask)[:, 0] - reference).abs()
            assert torch.all(change <= bound + 1e-9)
        # linear in |δ| for small δ, and zero on the grid
        small = rotation_bound(model, constituents, mask, 1e-3)
        smaller = rotation_bound(model, constituents, mask, 5e-4)
        torch.testing.assert_close(small, 2 * smaller, rtol=1e-6, atol=0)
        assert torch.all(rotation_bound(model, constituents, mask, 0.0) == 0)


def test_equivariant_features_shift_with_the_rotation() -> None:
    model = fitted_rpcn()
    constituents, mask = cells()
    with torch.no_grad():
        features = model.subnet.equivariant(constituents, mask)
        for m in range(N_ANGLES):
            turned = model.subnet.equivariant(
                rotate(constituents, 2 * math.pi * m / N_ANGLES), mask
            )
            torch.testing.assert_close(turned, torch.roll(features, m, dims=1), rtol=0, atol=1e-7)
        assert not torch.allclose(torch.roll(features, 1, dims=1), features, atol=1e-3)


def test_circular_shift_matches_roll() -> None:
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    for shift in range(5):
        assert torch.equal(circular_shift(h, shift), torch.roll(h, -shift, dims=1))


def with_particle(constituents: Tensor, mask: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """One more real constituent per row, with ``values`` [rows, 3]."""
    return torch.cat([constituents, values[:, None]], dim=1), torch.cat(
        [mask, torch.ones(len(mask), 1, dtype=torch.bool)], dim=1
    )


def collinear_split(constituents: Tensor, mask: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """The first constituent of each row split into two at the same place, energies
    ``fraction`` and ``1 − fraction`` of its own."""
    first = constituents[:, 0].clone()
    split = constituents.clone()
    split[:, 0, 0] *= fraction
    first[:, 0] *= 1 - fraction
    return with_particle(split, mask, first)


def test_irc_safe_variant_ignores_soft_and_collinear_splits() -> None:
    safe, unsafe = fitted_rpcn(energy=0), fitted_rpcn()
    constituents, mask = cells()
    soft = torch.stack([torch.zeros(len(mask)), *torch.randn(2, len(mask), dtype=torch.float64)], 1)
    with torch.no_grad():
        for model, invariant in ((safe, True), (unsafe, False)):
            reference = model.logits(constituents, mask)
            for changed in (
                with_particle(constituents, mask, soft.double()),
                collinear_split(constituents, mask, 0.3),
            ):
                found = model.logits(*changed)
                if invariant:
                    torch.testing.assert_close(found, reference, rtol=0, atol=1e-12)
                else:
                    assert (found - reference).abs().max() > 1e-4


def test_dual_weights_sum_to_one_and_its_rpcn_latent_is_invariant() -> None:
    constituents, mask = cells()
    torch.manual_seed(5)
    model = RotationDual(3, 0, (1, 2), N_ANGLES, (16, 16), (16,), 3, "max", (16,))
    model.prepare(
        FeatureBatch(len(mask), constituents.float().numpy(), mask.numpy(), None, None, None, None)
    )
    model = model.double().eval()
    with torch.no_grad():
        score, weight = model(constituents, mask)
        assert score.shape == (len(mask), 1) and weight.shape == (len(mask), 2)
        assert torch.all((weight > 0) & (weight < 1))
        torch.testing.assert_close(weight.sum(dim=1), torch.ones(len(mask), dtype=torch.float64))
        quarter = rotate(constituents, math.pi / 2)
        torch.testing.assert_close(
            model.subnet(quarter, mask), model.subnet(constituents, mask), rtol=0, atol=1e-7
        )
        # the PFN latent sees the orientation, and the gate with it
        assert (
            model.unconstrained(quarter, mask) - model.unconstrained(constituents, mask)
        ).abs().max() > 1e-3
    assert model.output_names == ("score", "symmetry_weight")


def test_irc_safe_and_positions_are_checked_against_the_spec() -> None:
    path = shipped_config("calo_rotation_rpcn")
    with pytest.raises(ConfigError, match="linear energy"):
        load_config(path, ["model.irc_safe=true"])
    with pytest.raises(ConfigError, match="distinct columns"):
        load_config(path, ["model.position=[1, 3]"])
    with pytest.raises(ConfigError, match="kernel"):
        load_config(path, ["model.kernel=9"])
    safe = load_config(
        path, ["model.irc_safe=true", "features.constituents.features.0={branch: Cell_E}"]
    )
    assert safe.model.irc_safe  # type: ignore[union-attr]
    iso = load_config(shipped_config("isolation_rpcn"))
    assert iso.model.type == "rpcn" and iso.name == "isolation_rpcn"


def test_irc_safe_rpcn_onnx_parity() -> None:
    model = fitted_rpcn(energy=0).float()
    constituents, mask = cells(rows=300, seed=6)
    inputs = {"constituents": constituents.float().numpy(), "mask": mask.numpy()}
    proto = to_onnx(model, inputs, model.input_names, ("score",))
    report = check_parity(model, proto, inputs, ("score",))
    assert report.worst <= DEFAULT_TOLERANCE


@pytest.mark.parametrize("name", ["calo_rotation_rpcn", "calo_rotation_dual", "isolation_rpcn"])
def test_trained_rotation_models_export_with_parity(
    calo_rotation_sample: Path, isolation_sample: Path, tmp_path: Path, name: str
) -> None:
    data = (
        f"'{isolation_sample}/isolation_muons_*.root'"
        if name.startswith("isolation")
        else str(calo_rotation_sample)
    )
    config = load_config(
        shipped_config(name),
        [
            f"data.train=[{data}]",
            f"output_dir={tmp_path / 'run'}",
            "optimizer.epochs=1",
            "optimizer.batch_size=64",
            "model.phi_sizes=[16, 16]",
            "model.conv_sizes=[16]",
            "model.f_sizes=[16]",
        ],
    )
    result = train(config, progress=False)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.checkpoint.model_type == config.model.type
    report = export_onnx(result.checkpoint, tmp_path / "model.onnx")
    assert report.parity.worst <= DEFAULT_TOLERANCE
    expected = ("score", "symmetry_weight") if name.endswith("dual") else ("score",)
    assert report.output_names == expected
