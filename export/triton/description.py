"""The typed description of one Triton model, read off an exported ONNX file.

:func:`describe_onnx` checks the graph against :mod:`bsym.contract` (tensor names, dtypes,
ranks, a dynamic batch axis, fixed other dimensions but for a dynamic constituent axis) and
the class labels against ``score``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from pydantic import Field, field_validator, model_validator

from bsym.contract import (
    CLASS_LABELS_KEY,
    CONSTITUENTS,
    FEATURE_SPEC_KEY,
    INPUTS,
    MASK,
    OUTPUTS,
    SCORE,
    SERVED_METADATA,
    SPEC_VERSION_KEY,
    sha256_of,
)
from bsym.errors import ConfigError, SpecMismatchError, did_you_mean
from bsym.export.triton.common import (
    DEFAULT_CPU_INSTANCES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS,
    TRITON_DTYPES,
    config_type,
)
from bsym.settings import StrictModel

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Batching(StrictModel):
    """Batch limits and the dynamic batcher's settings, shared by both flavours."""

    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, gt=0)
    preferred_batch_sizes: tuple[int, ...] = Field(
        default=(), description="empty: a quarter of max_batch_size and max_batch_size"
    )
    max_queue_delay_microseconds: int = Field(default=DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS, ge=0)

    @model_validator(mode="after")
    def _preferred_within_limit(self) -> Batching:
        sizes = self.preferred_batch_sizes
        if any(size <= 0 or size > self.max_batch_size for size in sizes):
            raise ValueError(
                f"preferred_batch_sizes {list(sizes)} must lie in [1, max_batch_size="
                f"{self.max_batch_size}]"
            )
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"preferred_batch_sizes {list(sizes)} must be strictly increasing")
        return self

    def preferred(self) -> tuple[int, ...]:
        """The preferred batch sizes written to the config."""
        if self.preferred_batch_sizes:
            return self.preferred_batch_sizes
        return tuple(sorted({max(1, self.max_batch_size // 4), self.max_batch_size}))


DYNAMIC = -1
"""Triton's dimension of any size: the constituent axis of a model exported with one."""


class TensorConfig(StrictModel):
    """One input or output: name, Triton data type, dimensions without the batch axis
    (:data:`DYNAMIC` for the constituent axis of a model that takes any number of slots)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


class TritonModelConfig(StrictModel):
    """Everything ``config.pbtxt`` says about one model, whatever the flavour."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    labels: tuple[str, ...]
    checksums: dict[int, str] = Field(description="version -> sha256 of its model.onnx")
    metadata: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="version -> served bsym_* metadata of its model.onnx"
    )
    batching: Batching = Batching()
    cpu_instances: int = Field(
        default=DEFAULT_CPU_INSTANCES, gt=0, description="KIND_CPU instances (cpu flavour)"
    )
    reject_nonfinite: bool = Field(
        default=True, description="the Python backend refuses requests with NaN or inf inputs"
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        check_model_name(name)
        return name

    @field_validator("checksums")
    @classmethod
    def _valid_checksums(cls, checksums: dict[int, str]) -> dict[int, str]:
        for version, digest in checksums.items():
            if version < 1 or not _SHA256.fullmatch(digest):
                raise ValueError(f"version {version}: '{digest}' is not a lowercase hex sha256")
        return checksums

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, metadata: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
        for version, entries in metadata.items():
            unknown = sorted(set(entries) - set(SERVED_METADATA))
            if version < 1 or unknown:
                raise ValueError(
                    f"version {version}: metadata keys {unknown} are not among {SERVED_METADATA}"
                )
        return metadata

    def with_versions(
        self, checksums: Mapping[int, str], metadata: Mapping[int, Mapping[str, str]]
    ) -> TritonModelConfig:
        """A copy recording ``checksums`` and ``metadata`` instead of the current ones."""
        return TritonModelConfig.model_validate(
            {
                **self.model_dump(),
                "checksums": dict(checksums),
                "metadata": {version: dict(entries) for version, entries in metadata.items()},
            }
        )

    def with_checksums(self, checksums: Mapping[int, str]) -> TritonModelConfig:
        """A copy recording ``checksums`` instead of the current ones."""
        return self.with_versions(checksums, self.metadata)


def check_model_name(name: str) -> None:
    """Triton model names are directory names: refuse separators and hidden names."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model name '{name}' is not usable as a Triton model directory: use letters, "
            "digits, '_', '-' and '.', not starting with '.' or '-'"
        )


def describe_onnx(
    onnx_path: Path,
    name: str,
    version: int = 1,
    *,
    batching: Batching | None = None,
    cpu_instances: int = DEFAULT_CPU_INSTANCES,
) -> TritonModelConfig:
    """Read tensors and class labels off an exported ONNX file and check the model contract."""
    check_model_name(name)
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as error:
        raise ConfigError(f"model '{name}': cannot read ONNX file {onnx_path}: {error}") from error
    graph = proto.graph
    initialisers = {init.name for init in graph.initializer}
    inputs = tuple(
        _tensor(name, value, "input") for value in graph.input if value.name not in initialisers
    )
    outputs = tuple(_tensor(name, value, "output") for value in graph.output)
    _check_contract(name, inputs, outputs)
    score = next(tensor for tensor in outputs if tensor.name == SCORE)
    props = {p.key: p.value for p in proto.metadata_props}
    labels = _labels(name, props, score.dims[0])
    return TritonModelConfig(
        name=name,
        inputs=inputs,
        outputs=outputs,
        labels=labels,
        checksums={version: sha256_of(Path(onnx_path))},
        metadata={version: served_metadata(props, name)},
        batching=batching or Batching(),
        cpu_instances=cpu_instances,
    )


def served_metadata(props: Mapping[str, str], model: str) -> dict[str, str]:
    """The ``metadata_props`` entries a config serves, with the feature spec's version added."""
    served = {key: props[key] for key in SERVED_METADATA if props.get(key)}
    if FEATURE_SPEC_KEY in served:
        try:
            spec = json.loads(served[FEATURE_SPEC_KEY])
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"model '{model}': '{FEATURE_SPEC_KEY}' is not JSON: {error}"
            ) from error
        version = spec.get("version") if isinstance(spec, dict) else None
        if not isinstance(version, int):
            raise ConfigError(f"model '{model}': '{FEATURE_SPEC_KEY}' has no integer 'version'")
        served[SPEC_VERSION_KEY] = str(version)
    return served


def _config_type(elem_type: int) -> str | None:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return None
    return config_type(dtype) if dtype in TRITON_DTYPES else None


def _tensor(model: str, value: onnx.ValueInfoProto, kind: str) -> TensorConfig:
    tensor_type = value.type.tensor_type
    data_type = _config_type(tensor_type.elem_type)
    if data_type is None:
        found = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': element type {found} has no Triton type"
        )
    shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    if not shape or shape[0] is not None:
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': expected a dynamic batch axis first, found "
            f"shape {_show(shape)}; export with a dynamic axis 0"
        )
    free = [axis for axis, dim in enumerate(shape) if axis > 0 and dim is None]
    allowed = [1] if value.name in (CONSTITUENTS, MASK) and kind == "input" else []
    if any(axis not in allowed for axis in free):
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': expected fixed non-batch dimensions"
            f"{' (but for the constituent axis)' if allowed else ''}, found shape {_show(shape)}"
        )
    dims = tuple(DYNAMIC if dim is None else dim for dim in shape[1:])
    return TensorConfig(name=value.name, data_type=data_type, dims=dims)


def _show(shape: list[int | None]) -> str:
    return "[" + ", ".join("N" if dim is None else str(dim) for dim in shape) + "]"


def _check_contract(
    model: str, inputs: tuple[TensorConfig, ...], outputs: tuple[TensorConfig, ...]
) -> None:
    if not inputs:
        raise SpecMismatchError(f"model '{model}': the graph has no inputs")
    for tensor in inputs:
        if tensor.name not in INPUTS:
            hint = did_you_mean(tensor.name, INPUTS)
            raise SpecMismatchError(
                f"model '{model}': input '{tensor.name}' is not one of {sorted(INPUTS)}{hint}"
            )
    if SCORE not in {tensor.name for tensor in outputs}:
        found = [tensor.name for tensor in outputs]
        raise SpecMismatchError(
            f"model '{model}': expected an output '{SCORE}', found {found}"
            f"{did_you_mean(SCORE, found)}"
        )
    for tensor in (*inputs, *outputs):
        expected = INPUTS.get(tensor.name) or OUTPUTS.get(tensor.name)
        if expected is None:
            continue
        data_type = config_type(expected.dtype)
        if tensor.data_type != data_type or len(tensor.dims) + 1 != expected.rank:
            raise SpecMismatchError(
                f"model '{model}' tensor '{tensor.name}': expected {data_type} of rank "
                f"{expected.rank}, found {tensor.data_type} of rank {len(tensor.dims) + 1}"
            )
    shapes = {tensor.name: tensor.dims for tensor in inputs}
    if CONSTITUENTS in shapes and MASK in shapes and shapes[CONSTITUENTS][0] != shapes[MASK][0]:
        raise SpecMismatchError(
            f"model '{model}': '{CONSTITUENTS}' has {shapes[CONSTITUENTS][0]} constituents but "
            f"'{MASK}' has {shapes[MASK][0]}"
        )


def _labels(model: str, metadata: Mapping[str, str], classes: int) -> tuple[str, ...]:
    raw = metadata.get(CLASS_LABELS_KEY)
    if raw is None:
        raise ConfigError(
            f"model '{model}': ONNX metadata_props lacks '{CLASS_LABELS_KEY}' (found keys "
            f"{sorted(metadata)}); export the model with bsym export"
        )
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"model '{model}': '{CLASS_LABELS_KEY}' is not JSON: {error}") from error
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ConfigError(f"model '{model}': '{CLASS_LABELS_KEY}' must be a JSON list of strings")
    if len(labels) != classes or any(not label or "\n" in label for label in labels):
        raise SpecMismatchError(
            f"model '{model}': output '{SCORE}' has {classes} classes, expected as many "
            f"non-empty one-line labels in '{CLASS_LABELS_KEY}', found {labels}"
        )
    return tuple(labels)
