"""``bsym score --dask``: the files of one scoring run spread over a Dask cluster.

The client plans the outputs as the serial run does and submits one task per file; each
worker process opens the model once (:func:`score_on_worker` caches it) with one ONNX Runtime
thread, or one connection to the Triton server, and writes each output atomically. A file is
the unit of work: one task writes one output, so a retried task can only replace the whole
output (``atomic_output``), never leave half of it. Worker loss is handled by the scheduler,
which runs the tasks of a dead worker elsewhere up to ``distributed.scheduler.allowed-failures``
times.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bsym.errors import MissingExtraError, ServerError
from bsym.rootio import TreeSource, remove_stale_partials
from bsym.serving.backend import Backend, probe_outputs
from bsym.serving.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IN_FLIGHT,
    DEFAULT_PADDING,
    DEFAULT_RETRY_TIMEOUT,
    DEFAULT_STEP_SIZE,
    DEFAULT_TIMEOUT,
    Padding,
)
from bsym.serving.scorer import (
    NOT_SCORED,
    FileOutcome,
    ScoreSummary,
    _Scorer,
    finish_summary,
    new_summary,
    plan_outputs,
)

if TYPE_CHECKING:
    from distributed import Client

LOCAL = "local"


@dataclass(frozen=True)
class BackendSettings:
    """How to open a model: a ``model.onnx`` here, or a model's name on a Triton server."""

    model: str
    server: str | None = None
    model_version: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None
    in_flight: int = DEFAULT_IN_FLIGHT
    timeout: float = DEFAULT_TIMEOUT
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    device: str = "cpu"
    """Where the embedded backend runs the model: ``cpu``, ``cuda`` or ``cuda:N``."""

    @contextmanager
    def open(self) -> Iterator[Backend]:
        """The embedded ONNX Runtime backend, or the Triton one with ``server``."""
        if self.server is None:
            from bsym.serving.onnx_backend import OnnxRuntimeBackend

            with OnnxRuntimeBackend(
                Path(self.model),
                threads=self.threads,
                batch_size=self.batch_size,
                device=self.device,
            ) as embedded:
                yield embedded
            return
        from bsym.serving.triton_client import RetryPolicy, TritonBackend

        with TritonBackend(
            self.server,
            self.model,
            version=self.model_version,
            batch_size=self.batch_size,
            max_in_flight=self.in_flight,
            timeout=self.timeout,
            retry=RetryPolicy(total=self.retry_timeout),
        ) as remote:
            yield remote


@dataclass(frozen=True)
class ScoreSettings:
    """Everything a worker needs to score a file as the client would; ``model_sha256`` keys
    the worker's model cache, so a model file replaced between runs is opened again."""

    backend: BackendSettings
    model_sha256: str
    step_size: int | str = DEFAULT_STEP_SIZE
    force: bool = False
    strict_inputs: bool = False
    padding: Padding = DEFAULT_PADDING
    f_c: float | None = None


# The scorer of this worker process; a task with other settings replaces it.
_cached: tuple[ScoreSettings, _Scorer, ExitStack] | None = None
_opened = 0


def models_opened() -> int:
    """How many times this process opened a model for its tasks."""
    return _opened


def worker_scorer(settings: ScoreSettings) -> _Scorer:
    """This process's scorer for ``settings``, opening the model on first use only."""
    global _cached, _opened
    if _cached is not None and _cached[0] == settings:
        return _cached[1]
    if _cached is not None:
        _cached[2].close()
        _cached = None
    stack = ExitStack()
    backend = stack.enter_context(settings.backend.open())
    try:
        scorer = _Scorer(
            backend,
            step_size=settings.step_size,
            force=settings.force,
            progress=False,
            strict=settings.strict_inputs,
            padding=settings.padding,
            f_c=settings.f_c,
        )
    except BaseException:
        stack.close()
        raise
    _cached = (settings, scorer, stack)
    _opened += 1
    return scorer


def score_on_worker(source: TreeSource, target: Path, settings: ScoreSettings) -> FileOutcome:
    """Score one file into ``target``: the task a Dask worker runs."""
    return worker_scorer(settings).outcome(source, target, "")


def parse_address(dask: str) -> tuple[str | None, int | None]:
    """(scheduler address, None) or (None, local worker count; None: one per CPU core)."""
    if dask == LOCAL:
        return None, None
    if dask.startswith(f"{LOCAL}:"):
        count = dask.removeprefix(f"{LOCAL}:")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"'{dask}': expected local:N with N a number of workers >= 1")
        return None, int(count)
    if "://" not in dask:
        raise ValueError(
            f"'{dask}': expected 'local', 'local:N' or a scheduler address like tcp://HOST:8786"
        )
    return dask, None


@contextmanager
def dask_client(dask: str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Iterator[Client]:
    """A client of a new LocalCluster of single-threaded worker processes (``local[:N]``),
    or of the scheduler at ``dask`` (``tcp://HOST:PORT``)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise MissingExtraError(
            "--dask needs dask.distributed: pip install 'bsym[dask]'"
        ) from error
    address, workers = parse_address(dask)
    if address is None:
        with (
            LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(address, timeout=connect_timeout)
    except OSError as error:
        raise ServerError(
            f"no Dask scheduler answered at {address} within {connect_timeout:g} s ({error})"
        ) from error
    with client:
        yield client


def score_files_distributed(
    inputs: list[str],
    backend: Backend,
    settings: ScoreSettings,
    out_dir: Path,
    client: Client,
    *,
    progress: bool = True,
) -> ScoreSummary:
    """:func:`bsym.serving.scorer.score_files` with one task per file on ``client``'s workers.

    ``backend`` is the client's own copy of the model (``settings.backend`` opened), used to
    plan the outputs and check the model's outputs before any task is sent. ``out_dir`` and
    the inputs must be visible to every worker at the same paths.
    """
    from distributed import as_completed
    from tqdm import tqdm

    out_dir = out_dir.resolve()
    summary = new_summary(backend, out_dir, strict_inputs=settings.strict_inputs)
    probe_outputs(backend)  # a model whose outputs do not match its spec fails here, once
    summary.workers = len(client.scheduler_info()["workers"])
    start = time.perf_counter()
    queue = plan_outputs(inputs, backend.feature_spec, backend.name, out_dir, summary)
    futures = {
        client.submit(score_on_worker, _absolute(source), target, settings, pure=False): source
        for source, target in queue
    }
    outcomes: dict[TreeSource, FileOutcome] = {}
    stopped = False
    with tqdm(total=len(futures), desc="bsym score", unit=" files", disable=not progress) as bar:
        for future in as_completed(futures):
            source = futures[future]
            if future.cancelled():
                continue
            try:
                outcome: FileOutcome = future.result()
            except Exception as error:  # the task itself died: KilledWorker, pickling
                outcome = FileOutcome(
                    str(source),
                    failure=(str(source), f"its Dask task failed: {type(error).__name__}: {error}"),
                )
            outcomes[source] = _named(outcome, source)
            bar.update(1)
            if outcome.server_error and not stopped:
                stopped = True
                client.cancel([f for f in futures if not f.done()])
    for source, _ in queue:  # in input order, as the serial run lists them
        if source in outcomes:
            summary.add(outcomes[source])
        else:
            summary.failed.append((str(source), NOT_SCORED))
    # The partials of workers that died in this run are younger than the stale age.
    for removed in client.run(remove_stale_partials, out_dir, min_age=0.0).values():
        summary.removed_partials += removed
    return finish_summary(summary, start, out_dir)


def _absolute(source: TreeSource) -> TreeSource:
    """The source with an absolute path: a worker's working directory is not the client's.
    URLs are left as they are."""
    path = source.path
    return (
        replace(source, path=path.resolve()) if isinstance(path, Path) and path.exists() else source
    )


def _named(outcome: FileOutcome, source: TreeSource) -> FileOutcome:
    """The outcome under the name the user gave (the worker saw the absolute path)."""
    name = str(source)
    result = None if outcome.result is None else replace(outcome.result, source=name)
    failure = None if outcome.failure is None else (name, outcome.failure[1])
    return replace(outcome, source=name, result=result, failure=failure)
