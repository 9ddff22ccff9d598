"""bsym export: torch against ONNX Runtime, metadata, overwrite refusal, repository layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
import torch
import typer
from conftest import MODEL_TYPES
from typer.testing import CliRunner

import bsym
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export import cli as export_cli
from bsym.export import onnx_export
from bsym.export.onnx_export import (
    DEFAULT_TOLERANCE,
    check_parity,
    export_onnx,
    export_to_repository,
    to_onnx,
)
from bsym.export.triton.parse import parse_config
from bsym.features import FeatureSpec
from bsym.training.checkpoint import load_checkpoint, predict
from bsym.training.config import TrainConfig
from bsym.training.models.lorentz import DualSubnet


@pytest.mark.parametrize("kind", list(MODEL_TYPES))
def test_onnx_matches_torch_within_tolerance(
    trained_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / f"{kind}.onnx"
    report = export_onnx(trained_models[kind], out)

    parity = report.parity
    assert parity.tolerance == DEFAULT_TOLERANCE == 1e-4
    assert parity.rows >= onnx_export.PARITY_MIN_ROWS
    assert 1 in parity.batch_sizes and any(size % 2 for size in parity.batch_sizes if size > 1)
    assert 0 <= parity.max_abs_diff["score"] <= DEFAULT_TOLERANCE
    onnx.checker.check_model(str(out), full_check=True)

    # Independently of the exporter's own check: the file as written, on the test rows.
    loaded = load_checkpoint(trained_models[kind])
    batch = loaded.held_out_test()
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(loaded.model.input_names)
    assert session.get_inputs()[0].shape[0] == "batch"
    feed = {name: batch.inputs()[name] for name in loaded.model.input_names}
    (onnx_scores,) = session.run(["score"], feed)
    assert onnx_scores.shape == (batch.n_rows, 1)
    torch_scores = predict(loaded, batch)
    assert np.max(np.abs(onnx_scores[:, 0] - torch_scores)) <= DEFAULT_TOLERANCE


def test_metadata_records_spec_config_and_provenance(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    export_onnx(trained_models["pfn"], out)
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}

    loaded = load_checkpoint(trained_models["pfn"])
    assert FeatureSpec.from_json(metadata["bsym_feature_spec"]) == loaded.spec
    assert TrainConfig.model_validate_json(metadata["bsym_config"]) == loaded.config
    assert metadata["bsym_version"] == bsym.__version__
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", metadata["bsym_git_commit"])
    assert metadata["bsym_model_name"] == "isolation_pfn"
    assert json.loads(metadata["bsym_class_labels"]) == ["prompt"]
    assert float(metadata["bsym_parity_tolerance"]) == DEFAULT_TOLERANCE
    assert 0 <= float(metadata["bsym_parity_max_abs_diff"]) <= DEFAULT_TOLERANCE
    assert int(metadata["bsym_parity_rows"]) >= onnx_export.PARITY_MIN_ROWS


def test_refuses_to_overwrite_without_force(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"already exists.*--force"):
        export_onnx(trained_models["dnn"], out)
    assert out.read_bytes() == b"precious"

    export_onnx(trained_models["dnn"], out, force=True)
    onnx.checker.check_model(str(out))


def test_failed_parity_writes_nothing(
    trained_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong_graph(
        model: torch.nn.Module,
        inputs: dict[str, npt.NDArray[Any]],
        input_names: tuple[str, ...],
        output_names: tuple[str, ...],
        opset: int = 17,
    ) -> onnx.ModelProto:
        with_other_weights = load_checkpoint(trained_models["dnn"]).model
        for parameter in with_other_weights.parameters():
            parameter.data += 0.1
        return to_onnx(with_other_weights, inputs, input_names, output_names, opset)

    monkeypatch.setattr(onnx_export, "to_onnx", wrong_graph)
    out = tmp_path / "model.onnx"
    with pytest.raises(SpecMismatchError, match=r"output 'score'.*differs from torch by up to"):
        export_onnx(trained_models["dnn"], out)
    assert list(tmp_path.iterdir()) == []


def test_parity_data_files(
    trained_models: dict[str, Path], isolation_sample: Path, tmp_path: Path
) -> None:
    events = f"{isolation_sample}/isolation_events_000.root:Events"
    report = export_onnx(trained_models["cone_cut"], tmp_path / "m.onnx", parity_data=[events])
    assert "isolation_events_000.root:Events" in report.parity.source
    assert report.parity.worst <= DEFAULT_TOLERANCE


def test_model_with_two_outputs() -> None:
    rng = np.random.default_rng(0)
    momenta = rng.normal(0.0, 30.0, size=(500, 2, 3))
    energy = np.sqrt((momenta**2).sum(axis=-1) + 0.0112)
    inputs = {
        "constituents": np.concatenate([momenta, energy[..., None]], axis=-1).astype(np.float32),
        "mask": np.ones((500, 2), dtype=np.bool_),
        "globals": rng.normal(40.0, 10.0, size=(500, 1)).astype(np.float32),
    }
    model = DualSubnet().eval()
    proto = to_onnx(model, inputs, model.input_names, model.output_names)
    assert [o.name for o in proto.graph.output] == ["score", "symmetry_weight"]
    report = check_parity(model, proto, inputs, model.output_names)
    assert set(report.max_abs_diff) == {"score", "symmetry_weight"}
    assert report.worst <= DEFAULT_TOLERANCE


def test_repository_versions_and_layout(trained_models: dict[str, Path], tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    first = export_to_repository(trained_models["cone_cut"], repository)
    model_dir = repository / "isolation_cone_cut"
    assert first.model_dir == model_dir and first.version == 1
    assert first.export.onnx_path == model_dir / "1" / "model.onnx"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    config = parse_config((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
    assert config.platform == "onnxruntime_onnx"
    assert [i.name for i in config.input] == ["globals"]

    second = export_to_repository(trained_models["cone_cut"], repository)
    assert second.version == 2 and (model_dir / "2" / "model.onnx").is_file()

    before = (model_dir / "1" / "model.onnx").read_bytes()
    with pytest.raises(ConfigError, match="version 1 already exists"):
        export_to_repository(trained_models["cone_cut"], repository, version=1)
    assert (model_dir / "1" / "model.onnx").read_bytes() == before
    export_to_repository(trained_models["cone_cut"], repository, version=1, force=True)

    cpu = export_to_repository(
        trained_models["dnn"], tmp_path / "cpu", name="iso_cpu", flavour="cpu"
    )
    assert (cpu.model_dir / "1" / "model.py").is_file()
    metadata = {p.key: p.value for p in onnx.load(str(cpu.export.onnx_path)).metadata_props}
    assert metadata["bsym_model_name"] == "iso_cpu"


def test_cli(trained_models: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(export_cli.export_command)
    repository = tmp_path / "repo"
    args = [str(trained_models["dnn"]), "--repository", str(repository), "--name", "iso"]

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(repository / "iso" / "1" / "model.onnx") in result.output
    assert "max |Δ|" in result.output and "version 1" in result.output

    refused = CliRunner().invoke(app, [*args, "--version", "1"])
    assert refused.exit_code == 1
    assert export_cli.DEFAULT_TOLERANCE == DEFAULT_TOLERANCE


WITHOUT_TRITONCLIENT = """
import sys
sys.modules["tritonclient"] = None  # as if the triton extra were not installed
from typer.testing import CliRunner
from bsym.cli import app
from bsym.errors import MissingExtraError
from bsym.export.onnx_export import export_to_repository
from bsym.serving import TritonModel
from pathlib import Path

checkpoint, repository = sys.argv[1:]
result = CliRunner().invoke(app, ["export", checkpoint, "--repository", repository])
print(result.output)
assert result.exit_code == 0, result.exception
try:
    export_to_repository(Path(checkpoint), Path(repository))
except MissingExtraError as error:
    print(f"second version: {error}")
try:
    TritonModel("localhost:8001", "isolation_cones").feature_spec
except MissingExtraError as error:
    print(f"client: {error}")
"""


def test_export_needs_no_tritonclient(trained_models: dict[str, Path], tmp_path: Path) -> None:
    """``bsym export`` works without the triton extra; where it is needed, the error says how
    to install it."""
    repository = tmp_path / "repo"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITONCLIENT, str(trained_models["dnn"]), repository],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repository / "isolation_cones" / "1" / "model.onnx").is_file()
    assert (repository / "isolation_cones" / "config.pbtxt").is_file()
    assert "client: scoring with model 'isolation_cones' on a Triton server needs " in result.stdout
    assert "install it with: pip install 'bsym[triton]'" in result.stdout
    # A version beside existing ones parses their config.pbtxt, which needs Triton's schema.
    assert "second version: reading a Triton config.pbtxt needs tritonclient" in result.stdout
    assert not (repository / "isolation_cones" / "2").exists()
