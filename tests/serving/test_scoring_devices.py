"""``bsym score --device`` and ``bsym serve --gpu``: providers, refusals, the gpu flavour.

Tests marked ``gpu`` need onnxruntime-gpu with a working CUDA provider and skip elsewhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import typer
import uproot
from typer.testing import CliRunner

from bsym.contract import CONFIG_FILENAME, MODEL_FILENAME
from bsym.errors import DeviceError, ServerError
from bsym.export.onnx_export import export_to_repository
from bsym.export.triton.common import Flavour
from bsym.export.triton.parse import parse_config
from bsym.export.triton.repository import derive_repository
from bsym.serving.cli import score_command, serve_command
from bsym.serving.distributed import BackendSettings
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.providers import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    check_session_providers,
    execution_providers,
)
from bsym.serving.serve import ServedRepository
from bsym.serving.triton_backend import model as backend_model

NAME = "isolation_pfn"
ORT_CUDA = CUDA_PROVIDER in ort.get_available_providers()


def torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


without_ort_cuda = pytest.mark.skipif(ORT_CUDA, reason="checks the refusal without CUDA in ORT")


@pytest.fixture(scope="module")
def repository(trained_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The production repository of the session's small PFN."""
    repository = tmp_path_factory.mktemp("repository")
    export_to_repository(trained_models["pfn"], repository)
    return repository


@pytest.fixture(scope="module")
def model_path(repository: Path) -> Path:
    return repository / NAME / "1" / MODEL_FILENAME


def app() -> typer.Typer:
    commands = typer.Typer()
    commands.command("score")(score_command)
    commands.command("serve")(serve_command)
    return commands


def test_providers_follow_the_device() -> None:
    assert execution_providers("cpu") == [CPU_PROVIDER]
    available = [CUDA_PROVIDER, CPU_PROVIDER]
    assert execution_providers("cuda", available) == [
        (CUDA_PROVIDER, {"device_id": "0"}),
        CPU_PROVIDER,
    ]
    assert execution_providers("cuda:2", available)[0] == (CUDA_PROVIDER, {"device_id": "2"})
    with pytest.raises(DeviceError, match=r"unknown device 'auto'"):
        execution_providers("auto", available)
    with pytest.raises(DeviceError, match=r"has no CUDAExecutionProvider .*bsym\[gpu\]"):
        execution_providers("cuda:1", [CPU_PROVIDER])


def test_a_session_that_dropped_the_cuda_provider_is_refused() -> None:
    check_session_providers([CUDA_PROVIDER, CPU_PROVIDER], "cuda:0", "m.onnx")
    check_session_providers([CPU_PROVIDER], "cpu", "m.onnx")
    with pytest.raises(DeviceError, match=r"m.onnx: ONNX Runtime could not start CUDA.*'cuda:0'"):
        check_session_providers([CPU_PROVIDER], "cuda:0", "m.onnx")


@without_ort_cuda
def test_cuda_is_refused_without_onnxruntime_gpu(model_path: Path, tmp_path: Path) -> None:
    message = rf"device 'cuda': the installed onnxruntime {ort.__version__} has no CUDA"
    with pytest.raises(DeviceError, match=message):
        OnnxRuntimeBackend(model_path, device="cuda")
    # the Dask workers' settings carry the device too
    with (
        pytest.raises(DeviceError, match=message),
        BackendSettings(str(model_path), device="cuda").open(),
    ):
        pass
    source = f"{tmp_path / 'none.root'}"
    args = ["score", source, "-m", str(model_path), "-o", str(tmp_path / "out"), "--no-progress"]
    result = CliRunner().invoke(app(), [*args, "--device", "cuda:0"])
    assert result.exit_code == 1, result.output
    assert "device 'cuda:0': the installed onnxruntime" in result.output
    assert "pip install 'bsym[gpu]'" in result.output
    assert not (tmp_path / "out").exists()


def test_bad_devices_on_the_command_line(model_path: Path, tmp_path: Path) -> None:
    args = ["score", "x.root", "-m", str(model_path), "-o", str(tmp_path / "out"), "--no-progress"]
    result = CliRunner().invoke(app(), [*args, "--device", "gpu"])
    assert result.exit_code == 1
    assert "unknown device 'gpu'; expected one of cpu, cuda, cuda:N" in result.output
    remote = ["score", "x.root", "-m", NAME, "-o", str(tmp_path / "out"), "--server", "h:1"]
    result = CliRunner().invoke(app(), [*remote, "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device is for the embedded backend" in result.output


def test_gpu_flavour_runs_the_python_backend_on_gpu_instances(
    repository: Path, tmp_path: Path
) -> None:
    production_text = (repository / NAME / CONFIG_FILENAME).read_text()
    derived = tmp_path / "gpu"
    assert derive_repository(repository, derived, Flavour.gpu, cpu_instances=1) == [NAME]
    assert (repository / NAME / CONFIG_FILENAME).read_text() == production_text
    production = parse_config(production_text)
    assert production.platform == "onnxruntime_onnx"
    gpu = parse_config((derived / NAME / CONFIG_FILENAME).read_text())
    assert (gpu.platform, gpu.backend) == ("", "python")
    assert [(group.kind, group.count) for group in gpu.instance_group] == [(1, 1)]  # KIND_GPU
    assert "kind: KIND_GPU" in (derived / NAME / CONFIG_FILENAME).read_text()
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(gpu, field) == getattr(production, field), field
    shipped = resources.files("bsym.serving.triton_backend").joinpath("model.py").read_bytes()
    assert (derived / NAME / "1" / "model.py").read_bytes() == shipped
    assert (derived / NAME / "1" / MODEL_FILENAME).resolve() == (
        repository / NAME / "1" / MODEL_FILENAME
    ).resolve()
    assert ServedRepository(repository, gpu=True).flavour is Flavour.gpu
    assert ServedRepository(repository).flavour is Flavour.cpu


def test_the_python_backend_picks_providers_by_instance_kind() -> None:
    assert backend_model.session_providers("CPU", 0) == [CPU_PROVIDER]
    assert backend_model.session_providers("GPU", 3) == [
        (CUDA_PROVIDER, {"device_id": "3"}),
        CPU_PROVIDER,
    ]
    backend_model.check_gpu_session([CUDA_PROVIDER, CPU_PROVIDER], [CUDA_PROVIDER], 0)
    with pytest.raises(RuntimeError, match=r"has no CUDAExecutionProvider.*onnxruntime-gpu"):
        backend_model.check_gpu_session([CPU_PROVIDER], [CPU_PROVIDER], 0)
    with pytest.raises(RuntimeError, match=r"could not start CUDAExecutionProvider on GPU 1"):
        backend_model.check_gpu_session([CPU_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER], 1)


@without_ort_cuda
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_gpu_instance_refuses_to_serve_on_the_cpu(model_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"KIND_GPU instance: .*refusing to serve on the CPU"):
        backend_model.make_session(model_path, "GPU", 0)
    session = backend_model.make_session(model_path, "CPU", 0)
    assert session.get_providers() == [CPU_PROVIDER]


@pytest.mark.gpu
@pytest.mark.skipif(not ORT_CUDA, reason="onnxruntime has no CUDAExecutionProvider")
def test_scores_on_the_gpu_match_the_cpu(
    model_path: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    with OnnxRuntimeBackend(model_path, device="cuda") as gpu:
        assert gpu._session.get_providers()[0] == CUDA_PROVIDER
    with pytest.raises(DeviceError):
        OnnxRuntimeBackend(model_path, device="cuda:99")
    source = str(sorted(isolation_sample.glob("isolation_muons_*.root"))[0])
    branches = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        args = ["score", source, "-m", str(model_path), "-o", str(out), "--no-progress"]
        result = CliRunner().invoke(app(), [*args, "--device", device])
        assert result.exit_code == 0, result.output
        [friend] = out.glob("*.root")
        with uproot.open(friend) as file:
            [tree] = [file[key] for key in file.keys(cycle=False)]
            branches[device] = tree.arrays(library="np")
    assert branches["cuda"].keys() == branches["cpu"].keys()
    for name, values in branches["cpu"].items():
        np.testing.assert_allclose(branches["cuda"][name], values, atol=1e-4, err_msg=name)
    session = backend_model.make_session(model_path, "GPU", 0)
    assert session.get_providers()[0] == CUDA_PROVIDER


def _require_tritonserver() -> None:
    from bsym.errors import BsymError
    from bsym.serving.triton_server import find_tritonserver

    try:
        find_tritonserver()
    except BsymError as error:
        pytest.skip(f"tritonserver unavailable: {error}")


@pytest.mark.triton
@pytest.mark.skipif(torch_cuda(), reason="checks the refusal on a host without GPUs")
def test_serve_gpu_on_a_host_without_gpus_does_not_start(repository: Path) -> None:
    _require_tritonserver()
    served = ServedRepository(repository, grpc_port=0, http_port=0, instances=1, gpu=True)
    with pytest.raises(ServerError, match=r"has kind KIND_GPU but no GPUs are available"):
        served.start()
    assert served._server is None and served._tmp is None
    args = ["serve", "--repository", str(repository), "--grpc-port", "0", "--http-port", "0"]
    result = CliRunner().invoke(app(), [*args, "--gpu"])
    assert result.exit_code == 1, result.output
    assert "has kind KIND_GPU but no GPUs are available" in result.output


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.skipif(not ORT_CUDA, reason="onnxruntime has no CUDAExecutionProvider")
def test_serve_gpu_answers_like_the_embedded_backend(repository: Path, model_path: Path) -> None:
    from bsym.serving.triton_client import TritonBackend

    _require_tritonserver()
    rng = np.random.default_rng(5)
    with OnnxRuntimeBackend(model_path) as embedded:
        inputs = {
            spec.name: _random_input(rng, spec.dtype, spec.shape, 300)
            for spec in embedded.input_specs
        }
        expected = embedded.predict(inputs)["score"]
    with (
        ServedRepository(repository, grpc_port=0, http_port=0, instances=1, gpu=True) as served,
        TritonBackend(served.grpc_url, NAME) as client,
    ):
        found = client.predict(inputs)["score"]
    np.testing.assert_allclose(found, expected, atol=1e-4)


def _random_input(
    rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int | None, ...], rows: int
) -> np.ndarray[Any, Any]:
    full = (rows, *(dim or 1 for dim in shape[1:]))
    if dtype == np.bool_:
        return rng.random(full) < 0.7
    return rng.normal(0, 1, full).astype(dtype)
