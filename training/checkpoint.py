"""Checkpoints: what training saves, and the one small API the other stages load them with.

A checkpoint is a ``torch.save`` dict readable with ``weights_only=True``:

======================  ==============================================================
``format``              ``"bsym-checkpoint"``; ``format_version`` 1
``config``              the :class:`TrainConfig` as JSON
``feature_spec``        the :class:`FeatureSpec` as JSON (also inside ``config``)
``model_type``          ``pfn``, ``dnn`` or ``cone_cut``; ``model_kwargs`` its constructor
``input_names``         the model's input tensors, in order
``state_dict``          weights and buffers (normalisation, chosen cone)
``optimizer_state``     AdamW state, ``None`` for models not trained by gradient
``epoch``               completed epochs; ``history`` one dict per epoch
``best_epoch``          and ``best_val_auc``
``seeds``               ``seed`` and how the split and shuffles derive from it
``split``               ``seed``, ``n_rows``, ``sources`` and int64 ``validation``/``test``
``torch_rng_state``     for resuming
``versions``            bsym and torch
======================  ==============================================================

``last.pt`` also holds ``best_state_dict`` so a resumed run can always restore its best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

import bsym
from bsym.errors import InputFileError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.rootio import atomic_output
from bsym.training.config import TrainConfig
from bsym.training.dataset import SourceRecord, Split, held_out_test
from bsym.training.models import BsymModel, model_from_kwargs, model_inputs

CHECKPOINT_FORMAT = "bsym-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score (eval mode), with the config and feature spec it was trained on."""

    model: BsymModel
    config: TrainConfig
    spec: FeatureSpec
    path: Path
    split: Split
    payload: dict[str, Any]
    """The raw checkpoint, for the rarely needed rest (history, epochs)."""

    @property
    def name(self) -> str:
        return self.config.name

    def held_out_test(self) -> FeatureBatch:
        """The test rows kept out of training, re-read from the recorded input files."""
        return held_out_test(self.config, self.split)


def load_checkpoint(path: Path) -> LoadedModel:
    """Load a ``checkpoint.pt`` (or ``last.pt``) written by ``bsym train``."""
    payload = read_payload(path)
    config = TrainConfig.model_validate_json(payload["config"])
    model = model_from_kwargs(payload["model_type"], payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    spec = FeatureSpec.from_json(payload["feature_spec"])
    return LoadedModel(model, config, spec, path, split_from_payload(payload["split"]), payload)


def predict(
    model: BsymModel | LoadedModel, batch: FeatureBatch, *, batch_size: int = 4096
) -> npt.NDArray[np.float32]:
    """Scores [N] (probability of the positive class) for every row of ``batch``."""
    network = model.model if isinstance(model, LoadedModel) else model
    inputs = model_inputs(network, batch)
    was_training = network.training
    network.eval()
    scores = np.empty(batch.n_rows, dtype=np.float32)
    try:
        with torch.inference_mode():
            for start in range(0, batch.n_rows, batch_size):
                rows = [tensor[start : start + batch_size] for tensor in inputs]
                outputs = network(*rows)
                score = outputs[0] if isinstance(outputs, tuple) else outputs
                scores[start : start + batch_size] = score[:, 0].numpy()
    finally:
        network.train(was_training)
    return scores


def read_payload(path: Path) -> dict[str, Any]:
    """The checkpoint dict, checked to be a bsym checkpoint of a known format version."""
    if not path.is_file():
        raise InputFileError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        raise InputFileError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(f"{path} is not a bsym checkpoint")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise InputFileError(
            f"{path} has checkpoint format {payload.get('format_version')}, "
            f"this bsym reads {CHECKPOINT_VERSION}"
        )
    return payload


def save_payload(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash never leaves a half-written file behind."""
    with atomic_output(path) as temporary:
        torch.save(payload, temporary)


def checkpoint_header() -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "versions": {"bsym": bsym.__version__, "torch": str(torch.__version__)},
    }


def split_to_payload(split: Split) -> dict[str, Any]:
    return {
        "seed": split.seed,
        "n_rows": split.n_rows,
        "sources": [[s.path, s.tree, s.entries] for s in split.sources],
        "validation": torch.from_numpy(split.validation),
        "test": torch.from_numpy(split.test),
    }


def split_from_payload(payload: dict[str, Any]) -> Split:
    validation = payload["validation"].numpy().astype(np.int64)
    test = payload["test"].numpy().astype(np.int64)
    held_out = np.zeros(payload["n_rows"], dtype=bool)
    held_out[validation] = held_out[test] = True
    train = np.flatnonzero(~held_out).astype(np.int64)
    sources = [SourceRecord(path, tree, entries) for path, tree, entries in payload["sources"]]
    return Split(train, validation, test, payload["seed"], payload["n_rows"], sources)
