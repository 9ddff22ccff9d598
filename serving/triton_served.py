"""What a Triton server says about one model, read and checked against its feature spec.

:func:`served_model` turns the answers of ``get_model_metadata`` (tensor names, data types,
shapes, the versions ready) and ``get_model_config`` (``max_batch_size`` and, per version, the
``bsym_*`` metadata that :mod:`bsym.export.triton` serves as ``parameters``) into a
:class:`ServedModel`, refusing a model whose feature spec does not make exactly the tensors
the server takes, so files are never scored with a spec that does not belong to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bsym.contract import (
    CONSTITUENTS,
    FEATURE_SPEC_KEY,
    MASK,
    SCORE,
    SPEC_VERSION_KEY,
    checksum_key,
    metadata_key,
)
from bsym.errors import ServerError, SpecMismatchError, did_you_mean
from bsym.export.triton.common import TRITON_DTYPES
from bsym.features import FEATURE_SPEC_VERSION, FeatureSpec
from bsym.serving.backend import TensorSpec, model_identity, shape_accepts, spec_tensors

DTYPES: dict[str, np.dtype[np.generic]] = {
    triton: np.dtype(name) for name, triton in TRITON_DTYPES.items()
}
"""Triton data type (gRPC spelling) -> numpy dtype."""
TRITON_TYPES: dict[np.dtype[np.generic], str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ServedModel:
    """One version of a model as the server serves it."""

    version: int
    max_batch_size: int
    metadata: dict[str, str]
    name: str
    """``bsym_model_name``: output branches are named after it."""
    spec: FeatureSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    """``score`` first."""


def served_model(
    model_metadata: Any, config: Any, *, model: str, url: str, version: int | None
) -> ServedModel:
    """The checked description of ``version`` (``None``: the highest ready) of ``model``."""
    ready = sorted(int(v) for v in model_metadata.versions if v.isdigit())
    if not ready:
        raise ServerError(f"model '{model}' on the Triton server at {url} has no version ready")
    version = version if version is not None else ready[-1]
    where = f"model '{model}' version {version} on the Triton server at {url}"
    max_batch_size = int(config.max_batch_size)
    if max_batch_size <= 0:
        raise SpecMismatchError(
            f"{where}: expected a batching model (max_batch_size > 0), found "
            f"max_batch_size {config.max_batch_size}"
        )
    metadata = _served_metadata(config, version, where)
    name, spec = model_identity(metadata, where)
    _check_spec_version(metadata, spec, where)
    inputs = tuple(_tensor(entry, "input", where) for entry in model_metadata.inputs)
    outputs = [_tensor(entry, "output", where) for entry in model_metadata.outputs]
    if SCORE not in {tensor.name for tensor in outputs}:
        found = [tensor.name for tensor in outputs]
        raise SpecMismatchError(
            f"{where}: expected an output '{SCORE}', found {found}{did_you_mean(SCORE, found)}"
        )
    _check_inputs_against_spec(inputs, spec, where)
    return ServedModel(
        version=version,
        max_batch_size=max_batch_size,
        metadata=metadata,
        name=name,
        spec=spec,
        inputs=inputs,
        outputs=tuple(sorted(outputs, key=lambda tensor: tensor.name != SCORE)),
    )


# The served version's model.onnx sha256 (from the config's checksum parameter) in metadata.
SERVED_SHA256_KEY = "model_sha256"


def _served_metadata(config: Any, version: int, where: str) -> dict[str, str]:
    prefix = metadata_key(version, "")
    served = {
        key.removeprefix(prefix): parameter.string_value
        for key, parameter in config.parameters.items()
        if key.startswith(prefix)
    }
    checksum = config.parameters.get(checksum_key(version))
    if checksum is not None:
        served[SERVED_SHA256_KEY] = checksum.string_value
    if FEATURE_SPEC_KEY not in served:
        raise SpecMismatchError(
            f"{where} serves no feature spec: its config has no parameter "
            f"'{metadata_key(version, FEATURE_SPEC_KEY)}', so bsym cannot tell which branches "
            "it reads; write the repository with this bsym's 'bsym export' (or serve it with "
            "'bsym serve')"
        )
    return served


def _check_spec_version(metadata: dict[str, str], spec: FeatureSpec, where: str) -> None:
    served = metadata.get(SPEC_VERSION_KEY, str(spec.version))
    if served != str(spec.version) or spec.version > FEATURE_SPEC_VERSION:
        raise SpecMismatchError(
            f"{where}: feature spec version {served} (spec says {spec.version}); this bsym "
            f"reads versions up to {FEATURE_SPEC_VERSION}, upgrade bsym on the client"
        )


def _tensor(entry: Any, kind: str, where: str) -> TensorSpec:
    dtype = DTYPES.get(entry.datatype)
    if dtype is None:
        raise SpecMismatchError(
            f"{where}: {kind} '{entry.name}' has data type {entry.datatype}, which bsym does "
            f"not handle (expected one of {sorted(DTYPES)})"
        )
    shape = tuple(int(dim) for dim in entry.shape)
    free = 2 if kind == "input" and entry.name in (CONSTITUENTS, MASK) else 1
    if not shape or shape[0] != -1 or any(dim < 0 for dim in shape[free:]):
        raise SpecMismatchError(
            f"{where}: {kind} '{entry.name}' has shape {list(shape)}; expected a variable batch "
            "axis (-1) first and fixed dimensions after it"
            + (" (the constituent axis may be variable too)" if free == 2 else "")
        )
    return TensorSpec(entry.name, dtype, tuple(None if dim < 0 else dim for dim in shape))


def _check_inputs_against_spec(
    inputs: tuple[TensorSpec, ...], spec: FeatureSpec, where: str
) -> None:
    made = spec_tensors(spec)
    for served in inputs:
        expected = made.get(served.name)
        if expected is None:
            raise SpecMismatchError(
                f"{where} takes input '{served.name}', which its feature spec does not make "
                f"(it makes {', '.join(map(repr, made)) or 'nothing'})"
            )
        if expected.dtype != served.dtype or not shape_accepts(served.shape, expected.shape):
            raise SpecMismatchError(
                f"{where}: input '{served.name}' is {served.describe()} on the server but its "
                f"feature spec makes {expected.describe()}"
            )
