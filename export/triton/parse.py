"""``config.pbtxt`` back into Triton's ``ModelConfig`` and into the description it came from.

Triton's protobuf schema comes with tritonclient (the ``triton`` extra), imported on first use:
writing a new model needs no parser, adding a version beside existing ones does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import text_format

from bsym.contract import REJECT_NONFINITE_KEY, SERVED_METADATA, checksum_key
from bsym.errors import ConfigError
from bsym.export.triton.common import DEFAULT_CPU_INSTANCES
from bsym.export.triton.description import Batching, TensorConfig, TritonModelConfig
from bsym.extras import require

_METADATA_KEY = re.compile(r"(\d+)/(bsym_\w+)")
_CHECKSUM_KEY = re.compile(re.escape(checksum_key("@")).replace("@", r"(\d+)"))


def _model_config_pb2() -> Any:
    return require(
        "tritonclient.grpc.model_config_pb2", "triton", purpose="reading a Triton config.pbtxt"
    )


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` message."""
    config = _model_config_pb2().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"invalid config.pbtxt: {error}") from error
    return config


def served_by_version(config: Any) -> dict[int, dict[str, str]]:
    """The served ``bsym_*`` metadata of each version a parsed config records."""
    served: dict[int, dict[str, str]] = {}
    for key, parameter in config.parameters.items():
        match = _METADATA_KEY.fullmatch(key)
        if match and match.group(2) in SERVED_METADATA:
            served.setdefault(int(match.group(1)), {})[match.group(2)] = parameter.string_value
    return served


def rejects_nonfinite(config: Any) -> bool:
    """The config's ``reject_nonfinite`` parameter; true where it has none (older configs)."""
    parameter = config.parameters.get(REJECT_NONFINITE_KEY)
    value = "true" if parameter is None else parameter.string_value
    if value not in {"true", "false"}:
        raise ConfigError(
            f"model '{config.name}': parameter '{REJECT_NONFINITE_KEY}' must be \"true\" or "
            f'"false", found "{value}"'
        )
    return value == "true"


def model_from_config(
    config: Any, labels: Sequence[str], *, cpu_instances: int = DEFAULT_CPU_INSTANCES
) -> TritonModelConfig:
    """The :class:`TritonModelConfig` a parsed ``config.pbtxt`` of either flavour came from.

    ``render_config(model_from_config(parse_config(text), labels), flavour)`` gives back
    ``text`` for a config bsym wrote (the instance count of a ``cpu`` config aside, which is
    ``cpu_instances``), so a repository of one flavour yields the other.
    """
    data_type_name = _model_config_pb2().DataType.Name

    def tensors(entries: Iterable[Any]) -> tuple[TensorConfig, ...]:
        return tuple(
            TensorConfig(
                name=entry.name, data_type=data_type_name(entry.data_type), dims=tuple(entry.dims)
            )
            for entry in entries
        )

    checksums = {}
    for key, parameter in config.parameters.items():
        match = _CHECKSUM_KEY.fullmatch(key)
        if match:
            checksums[int(match.group(1))] = parameter.string_value
    batcher = config.dynamic_batching
    try:
        return TritonModelConfig(
            name=config.name,
            inputs=tensors(config.input),
            outputs=tensors(config.output),
            labels=tuple(labels),
            checksums=checksums,
            metadata=served_by_version(config),
            batching=Batching(
                max_batch_size=config.max_batch_size,
                preferred_batch_sizes=tuple(batcher.preferred_batch_size),
                max_queue_delay_microseconds=batcher.max_queue_delay_microseconds,
            ),
            cpu_instances=cpu_instances,
            reject_nonfinite=rejects_nonfinite(config),
        )
    except ValueError as error:  # pydantic's ValidationError
        raise ConfigError(f"model '{config.name}': unusable config.pbtxt: {error}") from error
