"""The training loop: BCE and AdamW, early stopping on validation AUC, exact resumption.

Reproducibility: the seed fixes the initial weights (``torch.manual_seed``), the split
(``numpy default_rng([seed, 0])``) and each epoch's shuffle (``default_rng([seed, 1, epoch])``),
and batches are slices of that permutation, with deterministic torch algorithms. No random
state is carried from epoch to epoch, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch
from bsym.training.augmentation import (
    AugmentedTraining,
    augment_training_rows,
    shuffled_rows,
)
from bsym.training.checkpoint import (
    checkpoint_header,
    predict,
    read_payload,
    save_payload,
    split_to_payload,
)
from bsym.training.config import TrainConfig, save_config
from bsym.training.dataset import Split, load_training_data
from bsym.training.metrics import roc_auc
from bsym.training.models import BsymModel, NetworkModel, build_model, model_inputs

log = logging.getLogger(__name__)
EVAL_BATCH = 8192
RESUMABLE_CHANGES = {"optimizer.epochs", "optimizer.patience", "output_dir"}

EpochRecord = dict[str, float | int | None]


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


def train(
    config: TrainConfig,
    *,
    resume: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the configured model; checkpoints go to ``config.output_dir``.

    ``resume`` continues from a ``last.pt`` (or ``checkpoint.pt``) of the same config; only
    ``optimizer.epochs``, ``optimizer.patience`` and ``output_dir`` may differ. Without it, an
    output directory that already holds a checkpoint is refused unless ``overwrite``.
    """
    best_path = config.output_dir / "checkpoint.pt"
    if resume is None and not overwrite and best_path.exists():
        raise ConfigError(
            f"{config.output_dir} already holds a trained model; resume it with --resume "
            f"{config.output_dir / 'last.pt'}, set another output_dir, or overwrite with --force"
        )
    previous = _resumable_payload(resume, config) if resume is not None else None
    data = load_training_data(config)
    if previous is not None:
        _check_same_split(previous["split"], data.split, resume)
    train_rows, validation_rows = data.subset("train"), data.subset("validation")
    augmented = None
    if config.augmentation is not None and config.augmentation.mode != "none":
        augmented = augment_training_rows(config, data.split)
        train_rows = augmented.rows
    _check_both_classes(train_rows, "training")
    _check_both_classes(validation_rows, "validation")
    save_config(config, config.output_dir / "config.yaml")
    with _deterministic():
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.features, train_rows)
        run = _Run(config, model, data.split, validation_rows)
        run.augmented = augmented
        if previous is not None:
            run.restore(previous)
        if isinstance(model, NetworkModel):
            run.fit(model, train_rows, progress=progress)
        elif previous is None:
            run.record(epoch=1, train_loss=None)
    return run.result()


class _Run:
    """Training state: model, optimizer, history, best epoch, and how to save them."""

    def __init__(
        self, config: TrainConfig, model: BsymModel, split: Split, validation: FeatureBatch
    ) -> None:
        self.config = config
        self.model = model
        self.split = split
        self.validation = validation
        self.optimizer = (
            torch.optim.AdamW(
                model.parameters(),
                lr=config.optimizer.lr,
                weight_decay=config.optimizer.weight_decay,
            )
            if model.trainable
            else None
        )
        self.augmented: AugmentedTraining | None = None
        self.history: list[EpochRecord] = []
        self.best_epoch = 0
        self.best_auc = float("-inf")
        self.best_state: dict[str, Tensor] = {}
        self.stopped_early = False
        self.best_path = config.output_dir / "checkpoint.pt"
        self.last_path = config.output_dir / "last.pt"

    @property
    def epoch(self) -> int:
        return len(self.history)

    def restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["state_dict"])
        if self.optimizer is not None and payload["optimizer_state"] is not None:
            self.optimizer.load_state_dict(payload["optimizer_state"])
        elif self.optimizer is not None:
            log.warning("the checkpoint has no optimizer state; AdamW restarts from scratch")
        self.history = list(payload["history"])
        self.best_epoch = payload["best_epoch"]
        self.best_auc = payload["best_val_auc"]
        self.best_state = payload.get("best_state_dict") or payload["state_dict"]
        torch.set_rng_state(payload["torch_rng_state"])
        if not self.best_path.exists():
            best = self._payload(best=True)
            best["state_dict"] = self.best_state
            best["optimizer_state"] = None
            save_payload(self.best_path, best)
        log.info("resuming %s after epoch %d", self.config.name, self.epoch)

    def fit(self, model: NetworkModel, rows: FeatureBatch, *, progress: bool) -> None:
        settings = self.config.optimizer
        inputs = model_inputs(model, rows)
        label = torch.from_numpy(_labels(rows).astype(np.float32))
        weight = None if rows.weight is None else torch.from_numpy(rows.weight)
        bar = tqdm(
            total=settings.epochs,
            initial=self.epoch,
            desc=f"train {self.config.name}",
            unit="epoch",
            disable=None if progress else True,
        )
        with bar:
            for epoch in range(self.epoch + 1, settings.epochs + 1):
                if epoch - 1 - self.best_epoch >= settings.patience:
                    self.stopped_early = True
                    log.info(
                        "early stop after epoch %d: the best validation AUC is from epoch %d",
                        epoch - 1,
                        self.best_epoch,
                    )
                    break
                permutation = np.random.default_rng([self.config.seed, 1, epoch])
                copies = 1 if self.augmented is None else self.augmented.n_copies
                order = torch.from_numpy(shuffled_rows(permutation, rows.n_rows, copies))
                loss = self._epoch(model, inputs, label, weight, order, progress=progress)
                record = self.record(epoch=epoch, train_loss=loss)
                bar.update()
                summary = {
                    "epoch": epoch,
                    "loss": f"{loss:.4f}",
                    "val_auc": f"{record['val_auc']:.4f}",
                    "best": f"{self.best_auc:.4f}",
                }
                bar.set_postfix(summary)
                if bar.disable:
                    log.info("%s", ", ".join(f"{k} {v}" for k, v in summary.items()))

    def _epoch(
        self,
        model: NetworkModel,
        inputs: tuple[Tensor, ...],
        label: Tensor,
        weight: Tensor | None,
        order: Tensor,
        *,
        progress: bool,
    ) -> float:
        assert self.optimizer is not None
        model.train()
        size = self.config.optimizer.batch_size
        if self.augmented is not None:
            size = self.augmented.batch_rows(size)
        summed = total = 0.0
        steps = tqdm(
            range(0, len(order), size),
            leave=False,
            disable=None if progress else True,
            unit="batch",
        )
        for start in steps:
            rows = order[start : start + size]
            batch_weight = None if weight is None else weight[rows]
            logits = model.logits(*(t[rows] for t in inputs))
            loss = _bce(logits, label[rows], batch_weight)
            if self.augmented is not None:
                loss = self.augmented.loss(logits, loss)
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            self.optimizer.step()
            share = float(len(rows)) if batch_weight is None else float(batch_weight.sum())
            summed += float(loss.detach()) * share
            total += share
        model.eval()
        return summed / total

    def record(self, *, epoch: int, train_loss: float | None) -> EpochRecord:
        """Validate, append to the history, and save ``last.pt`` (and the best checkpoint)."""
        val_loss, val_auc = self._validate()
        record: EpochRecord = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_auc": val_auc,
        }
        self.history.append(record)
        if val_auc > self.best_auc:
            self.best_auc, self.best_epoch = val_auc, epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            save_payload(self.best_path, self._payload(best=True))
        save_payload(self.last_path, self._payload(best=False))
        return record

    def _validate(self) -> tuple[float | None, float]:
        """Validation loss (networks only) and AUC of the scores the model would export."""
        rows = self.validation
        if not isinstance(self.model, NetworkModel):
            return None, roc_auc(_labels(rows), predict(self.model, rows), rows.weight)
        inputs = model_inputs(self.model, rows)
        label = torch.from_numpy(_labels(rows).astype(np.float32))
        weight = None if rows.weight is None else torch.from_numpy(rows.weight)
        with torch.inference_mode():
            logits = torch.cat(
                [
                    self.model.logits(*(t[start : start + EVAL_BATCH] for t in inputs))
                    for start in range(0, rows.n_rows, EVAL_BATCH)
                ]
            )
            loss = float(_bce(logits, label, weight))
            scores = torch.sigmoid(logits)[:, 0].numpy()
        return loss, roc_auc(_labels(rows), scores, rows.weight)

    def _payload(self, *, best: bool) -> dict[str, Any]:
        epoch = self.best_epoch if best else self.epoch
        payload: dict[str, Any] = {
            **checkpoint_header(),
            "config": self.config.model_dump_json(),
            "feature_spec": self.config.features.to_json(),
            "model_type": self.model.kind,
            "model_kwargs": self.model.init_kwargs,
            "input_names": list(self.model.input_names),
            "state_dict": self.model.state_dict(),
            "optimizer_state": None if self.optimizer is None else self.optimizer.state_dict(),
            "epoch": epoch,
            "history": self.history[:epoch],
            "best_epoch": self.best_epoch,
            "best_val_auc": self.best_auc,
            "stopped_early": self.stopped_early,
            "seeds": {
                "seed": self.config.seed,
                "torch": "torch.manual_seed(seed) before the model is built",
                "split": "numpy.random.default_rng([seed, 0]).permutation(n_rows)",
                "shuffle": "numpy.random.default_rng([seed, 1, epoch]).permutation(n_train)",
            },
            "split": split_to_payload(self.split),
            "torch_rng_state": torch.get_rng_state(),
        }
        if not best:
            payload["best_state_dict"] = self.best_state
        return payload

    def result(self) -> TrainResult:
        if self.stopped_early:
            save_payload(self.last_path, self._payload(best=False))
        return TrainResult(
            output_dir=self.config.output_dir,
            checkpoint=self.best_path,
            last=self.last_path,
            best_val_auc=self.best_auc,
            best_epoch=self.best_epoch,
            epochs=self.epoch,
            stopped_early=self.stopped_early,
            history=list(self.history),
        )


def _labels(rows: FeatureBatch) -> npt.NDArray[np.int64]:
    if rows.label is None:
        raise SpecMismatchError("training needs labels, but the feature batch has none")
    return rows.label


def _bce(logits: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
    losses = F.binary_cross_entropy_with_logits(logits[:, 0], label, reduction="none")
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum()


def _resumable_payload(path: Path, config: TrainConfig) -> dict[str, Any]:
    payload = read_payload(path)
    before = _flatten(TrainConfig.model_validate_json(payload["config"]).model_dump(mode="json"))
    now = _flatten(config.model_dump(mode="json"))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    changed = [key for key in changed if key not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {path}: the config differs in {', '.join(changed)} "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )
    return payload


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def _check_same_split(recorded: dict[str, Any], split: Split, path: Path | None) -> None:
    same = (
        recorded["n_rows"] == split.n_rows
        and torch.equal(recorded["validation"], torch.from_numpy(split.validation))
        and torch.equal(recorded["test"], torch.from_numpy(split.test))
    )
    if not same:
        raise SpecMismatchError(
            f"cannot resume {path}: the training data changed since it was written "
            f"({split.n_rows} rows now, {recorded['n_rows']} then, or a different split)"
        )


def _check_both_classes(rows: FeatureBatch, subset: str) -> None:
    labels = _labels(rows)
    present = set(np.unique(labels).tolist())
    if present != {0, 1}:
        found = ", ".join(str(v) for v in sorted(present)) or "no rows"
        raise ConfigError(
            f"the {subset} rows ({rows.n_rows}) need both labels 0 and 1, found {found}; "
            "check features.label or read more data"
        )


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch algorithms for the duration, then the caller's setting back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
