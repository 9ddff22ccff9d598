"""bsym export --precision: int8 and bf16 variants, their parity against fp32, the refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import typer
import uproot
from typer.testing import CliRunner

from bsym import contract
from bsym.errors import BsymError, SpecMismatchError
from bsym.export import cli as export_cli
from bsym.export.defaults import CALIBRATION_ROWS, Precision, QuantFormat
from bsym.export.onnx_export import export_onnx, export_to_repository
from bsym.export.precision import _to_bfloat16_bits, float_nodes
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.training.checkpoint import load_checkpoint
from bsym.training.metrics import roc_auc

LENIENT = 0.05
"""The one-epoch test models are far from converged; these tests check the mechanics."""


def metadata_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def held_out_scores(path: Path, checkpoint: Path) -> tuple[np.ndarray, float]:
    loaded = load_checkpoint(checkpoint)
    batch = loaded.held_out_test()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: batch.inputs()[name] for name in loaded.model.input_names}
    (scores,) = session.run(["score"], feed)
    return scores[:, 0].astype(np.float64), roc_auc(batch.label, scores[:, 0], batch.weight)


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_exports_records_its_parity_and_scores_a_root_file(
    trained_models: dict[str, Path], isolation_sample: Path, tmp_path: Path
) -> None:
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(trained_models["pfn"], fp32)
    report = export_onnx(
        trained_models["pfn"], int8, precision=Precision.int8, auc_tolerance=LENIENT
    )

    assert report.precision is not None and report.precision.format in {"QDQ", "QOperator"}
    rates = report.precision.format_rates
    assert set(rates) == {"QDQ", "QOperator"} and rates[report.precision.format] == max(
        rates.values()
    )
    assert op_types(int8) & {"QuantizeLinear", "QLinearMatMul", "MatMulInteger"}
    assert "QuantizeLinear" not in op_types(fp32)
    fp32_scores, fp32_auc = held_out_scores(fp32, trained_models["pfn"])
    int8_scores, int8_auc = held_out_scores(int8, trained_models["pfn"])
    metadata = metadata_of(int8)
    assert metadata[contract.PRECISION_KEY] == "int8"
    assert metadata[contract.PRECISION_FORMAT_KEY] == report.precision.format
    assert float(metadata[contract.PRECISION_AUC_FP32_KEY]) == pytest.approx(fp32_auc, abs=1e-9)
    assert float(metadata[contract.PRECISION_AUC_KEY]) == pytest.approx(int8_auc, abs=1e-9)
    loss = float(metadata[contract.PRECISION_AUC_LOSS_KEY])
    assert loss == pytest.approx(fp32_auc - int8_auc, abs=1e-9) and loss <= LENIENT
    worst = float(metadata[contract.PRECISION_MAX_ABS_DIFF_KEY])
    assert worst == pytest.approx(np.max(np.abs(int8_scores - fp32_scores)), abs=1e-6)
    assert worst > 0
    assert float(metadata[contract.PRECISION_AUC_TOLERANCE_KEY]) == LENIENT
    assert int(metadata[contract.PRECISION_ROWS_KEY]) == len(int8_scores)
    assert int(metadata[contract.PRECISION_CALIBRATION_ROWS_KEY]) <= CALIBRATION_ROWS
    assert float(metadata[contract.PRECISION_SPEEDUP_KEY]) > 0
    # the fp32 provenance is there too
    assert metadata[contract.MODEL_NAME_KEY] == "isolation_pfn"
    assert contract.FEATURE_SPEC_KEY in metadata

    backend = OnnxRuntimeBackend(int8)
    source = str(isolation_sample / "isolation_muons_000.root")
    summary = score_files([source], backend, tmp_path / "scored", progress=False)
    assert not summary.failed and len(summary.scored) == 1
    with uproot.open(summary.scored[0].output) as file:
        (name,) = [k for k, v in file.classnames().items() if v == "TTree"]
        friend = file[name]["isolation_pfn"].array(library="np")
    with uproot.open(source) as file:
        assert len(friend) == file["Muons"].num_entries
    assert np.all((friend >= 0) & (friend <= 1))


@pytest.mark.parametrize(
    ("quant_format", "present", "absent"),
    [
        (QuantFormat.qdq, "DequantizeLinear", "QGemm"),
        (QuantFormat.qoperator, "QGemm", "Relu"),
    ],
)
def test_int8_formats(
    trained_models: dict[str, Path],
    tmp_path: Path,
    quant_format: QuantFormat,
    present: str,
    absent: str,
) -> None:
    out = tmp_path / "int8.onnx"
    report = export_onnx(
        trained_models["dnn"],
        out,
        precision=Precision.int8,
        auc_tolerance=LENIENT,
        quant_format=quant_format,
    )
    assert report.precision is not None and report.precision.format == quant_format.value
    # QDQ: float Gemms fed by DequantizeLinear; QOperator: QGemm with the Relu fused in
    assert present in op_types(out) and absent not in op_types(out)
    assert metadata_of(out)[contract.PRECISION_FORMAT_KEY] == quant_format.value


def test_int8_keeps_preprocessing_and_head_in_float(trained_models: dict[str, Path]) -> None:
    loaded = load_checkpoint(trained_models["pfn"])
    batch = loaded.held_out_test()
    from bsym.export.onnx_export import to_onnx

    inputs = {name: batch.inputs()[name] for name in loaded.model.input_names}
    proto = to_onnx(loaded.model, inputs, tuple(loaded.model.input_names), ("score",))
    kept = set(float_nodes(proto))
    nodes = list(proto.graph.node)
    by_name = {node.name: node for node in nodes}
    weighted = [node for node in nodes if node.op_type in {"MatMul", "Gemm"}]
    assert weighted[-1].name in kept and weighted[0].name not in kept
    assert all(by_name[name].op_type != "MatMul" for name in kept if name != weighted[-1].name)
    assert "Sigmoid" in {by_name[name].op_type for name in kept}
    assert {"Sub", "Div"} <= {by_name[name].op_type for name in kept}


def test_a_variant_losing_more_than_the_tolerance_is_refused(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    with pytest.raises(SpecMismatchError, match=r"exceeds the tolerance.*was not written"):
        export_onnx(trained_models["pfn"], out, precision=Precision.int8, auc_tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []

    repository = tmp_path / "repo"
    with pytest.raises(SpecMismatchError, match="exceeds the tolerance") as refused:
        export_to_repository(
            trained_models["pfn"], repository, precision=Precision.bf16, auc_tolerance=-1.0
        )
    assert f"{repository / 'isolation_pfn'}/<version>/model.onnx was not written" in str(
        refused.value
    )
    assert not (repository / "isolation_pfn").exists()

    forced = export_onnx(
        trained_models["pfn"], out, precision=Precision.int8, auc_tolerance=-1.0, force=True
    )
    assert forced.precision is not None and not forced.precision.acceptable
    assert float(metadata_of(out)[contract.PRECISION_AUC_TOLERANCE_KEY]) == -1.0


def test_bf16_stores_bfloat16_weights_and_scores_close_to_fp32(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    fp32, bf16 = tmp_path / "fp32.onnx", tmp_path / "bf16.onnx"
    export_onnx(trained_models["pfn"], fp32)
    report = export_onnx(trained_models["pfn"], bf16, precision=Precision.bf16)

    weights = [t for t in onnx.load(str(bf16)).graph.initializer if t.name.endswith("_bf16")]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    originals = {t.name: t for t in onnx.load(str(fp32)).graph.initializer}
    for weight in weights:
        original = originals[weight.name.removesuffix("_bf16")]
        assert original.data_type == onnx.TensorProto.FLOAT and weight.dims == original.dims
        assert len(weight.raw_data) == 2 * int(np.prod(weight.dims))
    fp32_scores, _ = held_out_scores(fp32, trained_models["pfn"])
    bf16_scores, _ = held_out_scores(bf16, trained_models["pfn"])
    assert 0 < np.max(np.abs(bf16_scores - fp32_scores)) < 0.02
    assert report.precision is not None and report.precision.calibration_rows == 0
    assert metadata_of(bf16)[contract.PRECISION_KEY] == "bf16"


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [rng.normal(0, 1, 5000), rng.normal(0, 1e-30, 100), [0.0, -0.0, 1e38, -3.0]]
    ).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(_to_bfloat16_bits(values), expected.view(np.uint16))


def test_repository_serves_the_precision(trained_models: dict[str, Path], tmp_path: Path) -> None:
    entry = export_to_repository(
        trained_models["dnn"],
        tmp_path / "repo",
        name="iso_int8",
        precision=Precision.int8,
        auc_tolerance=LENIENT,
        quant_format=QuantFormat.qdq,
    )
    config = (entry.model_dir / contract.CONFIG_FILENAME).read_text(encoding="utf-8")
    assert f'key: "1/{contract.PRECISION_KEY}"\n    value: {{ string_value: "int8" }}' in config
    assert f"1/{contract.PRECISION_AUC_LOSS_KEY}" in config
    assert f"1/{contract.PRECISION_MAX_ABS_DIFF_KEY}" in config


def test_triton_serves_an_int8_model_as_embedded_does(
    trained_models: dict[str, Path], isolation_sample: Path, tmp_path: Path
) -> None:
    from bsym.serving.serve import ServedRepository
    from bsym.serving.triton_client import TritonBackend
    from bsym.serving.triton_server import find_tritonserver

    try:
        find_tritonserver()
    except BsymError as error:
        pytest.skip(f"tritonserver unavailable: {error}")
    entry = export_to_repository(
        trained_models["pfn"], tmp_path / "repo", precision=Precision.int8, auc_tolerance=LENIENT
    )
    reference = OnnxRuntimeBackend(entry.export.onnx_path)
    batch = load_checkpoint(trained_models["pfn"]).held_out_test()
    feed = {name: batch.inputs()[name][:1000] for name in reference.input_names}
    with (
        ServedRepository(entry.repository, grpc_port=0, http_port=0) as served,
        TritonBackend(served.grpc_url, entry.export.model_name, batch_size=500) as backend,
    ):
        found = backend.predict(feed)
    expected = reference.predict(feed)
    assert np.max(np.abs(found["score"] - expected["score"])) <= 1e-6


def test_cli(trained_models: dict[str, Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(export_cli.export_command)
    repository = tmp_path / "repo"
    args = [str(trained_models["dnn"]), "--repository", str(repository), "--name", "iso"]

    result = CliRunner().invoke(
        app,
        [*args, "--precision", "int8", "--auc-tolerance", str(LENIENT), "--quant-format", "qdq"],
    )
    assert result.exit_code == 0, result.output
    assert "precision: int8 (QDQ)" in result.output and "held-out AUC" in result.output

    refused = CliRunner().invoke(app, [*args, "--precision", "bf16", "--auc-tolerance", "-1"])
    assert refused.exit_code == 1
    assert "exceeds the tolerance" in refused.output
    assert not (repository / "iso" / "2").exists()
