"""``benchmarks/bench_gpu.py`` runs to its table at a tiny scale, with or without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_gpu_measures_every_device_and_precision(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    args = ["--events", "400", "--epochs", "2", "--seconds", "0.05", "--batches", "1", "16"]
    args += ["--threads", "1", "--data-dir", str(tmp_path / "data"), "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    devices = ["cpu", "cuda:0"] if torch.cuda.is_available() else ["cpu"]
    if len(devices) == 1:
        assert "no CUDA device is available" in result.stderr
    numbers = json.loads(out.read_text())
    assert [(t["device"], t["autocast"]) for t in numbers["training"]] == [
        (device, mode) for device in devices for mode in ("none", "bf16")
    ]
    assert all(t["median_s"] > 0 and t["epochs"] == 2 for t in numbers["training"])
    cells = {(device, mode) for device in devices for mode in ("none", "bf16")}
    assert {(f["device"], f["autocast"], f["batch"]) for f in numbers["forward"]} == {
        (*cell, batch) for cell in cells for batch in (1, 16)
    }
    assert all(f["rows_per_second"] > 0 for f in numbers["forward"])
    assert "forward pass: rows/s" in result.stdout
