"""What the scorer needs from an inference backend, and the checks every backend shares.

The scorer talks to a :class:`Backend` only, so the embedded ONNX Runtime backend and a
Triton gRPC client are interchangeable. Both read the model's identity (name and feature
spec) from the ``metadata_props`` that ``bsym export`` writes, and both check the tensors
they are given against what the model declares before running it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from bsym.contract import (
    CLASS_LABELS_KEY,
    CONSTITUENTS,
    FEATURE_SPEC_KEY,
    GLOBALS,
    INPUTS,
    MASK,
    MODEL_NAME_KEY,
)
from bsym.errors import SpecMismatchError, did_you_mean
from bsym.features import FeatureSpec

Tensor = npt.NDArray[np.generic]


class Backend(Protocol):
    """An inference backend serving one bsym model."""

    @property
    def name(self) -> str:
        """The model name (``bsym_model_name``); output branches are named after it."""
        ...

    @property
    def feature_spec(self) -> FeatureSpec:
        """How ROOT branches become this model's input tensors."""
        ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """The model's ``metadata_props`` (version, git commit, class labels...)."""
        ...

    @property
    def input_names(self) -> tuple[str, ...]:
        """The input tensors the model takes, a subset of constituents, mask, globals."""
        ...

    @property
    def output_names(self) -> tuple[str, ...]:
        """The output tensors, ``score`` first."""
        ...

    def predict(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run the model on a batch; every output has the batch size as its first axis."""
        ...

    def close(self) -> None:
        """Release the session or connection."""
        ...


@dataclass(frozen=True)
class TensorSpec:
    """A model input as the model declares it; ``None`` dimensions are free (the batch)."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        # a free axis after the batch is the dynamic constituent axis, P
        dims = ", ".join(
            ("N" if axis == 0 else "P") if d is None else str(d)
            for axis, d in enumerate(self.shape)
        )
        return f"[{dims}] {self.dtype}"


def spec_tensors(spec: FeatureSpec) -> dict[str, TensorSpec]:
    """The input tensors :func:`~bsym.features.build_features` makes for ``spec``."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    if spec.constituents is not None:
        count, features = spec.constituents.max_count, len(spec.constituents.features)
        shapes[CONSTITUENTS] = (None, count, features)
        shapes[MASK] = (None, count)
    if spec.global_names:
        shapes[GLOBALS] = (None, len(spec.global_names))
    return {
        name: TensorSpec(name, np.dtype(INPUTS[name].dtype), shape)
        for name, shape in shapes.items()
    }


def shape_accepts(model: tuple[int | None, ...], made: tuple[int | None, ...]) -> bool:
    """Whether a model input of shape ``model`` takes the tensors of shape ``made`` that a
    feature spec makes: equal ranks, and each fixed dimension of the model equal to the
    spec's (a free one, the batch or a dynamic constituent axis, takes any size)."""
    return len(model) == len(made) and all(
        want is None or want == have for want, have in zip(model, made, strict=True)
    )


def dynamic_constituents(backend: Backend) -> bool:
    """Whether ``backend``'s model takes ``constituents`` with any number of slots, so the
    scorer can cut each batch to its longest row (backends without ``input_specs`` do not)."""
    specs: Sequence[TensorSpec] = getattr(backend, "input_specs", ())
    return any(
        spec.name == CONSTITUENTS and len(spec.shape) > 1 and spec.shape[1] is None
        for spec in specs
    )


def sharing_cores(backend: Backend, busy: Callable[[], bool]) -> AbstractContextManager[None]:
    """A block in which ``backend`` leaves a core to the caller's thread while ``busy()``:
    the embedded backend's ``sharing_cores``; a backend that runs elsewhere (a Triton server)
    has none, and the block changes nothing."""
    share: Callable[[Callable[[], bool]], AbstractContextManager[None]] | None = getattr(
        backend, "sharing_cores", None
    )
    return nullcontext() if share is None else share(busy)


def model_identity(metadata: Mapping[str, str], where: str) -> tuple[str, FeatureSpec]:
    """The model name and feature spec from ``metadata_props``; ``where`` names the model."""
    missing = [key for key in (MODEL_NAME_KEY, FEATURE_SPEC_KEY) if not metadata.get(key)]
    if missing:
        raise SpecMismatchError(
            f"{where} has no {' or '.join(repr(k) for k in missing)} in its metadata_props, "
            "so bsym cannot tell which branches it reads; export it with 'bsym export'"
        )
    name = metadata[MODEL_NAME_KEY]
    if not name.isidentifier():
        raise SpecMismatchError(
            f"{where}: model name {name!r} cannot be used in branch names "
            "(letters, digits and underscores only)"
        )
    try:
        spec = FeatureSpec.from_json(metadata[FEATURE_SPEC_KEY])
    except ValueError as error:  # pydantic's ValidationError and json's errors are ValueErrors
        raise SpecMismatchError(
            f"{where}: invalid {FEATURE_SPEC_KEY!r} in metadata_props: {error}"
        ) from error
    return name, spec


def class_labels(metadata: Mapping[str, str]) -> list[str] | None:
    """``bsym_class_labels`` as a list: a JSON list, or comma-separated names."""
    text = metadata.get(CLASS_LABELS_KEY, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [label.strip() for label in text.split(",")]
    if isinstance(value, list):
        return [str(label) for label in value]
    return [str(value)]


def check_inputs(model: str, expected: Sequence[TensorSpec], inputs: Mapping[str, Tensor]) -> int:
    """Check names, dtypes and non-batch shapes of ``inputs``; return the batch size."""
    names = [spec.name for spec in expected]
    missing = [name for name in names if name not in inputs]
    if missing:
        raise SpecMismatchError(
            f"model '{model}' needs input tensor(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, inputs)) or 'none'}"
        )
    for name in inputs:
        if name not in names:
            raise SpecMismatchError(
                f"model '{model}' has no input tensor '{name}'{did_you_mean(name, names)}; "
                f"it takes {', '.join(map(repr, names))}"
            )
    batch_sizes: dict[str, int] = {}
    for spec in expected:
        array = inputs[spec.name]
        found = f"[{', '.join(map(str, array.shape))}] {array.dtype}"
        if array.dtype != spec.dtype:
            raise SpecMismatchError(
                f"model '{model}' input '{spec.name}': expected dtype {spec.dtype} "
                f"({spec.describe()}), found {found}"
            )
        matches = array.ndim == len(spec.shape) and all(
            want is None or want == have for want, have in zip(spec.shape, array.shape, strict=True)
        )
        if not matches:
            raise SpecMismatchError(
                f"model '{model}' input '{spec.name}': expected shape {spec.describe()}, "
                f"found {found}"
            )
        batch_sizes[spec.name] = int(array.shape[0]) if array.ndim else 1
    if len(set(batch_sizes.values())) > 1:
        sizes = ", ".join(f"'{name}' has {rows}" for name, rows in batch_sizes.items())
        raise SpecMismatchError(
            f"model '{model}': input tensors disagree on the batch size: {sizes}"
        )
    return next(iter(batch_sizes.values()), 0)


def check_slots(model: str, spec: FeatureSpec, inputs: Mapping[str, Tensor]) -> None:
    """Refuse ``constituents`` with more slots than the feature spec's ``max_count``: a model
    with a dynamic constituent axis takes fewer, never more than it was trained with."""
    constituents = inputs.get(CONSTITUENTS)
    if spec.constituents is None or constituents is None or constituents.ndim < 2:
        return
    if constituents.shape[1] > spec.constituents.max_count:
        raise SpecMismatchError(
            f"model '{model}' input '{CONSTITUENTS}': expected at most "
            f"{spec.constituents.max_count} constituent slots (the feature spec's max_count), "
            f"found {constituents.shape[1]}"
        )


def probe_outputs(backend: Backend) -> dict[str, Tensor]:
    """Run the model on one dummy row shaped by its own feature spec; return its outputs.

    This checks the spec embedded in the model against the model's inputs before any file
    is read, and tells the scorer the shape and dtype of every output.
    """
    spec = backend.feature_spec
    tensors: dict[str, Tensor] = {
        name: np.zeros((1, *(d or 0 for d in tensor.shape[1:])), dtype=tensor.dtype)
        for name, tensor in spec_tensors(spec).items()
    }
    if MASK in tensors:
        tensors[MASK][0, 0] = True
    where = f"the feature spec inside model '{backend.name}'"
    for name in backend.input_names:
        if name not in tensors:
            raise SpecMismatchError(
                f"{where} makes no '{name}' tensor, but the model takes one "
                f"(the spec makes {', '.join(map(repr, tensors)) or 'none'})"
            )
    try:
        outputs = backend.predict({name: tensors[name] for name in backend.input_names})
    except SpecMismatchError as error:
        raise SpecMismatchError(f"{where} does not match the model's inputs: {error}") from error
    examples = {name: outputs[name] for name in backend.output_names}
    for name, example in examples.items():
        if example.ndim == 0 or example.shape[0] != 1:
            raise SpecMismatchError(
                f"model '{backend.name}' output '{name}': expected the batch size (1) as its "
                f"first axis, found shape {list(example.shape)}"
            )
    return examples
