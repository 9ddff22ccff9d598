"""The Triton backend: send the scorer's tensors to a Triton server over gRPC.

:class:`TritonBackend` implements :class:`~bsym.serving.backend.Backend`, so ``bsym score
--server`` and :class:`~bsym.serving.analysis.TritonModel` run the same code as the embedded
ONNX Runtime backend up to the model call. On connecting it reads, with retries while the
server is unavailable, the model metadata and config, and checks them against the served
feature spec (:func:`~bsym.serving.triton_served.served_model`). It then pins the version,
so a new version loaded during a run cannot mix two models in one output.

Requests go through ``tritonclient.grpc.aio`` on a loop in a background thread: several are
in flight at once (threaded ``async_infer`` callbacks were seen never to fire here). Each
holds at most ``batch_size`` rows, never more than the model's ``max_batch_size`` or what
fits in one gRPC message. Constituents shorter than the model's fixed length are padded
(masked out), because Triton's dynamic batcher merges only requests of identical shape; for
a model with a dynamic constituent axis they are padded only to the next multiple of
:data:`bsym.features.SLOT_QUANTUM` slots, so requests of similar rows still share a shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from bsym.errors import ServerError, SpecMismatchError, did_you_mean
from bsym.extras import require
from bsym.features import FeatureSpec, request_width
from bsym.serving.aio_thread import LoopThread
from bsym.serving.backend import Tensor, TensorSpec, check_inputs, check_slots
from bsym.serving.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_RETRY_TIMEOUT,
    DEFAULT_TIMEOUT,
)
from bsym.serving.triton_served import TRITON_TYPES, served_model

if TYPE_CHECKING:
    from tritonclient.grpc.aio import InferenceServerClient

T = TypeVar("T")

MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC message limit of Triton's server and of tritonclient (INT32_MAX)."""
_HEADROOM = 64 * 1024  # request framing, names and shapes beside the raw tensor bytes
_UNAVAILABLE = "StatusCode.UNAVAILABLE"
_NOT_FOUND = "StatusCode.NOT_FOUND"
_DEADLINE = "StatusCode.DEADLINE_EXCEEDED"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries while the server is unavailable: exponential backoff within a total time.

    The time counts from the first failure of an outage and is shared by every request, so a
    dead server costs ``total`` seconds once, not once per request; later requests try once
    and fail at once until one succeeds.
    """

    total: float = DEFAULT_RETRY_TIMEOUT
    first_delay: float = 0.1
    max_delay: float = 2.0


def normalise_url(url: str) -> str:
    """``host:port`` as tritonclient.grpc wants it; a ``grpc://`` prefix is dropped."""
    address = url.removeprefix("grpc://")
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not host or not port.isdigit():
        raise ServerError(
            f"'{url}' is not a Triton gRPC address; expected HOST:PORT, e.g. localhost:8001"
        )
    return address


class TritonBackend:
    """A :class:`~bsym.serving.backend.Backend` for one model on a Triton server (gRPC).

    ``version=None`` takes the highest version the server has ready and keeps it for the
    backend's life. ``timeout`` bounds each request; ``retry`` governs waiting for a server
    that is unavailable (down, restarting). ``max_message_bytes`` is the gRPC message size
    the requests are kept under (the server and tritonclient accept 2 GiB; a proxy may not).
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
        retry: RetryPolicy | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if batch_size <= 0 or max_in_flight <= 0 or timeout <= 0:
            raise ValueError(
                f"batch_size ({batch_size}), max_in_flight ({max_in_flight}) and timeout "
                f"({timeout}) must be positive"
            )
        if not 0 < max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must lie in [1, {MAX_MESSAGE_BYTES}]")
        purpose = f"scoring with model '{model}' on a Triton server"
        grpc = require("tritonclient.grpc", "triton", purpose=purpose)
        self._server_error = grpc.InferenceServerException
        self.url = normalise_url(url)
        self.model = model
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self._down_since: float | None = None
        self._loop = LoopThread(name=f"bsym-triton-{model}")
        self._client: InferenceServerClient | None = None
        try:
            self._client = self._loop.run(self._connect())
            self._loop.run(self._describe(version))
        except BaseException:
            self.close()
            raise

    # -- the Backend protocol -------------------------------------------------------------

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
        return tuple(spec.name for spec in self._outputs)

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def version(self) -> int:
        """The model version every request of this backend goes to."""
        return self._version

    @property
    def max_batch_size(self) -> int:
        """The largest request the server's config accepts, in rows."""
        return self._max_batch_size

    def predict(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run the model on the server: split into requests, several in flight, in order."""
        self._require_client()
        inputs = self._pad(inputs)
        try:
            rows = check_inputs(self.model, self._inputs, inputs)
            check_slots(self.model, self._spec, inputs)
        except SpecMismatchError as error:
            raise SpecMismatchError(
                f"{error} (version {self._version} on the Triton server at {self.url})"
            ) from error
        if rows == 0:
            return {
                spec.name: np.empty((0, *(d or 0 for d in spec.shape[1:])), dtype=spec.dtype)
                for spec in self._outputs
            }
        step = self.rows_per_request(inputs)
        bounds = [(start, min(start + step, rows)) for start in range(0, rows, step)]
        parts = self._loop.run(self._infer_all(inputs, bounds))
        return {
            spec.name: np.concatenate([part[spec.name] for part in parts])
            if len(parts) > 1
            else parts[0][spec.name]
            for spec in self._outputs
        }

    def close(self) -> None:
        """Close the gRPC channel and stop the loop thread; idempotent."""
        client, self._client = self._client, None
        if client is not None and self._loop.running:
            # a channel that fails to close cleanly is closed anyway
            with contextlib.suppress(Exception):
                self._loop.run(client.close())
        self._loop.close()

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- connecting ------------------------------------------------------------------------

    async def _connect(self) -> InferenceServerClient:
        from tritonclient.grpc.aio import InferenceServerClient

        return InferenceServerClient(
            self.url,
            channel_args=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # gRPC backs reconnection off up to 2 minutes by default: a restarted server
                # would stay unused long after it came back.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )

    @property
    def _where(self) -> str:
        version = getattr(self, "_version", None)
        at = f"' version {version}" if version is not None else "'"
        return f"model '{self.model}{at} on the Triton server at {self.url}"

    async def _describe(self, version: int | None) -> None:
        client = self._require_client()
        wanted = "" if version is None else str(version)
        try:
            metadata = await self._retrying(
                lambda: client.get_model_metadata(self.model, wanted, client_timeout=self.timeout),
                "reading the model metadata",
            )
            config = (
                await self._retrying(
                    lambda: client.get_model_config(
                        self.model, wanted, client_timeout=self.timeout
                    ),
                    "reading the model config",
                )
            ).config
        except self._server_error as error:
            if error.status() == _NOT_FOUND:
                raise await self._not_found(client, version) from error
            raise self._refused(error, "reading the model metadata") from error
        served = served_model(metadata, config, model=self.model, url=self.url, version=version)
        self._version = served.version
        self._max_batch_size = served.max_batch_size
        self._metadata = served.metadata
        self._name, self._spec = served.name, served.spec
        self._inputs, self._outputs = served.inputs, served.outputs

    async def _not_found(self, client: InferenceServerClient, version: int | None) -> ServerError:
        index = await client.get_model_repository_index(client_timeout=self.timeout)
        ready: dict[str, list[str]] = {}
        for entry in index.models:
            versions = ready.setdefault(entry.name, [])
            if entry.state == "READY" and entry.version:
                versions.append(entry.version)
        if self.model in ready:
            return ServerError(
                f"the Triton server at {self.url} has no version {version} of model "
                f"'{self.model}'; versions ready: {sorted(ready[self.model], key=int) or 'none'}"
            )
        return ServerError(
            f"the Triton server at {self.url} has no model '{self.model}' (it serves "
            f"{sorted(ready) or 'no model'}){did_you_mean(self.model, ready)}"
        )

    # -- inference -------------------------------------------------------------------------

    def rows_per_request(self, inputs: Mapping[str, Tensor]) -> int:
        """Rows per request: ``batch_size``, within ``max_batch_size`` and the message limit."""
        in_bytes = sum(array.itemsize * int(np.prod(array.shape[1:])) for array in inputs.values())
        out_bytes = sum(
            spec.dtype.itemsize * int(np.prod([d or 1 for d in spec.shape[1:]]))
            for spec in self._outputs
        )
        fitting = (self.max_message_bytes - _HEADROOM) // max(in_bytes, out_bytes, 1)
        if fitting < 1:
            raise SpecMismatchError(
                f"{self._where}: one row takes {max(in_bytes, out_bytes):,} bytes, more than "
                f"the gRPC message limit of {self.max_message_bytes:,} bytes"
            )
        return min(self.batch_size, self._max_batch_size, fitting)

    def _pad(self, inputs: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Pad ``constituents`` and ``mask`` with masked-out slots up to the model's length,
        or for a model with a dynamic constituent axis up to :func:`request_width`."""
        specs = {spec.name: spec for spec in self._inputs}
        constituents, mask = inputs.get("constituents"), inputs.get("mask")
        if "constituents" not in specs or constituents is None or mask is None:
            return inputs
        if constituents.ndim != 3 or mask.ndim != 2:
            return inputs
        length = specs["constituents"].shape[1]
        if length is None and self._spec.constituents is not None:
            length = request_width(constituents.shape[1], self._spec.constituents.max_count)
        if length is None:
            return inputs
        short = length - constituents.shape[1]
        if short <= 0 or mask.shape[1] != constituents.shape[1]:
            return inputs  # too long or inconsistent: check_inputs names the problem
        return {
            **inputs,
            "constituents": np.pad(constituents, ((0, 0), (0, short), (0, 0))),
            "mask": np.pad(mask, ((0, 0), (0, short)), constant_values=False),
        }

    async def _infer_all(
        self, inputs: Mapping[str, Tensor], bounds: Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(start: int, stop: int) -> dict[str, Tensor]:
            async with gate:
                return await self._infer(inputs, start, stop)

        tasks = [asyncio.ensure_future(one(start, stop)) for start, stop in bounds]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:  # after a failure (or our own cancellation) the rest is moot
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]

    async def _infer(
        self, inputs: Mapping[str, Tensor], start: int, stop: int
    ) -> dict[str, Tensor]:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        client = self._require_client()
        tensors = []
        for spec in self._inputs:
            array = np.ascontiguousarray(inputs[spec.name][start:stop])
            tensor = InferInput(spec.name, list(array.shape), TRITON_TYPES[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        outputs = [InferRequestedOutput(spec.name) for spec in self._outputs]
        what = f"rows {start}..{stop - 1}"
        try:
            result = await self._retrying(
                lambda: client.infer(
                    self.model,
                    tensors,
                    model_version=str(self._version),
                    outputs=outputs,
                    client_timeout=self.timeout,
                ),
                what,
            )
        except self._server_error as error:
            raise self._refused(error, what) from error
        answers: dict[str, Tensor] = {}
        for spec in self._outputs:
            value = result.as_numpy(spec.name)
            expected = (stop - start, *spec.shape[1:])
            if value is None or value.shape != expected:
                found = "nothing" if value is None else list(value.shape)
                raise ServerError(
                    f"{self._where} answered {what} with output '{spec.name}' of shape "
                    f"{found}, expected {list(expected)}"
                )
            answers[spec.name] = value
        return answers

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        delay = self.retry.first_delay
        while True:
            try:
                result = await call()
            except self._server_error as error:
                if error.status() != _UNAVAILABLE:
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                left = self._down_since + self.retry.total - now
                if left <= 0:
                    raise ServerError(
                        f"the Triton server at {self.url} is unavailable ({what} for model "
                        f"'{self.model}'): no answer for {now - self._down_since:.1f} s, past "
                        f"the retry time of {self.retry.total:g} s; last error: "
                        f"{error.message()}"
                    ) from error
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, self.retry.max_delay)
            else:
                self._down_since = None
                return result

    def _refused(self, error: Any, what: str) -> ServerError:
        if error.status() == _DEADLINE:
            return ServerError(
                f"{self._where} did not answer {what} within {self.timeout:g} s (timeout)"
            )
        return ServerError(f"{self._where} refused {what}: {error.message()}")

    def _require_client(self) -> InferenceServerClient:
        if self._client is None:
            raise ServerError(f"the connection to {self.url} for model '{self.model}' is closed")
        return self._client
