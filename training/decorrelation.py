"""Decorrelation of the score from a variable (a mass): an adversary or DisCo, training only.

``decorrelation: {method, variable, strength, classes}`` in the training config adds a term
to the loss that penalises dependence of the score s = sigmoid(logit) on ``variable`` (a
branch read per row beside the features, scaled to [0, 1] by its minimum and maximum on the
training rows). ``classes: background`` decorrelates within the rows of label 0 only,
``all`` within each class separately. Neither method changes the network: export and
scoring are as without it.

Adversary (arXiv:1611.01046, arXiv:1703.03507)
    A mixture density network reads s (and the one-hot label with ``classes: all``) and
    predicts a Gaussian mixture over the scaled variable; its negative log likelihood L_adv
    (row weights included) is what it minimises. The classifier sees it through gradient
    reversal: the term is λ·L_adv(GRL(s)), whose gradient drives the classifier to *raise*
    L_adv. The adversary is pre-trained for ``pretrain_epochs`` epochs on the scores of the
    initial, frozen classifier, then takes ``steps`` (K) optimiser steps on each batch's
    detached scores before every classifier step. Its weights, its Adam state and whether it
    was pre-trained are part of the training state (``last.pt``), so a run resumes exactly.
DisCo (arXiv:2001.05310)
    λ·dCorr²(s, variable), the weighted squared distance correlation of the batch, summed
    over the decorrelated classes.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from bsym.errors import BadValueError, ConfigError
from bsym.settings import StrictModel
from bsym.training.losses import LossBatch
from bsym.training.models.base import mlp

# the scaled variable's mixture widths stay above this (a spike on one value is not learning)
_MIN_SIGMA = 1e-3


class AdversaryConfig(StrictModel):
    """The mixture density network of the adversary and how it is trained."""

    components: int = Field(default=20, gt=0, description="Gaussians in the mixture")
    hidden_sizes: list[int] = Field(default_factory=lambda: [32, 32], min_length=1)
    pretrain_epochs: int = Field(default=5, ge=0, description="epochs on the frozen classifier")
    steps: int = Field(default=5, gt=0, description="adversary steps per classifier step (K)")
    lr: float = Field(default=5e-3, gt=0, description="Adam learning rate of the adversary")
    batch_size: int = Field(default=256, gt=1, description="rows per pre-training batch")


class DecorrelationConfig(StrictModel):
    """Decorrelate the score from ``variable`` (training only; see training/decorrelation)."""

    method: Literal["adversary", "disco"]
    variable: str = Field(min_length=1, description="branch, one value per row (a mass)")
    strength: float = Field(ge=0, description="λ, the weight of the term")
    classes: Literal["background", "all"] = Field(
        default="background", description="decorrelate within label 0, or within each class"
    )
    adversary: AdversaryConfig | None = Field(
        default=None, description="the adversary's options (method adversary; default values)"
    )

    @property
    def adversary_options(self) -> AdversaryConfig:
        return self.adversary if self.adversary is not None else AdversaryConfig()

    @model_validator(mode="after")
    def _adversary_options_need_the_adversary(self) -> DecorrelationConfig:
        if self.method != "adversary" and self.adversary is not None:
            raise ValueError(
                f"decorrelation.adversary sets the adversary's options, but method is "
                f"'{self.method}'; remove it or use method: adversary"
            )
        return self


class GradientReversal(torch.autograd.Function):
    """The identity forward; the gradient times −1 backward."""

    @staticmethod
    def forward(ctx: Any, values: Tensor) -> Tensor:
        return values.view_as(values)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def reverse_gradient(values: Tensor) -> Tensor:
    reversed_: Tensor = GradientReversal.apply(values)  # type: ignore[no-untyped-call]
    return reversed_


def distance_correlation(x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted squared distance correlation dCorr²(x, y) ∈ [0, 1] of two [N] tensors.

    The V-statistic of arXiv:2001.05310's code: centred distance matrices with the weights
    normalised to mean one; 1 for identical (or linearly related) variables, near 0 (of
    order 1/N) for independent ones.
    """
    x, y = x.reshape(-1), y.reshape(-1)
    n = x.numel()
    w = torch.ones_like(x) if weight is None else weight.reshape(-1).to(x.dtype)
    w = w * (n / w.sum().clamp_min(1e-12))

    def centred(values: Tensor) -> Tensor:
        distances = (values[:, None] - values[None, :]).abs()
        rows = (distances * w).mean(dim=1)
        return distances - rows[None, :] - rows[:, None] + (rows * w).mean()

    a, b = centred(x), centred(y)

    def covariance(p: Tensor, q: Tensor) -> Tensor:
        return (((p * q) * w).mean(dim=1) * w).mean()

    denominator = torch.sqrt(covariance(a, a) * covariance(b, b)).clamp_min(1e-12)
    return covariance(a, b) / denominator


def class_groups(label: Tensor, classes: str) -> list[Tensor]:
    """Boolean row masks of the classes to decorrelate within: label 0, or each label."""
    if classes == "background":
        return [label == 0]
    return [label == value for value in torch.unique(label)]


class DiscoTerm:
    """λ · Σ over the decorrelated classes of dCorr²(score, variable) on the batch."""

    def __init__(self, config: DecorrelationConfig) -> None:
        self.config = config

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor:
        score = torch.sigmoid(_one_score(logits))
        variable = batch.extras[self.config.variable]
        total = logits.new_zeros(())
        for rows in class_groups(batch.label, self.config.classes):
            if int(rows.sum()) < 2:
                continue
            weight = None if batch.weight is None else batch.weight[rows]
            total = total + distance_correlation(score[rows], variable[rows], weight)
        return self.config.strength * total


class MixtureDensityNetwork(nn.Module):
    """p(variable | score[, class]): a Gaussian mixture whose parameters a small MLP gives."""

    def __init__(self, n_inputs: int, components: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.body = mlp(n_inputs, hidden_sizes)
        self.head = nn.Linear(hidden_sizes[-1] if hidden_sizes else n_inputs, 3 * components)
        self.components = components

    def negative_log_likelihood(self, inputs: Tensor, variable: Tensor) -> Tensor:
        """−log p(variable | inputs) per row."""
        logit_pi, mean, log_sigma = self.head(self.body(inputs)).chunk(3, dim=-1)
        sigma = nn.functional.softplus(log_sigma) + _MIN_SIGMA
        z = (variable[:, None] - mean) / sigma
        log_gauss = -0.5 * z**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
        log_mixture = torch.logsumexp(torch.log_softmax(logit_pi, dim=-1) + log_gauss, dim=-1)
        return -log_mixture


class AdversaryTerm:
    """λ · L_adv(GRL(score)): a term with parameters and an optimiser of its own.

    :func:`bsym.training.fit.fit` calls :meth:`pretrain` before the first epoch and
    :meth:`update` before every classifier step, and keeps :meth:`state_dict` in the state.
    """

    def __init__(self, config: DecorrelationConfig, *, seed: int, n_classes: int = 2) -> None:
        self.config = config
        self.n_classes = n_classes if config.classes == "all" else 0
        options = config.adversary_options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = MixtureDensityNetwork(
                1 + self.n_classes, options.components, options.hidden_sizes
            )
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=options.lr)
        self.pretrained = False
        self.seed = seed

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor:
        loss = self.loss(reverse_gradient(torch.sigmoid(_one_score(logits))), batch)
        return self.config.strength * loss

    def loss(self, score: Tensor, batch: LossBatch) -> Tensor:
        """The adversary's weighted mean negative log likelihood over the decorrelated rows."""
        rows = class_groups(batch.label, self.config.classes)
        selected = torch.stack(rows).any(dim=0)
        inputs = score[:, None]
        if self.n_classes:
            onehot = nn.functional.one_hot(batch.label.long(), self.n_classes).to(score.dtype)
            inputs = torch.cat([inputs, onehot], dim=1)
        nll = self.network.negative_log_likelihood(
            inputs[selected], batch.extras[self.config.variable][selected]
        )
        if batch.weight is None:
            return nll.mean() if nll.numel() else score.new_zeros(())
        weight = batch.weight[selected]
        return (nll * weight).sum() / weight.sum().clamp_min(1e-12)

    def to(self, device: torch.device) -> None:
        """The adversary on ``device`` (before its state is restored, so Adam's is there too)."""
        self.network.to(device)

    def update(self, logits: Tensor, batch: LossBatch) -> None:
        """K adversary steps on the batch's scores (the classifier is not changed)."""
        score = torch.sigmoid(_one_score(logits.detach()))
        for _ in range(self.config.adversary_options.steps):
            self._step(score, batch)

    def pretrain(self, logits: Tensor, batch: LossBatch) -> None:
        """``pretrain_epochs`` epochs on the frozen classifier's scores of every training row
        (once per run: a resumed run does not pre-train again)."""
        if self.pretrained:
            return
        score = torch.sigmoid(_one_score(logits.detach()))
        size = self.config.adversary_options.batch_size
        for epoch in range(self.config.adversary_options.pretrain_epochs):
            order = np.random.default_rng([self.seed, 2, epoch]).permutation(len(score))
            for start in range(0, len(order), size):
                rows = torch.from_numpy(order[start : start + size])
                if len(rows) > 1:
                    self._step(score[rows], _rows_of(batch, rows))
        self.pretrained = True

    def _step(self, score: Tensor, batch: LossBatch) -> None:
        loss = self.loss(score, batch)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            torch.autograd.backward(loss)
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """A copy of the adversary's weights, Adam state and pre-training flag."""
        return {
            "network": {k: v.detach().clone() for k, v in self.network.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "pretrained": self.pretrained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pretrained = bool(state["pretrained"])


def decorrelation_term(
    config: DecorrelationConfig, *, seed: int, n_classes: int
) -> DiscoTerm | AdversaryTerm:
    """The loss term of ``config``; the model must give one score (binary classification)."""
    if n_classes != 1:
        raise ConfigError(
            f"decorrelation needs a model with one score (binary classification), this one "
            f"has {n_classes} outputs"
        )
    if config.method == "disco":
        return DiscoTerm(config)
    return AdversaryTerm(config, seed=seed)


def unit_scale(
    values: npt.NDArray[np.float64], reference: npt.NDArray[np.float64], name: str
) -> Tensor:
    """``values`` mapped to [0, 1] by the minimum and maximum of ``reference`` (the training
    rows), as float32."""
    low, high = float(np.min(reference)), float(np.max(reference))
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise BadValueError(
            f"the decorrelation variable '{name}' needs finite values that are not all equal "
            f"on the training rows, found the range [{low}, {high}]"
        )
    return torch.from_numpy(((values - low) / (high - low)).astype(np.float32))


def _one_score(logits: Tensor) -> Tensor:
    return logits.reshape(-1) if logits.dim() == 1 else logits[:, 0]


def _rows_of(batch: LossBatch, rows: Tensor) -> LossBatch:
    return LossBatch(
        inputs=(),
        label=batch.label[rows],
        weight=None if batch.weight is None else batch.weight[rows],
        copies=1,
        extras={name: values[rows] for name, values in batch.extras.items()},
    )
