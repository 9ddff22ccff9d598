"""Set models: the particle-flow network (Deep Sets), a dense network on globals, one cone.

``pfn`` reads the constituents (and optionally the globals), ``dnn`` the globals (cone
isolations and EFPs included), ``cone_cut`` picks the single best isolation cone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import Tensor, nn

from bsym.features import FeatureBatch, FeatureSpec
from bsym.training.metrics import roc_auc
from bsym.training.models.base import (
    BsymModel,
    ModelSettings,
    NetworkModel,
    Standardise,
    mlp,
    n_classes_of,
    n_globals_of,
    need,
)

log = logging.getLogger(__name__)


def has_globals(spec: FeatureSpec) -> bool:
    """Whether ``spec`` gives a globals tensor (branches, cone isolations or EFPs)."""
    return bool(spec.globals) or spec.cones is not None or spec.efps is not None


def check_globals(use_globals: bool, spec: FeatureSpec) -> None:
    """Raise ``ValueError`` where ``model.use_globals`` asks for globals ``spec`` lacks."""
    if use_globals and not has_globals(spec):
        raise ValueError(
            "model.use_globals is true but features has no globals or cones; "
            "add features.globals or set model.use_globals=false"
        )


class PFNConfig(ModelSettings):
    """Particle-flow network (Deep Sets): per-constituent map Φ, masked sum, head F."""

    type: Literal["pfn"] = "pfn"
    phi_sizes: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [64, 64, 64], min_length=1
    )
    f_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])
    latent: int | None = Field(
        default=None, gt=0, description="width of the summed representation; default phi_sizes[-1]"
    )
    use_globals: bool = Field(default=True, description="concatenate the globals to the sum")

    def check_features(self, spec: FeatureSpec) -> None:
        if spec.constituents is None:
            raise ValueError("model type 'pfn' needs features.constituents")
        check_globals(self.use_globals, spec)

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        constituents = need(batch.constituents, "constituents")
        return PFN(
            constituents.shape[2],
            n_globals_of(batch) if self.use_globals else 0,
            self.phi_sizes,
            self.f_sizes,
            self.latent,
            self.use_globals,
            n_classes_of(spec),
        )


class DNNConfig(ModelSettings):
    """Fully connected network on the globals (and cone isolations) only."""

    type: Literal["dnn"] = "dnn"
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])

    def check_features(self, spec: FeatureSpec) -> None:
        if not has_globals(spec):
            raise ValueError("model type 'dnn' needs features.globals or features.cones")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        return DNN(n_globals_of(batch), self.hidden_sizes, n_classes_of(spec))


class ConeCutConfig(ModelSettings):
    """The classic baseline: the single isolation cone with the best training AUC."""

    type: Literal["cone_cut"] = "cone_cut"

    def check_features(self, spec: FeatureSpec) -> None:
        if spec.cones is None:
            raise ValueError("model type 'cone_cut' needs features.cones")

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        n_globals = n_globals_of(batch)
        first_cone = len(spec.globals)
        return ConeCut(n_globals, range(first_cone, n_globals), spec.global_names)


class ParticleSum(nn.Module):
    """The Deep Sets latent ``Σ_i mask_i Φ(standardised x_i)`` [N, widths[-1]]."""

    def __init__(self, n_features: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.norm = Standardise(n_features)
        self.phi = mlp(n_features, widths)

    def fit(self, constituents: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]) -> None:
        """Standardise with the statistics of the real constituents of (training) rows."""
        self.norm.fit(constituents[mask])

    def forward(self, constituents: Tensor, mask: Tensor) -> Tensor:
        real = mask.to(constituents.dtype).unsqueeze(-1)
        latent: Tensor = (self.phi(self.norm(constituents)) * real).sum(dim=1)
        return latent


class GlobalsHead(NetworkModel):
    """A network whose head F reads a pooled latent ⊕ the standardised globals:
    ``out(f(latent ⊕ norm_globals(globals)))``, the globals only where ``use_globals``."""

    use_globals: bool
    norm_globals: Standardise
    f: nn.Sequential
    out: nn.Linear

    def build_head(
        self, width: int, n_globals: int, f_sizes: Sequence[int], n_classes: int = 1
    ) -> None:
        """``norm_globals``, ``f`` and ``out`` for a latent of ``width`` (after
        ``use_globals`` is set)."""
        self.norm_globals = Standardise(n_globals)
        n_head = width + (n_globals if self.use_globals else 0)
        self.f = mlp(n_head, f_sizes)
        self.out = nn.Linear(f_sizes[-1] if f_sizes else n_head, n_classes)

    def fit_globals(self, batch: FeatureBatch) -> None:
        if self.use_globals:
            self.norm_globals.fit(need(batch.globals, "globals"))

    def head(self, latent: Tensor, rest: Sequence[Tensor]) -> Tensor:
        """F of ``latent`` and, where ``use_globals``, the globals ``rest[0]``."""
        if self.use_globals:
            latent = torch.cat([latent, self.norm_globals(rest[0])], dim=1)
        output: Tensor = self.out(self.f(latent))
        return output


class PFN(GlobalsHead):
    """Particle-flow network: ``F(Σ_i mask_i Φ(x_i) ⊕ globals)``."""

    kind = "pfn"

    def __init__(
        self,
        n_features: int,
        n_globals: int,
        phi_sizes: Sequence[int],
        f_sizes: Sequence[int],
        latent: int | None = None,
        use_globals: bool = True,
        n_classes: int = 1,
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "n_features": n_features,
            "n_globals": n_globals,
            "phi_sizes": list(phi_sizes),
            "f_sizes": list(f_sizes),
            "latent": latent,
            "use_globals": use_globals,
        }
        # binary models keep the checkpoint kwargs they always had (and a subclass its
        # class-level n_classes)
        if n_classes != 1:
            self.init_kwargs["n_classes"] = n_classes
            self.n_classes = n_classes
        self.use_globals = use_globals and n_globals > 0
        self.input_names = (
            ("constituents", "mask", "globals")
            if self.use_globals
            else (
                "constituents",
                "mask",
            )
        )
        widths = [*phi_sizes, latent] if latent is not None else list(phi_sizes)
        self.flow = ParticleSum(n_features, widths)
        self.build_head(widths[-1], n_globals, f_sizes, n_classes)

    def prepare(self, batch: FeatureBatch) -> None:
        constituents, mask = need(batch.constituents, "constituents"), need(batch.mask, "mask")
        self.flow.fit(constituents, mask)
        self.fit_globals(batch)

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask, *rest = self.unpack(inputs)
        return self.head(self.flow(constituents, mask), rest)


class DNN(NetworkModel):
    """Fully connected network on the globals."""

    kind = "dnn"
    input_names = ("globals",)

    def __init__(self, n_globals: int, hidden_sizes: Sequence[int], n_classes: int = 1) -> None:
        super().__init__()
        self.init_kwargs = {"n_globals": n_globals, "hidden_sizes": list(hidden_sizes)}
        if n_classes != 1:
            self.init_kwargs["n_classes"] = n_classes
            self.n_classes = n_classes
        self.norm = Standardise(n_globals)
        self.hidden = mlp(n_globals, hidden_sizes)
        self.out = nn.Linear(hidden_sizes[-1] if hidden_sizes else n_globals, n_classes)

    def prepare(self, batch: FeatureBatch) -> None:
        self.norm.fit(need(batch.globals, "globals"))

    def logits(self, *inputs: Tensor) -> Tensor:
        (globals_,) = self.unpack(inputs)
        output: Tensor = self.out(self.hidden(self.norm(globals_)))
        return output


class ConeCut(BsymModel):
    """One isolation cone as the score, ``exp(-iso)``: higher is more prompt-like.

    ``prepare`` picks, among the candidate columns of ``globals``, the cone whose training
    AUC is best; the choice is a buffer, so it survives the checkpoint and the ONNX export.
    """

    kind = "cone_cut"
    trainable = False
    input_names = ("globals",)
    column: Tensor

    def __init__(self, n_globals: int, candidates: Sequence[int], names: Sequence[str]) -> None:
        super().__init__()
        self.init_kwargs = {
            "n_globals": n_globals,
            "candidates": list(candidates),
            "names": list(names),
        }
        self.names = list(names)
        self.register_buffer("column", torch.tensor([candidates[0]], dtype=torch.int64))

    @property
    def chosen(self) -> str:
        """Name of the chosen globals column, e.g. ``cone0.3``."""
        return self.names[int(self.column[0])]

    def prepare(self, batch: FeatureBatch) -> None:
        globals_ = need(batch.globals, "globals")
        label = need(batch.label, "label")
        candidates = self.init_kwargs["candidates"]
        aucs = [roc_auc(label, -globals_[:, c], batch.weight) for c in candidates]
        best = candidates[int(np.argmax(aucs))]
        self.column.fill_(best)
        log.info("cone cut: %s has the best training AUC, %.4f", self.chosen, max(aucs))

    def forward(self, *inputs: Tensor) -> Tensor:
        (globals_,) = self.unpack(inputs)
        return torch.exp(-torch.index_select(globals_, 1, self.column))


CONFIGS = (PFNConfig, DNNConfig, ConeCutConfig)
MODELS = (PFN, DNN, ConeCut)
