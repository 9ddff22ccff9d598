"""The three networks of arXiv:2412.18773: unconstrained, Lorentz invariant and dual subnet.

All three read the raw four-momenta of the two muons, ``constituents`` [N, 2, 4] ordered
(px, py, pz, E) in GeV, with ``mask`` [N, 2]; the dual subnet also reads ``globals`` [N, G]
and gates on one column of it (the leading-muon pT by default). They return ``score``
[N, 1] (probabilities); the dual subnet also returns ``symmetry_weight`` [N, 2] =
(w_unconstrained, w_invariant). :meth:`logits` gives the pre-sigmoid output for training.

Layer sizes are the paper's. Every hidden linear layer of the per-muon map and of the
invariant MLP is followed by BatchNorm and ReLU, the last (latent) one included, so both
latents are non-negative Deep-Sets style features. Normalisation lives in the graph: the
unconstrained subnet standardises its inputs and the gate its input with buffers set by
:meth:`fit_normalisation` from the training data; the invariant subnet needs no buffers, its
inputs being logarithmic already. BatchNorm statistics run over all constituent slots, padded
ones included: harmless here, where every event has exactly two muons.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bsym.features import Constituents, Feature, FeatureSpec, Label, StrictModel

FOUR_MOMENTUM = ("Muon_px", "Muon_py", "Muon_pz", "Muon_E")
LATENT = 16
HEAD_SIZES = (512, 256, 128, 128)
# (+,−,−,−) for components ordered (px, py, pz, E)
MINKOWSKI = (-1.0, -1.0, -1.0, 1.0)


def lorentz_feature_spec(globals_: tuple[str, ...] = ("lead_pt",)) -> FeatureSpec:
    """The feature spec of the dimuon task (files of ``bsym simulate lorentz``).

    One row per event (object layout; there is no ``nDimuon`` branch), the two muons as
    constituents sorted by pT, the branches in ``globals_`` as globals (the dual subnet gates
    on one of them; pass ``()`` for the single networks), label ``label`` and weight
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
    """[N, 2] = (ψ(p0·p1), ψ((p1 − p0)²)); a missing muon counts as 0.

    ``metric`` is the diagonal of the metric in the order of the features, (−,−,−,+) for
    (px, py, pz, E).
    """
    momenta = constituents * mask.unsqueeze(-1).to(constituents.dtype)
    p0, p1 = momenta[:, 0], momenta[:, 1]
    difference = p1 - p0
    dot = torch.sum(p0 * p1 * metric, dim=-1)
    squared = torch.sum(difference * difference * metric, dim=-1)
    return psi(torch.stack([dot, squared], dim=-1))


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm over [N, P, C] tensors (statistics over events and constituent slots)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _mlp_bn(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear → BatchNorm → ReLU for every layer (the last included)."""
    layers: list[nn.Module] = []
    for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(size_in, size_out), _PointBatchNorm(size_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear layers with ReLU between them, none after the last."""
    layers: list[nn.Module] = []
    for size_in, size_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(size_in, size_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _head() -> nn.Sequential:
    return _mlp((LATENT, *HEAD_SIZES, 1))


class UnconstrainedSubnet(nn.Module):
    """Per-muon map 4→64→64→16 summed over the real muons: z_g [N, 16]."""

    def __init__(self, n_features: int = 4) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.per_muon = _mlp_bn((n_features, 64, 64, LATENT))

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        weights = mask.unsqueeze(-1).to(constituents.dtype)
        scaled = (constituents - self.feature_mean) / self.feature_std
        return torch.sum(self.per_muon(scaled * weights) * weights, dim=1)

    @torch.no_grad()
    def fit_normalisation(self, constituents: Tensor, mask: Tensor) -> None:
        """Set the input standardisation from (training) constituents of the real muons."""
        real = constituents.reshape(-1, constituents.shape[-1])[mask.reshape(-1)]
        self.feature_mean.copy_(real.mean(dim=0))
        self.feature_std.copy_(real.std(dim=0).clamp_min(1e-6))


class InvariantSubnet(nn.Module):
    """MLP 2→64→64→16 on the two Lorentz invariants of the muon pair: z_i [N, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("metric", torch.tensor(MINKOWSKI), persistent=False)
        self.mlp = _mlp_bn((2, 64, 64, LATENT))

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        return self.mlp(invariant_inputs(constituents, mask, self.metric))


class UnconstrainedNet(nn.Module):
    """The unconstrained network (a particle-flow network): z_g → head."""

    input_names: ClassVar[tuple[str, ...]] = ("constituents", "mask")
    output_names: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self) -> None:
        super().__init__()
        self.subnet = UnconstrainedSubnet()
        self.head = _head()

    def logits(self, constituents: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.subnet(constituents, mask))

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(constituents, mask))

    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        self.subnet.fit_normalisation(constituents, mask)


class InvariantNet(nn.Module):
    """The Lorentz-invariant network: z_i → head."""

    input_names: ClassVar[tuple[str, ...]] = ("constituents", "mask")
    output_names: ClassVar[tuple[str, ...]] = ("score",)

    def __init__(self) -> None:
        super().__init__()
        self.subnet = InvariantSubnet()
        self.head = _head()

    def logits(self, constituents: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.subnet(constituents, mask))

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(constituents, mask))

    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        """Nothing to fit; present so every Lorentz model is prepared the same way."""


class DualSubnet(nn.Module):
    """Both latents mixed by a learned symmetry factor: z = w_g·z_g + w_i·z_i → head.

    ``w = softmax(MLP(g))`` with the MLP 1→64→64→64→2 on the gating input g =
    ``globals[:, gate_index]`` (the leading-muon pT with :func:`lorentz_feature_spec`),
    standardised with buffers.
    """

    input_names: ClassVar[tuple[str, ...]] = ("constituents", "mask", "globals")
    output_names: ClassVar[tuple[str, ...]] = ("score", "symmetry_weight")

    def __init__(self, gate_index: int = 0) -> None:
        super().__init__()
        self.gate_index = gate_index
        self.unconstrained = UnconstrainedSubnet()
        self.invariant = InvariantSubnet()
        self.register_buffer("gate_mean", torch.zeros(1))
        self.register_buffer("gate_std", torch.ones(1))
        self.gate = _mlp((1, 64, 64, 64, 2))
        self.head = _head()

    def symmetry_weight(self, globals_: Tensor) -> Tensor:
        """[N, 2] = (w_unconstrained, w_invariant), summing to one."""
        gate_input = globals_[:, self.gate_index : self.gate_index + 1]
        return torch.softmax(self.gate((gate_input - self.gate_mean) / self.gate_std), dim=-1)

    def logits_and_weight(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor
    ) -> tuple[Tensor, Tensor]:
        weight = self.symmetry_weight(globals_)
        pooled = weight[:, 0:1] * self.unconstrained(constituents, mask) + weight[
            :, 1:2
        ] * self.invariant(constituents, mask)
        return self.head(pooled), weight

    def logits(self, constituents: Tensor, mask: Tensor, globals_: Tensor) -> Tensor:
        return self.logits_and_weight(constituents, mask, globals_)[0]

    def forward(self, constituents: Tensor, mask: Tensor, globals_: Tensor) -> tuple[Tensor, Tensor]:
        logits, weight = self.logits_and_weight(constituents, mask, globals_)
        return torch.sigmoid(logits), weight

    @torch.no_grad()
    def fit_normalisation(
        self, constituents: Tensor, mask: Tensor, globals_: Tensor | None = None
    ) -> None:
        self.unconstrained.fit_normalisation(constituents, mask)
        if globals_ is None:
            raise ValueError("the dual subnet needs the globals tensor to fit its gate input")
        gate_input = globals_[:, self.gate_index]
        self.gate_mean.copy_(gate_input.mean().reshape(1))
        self.gate_std.copy_(gate_input.std().clamp_min(1e-6).reshape(1))


LorentzModel = UnconstrainedNet | InvariantNet | DualSubnet


class LorentzModelConfig(StrictModel):
    """A model of the dimuon task, for ``bsym train``: which network and, for the dual
    subnet, which column of ``globals`` gates it."""

    type: Literal["lorentz_unconstrained", "lorentz_invariant", "lorentz_dual"]
    gate_index: int = Field(default=0, ge=0, description="dual subnet: globals column of g")


def build_lorentz_model(config: LorentzModelConfig) -> LorentzModel:
    """Instantiate the network a :class:`LorentzModelConfig` names."""
    if config.type == "lorentz_unconstrained":
        return UnconstrainedNet()
    if config.type == "lorentz_invariant":
        return InvariantNet()
    return DualSubnet(gate_index=config.gate_index)
