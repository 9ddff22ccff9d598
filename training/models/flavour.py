"""Flavour taggers on the tracks of a jet: DIPS, an RNNIP-style LSTM, an IP3D-style likelihood,
and the scalar PFN baseline.

Every model reads ``constituents`` [N, T, F] (the tracks) and ``mask`` [N, T] (the scalar
PFN also ``globals``) and returns ``score`` [N, 3], the probabilities of (light, c, b) for
the integer labels 0, 1, 2. Config fields name features by their column names in the feature
spec (``sd0sig``, ``PFCands_px``); ``build`` turns them into column indices, so a config says
what it reads and a wrong name fails at load time.

DIPS normalises each per-track layer with :class:`MaskedBatchNorm`: batch statistics over
the real tracks only, so padding never shifts them; in eval mode (export included) it is the
affine map of its running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import Tensor, nn

from bsym.errors import SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.training.models.base import (
    BsymModel,
    ModelSettings,
    NetworkModel,
    Standardise,
    need,
)
from bsym.training.models.sets import PFN, PFNConfig

FLAVOURS = ("light", "c", "b")
"""Class order of every flavour model's score: labels 0, 1, 2."""
N_FLAVOURS = len(FLAVOURS)

Width = Annotated[int, Field(gt=0)]


def constituent_column(spec: FeatureSpec, name: str, what: str) -> int:
    """Column of the track feature ``name``; a ``ValueError`` naming the config key ``what``."""
    try:
        return spec.constituent_column(name)
    except SpecMismatchError as error:
        raise ValueError(f"{what} '{name}': {error}") from None


def global_column(spec: FeatureSpec, name: str, what: str) -> int:
    """Column of the globals feature ``name``; a ``ValueError`` naming the config key ``what``."""
    try:
        return spec.global_column(name)
    except SpecMismatchError as error:
        raise ValueError(f"{what} '{name}': {error}") from None


def need_constituents(spec: FeatureSpec, model_type: str) -> None:
    if spec.constituents is None:
        raise ValueError(f"model type '{model_type}' needs features.constituents (the tracks)")


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the last axis of [N, T, C] whose batch statistics use real tracks only.

    Training: mean and (biased) variance over the rows where ``mask`` is true; the running
    statistics follow them with ``momentum`` (the unbiased variance, as torch's BatchNorm).
    Eval: ``(x − running_mean) / sqrt(running_var + eps) · weight + bias``.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, size: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.register_buffer("running_mean", torch.zeros(size))
        self.register_buffer("running_var", torch.ones(size))

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """``x`` [N, T, C]; ``real`` [N, T, 1], 1.0 for real tracks and 0.0 for padding."""
        if self.training:
            count = real.sum().clamp_min(1.0)
            mean = (x * real).sum(dim=(0, 1)) / count
            var = (((x - mean) ** 2) * real).sum(dim=(0, 1)) / count
            with torch.no_grad():
                unbiased = var * count / (count - 1.0).clamp_min(1.0)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class TrackMLP(nn.Module):
    """Per-track Linear → MaskedBatchNorm → ReLU for every width, the last included."""

    def __init__(self, n_in: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for size in sizes:
            self.linears.append(nn.Linear(n_in, size))
            self.norms.append(MaskedBatchNorm(size))
            n_in = size

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = torch.relu(norm(linear(x), real))
        return x


def head_mlp(n_in: int, sizes: Sequence[int], dropout: float, n_out: int) -> nn.Sequential:
    """Linear → BatchNorm → ReLU → Dropout per width, then the linear output layer."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(n_in, size), nn.BatchNorm1d(size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = size
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


def fit_track_norm(norm: Standardise, batch: FeatureBatch) -> None:
    """Standardise the tracks with the statistics of the real tracks of ``batch``."""
    constituents, mask = need(batch.constituents, "constituents"), need(batch.mask, "mask")
    norm.fit(constituents[mask])


class DIPSConfig(ModelSettings):
    """Deep Impact Parameter Sets: per-track Φ with BatchNorm, masked sum, head F, softmax."""

    type: Literal["dips"] = "dips"
    phi_sizes: list[Width] = Field(default_factory=lambda: [100, 100, 128], min_length=1)
    f_sizes: list[Width] = Field(default_factory=lambda: [100, 100, 100, 30])
    dropout: float = Field(default=0.1, ge=0, lt=1, description="dropout after each F layer")

    def check_features(self, spec: FeatureSpec) -> None:
        need_constituents(spec, self.type)

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        n_features = need(batch.constituents, "constituents").shape[2]
        return DIPS(n_features, self.phi_sizes, self.f_sizes, self.dropout)


class DIPS(NetworkModel):
    """``softmax(F(Σ_i mask_i Φ(x_i)))``, Φ and F with BatchNorm (Φ's masked), F with dropout."""

    kind = "dips"
    n_classes = N_FLAVOURS
    input_names = ("constituents", "mask")

    def __init__(
        self, n_features: int, phi_sizes: Sequence[int], f_sizes: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "n_features": n_features,
            "phi_sizes": list(phi_sizes),
            "f_sizes": list(f_sizes),
            "dropout": dropout,
        }
        self.norm = Standardise(n_features)
        self.phi = TrackMLP(n_features, phi_sizes)
        self.f = head_mlp(phi_sizes[-1], f_sizes, dropout, N_FLAVOURS)

    def prepare(self, batch: FeatureBatch) -> None:
        fit_track_norm(self.norm, batch)

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask = self.unpack(inputs)
        real = mask.to(constituents.dtype).unsqueeze(-1)
        latent = (self.phi(self.norm(constituents) * real, real) * real).sum(dim=1)
        output: Tensor = self.f(latent)
        return output


class RNNIPConfig(ModelSettings):
    """An LSTM over the tracks ordered by decreasing |signed d0 significance|."""

    type: Literal["rnnip"] = "rnnip"
    order_by: str = Field(
        description="the track feature whose absolute value orders the tracks (the signed "
        "d0 significance)"
    )
    hidden: int = Field(default=100, gt=0, description="LSTM units")
    f_sizes: list[Width] = Field(default_factory=lambda: [20])

    def check_features(self, spec: FeatureSpec) -> None:
        need_constituents(spec, self.type)
        constituent_column(spec, self.order_by, "model.order_by")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        n_features = need(batch.constituents, "constituents").shape[2]
        order = constituent_column(spec, self.order_by, "model.order_by")
        return RNNIP(n_features, order, self.hidden, self.f_sizes)


class RNNIP(NetworkModel):
    """LSTM over the real tracks, largest |order column| first; the head reads the state after
    the last real track.

    No packed sequences (they do not export): the tracks are sorted in the graph, padding
    last, the LSTM runs over every slot, and the output at step ``n_real − 1`` is taken,
    which depends on the real tracks only. A jet without tracks reads zeros.
    """

    kind = "rnnip"
    n_classes = N_FLAVOURS
    input_names = ("constituents", "mask")

    def __init__(
        self, n_features: int, order_column: int, hidden: int, f_sizes: Sequence[int]
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "n_features": n_features,
            "order_column": order_column,
            "hidden": hidden,
            "f_sizes": list(f_sizes),
        }
        self.order_column = order_column
        self.norm = Standardise(n_features)
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.f = head_mlp(hidden, f_sizes, 0.0, N_FLAVOURS)

    def prepare(self, batch: FeatureBatch) -> None:
        fit_track_norm(self.norm, batch)

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask = self.unpack(inputs)
        real = mask.to(constituents.dtype)
        key = torch.abs(constituents[:, :, self.order_column]) * real - (1.0 - real)
        order = torch.argsort(key, dim=1, descending=True)
        features = self.norm(constituents) * real.unsqueeze(-1)
        index = order.unsqueeze(-1).expand(-1, -1, features.shape[2])
        ordered = torch.gather(features, 1, index)
        # explicit zero initial states keep the exported LSTM valid for every batch size
        zeros = torch.zeros_like(ordered[:, 0, :1]).expand(-1, self.lstm.hidden_size)
        initial = zeros.unsqueeze(0).contiguous()
        states, _ = self.lstm(ordered, (initial, initial))
        n_real = real.sum(dim=1, keepdim=True)
        last = (n_real - 1.0).clamp_min(0.0).to(torch.int64)
        final = torch.gather(states, 1, last.unsqueeze(-1).expand(-1, 1, states.shape[2]))
        output: Tensor = self.f(final[:, 0] * (n_real > 0).to(states.dtype))
        return output


class IP3DConfig(ModelSettings):
    """Per-track log-likelihood ratios of binned signed impact-parameter significances."""

    type: Literal["ip3d"] = "ip3d"
    d0_significance: str = Field(description="track feature: signed transverse IP significance")
    z0_significance: str | None = Field(
        default=None, description="track feature: signed longitudinal IP significance (2-D bins)"
    )
    bins: int = Field(default=24, gt=1, description="bins per significance")
    limit: float = Field(
        default=40.0, gt=0, description="significances beyond ±limit go to the edge bins"
    )
    pseudocount: float = Field(
        default=1.0, gt=0, description="added to every bin of every class before normalising"
    )

    def check_features(self, spec: FeatureSpec) -> None:
        need_constituents(spec, self.type)
        constituent_column(spec, self.d0_significance, "model.d0_significance")
        if self.z0_significance is not None:
            constituent_column(spec, self.z0_significance, "model.z0_significance")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        columns = [constituent_column(spec, self.d0_significance, "model.d0_significance")]
        if self.z0_significance is not None:
            columns.append(constituent_column(spec, self.z0_significance, "model.z0_significance"))
        return IP3D(columns, self.bins, self.limit, self.pseudocount)


def significance_bin(x: Tensor, bins: int, limit: float) -> Tensor:
    """Bin of ``x`` in ``bins`` equal bins of ψ(x) = sign(x)·log(1 + |x|) over ±ψ(limit)."""
    top = math.log1p(limit)
    psi = torch.sign(x) * torch.log1p(torch.abs(x))
    position = (psi + top) * (bins / (2.0 * top))
    return torch.clamp(torch.floor(position), 0.0, bins - 1.0).to(torch.int64)


class IP3D(BsymModel):
    """``score = softmax_c(Σ_tracks log p_c(bin))``: per-class track likelihoods in bins of the
    signed IP significances (one, or two for a 2-D table), fitted in ``prepare``.

    ``log(score_b / score_light)`` is then the sum over tracks of the log-likelihood ratios
    of b and light, IP3D's discriminant; no gradient training.
    """

    kind = "ip3d"
    trainable = False
    n_classes = N_FLAVOURS
    input_names = ("constituents", "mask")
    log_pdf: Tensor

    def __init__(self, columns: Sequence[int], bins: int, limit: float, pseudocount: float) -> None:
        super().__init__()
        self.init_kwargs = {
            "columns": list(columns),
            "bins": bins,
            "limit": limit,
            "pseudocount": pseudocount,
        }
        if not 1 <= len(columns) <= 2:
            raise SpecMismatchError(f"IP3D bins one or two significances, got {len(columns)}")
        self.columns, self.bins, self.limit = list(columns), bins, limit
        self.pseudocount = pseudocount
        cells = bins ** len(columns)
        self.register_buffer("log_pdf", torch.full((cells, N_FLAVOURS), -math.log(cells)))

    def cell(self, constituents: Tensor) -> Tensor:
        """[N, T] flat table cell of each track."""
        index = significance_bin(constituents[:, :, self.columns[0]], self.bins, self.limit)
        for column in self.columns[1:]:
            index = index * self.bins + significance_bin(
                constituents[:, :, column], self.bins, self.limit
            )
        return index

    def prepare(self, batch: FeatureBatch) -> None:
        constituents = torch.from_numpy(need(batch.constituents, "constituents"))
        mask = need(batch.mask, "mask")
        label = need(batch.label, "label")
        weight = np.ones(len(label)) if batch.weight is None else batch.weight.astype(np.float64)
        cells = self.cell(constituents).numpy()
        track_label = np.broadcast_to(label[:, None], mask.shape)[mask]
        track_weight = np.broadcast_to(weight[:, None], mask.shape)[mask]
        track_cell = cells[mask]
        table = np.zeros((self.log_pdf.shape[0], N_FLAVOURS))
        for flavour in range(N_FLAVOURS):
            chosen = track_label == flavour
            counts = np.bincount(
                track_cell[chosen], weights=track_weight[chosen], minlength=table.shape[0]
            )
            table[:, flavour] = (counts / max(counts.sum(), 1e-12)) * chosen.sum()
        self.log_pdf.copy_(torch.from_numpy(log_density(table, self.pseudocount)))

    def forward(self, *inputs: Tensor) -> Tensor:
        constituents, mask = self.unpack(inputs)
        real = mask.to(constituents.dtype).unsqueeze(-1)
        per_track = self.log_pdf[self.cell(constituents)]
        return torch.softmax((per_track * real).sum(dim=1), dim=-1)


def log_density(counts: npt.NDArray[np.float64], pseudocount: float) -> npt.NDArray[np.float32]:
    """Per-column log of (counts + pseudocount), normalised over the rows (cells)."""
    smoothed = counts + pseudocount
    density = smoothed / smoothed.sum(axis=0, keepdims=True)
    result: npt.NDArray[np.float32] = np.log(density).astype(np.float32)
    return result


class FlavourPFNConfig(PFNConfig):
    """The scalar particle-flow baseline of the tensor-network paper: Φ 2×128, F 3×128, three
    classes; the jet's pT, η, φ are track columns (``use_globals`` joins globals to the sum)."""

    type: Literal["flavour_pfn"] = "flavour_pfn"  # type: ignore[assignment]
    phi_sizes: list[Width] = Field(default_factory=lambda: [128, 128], min_length=1)
    f_sizes: list[Width] = Field(default_factory=lambda: [128, 128, 128])
    use_globals: bool = Field(
        default=False, description="concatenate the globals to the sum (the paper: no)"
    )

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return FlavourPFN(**super().build(spec, batch).init_kwargs)


class FlavourPFN(PFN):
    """:class:`~bsym.training.models.sets.PFN` with three outputs and a softmax."""

    kind = "flavour_pfn"
    n_classes = N_FLAVOURS

    def __init__(self, *args: Any, n_classes: int = N_FLAVOURS, **kwargs: Any) -> None:
        """PFN's arguments; ``n_classes`` (from a three-class label) must be 3."""
        if n_classes != N_FLAVOURS:
            raise SpecMismatchError(
                f"model 'flavour_pfn' has {N_FLAVOURS} classes (light, c, b), the label {n_classes}"
            )
        super().__init__(*args, **kwargs)
        self.out = nn.Linear(self.out.in_features, N_FLAVOURS)


CONFIGS = (DIPSConfig, RNNIPConfig, IP3DConfig, FlavourPFNConfig)
MODELS = (DIPS, RNNIP, IP3D, FlavourPFN)
