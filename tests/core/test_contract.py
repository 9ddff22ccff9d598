"""The model contract: one home, the Python backend's copy agrees, imports run one way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bsym import contract
from bsym.errors import ConfigError
from bsym.serving.triton_backend import model as backend


def test_python_backend_copy_equals_the_contract(tmp_path: Path) -> None:
    assert backend.MODEL_FILENAME == contract.MODEL_FILENAME
    assert backend.CHECKSUM_PREFIX == contract.CHECKSUM_PREFIX
    assert backend.REJECT_NONFINITE_KEY == contract.REJECT_NONFINITE_KEY
    for version in (1, 7, "12"):
        assert backend.checksum_key(version) == contract.checksum_key(version)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 9000)  # spans several hash chunks
    assert backend.sha256_of(payload) == contract.sha256_of(payload)


def test_find_model_takes_the_highest_version_holding_a_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "tagger"
    for version in (1, 3, 20):
        (model_dir / str(version)).mkdir(parents=True)
    for version in (1, 3):
        (model_dir / str(version) / contract.MODEL_FILENAME).write_bytes(b"onnx")
    (model_dir / contract.CONFIG_FILENAME).write_text("name: 'tagger'\n")
    assert contract.model_versions(model_dir) == [1, 3, 20]
    assert contract.repository_models(tmp_path) == ["tagger"]
    assert contract.find_model(tmp_path, "tagger") == model_dir / "3" / contract.MODEL_FILENAME
    assert contract.find_model(tmp_path, "tagger", 1) == model_dir / "1" / contract.MODEL_FILENAME
    with pytest.raises(ConfigError, match=r"no version 20 holding model.onnx .*\[1, 3\]"):
        contract.find_model(tmp_path, "tagger", 20)
    with pytest.raises(ConfigError, match="did you mean 'tagger'"):
        contract.find_model(tmp_path, "taggr")


def _loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(result.stdout.split())


def test_export_never_imports_serving() -> None:
    modules = (
        "bsym.export.cli",
        "bsym.export.onnx_export",
        "bsym.export.triton.parse",
        "bsym.export.triton.repository",
    )
    loaded = _loaded_after(", ".join(modules))
    assert set(modules) <= loaded
    assert not {name for name in loaded if name.startswith("bsym.serving")}


def test_contract_imports_nothing_heavy() -> None:
    loaded = _loaded_after("bsym.contract")
    assert not {"numpy", "pydantic", "onnx", "torch"} & loaded
    assert {name for name in loaded if name.startswith("bsym.")} == {
        "bsym.contract",
        "bsym.errors",
    }
