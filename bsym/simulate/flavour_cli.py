"""``bsym simulate flavour``: b, c and light jets with their tracks, for flavour tagging."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stdout, user_errors
from bsym.simulate.flavour_config import FlavourConfig


def flavour_command(
    jets: Annotated[int, typer.Option("--jets", "-n", min=1, help="Jets to generate.")] = 100_000,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output directory.")
    ] = Path("data/flavour"),
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 1,
    jets_per_file: Annotated[int, typer.Option(min=1, help="Jets per output file.")] = 100_000,
    b_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of b jets.")
    ] = FlavourConfig().b_fraction,
    c_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of c jets (the rest are light).")
    ] = FlavourConfig().c_fraction,
) -> None:
    """b (hadronFlavour 5), c (4) and light (0) jets with displaced and prompt tracks.

    Writes, from the same jets, flavour_jets_XXX.root (TTree 'Jets', one entry per jet,
    tracks jagged: the training layout) and flavour_events_XXX.root (TTree 'Events', PFNano
    layout: Jet_*, PFCands_* and the JetPFCands_jetIdx / JetPFCands_pFCandsIdx links), with
    the generator's parameters as JSON in the TObjString 'bsym/flavour'.
    """
    from bsym.simulate.flavour import write_flavour

    with user_errors():
        config = FlavourConfig(b_fraction=b_fraction, c_fraction=c_fraction)
        paths = write_flavour(out, jets, seed=seed, config=config, jets_per_file=jets_per_file)
    for path in paths:
        stdout.print(f"wrote {path}")
