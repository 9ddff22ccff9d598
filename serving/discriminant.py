"""The flavour discriminant as one more model output, for any backend.

A model whose ``metadata_props`` carry ``bsym_discriminant`` (a multi-class flavour tagger)
gets an output ``Db`` [N] computed from its class probabilities, so the friend tree holds
``<model>_pb``, ``<model>_pc``, ``<model>_pu`` and ``<model>_Db`` (``Jet_<model>_Db``
in the event layout) whether the model runs in ONNX Runtime or on a Triton server. The
charm fraction ``f_c`` is the one recorded at training unless scoring overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bsym.contract import DISCRIMINANT_KEY, SCORE
from bsym.discriminant import Discriminant
from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureSpec
from bsym.serving.backend import Backend, Tensor, class_labels


class DiscriminantBackend:
    """A backend whose outputs are the model's plus its discriminant."""

    def __init__(self, inner: Backend, discriminant: Discriminant, labels: list[str]) -> None:
        self.inner = inner
        self.discriminant = discriminant
        self.labels = labels
        discriminant.columns(labels)
        if discriminant.name in inner.output_names:
            raise SpecMismatchError(
                f"model '{inner.name}' already has an output '{discriminant.name}'"
            )

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.inner.feature_spec

    @property
    def metadata(self) -> Mapping[str, str]:
        return {**self.inner.metadata, DISCRIMINANT_KEY: self.discriminant.to_json()}

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.inner.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*self.inner.output_names, self.discriminant.name)

    def predict(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        outputs = dict(self.inner.predict(inputs))
        values = self.discriminant.of(outputs[SCORE], self.labels)
        outputs[self.discriminant.name] = values.astype(np.float32)
        return outputs

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # the model file's path or served version, which the scorer records
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def with_discriminant(backend: Backend, f_c: float | None = None) -> Backend:
    """``backend`` with its model's discriminant as an output, if the model has one;
    ``f_c`` replaces the charm fraction it was trained with."""
    text = backend.metadata.get(DISCRIMINANT_KEY, "")
    if not text:
        if f_c is not None:
            raise ConfigError(
                f"--f-c: model '{backend.name}' has no flavour discriminant "
                f"('{DISCRIMINANT_KEY}' is not in its metadata)"
            )
        return backend
    try:
        discriminant = Discriminant.from_metadata(text).with_fc(f_c)
    except ValueError as error:
        raise SpecMismatchError(
            f"model '{backend.name}': invalid '{DISCRIMINANT_KEY}' in metadata_props: {error}"
        ) from error
    labels = class_labels(backend.metadata)
    if labels is None:
        raise SpecMismatchError(
            f"model '{backend.name}' has a discriminant but no class labels in its metadata"
        )
    return DiscriminantBackend(backend, discriminant, labels)
