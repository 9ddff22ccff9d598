"""Load on the Triton server against embedded ONNX Runtime: throughput and latency.

    .venv/bin/python benchmarks/bench_load.py [--seconds 2] [--instances 2]

One PFN-like model (P=32 cells, F=3, Φ 64-64-64, F 64-64, random weights; the model of
bench_score.py) is exported to a production repository and served by ``bsym serve``'s
machinery (cpu flavour: Python backend, one ONNX Runtime thread per instance). For 1, 4 and 16
concurrent clients and batches of 1, 64 and 1024 rows it measures, in one run, back to back:

- embedded: ``OnnxRuntimeBackend.predict`` (what ``bsym score`` runs), one session shared by
  the client threads;
- Triton: the clients are coroutines on one ``tritonclient.grpc.aio`` channel, each sending a
  prepared request and waiting for its answer, so the numbers are the server's and gRPC's,
  not the Python client's.

Each cell alternates short slices of the two (``--rounds``), so other jobs on a shared machine
weigh on both alike.

Throughput is in inferences (rows) per second; latency is per request. Target on CPU: at
batch >= 1024, Triton reaches at least 0.6 of the embedded throughput. Client and server
share the machine's cores, as they would on one worker node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_score import MODEL_NAME, bench_spec, make_model  # noqa: E402

from bsym.contract import CLASS_LABELS_KEY  # noqa: E402
from bsym.export.triton.common import Flavour  # noqa: E402
from bsym.export.triton.description import Batching  # noqa: E402
from bsym.export.triton.repository import write_model_repository  # noqa: E402
from bsym.serving.onnx_backend import OnnxRuntimeBackend  # noqa: E402
from bsym.serving.serve import ServedRepository  # noqa: E402

console = Console(stderr=True)
CLIENTS = (1, 4, 16)
BATCHES = (1, 64, 1024)
TARGET = 0.6
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Measurement:
    """Rows per second and per-request latencies of one (backend, clients, batch) cell."""

    rows_per_second: float
    requests: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Sample:
    """Request latencies (seconds) over ``seconds`` of wall time, ``rows`` rows each."""

    latencies: list[float]
    rows: int
    seconds: float


def summarise(samples: list[Sample]) -> Measurement:
    latencies = [value for sample in samples for value in sample.latencies]
    values = np.asarray(latencies) * 1e3
    rows = sum(len(sample.latencies) * sample.rows for sample in samples)
    return Measurement(
        rows_per_second=rows / sum(sample.seconds for sample in samples),
        requests=len(latencies),
        p50_ms=float(np.percentile(values, 50)),
        p99_ms=float(np.percentile(values, 99)),
    )


def make_inputs(rows: int, seed: int = 0) -> dict[str, Array]:
    """Tensors like the isolation PFN's: ~22 real cells of 32, log pT as the global."""
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.poisson(22, rows), 32)
    mask = np.arange(32)[None, :] < counts[:, None]
    constituents = (rng.normal(size=(rows, 32, 3)) * mask[..., None]).astype(np.float32)
    return {
        "constituents": constituents,
        "mask": mask,
        "globals": np.log(rng.exponential(20, (rows, 1)) + 5).astype(np.float32),
    }


def prepare(data_dir: Path, instances: int) -> tuple[Path, Path]:
    """The model (with class labels) and a production repository holding it."""
    import onnx

    model = data_dir / f"{MODEL_NAME}_labelled.onnx"
    if not model.is_file():
        proto = onnx.load(str(make_model(data_dir / f"{MODEL_NAME}.onnx", bench_spec())))
        entry = proto.metadata_props.add()
        entry.key, entry.value = CLASS_LABELS_KEY, json.dumps(["prompt"])
        onnx.save(proto, str(model))
    repository = data_dir / "load_repository"
    write_model_repository(
        model,
        repository,
        MODEL_NAME,
        1,
        flavour=Flavour.production,
        force=True,
        batching=Batching(max_batch_size=4096),
        cpu_instances=instances,
    )
    return model, repository


def measure_embedded(
    backend: OnnxRuntimeBackend, inputs: dict[str, Array], clients: int, seconds: float
) -> Sample:
    """``clients`` threads calling ``predict`` on one session for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_line = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(index: int) -> None:
        start_line.wait()
        while not stop.is_set():
            began = time.perf_counter()
            backend.predict(inputs)
            latencies[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    flat = [value for values in latencies for value in values]
    return Sample(flat, len(inputs["mask"]), elapsed)


def measure_triton(url: str, inputs: dict[str, Array], clients: int, seconds: float) -> Sample:
    """``clients`` coroutines each with one request in flight, on one gRPC channel."""
    return asyncio.run(_triton(url, inputs, clients, seconds))


async def _triton(url: str, inputs: dict[str, Array], clients: int, seconds: float) -> Sample:
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc.aio import InferenceServerClient

    tensors = []
    for name, array in inputs.items():
        tensor = InferInput(name, list(array.shape), "BOOL" if array.dtype == np.bool_ else "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    outputs = [InferRequestedOutput("score")]
    latencies: list[float] = []
    async with InferenceServerClient(url) as client:
        deadline = time.perf_counter() + seconds

        async def one() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                result = await client.infer(MODEL_NAME, tensors, outputs=outputs)
                latencies.append(time.perf_counter() - began)
                if result.as_numpy("score").shape[0] != len(inputs["mask"]):
                    raise RuntimeError("the server answered with the wrong number of rows")

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    return Sample(latencies, len(inputs["mask"]), elapsed)


def report(results: dict[tuple[int, int], tuple[Measurement, Measurement]], instances: int) -> bool:
    table = Table(
        title=f"Triton (cpu flavour, {instances} instances x 1 thread) vs embedded ONNX Runtime "
        f"({os.cpu_count()} CPUs)"
    )
    for column in (
        "clients",
        "batch",
        "embedded inf/s",
        "p50 ms",
        "p99 ms",
        "Triton inf/s",
        "p50 ms",
        "p99 ms",
        "Triton/embedded",
    ):
        table.add_column(column, justify="right")
    ok = True
    for (clients, batch), (local, remote) in sorted(results.items()):
        ratio = remote.rows_per_second / local.rows_per_second
        if batch >= 1024:
            ok &= ratio >= TARGET
        table.add_row(
            str(clients),
            str(batch),
            f"{local.rows_per_second:,.0f}",
            f"{local.p50_ms:.2f}",
            f"{local.p99_ms:.2f}",
            f"{remote.rows_per_second:,.0f}",
            f"{remote.p50_ms:.2f}",
            f"{remote.p99_ms:.2f}",
            f"{ratio:.2f}",
        )
    out = Console(width=max(Console().width, 120))  # the table, unwrapped, in a log too
    out.print(table)
    verdict = "ok" if ok else "MISSED"
    out.print(f"target: Triton/embedded >= {TARGET} at batch >= 1024: {verdict}", highlight=False)
    return ok


def main() -> None:
    args = parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    model, repository = prepare(args.data_dir, args.instances)
    backend = OnnxRuntimeBackend(model, threads=args.threads, batch_size=max(BATCHES))
    pool = make_inputs(max(BATCHES))
    results: dict[tuple[int, int], tuple[Measurement, Measurement]] = {}
    console.print(f"load average at the start {os.getloadavg()[0]:.1f}")
    with ServedRepository(repository, grpc_port=0, http_port=0, instances=args.instances) as served:
        url = served.grpc_url
        for batch in BATCHES:
            inputs = {name: np.ascontiguousarray(value[:batch]) for name, value in pool.items()}
            measure_embedded(backend, inputs, 1, args.warmup)
            measure_triton(url, inputs, 1, args.warmup)
            for clients in CLIENTS:
                # Alternate short slices of both, so that a change in the machine's load
                # (other jobs) weighs on both alike.
                slices: tuple[list[Sample], list[Sample]] = ([], [])
                for _ in range(args.rounds):
                    share = args.seconds / args.rounds
                    slices[0].append(measure_embedded(backend, inputs, clients, share))
                    slices[1].append(measure_triton(url, inputs, clients, share))
                local, remote = summarise(slices[0]), summarise(slices[1])
                results[clients, batch] = (local, remote)
                console.print(
                    f"clients {clients:2d} batch {batch:4d}: embedded "
                    f"{local.rows_per_second:9,.0f}/s, Triton {remote.rows_per_second:9,.0f}/s",
                    highlight=False,
                )
    console.print(f"load average at the end {os.getloadavg()[0]:.1f}")
    report(results, args.instances)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measured seconds per cell and backend"
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternations per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per batch")
    parser.add_argument("--instances", type=int, default=2, help="Triton CPU instances")
    parser.add_argument("--threads", type=int, default=None, help="embedded ONNX Runtime threads")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data", help="cache directory")
    return parser.parse_args()


if __name__ == "__main__":
    main()
