"""torch → ONNX that verifies and records what it wrote.

:func:`export_onnx` traces a checkpoint's model with a dynamic batch axis (and a dynamic
constituent axis where the model allows one), runs ``onnx.checker``, and compares ONNX
Runtime against torch on held-out rows (the checkpoint's test split, or given files): the
largest absolute difference of every output, on probabilities, must not exceed ``tolerance``
(default :data:`DEFAULT_TOLERANCE` = 1e-4), in large batches, in batches of one row, in an
odd batch size and, with a dynamic constituent axis, on rows cut to their longest row. The
feature spec, the config, the bsym version and git commit, the class labels and the parity
result go into ``metadata_props``, so the file alone says what it is and how to feed it.

:func:`export_to_repository` does the same into a Triton model repository.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import bsym
from bsym import contract
from bsym.console import stderr
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export.defaults import (
    CALIBRATION_ROWS,
    DEFAULT_AUC_TOLERANCE,
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    Precision,
    QuantFormat,
)
from bsym.export.precision import HeldOut, PrecisionReport, cpu_session
from bsym.export.triton.common import Flavour
from bsym.features import FeatureBatch, narrowed, slot_lengths
from bsym.rootio import atomic_output, parse_inputs

if TYPE_CHECKING:
    import onnx
    import torch

    from bsym.training.checkpoint import LoadedModel

PARITY_MAX_ROWS = 20_000
PARITY_MIN_ROWS = 2_000
PARITY_BATCH_SIZES = (4096, 333, 1)
PARITY_THREADS = 0
"""Intra-op threads of the parity sessions: 0 leaves the count to ONNX Runtime."""
SINGLE_ROW_CHECKS = 64
"""Batches of one row are slow in Python, so only the first rows are checked one by one."""

DEFAULT_OUTPUT_NAMES = (contract.SCORE,)


@dataclass(frozen=True)
class ParityReport:
    """torch against ONNX Runtime on the same rows."""

    rows: int
    source: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: dict[str, float]
    """Per output, the largest absolute difference over all rows and batch sizes."""
    tolerance: float

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it was verified."""

    onnx_path: Path
    model_name: str
    model_type: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    opset: int
    parity: ParityReport
    metadata: dict[str, str]
    precision: PrecisionReport | None = None
    """The reduced-precision model against fp32; ``None`` for an fp32 export."""


@dataclass(frozen=True)
class RepositoryEntry:
    """An export placed in a Triton model repository."""

    export: ExportReport
    repository: Path
    model_dir: Path
    version: int
    flavour: Flavour


def export_onnx(
    checkpoint: Path,
    out: Path,
    *,
    parity_data: Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    name: str | None = None,
    precision: Precision = Precision.fp32,
    auc_tolerance: float = DEFAULT_AUC_TOLERANCE,
    quant_format: QuantFormat = QuantFormat.auto,
) -> ExportReport:
    """Export ``checkpoint`` to ``out`` after the checker and the parity check pass.

    ``name`` overrides the model name recorded in the metadata (it names output branches,
    so it must be an identifier). An existing ``out`` is replaced only with ``force``; the
    file is written beside ``out`` and renamed, so a failed export leaves nothing behind.
    ``precision`` bf16 or int8 writes the reduced-precision variant of the verified fp32
    graph (:mod:`bsym.export.precision`); one that loses more held-out AUC than
    ``auc_tolerance`` is refused unless ``force``.
    """
    _refuse_overwrite(out, force)
    from bsym.training.checkpoint import load_checkpoint

    loaded = load_checkpoint(Path(checkpoint))
    return _export_loaded(
        loaded,
        Path(out),
        parity_data=parity_data,
        tolerance=tolerance,
        opset=opset,
        name=name,
        reduced=_Reduced(Precision(precision), auc_tolerance, QuantFormat(quant_format), force),
    )


def export_to_repository(
    checkpoint: Path,
    repository: Path = contract.DEFAULT_REPOSITORY,
    *,
    name: str | None = None,
    version: int | None = None,
    flavour: Flavour = Flavour.production,
    force: bool = False,
    parity_data: Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    precision: Precision = Precision.fp32,
    auc_tolerance: float = DEFAULT_AUC_TOLERANCE,
    quant_format: QuantFormat = QuantFormat.auto,
) -> RepositoryEntry:
    """Export ``checkpoint`` as ``repository/<name>/<version>/model.onnx`` with its config.

    ``version`` defaults to the next free one; an existing version is replaced only with
    ``force``. ``flavour`` picks the Triton config (``production``: ONNX Runtime backend on
    GPUs; ``cpu``: the Python backend on CPUs). ``precision`` as for :func:`export_onnx`
    (``force`` also keeps a variant above ``auc_tolerance``).
    """
    from bsym.export.triton.description import check_model_name
    from bsym.export.triton.render import flavour_of
    from bsym.export.triton.repository import write_model_version
    from bsym.training.checkpoint import load_checkpoint

    flavour = flavour_of(flavour)
    loaded = load_checkpoint(Path(checkpoint))
    model_name = _model_name(loaded, name)
    check_model_name(model_name)
    repository = Path(repository)
    model_dir = repository / model_name
    # without a version, the next free one is chosen under the model's lock when it is written
    if version is not None and version < 1:
        raise ConfigError(f"model '{model_name}': version must be >= 1, got {version}")
    if version is not None and (model_dir / str(version)).exists() and not force:
        raise ConfigError(
            f"model '{model_name}' version {version} already exists in {repository}; pass "
            "--force to replace it, or leave --version out to take the next free one"
        )
    with tempfile.TemporaryDirectory(prefix="bsym-export-") as tmp:
        report = _export_loaded(
            loaded,
            Path(tmp) / contract.MODEL_FILENAME,
            parity_data=parity_data,
            tolerance=tolerance,
            opset=opset,
            name=model_name,
            reduced=_Reduced(
                Precision(precision),
                auc_tolerance,
                QuantFormat(quant_format),
                force,
                destination=f"{repository / model_name}/<version>/{contract.MODEL_FILENAME}",
            ),
        )
        version = write_model_version(
            report.onnx_path, repository, model_name, version, flavour=flavour, force=force
        )
    placed = dataclasses.replace(
        report, onnx_path=model_dir / str(version) / contract.MODEL_FILENAME
    )
    return RepositoryEntry(placed, repository, model_dir, version, flavour)


def _export_loaded(
    loaded: LoadedModel,
    out: Path,
    *,
    parity_data: Sequence[str] | None,
    tolerance: float,
    opset: int,
    name: str | None,
    reduced: _Reduced | None = None,
) -> ExportReport:
    import onnx

    if not tolerance > 0:
        raise ConfigError(f"the parity tolerance must be positive, got {tolerance}")
    model = loaded.model
    model_name = _model_name(loaded, name)
    input_names = tuple(model.input_names)
    output_names = tuple(getattr(model, "output_names", DEFAULT_OUTPUT_NAMES))
    batch, source = _parity_batch(loaded, parity_data)
    inputs = onnx_inputs(batch, input_names)

    proto = to_onnx(model, inputs, input_names, output_names, opset)
    check_graph(proto, f"model '{model_name}': the exported graph")
    try:
        parity = check_parity(
            model, proto, inputs, output_names, tolerance=tolerance, source=source
        )
    except SpecMismatchError as error:
        raise SpecMismatchError(f"model '{model_name}': {error}; {out} was not written") from error
    if parity.rows < PARITY_MIN_ROWS:
        stderr.print(
            f"[yellow]warning:[/] parity checked on only {parity.rows} rows from {source}",
            highlight=False,
        )
    metadata = _metadata(loaded, model_name, parity)
    precision_report = None
    if reduced is not None and reduced.precision is not Precision.fp32:
        proto, precision_report = _reduce(
            loaded, model_name, proto, batch, inputs, source, reduced, out
        )
        metadata |= precision_report.metadata()
    onnx.helper.set_model_props(proto, metadata)
    with atomic_output(out) as temporary:
        onnx.save_model(proto, str(temporary))
    return ExportReport(
        onnx_path=out,
        model_name=model_name,
        model_type=loaded.checkpoint.model_type,
        input_names=input_names,
        output_names=output_names,
        opset=opset,
        parity=parity,
        metadata=metadata,
        precision=precision_report,
    )


@dataclass(frozen=True)
class _Reduced:
    precision: Precision
    auc_tolerance: float
    quant_format: QuantFormat
    force: bool
    destination: str = ""
    """What a refusal names as not written (default: the output file)."""


def _reduce(
    loaded: LoadedModel,
    model_name: str,
    proto: onnx.ModelProto,
    batch: FeatureBatch,
    inputs: dict[str, npt.NDArray[Any]],
    source: str,
    reduced: _Reduced,
    out: Path,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """The reduced-precision variant of the verified fp32 ``proto``, refused (before anything
    is written) when it loses more AUC on ``batch`` (whose model ``inputs`` are given) than
    allowed, unless forced."""
    from bsym.export.precision import reduce_precision

    if batch.label is None or len(np.unique(batch.label)) < 2:
        raise ConfigError(
            f"model '{model_name}': the {reduced.precision.value} parity check needs labelled "
            f"rows of both classes, and {source} has none"
        )
    held_out = HeldOut(inputs, batch.label, batch.weight, source)
    calibration = None
    if reduced.precision is Precision.int8:
        calibration = onnx_inputs(_calibration_batch(loaded), loaded.model.input_names)
    stderr.print(f"building the {reduced.precision.value} model…", highlight=False)
    variant, report = reduce_precision(
        proto,
        reduced.precision,
        held_out,
        calibration=calibration,
        quant_format=reduced.quant_format,
        auc_tolerance=reduced.auc_tolerance,
    )
    check_graph(variant, f"model '{model_name}': the {reduced.precision.value} graph")
    if not report.acceptable and not reduced.force:
        raise SpecMismatchError(
            f"model '{model_name}': {report.summary()}; the AUC loss exceeds the tolerance, so "
            f"{reduced.destination or out} was not written (pass --force to keep it, or raise "
            "--auc-tolerance)"
        )
    return variant, report


def _calibration_batch(loaded: LoadedModel) -> FeatureBatch:
    """:data:`CALIBRATION_ROWS` rows of the training split (its first, in its random order)."""
    from bsym.training.dataset import recorded_rows

    train = loaded.split.train
    if len(train) == 0:
        raise ConfigError(f"{loaded.path} records no training rows to calibrate int8 on")
    return recorded_rows(loaded.config, loaded.split, train[:CALIBRATION_ROWS])


def check_parity(
    model: torch.nn.Module,
    proto: onnx.ModelProto,
    inputs: dict[str, npt.NDArray[Any]],
    output_names: Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    source: str = "given rows",
) -> ParityReport:
    """Compare ONNX Runtime with torch on ``inputs``; raise if any output differs too much.

    ``inputs`` maps tensor names to arrays in the model's input order. Raises
    :class:`SpecMismatchError` naming the output and its largest deviation.
    """
    rows = len(next(iter(inputs.values())))
    expected = _torch_outputs(model, inputs, output_names)
    session = cpu_session(proto.SerializeToString(), threads=PARITY_THREADS)
    worst = worst_differences(session, inputs, expected, source, candidate="ONNX Runtime")
    if has_dynamic_constituents(session):
        narrow = narrowed_differences(session, inputs, expected, source)
        worst = {output: max(worst[output], narrow[output]) for output in worst}
    for output, deviation in worst.items():
        if not deviation <= tolerance:
            raise SpecMismatchError(
                f"output '{output}': ONNX Runtime differs from torch by up to {deviation:.3g} "
                f"on {rows} rows from {source}, above the tolerance {tolerance:g}"
            )
    return ParityReport(rows, source, PARITY_BATCH_SIZES, worst, tolerance)


def check_graph(proto: Any, what: str) -> None:
    """Run onnx.checker (full check); a failure is a :class:`SpecMismatchError` naming ``what``."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise SpecMismatchError(f"{what} fails onnx.checker: {error}") from error


def worst_differences(
    session: Any,
    inputs: dict[str, npt.NDArray[Any]],
    expected: dict[str, npt.NDArray[np.float64]],
    source: str,
    *,
    candidate: str,
    reference: str = "torch",
) -> dict[str, float]:
    """The largest |``session`` - ``expected``| per output over :data:`PARITY_BATCH_SIZES`
    (the first :data:`SINGLE_ROW_CHECKS` rows one by one); raises on a shape mismatch or NaN."""
    rows = len(next(iter(inputs.values())))
    worst = dict.fromkeys(expected, 0.0)
    for batch_size in PARITY_BATCH_SIZES:
        limit = min(rows, SINGLE_ROW_CHECKS) if batch_size == 1 else rows
        for start in range(0, limit, batch_size):
            stop = min(start + batch_size, limit)
            feed = {key: value[start:stop] for key, value in inputs.items()}
            results = session.run(list(expected), feed)
            for output, result in zip(expected, results, strict=True):
                deviation = _deviation(
                    result,
                    expected[output][start:stop],
                    f"output '{output}': {candidate}",
                    f"{reference} (rows {start}..{stop - 1} of {source})",
                )
                worst[output] = max(worst[output], deviation)
    return worst


def _deviation(
    result: Any, wanted: npt.NDArray[np.float64], candidate: str, reference: str
) -> float:
    """max |``result`` - ``wanted``|; a shape mismatch or a NaN raises, naming both sides."""
    if np.shape(result) != wanted.shape:
        raise SpecMismatchError(
            f"{candidate} gives shape {np.shape(result)}, {reference} {wanted.shape}"
        )
    difference = np.abs(np.asarray(result, np.float64) - wanted)
    deviation = float(np.max(difference, initial=0.0))
    if math.isnan(deviation):
        raise SpecMismatchError(f"{candidate} or {reference} gives NaN")
    return deviation


def has_dynamic_constituents(session: Any) -> bool:
    """Whether the session's ``constituents`` input takes any number of slots."""
    for node in session.get_inputs():
        if node.name == contract.CONSTITUENTS:
            return len(node.shape) > 1 and not isinstance(node.shape[1], int)
    return False


def narrowed_differences(
    session: Any,
    inputs: dict[str, npt.NDArray[Any]],
    expected: dict[str, npt.NDArray[np.float64]],
    source: str,
) -> dict[str, float]:
    """The largest |``session`` - ``expected``| per output when rows grouped by their number
    of constituent slots are run with the constituent axis cut to each group's longest row,
    as the scorer runs them; ``expected`` is of the rows padded in full."""
    lengths = slot_lengths(inputs[contract.MASK])
    order = np.argsort(lengths, kind="stable")
    step = PARITY_BATCH_SIZES[1]
    worst = dict.fromkeys(expected, 0.0)
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        width = max(int(lengths[rows].max()), 1)
        feed = narrowed(inputs, width, rows)
        results = session.run(list(expected), feed)
        for output, result in zip(expected, results, strict=True):
            deviation = _deviation(
                result,
                expected[output][rows],
                f"output '{output}': ONNX Runtime on rows cut to {width} constituent slots",
                f"torch (rows of {source})",
            )
            worst[output] = max(worst[output], deviation)
    return worst


def _refuse_overwrite(out: Path, force: bool) -> None:
    if Path(out).exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")


def _model_name(loaded: LoadedModel, name: str | None) -> str:
    model_name = name or loaded.config.name
    if not (model_name.isascii() and model_name.isidentifier()):
        raise ConfigError(
            f"model name '{model_name}' must be an identifier (letters, digits and '_', not "
            "starting with a digit): it names the output branches"
        )
    return model_name


def _parity_batch(
    loaded: LoadedModel, parity_data: Sequence[str] | None
) -> tuple[FeatureBatch, str]:
    from bsym.training.dataset import read_rows, take

    if parity_data:
        tree = loaded.config.data.tree or loaded.spec.tree
        sources = parse_inputs(parity_data, default_tree=tree)
        batch, _ = read_rows(sources, loaded.spec, max_rows=PARITY_MAX_ROWS)
        source = ", ".join(str(s) for s in sources)
    elif len(loaded.split.test) == 0:
        raise ConfigError(
            f"{loaded.path} has no held-out test rows (data.test_fraction=0); pass "
            "--parity-data FILES for the parity check"
        )
    else:
        batch = loaded.held_out_test()
        source = f"the test split of {loaded.path}"
    if batch.n_rows > PARITY_MAX_ROWS:
        batch = take(batch, np.arange(PARITY_MAX_ROWS, dtype=np.int64))
    return batch, source


def onnx_inputs(batch: FeatureBatch, input_names: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The tensors ``input_names`` of ``batch``, C-contiguous, as ONNX Runtime is fed them."""
    available = batch.inputs()
    missing = [name for name in input_names if name not in available]
    if missing:
        raise SpecMismatchError(
            f"the model takes {', '.join(input_names)}, but the parity data give no "
            f"{', '.join(missing)} (found {', '.join(available) or 'none'})"
        )
    return {name: np.ascontiguousarray(available[name]) for name in input_names}


def to_onnx(
    model: torch.nn.Module,
    inputs: dict[str, npt.NDArray[Any]],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Trace ``model`` on the first rows of ``inputs`` with a dynamic batch axis everywhere,
    and a dynamic constituent axis where the model allows one (``dynamic_constituents``)."""
    import onnx
    import torch

    example = tuple(torch.from_numpy(inputs[name][:2]) for name in input_names)
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in (*input_names, *output_names)}
    if getattr(model, "dynamic_constituents", False):
        for name in (contract.CONSTITUENTS, contract.MASK):
            if name in axes:
                axes[name][1] = "constituents"
    model.eval()
    # The dynamo exporter needs onnxscript, which bsym does not depend on; the TorchScript
    # exporter handles these models and warns only that it is the older path.
    with (
        tempfile.TemporaryDirectory(prefix="bsym-trace-") as tmp,
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = Path(tmp) / contract.MODEL_FILENAME
        torch.onnx.export(
            model,
            example,
            traced,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
        return onnx.load_model(str(traced))


def _torch_outputs(
    model: torch.nn.Module, inputs: dict[str, npt.NDArray[Any]], output_names: Sequence[str]
) -> dict[str, npt.NDArray[np.float64]]:
    import torch

    rows = len(next(iter(inputs.values())))
    chunks: dict[str, list[npt.NDArray[np.float64]]] = {name: [] for name in output_names}
    with torch.inference_mode():
        for start in range(0, rows, PARITY_BATCH_SIZES[0]):
            tensors = [
                torch.from_numpy(v[start : start + PARITY_BATCH_SIZES[0]]) for v in inputs.values()
            ]
            result = model(*tensors)
            outputs = result if isinstance(result, tuple | list) else (result,)
            if len(outputs) != len(output_names):
                raise SpecMismatchError(
                    f"the model returns {len(outputs)} tensor(s), but names "
                    f"{len(output_names)} outputs ({', '.join(output_names)})"
                )
            for output, tensor in zip(output_names, outputs, strict=True):
                chunks[output].append(tensor.numpy().astype(np.float64))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _metadata(loaded: LoadedModel, model_name: str, parity: ParityReport) -> dict[str, str]:
    labels = loaded.config.class_labels
    discriminant = loaded.config.discriminant
    flavour = {} if discriminant is None else {contract.DISCRIMINANT_KEY: discriminant.to_json()}
    return {
        contract.FEATURE_SPEC_KEY: loaded.spec.to_json(),
        contract.CONFIG_KEY: loaded.config.model_dump_json(),
        contract.VERSION_KEY: bsym.__version__,
        contract.GIT_COMMIT_KEY: git_commit(Path(bsym.__file__).resolve().parent),
        contract.MODEL_NAME_KEY: model_name,
        contract.MODEL_TYPE_KEY: loaded.checkpoint.model_type,
        contract.CLASS_LABELS_KEY: json.dumps(list(labels)),
        contract.PARITY_MAX_ABS_DIFF_KEY: repr(parity.worst),
        contract.PARITY_TOLERANCE_KEY: repr(parity.tolerance),
        contract.PARITY_ROWS_KEY: str(parity.rows),
        **flavour,
    }


def git_commit(source_dir: Path) -> str:
    """``git rev-parse HEAD`` of the tree holding ``source_dir``, or ``"unknown"``."""
    try:
        result = subprocess.run(
            ["git", "-C", str(source_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"
