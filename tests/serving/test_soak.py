"""Soak: 16 clients of tritonclient's own ``grpc.aio`` against ``bsym serve`` for a minute.

Slow (about 75 s); ``BSYM_SOAK_SECONDS`` changes the duration. Every answer must equal the
embedded ONNX Runtime backend's, no request may fail, and the memory of the server processes
must stay flat after the warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import psutil
import pytest
import uproot
from conftest import PFN, bsym_serve

from bsym.contract import MODEL_FILENAME
from bsym.features import build_features, detect_layout, required_branches
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.triton_server import find_tritonserver

CLIENTS = 16
SECONDS = float(os.environ.get("BSYM_SOAK_SECONDS", "60"))
WARM_UP = 10.0
TOLERANCE = 1e-5
# resident memory may grow this much after the warm-up (allocator noise, gRPC buffers)
MEMORY_GROWTH = 0.10


@dataclass
class Soak:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    worst: float = 0.0
    memory: list[tuple[float, int]] = field(default_factory=list)


def server_memory(servers: list[psutil.Process]) -> int:
    """Summed resident memory of the Triton server and its backend stubs."""
    processes = list(servers)
    for server in servers:
        with contextlib.suppress(psutil.NoSuchProcess):
            processes += server.children(recursive=True)
    total = 0
    for process in {p.pid: p for p in processes}.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


async def soak(
    url: str, inputs: dict[str, npt.NDArray[np.generic]], expected: npt.NDArray[np.float32],
    servers: list[psutil.Process],
) -> Soak:  # fmt: skip
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc.aio import InferenceServerClient

    result = Soak()
    rows = len(expected)
    deadline = time.monotonic() + SECONDS
    began = time.monotonic()

    async def client(index: int, connection: InferenceServerClient) -> None:
        rng = np.random.default_rng(index)
        while time.monotonic() < deadline:
            start = int(rng.integers(0, rows - 1))
            stop = min(rows, start + int(rng.integers(1, 256)))
            tensors = []
            for name, array in inputs.items():
                part = np.ascontiguousarray(array[start:stop])
                dtype = "BOOL" if part.dtype == np.bool_ else "FP32"
                tensor = InferInput(name, list(part.shape), dtype)
                tensor.set_data_from_numpy(part)
                tensors.append(tensor)
            try:
                answer = await connection.infer(
                    PFN, tensors, outputs=[InferRequestedOutput("score")]
                )
            except Exception as error:  # every failure counts; the test reports them all
                result.errors.append(f"{type(error).__name__}: {error}")
                continue
            found = answer.as_numpy("score")
            result.worst = max(result.worst, float(np.max(np.abs(found - expected[start:stop]))))
            result.requests += 1

    async def watch() -> None:
        while time.monotonic() < deadline:
            result.memory.append((time.monotonic() - began, server_memory(servers)))
            await asyncio.sleep(1.0)

    async with InferenceServerClient(url) as connection:
        await asyncio.gather(watch(), *(client(k, connection) for k in range(CLIENTS)))
    return result


@pytest.mark.slow
@pytest.mark.triton
def test_sixteen_aio_clients_for_a_minute(model_repository: Path, isolation_sample: Path) -> None:
    if find_tritonserver() is None:
        pytest.skip("no tritonserver binary (pip install 'bsym[triton]')")
    backend = OnnxRuntimeBackend(model_repository / PFN / "1" / MODEL_FILENAME, threads=1)
    spec = backend.feature_spec
    with uproot.open(isolation_sample / "isolation_muons_000.root") as file:
        tree = file["Muons"]
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=False))
    inputs = build_features(arrays, spec, layout).inputs()
    expected = backend.predict(inputs)["score"]
    command = [
        sys.executable, "-c", "from bsym.cli import app; app()", "serve",
        "--repository", str(model_repository), "--grpc-port", "0", "--http-port", "0",
        "--instances", "2",
    ]  # fmt: skip
    with bsym_serve(command) as serve:
        result = asyncio.run(soak(serve.url, inputs, expected, serve.servers))
    assert not result.errors, f"{len(result.errors)} errors, the first: {result.errors[0]}"
    assert result.requests > CLIENTS * SECONDS, result.requests  # well above one a second
    assert result.worst <= TOLERANCE
    warm = [rss for t, rss in result.memory if t >= WARM_UP]
    assert len(warm) >= 2, result.memory
    growth = (max(warm) - warm[0]) / warm[0]
    print(
        f"soak: {result.requests} requests in {SECONDS:.0f} s from {CLIENTS} clients, 0 errors, "
        f"max |Δ score| {result.worst:.2e}; server memory {warm[0] / 2**20:.0f} → "
        f"{warm[-1] / 2**20:.0f} MiB after warm-up (max {max(warm) / 2**20:.0f})"
    )
    assert growth <= MEMORY_GROWTH, result.memory
    assert serve.process.returncode == 0, serve.output
    assert not serve.left_running
