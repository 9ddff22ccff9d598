"""Checkpoints: what training saves, and the one small API the other stages load them with.

A checkpoint file is a ``torch.save`` dict readable with ``weights_only=True``; in memory it
is a :class:`Checkpoint`. The dict's keys:

======================  ==============================================================
``format``              ``"bsym-checkpoint"``; ``format_version`` 2 (1 still loads)
``config``              the :class:`TrainConfig` as JSON
``feature_spec``        the :class:`FeatureSpec` as JSON (also inside ``config``)
``model_type``          the registered model type; ``model_kwargs`` its constructor
``input_names``         the model's input tensors, in order
``state_dict``          weights and buffers (normalisation, chosen cone)
``optimizer_state``     AdamW state, ``None`` for models not trained by gradient
``scheduler_state``     the plateau schedule's state, ``None`` without one (version 2)
``epoch``               completed epochs; ``steps`` optimiser steps, ``stretch`` the
                        small-sample factor on epochs and patiences (version 2)
``history``             one dict per epoch
``best_epoch``          and ``best_val_auc``; ``stopped_early``; ``finished`` (version 2:
                        the run ended by early stopping or its epoch or step budget)
``seeds``               ``seed`` and how the split and shuffles derive from it
``split``               ``seed``, ``n_rows``, ``sources``, int64 ``train``/``validation``/
                        ``test`` and ``summary`` (rows and weight sums per subset and class)
``torch_rng_state``     for resuming
``term_states``         (``last.pt``) the state of each loss term with parameters of its
                        own, as an adversary's weights and optimiser (version 2)
``versions``            bsym and torch
======================  ==============================================================

``last.pt`` also holds ``best_state_dict`` so a resumed run can always restore its best.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import ValidationError

import bsym
from bsym.errors import InputFileError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.rootio import atomic_output
from bsym.training.config import TrainConfig
from bsym.training.dataset import SourceRecord, Split, held_out_test
from bsym.training.fit import FitState
from bsym.training.models import BsymModel, model_from_kwargs, model_inputs

CHECKPOINT_FORMAT = "bsym-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SEEDS = {
    "torch": "torch.manual_seed(seed) before the model is built",
    "split": "numpy.random.default_rng([seed, 0]).permutation(n_rows)",
    "shuffle": "numpy.random.default_rng([seed, 1, epoch]).permutation(n_train_events)",
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score (eval mode), with the config and feature spec it was trained on."""

    model: BsymModel
    config: TrainConfig
    spec: FeatureSpec
    path: Path
    split: Split
    checkpoint: Checkpoint
    """Everything else the file holds (history, epochs, versions)."""

    @property
    def name(self) -> str:
        return self.config.name

    def held_out_test(self) -> FeatureBatch:
        """The test rows kept out of training, re-read from the recorded input files."""
        return held_out_test(self.config, self.split)


def load_checkpoint(path: Path) -> LoadedModel:
    """Load a ``checkpoint.pt`` (or ``last.pt``) written by ``bsym train``."""
    checkpoint = read_checkpoint(path)
    model = model_from_kwargs(checkpoint.model_type, checkpoint.model_kwargs)
    model.load_state_dict(checkpoint.state_dict)
    model.eval()
    config = checkpoint.config
    return LoadedModel(model, config, config.features, path, checkpoint.split, checkpoint)


def predict(
    model: BsymModel | LoadedModel, batch: FeatureBatch, *, batch_size: int = 4096
) -> npt.NDArray[np.float32]:
    """Scores [N] (probability of the positive class) for every row of ``batch``."""
    return predict_probabilities(model, batch, batch_size=batch_size)[:, 0].copy()


def predict_probabilities(
    model: BsymModel | LoadedModel, batch: FeatureBatch, *, batch_size: int = 4096
) -> npt.NDArray[np.float32]:
    """Scores [N, C] (the probability of each class; C = 1 for binary models)."""
    network = model.model if isinstance(model, LoadedModel) else model
    inputs = model_inputs(network, batch)
    was_training = network.training
    network.eval()
    parts: list[npt.NDArray[np.float32]] = []
    try:
        with torch.inference_mode():
            for start in range(0, batch.n_rows, batch_size):
                rows = [tensor[start : start + batch_size] for tensor in inputs]
                outputs = network(*rows)
                score = outputs[0] if isinstance(outputs, tuple) else outputs
                parts.append(score.numpy().astype(np.float32).reshape(len(score), -1))
    finally:
        network.train(was_training)
    if not parts:
        return np.empty((0, 1), dtype=np.float32)
    return np.concatenate(parts)


@dataclass(frozen=True)
class Checkpoint:
    """The typed content of a checkpoint file (see the module docstring)."""

    config: TrainConfig
    model_type: str
    model_kwargs: dict[str, Any]
    input_names: list[str]
    state_dict: dict[str, torch.Tensor]
    split: Split
    epoch: int
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_auc: float
    stopped_early: bool
    finished: bool
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    steps: int = 0
    stretch: float | None = None
    best_state_dict: dict[str, torch.Tensor] | None = None
    torch_rng_state: torch.Tensor | None = None
    versions: dict[str, str] = field(default_factory=dict)
    term_states: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(
        cls, model: BsymModel, config: TrainConfig, split: Split, state: FitState, *, best: bool
    ) -> Checkpoint:
        """The checkpoint of ``model`` now: its best epoch (``best``) or its last one, for
        which the training state to resume from is kept too."""
        epoch = state.best_epoch if best else state.epoch
        return cls(
            config=config,
            model_type=model.kind,
            model_kwargs=model.init_kwargs,
            input_names=list(model.input_names),
            state_dict=state.best_state if best else model.state_dict(),
            split=split,
            epoch=epoch,
            history=state.history[:epoch],
            best_epoch=state.best_epoch,
            best_val_auc=state.best_auc,
            stopped_early=state.stopped_early,
            finished=state.finished,
            optimizer_state=None if best else state.optimizer_state,
            scheduler_state=None if best else state.scheduler_state,
            steps=state.steps,
            stretch=state.stretch,
            best_state_dict=None if best else state.best_state,
            torch_rng_state=torch.get_rng_state(),
            versions={"bsym": bsym.__version__, "torch": str(torch.__version__)},
            term_states=[] if best else list(state.term_states),
        )

    def fit_state(self) -> FitState:
        """The training state to resume from (a ``last.pt``; a ``checkpoint.pt`` restarts the
        optimizer and the schedule)."""
        return FitState(
            epoch=self.epoch,
            steps=self.steps,
            history=list(self.history),
            best_epoch=self.best_epoch,
            best_auc=self.best_val_auc,
            best_state=self.best_state_dict or self.state_dict,
            optimizer_state=self.optimizer_state,
            scheduler_state=self.scheduler_state,
            stopped_early=self.stopped_early,
            finished=self.finished,
            stretch=self.stretch,
            term_states=list(self.term_states),
        )

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": self.config.model_dump_json(),
            "feature_spec": self.config.features.to_json(),
            "model_type": self.model_type,
            "model_kwargs": self.model_kwargs,
            "input_names": self.input_names,
            "state_dict": self.state_dict,
            "optimizer_state": self.optimizer_state,
            "scheduler_state": self.scheduler_state,
            "epoch": self.epoch,
            "steps": self.steps,
            "stretch": self.stretch,
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_val_auc": self.best_val_auc,
            "stopped_early": self.stopped_early,
            "finished": self.finished,
            "seeds": {"seed": self.config.seed, **SEEDS},
            "split": split_to_payload(self.split),
            "torch_rng_state": self.torch_rng_state,
            "versions": self.versions,
        }
        if self.best_state_dict is not None:
            payload["best_state_dict"] = self.best_state_dict
        if self.term_states:
            payload["term_states"] = self.term_states
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: Path) -> Checkpoint:
        """Read a version 1 or 2 payload; a missing key is a clear error, not a KeyError."""
        try:
            config = TrainConfig.model_validate_json(payload["config"])
            epoch = int(payload["epoch"])
            stopped_early = bool(payload["stopped_early"])
            return cls(
                config=config,
                model_type=str(payload["model_type"]),
                model_kwargs=dict(payload["model_kwargs"]),
                input_names=list(payload["input_names"]),
                state_dict=payload["state_dict"],
                split=split_from_payload(payload["split"]),
                epoch=epoch,
                history=list(payload["history"]),
                best_epoch=int(payload["best_epoch"]),
                best_val_auc=float(payload["best_val_auc"]),
                stopped_early=stopped_early,
                finished=bool(
                    payload.get("finished", stopped_early or epoch >= config.optimizer.epochs)
                ),
                optimizer_state=payload.get("optimizer_state"),
                scheduler_state=payload.get("scheduler_state"),
                steps=int(payload.get("steps", 0)),
                stretch=payload.get("stretch"),
                best_state_dict=payload.get("best_state_dict"),
                torch_rng_state=payload.get("torch_rng_state"),
                versions=dict(payload.get("versions", {})),
                term_states=list(payload.get("term_states", [])),
            )
        except KeyError as error:
            raise InputFileError(f"{path}: the checkpoint has no '{error.args[0]}'") from error
        except ValidationError as error:
            raise InputFileError(
                f"{path}: the checkpoint's config does not load in this bsym ({error})"
            ) from error


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``, checked to be a bsym checkpoint of a readable version."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise InputFileError(
            f"{path} is refused: it holds Python objects{what}, and bsym reads only tensors "
            "and plain data from a checkpoint, as bsym train writes it (loading anything "
            "else could run code from the file)"
        ) from error
    except Exception as error:  # zip and torch errors alike
        first_line = str(error).split(". ")[0].splitlines()[0]
        raise InputFileError(
            f"{path}: not a readable checkpoint, truncated or not written by torch.save "
            f"({first_line})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(f"{path} is not a bsym checkpoint")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise InputFileError(
            f"{path} has checkpoint format {payload.get('format_version')}, this bsym reads "
            f"{', '.join(str(v) for v in READABLE_VERSIONS)}"
        )
    return Checkpoint.from_payload(payload, path)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint atomically: a crash never leaves a half-written file behind.

    Tensors are written from the CPU, so a checkpoint of a GPU run loads on any machine.
    """
    with atomic_output(path) as temporary:
        torch.save(on_cpu(checkpoint.to_payload()), temporary)


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(on_cpu(item) for item in value)
    return value


def split_to_payload(split: Split) -> dict[str, Any]:
    return {
        "seed": split.seed,
        "n_rows": split.n_rows,
        "sources": [[s.path, s.tree, s.entries] for s in split.sources],
        "train": torch.from_numpy(split.train),
        "validation": torch.from_numpy(split.validation),
        "test": torch.from_numpy(split.test),
        "summary": split.summary,
    }


def split_from_payload(payload: dict[str, Any]) -> Split:
    validation = payload["validation"].numpy().astype(np.int64)
    test = payload["test"].numpy().astype(np.int64)
    if "train" in payload:
        train = payload["train"].numpy().astype(np.int64)
    else:  # written before data.train_rows: every row not held out
        held_out = np.zeros(payload["n_rows"], dtype=bool)
        held_out[validation] = held_out[test] = True
        train = np.flatnonzero(~held_out).astype(np.int64)
    sources = [SourceRecord(path, tree, entries) for path, tree, entries in payload["sources"]]
    summary = dict(payload.get("summary", {}))
    return Split(train, validation, test, payload["seed"], payload["n_rows"], sources, summary)
