"""Triton Python-backend model that serves ``model.onnx`` with ONNX Runtime.

Copied by :func:`bsym.export.triton.repository.write_model_repository` into each version
directory of a ``cpu``- or ``gpu``-flavour model. A ``KIND_CPU`` instance runs ONNX Runtime's
CPU provider with one thread; a ``KIND_GPU`` instance runs its CUDA provider on the GPU
Triton gave it (onnxruntime-gpu in the stub's environment), and refuses to load rather than
fall back to the CPU. It runs inside Triton's ``triton_python_backend_stub``, so
it imports nothing from ``bsym``: only the standard library, numpy (< 2, which the stub needs)
and onnxruntime. It keeps its own copy of the contract it needs (:data:`MODEL_FILENAME`,
:data:`CHECKSUM_PREFIX`, :data:`REJECT_NONFINITE_KEY`, :func:`checksum_key`, :func:`sha256_of`);
``tests/core/test_contract.py`` asserts that copy equals :mod:`bsym.contract`. The pure helpers
also import outside the stub, for tests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the stub: only the pure helpers are usable
    pb_utils = None

Array = npt.NDArray[Any]

MODEL_FILENAME = "model.onnx"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CHECKSUM_PREFIX = "sha256:"
REJECT_NONFINITE_KEY = "reject_nonfinite"
_HASH_CHUNK = 1 << 20


def checksum_key(version: int | str) -> str:
    """Name of the config ``parameters`` entry holding the sha256 of ``<version>/model.onnx``."""
    return f"{CHECKSUM_PREFIX}{version}/{MODEL_FILENAME}"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large models do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expected_checksum(model_config: Mapping[str, Any], model: str, version: str) -> str:
    """The sha256 the model config records for ``version``; raise if it records none."""
    key = checksum_key(version)
    parameters = model_config.get("parameters") or {}
    entry = parameters.get(key)
    value = entry.get("string_value") if isinstance(entry, Mapping) else None
    if not value:
        found = sorted(k for k in parameters if k.startswith(CHECKSUM_PREFIX)) or "none"
        raise ValueError(
            f"model '{model}' version {version}: config.pbtxt has no parameter '{key}' "
            f"with the sha256 of {MODEL_FILENAME} (checksum parameters found: {found}); "
            "regenerate the repository with bsym export"
        )
    return str(value)


def verify_checksum(path: Path, expected: str, *, model: str, version: str) -> None:
    """Refuse a ``model.onnx`` whose sha256 differs from the one its config records."""
    if not path.is_file():
        raise ValueError(f"model '{model}' version {version}: {path} does not exist")
    found = sha256_of(path)
    if found != expected.lower():
        raise ValueError(
            f"model '{model}' version {version}: sha256 of {path} is {found} but config.pbtxt "
            f"parameter '{checksum_key(version)}' expects {expected}; the file was changed "
            "after the repository was written, refusing to serve it"
        )


def rejects_nonfinite(model_config: Mapping[str, Any], model: str) -> bool:
    """The config's ``reject_nonfinite`` parameter; true where it has none."""
    entry = (model_config.get("parameters") or {}).get(REJECT_NONFINITE_KEY)
    value = entry.get("string_value") if isinstance(entry, Mapping) else "true"
    if value not in {"true", "false"}:
        raise ValueError(
            f"model '{model}': config.pbtxt parameter '{REJECT_NONFINITE_KEY}' must be "
            f'"true" or "false", found "{value}"'
        )
    return value == "true"


def nonfinite_problem(feeds: Mapping[str, Array]) -> str | None:
    """What is non-finite in one request's floating-point inputs, or None if nothing is."""
    problems = []
    for name, array in feeds.items():
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            nan = int(np.count_nonzero(np.isnan(array)))
            problems.append(
                f"input tensor '{name}' has {bad} non-finite values of {array.size} "
                f"({nan} NaN, {bad - nan} inf)"
            )
    if not problems:
        return None
    return (
        "; ".join(problems)
        + f"; refusing the request (set config.pbtxt parameter '{REJECT_NONFINITE_KEY}' to "
        '"false" to score such inputs)'
    )


def check_numpy() -> None:
    """The stub is built with an old pybind11: with numpy 2 it returns empty output tensors."""
    major = int(np.__version__.split(".", 1)[0])
    if major >= 2:
        raise RuntimeError(
            f"numpy {np.__version__} found in the Python backend environment; the Triton "
            "python backend stub needs numpy < 2 (with numpy 2 it returns empty outputs)"
        )


def run_batched(
    session: ort.InferenceSession,
    requests: Sequence[Mapping[str, Array]],
    output_names: Sequence[str],
) -> list[dict[str, Array]]:
    """Run several requests as few ONNX Runtime calls and split the outputs back per request.

    Requests whose tensors agree on every non-batch dimension are concatenated along axis 0
    into one call; a dynamic constituent axis can make them differ, one call per shape then.
    """
    answers: list[dict[str, Array]] = [{} for _ in requests]
    by_shape: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for index, request in enumerate(requests):
        shape = tuple(tuple(array.shape[1:]) for array in request.values())
        by_shape.setdefault(shape, []).append(index)
    for indices in by_shape.values():
        group = [requests[index] for index in indices]
        sizes = [len(next(iter(request.values()))) for request in group]
        if len(group) == 1:
            feeds = dict(group[0])
        else:
            feeds = {
                name: np.concatenate([request[name] for request in group], axis=0)
                for name in group[0]
            }
        outputs = session.run(list(output_names), feeds)
        bounds = np.cumsum([0, *sizes])
        for index, (start, stop) in zip(indices, itertools.pairwise(bounds), strict=True):
            answers[index] = {
                name: np.ascontiguousarray(value[start:stop])
                for name, value in zip(output_names, outputs, strict=True)
            }
    return answers


def session_providers(kind: str, device_id: int) -> list[Any]:
    """ONNX Runtime providers of a Triton instance kind (``CPU``, ``GPU``) and device id."""
    if kind == "GPU":
        return [(CUDA_PROVIDER, {"device_id": str(device_id)}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def check_gpu_session(providers: Sequence[str], available: Sequence[str], device_id: int) -> None:
    """Refuse a GPU instance whose session does not run the CUDA provider."""
    if CUDA_PROVIDER in providers:
        return
    if CUDA_PROVIDER not in available:
        reason = (
            f"the onnxruntime {ort.__version__} of the Python backend has no {CUDA_PROVIDER} "
            f"(it has {', '.join(available)}); install onnxruntime-gpu there"
        )
    else:
        reason = (
            f"ONNX Runtime could not start {CUDA_PROVIDER} on GPU {device_id} (the session "
            f"runs {', '.join(providers)}); check the CUDA and cuDNN libraries"
        )
    raise RuntimeError(f"KIND_GPU instance: {reason}; refusing to serve on the CPU")


def make_session(path: Path, kind: str = "CPU", device_id: int = 0) -> ort.InferenceSession:
    """A session with one thread each (Triton runs several instances side by side), on the
    CPU or, for a ``GPU`` instance, with the CUDA provider on GPU ``device_id``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=session_providers(kind, device_id))
    if kind == "GPU":
        check_gpu_session(session.get_providers(), ort.get_available_providers(), device_id)
    return session


class TritonPythonModel:
    """Entry point the Triton Python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        """Verify the checksum of ``model.onnx`` and open it; any exception refuses the load."""
        check_numpy()
        self._model = args["model_name"]
        version = args["model_version"]
        config: dict[str, Any] = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / version / MODEL_FILENAME
        verify_checksum(
            path,
            expected_checksum(config, self._model, version),
            model=self._model,
            version=version,
        )
        self._reject_nonfinite = rejects_nonfinite(config, self._model)
        self._session = make_session(
            path,
            args.get("model_instance_kind", "CPU"),
            int(args.get("model_instance_device_id", "0") or 0),
        )
        self._input_names = [node.name for node in self._session.get_inputs()]
        self._output_names = [node.name for node in self._session.get_outputs()]
        self._check_config(config, path)

    def _check_config(self, config: Mapping[str, Any], path: Path) -> None:
        """Refuse a config whose tensor names differ from the graph's."""
        for kind, graph_names in (("input", self._input_names), ("output", self._output_names)):
            config_names = sorted(entry["name"] for entry in config.get(kind, []))
            if config_names != sorted(graph_names):
                raise ValueError(
                    f"model '{self._model}': config.pbtxt {kind}s {config_names} differ from "
                    f"the {kind}s of {path}: {sorted(graph_names)}"
                )

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer a batch of requests with one ONNX Runtime call (one error response each on
        failure, so a bad request never takes the instance down)."""
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        feeds: list[dict[str, Array]] = []
        for index, request in enumerate(requests):
            tensors = {
                name: pb_utils.get_input_tensor_by_name(request, name) for name in self._input_names
            }
            missing = [name for name, tensor in tensors.items() if tensor is None]
            if missing:
                responses[index] = self._error(f"request lacks input tensors {missing}")
                continue
            feed = {name: tensor.as_numpy() for name, tensor in tensors.items()}
            problem = nonfinite_problem(feed) if self._reject_nonfinite else None
            if problem is not None:
                responses[index] = self._error(problem)
                continue
            good.append(index)
            feeds.append(feed)
        try:
            results = run_batched(self._session, feeds, self._output_names)
        except Exception as error:  # ONNX Runtime raises several unrelated types
            for index in good:
                responses[index] = self._error(f"ONNX Runtime failed: {error}")
            return responses
        for index, result in zip(good, results, strict=True):
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in result.items()]
            )
        return responses

    def _error(self, message: str) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"model '{self._model}': {message}")
        )

    def finalize(self) -> None:
        """Release the ONNX Runtime session."""
        del self._session
