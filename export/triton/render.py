"""``config.pbtxt`` text from a :class:`~bsym.export.triton.description.TritonModelConfig`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from bsym.contract import (
    LABELS_FILENAME,
    REJECT_NONFINITE_KEY,
    SCORE,
    SERVED_METADATA,
    checksum_key,
    metadata_key,
)
from bsym.errors import ConfigError
from bsym.export.triton.common import Flavour
from bsym.export.triton.description import TensorConfig, TritonModelConfig


def flavour_of(flavour: Flavour | str) -> Flavour:
    """``flavour`` as a :class:`Flavour`; a ConfigError names the choices for a bad one."""
    try:
        return Flavour(flavour)
    except ValueError:
        choices = [member.value for member in Flavour]
        raise ConfigError(
            f"unknown Triton config flavour '{flavour}'; expected one of {choices}"
        ) from None


def render_config(model: TritonModelConfig, flavour: Flavour) -> str:
    """``config.pbtxt`` text for ``model`` in the given flavour."""
    if flavour_of(flavour) is Flavour.production:
        head = ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
        instances = ("KIND_GPU", 1)
    else:
        head = ['backend: "python"']
        kind = "KIND_GPU" if flavour is Flavour.gpu else "KIND_CPU"
        instances = (kind, model.cpu_instances)
    batching = model.batching
    lines = [
        f"name: {_quote(model.name)}",
        *head,
        f"max_batch_size: {batching.max_batch_size}",
        *_tensors("input", model.inputs),
        *_tensors("output", model.outputs),
        "instance_group [",
        "  {",
        f"    kind: {instances[0]}",
        f"    count: {instances[1]}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred()))} ]",
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}",
        "}",
        *_parameters(
            {
                **{checksum_key(v): d for v, d in sorted(model.checksums.items())},
                **{
                    metadata_key(version, key): entries[key]
                    for version, entries in sorted(model.metadata.items())
                    for key in SERVED_METADATA
                    if key in entries
                },
                REJECT_NONFINITE_KEY: "true" if model.reject_nonfinite else "false",
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def _tensors(field: str, tensors: Iterable[TensorConfig]) -> list[str]:
    blocks = []
    for tensor in tensors:
        block = [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(map(str, tensor.dims))} ]",
        ]
        if field == "output" and tensor.name == SCORE:
            block.append(f"    label_filename: {_quote(LABELS_FILENAME)}")
        blocks.append("\n".join([*block, "  }"]))
    return [f"{field} [", ",\n".join(blocks), "]"]


def _parameters(values: Mapping[str, str]) -> list[str]:
    if not values:
        return []
    entries = [
        f"  {{\n    key: {_quote(key)}\n    value: {{ string_value: {_quote(value)} }}\n  }}"
        for key, value in values.items()
    ]
    return ["parameters [", ",\n".join(entries), "]"]


def _quote(text: str) -> str:
    # JSON string escapes are a subset of protobuf text-format escapes for printable text.
    return json.dumps(text)
