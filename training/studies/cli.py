"""``bsym study``: studies that train many models and compare them (learning curves)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bsym.console import stdout, user_errors

if TYPE_CHECKING:
    from rich.table import Table

    from bsym.training.studies.augmentation import RunResult as AugmentationRun
    from bsym.training.studies.augmentation import StudyResult as AugmentationResult
    from bsym.training.studies.learning_curve import RunResult, StudyResult

Threads = Annotated[
    int, typer.Option(min=1, help="Torch CPU threads (1 is fastest on shared cores).")
]
DataCache = Annotated[
    Path, typer.Option(file_okay=False, help="Cache of simulated samples (reused).")
]

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
    data: DataCache = Path("data/lorentz_study"),
    threads: Threads = 1,
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
    from bsym.training.studies.learning_curve import (
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
    print_summary(len(result.runs), result.seconds, paths)


class Geometry(str, Enum):
    rect = "rect"
    uniform = "uniform"


@study_app.command("augmentation")
def augmentation_command(
    geometry: Annotated[
        Geometry, typer.Option(help="Detector cells: rect 32×4 or uniform 32×32.")
    ] = Geometry.rect,
    quick: Annotated[
        bool,
        typer.Option(
            help="Sizes 480 and 2400, 2 bootstraps, at most 10 epochs (stretched), 5k test events."
        ),
    ] = False,
    sizes: Annotated[
        str | None, typer.Option(help="Comma-separated training sizes, e.g. '480,960,2400'.")
    ] = None,
    bootstraps: Annotated[
        int | None, typer.Option(min=1, help="Training sets drawn per size.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Maximum epochs per training.")] = None,
    invariance_weight: Annotated[
        float | None, typer.Option(min=0.0, help="c2 of the invariance term (c1 = 1).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data and the trainings.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            file_okay=False,
            help="Output folder (default: studies/augmentation_<geometry>).",
        ),
    ] = None,
    data: DataCache = Path("data/augmentation_study"),
    threads: Threads = 1,
) -> None:
    """Rotation augmentation against training size on calorimeter showers (arXiv:2311.05952).

    Trains an FCN on the image and a PFN on the cells with pre-detector (resimulation) and
    post-detector (image) rotation by multiples of 45°, each with and without the encouraged
    invariance term, and without augmentation, at training sizes 480 to 2,400 with 5
    bootstraps; prints the test AUC and the signal efficiency at 50% background efficiency
    (mean ± std over bootstraps) in the paper's layout. Writes augmentation.json,
    auc_vs_size.png and signal_efficiency_vs_size.png. The full study takes about 22 min on
    one core; --quick a few minutes.
    """
    from bsym.training.studies.augmentation import (
        QUICK,
        StudySettings,
        run_study,
        with_overrides,
        write_outputs,
    )

    with user_errors():
        settings = with_overrides(
            QUICK if quick else StudySettings(),
            geometry=geometry.value,
            sizes=parse_sizes(sizes),
            bootstraps=bootstraps,
            max_epochs=epochs,
            invariance_weight=invariance_weight,
            seed=seed,
        )
        out_dir = out or Path(f"studies/augmentation_{geometry.value}")
        out_dir.mkdir(parents=True, exist_ok=True)
        log = out_dir / "runs.jsonl"
        log.write_text("")
        result = run_study(
            settings,
            data,
            on_run=lambda run: _report_augmentation_run(run, log),
            on_note=lambda note: stdout.print(f"[yellow]{note}[/]"),
            threads=threads,
        )
        paths = [log, *write_outputs(result, out_dir)]
    for metric, title in (
        ("test_auc", "test AUC"),
        ("signal_efficiency", "signal efficiency at 50% background efficiency"),
    ):
        stdout.print(augmentation_table(result, metric, title))
    for name, auc in result.reference.items():
        stdout.print(
            f"invariant-feature reference on the {name} (a lower bound on the rotation-"
            f"invariant ideal): test AUC {auc:.3f}"
        )
    for note in result.notes:
        stdout.print(f"[yellow]{note}[/]")
    print_summary(len(result.runs), result.seconds, paths)


def _report_augmentation_run(run: AugmentationRun, log: Path) -> None:
    log_run(
        run,
        log,
        f"{run.network:>4} {run.column:>9} {run.size:>5} #{run.bootstrap}: AUC "
        f"{run.test_auc:.4f}, εS {run.signal_efficiency:.4f} (val {run.val_auc:.4f}, best "
        f"epoch {run.best_epoch}/{run.epochs}, {run.seconds:.0f} s)",
    )


def augmentation_table(result: AugmentationResult, metric: str, title: str) -> Table:
    """The paper's layout: rows network × training size, columns the five trainings."""
    from rich.table import Table

    from bsym.training.studies.augmentation import COLUMN_TITLES, NETWORK_TITLES

    settings = result.settings
    summary = result.summary(metric)
    table = Table(
        title=f"{title}, {settings.geometry} cells, mean ± std of {settings.bootstraps} bootstraps"
    )
    table.add_column("network", justify="left")
    table.add_column("train events", justify="right")
    for column in settings.columns:
        table.add_column(COLUMN_TITLES[column], justify="center")
    for network, columns in summary.items():
        for size in settings.sizes:
            means = {c: rows[size][0] for c, rows in columns.items() if size in rows}
            best = max(means, key=means.__getitem__) if means else None
            cells = []
            for column in settings.columns:
                if size not in columns[column]:
                    cells.append("–")
                    continue
                mean, std = columns[column][size]
                text = f"{mean:.3f} ± {std:.3f}"
                cells.append(f"[bold]{text}[/]" if column == best else text)
            table.add_row(NETWORK_TITLES[network], str(size), *cells)
    return table


@study_app.command("isolation")
def isolation_command(
    quick: Annotated[
        bool,
        typer.Option(help="8k training and 6k test events, at most 4 epochs, 8 bootstraps."),
    ] = False,
    events: Annotated[
        int | None, typer.Option(min=1000, help="Training events (default 60,000).")
    ] = None,
    bootstraps: Annotated[
        int | None, typer.Option(min=2, help="Bootstrap resamplings of the test rows.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Maximum epochs per training.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data and the trainings.")] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")
    ] = Path("studies/isolation"),
    data: DataCache = Path("data/isolation_study"),
    threads: Threads = 1,
) -> None:
    """Isolation networks trained with and without labels (arXiv:2306.15737), one table.

    Trains 1 cone + ΣpT, 18 cones + ΣpT, the EFP network, one EFP + cones, the CNN and the
    PFN (their configs in bsym/configs; a missing one is skipped with a note) on the truth
    labels and with CWoLa (mass regions), and reports on one common test sample the AUC and
    the prompt efficiency at 50% non-prompt efficiency, and for CWoLa the sWeighted AUC from
    a fit of the dimuon mass, each ± bootstrap error. Writes isolation_study.json and
    roc_isolation.png. See docs/cwola.md.
    """
    from bsym.training.studies.isolation import (
        QUICK,
        TABLE_WIDTH,
        StudySettings,
        differences_table,
        isolation_table,
        report_run,
        run_study,
        with_overrides,
        write_outputs,
    )

    with user_errors():
        settings = with_overrides(
            QUICK if quick else StudySettings(),
            train_events=events,
            bootstraps=bootstraps,
            max_epochs=epochs,
            seed=seed,
        )
        result = run_study(
            settings,
            data,
            out,
            on_run=report_run,
            on_note=lambda note: stdout.print(f"[yellow]{note}[/]"),
            threads=threads,
        )
        paths = write_outputs(result, out)
    from rich.console import Console

    # the table is wide; a narrower (or redirected, 80-column) console would truncate it
    wide = Console(width=max(stdout.width, TABLE_WIDTH))
    wide.print(isolation_table(result))
    wide.print(differences_table(result))
    for group, fraction in result.prompt_fractions.items():
        stdout.print(f"prompt fraction, {group}: {fraction:.3f}")
    for note in result.skipped:
        stdout.print(f"[yellow]{note}[/]")
    print_summary(len(result.runs), result.seconds, paths)


def _report_run(run: RunResult, log: Path) -> None:
    log_run(
        run,
        log,
        f"{run.model:>13} {run.size:>6} #{run.repeat}: test AUC {run.test_auc:.4f} "
        f"(val {run.val_auc:.4f}, best epoch {run.best_epoch}/{run.epochs}, {run.seconds:.0f} s)",
    )


def log_run(run: Any, log: Path, line: str) -> None:
    """One line on the terminal, one JSON line in ``log`` (kept if the study is interrupted)."""
    import json
    from dataclasses import asdict

    from tqdm import tqdm

    with log.open("a") as stream:
        stream.write(json.dumps(asdict(run)) + "\n")
    tqdm.write(line)


def print_summary(n_runs: int, seconds: float, paths: list[Path]) -> None:
    """How many trainings took how long, and the files written."""
    stdout.print(f"{n_runs} trainings in {seconds / 60:.1f} min")
    for path in paths:
        stdout.print(f"wrote {path}")


def auc_table(result: StudyResult) -> Table:
    """The paper's layout: one row per training size, one column per model, best in bold."""
    from rich.table import Table

    from bsym.training.studies.learning_curve import MODEL_TITLES

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

    from bsym.training.studies.learning_curve import pt_bin_labels

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


@study_app.command("efp-search")
def efp_search_command(
    pfn: Annotated[
        Path,
        typer.Option(
            exists=True, dir_okay=False, help="Checkpoint of the PFN the EFPs are chosen against."
        ),
    ],
    baseline: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="'dnn' config of the starting network (default: isolation_cones_sumpt.yaml).",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(help="2 steps, degree ≤ 4, κ and β in {0.5, 1, 2}, 1500 muons: minutes."),
    ] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="EFPs to add.")] = None,
    pairs: Annotated[
        int | None, typer.Option(min=100, help="(prompt, non-prompt) pairs sampled for the ADO.")
    ] = None,
    muons: Annotated[
        int | None, typer.Option(min=100, help="Validation muons the pairs are drawn from.")
    ] = None,
    include_axis: Annotated[
        bool | None,
        typer.Option(
            "--include-axis/--cells-only",
            help="Count the muon as a particle at the centre with z = 1 (default: cells only).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")
    ] = Path("studies/efp_search"),
    threads: Threads = 1,
) -> None:
    """Guided EFP selection by average decision ordering against a PFN (arXiv:2102.02278).

    Each step adds the energy flow polynomial (all connected graphs of degree ≤ 7 built
    without K4, κ in {−1, 0, 1/2, 1, 2}, β in {1/2, 1, 2}) that best orders, like the PFN,
    the prompt/non-prompt pairs on which the current network and the PFN disagree, then
    retrains the small network on the baseline features plus the EFPs chosen so far. Prints
    the EFP, its ADO and the network's ADO and test AUC after each step; writes
    efp_search.json and chosen_efps.yaml. About 20 minutes on two shared cores (most of it
    computing 7,280 candidate EFPs on 2,000 muons); --quick about 3. See docs/efp.md.
    """
    from bsym.training.studies.efp_search import (
        DEFAULT_BASELINE,
        QUICK,
        SearchSettings,
        report_step,
        run_search,
        search_table,
        with_overrides,
        write_outputs,
    )

    with user_errors():
        settings = with_overrides(
            QUICK if quick else SearchSettings(),
            steps=steps,
            pairs=pairs,
            ado_rows=muons,
            include_axis=include_axis,
        )
        result = run_search(
            pfn,
            out,
            settings,
            baseline=baseline or DEFAULT_BASELINE,
            on_step=report_step,
            threads=threads,
        )
        paths = write_outputs(result, out)
    stdout.print(search_table(result))
    stdout.print(
        f"EFPs: {result.candidates} candidates on {result.muons} muons in "
        f"{result.efp_seconds:.0f} s ({result.efp_muons_per_second:.1f} muons/s with all of "
        f"them); search {result.seconds / 60:.1f} min"
    )
    for path in paths:
        stdout.print(f"wrote {path}")
