"""``bsym simulate lorentz``: dimuon events (Z against γ*) with a Lorentz-breaking detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stdout, user_errors


def lorentz_command(
    events: Annotated[
        int, typer.Option("--events", "-n", min=1, help="Dimuon events to generate.")
    ] = 100_000,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output directory.")
    ] = Path("data/lorentz"),
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 1,
    breaking: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Detector smearing: σ of the common pT shift over the leading pT (0 = exact).",
        ),
    ] = 0.10,
    events_per_file: Annotated[int, typer.Option(min=1, help="Events per output file.")] = 100_000,
) -> None:
    """Parton-level q q̄ → Z → μμ (signal) and q q̄ → γ* → μμ (background), two muons each.

    Writes lorentz_XXX.root with the TTree 'Events' (one entry per event): the muons' px, py,
    pz, E and pt (leading first), lead_pt, label (1 = Z), weight (background reweighted to the
    signal's leading-pT spectrum) and mass_true. The detector adds one Gaussian shift of width
    breaking·pT(leading) to both muons' pT, which breaks Lorentz invariance.
    """
    from bsym.simulate.lorentz import write_lorentz

    with user_errors():
        paths = write_lorentz(
            out, events, seed=seed, breaking=breaking, events_per_file=events_per_file
        )
    for path in paths:
        stdout.print(f"wrote {path}")
