"""``bsym score`` and ``bsym serve``: thin commands over :mod:`bsym.serving`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bsym.console import stderr, stdout, user_errors
from bsym.errors import did_you_mean

if TYPE_CHECKING:
    from bsym.serving.scorer import ScoreSummary

MODEL_FILE = "model.onnx"


def resolve_model(model: str, repository: Path) -> Path:
    """A path to ``model.onnx``, or ``<repository>/<name>/<latest version>/model.onnx``."""
    path = Path(model)
    if path.is_file():
        return path
    if path.suffix == ".onnx":
        raise typer.BadParameter(f"no such model file: {path}", param_hint="'--model'")
    directory = path if path.is_dir() else repository / model
    if not directory.is_dir():
        names = [p.name for p in repository.iterdir() if p.is_dir()] if repository.is_dir() else []
        raise typer.BadParameter(
            f"no model '{model}' in the model repository {repository}{did_you_mean(model, names)}",
            param_hint="'--model'",
        )
    versions = [
        int(version.name)
        for version in directory.iterdir()
        if version.name.isdigit() and (version / MODEL_FILE).is_file()
    ]
    if not versions:
        raise typer.BadParameter(
            f"{directory} has no numbered version directory holding {MODEL_FILE}",
            param_hint="'--model'",
        )
    return directory / str(max(versions)) / MODEL_FILE


def _step_size(text: str) -> int | str:
    """uproot's step size: a number of entries ('50000') or an amount of memory ('100 MB')."""
    return int(text) if text.strip().isdigit() else text


def score_command(
    files: Annotated[
        list[str],
        typer.Argument(help="ROOT files: paths, globs ('dir/*.root') or 'file.root:tree'."),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Path to a model.onnx, or a model name in the model repository (latest version).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", file_okay=False, help="Directory for the friend trees."),
    ],
    repository: Annotated[
        Path, typer.Option(help="Model repository where --model names are looked up.")
    ] = Path("model_repository"),
    step_size: Annotated[
        str, typer.Option(help="Entries read per chunk: a count or a size like '100 MB'.")
    ] = "100 MB",
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per inference call.")] = 1024,
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all cores).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rescore inputs whose output is complete.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score ROOT files with a model; write one friend tree per file into --out."""
    from bsym.serving.onnx_backend import OnnxRuntimeBackend
    from bsym.serving.scorer import score_files

    model_path = resolve_model(model, repository)
    with (
        user_errors(),
        OnnxRuntimeBackend(model_path, threads=threads, batch_size=batch_size) as backend,
    ):
        summary = score_files(
            files, backend, out, step_size=_step_size(step_size), force=force, progress=progress
        )
    print_summary(summary)
    if summary.failed:
        raise typer.Exit(code=1)


def print_summary(summary: ScoreSummary) -> None:
    """A table of the files, a line of totals and, last, every failure with its reason."""
    from rich.table import Table

    table = Table(title=f"bsym score: model '{summary.model}'", title_justify="left")
    for name in ("input", "status", "entries", "objects", "output"):
        numeric = name in {"entries", "objects"}
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for result in summary.results:
        objects = f"{result.objects:,}" if result.status == "scored" else "-"
        table.add_row(
            result.source, result.status, f"{result.entries:,}", objects, str(result.output)
        )
    for source, _ in summary.failed:
        table.add_row(source, "[red]failed[/]", "-", "-", "-")
    stdout.print(table)
    for result in summary.results:
        if result.note:
            stdout.print(f"note: {result.source}: {result.note}", highlight=False)
    stdout.print(
        f"{len(summary.scored)} scored, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed; {summary.entries:,} entries, {summary.objects:,} objects "
        f"in {summary.seconds:.1f} s ({summary.objects_per_second:,.0f} objects/s)",
        highlight=False,
    )
    for source, message in summary.failed:
        stderr.print(f"[bold red]failed:[/] {source}: {message}", highlight=False)


def serve_command() -> None:
    """Start Triton on the model repository (not implemented yet)."""
    stderr.print("bsym serve: not implemented yet")
    raise typer.Exit(code=1)
