"""``bsym train`` and ``bsym evaluate``: thin commands over the training library.

torch, uproot and the rest are imported inside the commands so ``bsym --help`` stays instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from bsym.console import stderr, stdout, user_errors


def train_command(
    config: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="training config (YAML)"),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set optimizer.lr=3e-4 (value read as YAML); "
            "repeatable",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            metavar="CHECKPOINT",
            help="continue from a checkpoint (usually last.pt)",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="overwrite a trained model in the output directory")
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            metavar="DEVICE",
            help="where the network trains: cpu, cuda, cuda:N, or auto (cuda if PyTorch sees "
            "a GPU, else cpu); bf16 autocast is the config key optimizer.autocast",
        ),
    ] = "cpu",
) -> None:
    """Train a model from a config; writes checkpoint.pt, last.pt and config.yaml."""
    _log_to_stderr()
    with user_errors():
        from bsym.training.config import load_config
        from bsym.training.train import train

        settings = load_config(config, overrides or [])
        result = train(settings, resume=resume, overwrite=force, device=device)
    from bsym.training.dataset import describe_split

    stdout.print("\n".join(describe_split(result.split)), highlight=False, soft_wrap=True)
    ending = "stopped early" if result.stopped_early else "finished"
    stdout.print(
        f"{settings.name}: {ending} after {result.epochs} epoch(s); best validation AUC "
        f"{result.best_val_auc:.4f} at epoch {result.best_epoch}\n"
        f"checkpoint: {result.checkpoint}",
        highlight=False,
    )


def evaluate_command(
    model: Annotated[
        list[Path],
        typer.Option(
            "--model",
            "-m",
            exists=True,
            dir_okay=False,
            metavar="CHECKPOINT",
            help="checkpoint to evaluate; repeat to compare models",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            metavar="DIR",
            help="output directory",
            show_default="evaluation/ beside the first checkpoint",
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            metavar="FILES",
            help="ROOT inputs (file.root, dir/*.root, file.root:tree); repeatable",
            show_default="each checkpoint's held-out test rows",
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=2, help="bootstrap resamplings for the uncertainties")
    ] = 100,
) -> None:
    """Evaluate trained models: ROC curves, AUCs with uncertainties, plots."""
    _log_to_stderr()
    with user_errors():
        from bsym.training.evaluate import comparison_table, evaluate

        result = evaluate(
            model,
            out if out is not None else model[0].parent / "evaluation",
            data=data or None,
            n_bootstrap=bootstrap,
        )
    from bsym.training.tables import to_rich

    table = comparison_table(result.models, n_bootstrap=bootstrap, title=result.title)
    stdout.print(to_rich(table))
    stdout.print(
        f"metrics: {result.metrics_path}\nROC curve: {result.roc_path}",
        highlight=False,
        soft_wrap=True,
    )


def _log_to_stderr() -> None:
    """Show bsym's INFO messages on stderr, unless a handler is already set up."""
    logger = logging.getLogger("bsym")
    if logger.handlers or logging.getLogger().handlers:
        return
    from rich.logging import RichHandler

    logger.addHandler(RichHandler(console=stderr, show_path=False, show_time=False))
    logger.setLevel(logging.INFO)
