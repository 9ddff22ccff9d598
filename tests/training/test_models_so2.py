"""The SO(2)_ĵ layers and networks: definitions, equivariance, and what breaks SO(3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from bsym.training.models.so2 import (
    SO2PFN,
    Block,
    SO2Coefficients,
    SO2Tensor,
    SO2Vector,
    TensorPFN,
    VectorPFN,
    axis_from,
    jet_frame,
    trelu,
    vrelu,
)

N_JETS, N_TRACKS = 10, 5
VECTORS = [[1, 2, 3], [4, 5, 6]]


def rotation(axis: Tensor, angle: float) -> Tensor:
    """Rodrigues' rotation by ``angle`` about ``axis``."""
    k = axis / axis.norm()
    zero = torch.zeros((), dtype=k.dtype)
    skew = torch.stack(
        [
            torch.stack([zero, -k[2], k[1]]),
            torch.stack([k[2], zero, -k[0]]),
            torch.stack([-k[1], k[0], zero]),
        ]
    )
    eye = torch.eye(3, dtype=k.dtype)
    return eye + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def explicit_a(coefficients: SO2Coefficients, axis: Tensor, o: int, i: int) -> Tensor:
    """The paper's A = (a ĵĵᵀ + b (I − ĵĵᵀ)) R_ĵ(φ), built as a 3 × 3 matrix."""
    parallel = torch.outer(axis, axis)
    eye = torch.eye(3, dtype=axis.dtype)
    a, b, phi = coefficients.a[o, i], coefficients.b[o, i], float(coefficients.phi[o, i].detach())
    return (a * parallel + b * (eye - parallel)) @ rotation(axis, phi)


def test_vrelu_and_trelu_definitions() -> None:
    v = torch.tensor([[0.3, -0.4, 0.0], [3.0, 0.0, 4.0]]).T  # components first, 2 channels
    assert torch.allclose(vrelu(v), torch.tensor([[0.3, -0.4, 0.0], [0.6, 0.0, 0.8]]).T)
    small = torch.full((3, 3, 1), 0.1)
    large = torch.arange(9.0).reshape(3, 3, 1)
    assert torch.equal(trelu(small), small)
    assert torch.allclose(trelu(large), large / math.sqrt(float((large**2).sum())))
    assert torch.allclose(torch.linalg.matrix_norm(trelu(large)[..., 0]), torch.tensor(1.0))


def test_the_jet_frame_is_a_rotation_taking_the_axis_to_z() -> None:
    globals_ = torch.tensor([[0.3, 1.0], [-1.5, -2.8], [2.2, 0.0]], dtype=torch.float64)
    axis = axis_from(globals_, [0, 1])
    frame = jet_frame(axis)
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert torch.allclose(frame @ frame.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(frame), torch.ones(3, dtype=torch.float64))
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(frame @ axis.unsqueeze(-1), z.expand(3, 3).unsqueeze(-1), atol=1e-12)


@pytest.fixture
def axis() -> Tensor:
    return torch.nn.functional.normalize(torch.tensor([0.4, -0.7, 0.6], dtype=torch.float64), dim=0)


def test_so2_vector_layer_is_the_papers_construction(axis: Tensor) -> None:
    torch.manual_seed(1)
    layer = SO2Vector(3, 2).double()
    v = torch.randn(3, 3, dtype=torch.float64)  # [channel, component]
    frame = jet_frame(axis.unsqueeze(0))[0]
    with torch.no_grad():
        in_frame = layer(frame @ v.T)  # [component, channel]
        expected = torch.stack(
            [
                sum(explicit_a(layer.coefficients, axis, o, i) @ v[i] for i in range(3))
                for o in range(2)
            ]
        )
    assert torch.allclose((frame.T @ in_frame).T, expected, atol=1e-12)


def test_so2_tensor_layer_is_the_papers_construction(axis: Tensor) -> None:
    torch.manual_seed(2)
    layer = SO2Tensor(3, 2).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    t = torch.randn(3, 3, 3, dtype=torch.float64)  # [channel, 3, 3]
    frame = jet_frame(axis.unsqueeze(0))[0]
    eye = torch.eye(3, dtype=torch.float64)
    with torch.no_grad():
        in_frame = layer(torch.einsum("ab,cbd,ed->aec", frame, t, frame))
        expected = torch.stack(
            [
                sum(
                    explicit_a(layer.left, axis, o, i)
                    @ t[i]
                    @ explicit_a(layer.right, axis, o, i).T
                    for i in range(3)
                )
                + layer.bias[o] * eye
                for o in range(2)
            ]
        )
    back = torch.einsum("ba,bdo,de->oae", frame, in_frame, frame)
    assert torch.allclose(back, expected, atol=1e-12)


def test_isotropic_coefficients_give_a_multiple_of_the_identity(axis: Tensor) -> None:
    coefficients = SO2Coefficients(2, 2).double()
    coefficients.make_isotropic()
    for o in range(2):
        for i in range(2):
            matrix = explicit_a(coefficients, axis, o, i)
            assert torch.allclose(matrix, coefficients.a[o, i] * torch.eye(3, dtype=torch.float64))


def random_rotation(rng: np.random.Generator) -> Tensor:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.from_numpy(q)


def test_bilinear_products_are_so3_equivariant() -> None:
    torch.manual_seed(3)
    block = Block((4, 4, 4), 2, so2=False, bilinear=True).double()
    s = torch.randn(7, 4, dtype=torch.float64)
    v = torch.randn(7, 3, 4, dtype=torch.float64)
    t = torch.randn(7, 3, 3, 4, dtype=torch.float64)
    q = random_rotation(np.random.default_rng(4))
    s1, v1, t1 = block.products(s, v, t)
    s2, v2, t2 = block.products(
        s, torch.einsum("ij,njc->nic", q, v), torch.einsum("ij,njkc,lk->nilc", q, t, q)
    )
    assert t1 is not None and t2 is not None
    assert s1.shape == (7, 6) and v1.shape == (7, 3, 6) and t1.shape == (7, 3, 3, 6)
    assert torch.allclose(s2, s1, atol=1e-10)
    assert torch.allclose(v2, torch.einsum("ij,njc->nic", q, v1), atol=1e-10)
    assert torch.allclose(t2, torch.einsum("ij,njkc,lk->nilc", q, t1, q), atol=1e-10)


def jets(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tracks (charge, momentum, closest approach), mask and globals (η, φ) in float64."""
    rng = np.random.default_rng(seed)
    tracks = torch.from_numpy(rng.normal(size=(N_JETS, N_TRACKS, 7)))
    tracks[..., 0] = torch.from_numpy(rng.choice([-1.0, 1.0], (N_JETS, N_TRACKS)))
    mask = torch.from_numpy(rng.random((N_JETS, N_TRACKS)) < 0.8)
    mask[:, 0] = True
    tracks = tracks * mask.unsqueeze(-1)
    globals_ = torch.from_numpy(
        np.stack([rng.uniform(-2, 2, N_JETS), rng.uniform(-3, 3, N_JETS)], -1)
    )
    return tracks, mask, globals_


def rotated(tracks: Tensor, rotations: Tensor) -> Tensor:
    """Every vector of every track rotated by its jet's rotation [N, 3, 3]."""
    out = tracks.clone()
    for columns in VECTORS:
        out[:, :, columns] = torch.einsum("nij,ntj->nti", rotations, tracks[:, :, columns])
    return out


def network(cls: type[SO2PFN], *, jet_vector: bool, bilinear: bool = True) -> SO2PFN:
    torch.manual_seed(5)
    model = cls(
        [0],
        VECTORS,
        [0, 1],
        jet_vector=jet_vector,
        width=4,
        phi_blocks=2,
        f_blocks=1,
        head_sizes=[8],
        bilinear=bilinear,
    )
    return model.double().eval()


def relative_change(before: Tensor, after: Tensor) -> float:
    return float((after - before).abs().max() / before.abs().max())


@pytest.mark.parametrize("cls", [VectorPFN, TensorPFN])
@pytest.mark.parametrize("jet_vector", [True, False])
def test_invariant_about_the_jet_axis_and_not_under_other_rotations(
    cls: type[SO2PFN], jet_vector: bool
) -> None:
    tracks, mask, globals_ = jets(6)
    model = network(cls, jet_vector=jet_vector)
    axis = axis_from(globals_, [0, 1])
    about_axis = torch.stack([rotation(axis[n], 0.3 + 0.5 * n) for n in range(N_JETS)])
    generic = random_rotation(np.random.default_rng(7)).expand(N_JETS, 3, 3)
    with torch.no_grad():
        readout = model.readout(tracks, mask, globals_)
        logits = model.logits(tracks, mask, globals_)
        assert (
            relative_change(readout, model.readout(rotated(tracks, about_axis), mask, globals_))
            < 1e-12
        )
        assert (
            relative_change(logits, model.logits(rotated(tracks, about_axis), mask, globals_))
            < 1e-12
        )
        assert (
            relative_change(readout, model.readout(rotated(tracks, generic), mask, globals_)) > 1e-3
        )


@pytest.mark.parametrize("cls", [VectorPFN, TensorPFN])
def test_isotropic_maps_without_the_jet_vector_are_fully_invariant(cls: type[SO2PFN]) -> None:
    tracks, mask, globals_ = jets(8)
    model = network(cls, jet_vector=False)
    model.isotropic()
    generic = random_rotation(np.random.default_rng(9)).expand(N_JETS, 3, 3)
    with torch.no_grad():
        readout = model.readout(tracks, mask, globals_)
        assert (
            relative_change(readout, model.readout(rotated(tracks, generic), mask, globals_))
            < 1e-12
        )
        other_axis = torch.stack([globals_[:, 0] * -0.5, globals_[:, 1] + 1.0], dim=-1)
        assert relative_change(readout, model.readout(tracks, mask, other_axis)) < 1e-12


@pytest.mark.parametrize("cls", [VectorPFN, TensorPFN])
def test_rotating_the_axis_with_the_tracks_changes_nothing(cls: type[SO2PFN]) -> None:
    """ĵ is a vector like the others: the construction is SO(3)-covariant as a whole."""
    tracks, mask, globals_ = jets(10)
    model = network(cls, jet_vector=True)
    q = random_rotation(np.random.default_rng(11))
    axis = axis_from(globals_, [0, 1]) @ q.T
    new_globals = torch.stack([torch.atanh(axis[:, 2]), torch.atan2(axis[:, 1], axis[:, 0])], -1)
    with torch.no_grad():
        readout = model.readout(tracks, mask, globals_)
        moved = model.readout(rotated(tracks, q.expand(N_JETS, 3, 3)), mask, new_globals)
    assert relative_change(readout, moved) < 1e-10


@pytest.mark.parametrize("cls", [VectorPFN, TensorPFN])
def test_without_the_bilinear_layer_vectors_never_reach_the_scalars(cls: type[SO2PFN]) -> None:
    tracks, mask, globals_ = jets(12)
    model = network(cls, jet_vector=True, bilinear=False)
    n_scalars = 2 * 4  # 2F channels
    other = tracks.clone()
    other[..., 1:] = other[..., 1:] * 3.0 + 1.0
    with torch.no_grad():
        before = model.readout(tracks, mask, globals_)
        after = model.readout(other * mask.unsqueeze(-1), mask, globals_)
    assert before.shape[1] == n_scalars * (3 if cls.tensors else 2)
    assert torch.allclose(before[:, :n_scalars], after[:, :n_scalars])
    assert not torch.allclose(before[:, n_scalars:], after[:, n_scalars:])


def test_the_axis_from_cartesian_globals_is_the_same() -> None:
    tracks, mask, globals_ = jets(13)
    axis = axis_from(globals_, [0, 1])
    cartesian = torch.cat([globals_, 50.0 * axis], dim=-1)
    from_angles = network(TensorPFN, jet_vector=False)
    torch.manual_seed(5)
    from_xyz = (
        TensorPFN(
            [0],
            VECTORS,
            [2, 3, 4],
            jet_vector=False,
            width=4,
            phi_blocks=2,
            f_blocks=1,
            head_sizes=[8],
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        assert torch.allclose(
            from_angles.readout(tracks, mask, cartesian), from_xyz.readout(tracks, mask, cartesian)
        )
