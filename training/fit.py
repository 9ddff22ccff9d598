"""The one training loop: ``bsym train`` and every study fit their networks with :func:`fit`.

AdamW on the classification loss (:mod:`bsym.training.losses`: weighted binary or multi-class
cross entropy) plus any extra terms; after every epoch the validation AUC (weighted; the mean
one-vs-rest AUC for several classes) chooses the best epoch, drops the learning rate on a
plateau and stops the run early. The model ends with the weights of its best epoch.

Reproducibility: the caller seeds the initial weights; epoch e shuffles the training events
with ``numpy default_rng([seed, 1, e])`` and batches are slices of that permutation, with
deterministic torch algorithms. No random state is carried from epoch to epoch, so a run
resumed from its :class:`FitState` repeats an uninterrupted one exactly.

Rows may come as ``copies`` consecutive rows per event (rotated copies): a shuffle keeps an
event's copies together and a batch holds whole events, ``batch_size // copies`` of them.
A batch of a single row is skipped (BatchNorm cannot train on one row).

Small training sets: ``min_steps`` stretches the epoch limit and both patiences by the factor
that gives the run that many optimiser steps in full batches (a last, shorter batch of an
epoch trains too but is not counted), between 1 and ``max_stretch``; a resumed run keeps its
factor. ``max_steps`` caps the optimiser steps of the whole run.

Devices: ``device`` runs the epochs there (the rows are moved to it once); the weights kept
as the best, and the model that :func:`fit` returns, are on the CPU, so checkpoints load
anywhere. ``optimizer.autocast: bf16`` runs the training forward passes under bf16 autocast
(the losses, weights, optimiser state and validation stay float32). On CUDA, runs repeat
only as far as deterministic CUDA kernels exist: an op without one warns instead of failing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field
from torch import Tensor
from tqdm import tqdm

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch
from bsym.settings import StrictModel
from bsym.training.losses import (
    LossBatch,
    LossTerm,
    TrainedTerm,
    class_weighted,
    classification_loss,
)
from bsym.training.metrics import roc_auc
from bsym.training.models.base import BsymModel, NetworkModel, model_inputs

log = logging.getLogger(__name__)
EVAL_BATCH = 8192

EpochRecord = dict[str, float | int | None]


class OptimizerConfig(StrictModel):
    """AdamW, minibatches, the learning-rate schedule and the epoch and step budgets."""

    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=256, gt=0, description="rows per batch (copies included)")
    epochs: int = Field(default=30, gt=0, description="at most this many epochs")
    patience: int = Field(default=5, gt=0, description="epochs without a better validation AUC")
    lr_patience: int | None = Field(
        default=None, gt=0, description="epochs without a better AUC before the lr drops"
    )
    lr_factor: float = Field(default=1 / 3, gt=0, lt=1, description="factor of each lr drop")
    min_steps: int = Field(
        default=0, ge=0, description="stretch epochs and patiences to give this many steps"
    )
    # a larger stretch would spend more time validating than training
    max_stretch: float = Field(default=4.0, ge=1, description="the largest such stretch")
    max_steps: int | None = Field(default=None, gt=0, description="optimiser steps at most")
    autocast: Literal["none", "bf16"] = Field(
        default="none", description="bf16 autocast of the training forward passes"
    )


@dataclass(frozen=True)
class Rows:
    """A model's input tensors for a set of rows, with labels and optional weights."""

    inputs: tuple[Tensor, ...]
    label: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32] | None
    copies: int = 1
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Per-row tensors that are no model input but that loss terms read (a mass, say)."""

    @classmethod
    def of(cls, model: BsymModel, batch: FeatureBatch, *, copies: int = 1) -> Rows:
        if batch.label is None:
            raise SpecMismatchError("training needs labels, but the feature batch has none")
        if batch.n_rows % copies:
            raise SpecMismatchError(
                f"{batch.n_rows} rows do not split into events of {copies} copies"
            )
        return cls(model_inputs(model, batch), batch.label, batch.weight, copies)

    @property
    def n_rows(self) -> int:
        return len(self.label)

    def to(self, device: torch.device) -> Rows:
        """These rows with their tensors on ``device`` (labels and weights stay numpy)."""
        if all(t.device == device for t in (*self.inputs, *self.extras.values())):
            return self
        return Rows(
            tuple(t.to(device) for t in self.inputs),
            self.label,
            self.weight,
            self.copies,
            {name: t.to(device) for name, t in self.extras.items()},
        )

    @property
    def n_events(self) -> int:
        return self.n_rows // self.copies


@dataclass(frozen=True)
class Budget:
    """The epoch limit and patiences of one run, after the small-sample stretch."""

    epochs: int
    patience: int
    lr_patience: int | None
    stretch: float


@dataclass
class FitState:
    """Where a run stands after an epoch; enough to resume it exactly.

    ``optimizer_state`` and ``scheduler_state`` are the live state dicts (their tensors change
    with the next step): save or deep-copy them in ``on_epoch``, not later.
    """

    epoch: int = 0
    steps: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_auc: float = -math.inf
    best_state: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    stopped_early: bool = False
    finished: bool = False
    """The run ended: early stopping, or its epoch or step budget."""
    stretch: float | None = None
    """The small-sample factor on epochs and patiences, fixed when the run starts."""
    budget: Budget | None = None
    term_states: list[dict[str, Any]] = field(default_factory=list)
    """The state of each :class:`TrainedTerm` among the terms (an adversary), in order."""


def batch_rows(batch_size: int, copies: int) -> int:
    """Rows per batch: whole events with all their copies, about ``batch_size`` rows."""
    return max(1, batch_size // copies) * copies


def budget(
    schedule: OptimizerConfig, n_events: int, copies: int = 1, *, stretch: float | None = None
) -> Budget:
    """Epochs and patiences for ``n_events`` training events (see the module docstring);
    ``stretch`` given (a resumed run) is kept rather than derived again."""
    if stretch is None:
        events_per_batch = batch_rows(schedule.batch_size, copies) // copies
        full_batches = max(n_events // events_per_batch, 1)
        wanted = schedule.min_steps / (full_batches * schedule.epochs)
        stretch = min(max(1.0, wanted), schedule.max_stretch)
    lr_patience = schedule.lr_patience
    return Budget(
        epochs=math.ceil(schedule.epochs * stretch),
        patience=math.ceil(schedule.patience * stretch),
        lr_patience=None if lr_patience is None else math.ceil(lr_patience * stretch),
        stretch=stretch,
    )


def fit(
    model: NetworkModel,
    train: Rows,
    validation: Rows,
    schedule: OptimizerConfig,
    *,
    seed: int,
    terms: Sequence[LossTerm] = (),
    loss_weight: float = 1.0,
    state: FitState | None = None,
    on_epoch: Callable[[FitState], None] | None = None,
    progress: bool = False,
    description: str = "train",
    device: torch.device | None = None,
    keep_last: bool = False,
    class_weights: Sequence[float] | None = None,
) -> FitState:
    """Train ``model`` (already built, seeded and fitted to the data) and return its state.

    ``loss_weight`` multiplies the classification loss (c1 of encouraged invariance); each
    of ``terms`` is added to it. ``state`` resumes a run; ``on_epoch`` sees the state after
    every epoch, the model holding that epoch's weights (to save checkpoints). ``device``
    (default the CPU) is where the epochs run; the model comes back on the CPU.
    Terms with parameters of their own (:class:`TrainedTerm`) are pre-trained before the
    first epoch, updated before every step and restored from ``state``. ``keep_last`` makes
    every epoch the best one, so the run ends with its last weights and never stops early
    (decorrelation: the validation AUC would prefer the least decorrelated epoch).
    ``class_weights`` (one per class) multiply the training rows' weights in the loss.
    """
    check_classes(train.label, "training", model.n_classes)
    check_classes(validation.label, "validation", model.n_classes)
    state = state if state is not None else FitState()
    state.budget = budget(schedule, train.n_events, train.copies, stretch=state.stretch)
    state.stretch = state.budget.stretch
    if state.budget.stretch > 1 and state.epoch == 0:
        log.info(
            "%d training events: epochs %d → %d and patience %d → %d for %d optimiser steps",
            train.n_events,
            schedule.epochs,
            state.budget.epochs,
            schedule.patience,
            state.budget.patience,
            schedule.min_steps,
        )
    device = torch.device("cpu") if device is None else device
    model.to(device)
    train, validation = train.to(device), validation.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay
    )
    scheduler = _plateau_scheduler(optimizer, schedule, state.budget)
    if state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    if scheduler is not None and state.scheduler_state is not None:
        scheduler.load_state_dict(state.scheduler_state)
    if not state.best_state:
        state.best_state = _copy_state(model)
    label = torch.from_numpy(train.label).to(device)
    weight = None if train.weight is None else torch.from_numpy(train.weight).to(device)
    if class_weights is not None:
        weight = class_weighted(label, weight, class_weights)
    trained = _trained_terms(terms, state, device)
    if trained and state.epoch == 0:
        everything = LossBatch(train.inputs, label, weight, train.copies, dict(train.extras))
        logits = predict_logits(model, train.inputs).clone()  # not an inference tensor
        for term in trained:
            term.pretrain(logits, everything)
    bar = tqdm(
        total=state.budget.epochs,
        initial=state.epoch,
        desc=description,
        unit="epoch",
        disable=None if progress else True,
    )
    state.finished = _stop_reason(state, schedule) is not None
    with bar, deterministic(warn_only=device.type != "cpu"):
        while not state.finished:
            state.epoch += 1
            order = shuffled_rows(
                np.random.default_rng([seed, 1, state.epoch]), train.n_rows, train.copies
            )
            loss = _epoch(
                model,
                optimizer,
                train,
                label,
                weight,
                order,
                schedule,
                state,
                terms,
                trained,
                loss_weight,
            )
            val_loss, val_auc = validate(model, validation)
            if scheduler is not None:
                scheduler.step(val_auc)
            record: EpochRecord = {
                "epoch": state.epoch,
                "train_loss": loss,
                "val_loss": val_loss,
                "val_auc": val_auc,
                "lr": float(optimizer.param_groups[0]["lr"]),
            }
            state.history.append(record)
            if keep_last or val_auc > state.best_auc:
                state.best_auc, state.best_epoch = val_auc, state.epoch
                state.best_state = _copy_state(model)
            reason = _stop_reason(state, schedule)
            state.finished, state.stopped_early = reason is not None, reason == "patience"
            state.optimizer_state = optimizer.state_dict()
            state.scheduler_state = None if scheduler is None else scheduler.state_dict()
            state.term_states = [term.state_dict() for term in trained]
            bar.update()
            _report(bar, state, record, progress=progress)
            if state.stopped_early:
                log.info(
                    "early stop after epoch %d: the best validation AUC is from epoch %d",
                    state.epoch,
                    state.best_epoch,
                )
            if on_epoch is not None:
                on_epoch(state)
    model.to("cpu")
    model.load_state_dict(state.best_state)
    model.eval()
    return state


def _trained_terms(
    terms: Sequence[LossTerm], state: FitState, device: torch.device
) -> list[TrainedTerm]:
    """The terms with parameters of their own, on ``device`` and restored from ``state``
    where it has them."""
    trained = [term for term in terms if isinstance(term, TrainedTerm)]
    for term in trained:
        term.to(device)
    if state.term_states:
        if len(state.term_states) != len(trained):
            raise SpecMismatchError(
                f"the training state holds {len(state.term_states)} trained loss terms, the "
                f"run has {len(trained)}"
            )
        for term, term_state in zip(trained, state.term_states, strict=True):
            term.load_state_dict(term_state)
    return trained


def _stop_reason(state: FitState, schedule: OptimizerConfig) -> str | None:
    """Why the run ends after its current epoch (``None``: it goes on)."""
    assert state.budget is not None
    if schedule.max_steps is not None and state.steps >= schedule.max_steps:
        return "steps"
    if state.epoch >= state.budget.epochs:
        return "epochs"
    if state.epoch > 0 and state.epoch - state.best_epoch >= state.budget.patience:
        return "patience"
    return None


def _epoch(
    model: NetworkModel,
    optimizer: torch.optim.Optimizer,
    train: Rows,
    label: Tensor,
    weight: Tensor | None,
    order: npt.NDArray[np.int64],
    schedule: OptimizerConfig,
    state: FitState,
    terms: Sequence[LossTerm],
    trained: Sequence[TrainedTerm],
    loss_weight: float,
) -> float:
    """One pass over the shuffled rows; the mean (weighted) loss of the batches (``trained``:
    the terms of ``terms`` with parameters of their own, updated before every step)."""
    model.train()
    size = batch_rows(schedule.batch_size, train.copies)
    summed = total = 0.0
    shuffled = torch.from_numpy(order).to(label.device)
    for start in range(0, len(order), size):
        if schedule.max_steps is not None and state.steps >= schedule.max_steps:
            break
        rows = shuffled[start : start + size]
        if len(rows) < 2:
            continue
        batch = LossBatch(
            inputs=tuple(t[rows] for t in train.inputs),
            label=label[rows],
            weight=None if weight is None else weight[rows],
            copies=train.copies,
            extras={name: values[rows] for name, values in train.extras.items()},
        )
        with autocast(label.device, schedule.autocast):
            logits = model.logits(*batch.inputs)
        logits = logits.float()
        for adversary in trained:
            adversary.update(logits, batch)
        loss = loss_weight * classification_loss(logits, batch.label, batch.weight)
        for term in terms:
            loss = loss + term(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        state.steps += 1
        share = float(len(rows)) if batch.weight is None else float(batch.weight.sum())
        summed += float(loss.detach()) * share
        total += share
    model.eval()
    return summed / total if total else math.nan


def validate(model: NetworkModel, rows: Rows) -> tuple[float, float]:
    """Validation loss and AUC (weighted; mean one-vs-rest for several classes)."""
    logits = predict_logits(model, rows.inputs).cpu()
    weight = None if rows.weight is None else torch.from_numpy(rows.weight)
    loss = float(classification_loss(logits, torch.from_numpy(rows.label), weight))
    return loss, classifier_auc(rows.label, logits, rows.weight)


def predict_logits(model: NetworkModel, inputs: Sequence[Tensor]) -> Tensor:
    """Logits [N, C] of ``model`` in eval mode, in batches."""
    model.eval()
    n_rows = int(inputs[0].shape[0])
    with torch.inference_mode():
        return torch.cat(
            [
                model.logits(*(t[start : start + EVAL_BATCH] for t in inputs))
                for start in range(0, n_rows, EVAL_BATCH)
            ]
        )


def classifier_auc(
    label: npt.NDArray[np.int64], logits: Tensor, weight: npt.NDArray[np.float32] | None
) -> float:
    """AUC of the logits: binary, or the mean over classes of one class against the rest."""
    if logits.shape[-1] == 1:
        return roc_auc(label, logits[:, 0].numpy(), weight)
    # per-row constants do not change softmax, so rank rows by the normalised log probability
    log_probability = torch.log_softmax(logits, dim=-1).numpy()
    aucs = [
        roc_auc((label == c).astype(np.int64), log_probability[:, c], weight)
        for c in range(logits.shape[-1])
    ]
    return float(np.mean(aucs))


def check_classes(label: npt.NDArray[np.int64], subset: str, n_classes: int) -> None:
    """Refuse rows that lack a class: the AUC and the loss need every one of them."""
    wanted = set(range(max(n_classes, 2)))
    present = set(np.unique(label).tolist())
    if present != wanted:
        found = ", ".join(str(v) for v in sorted(present)) or "no rows"
        expected = ", ".join(str(v) for v in sorted(wanted))
        raise ConfigError(
            f"the {subset} rows ({len(label)}) need every label of {expected}, found {found}; "
            "check features.label or read more data"
        )


def shuffled_rows(rng: np.random.Generator, n_rows: int, n_copies: int) -> npt.NDArray[np.int64]:
    """A shuffle of the rows that keeps each event's copies together and in order; with one
    copy it is ``rng.permutation(n_rows)``."""
    if n_rows % n_copies:
        raise SpecMismatchError(f"{n_rows} rows do not split into events of {n_copies} copies")
    events = rng.permutation(n_rows // n_copies).astype(np.int64)
    rows: npt.NDArray[np.int64] = (events[:, None] * n_copies + np.arange(n_copies)).ravel()
    return rows


@contextmanager
def deterministic(*, warn_only: bool = False) -> Iterator[None]:
    """Deterministic torch algorithms for the duration, then the caller's setting back;
    ``warn_only`` lets an op that has no deterministic kernel warn instead of raising."""
    enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=was_warn_only)


def autocast(device: torch.device, mode: str) -> torch.autocast:
    """bf16 autocast on ``device`` for ``mode`` ``bf16``; a disabled one for ``none``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def _plateau_scheduler(
    optimizer: torch.optim.Optimizer, schedule: OptimizerConfig, limits: Budget
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    if limits.lr_patience is None:
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=schedule.lr_factor, patience=limits.lr_patience
    )


def _copy_state(model: NetworkModel) -> dict[str, Tensor]:
    """The model's weights and buffers, copied to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _report(bar: tqdm[Any], state: FitState, record: EpochRecord, *, progress: bool) -> None:
    summary = {
        "epoch": state.epoch,
        "loss": f"{record['train_loss']:.4f}",
        "val_auc": f"{record['val_auc']:.4f}",
        "best": f"{state.best_auc:.4f}",
    }
    bar.set_postfix(summary)
    if progress and bar.disable:
        log.info("%s", ", ".join(f"{k} {v}" for k, v in summary.items()))
