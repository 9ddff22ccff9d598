"""The ``bsym`` command line: one thin command per stage over typed library functions."""

from __future__ import annotations

import typer

from bsym.console import exit_on_sigterm
from bsym.export.adopt_cli import adopt_command
from bsym.export.cli import export_command, repository_app
from bsym.serving.cli import score_command, serve_command
from bsym.simulate.calo_rotation_cli import calo_rotation_command
from bsym.simulate.cli import simulate_app
from bsym.simulate.flavour_cli import flavour_command
from bsym.simulate.lorentz_cli import lorentz_command
from bsym.training.cli import evaluate_command, train_command
from bsym.training.studies.cli import study_app

app = typer.Typer(
    name="bsym",
    help="Symmetry-aware taggers: simulate, train, evaluate, export to ONNX, serve, score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
simulate_app.command("lorentz")(lorentz_command)
simulate_app.command("calo-rotation")(calo_rotation_command)
simulate_app.command("flavour")(flavour_command)
app.add_typer(simulate_app, name="simulate")
app.add_typer(study_app, name="study")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("export")(export_command)
app.command("adopt")(adopt_command)
app.add_typer(repository_app, name="repository")
app.command("score")(score_command)
app.command("serve")(serve_command)


def main() -> None:
    """The ``bsym`` command: the app, with SIGTERM ending it like Ctrl-C (status 143)."""
    with exit_on_sigterm():
        app()
