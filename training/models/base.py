"""What every model shares: the tensor contract, constructor kwargs, and the config base.

Every model takes the tensors named in ``input_names`` (a subset of ``constituents``,
``mask``, ``globals``, in that order) and returns ``score`` [N, C], probabilities.
Normalisation is a pair of buffers inside the graph, so the ONNX file needs no side car.
Forward passes use only exportable ops: the mask enters as a float multiplication, never as
a boolean index.

A model family is one module of this package that defines its config classes (subclasses of
:class:`ModelSettings`, each with a literal ``type`` and a ``build`` method) and lists them
in ``CONFIGS``, and its model classes (subclasses of :class:`BsymModel`, each with a
``kind``) in ``MODELS``; :mod:`bsym.training.models.registry` finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from bsym.errors import SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.settings import StrictModel


class ModelSettings(StrictModel):
    """Base of the ``model`` section of a training config: one subclass per model type."""

    type: str

    def check_features(self, spec: FeatureSpec) -> None:
        """Raise ``ValueError`` if ``spec`` cannot feed this model (called at config load)."""

    def build(self, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
        """The unfitted model for ``spec`` and the shapes of the training ``batch``."""
        raise NotImplementedError


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
    dynamic_constituents: ClassVar[bool] = True
    """The model takes any number of constituent slots up to the spec's ``max_count``, so it
    is exported with a dynamic constituent axis and scored without padding to the maximum."""
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
    """A network trained by gradient: ``score = sigmoid(logits)`` for one class.

    A network of C > 1 classes sets ``n_classes`` and returns ``softmax(logits)``; the
    training loop then takes the cross entropy against integer labels.
    """

    n_classes: int = 1

    def logits(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        logits = self.logits(*inputs)
        return torch.sigmoid(logits) if self.n_classes == 1 else torch.softmax(logits, dim=-1)


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


def n_classes_of(spec: FeatureSpec) -> int:
    """Outputs of a classifier of ``spec``'s label: 1 (binary) or the number of classes."""
    return 1 if spec.label is None else spec.label.n_classes


def need(array: npt.NDArray[Any] | None, name: str) -> npt.NDArray[Any]:
    """``array``, or a clear error where the feature batch lacks that tensor."""
    if array is None:
        raise SpecMismatchError(f"the feature batch has no '{name}' tensor")
    return array


def n_globals_of(batch: FeatureBatch) -> int:
    """How many globals columns ``batch`` has (0 without a globals tensor)."""
    return 0 if batch.globals is None else int(batch.globals.shape[1])


class SymmetryMix(nn.Module):
    """The learned symmetry factor of arXiv:2412.18773, for any pair of subnets.

    ``w = softmax(G(standardised gate input))``, G a ReLU MLP with widths ``sizes`` and two
    outputs, and the pooled latent ``z = w_u·z_u + w_i·z_i`` of an unconstrained latent z_u
    and an invariant one z_i of the same width. The gate input's statistics are buffers that
    :meth:`fit` sets from training data.
    """

    def __init__(self, n_gate: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.norm = Standardise(n_gate)
        self.gate = nn.Sequential(*mlp(n_gate, sizes), nn.Linear(sizes[-1] if sizes else n_gate, 2))

    def fit(self, gate_input: npt.NDArray[np.float32]) -> None:
        self.norm.fit(gate_input)

    def weight(self, gate_input: Tensor) -> Tensor:
        """[N, 2] = (w_unconstrained, w_invariant), summing to one."""
        return torch.softmax(self.gate(self.norm(gate_input)), dim=-1)

    def forward(
        self, gate_input: Tensor, unconstrained: Tensor, invariant: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The pooled latent and the weights."""
        weight = self.weight(gate_input)
        return weight[:, 0:1] * unconstrained + weight[:, 1:2] * invariant, weight


class DualNetwork(NetworkModel):
    """A network that also returns its symmetry weights: ``score`` and ``symmetry_weight``."""

    output_names: ClassVar[tuple[str, ...]] = ("score", "symmetry_weight")

    def logits_and_weight(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def logits(self, *inputs: Tensor) -> Tensor:
        return self.logits_and_weight(*inputs)[0]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        logits, weight = self.logits_and_weight(*inputs)
        return torch.sigmoid(logits), weight
