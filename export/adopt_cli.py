"""``bsym adopt``: a foreign ONNX model (weaver, salt, torch.onnx.export) into the repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stdout, user_errors
from bsym.contract import DEFAULT_REPOSITORY
from bsym.export.triton.common import Flavour


def adopt_command(
    model: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="The foreign model.onnx.")
    ],
    spec: Annotated[
        Path,
        typer.Option(
            exists=True, dir_okay=False, help="Adoption YAML: 'features' and 'adopt' sections."
        ),
    ],
    name: Annotated[str, typer.Option(help="Model name; it names the output branches.")],
    parity_data: Annotated[
        list[str],
        typer.Option(
            "--parity-data",
            help="ROOT inputs (file.root[:tree], globs) the parity check runs on. Repeatable.",
        ),
    ],
    repository: Annotated[
        Path, typer.Option(help="Triton model repository to write into.")
    ] = DEFAULT_REPOSITORY,
    version: Annotated[
        int | None, typer.Option(min=1, help="Model version (default: the next free one).")
    ] = None,
    flavour: Annotated[
        Flavour, typer.Option(help="Triton config: 'production' (GPU), 'cpu' or 'gpu'.")
    ] = Flavour.production,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing version of the model.")
    ] = False,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Largest allowed |original - adopted| (default: the file's, 1e-4)."),
    ] = None,
) -> None:
    """Adopt a model bsym did not train: the adapter goes into its graph, checked for parity."""
    with user_errors():
        from bsym.export.adopt import adopt

        report = adopt(
            model,
            spec,
            name,
            parity_data,
            repository,
            version=version,
            flavour=flavour,
            force=force,
            tolerance=tolerance,
        )
    stdout.print(f"ONNX model: {report.onnx_path}", highlight=False, soft_wrap=True)
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diff.items())
    stdout.print(
        f"parity: max |Δ| {diffs} (tolerance {report.tolerance:g}) over {report.parity_rows} "
        f"rows; {'run row by row in the graph (Scan)' if report.per_row else 'batched'}",
        highlight=False,
        soft_wrap=True,
    )
