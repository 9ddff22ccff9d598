"""Torch models that follow the tensor contract and export to ONNX as they are.

Every model takes the tensors named in ``input_names`` (a subset of ``constituents``,
``mask``, ``globals``, in that order) and returns ``score`` [N, 1], a probability.
Normalisation is a pair of buffers inside the graph, so the ONNX file needs no side car.
Forward passes use only exportable ops: the mask enters as a float multiplication, never as
a boolean index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch
from bsym.training.config import (
    DNNConfig,
    ImageConfig,
    LorentzConfig,
    LorentzDualConfig,
    PFNConfig,
    TrainConfig,
)
from bsym.training.metrics import roc_auc

log = logging.getLogger(__name__)


class Standardise(nn.Module):
    """``(x - mean) / std`` per feature, the statistics kept as buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))

    def fit(self, rows: npt.NDArray[np.float32]) -> None:
        """Set the statistics from ``rows`` [n, size]; constant features keep unit scale."""
        if len(rows) == 0:
            return
        values = rows.astype(np.float64)
        std = values.std(axis=0)
        std[std < 1e-12] = 1.0
        self.mean.copy_(torch.from_numpy(values.mean(axis=0)))
        self.std.copy_(torch.from_numpy(std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def mlp(n_in: int, sizes: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU for each width in ``sizes``."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(n_in, size), nn.ReLU()]
        n_in = size
    return nn.Sequential(*layers)


class BsymModel(nn.Module):
    """Common base: the contract's inputs, constructor kwargs for checkpoints, data fitting."""

    kind: ClassVar[str]
    trainable: ClassVar[bool] = True
    input_names: tuple[str, ...]
    init_kwargs: dict[str, Any]

    def prepare(self, batch: FeatureBatch) -> None:
        """Fit what is taken from training data rather than learnt by gradient."""

    def unpack(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise SpecMismatchError(
                f"model '{self.kind}' takes {len(self.input_names)} tensors "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        return tuple(inputs)


class NetworkModel(BsymModel):
    """A network trained by gradient: ``score = sigmoid(logits)``."""

    def logits(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(*inputs))


class PFN(NetworkModel):
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
        self.use_globals = use_globals and n_globals > 0
        self.input_names = (
            ("constituents", "mask", "globals")
            if self.use_globals
            else (
                "constituents",
                "mask",
            )
        )
        self.norm_constituents = Standardise(n_features)
        self.norm_globals = Standardise(n_globals)
        widths = [*phi_sizes, latent] if latent is not None else list(phi_sizes)
        self.phi = mlp(n_features, widths)
        n_head = widths[-1] + (n_globals if self.use_globals else 0)
        self.f = mlp(n_head, f_sizes)
        self.out = nn.Linear(f_sizes[-1] if f_sizes else n_head, 1)

    def prepare(self, batch: FeatureBatch) -> None:
        constituents, mask = _need(batch.constituents, "constituents"), _need(batch.mask, "mask")
        self.norm_constituents.fit(constituents[mask])
        if self.use_globals:
            self.norm_globals.fit(_need(batch.globals, "globals"))

    def logits(self, *inputs: Tensor) -> Tensor:
        constituents, mask, *rest = self.unpack(inputs)
        real = mask.to(constituents.dtype).unsqueeze(-1)
        latent = (self.phi(self.norm_constituents(constituents)) * real).sum(dim=1)
        if self.use_globals:
            latent = torch.cat([latent, self.norm_globals(rest[0])], dim=1)
        output: Tensor = self.out(self.f(latent))
        return output


class DNN(NetworkModel):
    """Fully connected network on the globals."""

    kind = "dnn"
    input_names = ("globals",)

    def __init__(self, n_globals: int, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        self.init_kwargs = {"n_globals": n_globals, "hidden_sizes": list(hidden_sizes)}
        self.norm = Standardise(n_globals)
        self.hidden = mlp(n_globals, hidden_sizes)
        self.out = nn.Linear(hidden_sizes[-1] if hidden_sizes else n_globals, 1)

    def prepare(self, batch: FeatureBatch) -> None:
        self.norm.fit(_need(batch.globals, "globals"))

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
        globals_ = _need(batch.globals, "globals")
        label = _need(batch.label, "label")
        candidates = self.init_kwargs["candidates"]
        aucs = [roc_auc(label, -globals_[:, c], batch.weight) for c in candidates]
        best = candidates[int(np.argmax(aucs))]
        self.column.fill_(best)
        log.info("cone cut: %s has the best training AUC, %.4f", self.chosen, max(aucs))

    def forward(self, *inputs: Tensor) -> Tensor:
        (globals_,) = self.unpack(inputs)
        return torch.exp(-torch.index_select(globals_, 1, self.column))


MODEL_CLASSES: dict[str, type[BsymModel]] = {"pfn": PFN, "dnn": DNN, "cone_cut": ConeCut}


def build_model(config: TrainConfig, batch: FeatureBatch) -> BsymModel:
    """Construct the configured model for ``batch``'s shapes and fit it to that (training) data."""
    spec = config.features
    n_globals = 0 if batch.globals is None else batch.globals.shape[1]
    settings = config.model
    model: BsymModel
    if isinstance(settings, PFNConfig):
        constituents = _need(batch.constituents, "constituents")
        model = PFN(
            constituents.shape[2],
            n_globals if settings.use_globals else 0,
            settings.phi_sizes,
            settings.f_sizes,
            settings.latent,
            settings.use_globals,
        )
    elif isinstance(settings, DNNConfig):
        model = DNN(n_globals, settings.hidden_sizes)
    elif isinstance(settings, LorentzConfig):
        # imported here: lorentz_models subclasses NetworkModel from this module
        from bsym.training.lorentz_models import build_lorentz_model

        gate = settings.gate if isinstance(settings, LorentzDualConfig) else "lead_pt"
        model = build_lorentz_model(settings.type, spec, gate=gate)
    elif isinstance(settings, ImageConfig):
        from bsym.training.image_models import build_image_model

        model = build_image_model(settings, n_globals)
    else:
        if spec.cones is None:
            raise ConfigError("model type 'cone_cut' needs features.cones")
        first_cone = len(spec.globals)
        model = ConeCut(n_globals, range(first_cone, n_globals), spec.global_names)
    if n_globals == 0 and "globals" in model.input_names:
        raise ConfigError(f"model type '{model.kind}' needs globals, but the batch has none")
    model.prepare(batch)
    return model


def model_from_kwargs(kind: str, kwargs: dict[str, Any]) -> BsymModel:
    """Rebuild an (unfitted) model from its checkpointed type and constructor kwargs."""
    from bsym.training.image_models import IMAGE_MODEL_CLASSES
    from bsym.training.lorentz_models import LORENTZ_MODEL_CLASSES

    classes = {**MODEL_CLASSES, **LORENTZ_MODEL_CLASSES, **IMAGE_MODEL_CLASSES}
    if kind not in classes:
        raise SpecMismatchError(
            f"unknown model type '{kind}'; this bsym knows {', '.join(classes)}"
        )
    return classes[kind](**kwargs)


def model_inputs(model: BsymModel, batch: FeatureBatch) -> tuple[Tensor, ...]:
    """The batch's tensors that ``model`` takes, in its input order (sharing memory)."""
    available = batch.inputs()
    missing = [name for name in model.input_names if name not in available]
    if missing:
        raise SpecMismatchError(
            f"model '{model.kind}' needs tensor(s) {', '.join(missing)}; "
            f"the features give {', '.join(available) or 'none'}"
        )
    return tuple(torch.from_numpy(available[name]) for name in model.input_names)


def _need(array: npt.NDArray[Any] | None, name: str) -> npt.NDArray[Any]:
    if array is None:
        raise SpecMismatchError(f"the feature batch has no '{name}' tensor")
    return array
