"""``bsym simulate calo-rotation``: two-prong against one-prong showers in a binned detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stdout, user_errors
from bsym.simulate.geometry import Geometry


def parse_edges(text: str | None) -> list[float] | None:
    """'-1,-0.5,0,0.5,1' → [-1.0, -0.5, 0.0, 0.5, 1.0]."""
    if text is None:
        return None
    try:
        return [float(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError as error:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of numbers") from error


def calo_rotation_command(
    events: Annotated[int, typer.Option("--events", "-n", min=1, help="Events to generate.")] = (
        20_000
    ),
    geometry: Annotated[
        Geometry, typer.Option(help="Cells: rect 32×4 or uniform 32×32 on [−1, 1]².")
    ] = Geometry.rect,
    x_edges: Annotated[
        str | None, typer.Option(help="Cell edges in x, comma-separated (replace the preset's).")
    ] = None,
    y_edges: Annotated[
        str | None, typer.Option(help="Cell edges in y, comma-separated (replace the preset's).")
    ] = None,
    stochastic: Annotated[
        float, typer.Option(min=0.0, help="Stochastic term a of σ(E) = √(a²E + b²E²).")
    ] = 0.5,
    constant: Annotated[float, typer.Option(min=0.0, help="Constant term b of σ(E).")] = 0.05,
    threshold: Annotated[
        float, typer.Option(min=0.0, help="Cells need a measured energy above it (GeV).")
    ] = 0.5,
    detector_seed: Annotated[int, typer.Option(min=0, help="Seed of the per-cell noise.")] = 0,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output directory.")
    ] = Path("data/calo_rotation"),
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 1,
    events_per_file: Annotated[int, typer.Option(min=1, help="Events per output file.")] = 100_000,
) -> None:
    """Two-prong showers (signal) against one broader prong, at random orientation, binned.

    Writes calo_rotation_<geometry>_XXX.root with the TTree 'Events' (one entry per event):
    event, label (1 = two prongs), the pre-detector particles Particle_x/y/E and the cells
    above threshold Cell_x/y/E (cell centres, measured energy), and the detector config as
    JSON in the TObjString 'bsym/detector', which training uses to resimulate rotated copies.
    """
    from pydantic import ValidationError

    from bsym.errors import ConfigError
    from bsym.simulate.calo_rotation import DetectorConfig, preset_detector, write_calo_rotation

    with user_errors():
        preset = preset_detector(geometry)
        try:
            detector = DetectorConfig(
                x_edges=parse_edges(x_edges) or preset.x_edges,
                y_edges=parse_edges(y_edges) or preset.y_edges,
                stochastic=stochastic,
                constant=constant,
                threshold=threshold,
                seed=detector_seed,
            )
        except ValidationError as error:
            problems = "; ".join(str(e["msg"]) for e in error.errors())
            raise ConfigError(f"invalid detector: {problems}") from error
        custom = x_edges is not None or y_edges is not None
        name = f"{geometry.value}_custom" if custom else geometry.value
        paths = write_calo_rotation(
            out, events, seed=seed, detector=detector, name=name, events_per_file=events_per_file
        )
    for path in paths:
        stdout.print(f"wrote {path}")
