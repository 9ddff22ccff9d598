"""Triton's vocabulary as bsym uses it: config flavours, data types, defaults.

Imports only the standard library, so the CLI can show these choices and defaults without
loading onnx or pydantic.
"""

from __future__ import annotations

from enum import Enum


class Flavour(str, Enum):
    """Which Triton config to write beside the model."""

    production = "production"
    """Triton's ONNX Runtime backend on GPUs (``KIND_GPU``)."""
    cpu = "cpu"
    """The Python backend running the same ``model.onnx`` on ``KIND_CPU`` instances."""
    gpu = "gpu"
    """The Python backend on ``KIND_GPU`` instances, running ONNX Runtime's CUDA provider
    (for nvidia-pytriton's ``tritonserver`` on a GPU host, which lacks the ONNX Runtime
    backend)."""

    @property
    def python_backend(self) -> bool:
        """Served by the Python backend, with ``model.py`` beside each ``model.onnx``."""
        return self is not Flavour.production


TRITON_DTYPES: dict[str, str] = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
}
"""numpy dtype name -> Triton data type as the gRPC API spells it (``config.pbtxt`` adds
``TYPE_``)."""

DEFAULT_MAX_BATCH_SIZE = 4096
DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS = 500
DEFAULT_CPU_INSTANCES = 2
DEFAULT_GPU_INSTANCES = 1


def config_type(dtype: str) -> str:
    """The ``config.pbtxt`` data type (``TYPE_FP32``) of a numpy dtype name (``float32``)."""
    return "TYPE_" + TRITON_DTYPES[dtype]
