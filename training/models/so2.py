"""Vector and Tensor PFN: bilinear networks of scalars, 3-vectors and 3×3 tensors whose linear
maps are equivariant under rotations about the jet axis ĵ (SO(3) broken to SO(2)_ĵ).

Every track carries scalars s [C], vectors v [C, 3] and (Tensor PFN) tensors T [C, 3, 3];
the jet carries ĵ. Layers (docs/flavour-models.md has the equations):

- scalar affine ``s ↦ W s + b``; vector linear ``v ↦ W v`` (no bias); tensor affine
  ``T ↦ W T + b I``;
- SO(2)_ĵ linear: ``v_o ↦ Σ_i A_oi v_i`` and ``T_o ↦ Σ_i A_oi T_i A'_oiᵀ + b_o I`` with
  ``A = (a ĵĵᵀ + b (I − ĵĵᵀ)) R_ĵ(φ)``, learnable (a, b, φ) per input–output pair;
- bilinear: each representation split in halves (1, 2) and multiplied: dot, cross and outer
  products, tensor–vector, tensor–tensor and scalar–representation products;
- VReLU ``v / max(1, |v|)``, TReLU ``T / max(1, ‖T‖_F)``, ReLU on scalars.

Φ (per track) and F (per jet, after the masked sum) are stacks of blocks affine → SO(2)_ĵ →
bilinear → non-linearity; the invariant readout (scalars, |v|², ‖T‖²_F) feeds an MLP head.
Inputs: ``constituents`` [N, T, F] and ``mask`` [N, T], whose columns hold the scalars and
the components of each vector, and ``globals`` [N, G], which hold the jet axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from bsym.features import FeatureBatch, FeatureSpec
from bsym.training.models.base import (
    BsymModel,
    ModelSettings,
    NetworkModel,
    Standardise,
    mlp,
    need,
)
from bsym.training.models.flavour import (
    N_FLAVOURS,
    constituent_column,
    global_column,
    need_constituents,
)

Representation = tuple[Tensor, Tensor, Tensor | None]
"""(scalars [..., C], vectors [..., 3, C], tensors [..., 3, 3, C] or None): channels last."""


def vrelu(v: Tensor) -> Tensor:
    """``v`` where ``|v| < 1``, else ``v / |v|``; components on axis -2."""
    squared = (v * v).sum(dim=-2, keepdim=True)
    return v * torch.rsqrt(squared.clamp_min(1.0))


def trelu(t: Tensor) -> Tensor:
    """``T`` where ``‖T‖_F < 1``, else ``T / ‖T‖_F``; components on axes -3, -2."""
    squared = (t * t).sum(dim=(-3, -2), keepdim=True)
    return t * torch.rsqrt(squared.clamp_min(1.0))


def cross(a: Tensor, b: Tensor) -> Tensor:
    """``a × b``, components on axis -2, written out (it exports to any opset)."""
    a0, a1, a2 = a[..., 0, :], a[..., 1, :], a[..., 2, :]
    b0, b1, b2 = b[..., 0, :], b[..., 1, :], b[..., 2, :]
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim=-2)


def matvec(t: Tensor, v: Tensor) -> Tensor:
    """``T v`` per channel: [..., 3, 3, C] and [..., 3, C]."""
    return (t * v.unsqueeze(-3)).sum(dim=-2)


def matmat(t1: Tensor, t2: Tensor) -> Tensor:
    """``T1 T2`` per channel: [..., 3, 3, C] each."""
    return (t1.unsqueeze(-2) * t2.unsqueeze(-4)).sum(dim=-3)


def outer(v1: Tensor, v2: Tensor) -> Tensor:
    """``v1 v2ᵀ`` per channel: [..., 3, C] each → [..., 3, 3, C]."""
    return v1.unsqueeze(-2) * v2.unsqueeze(-3)


def with_identity(t: Tensor, bias: Tensor) -> Tensor:
    """``T + b I`` per channel."""
    identity = torch.eye(3, dtype=t.dtype, device=t.device).unsqueeze(-1)
    return t + identity * bias


def axis_from(globals_: Tensor, columns: Sequence[int]) -> Tensor:
    """The unit jet axis [N, 3] from globals: (η, φ) or Cartesian (x, y, z) columns."""
    if len(columns) == 2:
        eta, phi = globals_[:, columns[0]], globals_[:, columns[1]]
        sin_theta = 2.0 / (torch.exp(eta) + torch.exp(-eta))  # 1 / cosh, which ONNX lacks
        return torch.stack(
            [torch.cos(phi) * sin_theta, torch.sin(phi) * sin_theta, torch.tanh(eta)], dim=-1
        )
    cartesian = globals_[:, list(columns)]
    return cartesian * torch.rsqrt((cartesian * cartesian).sum(dim=-1, keepdim=True) + 1e-30)


def jet_frame(axis: Tensor) -> Tensor:
    """[N, 3, 3] rotations whose rows are (ê₁, ê₂, ĵ): ê₂ = ẑ × ĵ / |ẑ × ĵ|, ê₁ = ê₂ × ĵ.

    ``jet_frame(axis) @ v`` gives v's components in the jet frame, where ĵ is the third axis.
    """
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    rho = torch.sqrt(x * x + y * y).clamp_min(1e-12)
    e2 = torch.stack([-y / rho, x / rho, torch.zeros_like(x)], dim=-1)
    e1 = torch.stack([e2[:, 1] * z, -e2[:, 0] * z, e2[:, 0] * y - e2[:, 1] * x], dim=-1)
    return torch.stack([e1, e2, axis], dim=1)


def rotate_perp(u: Tensor, axis: int) -> Tensor:
    """J₂ = [[0, −1], [1, 0]] applied along ``axis`` (of size 2): (u₀, u₁) ↦ (−u₁, u₀)."""
    first, second = u.select(axis, 0), u.select(axis, 1)
    return torch.stack([-second, first], dim=axis)


class SO2Coefficients(nn.Module):
    """Learnable (a, b, φ) per output–input pair.

    ``A = (a ĵĵᵀ + b (I − ĵĵᵀ)) R_ĵ(φ) = a ĵĵᵀ + c (I − ĵĵᵀ) + s [ĵ]×`` with c = b cos φ,
    s = b sin φ; in the jet frame A = [[c, −s, 0], [s, c, 0], [0, 0, a]].
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        self.a = nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))
        self.phi = nn.Parameter(torch.empty(n_out, n_in).uniform_(-math.pi, math.pi))

    def acs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b cos φ, b sin φ), each [out, in]."""
        return self.a, self.b * torch.cos(self.phi), self.b * torch.sin(self.phi)

    def make_isotropic(self) -> None:
        """Set b = a and φ = 0, so that A = a I (no preferred axis)."""
        with torch.no_grad():
            self.b.copy_(self.a)
            self.phi.zero_()


class SO2Vector(nn.Module):
    """``v_o = Σ_i A_oi v_i`` in the jet frame: v⊥ ↦ c v⊥ + s J₂ v⊥, v_z ↦ a v_z."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.coefficients = SO2Coefficients(n_in, n_out)

    def forward(self, v: Tensor) -> Tensor:
        """``v`` [..., 3, C] in the jet frame."""
        a, c, s = self.coefficients.acs()
        perp = v[..., :2, :]
        mixed = F.linear(perp, c) + F.linear(rotate_perp(perp, -2), s)
        return torch.cat([mixed, F.linear(v[..., 2:, :], a)], dim=-2)


class SO2Tensor(nn.Module):
    """``T_o = Σ_i A_oi T_i A'_oiᵀ + b_o I``, A and A' two SO(2)_ĵ maps per pair.

    In the jet frame A = diag(C, a) with C = c I + s J₂ (and A' alike), so
    Y⊥⊥ = C T⊥⊥ C'ᵀ, Y⊥z = a' C T⊥z, Y_z⊥ = a T_z⊥ C'ᵀ, Y_zz = a a' T_zz.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.left = SO2Coefficients(n_in, n_out)
        self.right = SO2Coefficients(n_in, n_out)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, t: Tensor) -> Tensor:
        """``t`` [..., 3, 3, C] in the jet frame."""
        a, c, s = self.left.acs()
        a_, c_, s_ = self.right.acs()
        pp = t[..., :2, :2, :]
        left_pp = rotate_perp(pp, -3)
        y_pp = (
            F.linear(pp, c * c_)
            + F.linear(left_pp, s * c_)
            + F.linear(rotate_perp(pp, -2), c * s_)
            + F.linear(rotate_perp(left_pp, -2), s * s_)
        )
        pz, zp = t[..., :2, 2, :], t[..., 2, :2, :]
        y_pz = F.linear(pz, c * a_) + F.linear(rotate_perp(pz, -2), s * a_)
        y_zp = F.linear(zp, a * c_) + F.linear(rotate_perp(zp, -2), a * s_)
        y_zz = F.linear(t[..., 2:, 2, :], a * a_)
        top = torch.cat([y_pp, y_pz.unsqueeze(-2)], dim=-2)
        bottom = torch.cat([y_zp, y_zz], dim=-2).unsqueeze(-3)
        return with_identity(torch.cat([top, bottom], dim=-3), self.bias)


class Block(nn.Module):
    """Affine → SO(2)_ĵ linear → bilinear → non-linearity; 2F channels before the bilinear
    layer, 3F after (2F without it). Vectors and tensors are in the jet frame."""

    def __init__(
        self, n_in: tuple[int, int, int], width: int, *, so2: bool, bilinear: bool
    ) -> None:
        """``n_in``: input channels of the scalars, vectors and tensors (0: no tensors)."""
        super().__init__()
        self.width, self.bilinear = width, bilinear
        tensors = n_in[2] > 0
        wide = 2 * width
        self.scalar = nn.Linear(n_in[0], wide)
        self.vector = nn.Linear(n_in[1], wide, bias=False)
        self.tensor = nn.Linear(n_in[2], wide, bias=False) if tensors else None
        self.tensor_bias = nn.Parameter(torch.zeros(wide)) if tensors else None
        self.so2_vector = SO2Vector(wide, wide) if so2 else None
        self.so2_tensor = SO2Tensor(wide, wide) if so2 and tensors else None

    @property
    def n_out(self) -> int:
        return 3 * self.width if self.bilinear else 2 * self.width

    def forward(self, x: Representation) -> Representation:
        s, v, t = x
        s = self.scalar(s)
        v = self.vector(v)
        if self.tensor is not None and self.tensor_bias is not None and t is not None:
            t = with_identity(self.tensor(t), self.tensor_bias)
        if self.so2_vector is not None:
            v = self.so2_vector(v)
        if self.so2_tensor is not None and t is not None:
            t = self.so2_tensor(t)
        if self.bilinear:
            s, v, t = self.products(s, v, t)
        return torch.relu(s), vrelu(v), None if t is None else trelu(t)

    def products(self, s: Tensor, v: Tensor, t: Tensor | None) -> Representation:
        """Halves 1, 2 of each representation multiplied (docs/flavour-models.md)."""
        f = self.width
        s1, s2 = s[..., :f], s[..., f:]
        v1, v2 = v[..., :f], v[..., f:]
        dot = (v1 * v2).sum(dim=-2)
        if t is None:
            scalars = torch.cat([s1, dot, s1 * s2], dim=-1)
            vectors = torch.cat(
                [s2.unsqueeze(-2) * v1, cross(v1, v2), s1.unsqueeze(-2) * v2], dim=-1
            )
            return scalars, vectors, None
        t1, t2 = t[..., :f], t[..., f:]
        scalars = torch.cat([s1, dot, (t1 * t2).sum(dim=(-3, -2))], dim=-1)
        vectors = torch.cat([s2.unsqueeze(-2) * v1, cross(v1, v2), matvec(t1, v2)], dim=-1)
        tensors = torch.cat(
            [s2.unsqueeze(-2).unsqueeze(-2) * t1, outer(v1, v2), matmat(t1, t2)], dim=-1
        )
        return scalars, vectors, tensors


class SO2PFN(NetworkModel):
    """Φ blocks per track, masked sum, F blocks per jet, invariant readout, MLP head.

    ``scalar_columns`` are standardised; each vector (three columns) is rescaled along itself
    to ``v̂ · log(1 + |v| / m)``, ``m`` its median length over real training tracks (a
    function of |v| only, so every symmetry is kept). With ``jet_vector`` the jet axis
    vector (the Cartesian globals if the axis is given so, else ĵ) joins every track's
    vectors; the tensors are the outer products ``v_i v_jᵀ`` of the vectors, i ≤ j.
    """

    n_classes = N_FLAVOURS
    tensors: ClassVar[bool] = False
    input_names = ("constituents", "mask", "globals")
    vector_scale: Tensor

    def __init__(
        self,
        scalar_columns: Sequence[int],
        vector_columns: Sequence[Sequence[int]],
        axis_columns: Sequence[int],
        *,
        jet_vector: bool = True,
        width: int = 64,
        phi_blocks: int = 2,
        f_blocks: int = 3,
        head_sizes: Sequence[int] = (128, 128),
        so2: bool = True,
        bilinear: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "scalar_columns": list(scalar_columns),
            "vector_columns": [list(c) for c in vector_columns],
            "axis_columns": list(axis_columns),
            "jet_vector": jet_vector,
            "width": width,
            "phi_blocks": phi_blocks,
            "f_blocks": f_blocks,
            "head_sizes": list(head_sizes),
            "so2": so2,
            "bilinear": bilinear,
        }
        self.scalar_columns = list(scalar_columns)
        self.vector_columns = [list(c) for c in vector_columns]
        self.axis_columns = list(axis_columns)
        self.jet_vector = jet_vector
        n_vectors = len(self.vector_columns) + int(jet_vector)
        self.scalar_norm = Standardise(len(self.scalar_columns))
        self.register_buffer("vector_scale", torch.ones(n_vectors))
        pairs = [(i, j) for i in range(n_vectors) for j in range(i, n_vectors)]
        self.pairs = pairs if self.tensors else []
        n_in = (len(self.scalar_columns), n_vectors, len(self.pairs))
        blocks: list[Block] = []
        for _ in range(phi_blocks + f_blocks):
            blocks.append(Block(n_in, width, so2=so2, bilinear=bilinear))
            n_out = blocks[-1].n_out
            n_in = (n_out, n_out, n_out if self.tensors else 0)
        self.phi = nn.ModuleList(blocks[:phi_blocks])
        self.f = nn.ModuleList(blocks[phi_blocks:])
        n_readout = n_in[0] * (3 if self.tensors else 2)
        self.readout_norm = nn.BatchNorm1d(n_readout)
        self.head = mlp(n_readout, head_sizes)
        self.out = nn.Linear(head_sizes[-1] if head_sizes else n_readout, N_FLAVOURS)

    def prepare(self, batch: FeatureBatch) -> None:
        constituents, mask = need(batch.constituents, "constituents"), need(batch.mask, "mask")
        tracks = constituents[mask]
        self.scalar_norm.fit(tracks[:, self.scalar_columns])
        lengths = [np.linalg.norm(tracks[:, c], axis=1) for c in self.vector_columns]
        if self.jet_vector:
            axis = self.jet_axis_vector(torch.from_numpy(need(batch.globals, "globals")))
            lengths.append(np.linalg.norm(axis.numpy(), axis=1))
        scales = [float(np.median(x[x > 0])) if np.any(x > 0) else 1.0 for x in lengths]
        self.vector_scale.copy_(torch.tensor(scales))

    def jet_axis_vector(self, globals_: Tensor) -> Tensor:
        """[N, 3]: the Cartesian axis columns as they are, or ĵ from (η, φ)."""
        if len(self.axis_columns) == 3:
            return globals_[:, self.axis_columns]
        return axis_from(globals_, self.axis_columns)

    def isotropic(self) -> None:
        """Make every SO(2)_ĵ map isotropic (b = a, φ = 0): the network then ignores ĵ."""
        for module in self.modules():
            if isinstance(module, SO2Coefficients):
                module.make_isotropic()

    def representation(
        self, constituents: Tensor, real: Tensor, globals_: Tensor
    ) -> Representation:
        """The input representation, vectors and tensors in the jet frame, padding zero."""
        scalars = self.scalar_norm(constituents[:, :, self.scalar_columns])
        vectors = [constituents[:, :, c] for c in self.vector_columns]
        if self.jet_vector:
            jet = self.jet_axis_vector(globals_).unsqueeze(1)
            vectors.append(jet.expand(-1, constituents.shape[1], -1))
        stacked = torch.stack(vectors, dim=-1)
        length = torch.sqrt((stacked * stacked).sum(dim=-2, keepdim=True))
        stacked = stacked * (torch.log1p(length / self.vector_scale) / length.clamp_min(1e-30))
        frame = jet_frame(axis_from(globals_, self.axis_columns))
        stacked = torch.matmul(frame.unsqueeze(1), stacked) * real.unsqueeze(-1)
        tensors = None
        if self.pairs:
            tensors = torch.cat(
                [outer(stacked[..., i : i + 1], stacked[..., j : j + 1]) for i, j in self.pairs],
                dim=-1,
            )
        return scalars * real, stacked, tensors

    def logits(self, *inputs: Tensor) -> Tensor:
        output: Tensor = self.out(self.head(self.readout_norm(self.readout(*inputs))))
        return output

    def readout(self, *inputs: Tensor) -> Tensor:
        """The invariants the head reads: scalars, squared norms of vectors (and tensors)."""
        constituents, mask, globals_ = self.unpack(inputs)
        real = mask.to(constituents.dtype).unsqueeze(-1)
        x = self.representation(constituents, real, globals_)
        for block in self.phi:
            x = block(x)
        s, v, t = x
        x = (
            (s * real).sum(dim=1),
            (v * real.unsqueeze(-1)).sum(dim=1),
            None if t is None else (t * real.unsqueeze(-1).unsqueeze(-1)).sum(dim=1),
        )
        for block in self.f:
            x = block(x)
        s, v, t = x
        invariants = [s, (v * v).sum(dim=-2)]
        if t is not None:
            invariants.append((t * t).sum(dim=(-3, -2)))
        return torch.cat(invariants, dim=-1)


class VectorPFN(SO2PFN):
    """Scalars and vectors (no tensor representation)."""

    kind = "vector_pfn"
    tensors = False


class TensorPFN(SO2PFN):
    """Scalars, vectors and tensors."""

    kind = "tensor_pfn"
    tensors = True


Triple = Annotated[list[str], Field(min_length=3, max_length=3)]


class _SO2Settings(ModelSettings):
    """Which columns hold the scalars, the vectors and the jet axis; the network's sizes."""

    scalars: list[str] = Field(min_length=1, description="track features taken as scalars")
    vectors: list[Triple] = Field(
        min_length=1, description="track 3-vectors, each three track features (x, y, z)"
    )
    axis: list[str] = Field(
        description="globals of the jet axis: (eta, phi) or Cartesian (x, y, z)"
    )
    jet_vector: bool = Field(default=True, description="the jet axis vector joins every track")
    width: int = Field(default=64, gt=0, description="F: 2F channels per representation")
    phi_blocks: int = Field(default=2, ge=1, description="per-track blocks")
    f_blocks: int = Field(default=3, ge=0, description="per-jet blocks after the sum")
    head_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [128, 128])
    so2: bool = Field(default=True, description="the SO(2)_ĵ linear maps (false: isotropic only)")
    bilinear: bool = Field(default=True, description="the bilinear layer (false: the ablation)")

    @model_validator(mode="after")
    def _axis_size(self) -> _SO2Settings:
        if len(self.axis) not in (2, 3):
            raise ValueError(
                f"model.axis names 2 (eta, phi) or 3 (x, y, z) globals, got {self.axis}"
            )
        return self

    def check_features(self, spec: FeatureSpec) -> None:
        need_constituents(spec, self.type)
        self.columns(spec)

    def columns(self, spec: FeatureSpec) -> tuple[list[int], list[list[int]], list[int]]:
        scalars = [constituent_column(spec, n, "model.scalars") for n in self.scalars]
        vectors = [[constituent_column(spec, n, "model.vectors") for n in v] for v in self.vectors]
        axis = [global_column(spec, n, "model.axis") for n in self.axis]
        return scalars, vectors, axis

    def build_class(self, cls: type[SO2PFN], spec: FeatureSpec) -> SO2PFN:
        scalars, vectors, axis = self.columns(spec)
        return cls(
            scalars,
            vectors,
            axis,
            jet_vector=self.jet_vector,
            width=self.width,
            phi_blocks=self.phi_blocks,
            f_blocks=self.f_blocks,
            head_sizes=self.head_sizes,
            so2=self.so2,
            bilinear=self.bilinear,
        )


class VectorPFNConfig(_SO2Settings):
    """Vector PFN: scalars and vectors through SO(2)_ĵ and bilinear layers."""

    type: Literal["vector_pfn"] = "vector_pfn"

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return self.build_class(VectorPFN, spec)


class TensorPFNConfig(_SO2Settings):
    """Tensor PFN: scalars, vectors and their outer-product tensors."""

    type: Literal["tensor_pfn"] = "tensor_pfn"

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return self.build_class(TensorPFN, spec)


CONFIGS = (VectorPFNConfig, TensorPFNConfig)
MODELS = (VectorPFN, TensorPFN)
