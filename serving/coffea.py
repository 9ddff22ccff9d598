"""bsym models inside coffea processors, on coffea's own ``ml_tools`` machinery.

```python
from bsym.serving.coffea import OnnxModelWrapper, TritonModelWrapper

isolation = OnnxModelWrapper("model_repository", "isolation_reliso")   # embedded, in-process
# or: isolation = TritonModelWrapper("gpu-node.example.org:8001", "isolation_reliso")

def process(self, events):
    scores = isolation(events)        # jagged like events.Muon, in eager and in dask mode
```

Both are :class:`coffea.ml_tools.numpy_call_wrapper` subclasses: ``prepare_awkward`` builds
the model's input tensors from its feature spec with :func:`bsym.features.build_features`,
exactly as ``bsym score`` does, so the scores are the same; in dask mode coffea maps the call
over the partitions. The model (an ONNX Runtime session, or the connection to Triton) is opened
on first use, once per process, and shared by every copy of the wrapper there: a wrapper pickles
without it, and the copies an executor unpickles for each chunk do not load it again.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import awkward as ak

from bsym.contract import find_model
from bsym.errors import SpecMismatchError, did_you_mean
from bsym.extras import require
from bsym.features import FeatureSpec, Layout, build_features
from bsym.serving.analysis import TritonModel, branch_arrays
from bsym.serving.backend import Tensor, check_inputs
from bsym.serving.defaults import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from bsym.serving.onnx_backend import OnnxRuntimeBackend
    from bsym.serving.triton_client import TritonBackend

Backend: TypeAlias = "OnnxRuntimeBackend | TritonBackend"

_ml_tools = require("coffea.ml_tools", "coffea", purpose="bsym.serving.coffea")
_NumpyCallWrapper: Any = _ml_tools.numpy_call_wrapper

_backends: dict[Hashable, Backend] = {}
_backends_lock = threading.Lock()
_loads = 0


def model_loads() -> int:
    """How many models this process has loaded (sessions created, connections opened)."""
    return _loads


class _ModelWrapper(_NumpyCallWrapper):  # type: ignore[misc]
    """Scores of one output of a bsym model for the objects of NanoEvents-style events."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def _key(self) -> Hashable:
        raise NotImplementedError

    def _load(self) -> Backend:
        raise NotImplementedError

    @property
    def backend(self) -> Backend:
        """The model, loaded on first use in this process and shared by its copies there."""
        global _loads
        key = self._key()
        with _backends_lock:
            backend = _backends.get(key)
            if backend is None:
                backend = _backends[key] = self._load()
                _loads += 1
            return backend

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.backend.feature_spec

    def prepare_awkward(self, events: Any) -> tuple[tuple[()], dict[str, Any]]:
        """The model's input tensors for ``events``, one keyword argument per tensor."""
        backend = self.backend
        if self.output not in backend.output_names:
            raise SpecMismatchError(
                f"model '{backend.name}' has no output '{self.output}'"
                f"{did_you_mean(self.output, backend.output_names)}; it has "
                f"{', '.join(map(repr, backend.output_names))}"
            )
        lib = self.get_awkward_lib(events)
        columns, layout = branch_arrays(events, self.feature_spec, lib)
        if lib is ak:
            tensors = _tensors(columns, self.feature_spec, layout, backend.input_names)
        else:
            tensors = lib.map_partitions(
                _tensors,
                columns,
                self.feature_spec,
                layout,
                backend.input_names,
                label=f"bsym_features_{backend.name}",
            )
        return (), {name: tensors[name] for name in backend.input_names}

    def validate_numpy_input(self, **inputs: Tensor) -> None:
        backend = self.backend
        check_inputs(backend.name, backend.input_specs, inputs)

    def numpy_call(self, **inputs: Tensor) -> Tensor:
        value = self.backend.predict(inputs)[self.output]
        return value[:, 0] if value.ndim == 2 and value.shape[1] == 1 else value

    def postprocess_awkward(self, scores: Any, events: Any) -> Any:
        """One score per object, jagged like the objects of ``events`` (event layout)."""
        lib = self.get_awkward_lib(events)
        spec = self.feature_spec
        fields = events.fields
        if spec.objects in fields and events[spec.objects].ndim == 2:
            counts = lib.num(events[spec.objects], axis=1)
        elif spec.count_branch in fields:
            counts = events[spec.count_branch]
        else:
            return scores
        with warnings.catch_warnings():
            # dask-awkward cannot see that the scores' partitions come from the events' own
            warnings.filterwarnings("ignore", "Please ensure that", UserWarning)
            return lib.unflatten(scores, counts)


def _tensors(columns: ak.Array, spec: FeatureSpec, layout: Layout, names: tuple[str, ...]) -> Any:
    """The input tensors of one chunk as a record of regular arrays; dask-awkward's metadata
    pass gives a type tracer, which is built from a length-one stand-in."""
    tracer = ak.backend(columns) == "typetracer"
    if tracer:
        columns = ak.typetracer.length_one_if_typetracer(columns)
    tensors = build_features(columns, spec, layout).inputs()
    record = ak.zip({name: ak.from_numpy(tensors[name]) for name in names}, depth_limit=1)
    if tracer:
        return ak.Array(record.layout.to_typetracer(forget_length=True))
    return record


class OnnxModelWrapper(_ModelWrapper):
    """A model run in-process with ONNX Runtime: ``OnnxModelWrapper("path/model.onnx")`` or,
    from a model repository, ``OnnxModelWrapper(repository, name, version=None)``."""

    def __init__(
        self,
        model: str | Path,
        name: str | None = None,
        *,
        version: int | None = None,
        output: str = "score",
        threads: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str = "cpu",
    ) -> None:
        super().__init__(output)
        path = Path(model)
        self.path = (find_model(path, name, version) if name is not None else path).resolve()
        self.threads = threads
        self.batch_size = batch_size
        self.device = device

    def _key(self) -> Hashable:
        stat = self.path.stat()
        return (
            "onnx",
            str(self.path),
            stat.st_mtime_ns,
            self.threads,
            self.batch_size,
            self.device,
        )

    def _load(self) -> Backend:
        from bsym.serving.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            self.path, threads=self.threads, batch_size=self.batch_size, device=self.device
        )

    def __repr__(self) -> str:
        return f"OnnxModelWrapper({str(self.path)!r}, output={self.output!r})"


class TritonModelWrapper(_ModelWrapper):
    """A model on a Triton server (gRPC ``HOST:PORT``), through bsym's Triton client: the
    feature spec comes from the server, requests are batched and retried as ``bsym score
    --server`` does. ``options`` are :class:`~bsym.serving.TritonModel`'s (``batch_size``,
    ``max_in_flight``, ``timeout``, ``retry_timeout``)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: int | None = None,
        output: str = "score",
        **options: Any,
    ) -> None:
        super().__init__(output)
        self.client = TritonModel(url, model, version=version, **options)

    def _key(self) -> Hashable:
        client = self.client
        return (
            "triton",
            client.url,
            client.model,
            client.version,
            client.batch_size,
            client.max_in_flight,
            client.timeout,
            client.retry_timeout,
        )

    def _load(self) -> Backend:
        return self.client.backend

    def __repr__(self) -> str:
        return f"TritonModelWrapper({self.client!r}, output={self.output!r})"


__all__ = ["OnnxModelWrapper", "TritonModelWrapper", "model_loads"]
