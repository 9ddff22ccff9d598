"""Reduced-precision variants of an exported fp32 graph, and how much they lose.

``int8``: ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``),
calibrated on rows of the model's training split: unsigned 8-bit activations, signed 8-bit
weights, percentile calibration. The graph's input preprocessing (normalisation, the CNN's
binning of cells into an image: every node before the first MatMul/Gemm/Conv) and its head
(the last weighted layer and the sigmoid or softmax after it) stay in float: quantized binning
breaks the image, and an 8-bit score has only 256 values, whose ties cost AUC. Both of ONNX
Runtime's formats are built (QDQ: float ops wrapped in QuantizeLinear/DequantizeLinear that
the runtime fuses; QOperator: QLinearMatMul/QLinearConv nodes) and, by default, the one that
runs faster here is kept.

``bf16``: the weights of every MatMul, Gemm and Conv stored as bfloat16, cast to float where
used. ONNX Runtime's CPU provider has no bfloat16 MatMul, Gemm or Conv kernels (a graph
computing in bfloat16 fails to load), so the arithmetic stays fp32: the file is half the size
and scores as bfloat16 weights do, at the fp32 rate. docs/precision.md has the measurements.

:func:`compare` gives the parity of a variant: the held-out AUC of fp32 and of the variant,
the loss, and the largest |Δ score|, with the measured speed-up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from bsym import contract
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export.defaults import Precision, QuantFormat

if TYPE_CHECKING:
    import onnx

WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")
CALIBRATION_BATCH = 256
TIMING_BATCH = 4096
TIMING_REPEATS = 3
TIMING_SECONDS = 0.25


@dataclass(frozen=True)
class PrecisionReport:
    """A reduced-precision graph against the fp32 graph on the same held-out rows."""

    precision: Precision
    format: str
    rows: int
    source: str
    auc_fp32: float
    auc: float
    max_abs_diff: float
    auc_tolerance: float
    calibration_rows: int
    rate_fp32: float
    rate: float
    """Rows/s on one ONNX Runtime CPU thread, in batches of :data:`TIMING_BATCH`."""
    format_rates: dict[str, float]
    """Rows/s of every format built (both int8 formats with ``auto``); the fastest is kept."""

    @property
    def auc_loss(self) -> float:
        return self.auc_fp32 - self.auc

    @property
    def speedup(self) -> float:
        return self.rate / self.rate_fp32

    @property
    def acceptable(self) -> bool:
        return self.auc_loss <= self.auc_tolerance

    def metadata(self) -> dict[str, str]:
        return {
            contract.PRECISION_KEY: self.precision.value,
            contract.PRECISION_FORMAT_KEY: self.format,
            contract.PRECISION_AUC_KEY: repr(self.auc),
            contract.PRECISION_AUC_FP32_KEY: repr(self.auc_fp32),
            contract.PRECISION_AUC_LOSS_KEY: repr(self.auc_loss),
            contract.PRECISION_AUC_TOLERANCE_KEY: repr(self.auc_tolerance),
            contract.PRECISION_MAX_ABS_DIFF_KEY: repr(self.max_abs_diff),
            contract.PRECISION_ROWS_KEY: str(self.rows),
            contract.PRECISION_CALIBRATION_ROWS_KEY: str(self.calibration_rows),
            contract.PRECISION_SPEEDUP_KEY: f"{self.speedup:.3f}",
        }

    def summary(self) -> str:
        built = ""
        if len(self.format_rates) > 1:
            rates = ", ".join(f"{name} {rate:,.0f}" for name, rate in self.format_rates.items())
            built = f"; built {rates} rows/s, kept the faster"
        return (
            f"{self.precision.value} ({self.format}): held-out AUC {self.auc:.5f} against "
            f"{self.auc_fp32:.5f} in fp32 (loss {self.auc_loss:+.5f}, tolerance "
            f"{self.auc_tolerance:g}), max |Δ score| {self.max_abs_diff:.3g} over {self.rows} "
            f"rows of {self.source}; {self.rate:,.0f} rows/s against {self.rate_fp32:,.0f} "
            f"in fp32 ({self.speedup:.2f}×, one thread, measured at export){built}"
        )


@dataclass(frozen=True)
class HeldOut:
    """Labelled rows the variants are compared on."""

    inputs: dict[str, npt.NDArray[Any]]
    label: npt.NDArray[np.int64]
    weight: npt.NDArray[np.floating[Any]] | None
    source: str


def reduce_precision(
    proto: onnx.ModelProto,
    precision: Precision,
    held_out: HeldOut,
    *,
    calibration: dict[str, npt.NDArray[Any]] | None = None,
    quant_format: QuantFormat = QuantFormat.auto,
    auc_tolerance: float,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """The ``precision`` variant of the fp32 graph ``proto`` and its parity on ``held_out``.

    int8 needs ``calibration`` rows. The report says whether the loss is acceptable; refusing
    is the caller's choice.
    """
    if not math.isfinite(auc_tolerance):
        raise ConfigError(f"the AUC tolerance must be a finite number, got {auc_tolerance}")
    variant = fastest_variant(
        proto, precision, held_out.inputs, calibration=calibration, quant_format=quant_format
    )
    reference = proto.SerializeToString()
    rate_fp32 = inference_rate(reference, held_out.inputs)
    calibration_rows = 0
    if precision is Precision.int8 and calibration is not None:
        calibration_rows = len(next(iter(calibration.values())))
    fp32_scores = run_scores(reference, held_out.inputs)
    scores = run_scores(variant.proto.SerializeToString(), held_out.inputs)
    report = PrecisionReport(
        precision=precision,
        format=variant.format,
        rows=len(held_out.label),
        source=held_out.source,
        auc_fp32=_auc(held_out, fp32_scores),
        auc=_auc(held_out, scores),
        max_abs_diff=float(np.max(np.abs(scores - fp32_scores), initial=0.0)),
        auc_tolerance=auc_tolerance,
        calibration_rows=calibration_rows,
        rate_fp32=rate_fp32,
        rate=variant.format_rates[variant.format],
        format_rates=variant.format_rates,
    )
    return variant.proto, report


@dataclass(frozen=True)
class Variant:
    """A reduced-precision graph and how fast each format built for it ran."""

    format: str
    proto: onnx.ModelProto
    format_rates: dict[str, float]
    """Rows/s of every format built (both int8 formats with ``auto``); ``format`` is the fastest."""


def fastest_variant(
    proto: onnx.ModelProto,
    precision: Precision,
    inputs: dict[str, npt.NDArray[Any]],
    *,
    calibration: dict[str, npt.NDArray[Any]] | None = None,
    quant_format: QuantFormat = QuantFormat.auto,
) -> Variant:
    """The ``precision`` variant of the fp32 graph ``proto``: every format asked for is built
    and timed on ``inputs`` (:func:`inference_rate`), and the fastest kept. int8 needs
    ``calibration`` rows. Like the quantizer, it leaves ``metadata_props`` to the caller."""
    if precision is Precision.fp32:
        raise ConfigError("fp32 is the exported graph itself, not a reduced precision")
    candidates: dict[str, onnx.ModelProto]
    if precision is Precision.bf16:
        candidates = {"bf16 weights, fp32 compute": bf16_weights(proto)}
    else:
        if calibration is None:
            raise ConfigError("int8 quantization needs calibration rows")
        formats = (
            [QuantFormat.qdq, QuantFormat.qoperator]
            if quant_format is QuantFormat.auto
            else [quant_format]
        )
        candidates = {f.value: quantize_int8(proto, calibration, f) for f in formats}
    rates = _fastest(candidates, inputs)
    chosen = max(rates, key=rates.__getitem__)
    return Variant(chosen, candidates[chosen], rates)


def quantize_int8(
    proto: onnx.ModelProto, calibration: dict[str, npt.NDArray[Any]], quant_format: QuantFormat
) -> onnx.ModelProto:
    """Static int8 quantization of ``proto`` calibrated on ``calibration`` (see the module)."""
    import onnx
    from onnxruntime import quantization as q

    if quant_format is QuantFormat.auto:
        raise ConfigError("pick QDQ or QOperator for quantize_int8")
    formats = {QuantFormat.qdq: q.QuantFormat.QDQ, QuantFormat.qoperator: q.QuantFormat.QOperator}
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    excluded = float_nodes(named)
    with tempfile.TemporaryDirectory(prefix="bsym-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(named, str(source))
        with _quiet():
            q.quantize_static(
                str(source),
                str(target),
                _Calibration(calibration),
                quant_format=formats[quant_format],
                activation_type=q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=excluded,
                calibrate_method=q.CalibrationMethod.Percentile,
            )
        quantized = onnx.load_model(str(target))
    # the quantizer drops metadata_props; the exporter writes them afterwards
    return quantized


def float_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes int8 leaves in float: those computing only from the graph inputs
    before any weighted op, and the last weighted op with everything after it. Names the
    graph's unnamed nodes."""
    nodes = _named_nodes(proto)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    preprocessed = {tensor.name for tensor in proto.graph.input}
    keep: list[str] = []
    for node in nodes:
        inputs = [name for name in node.input if name and name not in initializers]
        if node.op_type not in WEIGHTED_OPS and all(name in preprocessed for name in inputs):
            preprocessed.update(node.output)
            keep.append(node.name)
    weighted = [k for k, node in enumerate(nodes) if node.op_type in WEIGHTED_OPS]
    if not weighted:
        raise SpecMismatchError(
            f"the graph has no {'/'.join(WEIGHTED_OPS)} node: int8 has nothing to quantize"
        )
    keep += [node.name for node in nodes[weighted[-1] :]]
    return keep


def bf16_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose MatMul/Gemm/Conv weights are bfloat16 initializers, each
    cast back to float before use."""
    import onnx
    from onnx import helper, numpy_helper

    reduced = onnx.ModelProto()
    reduced.CopyFrom(proto)
    graph = reduced.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weights = {
        name
        for node in graph.node
        if node.op_type in WEIGHTED_OPS
        for name in node.input
        if name in initializers and initializers[name].data_type == onnx.TensorProto.FLOAT
    }
    if not weights:
        raise SpecMismatchError(
            f"the graph has no float {'/'.join(WEIGHTED_OPS)} weights: bf16 changes nothing"
        )
    casts = []
    for name in sorted(weights):
        tensor = initializers[name]
        values = numpy_helper.to_array(tensor).astype(np.float32)
        stored = helper.make_tensor(
            f"{name}_bf16",
            onnx.TensorProto.BFLOAT16,
            values.shape,
            _to_bfloat16_bits(values).tobytes(),
            raw=True,
        )
        graph.initializer.remove(tensor)
        graph.initializer.append(stored)
        casts.append(
            helper.make_node(
                "Cast", [stored.name], [name], to=onnx.TensorProto.FLOAT, name=f"{name}_to_float"
            )
        )
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return reduced


def _to_bfloat16_bits(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round to nearest even, as torch and ONNX Runtime do."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def inference_rate(
    model: bytes | str, inputs: dict[str, npt.NDArray[Any]], *, batch_size: int = TIMING_BATCH
) -> float:
    """Rows/s of ONNX Runtime (CPU, one thread) over ``inputs`` in batches, best of
    :data:`TIMING_REPEATS` measurements of at least :data:`TIMING_SECONDS` each."""
    session = cpu_session(model)
    rows = len(next(iter(inputs.values())))
    feeds = list(_batches(inputs, rows, batch_size))
    session.run(None, feeds[0])
    return max(timed_rate(session, feeds, TIMING_SECONDS) for _ in range(TIMING_REPEATS))


def timed_rate(session: Any, feeds: list[dict[str, npt.NDArray[Any]]], seconds: float) -> float:
    """Rows/s of ``session`` cycling through ``feeds`` for at least ``seconds``: small
    networks score a few thousand rows in milliseconds, too short to time alone."""
    done, start, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds:
        for feed in feeds:
            session.run([contract.SCORE], feed)
            done += len(next(iter(feed.values())))
        elapsed = time.perf_counter() - start
    return done / elapsed


def run_scores(model: bytes | str, inputs: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    """The positive-class score (column 0 of ``score``) of every row."""
    session = cpu_session(model)
    rows = len(next(iter(inputs.values())))
    parts = [
        np.asarray(session.run([contract.SCORE], feed)[0], np.float64)[:, 0]
        for feed in _batches(inputs, rows, TIMING_BATCH)
    ]
    return np.concatenate(parts)


def cpu_session(model: bytes | str, *, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _fastest(
    candidates: dict[str, onnx.ModelProto], inputs: dict[str, npt.NDArray[Any]]
) -> dict[str, float]:
    return {name: inference_rate(p.SerializeToString(), inputs) for name, p in candidates.items()}


def _auc(held_out: HeldOut, scores: npt.NDArray[np.float64]) -> float:
    from bsym.training.metrics import roc_auc

    return roc_auc(held_out.label, scores, held_out.weight)


def _batches(
    inputs: dict[str, npt.NDArray[Any]], rows: int, batch_size: int
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    for start in range(0, rows, batch_size):
        yield {name: value[start : start + batch_size] for name, value in inputs.items()}


def _named_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nodes, each given a unique name where it has none (exclusion goes by name)."""
    nodes: list[onnx.NodeProto] = list(proto.graph.node)
    seen: set[str] = set()
    for k, node in enumerate(nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{k}"
        seen.add(node.name)
    return nodes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer prints its progress and logs advice on the root logger; keep bsym's
    output its own."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _Calibration:
    """The ``CalibrationDataReader`` protocol over fixed rows, in batches of one size (the
    percentile calibrator stacks them); the remainder of the last batch is left out."""

    def __init__(self, inputs: dict[str, npt.NDArray[Any]]) -> None:
        rows = len(next(iter(inputs.values())))
        size = min(rows, CALIBRATION_BATCH)
        self._feeds = _batches(inputs, rows - rows % size, size)

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        return next(self._feeds, None)
