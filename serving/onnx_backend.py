"""The embedded backend: run ``model.onnx`` in-process with ONNX Runtime."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bsym.devices import parse_device
from bsym.errors import DeviceError, InputFileError, ServerError, SpecMismatchError
from bsym.features import FeatureSpec
from bsym.serving.backend import (
    Tensor,
    TensorSpec,
    check_inputs,
    check_slots,
    model_identity,
)
from bsym.serving.defaults import DEFAULT_BATCH_SIZE
from bsym.serving.providers import check_session_providers, execution_providers

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxRuntimeBackend:
    """A :class:`~bsym.serving.backend.Backend` over an ONNX Runtime inference session.

    Large inputs are run in batches of ``batch_size`` rows, so a chunk of a ROOT file of any
    size never makes ONNX Runtime allocate activations for all of it at once. ``device``
    (``cpu``, ``cuda``, ``cuda:N``) chooses the execution providers unless ``providers`` are
    given; a session that does not run the device's provider is refused (DeviceError).

    On the CPU, :meth:`sharing_cores` lets the caller's own busy thread (the scorer's reader)
    have a core while it works, instead of time-slicing with ONNX Runtime's threads.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str = "cpu",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = Path(model_path)
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: no such model file")
        device = str(parse_device(device))
        self._providers = list(providers) if providers else execution_providers(device)
        self.device = device
        self.threads = threads
        self._session: Any = self._open_session(threads)
        if not providers:
            check_session_providers(self._session.get_providers(), device, str(self.path))
        self._narrow_session: Any = None
        self._narrow_lock = threading.Lock()
        self._busy: Callable[[], bool] | None = None
        self._metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        self._name, self._spec = model_identity(self._metadata, str(self.path))
        self._inputs = [_tensor_spec(node) for node in self._session.get_inputs()]
        outputs = [node.name for node in self._session.get_outputs()]
        if "score" not in outputs:
            raise SpecMismatchError(
                f"{self.path}: model '{self._name}' has no output tensor 'score' "
                f"(outputs: {', '.join(map(repr, outputs))})"
            )
        self._outputs = ("score", *(name for name in outputs if name != "score"))
        self.batch_size = batch_size

    def _open_session(self, threads: int | None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads spin by default, stealing the cores that read and build the
        # next chunk while this one runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(
                str(self.path), sess_options=options, providers=self._providers
            )
        except Exception as error:  # onnxruntime raises its own pybind exception types
            on = "" if self.device == "cpu" else f" on device '{self.device}'"
            raise (InputFileError if self.device == "cpu" else DeviceError)(
                f"{self.path}: ONNX Runtime cannot load the model{on} ({error})"
            ) from error

    @contextmanager
    def sharing_cores(self, busy: Callable[[], bool]) -> Iterator[None]:
        """Within the block, a batch that starts while ``busy()`` is true runs on one thread
        fewer than the session has, leaving that core to the caller's busy thread.

        Three threads time-slicing two cores slow every ONNX Runtime operator to its
        slowest thread; this keeps the threads at work within the cores there are. It
        changes nothing on a GPU or for a session of one thread.
        """
        cores = self.threads or _default_threads()
        on_cpu = self._session.get_providers()[0] == "CPUExecutionProvider"
        if not on_cpu or cores < 2:
            yield
            return
        with self._narrow_lock:
            if self._narrow_session is None:
                self._narrow_session = self._open_session(cores - 1)
        self._busy = busy
        try:
            yield
        finally:
            self._busy = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def feature_spec(self) -> FeatureSpec:
        return self._spec

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self._inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._inputs)

    def predict(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        rows = check_inputs(self._name, self._inputs, inputs)
        check_slots(self._name, self._spec, inputs)
        parts: list[list[Tensor]] = [[] for _ in self._outputs]
        for start in range(0, max(rows, 1), self.batch_size):
            feed = {name: array[start : start + self.batch_size] for name, array in inputs.items()}
            busy = self._busy  # read once: another thread may leave its block meanwhile
            session = self._narrow_session if busy is not None and busy() else self._session
            try:
                results = session.run(list(self._outputs), feed)
            except Exception as error:
                raise ServerError(
                    f"ONNX Runtime failed running model '{self._name}' on rows "
                    f"{start}..{min(start + self.batch_size, rows)}: {error}"
                ) from error
            for part, result in zip(parts, results, strict=True):
                part.append(np.asarray(result))
        return {
            name: part[0] if len(part) == 1 else np.concatenate(part)
            for name, part in zip(self._outputs, parts, strict=True)
        }

    def close(self) -> None:
        self._session = self._narrow_session = None

    def __enter__(self) -> OnnxRuntimeBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _default_threads() -> int:
    """The threads ONNX Runtime's default session runs: one per physical core, here capped by
    the CPUs this process may use (a batch slot's cpuset), which ONNX Runtime ignores."""
    physical = psutil.cpu_count(logical=False) or 1
    return max(1, min(physical, len(os.sched_getaffinity(0))))


def _tensor_spec(node: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise SpecMismatchError(f"model input '{node.name}' has unsupported type {node.type}")
    shape = tuple(dim if isinstance(dim, int) else None for dim in node.shape)
    return TensorSpec(node.name, np.dtype(dtype), shape)
