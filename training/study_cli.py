"""``bsym study``: studies that train many models and compare them (learning curves)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bsym.console import stdout, user_errors

if TYPE_CHECKING:
    from rich.table import Table

    from bsym.training.lorentz_study import RunResult, StudyResult

study_app = typer.Typer(help="Studies: train many models and compare them.", no_args_is_help=True)


@study_app.callback()
def _study() -> None:
    """Studies: train many models and compare them."""


class Task(str, Enum):
    lorentz = "lorentz"


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    """'8k,16k,32000' → (8000, 16000, 32000)."""
    if text is None:
        return None
    sizes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        factor = 1000 if item.lower().endswith("k") else 1
        number = item[:-1] if factor == 1000 else item
        try:
            sizes.append(int(float(number) * factor))
        except ValueError as error:
            raise typer.BadParameter(
                f"'{item}' is not a number of events (e.g. 8k or 8000)"
            ) from error
    if not sizes:
        raise typer.BadParameter("give at least one training size")
    return tuple(sizes)


@study_app.command("learning-curve")
def learning_curve_command(
    task: Annotated[Task, typer.Option(help="Which study.")] = Task.lorentz,
    quick: Annotated[
        bool,
        typer.Option(
            help="Sizes 8k and 32k, 2 repeats, at most 12 epochs, 50k test events: minutes."
        ),
    ] = False,
    sizes: Annotated[
        str | None,
        typer.Option(help="Comma-separated training sizes, e.g. '8k,16k,32k,64k,80k'."),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Trainings per size and model.")
    ] = None,
    breaking: Annotated[
        float | None, typer.Option(min=0.0, help="Detector symmetry breaking (0 = exact).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Maximum epochs per training.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data and the trainings.")] = None,
    reweight: Annotated[
        bool | None,
        typer.Option(
            "--reweight/--no-reweight",
            help="Use the background pT weights in training and AUC (default: on); "
            "--no-reweight is a control where breaking 0 is exactly Lorentz invariant.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            help="Output folder (default: studies/lorentz_b<breaking>).",
        ),
    ] = None,
    data: Annotated[
        Path, typer.Option(file_okay=False, help="Cache of simulated samples (reused).")
    ] = Path("data/lorentz_study"),
    threads: Annotated[
        int,
        typer.Option(
            min=1, help="Torch CPU threads (1 is fastest when other jobs share the cores)."
        ),
    ] = 1,
) -> None:
    """Learning curve of the unconstrained, invariant and dual-subnet taggers (arXiv:2412.18773).

    Trains each network at each training size (default 8k, 16k, 32k, 64k, 80k) with 3
    repeats on the dimuon task, and reports the best-validation-epoch test AUC (weighted with
    the background weights) as mean ± std, and the dual subnet's learned weight on its
    unconstrained subnet in bins of leading-muon pT. Writes learning_curve.json,
    auc_vs_size.png and symmetry_weight_vs_pt.png.

    Training: AdamW lr 1e-3, weight decay 0.01, batch 256, at most 40 epochs, lr / 3 after 3
    epochs without a better validation AUC, stop after 8 (all three stretched so that
    every training gets at least 2,400 steps), keep the best-validation epoch;
    background weights in the loss (weighted BCE). The full study takes about 40 minutes on
    one CPU core; --quick a few minutes.
    """
    from bsym.training.lorentz_study import (
        QUICK,
        StudySettings,
        run_study,
        with_overrides,
        write_outputs,
    )

    with user_errors():
        settings = with_overrides(
            QUICK if quick else StudySettings(),
            sizes=parse_sizes(sizes),
            repeats=repeats,
            breaking=breaking,
            max_epochs=epochs,
            seed=seed,
            reweight=reweight,
        )
        suffix = "" if settings.reweight else "_unweighted"
        out_dir = out or Path(f"studies/{task.value}_b{settings.breaking:g}{suffix}")
        out_dir.mkdir(parents=True, exist_ok=True)
        log = out_dir / "runs.jsonl"
        log.write_text("")
        result = run_study(
            settings, data, on_run=lambda run: _report_run(run, log), threads=threads
        )
        paths = [log, *write_outputs(result, out_dir)]
    stdout.print(auc_table(result))
    stdout.print(weight_table(result))
    stdout.print(f"{len(result.runs)} trainings in {result.seconds / 60:.1f} min")
    for path in paths:
        stdout.print(f"wrote {path}")


def _report_run(run: RunResult, log: Path) -> None:
    """One line on the terminal, one JSON line in ``log`` (kept if the study is interrupted)."""
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    with log.open("a") as stream:
        stream.write(json.dumps(asdict(run)) + "\n")
    tqdm.write(
        f"{run.model:>13} {run.size:>6} #{run.repeat}: test AUC {run.test_auc:.4f} "
        f"(val {run.val_auc:.4f}, best epoch {run.best_epoch}/{run.epochs}, {run.seconds:.0f} s)"
    )


def auc_table(result: StudyResult) -> Table:
    """The paper's layout: one row per training size, one column per model, best in bold."""
    from rich.table import Table

    from bsym.training.lorentz_study import MODEL_TITLES

    summary = result.summary()
    settings = result.settings
    table = Table(
        title=f"test AUC, mean ± std of {settings.repeats} (breaking {settings.breaking:g})"
    )
    table.add_column("train events", justify="right")
    for model in settings.models:
        table.add_column(MODEL_TITLES[model], justify="center")
    for size in settings.sizes:
        means = {m: summary[m][size][0] for m in settings.models if size in summary[m]}
        best = max(means, key=means.__getitem__) if means else None
        cells = []
        for model in settings.models:
            if size not in summary[model]:
                cells.append("–")
                continue
            mean, std = summary[model][size]
            text = f"{mean:.4f} ± {std:.4f}"
            cells.append(f"[bold]{text}[/]" if model == best else text)
        table.add_row(_size_label(size), *cells)
    return table


def weight_table(result: StudyResult) -> Table:
    """Mean learned weight on the unconstrained subnet: one row per leading-pT bin, one column
    per training size."""
    from rich.table import Table

    from bsym.training.lorentz_study import pt_bin_labels

    summary = result.weight_summary()
    table = Table(title="dual subnet: mean w_unconstrained (± std over repeats)")
    table.add_column("pT0 [GeV]", justify="right")
    for size in summary:
        table.add_column(_size_label(size), justify="center")
    for index, label in enumerate(pt_bin_labels()):
        cells = [f"{bins[index][0]:.2f}±{bins[index][1]:.2f}" for bins in summary.values()]
        table.add_row(label, *cells)
    return table


def _size_label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)
