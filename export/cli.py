"""``bsym export``: a checkpoint into the Triton model repository, verified against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stderr, stdout, user_errors
from bsym.contract import DEFAULT_REPOSITORY
from bsym.export.defaults import DEFAULT_AUC_TOLERANCE, DEFAULT_TOLERANCE, Precision, QuantFormat
from bsym.export.triton.common import Flavour


def export_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="checkpoint.pt written by bsym train."),
    ],
    repository: Annotated[
        Path, typer.Option(help="Triton model repository to write into.")
    ] = DEFAULT_REPOSITORY,
    name: Annotated[
        str | None,
        typer.Option(help="Model name (default: the config's name); it names output branches."),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(min=1, help="Model version (default: the next free one)."),
    ] = None,
    flavour: Annotated[
        Flavour,
        typer.Option(
            help="Triton config: 'production' (ONNX Runtime backend, GPU), 'cpu' "
            "(Python backend running the same model.onnx on CPUs) or 'gpu' (Python backend "
            "on GPUs, ONNX Runtime's CUDA provider)."
        ),
    ] = Flavour.production,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing version of the model; keep a bf16/int8 model that "
            "loses more AUC than --auc-tolerance.",
        ),
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(
            help="Largest allowed |torch - ONNX Runtime| on any output value (absolute).",
        ),
    ] = DEFAULT_TOLERANCE,
    parity_data: Annotated[
        list[str] | None,
        typer.Option(
            "--parity-data",
            help="ROOT inputs (file.root[:tree], globs) for the parity check; default: the "
            "checkpoint's held-out test rows. Repeatable.",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="Numeric precision of the written model: fp32, bf16 (bfloat16 weights, fp32 "
            "arithmetic on CPU) or int8 (static quantization calibrated on training rows). "
            "See docs/precision.md.",
        ),
    ] = Precision.fp32,
    auc_tolerance: Annotated[
        float,
        typer.Option(
            help="Largest allowed loss of held-out AUC of a bf16/int8 model against fp32; "
            "a model that loses more is refused unless --force.",
        ),
    ] = DEFAULT_AUC_TOLERANCE,
    quant_format: Annotated[
        QuantFormat,
        typer.Option(
            case_sensitive=False,
            help="int8 graph format: QDQ, QOperator, or auto (build both, keep the one that "
            "runs faster on this CPU).",
        ),
    ] = QuantFormat.auto,
) -> None:
    """Export a checkpoint to ONNX, check it against torch, and add it to the model repository."""
    with user_errors():
        from bsym.export.onnx_export import export_to_repository

        entry = export_to_repository(
            checkpoint,
            repository,
            name=name,
            version=version,
            flavour=flavour,
            force=force,
            parity_data=parity_data or None,
            tolerance=tolerance,
            precision=precision,
            auc_tolerance=auc_tolerance,
            quant_format=quant_format,
        )
    report = entry.export
    parity = report.parity
    stdout.print(f"ONNX model: {report.onnx_path}", highlight=False, soft_wrap=True)
    stdout.print(
        f"parity: max |Δ| = {parity.worst:.2e} (tolerance {parity.tolerance:g}) over "
        f"{parity.rows} rows of {parity.source}, batch sizes "
        f"{', '.join(map(str, parity.batch_sizes))}",
        highlight=False,
        soft_wrap=True,
    )
    if report.precision is not None:
        stdout.print(f"precision: {report.precision.summary()}", highlight=False, soft_wrap=True)
    stdout.print(
        f"repository: {entry.model_dir} version {entry.version} ({entry.flavour.value} config)",
        highlight=False,
        soft_wrap=True,
    )


repository_app = typer.Typer(help="Inspect a Triton model repository.", no_args_is_help=True)


@repository_app.command("check")
def check_command(
    names: Annotated[
        list[str] | None, typer.Argument(help="Models to check (default: every model).")
    ] = None,
    repository: Annotated[
        Path, typer.Option(help="Triton model repository to check.")
    ] = DEFAULT_REPOSITORY,
) -> None:
    """Check every version's model.onnx against the sha256 its config.pbtxt records."""
    with user_errors():
        from bsym.export.triton.check import check_repository

        report = check_repository(repository, names or None)
    for problem in report.problems:
        stderr.print(f"[bold red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    versions = sum(len(found) for found in report.versions.values())
    stdout.print(
        f"{repository}: {len(report.versions)} models, {versions} versions checked, "
        f"{len(report.problems)} problems",
        highlight=False,
        soft_wrap=True,
    )
    if report.problems:
        raise typer.Exit(code=1)
