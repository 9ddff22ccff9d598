"""The real ``tritonserver`` from nvidia-pytriton serving a cpu-flavour model repository."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import psutil
import pytest
import torch
from conftest import bsym_serve
from torch import nn

from bsym.errors import BsymError, ServerError
from bsym.export.triton.common import Flavour
from bsym.export.triton.repository import write_model_repository
from bsym.serving import triton_server
from bsym.serving.triton_server import (
    TritonServer,
    describe_exit,
    error_lines,
    find_tritonserver,
)

pytestmark = pytest.mark.triton

Array = npt.NDArray[Any]
P, F, G = 8, 3, 2
NAME = "deepset"

try:
    find_tritonserver()
except BsymError as error:  # only where nvidia-pytriton (Linux wheels only) is not installed
    pytest.skip(f"tritonserver unavailable: {error}", allow_module_level=True)

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")


class DeepSet(nn.Module):
    """Masked-sum deep set over constituents plus globals, with a second output."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.phi = nn.Sequential(nn.Linear(F, 16), nn.ReLU(), nn.Linear(16, 16))
        self.rho = nn.Linear(16 + G, 3)

    def forward(
        self, constituents: torch.Tensor, mask: torch.Tensor, globals_: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = (self.phi(constituents) * mask.unsqueeze(-1).to(constituents.dtype)).sum(1)
        hidden = self.rho(torch.cat([pooled, globals_], dim=1))
        return torch.sigmoid(hidden[:, :1]), torch.softmax(hidden[:, 1:], dim=1)


def export_deepset(path: Path, seed: int = 0) -> Path:
    """Export :class:`DeepSet` with the model contract's names, dynamic batch and metadata."""
    example = (torch.randn(4, P, F), torch.ones(4, P, dtype=torch.bool), torch.randn(4, G))
    batch = {0: "N"}
    names = ["constituents", "mask", "globals", "score", "symmetry_weight"]
    with warnings.catch_warnings():
        # The dynamo exporter needs onnxscript, which bsym does not depend on.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        torch.onnx.export(
            DeepSet(seed).eval(),
            example,
            str(path),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes=dict.fromkeys(names, batch),
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    for key, value in {
        "bsym_model_name": NAME,
        "bsym_class_labels": json.dumps(["prompt"]),
        "bsym_version": "0.1.0",
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def make_inputs(n: int, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, P + 1, size=n)
    mask = np.arange(P)[None, :] < counts[:, None]
    constituents = (rng.normal(size=(n, P, F)) * mask[..., None]).astype(np.float32)
    return {
        "constituents": constituents,
        "mask": mask,
        "globals": rng.normal(size=(n, G)).astype(np.float32),
    }


def infer(url: str, inputs: dict[str, Array]) -> dict[str, Array]:
    """One gRPC request with every input; returns every output."""
    types = {np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL"}
    with grpcclient.InferenceServerClient(url) as client:
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), types[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("score", "symmetry_weight")]
        result = client.infer(NAME, tensors, outputs=outputs)
        return {name: result.as_numpy(name) for name in ("score", "symmetry_weight")}


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_deepset(tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def server(onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("repository")
    write_model_repository(onnx_path, repository, NAME, 1, flavour=Flavour.cpu)
    with TritonServer(repository) as running:
        yield running


def test_find_tritonserver_is_executable() -> None:
    assert os.access(find_tritonserver(), os.X_OK)


def test_scores_match_onnxruntime(server: TritonServer, onnx_path: Path) -> None:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n, seed in ((1, 1), (37, 2)):
        inputs = make_inputs(n, seed)
        expected = dict(zip(("score", "symmetry_weight"), session.run(None, inputs), strict=True))
        found = infer(server.grpc_url, inputs)
        for name, value in expected.items():
            assert found[name].shape == value.shape
            np.testing.assert_allclose(found[name], value, rtol=0, atol=1e-5)


def test_concurrent_requests_are_answered_in_order(server: TritonServer, onnx_path: Path) -> None:
    """Requests the dynamic batcher merges come back split to their own senders."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batches = [make_inputs(5 + k, 100 + k) for k in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda inputs: infer(server.grpc_url, inputs), batches))
    for inputs, found in zip(batches, results, strict=True):
        np.testing.assert_allclose(found["score"], session.run(["score"], inputs)[0], atol=1e-5)


def test_changed_model_is_refused(onnx_path: Path, tmp_path: Path) -> None:
    write_model_repository(onnx_path, tmp_path, NAME, 1, flavour=Flavour.cpu)
    export_deepset(tmp_path / NAME / "1" / "model.onnx", seed=1)
    server = TritonServer(tmp_path, startup_timeout=60)
    with pytest.raises(ServerError, match="sha256") as caught:
        server.start()
    assert "refusing to serve it" in str(caught.value)
    assert server.log_tail()  # the log survives stop() for diagnosis


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (orphans wait for a reaper that a container may lack)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_explicit_mode_with_cached_backends_and_forced_stop(
    onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only site-packages: the backends are copied to our cache; SIGKILL ends the stubs."""
    monkeypatch.setattr(triton_server, "_writable", lambda directory: False)
    cache = tmp_path / "cache"
    write_model_repository(onnx_path, tmp_path / "repository", NAME, 1, flavour=Flavour.cpu)
    server = TritonServer(
        tmp_path / "repository", models=[NAME], backend_cache=cache, grace_period=0.01
    )
    with server, grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready(NAME)
        assert server.running and server.pid is not None
        stubs = psutil.Process(server.pid).children(recursive=True)
        assert stubs  # one Python-backend stub per model instance
    assert not server.running
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while [stub for stub in stubs if _alive(stub)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [stub for stub in stubs if _alive(stub)]
    (prepared,) = cache.glob("pytriton-*/python/triton_python_backend_stub")
    assert os.access(prepared, os.X_OK)
    server.stop()  # idempotent
    with pytest.raises(ServerError, match="not running"):
        _ = server.grpc_url


def test_unknown_model_is_named_before_starting(onnx_path: Path, tmp_path: Path) -> None:
    write_model_repository(onnx_path, tmp_path, NAME, 1, flavour=Flavour.cpu)
    with pytest.raises(ServerError, match="did you mean 'deepset'"):
        TritonServer(tmp_path, models=["deepsat"]).start()


def test_bsym_serve_reports_how_the_server_died(onnx_path: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    write_model_repository(onnx_path, repository, NAME, 1, flavour=Flavour.production)
    command = [sys.executable, "-c", "from bsym.cli import app; app()", "serve"]
    command += ["--repository", str(repository), "--grpc-port", "0", "--http-port", "0"]
    with bsym_serve([*command, "--instances", "1"]) as serve:
        (server,) = [p for p in serve.servers if p.name() == "tritonserver"]
        server.send_signal(signal.SIGKILL)
        serve.process.wait(timeout=30)
    assert serve.process.returncode == 1, serve.output
    message = serve.output.replace("\n", "")
    assert f"the Triton server (pid {server.pid}) for {repository} exited unexpectedly" in message
    assert "killed by SIGKILL" in message
    assert "+----" not in serve.output  # no status tables
    assert "CudaDriverHelper" not in serve.output  # nor the complaints of a machine without GPU


def test_exit_status_and_error_lines() -> None:
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    log = "\n".join(
        [
            "I1201 10:00:00.000 1 server.cc:674] ",
            "+---------+---------+--------+",
            "| Model   | Version | Status |",
            "| deepset | 1       | error  |",
            "E1201 10:00:01.000 1 model_lifecycle.cc:654] failed to load 'deepset'",
            'E1201 10:00:00.500 1 server.cc:241] "CudaDriverHelper has not been initialized."',
            "W1201 10:00:01.000 1 pinned_memory.cc:1] Unable to allocate: error 12",
            "terminate called after throwing an instance of 'std::runtime_error'",
            "I1201 10:00:02.000 1 server.cc:1] Waiting for in-flight requests",
        ]
    )
    assert error_lines(log) == [
        "E1201 10:00:01.000 1 model_lifecycle.cc:654] failed to load 'deepset'",
        "W1201 10:00:01.000 1 pinned_memory.cc:1] Unable to allocate: error 12",
        "terminate called after throwing an instance of 'std::runtime_error'",
    ]
    assert error_lines(log, count=1) == [log.splitlines()[-2]]
