"""``bsym simulate``: toy physics and detector simulations written as ROOT files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stdout, user_errors
from bsym.simulate.isolation_config import IsolationConfig

simulate_app = typer.Typer(
    help="Generate toy ROOT ntuples (physics + detector).", no_args_is_help=True
)


@simulate_app.command("isolation")
def isolation_command(
    events: Annotated[
        int, typer.Option("--events", "-n", min=1, help="Dimuon events to generate.")
    ] = 20_000,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output directory.")
    ] = Path("data/isolation"),
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 1,
    pileup_mean: Annotated[
        float,
        typer.Option(min=0.0, help="Mean number of pile-up and underlying-event particles."),
    ] = IsolationConfig().pileup_mean,
    events_per_file: Annotated[int, typer.Option(min=1, help="Events per output file.")] = 50_000,
) -> None:
    """Prompt (Z→μμ) and non-prompt (b, c jets) muons with the calorimeter cells around them.

    Writes the training layout (tree 'Muons', one entry per muon) and the NanoAOD-style
    analysis layout (tree 'Events', one entry per event) of the same muons.
    """
    from bsym.simulate.isolation import write_isolation

    with user_errors():
        paths = write_isolation(
            out,
            events,
            seed=seed,
            config=IsolationConfig(pileup_mean=pileup_mean),
            events_per_file=events_per_file,
        )
    for path in paths:
        stdout.print(f"wrote {path}")
