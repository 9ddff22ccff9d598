"""The three networks of arXiv:2412.18773: unconstrained, Lorentz invariant and dual subnet.

All three read the raw four-momenta of the two muons, ``constituents`` [N, 2, 4] ordered
(px, py, pz, E) in GeV, with ``mask`` [N, 2]; the dual subnet also reads ``globals`` [N, G]
and gates on one column of it (the leading-muon pT with :func:`lorentz_feature_spec`). They
return ``score`` [N, 1] (probabilities); the dual subnet also returns ``symmetry_weight``
[N, 2] = (w_unconstrained, w_invariant). ``logits`` gives the pre-sigmoid score for training.

Layer sizes are the paper's. Every linear layer of the per-muon map and of the invariant MLP
is followed by BatchNorm and ReLU, the last (latent) one included, so both latents are
non-negative Deep-Sets style features on a common scale before they are mixed. The head and
the gate are plain ReLU MLPs. Normalisation lives in the graph: the unconstrained subnet
standardises its inputs and the gate its input with buffers that ``prepare`` (or
``fit_normalisation``) sets from the training data; the invariant subnet needs none, its
inputs being logarithms already. BatchNorm statistics run over all constituent slots, padded
ones included: harmless here, where every event has exactly two muons.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bsym.errors import SpecMismatchError
from bsym.features import Constituents, Feature, FeatureBatch, FeatureSpec, Label
from bsym.training.models.base import (
    BsymModel,
    DualNetwork,
    ModelSettings,
    NetworkModel,
    Standardise,
    SymmetryMix,
)

FOUR_MOMENTUM = ("Muon_px", "Muon_py", "Muon_pz", "Muon_E")
LATENT = 16
SUBNET_SIZES = (64, 64, LATENT)
HEAD_SIZES = (512, 256, 128, 128)
GATE_SIZES = (64, 64, 64)
# diagonal of the metric (+,−,−,−) for components ordered (px, py, pz, E)
MINKOWSKI = (-1.0, -1.0, -1.0, 1.0)


def lorentz_feature_spec(globals_: tuple[str, ...] = ("lead_pt",)) -> FeatureSpec:
    """The feature spec of the dimuon task (files of ``bsym simulate lorentz``).

    One row per event (object layout: the files have no ``nDimuon`` branch), the two muons
    as constituents sorted by pT, the branches in ``globals_`` as globals (the dual subnet
    gates on one of them; the single networks ignore them), label ``label`` and weight
    ``weight``.
    """
    return FeatureSpec(
        tree="Events",
        objects="Dimuon",
        constituents=Constituents(
            features=[Feature(branch=b) for b in FOUR_MOMENTUM], max_count=2, sort_by="Muon_pt"
        ),
        globals=[Feature(branch=b) for b in globals_],
        label=Label(branch="label", positive=[1]),
        weight="weight",
    )


def psi(x: Tensor) -> Tensor:
    """ψ(x) = sign(x)·log(1 + |x|): a logarithm that keeps the sign."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def invariant_inputs(constituents: Tensor, mask: Tensor, metric: Tensor) -> Tensor:
    """[N, 2] = (ψ(p0·p1), ψ((p1 − p0)²)); a missing muon counts as zero.

    ``metric`` is the diagonal of the metric in the order of the features.
    """
    momenta = constituents * mask.unsqueeze(-1).to(constituents.dtype)
    p0, p1 = momenta[:, 0], momenta[:, 1]
    difference = p1 - p0
    dot = torch.sum(p0 * p1 * metric, dim=-1)
    squared = torch.sum(difference * difference * metric, dim=-1)
    return psi(torch.stack([dot, squared], dim=-1))


class _SlotBatchNorm(nn.BatchNorm1d):
    """BatchNorm of [N, P, C] tensors, statistics over events and constituent slots."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _mlp_bn(n_in: int, sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear → BatchNorm → ReLU for every width in ``sizes``, the last included."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(n_in, size), _SlotBatchNorm(size), nn.ReLU()]
        n_in = size
    return nn.Sequential(*layers)


def _mlp(n_in: int, sizes: tuple[int, ...], n_out: int) -> nn.Sequential:
    """Linear + ReLU for each width in ``sizes``, then a linear output layer."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(n_in, size), nn.ReLU()]
        n_in = size
    return nn.Sequential(*layers, nn.Linear(n_in, n_out))


class UnconstrainedSubnet(nn.Module):
    """Per-muon map 4→64→64→16 summed over the real muons: z_g [N, 16]."""

    def __init__(self, n_features: int = 4) -> None:
        super().__init__()
        self.norm = Standardise(n_features)
        self.per_muon = _mlp_bn(n_features, SUBNET_SIZES)

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        real = mask.unsqueeze(-1).to(constituents.dtype)
        latent: Tensor = self.per_muon(self.norm(constituents) * real) * real
        return torch.sum(latent, dim=1)

    def fit(self, constituents: Tensor, mask: Tensor) -> None:
        """Standardise with the statistics of the real muons of (training) events."""
        self.norm.fit(constituents[mask].numpy())


class InvariantSubnet(nn.Module):
    """MLP 2→64→64→16 on the two Lorentz invariants of the muon pair: z_i [N, 16]."""

    metric: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("metric", torch.tensor(MINKOWSKI), persistent=False)
        self.mlp = _mlp_bn(2, SUBNET_SIZES)

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        latent: Tensor = self.mlp(invariant_inputs(constituents, mask, self.metric))
        return latent


class LorentzNetwork(NetworkModel):
    """Common plumbing: the head, fitting from a feature batch or from tensors."""

    # The invariants index muons 0 and 1, so both slots must always be there.
    dynamic_constituents: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.init_kwargs: dict[str, Any] = {}
        self.head = _mlp(LATENT, HEAD_SIZES, 1)

    def prepare(self, batch: FeatureBatch) -> None:
        if batch.constituents is None or batch.mask is None:
            raise SpecMismatchError(f"model '{self.kind}' needs constituents and a mask")
        globals_ = None if batch.globals is None else torch.from_numpy(batch.globals)
        self.fit_normalisation(
            torch.from_numpy(batch.constituents), torch.from_numpy(batch.mask), globals_
        )

    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        """Set the normalisation buffers from training tensors (nothing to set by default)."""


class UnconstrainedNet(LorentzNetwork):
    """The unconstrained network (a particle-flow network): z_g → head."""

    kind = "lorentz_unconstrained"
    input_names = ("constituents", "mask")
    output_names: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self) -> None:
        super().__init__()
        self.subnet = UnconstrainedSubnet()

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask = self.unpack(inputs)
        output: Tensor = self.head(self.subnet(constituents, mask))
        return output

    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        self.subnet.fit(constituents, mask)


class InvariantNet(LorentzNetwork):
    """The Lorentz-invariant network: z_i → head."""

    kind = "lorentz_invariant"
    input_names = ("constituents", "mask")
    output_names: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self) -> None:
        super().__init__()
        self.subnet = InvariantSubnet()

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask = self.unpack(inputs)
        output: Tensor = self.head(self.subnet(constituents, mask))
        return output


class DualSubnet(LorentzNetwork, DualNetwork):
    """Both latents mixed by a learned symmetry factor: z = w_g·z_g + w_i·z_i → head.

    ``w = softmax(MLP(g))``, MLP 1→64→64→64→2, on the gating input g =
    ``globals[:, gate_index]``, standardised with buffers (:class:`SymmetryMix`).
    """

    kind = "lorentz_dual"
    input_names = ("constituents", "mask", "globals")

    def __init__(self, gate_index: int = 0) -> None:
        super().__init__()
        self.init_kwargs = {"gate_index": gate_index}
        self.gate_index = gate_index
        self.unconstrained = UnconstrainedSubnet()
        self.invariant = InvariantSubnet()
        self.mix = SymmetryMix(1, GATE_SIZES)

    def gate_input(self, globals_: Tensor) -> Tensor:
        return globals_[:, self.gate_index : self.gate_index + 1]

    def symmetry_weight(self, globals_: Tensor) -> Tensor:
        """[N, 2] = (w_unconstrained, w_invariant), summing to one."""
        return self.mix.weight(self.gate_input(globals_))

    def logits_and_weight(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        constituents, mask, globals_ = self.unpack(inputs)
        pooled, weight = self.mix(
            self.gate_input(globals_),
            self.unconstrained(constituents, mask),
            self.invariant(constituents, mask),
        )
        logits: Tensor = self.head(pooled)
        return logits, weight

    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        if globals_ is None or globals_.shape[1] <= self.gate_index:
            found = "none" if globals_ is None else f"{globals_.shape[1]} column(s)"
            raise SpecMismatchError(
                f"the dual subnet gates on globals column {self.gate_index}; the globals "
                f"tensor has {found}"
            )
        self.unconstrained.fit(constituents, mask)
        self.mix.fit(self.gate_input(globals_).numpy())


class _LorentzSettings(ModelSettings):
    """The four-momenta of the two muons, (px, py, pz, E) in that order."""

    def check_features(self, spec: FeatureSpec) -> None:
        constituents = spec.constituents
        if constituents is None or len(constituents.features) != 4:
            raise ValueError(
                f"model type '{self.type}' needs features.constituents with the four "
                "features px, py, pz, E (in that order)"
            )
        if constituents.max_count < 2:
            raise ValueError(f"model type '{self.type}' needs max_count >= 2 (two muons)")


class LorentzUnconstrainedConfig(_LorentzSettings):
    """Dimuon task (arXiv:2412.18773): per-muon map 4→64→64→16 summed, head 16→…→1."""

    type: Literal["lorentz_unconstrained"] = "lorentz_unconstrained"

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return UnconstrainedNet()


class LorentzInvariantConfig(_LorentzSettings):
    """Dimuon task: MLP 2→64→64→16 on ψ(p0·p1) and ψ((p1−p0)²), the same head."""

    type: Literal["lorentz_invariant"] = "lorentz_invariant"

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return InvariantNet()


class LorentzDualConfig(_LorentzSettings):
    """Dimuon task: both subnets mixed by w = softmax(MLP(gate)); outputs score and weights."""

    type: Literal["lorentz_dual"] = "lorentz_dual"
    gate: str = Field(default="lead_pt", description="the globals column that gates the mixing")

    def check_features(self, spec: FeatureSpec) -> None:
        super().check_features(spec)
        if self.gate not in spec.global_names:
            raise ValueError(
                f"model.gate '{self.gate}' is not among features.globals "
                f"({', '.join(spec.global_names) or 'none'})"
            )

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return DualSubnet(gate_index=spec.global_names.index(self.gate))


CONFIGS = (LorentzUnconstrainedConfig, LorentzInvariantConfig, LorentzDualConfig)
MODELS = (UnconstrainedNet, InvariantNet, DualSubnet)
