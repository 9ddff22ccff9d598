"""The one training loop: classes, extra terms, schedule, budgets and resumption."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bsym.errors import ConfigError
from bsym.training.fit import FitState, OptimizerConfig, Rows, budget, classifier_auc, fit
from bsym.training.losses import LossBatch
from bsym.training.models import NetworkModel


class LinearClassifier(NetworkModel):
    """A linear map of the globals to ``n_classes`` logits."""

    kind = "linear_test"
    input_names = ("globals",)

    def __init__(self, n_in: int, n_classes: int) -> None:
        super().__init__()
        self.init_kwargs = {"n_in": n_in, "n_classes": n_classes}
        self.linear = nn.Linear(n_in, n_classes)

    def logits(self, *inputs: Tensor) -> Tensor:
        (globals_,) = self.unpack(inputs)
        output: Tensor = self.linear(globals_)
        return output


class ThreeClasses(LinearClassifier):
    n_classes = 3


def blobs(n: int, n_classes: int, *, seed: int, spread: float = 0.5) -> Rows:
    """Gaussian blobs around one centre per class in 4 dimensions."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, n_classes, n).astype(np.int64)
    centres = np.eye(4, dtype=np.float32)[:n_classes] * 2
    x = (centres[label] + rng.normal(0, spread, (n, 4))).astype(np.float32)
    return Rows((torch.from_numpy(x),), label, None)


def test_multi_class_training_reaches_a_high_mean_auc() -> None:
    torch.manual_seed(0)
    model = ThreeClasses(4, 3)
    state = fit(
        model,
        blobs(600, 3, seed=1),
        blobs(300, 3, seed=2),
        OptimizerConfig(lr=0.05, batch_size=32, epochs=5),
        seed=0,
    )
    assert state.best_auc > 0.95
    with torch.no_grad():
        scores = model(*blobs(10, 3, seed=3).inputs)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(10))


def test_labels_outside_the_classes_are_refused() -> None:
    with pytest.raises(ConfigError, match="need every label of 0, 1, found 0, 1, 2"):
        fit(LinearClassifier(4, 1), blobs(60, 3, seed=1), blobs(60, 2, seed=2),
            OptimizerConfig(epochs=1), seed=0)  # fmt: skip


@dataclass
class CountingTerm:
    """An extra loss term that adds nothing and counts the batches it saw."""

    sizes: list[int] = field(default_factory=list)
    masses: list[Tensor] = field(default_factory=list)

    def __call__(self, logits: Tensor, batch: LossBatch) -> Tensor:
        self.sizes.append(len(batch.label))
        self.masses.append(batch.extras["mass"])
        return 0.0 * logits.sum()


def test_extra_terms_see_every_batch_and_the_step_budget_stops_the_run() -> None:
    term = CountingTerm()
    schedule = OptimizerConfig(batch_size=32, epochs=50, max_steps=7)
    train = blobs(100, 2, seed=1)
    mass = torch.arange(100, dtype=torch.float32)
    train = Rows(train.inputs, train.label, None, extras={"mass": mass})
    state = fit(
        LinearClassifier(4, 1), train, blobs(100, 2, seed=2), schedule, seed=0, terms=[term]
    )
    assert state.steps == 7 and state.finished and not state.stopped_early
    assert state.epoch == 2 and term.sizes == [32, 32, 32, 4, 32, 32, 32]
    # each batch's extras are the values of its own rows: one epoch sees every mass once
    seen = torch.cat(term.masses[:4]).sort().values
    torch.testing.assert_close(seen, mass)


def test_the_learning_rate_drops_on_a_plateau() -> None:
    # the validation labels are noise, so the validation AUC plateaus at once
    noise = blobs(200, 2, seed=2)
    shuffled = Rows(noise.inputs, np.random.default_rng(0).permutation(noise.label), None)
    schedule = OptimizerConfig(lr=1e-2, epochs=8, patience=8, lr_patience=1, lr_factor=0.5)
    state = fit(LinearClassifier(4, 1), blobs(200, 2, seed=1), shuffled, schedule, seed=0)
    rates = [record["lr"] for record in state.history]
    assert rates[0] == 1e-2 and min(r for r in rates if r is not None) < 1e-2
    assert all(a is not None and b is not None and b <= a for a, b in itertools.pairwise(rates))


def test_resuming_from_the_state_repeats_the_run() -> None:
    schedule = OptimizerConfig(batch_size=16, epochs=6, patience=6, lr_patience=1)
    train, validation = blobs(200, 2, seed=1, spread=2.0), blobs(200, 2, seed=2, spread=2.0)
    torch.manual_seed(0)
    whole = LinearClassifier(4, 1)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    full = fit(whole, train, validation, schedule, seed=3)

    part = LinearClassifier(4, 1)
    part.load_state_dict(start)
    saved: list[tuple[FitState, dict[str, Tensor]]] = []

    def keep(state: FitState) -> None:
        if state.epoch == 3:
            saved.append((copy.deepcopy(state), copy.deepcopy(part.state_dict())))

    fit(part, train, validation, schedule, seed=3, on_epoch=keep)
    state, weights = saved[0]
    resumed = LinearClassifier(4, 1)
    resumed.load_state_dict(weights)
    again = fit(resumed, train, validation, schedule, seed=3, state=state)
    assert again.history == full.history
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_small_sets_are_stretched_within_bounds() -> None:
    schedule = OptimizerConfig(batch_size=16, epochs=10, patience=4, lr_patience=2, min_steps=300)
    assert budget(schedule, 480).epochs == 10 and budget(schedule, 480).stretch == 1
    small = budget(schedule, 160)
    assert (small.epochs, small.patience, small.lr_patience) == (30, 12, 6)
    assert budget(schedule, 16).stretch == 4
    # with 8 copies an event's rows stay together: 16 rows per batch are 2 events
    assert budget(schedule, 40, copies=8).stretch == 300 / (20 * 10)


def test_a_resumed_run_keeps_its_stretch() -> None:
    schedule = OptimizerConfig(batch_size=16, epochs=10, patience=4, min_steps=300)
    first = budget(schedule, 160)
    longer = schedule.model_copy(update={"epochs": 20})
    assert budget(longer, 160).stretch == 1.5  # derived again, it would halve the patience
    kept = budget(longer, 160, stretch=first.stretch)
    assert (kept.epochs, kept.patience) == (60, 12)


def test_multi_class_auc_ignores_per_row_constants() -> None:
    label = np.array([0, 1, 2, 0, 1, 2])
    logits = torch.eye(3).repeat(2, 1) + torch.tensor([[0.0], [5.0], [-3.0], [2.0], [9.0], [1.0]])
    assert classifier_auc(label, logits, None) == 1.0
