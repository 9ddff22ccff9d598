"""Rotational particle convolution (rPCN, arXiv:2107.02908) and its dual with a PFN.

``rpcn`` lifts the Deep Sets sum to the cyclic group of N rotations g_k = 2πk/N about the
origin of two position columns (η–φ or x–y relative to the axis): the lifted features
``h(g_k) = Σ_i w_i Φ(R_{g_k}⁻¹ p_i, s_i)`` [B, N, C], then circular convolutions over k
(rolled copies of h concatenated and one linear map), then max or mean over k, then a head.
With ``irc_safe`` the weights are energy fractions ``w_i = E_i / Σ_j E_j`` and Φ reads the
rotated directions alone; otherwise ``w_i = 1`` and Φ also reads the other (scalar) columns.
``rotation_dual`` pools the invariant rPCN latent with an unconstrained PFN latent by a
learned, input-dependent weight (:class:`~bsym.training.models.base.SymmetryMix`).

The positions are scaled by one isotropic factor (a buffer: the rms of the real
constituents' coordinates) and never shifted, so scaling commutes with the rotations; the
scalar columns are standardised per column. docs/rpcn.md gives the equations, the invariance
guarantees and the bound of :func:`rotation_bound` for rotations off the grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import Tensor, nn

from bsym.errors import SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.training.models.base import (
    BsymModel,
    DualNetwork,
    ModelSettings,
    Standardise,
    SymmetryMix,
    mlp,
    n_globals_of,
    need,
)
from bsym.training.models.sets import GlobalsHead, ParticleSum, check_globals

Pooling = Literal["max", "mean"]
# rows per forward pass when the gate's input statistics are fitted (B·N·P·C floats each)
PREPARE_ROWS = 2048


def circular_shift(h: Tensor, shift: int) -> Tensor:
    """``out[:, k] = h[:, (k + shift) mod N]`` along dim 1, for 0 ≤ shift < N (slices and a
    concat: exportable; the shift is a Python int, so the traced graph has constant slices)."""
    if shift == 0:
        return h
    return torch.cat([h[:, shift:], h[:, :shift]], dim=1)


class CircularConv(nn.Module):
    """A group convolution over the N angles: ``y_k = ReLU(W·[h_{k−r}, …, h_{k+r}] + b)``."""

    def __init__(self, n_in: int, n_out: int, kernel: int, n_angles: int) -> None:
        super().__init__()
        self.offsets = tuple(o % n_angles for o in range(-(kernel // 2), kernel - kernel // 2))
        self.linear = nn.Linear(len(self.offsets) * n_in, n_out)

    def forward(self, h: Tensor) -> Tensor:
        stacked = torch.cat([circular_shift(h, offset) for offset in self.offsets], dim=-1)
        return torch.relu(self.linear(stacked))


class RotationLift(nn.Module):
    """``h(g_k) = Σ_i w_i Φ(R_{g_k}⁻¹ p_i / scale, standardised s_i)``: [B, N, C]."""

    cos: Tensor
    sin: Tensor
    scale: Tensor
    scalars: Tensor

    def __init__(
        self,
        n_features: int,
        position: tuple[int, int],
        n_angles: int,
        phi_sizes: Sequence[int],
        energy: int | None,
    ) -> None:
        super().__init__()
        self.position = position
        self.energy = energy
        angles = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
        self.register_buffer("cos", torch.cos(angles).float())
        self.register_buffer("sin", torch.sin(angles).float())
        self.register_buffer("scale", torch.ones(()))
        scalars = [] if energy is not None else [c for c in range(n_features) if c not in position]
        self.register_buffer("scalars", torch.tensor(scalars, dtype=torch.int64))
        self.n_scalars = len(scalars)
        self.norm = Standardise(len(scalars))
        self.phi = mlp(2 + len(scalars), phi_sizes)

    @property
    def irc_safe(self) -> bool:
        return self.energy is not None

    def fit(self, constituents: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]) -> None:
        """The isotropic position scale and the scalar statistics of the real constituents."""
        real = constituents[mask].astype(np.float64)
        if len(real):
            rms = float(np.sqrt(np.mean(real[:, list(self.position)] ** 2)))
            self.scale.fill_(rms if rms > 1e-12 else 1.0)
            self.norm.fit(real[:, self.scalars.tolist()].astype(np.float32))

    def weights(self, constituents: Tensor, mask: Tensor) -> Tensor:
        """w_i [B, P]: 1 for real constituents, or their energy fractions (``irc_safe``)."""
        real = mask.to(constituents.dtype)
        if self.energy is None:
            return real
        energy = constituents[..., self.energy] * real
        total = torch.clamp(energy.sum(dim=1, keepdim=True), min=1e-12)
        return energy / total

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        x = constituents[..., self.position[0]] / self.scale
        y = constituents[..., self.position[1]] / self.scale
        cos, sin = self.cos[None, :, None], self.sin[None, :, None]
        x, y = x[:, None, :], y[:, None, :]
        rotated = torch.stack([cos * x + sin * y, cos * y - sin * x], dim=-1)  # [B, N, P, 2]
        if self.n_scalars:
            scalars = self.norm(torch.index_select(constituents, 2, self.scalars))
            scalars = scalars[:, None].expand(-1, rotated.shape[1], -1, -1)
            rotated = torch.cat([rotated, scalars], dim=-1)
        weights = self.weights(constituents, mask)[:, None, :, None]
        lifted: Tensor = (self.phi(rotated) * weights).sum(dim=2)
        return lifted


class RotationSubnet(nn.Module):
    """The lift, the circular convolutions and the pooling over angles: z_i [B, C]."""

    def __init__(
        self,
        n_features: int,
        position: tuple[int, int],
        n_angles: int,
        phi_sizes: Sequence[int],
        conv_sizes: Sequence[int],
        kernel: int,
        pool: Pooling,
        energy: int | None,
    ) -> None:
        super().__init__()
        if kernel > n_angles:
            raise SpecMismatchError(f"the kernel ({kernel}) is wider than the {n_angles} angles")
        self.pool = pool
        self.lift = RotationLift(n_features, position, n_angles, phi_sizes, energy)
        widths = [phi_sizes[-1], *conv_sizes]
        self.convs = nn.ModuleList(
            CircularConv(n_in, n_out, kernel, n_angles)
            for n_in, n_out in itertools.pairwise(widths)
        )
        self.width = widths[-1]

    def equivariant(self, constituents: Tensor, mask: Tensor) -> Tensor:
        """The features over the angles [B, N, C] after the convolutions (equivariant)."""
        h: Tensor = self.lift(constituents, mask)
        for conv in self.convs:
            h = conv(h)
        return h

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        h = self.equivariant(constituents, mask)
        return torch.amax(h, dim=1) if self.pool == "max" else torch.mean(h, dim=1)


class RPCN(GlobalsHead):
    """``F(pool_k conv(h)(g_k) ⊕ globals)``: invariant under rotations by 2π/N exactly."""

    kind = "rpcn"

    def __init__(
        self,
        n_features: int,
        n_globals: int,
        position: Sequence[int] = (1, 2),
        n_angles: int = 8,
        phi_sizes: Sequence[int] = (64, 64, 64),
        conv_sizes: Sequence[int] = (64,),
        kernel: int = 3,
        pool: Pooling = "max",
        f_sizes: Sequence[int] = (64, 64),
        energy: int | None = None,
        use_globals: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "n_features": n_features,
            "n_globals": n_globals,
            "position": list(position),
            "n_angles": n_angles,
            "phi_sizes": list(phi_sizes),
            "conv_sizes": list(conv_sizes),
            "kernel": kernel,
            "pool": pool,
            "f_sizes": list(f_sizes),
            "energy": energy,
            "use_globals": use_globals,
        }
        self.use_globals = use_globals and n_globals > 0
        self.input_names = ("constituents", "mask", "globals")[: 3 if self.use_globals else 2]
        x, y = position
        self.subnet = RotationSubnet(
            n_features, (x, y), n_angles, phi_sizes, conv_sizes, kernel, pool, energy
        )
        self.build_head(self.subnet.width, n_globals, f_sizes)

    def prepare(self, batch: FeatureBatch) -> None:
        self.subnet.lift.fit(need(batch.constituents, "constituents"), need(batch.mask, "mask"))
        self.fit_globals(batch)

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask, *rest = self.unpack(inputs)
        return self.head(self.subnet(constituents, mask), rest)


class RotationDual(DualNetwork, RPCN):
    """``F(w_u·z_u + w_i·z_i)``: the rPCN latent z_i and a PFN latent z_u of the same width,
    ``w = softmax(G(z_u ⊕ z_i))`` (arXiv:2412.18773's symmetry factor, gated on the event).

    Built like :class:`RPCN` (the same arguments; the rPCN is ``subnet``), plus the PFN latent
    Φ_u = ``phi_sizes`` + [C] and the gate G 2C→32→32→2.
    """

    kind = "rotation_dual"
    gate_sizes: ClassVar[tuple[int, ...]] = (32, 32)

    def __init__(self, n_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(n_features, *args, **kwargs)
        width = self.subnet.width
        self.unconstrained = ParticleSum(n_features, [*self.init_kwargs["phi_sizes"], width])
        self.mix = SymmetryMix(2 * width, self.gate_sizes)

    def latents(self, constituents: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(gate input, z_u, z_i)."""
        z_u = self.unconstrained(constituents, mask)
        z_i = self.subnet(constituents, mask)
        return torch.cat([z_u, z_i], dim=1), z_u, z_i

    def prepare(self, batch: FeatureBatch) -> None:
        super().prepare(batch)
        constituents, mask = need(batch.constituents, "constituents"), need(batch.mask, "mask")
        self.unconstrained.fit(constituents, mask)
        with torch.no_grad():
            gate_input = torch.cat(
                [
                    self.latents(
                        torch.from_numpy(constituents[start : start + PREPARE_ROWS]),
                        torch.from_numpy(mask[start : start + PREPARE_ROWS]),
                    )[0]
                    for start in range(0, len(mask), PREPARE_ROWS)
                ]
            )
        self.mix.fit(gate_input.numpy())

    def logits_and_weight(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        constituents, mask, *rest = self.unpack(inputs)
        pooled, weight = self.mix(*self.latents(constituents, mask))
        return self.head(pooled, rest), weight


# ``type`` is a field name of the configs, so their annotations name the class this way
RotationNetwork = type[RPCN]


def rotation_bound(model: RPCN, constituents: Tensor, mask: Tensor, delta: float) -> Tensor:
    """An upper bound [B] on |logit(R_α x) − logit(x)| for α = 2πm/N + δ (docs/rpcn.md).

    ``L_F·P·Π_l(√K‖W_l‖)·√N·L_Φ·2|sin(δ/2)|·Σ_i |w_i|‖p_i‖/scale``: L_Φ the Lipschitz
    constant of Φ in the position inputs, ‖W_l‖ the spectral norms of the convolutions' maps,
    P = 1 for max pooling and 1/√N for the mean, L_F that of the head.
    """
    subnet = model.subnet
    lift = subnet.lift
    linears = [m for m in lift.phi if isinstance(m, nn.Linear)]
    first = torch.linalg.matrix_norm(linears[0].weight[:, :2], ord=2)
    l_phi = first * _spectral_product(linears[1:])
    n_angles = lift.cos.shape[0]
    convs = [conv for conv in subnet.convs if isinstance(conv, CircularConv)]
    l_conv = _spectral_product(conv.linear for conv in convs) * math.prod(
        math.sqrt(len(conv.offsets)) for conv in convs
    )
    pool = 1.0 if subnet.pool == "max" else 1.0 / math.sqrt(n_angles)
    head = [m for m in model.f if isinstance(m, nn.Linear)] + [model.out]
    l_head = _spectral_product(head[:1], columns=subnet.width) * _spectral_product(head[1:])
    radius = torch.sqrt(
        constituents[..., lift.position[0]] ** 2 + constituents[..., lift.position[1]] ** 2
    )
    spread = (lift.weights(constituents, mask).abs() * radius).sum(dim=1) / lift.scale
    factor = l_head * pool * l_conv * math.sqrt(n_angles) * l_phi * 2 * abs(math.sin(delta / 2))
    bound: Tensor = factor * spread
    return bound


def _spectral_product(layers: Any, columns: int | None = None) -> Tensor:
    product = torch.ones(())
    for layer in layers:
        weight = layer.weight if columns is None else layer.weight[:, :columns]
        product = product * torch.linalg.matrix_norm(weight.detach().double(), ord=2).float()
    return product


class _RotationSettings(ModelSettings):
    """What rpcn and rotation_dual share: the position columns, the angles, the widths."""

    position: tuple[int, int] = Field(
        default=(1, 2), description="constituent columns of the rotated plane (x, y)"
    )
    n_angles: int = Field(default=8, ge=2, description="N: rotations by 2πk/N")
    phi_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [64, 64, 64], min_length=1
    )
    conv_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64])
    kernel: int = Field(default=3, ge=1, description="angles each circular convolution reads")
    pool: Pooling = "max"
    f_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])
    irc_safe: bool = Field(
        default=False, description="energy-fraction weights, Φ on the directions alone"
    )
    energy: int = Field(default=0, ge=0, description="the (linear) energy column, irc_safe")
    use_globals: bool = Field(default=True, description="concatenate the globals to the pool")
    network: ClassVar[RotationNetwork]

    def check_features(self, spec: FeatureSpec) -> None:
        if spec.constituents is None:
            raise ValueError(f"model type '{self.type}' needs features.constituents")
        check_globals(self.use_globals, spec)
        features = spec.constituents.features
        n = len(features)
        used = (*self.position, self.energy) if self.irc_safe else self.position
        if self.position[0] == self.position[1] or max(used) >= n:
            raise ValueError(
                f"model.position {list(self.position)} (and model.energy with irc_safe) must "
                f"name distinct columns of the {n} constituent features"
            )
        if self.kernel > self.n_angles:
            raise ValueError(f"model.kernel ({self.kernel}) exceeds model.n_angles")
        if self.irc_safe and features[self.energy].transform not in (None, "none"):
            raise ValueError(
                f"model.irc_safe weights by constituent column {self.energy} "
                f"('{features[self.energy].branch}'), which must be a linear energy; it has "
                f"transform '{features[self.energy].transform}'"
            )

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return self.network(
            need(batch.constituents, "constituents").shape[2],
            n_globals_of(batch) if self.use_globals else 0,
            position=self.position,
            n_angles=self.n_angles,
            phi_sizes=self.phi_sizes,
            conv_sizes=self.conv_sizes,
            kernel=self.kernel,
            pool=self.pool,
            f_sizes=self.f_sizes,
            energy=self.energy if self.irc_safe else None,
            use_globals=self.use_globals,
        )


class RPCNConfig(_RotationSettings):
    """Rotational particle convolution: lift to N angles, circular convolutions, pooling."""

    type: Literal["rpcn"] = "rpcn"
    network: ClassVar[RotationNetwork] = RPCN


class RotationDualConfig(_RotationSettings):
    """An rPCN and a PFN latent mixed by a learned, input-dependent symmetry factor."""

    type: Literal["rotation_dual"] = "rotation_dual"
    network: ClassVar[RotationNetwork] = RotationDual


CONFIGS = (RPCNConfig, RotationDualConfig)
MODELS = (RPCN, RotationDual)
