"""Losses of the training loop: the classification loss and the extra terms added to it.

The classification loss is the binary cross entropy with logits for one output (labels 0/1)
and the cross entropy for C > 1 outputs (labels 0 … C−1), per row, times the row weight and
divided by the summed weight of the batch (the plain mean without weights). Extra terms
(:class:`LossTerm`) see the batch's logits and rows and return a scalar added to it; the
encouraged-invariance term of rotation augmentation is one, and decorrelation terms plug in
the same way.

Class weights (``class_weights`` in the config) multiply each training row's weight by its
class's weight: :func:`resolve_class_weights` turns ``balanced`` into numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from bsym.errors import ConfigError, SpecMismatchError


@dataclass(frozen=True)
class LossBatch:
    """What a loss term may read of one batch: its rows' inputs, labels and weights."""

    inputs: tuple[Tensor, ...]
    label: Tensor
    weight: Tensor | None
    copies: int
    """Consecutive rows per event (rotated copies); 1 without augmentation."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """The rows' values of per-row tensors that are no model input (``Rows.extras``)."""


class LossTerm(Protocol):
    """An extra term of the training loss, evaluated on every training batch."""

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor: ...


@runtime_checkable
class TrainedTerm(Protocol):
    """A loss term with parameters of its own (an adversary), trained by its own optimiser.

    The training loop moves it to the run's device with :meth:`to`, calls :meth:`pretrain`
    once before the first epoch (with the logits of
    the untrained, frozen classifier on every training row), :meth:`update` with each batch's
    logits before the classifier's step, and keeps :meth:`state_dict` in the training state
    after every epoch so that a resumed run restores it.
    """

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor: ...

    def to(self, device: torch.device) -> None: ...

    def pretrain(self, logits: Tensor, batch: LossBatch) -> None: ...

    def update(self, logits: Tensor, batch: LossBatch) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def classification_loss(logits: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
    """Weighted (binary) cross entropy of ``logits`` [N, C] against integer labels [N]."""
    if logits.shape[-1] == 1:
        losses = F.binary_cross_entropy_with_logits(
            logits[:, 0], label.to(logits.dtype), reduction="none"
        )
    else:
        losses = F.cross_entropy(logits, label.long(), reduction="none")
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp_min(1e-12)


def resolve_class_weights(
    wanted: Literal["balanced"] | Sequence[float],
    label: npt.NDArray[np.int64],
    weight: npt.NDArray[np.float32] | None,
    n_classes: int,
) -> list[float]:
    """One loss weight per class (two for a binary label): the given ones, or ``balanced``,
    the summed row weight over C times that of the class, so every class weighs the same."""
    size = max(n_classes, 2)
    if wanted != "balanced":
        if len(wanted) != size:
            raise ConfigError(f"class_weights has {len(wanted)} values for {size} classes")
        return [float(w) for w in wanted]
    rows = np.ones(len(label)) if weight is None else weight.astype(np.float64)
    totals = np.bincount(label, weights=rows, minlength=size)[:size]
    if np.any(totals <= 0):
        raise ConfigError(
            f"class_weights: balanced needs every class in the training rows, found totals "
            f"{totals.tolist()}"
        )
    return [float(totals.sum() / (size * total)) for total in totals]


def class_weighted(label: Tensor, weight: Tensor | None, class_weights: Sequence[float]) -> Tensor:
    """The rows' weights times their class's weight (the class weight alone without them)."""
    per_class = torch.tensor(list(class_weights), dtype=torch.float32, device=label.device)
    per_class = per_class[label.long()]
    return per_class if weight is None else per_class * weight


def invariance_penalty(logits: Tensor, n_copies: int) -> Tensor:
    """Mean over events of the variance (divisor K) of the sigmoid score over their K copies;
    ``logits`` [N·K] or [N·K, 1], event-major."""
    if logits.dim() > 1 and logits.shape[-1] != 1:
        raise SpecMismatchError(
            f"the invariance term takes one score per row, the model gives {logits.shape[-1]}"
        )
    scores = torch.sigmoid(logits.reshape(-1))
    if scores.numel() % n_copies:
        raise SpecMismatchError(
            f"{scores.numel()} scores do not split into events of {n_copies} copies"
        )
    per_event = scores.reshape(-1, n_copies)
    return per_event.var(dim=1, unbiased=False).mean()


@dataclass(frozen=True)
class InvarianceTerm:
    """Encouraged invariance: ``c2 · mean over events of Var(score over the event's copies)``."""

    c2: float

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor:
        if self.c2 == 0 or batch.copies == 1:
            return logits.new_zeros(())
        return self.c2 * invariance_penalty(logits, batch.copies)
