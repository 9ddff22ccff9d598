"""``bsym train``: read the data, build the model, fit it, keep checkpoints, resume exactly.

The fitting itself is :func:`bsym.training.fit.fit`, the loop every study uses too. This
module adds what a training run on user files needs around it: the split of the rows
(``numpy default_rng([seed, 0])``), rotated copies where the config asks for augmentation,
``checkpoint.pt`` (the best epoch) and ``last.pt`` (after every epoch), and resumption from
``last.pt`` that repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bsym.devices import torch_device
from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch
from bsym.input_ranges import training_ranges
from bsym.training.augmentation import augment_training_rows
from bsym.training.checkpoint import (
    Checkpoint,
    predict,
    predict_probabilities,
    read_checkpoint,
    save_checkpoint,
)
from bsym.training.config import TrainConfig, save_config
from bsym.training.dataset import Split, TrainingData, load_training_data
from bsym.training.decorrelation import decorrelation_term, unit_scale
from bsym.training.fit import (
    EpochRecord,
    FitState,
    Rows,
    check_classes,
    classifier_auc,
    deterministic,
    fit,
)
from bsym.training.losses import InvarianceTerm, LossTerm, resolve_class_weights
from bsym.training.metrics import roc_auc
from bsym.training.models import BsymModel, NetworkModel, build_model
from bsym.training.models.base import need

log = logging.getLogger(__name__)
_RANGES: Any = {"features": {"input_ranges"}}
RESUMABLE_CHANGES = {"optimizer.epochs", "optimizer.patience", "optimizer.max_steps", "output_dir"}


@dataclass(frozen=True)
class TrainResult:
    """Where the run went and how it ended."""

    output_dir: Path
    checkpoint: Path
    last: Path
    best_val_auc: float
    best_epoch: int
    epochs: int
    stopped_early: bool
    history: list[EpochRecord]
    split: Split


def train(
    config: TrainConfig,
    *,
    resume: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train the configured model; checkpoints go to ``config.output_dir``.

    ``resume`` continues from a ``last.pt`` (or ``checkpoint.pt``) of the same config; only
    ``optimizer.epochs``, ``optimizer.patience``, ``optimizer.max_steps`` and ``output_dir``
    may differ. Without it, an output directory that already holds a checkpoint is refused
    unless ``overwrite``. ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``) is where
    the network trains; the checkpoints hold CPU tensors whatever it is.
    """
    where = torch_device(device)
    best_path = config.output_dir / "checkpoint.pt"
    if resume is None and not overwrite and best_path.exists():
        raise ConfigError(
            f"{config.output_dir} already holds a trained model; resume it with --resume "
            f"{config.output_dir / 'last.pt'}, set another output_dir, or overwrite with --force"
        )
    previous = _resumable(resume, config) if resume is not None else None
    data = load_training_data(config)
    if previous is not None:
        _check_same_split(previous.split, data.split, resume)
    train_rows, validation_rows = data.subset("train"), data.subset("validation")
    save_config(config, config.output_dir / "config.yaml")
    config = with_input_ranges(config, train_rows)
    copies, loss_weight = 1, 1.0
    terms: list[LossTerm] = []
    augmentation = config.augmentation
    if augmentation is not None and augmentation.mode != "none":
        augmented = augment_training_rows(config, data.split)
        train_rows, copies = augmented.rows, augmented.n_copies
        terms = [InvarianceTerm(augmentation.invariance.c2)]
        loss_weight = augmentation.invariance.c1
    run = _Run(config, data.split, where)
    model = seeded_model(config, train_rows)
    if isinstance(model, NetworkModel):
        extras = {}
        if config.decorrelation is not None:
            extras = _scaled_extras(config, data)
            term = decorrelation_term(
                config.decorrelation, seed=config.seed, n_classes=model.n_classes
            )
            terms = [*terms, term]
        run.fit(
            model,
            train_rows,
            validation_rows,
            copies,
            terms,
            loss_weight,
            previous,
            progress,
            extras,
        )
    elif previous is None:
        run.fixed(model, train_rows, validation_rows)
    else:
        run.state = previous.fit_state()
    return run.result()


def seeded_model(config: TrainConfig, train_rows: FeatureBatch) -> BsymModel:
    """The model of ``config``, built and fitted to ``train_rows`` under ``config.seed``."""
    with deterministic():
        torch.manual_seed(config.seed)
        return build_model(config.model, config.features, train_rows)


def fit_network(
    model: NetworkModel,
    config: TrainConfig,
    train_rows: FeatureBatch,
    validation_rows: FeatureBatch,
    *,
    copies: int = 1,
    terms: Sequence[LossTerm] = (),
    loss_weight: float = 1.0,
    state: FitState | None = None,
    on_epoch: Callable[[FitState], None] | None = None,
    progress: bool = False,
    device: torch.device | None = None,
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
) -> FitState:
    """``model`` trained by :func:`~bsym.training.fit.fit` with ``config``'s optimizer, seed
    and class weights (``train_rows`` holding ``copies`` rotated copies of each row; ``extras``
    the decorrelation variable of the ``train`` and ``validation`` rows)."""
    extras = extras or {}
    rows = replace(Rows.of(model, train_rows, copies=copies), extras=extras.get("train", {}))
    class_weights = None
    if config.class_weights is not None:
        class_weights = resolve_class_weights(
            config.class_weights, rows.label, rows.weight, model.n_classes
        )
        log.info("class weights %s", ", ".join(f"{w:.4g}" for w in class_weights))
    return fit(
        model,
        rows,
        replace(Rows.of(model, validation_rows), extras=extras.get("validation", {})),
        config.optimizer,
        seed=config.seed,
        terms=terms,
        loss_weight=loss_weight,
        state=state,
        on_epoch=on_epoch,
        description=f"train {config.name}",
        progress=progress,
        device=device,
        class_weights=class_weights,
        keep_last=config.decorrelation is not None,
    )


def with_input_ranges(config: TrainConfig, train_rows: FeatureBatch) -> TrainConfig:
    """The config whose feature spec records the ranges of the (unaugmented) training rows,
    so that export writes them into the model and scoring can watch its inputs."""
    ranges = training_ranges(config.features, train_rows)
    features = config.features.model_copy(update={"input_ranges": ranges})
    return config.model_copy(update={"features": features})


class _Run:
    """Checkpoints of one ``bsym train`` run, and what it reports at the end."""

    def __init__(self, config: TrainConfig, split: Split, device: torch.device) -> None:
        self.config = config
        self.split = split
        self.device = device
        self.best_path = config.output_dir / "checkpoint.pt"
        self.last_path = config.output_dir / "last.pt"
        self.state = FitState()

    def fit(
        self,
        model: NetworkModel,
        train_rows: FeatureBatch,
        validation_rows: FeatureBatch,
        copies: int,
        terms: list[LossTerm],
        loss_weight: float,
        previous: Checkpoint | None,
        progress: bool,
        extras: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        state = None
        if previous is not None:
            state = self._restore(model, previous)
        self.state = fit_network(
            model,
            self.config,
            train_rows,
            validation_rows,
            copies=copies,
            terms=terms,
            loss_weight=loss_weight,
            state=state,
            on_epoch=lambda state: self._save(model, state),
            progress=progress,
            device=self.device,
            extras=extras,
        )

    def fixed(
        self, model: BsymModel, train_rows: FeatureBatch, validation_rows: FeatureBatch
    ) -> None:
        """A model not trained by gradient: one validation, one checkpoint."""
        n_classes = int(getattr(model, "n_classes", 1))
        check_classes(need(train_rows.label, "label"), "training", n_classes)
        label = need(validation_rows.label, "label")
        check_classes(label, "validation", n_classes)
        if n_classes == 1:
            auc = roc_auc(label, predict(model, validation_rows), validation_rows.weight)
        else:
            probabilities = torch.from_numpy(predict_probabilities(model, validation_rows))
            logits = torch.log(probabilities.clamp_min(1e-30))
            auc = classifier_auc(label, logits, validation_rows.weight)
        record: EpochRecord = {"epoch": 1, "train_loss": None, "val_loss": None, "val_auc": auc}
        self.state = FitState(
            epoch=1,
            history=[record],
            best_epoch=1,
            best_auc=auc,
            best_state=model.state_dict(),
            finished=True,
        )
        self._save(model, self.state)

    def _restore(self, model: NetworkModel, previous: Checkpoint) -> FitState:
        model.load_state_dict(previous.state_dict)
        if previous.optimizer_state is None:
            log.warning(
                "the checkpoint has no optimizer state (a checkpoint.pt?); AdamW and the "
                "learning-rate schedule restart from scratch"
            )
        if previous.torch_rng_state is not None:
            torch.set_rng_state(previous.torch_rng_state)
        state = previous.fit_state()
        if not self.best_path.exists():
            save_checkpoint(
                self.best_path, Checkpoint.of(model, self.config, self.split, state, best=True)
            )
        log.info("resuming %s after epoch %d", self.config.name, previous.epoch)
        return state

    def _save(self, model: BsymModel, state: FitState) -> None:
        """``checkpoint.pt`` when the epoch is the best so far, ``last.pt`` always."""
        if state.best_epoch == state.epoch:
            best = Checkpoint.of(model, self.config, self.split, state, best=True)
            save_checkpoint(self.best_path, best)
        last = Checkpoint.of(model, self.config, self.split, state, best=False)
        save_checkpoint(self.last_path, last)

    def result(self) -> TrainResult:
        return TrainResult(
            output_dir=self.config.output_dir,
            checkpoint=self.best_path,
            last=self.last_path,
            best_val_auc=self.state.best_auc,
            best_epoch=self.state.best_epoch,
            epochs=self.state.epoch,
            stopped_early=self.state.stopped_early,
            history=list(self.state.history),
            split=self.split,
        )


def _scaled_extras(config: TrainConfig, data: TrainingData) -> dict[str, dict[str, torch.Tensor]]:
    """The decorrelation variable of the training and validation rows, scaled to [0, 1] by
    its range on the training rows."""
    train, validation = data.subset_extras("train"), data.subset_extras("validation")
    return {
        subset: {name: unit_scale(values[name], train[name], name) for name in train}
        for subset, values in (("train", train), ("validation", validation))
    }


def _resumable(path: Path, config: TrainConfig) -> Checkpoint:
    checkpoint = read_checkpoint(path)
    # The recorded ranges are derived from the data, which _check_same_split compares.
    before = _flatten(checkpoint.config.model_dump(mode="json", exclude=_RANGES))
    now = _flatten(config.model_dump(mode="json", exclude=_RANGES))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    changed = [key for key in changed if key not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {path}: the config differs in {', '.join(changed)} "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )
    return checkpoint


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def _check_same_split(recorded: Split, split: Split, path: Path | None) -> None:
    same = (
        recorded.n_rows == split.n_rows
        and np.array_equal(recorded.train, split.train)
        and np.array_equal(recorded.validation, split.validation)
        and np.array_equal(recorded.test, split.test)
    )
    if not same:
        raise SpecMismatchError(
            f"cannot resume {path}: the training data changed since it was written "
            f"({split.n_rows} rows now, {recorded.n_rows} then, or a different split)"
        )
