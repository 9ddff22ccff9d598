"""``bsym score`` and ``bsym serve``: thin commands over :mod:`bsym.serving`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bsym.console import stderr, stdout, user_errors
from bsym.contract import DEFAULT_REPOSITORY, find_model
from bsym.errors import ConfigError
from bsym.export.triton.common import DEFAULT_CPU_INSTANCES, DEFAULT_GPU_INSTANCES
from bsym.serving.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IN_FLIGHT,
    DEFAULT_PADDING,
    DEFAULT_RETRY_TIMEOUT,
    DEFAULT_STEP_SIZE,
    DEFAULT_TIMEOUT,
    Padding,
)
from bsym.serving.serve import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
from bsym.serving.triton_server import DEFAULT_STARTUP_TIMEOUT, HOST

LOG_NAME = "bsym-score.log"

if TYPE_CHECKING:
    from bsym.serving.distributed import BackendSettings
    from bsym.serving.scorer import ScoreSummary


def resolve_model(model: str, repository: Path) -> Path:
    """A path to ``model.onnx``, or ``<repository>/<name>/<latest version>/model.onnx``."""
    path = Path(model)
    if path.is_file():
        return path
    if path.suffix == ".onnx":
        raise typer.BadParameter(f"no such model file: {path}", param_hint="'--model'")
    try:
        found = (
            find_model(path.parent, path.name) if path.is_dir() else find_model(repository, model)
        )
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="'--model'") from error
    if not found.resolve().is_relative_to(repository.resolve()):
        stderr.print(
            f"note: --model {model} is {found.resolve()}, outside --repository {repository}",
            highlight=False,
        )
    return found


def _step_size(text: str) -> int | str:
    """uproot's step size: a number of entries ('50000') or an amount of memory ('100 MB')."""
    return int(text) if text.strip().isdigit() else text


def score_command(
    files: Annotated[
        list[str],
        typer.Argument(
            help="ROOT files: paths, globs ('dir/*.root'), URLs (root://, https://, s3://) "
            "or 'file.root:tree'."
        ),
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
    ] = DEFAULT_REPOSITORY,
    step_size: Annotated[
        str, typer.Option(help="Entries read per chunk: a count or a size like '100 MB'.")
    ] = DEFAULT_STEP_SIZE,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Rows per inference call.")
    ] = DEFAULT_BATCH_SIZE,
    threads: Annotated[
        int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all cores).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rescore inputs whose output is complete.")] = False,
    strict_inputs: Annotated[
        bool,
        typer.Option(
            help="Fail a file whose inputs are outside the model's training range "
            "(see the input report); its friend tree is not written."
        ),
    ] = False,
    f_c: Annotated[
        float | None,
        typer.Option(
            "--f-c",
            min=0,
            max=1,
            help="Charm fraction of a flavour tagger's D_b branch (default: the one it was "
            "trained with).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    device: Annotated[
        str,
        typer.Option(
            metavar="DEVICE",
            help="Where ONNX Runtime runs the model: cpu, cuda or cuda:N (CUDA needs "
            "onnxruntime-gpu, bsym[gpu]).",
        ),
    ] = "cpu",
    padding: Annotated[
        Padding,
        typer.Option(
            help="For a model with a dynamic constituent axis: 'group' runs rows of similar "
            "constituent count together, each group cut to its longest row; 'longest' cuts "
            "each batch to its longest row; 'fixed' pads every row to the maximum. The scores "
            "are the same; only the speed differs.",
        ),
    ] = DEFAULT_PADDING,
    debug: Annotated[
        bool,
        typer.Option(help=f"Print tracebacks of unexpected errors instead of writing {LOG_NAME}."),
    ] = False,
    server: Annotated[
        str | None,
        typer.Option(
            help="Triton gRPC address HOST:PORT: send the tensors there instead of running "
            "the model here (--model is then the model's name on the server).",
            rich_help_panel="Triton",
        ),
    ] = None,
    model_version: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Model version on the server (default: the latest ready).",
            rich_help_panel="Triton",
        ),
    ] = None,
    in_flight: Annotated[
        int, typer.Option(min=1, help="Requests in flight at once.", rich_help_panel="Triton")
    ] = DEFAULT_IN_FLIGHT,
    timeout: Annotated[
        float,
        typer.Option(min=0.001, help="Seconds to wait for one answer.", rich_help_panel="Triton"),
    ] = DEFAULT_TIMEOUT,
    retry_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to keep retrying, with backoff, while the server is unavailable.",
            rich_help_panel="Triton",
        ),
    ] = DEFAULT_RETRY_TIMEOUT,
    dask: Annotated[
        str | None,
        typer.Option(
            help="Spread the files over Dask workers: 'local' or 'local:N' (a LocalCluster of "
            "N single-threaded worker processes, default one per core) or a scheduler address "
            "'tcp://HOST:PORT' (inputs and --out must be visible to its workers).",
            rich_help_panel="Dask",
        ),
    ] = None,
    dask_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds to wait for the scheduler at --dask to answer.",
            rich_help_panel="Dask",
        ),
    ] = DEFAULT_CONNECT_TIMEOUT,
) -> None:
    """Score ROOT files with a model; write one friend tree per file into --out."""
    from bsym.serving.scorer import model_file_identity, score_files

    if dask is not None and threads is not None:
        raise typer.BadParameter(
            "with --dask every worker runs one ONNX Runtime thread", param_hint="'--threads'"
        )
    settings = _backend_settings(
        model,
        repository,
        batch_size=batch_size,
        threads=1 if dask is not None else threads,
        server=server,
        model_version=model_version,
        in_flight=in_flight,
        timeout=timeout,
        retry_timeout=retry_timeout,
        device=device,
    )
    with user_errors(), settings.open() as backend:
        if dask is None:
            summary = score_files(
                files,
                backend,
                out,
                step_size=_step_size(step_size),
                force=force,
                progress=progress,
                strict_inputs=strict_inputs,
                padding=padding,
                f_c=f_c,
            )
        else:
            from bsym.serving.distributed import (
                ScoreSettings,
                dask_client,
                parse_address,
                score_files_distributed,
            )

            try:
                parse_address(dask)
            except ValueError as error:
                raise typer.BadParameter(str(error), param_hint="'--dask'") from error
            scoring = ScoreSettings(
                settings,
                model_file_identity(backend)[1],
                step_size=_step_size(step_size),
                force=force,
                strict_inputs=strict_inputs,
                padding=padding,
                f_c=f_c,
            )
            with dask_client(dask, connect_timeout=dask_timeout) as client:
                summary = score_files_distributed(
                    files, backend, scoring, out, client, progress=progress
                )
    print_summary(summary, log=write_tracebacks(summary, out, debug=debug))
    if summary.failed:
        raise typer.Exit(code=1)


def write_tracebacks(summary: ScoreSummary, out: Path, *, debug: bool) -> Path | None:
    """Print the tracebacks of unexpected errors (``debug``) or write them to the log file."""
    if not summary.tracebacks:
        return None
    text = "".join(f"{source}:\n{trace}\n" for source, trace in summary.tracebacks)
    if debug:
        stderr.print(text, highlight=False, markup=False)
        return None
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_NAME
    log.write_text(text)
    return log


def _backend_settings(
    model: str,
    repository: Path,
    *,
    batch_size: int,
    threads: int | None,
    server: str | None,
    model_version: int | None,
    in_flight: int,
    timeout: float,
    retry_timeout: float,
    device: str = "cpu",
) -> BackendSettings:
    """The embedded ONNX Runtime backend's settings, or the Triton one's with ``server``."""
    from bsym.serving.distributed import BackendSettings

    if server is None:
        if model_version is not None:
            raise typer.BadParameter("needs --server", param_hint="'--model-version'")
        path = resolve_model(model, repository).absolute()
        return BackendSettings(str(path), threads=threads, batch_size=batch_size, device=device)
    if device.strip().lower() != "cpu":
        raise typer.BadParameter(
            "the Triton server chooses its own devices; --device is for the embedded backend",
            param_hint="'--device'",
        )
    if model.endswith(".onnx") or "/" in model:
        raise typer.BadParameter(
            f"with --server, give the model's name on the server, not a path ('{model}')",
            param_hint="'--model'",
        )
    return BackendSettings(
        model,
        server=server,
        model_version=model_version,
        batch_size=batch_size,
        in_flight=in_flight,
        timeout=timeout,
        retry_timeout=retry_timeout,
    )


def print_summary(summary: ScoreSummary, *, log: Path | None = None) -> None:
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
    if summary.removed_partials:
        stdout.print(
            f"note: removed {len(summary.removed_partials)} partial file(s) that ended processes "
            f"left in {summary.removed_partials[0].parent}",
            highlight=False,
        )
    for result in summary.results:
        if result.reading:
            stdout.print(result.reading, highlight=False)
    for result in summary.results:
        if result.note:
            stdout.print(f"note: {result.source}: {result.note}", highlight=False)
    stdout.print(
        f"{len(summary.scored)} scored, {len(summary.skipped)} skipped, "
        f"{len(summary.failed)} failed; {summary.entries:,} entries, {summary.objects:,} objects "
        f"in {summary.seconds:.1f} s ({summary.objects_per_second:,.0f} objects/s)"
        + (f" on {summary.workers} Dask workers" if summary.workers else ""),
        highlight=False,
    )
    if not summary.monitored:
        stdout.print(
            f"note: model '{summary.model}' records no input ranges (exported before bsym "
            "recorded them); its inputs are not checked against the training range",
            highlight=False,
        )
    for line in summary.input_warnings():
        stderr.print(f"[bold yellow]warning:[/] {line}", highlight=False)
    if summary.input_report is not None:
        stdout.print(f"input report: {summary.input_report}", highlight=False)
    for source, message in summary.failed:
        stderr.print(f"[bold red]failed:[/] {source}: {message}", highlight=False)
    if log is not None:
        stderr.print(f"tracebacks of the unexpected errors: {log}", highlight=False)


def serve_command(
    repository: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False, help="Model repository (production configs)."),
    ] = DEFAULT_REPOSITORY,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface).")] = HOST,
    grpc_port: Annotated[
        int, typer.Option(min=0, max=65535, help="gRPC port (0: a free one).")
    ] = DEFAULT_GRPC_PORT,
    http_port: Annotated[
        int, typer.Option(min=0, max=65535, help="HTTP port (0: a free one).")
    ] = DEFAULT_HTTP_PORT,
    instances: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Instances per model (one ONNX Runtime thread each), per GPU with --gpu.",
            show_default=f"{DEFAULT_CPU_INSTANCES}, {DEFAULT_GPU_INSTANCES} with --gpu",
        ),
    ] = None,
    startup_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for every model to be ready.")
    ] = DEFAULT_STARTUP_TIMEOUT,
    gpu: Annotated[
        bool,
        typer.Option(
            "--gpu",
            help="Serve on GPUs: KIND_GPU Python-backend instances running ONNX Runtime's CUDA "
            "provider (needs a GPU and onnxruntime-gpu where the server runs).",
        ),
    ] = False,
) -> None:
    """Serve the model repository with Triton (CPU, or GPU with --gpu) until Ctrl-C or SIGTERM."""
    from bsym.serving.serve import ServedRepository, serve_until_stopped

    def ready(served: ServedRepository) -> None:
        server = served.server
        stdout.print(
            f"serving {', '.join(served.models)} from {served.repository} "
            f"({served.flavour.value} flavour)\n"
            f"gRPC URL: {server.grpc_url}\nHTTP URL: {server.http_url}\n"
            "Ctrl-C or SIGTERM stops the server",
            highlight=False,
        )
        sys.stdout.flush()

    served = ServedRepository(
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        instances=instances or (DEFAULT_GPU_INSTANCES if gpu else DEFAULT_CPU_INSTANCES),
        startup_timeout=startup_timeout,
        gpu=gpu,
    )
    try:
        with user_errors():
            serve_until_stopped(served, ready)
    except KeyboardInterrupt:
        stderr.print("interrupted while starting; the server was stopped")
        raise typer.Exit(code=130) from None
    stdout.print("server stopped")
