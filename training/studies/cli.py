"""``bsym study``: studies that train many models and compare them; the commands print the
results the studies return, write their JSON and make their plots."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bsym.console import stdout, user_errors
from bsym.simulate.geometry import Geometry

if TYPE_CHECKING:
    from bsym.training.studies.augmentation import RunResult as AugmentationRun
    from bsym.training.studies.efp_search import Step
    from bsym.training.studies.harness import Figure
    from bsym.training.studies.isolation import RunResult as IsolationRun
    from bsym.training.studies.learning_curve import RunResult
    from bsym.training.tables import Table

Threads = Annotated[
    int, typer.Option(min=1, help="Torch CPU threads (1 is fastest on shared cores).")
]
Cache = Annotated[
    Path,
    typer.Option(file_okay=False, help="Folder of the simulated samples, written once and reused."),
]
DataFiles = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        metavar="FILES",
        help="Train on these ROOT files instead of a simulated sample (file.root, "
        "'dir/*.root', file.root:tree; repeatable). Formats: docs/formats.md.",
        show_default=False,
    ),
]
TestFiles = Annotated[
    list[str] | None,
    typer.Option(
        "--test-data",
        metavar="FILES",
        help="Evaluate on these ROOT files (with --data; repeatable).",
        show_default=False,
    ),
]
MaxEpochs = Annotated[int | None, typer.Option(min=1, help="Maximum epochs per training.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the data and the trainings.")]
IsolationEvents = Annotated[
    int | None, typer.Option(min=1000, help="Training events (default 60,000).")
]
TestBootstraps = Annotated[
    int | None, typer.Option(min=2, help="Bootstrap resamplings of the test rows.")
]
StudyOut = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", file_okay=False, help="Output folder (default: a folder in studies/)."
    ),
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
    epochs: MaxEpochs = None,
    seed: Seed = None,
    reweight: Annotated[
        bool | None,
        typer.Option(
            "--reweight/--no-reweight",
            help="Use the background pT weights in training and AUC (default: on); "
            "--no-reweight is a control where breaking 0 is exactly Lorentz invariant.",
            show_default=False,
        ),
    ] = None,
    out: StudyOut = None,
    data: DataFiles = None,
    test_data: TestFiles = None,
    test_rows: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Test rows (default 200k, --quick 50k): simulated, or cut from --data with "
            "the study's seed when there is no --test-data.",
            show_default=False,
        ),
    ] = None,
    val_rows: Annotated[
        int | None,
        typer.Option(min=2, help="Validation rows (default 20k, --quick 10k).", show_default=False),
    ] = None,
    cache: Cache = Path("data/lorentz_study"),
    threads: Threads = 1,
) -> None:
    """Learning curve of the unconstrained, invariant and dual-subnet taggers (arXiv:2412.18773).

    Trains each network at each training size (default 8k, 16k, 32k, 64k, 80k) with 3
    repeats on the dimuon task, and reports the best-validation-epoch test AUC (weighted with
    the background weights) as mean ± std, and the dual subnet's learned weight on its
    unconstrained subnet in bins of leading-muon pT. Writes learning_curve.json,
    auc_vs_size.png and symmetry_weight_vs_pt.png (default folder studies/lorentz_b<breaking>).

    Training: AdamW lr 1e-3, weight decay 0.01, batch 256, at most 40 epochs, lr / 3 after 3
    epochs without a better validation AUC, stop after 8 (all three stretched so that
    every training gets at least 2,400 steps), keep the best-validation epoch;
    background weights in the loss (weighted BCE). The full study takes about 40 minutes on
    one CPU core; --quick a few minutes.

    With --data the study trains on your files (branches Muon_px, Muon_py, Muon_pz, Muon_E,
    Muon_pt, lead_pt, label, and weight unless --no-reweight; see docs/formats.md) and
    evaluates on --test-data, or on --test-rows rows cut from --data (default folder
    studies/lorentz_data). --cache names the folder of the simulated sample.
    """
    from bsym.rootio import parse_inputs
    from bsym.training.models.lorentz import lorentz_feature_spec
    from bsym.training.studies.learning_curve import (
        QUICK,
        StudySettings,
        UserData,
        run_study,
        write_outputs,
    )
    from bsym.training.studies.plots import learning_curve_plots
    from bsym.training.studies.reports import auc_table, weight_table

    if data is None and test_data:
        raise typer.BadParameter("--test-data needs --data (the files to train on)")
    if data is not None and breaking is not None:
        raise typer.BadParameter("--breaking sets the simulated sample; with --data it has none")
    if test_data and test_rows is not None:
        raise typer.BadParameter("--test-rows cuts test rows from --data; --test-data gives them")
    with user_errors():
        settings = (QUICK if quick else StudySettings()).with_overrides(
            sizes=parse_sizes(sizes),
            repeats=repeats,
            breaking=breaking,
            max_epochs=epochs,
            seed=seed,
            reweight=reweight,
            test_events=test_rows,
            val_events=val_rows,
        )
        suffix = "" if settings.reweight else "_unweighted"
        source: Path | UserData = cache
        default_out = f"studies/{task.value}_b{settings.breaking:g}{suffix}"
        if data is not None:
            tree = lorentz_feature_spec().tree
            source = UserData(
                tuple(parse_inputs(data, default_tree=tree)),
                tuple(parse_inputs(test_data or [], default_tree=tree)),
            )
            default_out = f"studies/{task.value}_data{suffix}"
        out_dir = out or Path(default_out)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = out_dir / "runs.jsonl"
        log.write_text("")
        result = run_study(
            settings, source, on_run=lambda run: _report_run(run, log), threads=threads
        )
        paths = [log, *write_outputs(result, out_dir), *learning_curve_plots(result, out_dir)]
    show(auc_table(result), weight_table(result))
    print_summary(len(result.runs), result.seconds, paths)


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
    epochs: MaxEpochs = None,
    invariance_weight: Annotated[
        float | None, typer.Option(min=0.0, help="c2 of the invariance term (c1 = 1).")
    ] = None,
    seed: Seed = None,
    out: StudyOut = None,
    cache: Cache = Path("data/augmentation_study"),
    threads: Threads = 1,
) -> None:
    """Rotation augmentation against training size on calorimeter showers (arXiv:2311.05952).

    Trains an FCN on the image and a PFN on the cells with pre-detector (resimulation) and
    post-detector (image) rotation by multiples of 45°, each with and without the encouraged
    invariance term, and without augmentation, and (cells only) an rPCN, an rPCN + PFN dual
    and the dual with pre-detector rotation, at training sizes 480 to 2,400 with 5
    bootstraps; prints the test AUC and the signal efficiency at 50% background efficiency
    (mean ± std over bootstraps) in the paper's layout. Writes augmentation.json,
    auc_vs_size.png and signal_efficiency_vs_size.png (default folder
    studies/augmentation_<geometry>). The full study took about 22 min on
    one core before the rPCN and dual columns, which are far slower (dual + pre-det: 8
    copies × 8 angles); --quick now takes about an hour per geometry.

    It takes no --data: pre-detector augmentation rotates the particles before the
    detector and simulates them again, which needs the particle-level truth and the
    detector of the simulation; files of detector cells alone cannot be resimulated.
    --cache names the folder of the simulated samples.
    """
    from bsym.training.studies.augmentation import QUICK, StudySettings, run_study, write_outputs
    from bsym.training.studies.plots import augmentation_plots
    from bsym.training.studies.reports import augmentation_table

    with user_errors():
        settings = (QUICK if quick else StudySettings()).with_overrides(
            geometry=geometry,
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
            cache,
            on_run=lambda run: _report_augmentation_run(run, log),
            on_note=lambda note: stdout.print(f"[yellow]{note}[/]"),
            threads=threads,
        )
        paths = [log, *write_outputs(result, out_dir), *augmentation_plots(result, out_dir)]
    show(
        augmentation_table(result, "test_auc", "test AUC"),
        augmentation_table(
            result, "signal_efficiency", "signal efficiency at 50% background efficiency"
        ),
    )
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


@study_app.command("isolation")
def isolation_command(
    quick: Annotated[
        bool,
        typer.Option(help="8k training and 6k test events, at most 4 epochs, 8 bootstraps."),
    ] = False,
    events: IsolationEvents = None,
    bootstraps: TestBootstraps = None,
    epochs: MaxEpochs = None,
    seed: Seed = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")
    ] = Path("studies/isolation"),
    data: DataFiles = None,
    test_data: TestFiles = None,
    cache: Cache = Path("data/isolation_study"),
    threads: Threads = 1,
) -> None:
    """Isolation networks trained with and without labels (arXiv:2306.15737), one table.

    Trains 1 cone + ΣpT, 18 cones + ΣpT, the EFP network, one EFP + cones, the CNN and the
    PFN (their configs in bsym/configs; a missing one is skipped with a note) on the truth
    labels and with CWoLa (mass regions), and reports on one common test sample the AUC and
    the prompt efficiency at 50% non-prompt efficiency, and for CWoLa the sWeighted AUC from
    a fit of the dimuon mass, each ± bootstrap error. Writes isolation_study.json and
    roc_isolation.png. See docs/cwola.md.

    With --data and --test-data the study trains and tests on your files of the object
    layout (tree Muons, one entry per muon, the branches of docs/formats.md) instead of the
    simulated samples (then --events does not apply); --cache names the folder of those.
    """
    from bsym.rootio import parse_inputs
    from bsym.training.studies.isolation import (
        QUICK,
        StudySettings,
        UserData,
        run_study,
        write_outputs,
    )
    from bsym.training.studies.plots import isolation_plots
    from bsym.training.studies.reports import differences_table, isolation_table

    if (data is None) != (test_data is None):
        raise typer.BadParameter(
            "--data and --test-data go together: the test rows are the CWoLa rows of their own "
            "sample, so they are not cut from the training files"
        )
    if data is not None and events is not None:
        raise typer.BadParameter("--events sets the simulated sample; with --data it has none")
    with user_errors():
        settings = (QUICK if quick else StudySettings()).with_overrides(
            train_events=events,
            bootstraps=bootstraps,
            max_epochs=epochs,
            seed=seed,
        )
        source: Path | UserData = cache
        if data is not None:
            source = UserData(
                tuple(parse_inputs(data, default_tree="Muons")),
                tuple(parse_inputs(test_data or [], default_tree="Muons")),
            )
        result = run_study(
            settings,
            source,
            out,
            on_run=_report_isolation_run,
            on_note=lambda note: stdout.print(f"[yellow]{note}[/]"),
            threads=threads,
        )
        paths = [*write_outputs(result, out), *isolation_plots(result, out)]
    show(isolation_table(result), differences_table(result))
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
        run_search,
        write_outputs,
    )
    from bsym.training.studies.reports import search_table

    with user_errors():
        settings = (QUICK if quick else SearchSettings()).with_overrides(
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
            on_step=_report_step,
            threads=threads,
        )
        paths = write_outputs(result, out)
    show(search_table(result))
    stdout.print(
        f"EFPs: {result.candidates} candidates on {result.muons} muons in "
        f"{result.efp_seconds:.0f} s ({result.efp_muons_per_second:.1f} muons/s with all of "
        f"them); search {result.seconds / 60:.1f} min"
    )
    for path in paths:
        stdout.print(f"wrote {path}")


def _report_isolation_run(run: IsolationRun) -> None:
    """One line per finished training on the terminal."""
    from tqdm import tqdm

    def cell(figure: Figure) -> str:
        return f"{figure.value:.4f} ± {figure.error:.4f}"

    sweighted = "" if run.auc_sweighted is None else f", sW AUC {cell(run.auc_sweighted)}"
    tqdm.write(
        f"{run.title:>15} {run.supervision:>5}: AUC {cell(run.auc)}{sweighted}, "
        f"ε_S@50% {cell(run.eff50)}, ε_S@5% {cell(run.eff5)} "
        f"(best epoch {run.best_epoch}/{run.epochs}, {run.seconds:.0f} s)"
    )


def _report_step(step: Step) -> None:
    """One line on the terminal as each step of the EFP search ends."""
    from tqdm import tqdm

    if step.edges is None:
        tqdm.write(f"baseline: test AUC {step.test_auc:.4f}, ADO with the PFN {step.model_ado:.4f}")
        return
    tqdm.write(
        f"step {step.step}: EFP {step.label} κ={step.kappa:g} β={step.beta:g} "
        f"(ADO {step.efp_ado:.4f} on {step.disagreeing_pairs} pairs) → test AUC "
        f"{step.test_auc:.4f}, ADO with the PFN {step.model_ado:.4f} ({step.seconds:.0f} s)"
    )


def show(*tables: Table) -> None:
    """Render the tables with rich on stdout, widened to what a table needs unwrapped (a
    narrower or redirected, 80-column, console would truncate a wide one)."""
    from rich.console import Console

    from bsym.training.tables import to_rich

    for table in tables:
        console = stdout
        if table.min_width is not None and stdout.width < table.min_width:
            console = Console(width=table.min_width)
        console.print(to_rich(table))


@study_app.command("decorrelation")
def decorrelation_command(
    quick: Annotated[
        bool,
        typer.Option(help="8k training and 6k test events, at most 6 epochs, 10 bootstraps."),
    ] = False,
    events: IsolationEvents = None,
    test_events: Annotated[
        int | None, typer.Option(min=1000, help="Test events (default 20,000).")
    ] = None,
    bootstraps: TestBootstraps = None,
    epochs: MaxEpochs = None,
    seed: Seed = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")
    ] = Path("studies/decorrelation"),
    cache: Cache = Path("data/isolation_study"),
    threads: Threads = 1,
) -> None:
    """Mass decorrelation on the isolation task (arXiv:1703.03507, 2001.05310).

    Trains the 18 cones + ΣpT network with the score decorrelated from the dimuon mass
    within each class, for a scan of λ with DisCo and with an adversary (supervised), and
    plain, DisCo and adversary with CWoLa; reports on one test sample the AUC, the rejection
    at 50% prompt efficiency, 1/JSD of the non-prompt mass passing and failing that cut, and
    the sWeighted minus the true AUC, each ± bootstrap error. Writes
    decorrelation_study.json and rejection_vs_jsd.png. See docs/decorrelation.md.
    """
    from tqdm import tqdm

    from bsym.training.studies.decorrelation import QUICK, StudySettings, run_study, write_outputs
    from bsym.training.studies.plots import decorrelation_plots
    from bsym.training.studies.reports import decorrelation_table

    with user_errors():
        settings = (QUICK if quick else StudySettings()).with_overrides(
            train_events=events,
            test_events=test_events,
            bootstraps=bootstraps,
            max_epochs=epochs,
            seed=seed,
        )
        result = run_study(
            settings,
            cache,
            out,
            on_run=lambda run, seconds: tqdm.write(f"trained {run.label} ({seconds:.0f} s)"),
            threads=threads,
        )
        paths = [*write_outputs(result, out), *decorrelation_plots(result, out)]
    show(decorrelation_table(result))
    print_summary(len(result.runs), result.seconds, paths)


@study_app.command("flavour")
def flavour_command(
    quick: Annotated[
        bool,
        typer.Option(
            help="8k training and 30k test jets, at most 6 epochs, 8 bootstraps, Vector and "
            "Tensor PFN at width 16, a DIPS-only size scan of 1.6k, 3.2k, 6.4k jets."
        ),
    ] = False,
    jets: Annotated[
        int | None, typer.Option(min=100, help="Training jets (default 200,000).")
    ] = None,
    test_jets: Annotated[
        int | None, typer.Option(min=100, help="Test jets (default 300,000).")
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option(help="Training sizes of the scan, e.g. '25k,50k,100k'.", show_default=False),
    ] = None,
    bootstraps: Annotated[
        int | None, typer.Option(min=2, help="Bootstrap resamplings of the test jets.")
    ] = None,
    f_c: Annotated[
        float | None,
        typer.Option("--f-c", min=0, max=1, help="Charm fraction of D_b (default 0.018)."),
    ] = None,
    epochs: MaxEpochs = None,
    seed: Seed = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")
    ] = Path("studies/flavour"),
    cache: Cache = Path("data/flavour_study"),
    threads: Threads = 1,
) -> None:
    """b/c/light flavour tagging: DIPS, IP3D- and RNNIP-style baselines, PFN, Vector and
    Tensor PFN (with and without the bilinear layer), DIPS on linear inputs; one table.

    Trains every tagger on the same simulated jets (bsym simulate flavour) with three classes,
    balanced class weights, and scores an independent sample: light and c rejection at 70%
    and 77% b-efficiency on D_b, AUCs, seconds per epoch, epochs to converge, each ± bootstrap
    error, and the verdicts on the claims. Writes flavour_study.json, rejection_vs_beff.png
    (puma style: log y, a ratio panel per background class to DIPS) and
    light_rejection_vs_size.png (the training-size scan). A tagger whose model type is
    missing is skipped with a note. See docs/flavour-study.md.
    """
    from bsym.training.studies.flavour import QUICK, StudySettings, run_study, write_outputs
    from bsym.training.studies.plots import flavour_plots
    from bsym.training.studies.reports import (
        flavour_claims_table,
        flavour_scan_table,
        flavour_table,
    )

    with user_errors():
        settings = (QUICK if quick else StudySettings()).with_overrides(
            train_jets=jets,
            test_jets=test_jets,
            scan_sizes=parse_sizes(sizes),
            bootstraps=bootstraps,
            f_c=f_c,
            max_epochs=epochs,
            seed=seed,
        )
        out.mkdir(parents=True, exist_ok=True)
        result = run_study(
            settings,
            cache,
            out,
            on_run=_report_flavour_run,
            on_note=lambda note: stdout.print(f"[yellow]{note}[/]"),
            threads=threads,
        )
        paths = [*write_outputs(result, out), *flavour_plots(result, out)]
    show(flavour_table(result), flavour_scan_table(result), flavour_claims_table(result))
    for note in result.skipped:
        stdout.print(f"[yellow]{note}[/]")
    print_summary(len(result.runs) + len(result.scan), result.seconds, paths)


def _report_flavour_run(run: Any) -> None:
    from tqdm import tqdm

    light, c = run.figures["light_rej70"], run.figures["c_rej70"]
    tqdm.write(
        f"{run.title:>24} {run.train_jets:>7} jets: light rej70 {light.value:.1f} ± "
        f"{light.error:.1f}, c rej70 {c.value:.2f} ± {c.error:.2f} ({run.epochs} epochs, "
        f"{run.seconds_per_epoch:.1f} s/epoch)"
    )
