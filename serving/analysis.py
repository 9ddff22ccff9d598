"""Scoring from analysis code: one call turns a chunk of events into scores from Triton.

```python
from bsym.serving import TritonModel

model = TritonModel("localhost:8001", "isolation_pfn")
for events in uproot.iterate("nano_*.root:Events", model.branches("event")):
    scores = model(events)        # jagged like events' muons: ak.num(scores) == events.nMuon
```

The chunk may be an awkward record array or a dict of arrays, as uproot reads them (flat
branch names, ``Muon_pt``, ``nMuon``) or as coffea's NanoEvents presents them (collections,
``events.Muon.pt``), in either layout of :mod:`bsym.features`: one entry per object (scores
come back as a numpy array, one row per entry) or one entry per event (scores come back as an
awkward array aligned with the object collection). The tensors are built by
:func:`bsym.features.build_features` from the feature spec the server serves for the model,
exactly as ``bsym score`` builds them.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any, TypeAlias

import awkward as ak
import numpy as np
import numpy.typing as npt

from bsym.errors import BsymError, SpecMismatchError, did_you_mean
from bsym.features import FeatureSpec, Layout, build_features, required_branches
from bsym.input_ranges import THRESHOLDS, InputCounts, count_inputs, describe
from bsym.serving.backend import Tensor
from bsym.serving.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_RETRY_TIMEOUT,
    DEFAULT_TIMEOUT,
)
from bsym.serving.triton_client import RetryPolicy, TritonBackend

Scores: TypeAlias = npt.NDArray[Any] | ak.Array


class InputRangeWarning(UserWarning):
    """Inputs outside the training range of the model (see :mod:`bsym.input_ranges`)."""


class TritonModel:
    """A model on a Triton server, called on chunks of events; connects on first use.

    The object pickles without its connection (each process of a coffea executor opens its
    own) and can be used as a context manager to close the connection.

    Every call counts the inputs against the training ranges in the model's feature spec;
    :meth:`input_report` gives the counts so far, and an :class:`InputRangeWarning` is issued
    once per feature when it is flagged.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        version: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        timeout: float = DEFAULT_TIMEOUT,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        self.url = url
        self.model = model
        self.version = version
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self._backend: TritonBackend | None = None
        self._lock = threading.Lock()
        self._counts: InputCounts | None = None
        self._warned: set[str] = set()

    @property
    def backend(self) -> TritonBackend:
        """The connection to the server, opened (and the model checked) on first use."""
        with self._lock:
            if self._backend is None:
                self._backend = TritonBackend(
                    self.url,
                    self.model,
                    version=self.version,
                    batch_size=self.batch_size,
                    max_in_flight=self.max_in_flight,
                    timeout=self.timeout,
                    retry=RetryPolicy(total=self.retry_timeout),
                )
            return self._backend

    @property
    def feature_spec(self) -> FeatureSpec:
        """The feature spec the server serves for the model."""
        return self.backend.feature_spec

    @property
    def name(self) -> str:
        """The model's name in output branches (``bsym_model_name``)."""
        return self.backend.name

    def branches(self, layout: Layout = "event") -> list[str]:
        """The branches to read for ``layout``, e.g. as uproot's ``expressions`` argument."""
        return required_branches(self.feature_spec, layout, with_label=False)

    def __call__(self, events: Any, *, output: str = "score") -> Scores:
        """Scores of ``output`` for every object of ``events``, aligned with the input.

        A single-class ``score`` comes as one value per object; otherwise one row per object.
        """
        outputs = self.predict(events)
        if output not in outputs:
            raise SpecMismatchError(
                f"model '{self.model}' has no output '{output}'{did_you_mean(output, outputs)}; "
                f"it has {', '.join(map(repr, outputs))}"
            )
        return outputs[output]

    def predict(self, events: Any) -> dict[str, Scores]:
        """Every model output for ``events`` (see :meth:`__call__`)."""
        spec = self.feature_spec
        arrays, layout = branch_arrays(events, spec)
        batch = build_features(arrays, spec, layout)
        self._count(spec, batch)
        tensors = batch.inputs()
        backend = self.backend
        outputs = backend.predict({name: tensors[name] for name in backend.input_names})
        return {name: _aligned(value, batch.counts) for name, value in outputs.items()}

    def input_report(self) -> dict[str, Any]:
        """Per feature, the inputs of every call so far against the training range (the
        ``overall`` entry of ``bsym score``'s report); empty for a model without ranges."""
        with self._lock:
            counts = {} if self._counts is None else self._counts.to_dict()
        return {"model": self.model, "thresholds": THRESHOLDS, "features": counts}

    def _count(self, spec: FeatureSpec, batch: Any) -> None:
        if spec.input_ranges is None:
            if "" not in self._warned:
                self._warned.add("")
                warnings.warn(
                    f"model '{self.model}' records no input ranges (exported before bsym "
                    "recorded them); its inputs are not checked against the training range",
                    InputRangeWarning,
                    stacklevel=3,
                )
            return
        with self._lock:
            if self._counts is None:
                self._counts = InputCounts.of(spec.input_ranges)
            count_inputs(self._counts, spec, batch)
            fresh = [f for f in self._counts.flagged() if f.range.name not in self._warned]
            self._warned.update(f.range.name for f in fresh)
        for feature in fresh:
            warnings.warn(
                f"model '{self.model}': {describe(feature)}", InputRangeWarning, stacklevel=3
            )

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> TritonModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        version = "latest" if self.version is None else self.version
        return f"TritonModel({self.url!r}, {self.model!r}, version={version})"


def _aligned(value: Tensor, counts: npt.NDArray[np.int64] | None) -> Scores:
    """One value per object for single-column outputs; jagged by ``counts`` in event layout."""
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if counts is None:
        return value
    return ak.unflatten(value, counts)


def branch_arrays(events: Any, spec: FeatureSpec, lib: ModuleType = ak) -> tuple[Any, Layout]:
    """The branches ``spec`` reads, by their flat names, from uproot- or coffea-style events;
    ``lib=dask_awkward`` takes dask collections and returns one."""
    if lib is ak and hasattr(events, "dask") and hasattr(events, "npartitions"):
        raise BsymError(
            "TritonModel scores eager arrays, not dask collections; call it inside "
            "dask_awkward.map_partitions, or read the events eagerly (coffea: mode='eager')"
        )
    if not (isinstance(events, Mapping) or _is_array(events)) or (
        _is_array(events) and not events.fields
    ):
        raise BsymError(
            f"TritonModel takes an awkward record array or a dict of arrays, got "
            f"{type(events).__name__}"
        )
    fields = list(events.keys() if isinstance(events, Mapping) else events.fields)
    has_count = spec.count_branch in fields or _collection(events, fields, spec.objects)
    layout: Layout = "event" if has_count else "object"
    columns = {}
    for name in required_branches(spec, layout, with_label=False):
        columns[name] = _branch(events, fields, name, spec, lib)
    return lib.zip(columns, depth_limit=1), layout


def _is_array(value: Any) -> bool:
    """An awkward array, or a dask-awkward collection of them."""
    return isinstance(value, ak.Array) or type(value).__module__.startswith("dask_awkward")


def _jagged_if_object(value: Any) -> Any:
    """uproot's ``library="np"`` gives jagged branches as object arrays of arrays."""
    if not isinstance(value, np.ndarray) or value.dtype != np.object_:
        return value
    counts = np.fromiter((len(item) for item in value), dtype=np.int64, count=len(value))
    flat = np.concatenate(list(value)) if len(value) else np.empty(0)
    return ak.unflatten(flat, counts)


def _collection(events: Any, fields: list[str], name: str) -> bool:
    """Whether ``events`` holds ``name`` as a jagged collection of records (NanoEvents)."""
    if name not in fields:
        return False
    value = events[name]
    return _is_array(value) and value.ndim == 2 and bool(value.fields)


def _branch(events: Any, fields: list[str], name: str, spec: FeatureSpec, lib: ModuleType) -> Any:
    if name in fields:
        return _jagged_if_object(events[name])
    if name == spec.count_branch and _collection(events, fields, spec.objects):
        return lib.num(events[spec.objects], axis=1)
    collection, _, field = name.partition("_")
    if field and collection in fields:
        nested = events[collection]
        if _is_array(nested) and field in nested.fields:
            return nested[field]
    available = fields + [
        f"{collection}_{inner}"
        for collection in fields
        if _is_array(events[collection])
        for inner in events[collection].fields
    ]
    raise SpecMismatchError(
        f"the events have no branch '{name}', which the model's feature spec reads"
        f"{did_you_mean(name, available)} (found {len(available)} fields: "
        f"{', '.join(available[:12])}{', ...' if len(available) > 12 else ''})"
    )
