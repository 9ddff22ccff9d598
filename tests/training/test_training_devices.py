"""``bsym train --device`` and bf16 autocast: device names, refusals, GPU runs that load on CPU.

Tests marked ``gpu`` need PyTorch with a CUDA device and skip elsewhere; the rest run here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from bsym.configs import shipped_config
from bsym.devices import Device, parse_device, torch_device
from bsym.errors import ConfigError, DeviceError
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint, predict
from bsym.training.cli import train_command
from bsym.training.config import TrainConfig, load_config
from bsym.training.train import TrainResult, train

CUDA = torch.cuda.is_available()
without_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal where PyTorch has no CUDA")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 400, seed=3)
    return out


def pfn_config(data_dir: Path, out: Path, *extra: str) -> TrainConfig:
    overrides = [
        f"data.train=['{data_dir}/isolation_muons_*.root']",
        f"output_dir={out}",
        "optimizer.batch_size=64",
        "optimizer.epochs=2",
        "optimizer.lr=3e-3",
        "model.phi_sizes=[16, 16]",
        "model.f_sizes=[16]",
        *extra,
    ]
    return load_config(shipped_config("isolation_pfn"), overrides)


def losses(result: TrainResult) -> list[float]:
    return [float(record["train_loss"]) for record in result.history]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("cpu", Device("cpu")),
        ("CUDA", Device("cuda")),
        ("cuda:0", Device("cuda", 0)),
        (" cuda:3 ", Device("cuda", 3)),
        ("auto", Device("auto")),
    ],
)
def test_device_names(text: str, device: Device) -> None:
    assert parse_device(text, allow_auto=True) == device
    assert str(device) == text.strip().lower()


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "mps", ""])
def test_unknown_device_names_are_refused(text: str) -> None:
    with pytest.raises(DeviceError, match=r"expected one of cpu, cuda, cuda:N, auto"):
        parse_device(text, allow_auto=True)


def test_auto_is_only_allowed_where_asked_for() -> None:
    with pytest.raises(DeviceError, match=r"unknown device 'auto'; expected one of cpu, cuda, "):
        parse_device("auto")


@without_cuda
def test_auto_takes_the_cpu_and_cuda_is_refused_without_a_gpu() -> None:
    assert torch_device("auto") == torch.device("cpu")
    for text in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"device '{text}': PyTorch sees no CUDA device"):
            torch_device(text)


@without_cuda
def test_training_on_an_absent_gpu_stops_before_reading_or_writing(
    data_dir: Path, tmp_path: Path
) -> None:
    config = pfn_config(data_dir, tmp_path / "run")
    with pytest.raises(DeviceError, match="PyTorch sees no CUDA device"):
        train(config, progress=False, device="cuda")
    assert not (tmp_path / "run").exists()

    app = typer.Typer()
    app.command()(train_command)
    args = [str(shipped_config("isolation_pfn")), "--set", f"output_dir={tmp_path / 'cli'}"]
    result = CliRunner().invoke(app, [*args, "--device", "cuda:0"])
    assert result.exit_code == 1
    assert "device 'cuda:0': PyTorch sees no CUDA device" in result.output
    result = CliRunner().invoke(app, [*args, "--device", "gpu"])
    assert result.exit_code == 1
    assert "unknown device 'gpu'" in result.output
    assert not (tmp_path / "cli").exists()


def test_bf16_autocast_trains_float32_weights(data_dir: Path, tmp_path: Path) -> None:
    plain = train(pfn_config(data_dir, tmp_path / "fp32"), progress=False, device="cpu")
    config = pfn_config(data_dir, tmp_path / "bf16", "optimizer.autocast=bf16")
    assert config.optimizer.autocast == "bf16"
    bf16 = train(config, progress=False, device="cpu")
    assert all(np.isfinite(losses(bf16)))
    assert losses(bf16)[1] < losses(bf16)[0]
    assert bf16.best_val_auc > 0.75
    # the forward passes ran in bf16: the losses differ from the float32 run's
    assert losses(bf16) != losses(plain)
    loaded = load_checkpoint(bf16.checkpoint)
    assert loaded.config.optimizer.autocast == "bf16"
    assert {t.dtype for t in loaded.model.state_dict().values() if t.is_floating_point()} == {
        torch.float32
    }


def test_unknown_autocast_is_a_config_error(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer.autocast"):
        pfn_config(data_dir, tmp_path / "run", "optimizer.autocast=fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="PyTorch sees no CUDA device")
def test_auto_takes_the_first_gpu() -> None:
    assert torch_device("auto") == torch.device("cuda", 0)
    assert torch_device("cuda") == torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="PyTorch sees no CUDA device")
def test_a_gpu_beyond_the_last_is_refused() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"there is no CUDA device {count}; PyTorch sees"):
        torch_device(f"cuda:{count}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="PyTorch sees no CUDA device")
@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_a_gpu_run_matches_the_cpu_run_and_loads_on_cpu(
    data_dir: Path, tmp_path: Path, autocast: str
) -> None:
    extra = f"optimizer.autocast={autocast}"
    cpu = train(pfn_config(data_dir, tmp_path / "cpu", extra), progress=False, device="cpu")
    gpu = train(pfn_config(data_dir, tmp_path / "gpu", extra), progress=False, device="cuda")
    assert losses(gpu)[1] < losses(gpu)[0]
    assert abs(gpu.best_val_auc - cpu.best_val_auc) < 0.03
    for path in (gpu.checkpoint, gpu.last):
        payload = torch.load(path, map_location=None, weights_only=True)
        devices = {t.device.type for t in _tensors(payload)}
        assert devices == {"cpu"}, path
    loaded = load_checkpoint(gpu.checkpoint)
    assert {t.device.type for t in loaded.model.state_dict().values()} == {"cpu"}
    scores = predict(loaded, loaded.held_out_test())
    assert np.all((scores >= 0) & (scores <= 1))
    # a GPU run resumes on the CPU and the reverse
    more = pfn_config(data_dir, tmp_path / "gpu", extra, "optimizer.epochs=3")
    resumed = train(more, resume=gpu.last, progress=False, device="cpu")
    assert resumed.epochs == 3


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    return []
