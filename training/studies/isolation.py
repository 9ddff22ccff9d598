"""Muon isolation with and without labels (arXiv:2306.15737; docs/papers.md, "Muon
isolation"): one table.

Rows are isolation classifiers, each a shipped config in ``bsym/configs`` (1 cone + ΣpT,
18 cones + ΣpT, the EFP network, one EFP + cones, CNN, PFN); a row whose config is not
there is skipped with a note. Each is trained twice with ``bsym train``'s own loop: on the
truth labels (supervised) and on the mass regions (``supervision: cwola``, see
:mod:`bsym.training.cwola`), and both are scored on one common test sample.

Data
    Two samples of ``bsym simulate isolation`` (cached under the data directory by seed and
    size, and reused): training events (split by each config into training and validation
    rows; no test rows) and, from another seed, test events. The test rows are the CWoLa rows
    of the test sample (pair muons, both passing |η| < 2.1 and pT > 25 GeV, mass in the
    signal region or a sideband), the same for every model and both trainings.
Figures (each ± the standard deviation over ``bootstraps`` resamplings of the test rows)
    Supervised: true ROC AUC and ε_S at ε_B = 50% (the signal efficiency where half the
    non-prompt muons pass). CWoLa: the true AUC, the sWeighted AUC from a fit of the test
    rows' dimuon mass (:mod:`bsym.training.sweights`, refitted in every resampling), and the
    true ε_S at ε_B = 50%.
Training
    Each config's network and optimiser, with at most ``max_epochs`` epochs and patience
    ``patience`` (early stopping on the validation AUC of the training's own labels: truth,
    or CWoLa's with no truth looked at). One torch thread by default.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.rootio import TreeSource
from bsym.training.cwola import CwolaRows, SupervisionConfig, prompt_fractions, read_cwola_rows
from bsym.training.metrics import roc_auc, roc_curve

if TYPE_CHECKING:
    from rich.table import Table

    from bsym.training.checkpoint import LoadedModel
    from bsym.training.config import TrainConfig
    from bsym.training.loop import TrainResult
    from bsym.training.sweights import MassFit

FloatArray = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]
MANIFEST = "manifest.json"
# background (non-prompt) efficiencies at which the prompt efficiency is quoted
WORKING_POINTS = (0.5, 0.05)
SUPERVISIONS = ("truth", "cwola")


@dataclass(frozen=True)
class Row:
    """One model of the table: a shipped config, with ``--set`` overrides and an epoch cap."""

    title: str
    config: str
    overrides: tuple[str, ...] = ()
    max_epochs: int | None = None


# The cone rows have the track isolation ΣpT; the networks on the cells get it too, so that
# they differ from the cones only in seeing the cells.
WITH_SUMPT = (
    "features.globals=[{branch: Muon_sumTrackPt03, transform: log1p}, "
    "{branch: Muon_pt, transform: log}]",
)
REFERENCE = "18 cones + ΣpT"
ROWS: tuple[Row, ...] = (
    Row("1 cone + ΣpT", "isolation_cone1_sumpt"),
    Row("18 cones + ΣpT", "isolation_cones_sumpt"),
    Row("EFP network", "isolation_efp"),
    Row("1 EFP + cones", "isolation_efp_single"),
    # the CNN costs ten times the PFN per epoch on the 128 cells of its image
    Row("CNN + ΣpT", "isolation_cnn", WITH_SUMPT, max_epochs=12),
    Row("PFN + ΣpT", "isolation_pfn", WITH_SUMPT),
)


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines one isolation study."""

    train_events: int = 60_000
    test_events: int = 20_000
    max_epochs: int = 40
    patience: int = 5
    bootstraps: int = 20
    seed: int = 0
    rows: tuple[Row, ...] = ROWS


QUICK = StudySettings(train_events=8_000, test_events=6_000, max_epochs=4, patience=2, bootstraps=8)


@dataclass(frozen=True)
class Figure:
    """A value and its bootstrap standard deviation."""

    value: float
    error: float


@dataclass(frozen=True)
class RunResult:
    """One training of one row, scored on the common test rows."""

    title: str
    config: str
    supervision: str
    auc: Figure
    eff50: Figure
    eff5: Figure
    auc_sweighted: Figure | None
    best_epoch: int
    epochs: int
    seconds: float


@dataclass(frozen=True)
class Difference:
    """A difference of two figures on the same test rows, with its paired bootstrap error."""

    name: str
    value: float
    error: float


@dataclass
class StudyResult:
    """All runs, the rows skipped, the prompt fractions of the CWoLa classes, the timing."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    prompt_fractions: dict[str, float] = field(default_factory=dict)
    n_test: int = 0
    seconds: float = 0.0
    curves: dict[str, dict[str, tuple[FloatArray, FloatArray]]] = field(default_factory=dict)
    scores: dict[str, dict[str, FloatArray]] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    def run(self, title: str, supervision: str) -> RunResult | None:
        for run in self.runs:
            if run.title == title and run.supervision == supervision:
                return run
        return None

    def to_json(self) -> str:
        document = {
            "settings": asdict(self.settings),
            "skipped": self.skipped,
            "prompt_fractions": self.prompt_fractions,
            "n_test": self.n_test,
            "seconds": self.seconds,
            "runs": [asdict(run) for run in self.runs],
            "differences": [asdict(difference) for difference in self.differences],
        }
        return json.dumps(document, indent=2) + "\n"


def with_overrides(
    settings: StudySettings,
    *,
    train_events: int | None = None,
    bootstraps: int | None = None,
    max_epochs: int | None = None,
    seed: int | None = None,
) -> StudySettings:
    """``settings`` with the fields given (not None) replaced."""
    return replace(
        settings,
        train_events=settings.train_events if train_events is None else train_events,
        bootstraps=settings.bootstraps if bootstraps is None else bootstraps,
        max_epochs=settings.max_epochs if max_epochs is None else max_epochs,
        seed=settings.seed if seed is None else seed,
    )


def simulate_samples(settings: StudySettings, data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The training and test samples (files of the 'Muons' tree), simulated or reused."""
    train = _sample(data_dir, "train", settings.train_events, seed=2 * settings.seed + 101)
    test = _sample(data_dir, "test", settings.test_events, seed=2 * settings.seed + 102)
    return train, test


def _sample(data_dir: Path, kind: str, n_events: int, *, seed: int) -> list[Path]:
    from bsym.simulate import write_isolation

    sample_dir = data_dir / f"{kind}_n{n_events}_s{seed}"
    manifest = sample_dir / MANIFEST
    wanted = {"events": n_events, "seed": seed}
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("sample") == wanted:
            return [sample_dir / name for name in recorded["files"]]
    written = write_isolation(sample_dir, n_events, seed=seed)
    muons = [path for path in written if path.name.startswith("isolation_muons_")]
    manifest.write_text(json.dumps({"sample": wanted, "files": [p.name for p in muons]}))
    return muons


def run_study(
    settings: StudySettings,
    data_dir: Path,
    out_dir: Path,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    threads: int = 1,
) -> StudyResult:
    """Train every available row under both supervisions and score them on the test rows."""
    import torch

    from bsym.features import Feature, FeatureSpec

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = StudyResult(settings)
    train_files, test_files = simulate_samples(settings, data_dir)
    test_sources = [TreeSource(path, "Muons") for path in test_files]
    # The rows depend on the CWoLa branches only: the same for every model's feature spec.
    any_spec = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    test_rows = read_cwola_rows(test_sources, any_spec, SupervisionConfig(type="cwola"))
    if test_rows.truth is None:
        raise ConfigError("the simulated test sample has no truth label")
    truth = test_rows.truth
    result.n_test = int(test_rows.keep.size)
    result.prompt_fractions = _train_prompt_fractions(train_files)
    for row in settings.rows:
        title = row.title
        path = shipped_config(row.config)
        if not path.is_file():
            note = f"skipped '{title}': no config {path.name} in bsym/configs yet"
            result.skipped.append(note)
            if on_note is not None:
                on_note(note)
            continue
        result.curves[title] = {}
        result.scores[title] = {}
        for supervision in SUPERVISIONS:
            run, scores = _train_and_score(
                row,
                supervision,
                settings,
                train_files,
                test_sources,
                test_rows,
                truth,
                out_dir,
            )
            result.runs.append(run)
            fpr, tpr, _ = roc_curve(truth, scores)
            result.curves[title][supervision] = (fpr, tpr)
            result.scores[title][supervision] = scores
            if on_run is not None:
                on_run(run)
    result.differences = paired_differences(result.scores, truth, test_rows.mass, settings)
    result.seconds = time.perf_counter() - start
    return result


def _train_and_score(
    row: Row,
    supervision: str,
    settings: StudySettings,
    train_files: Sequence[Path],
    test_sources: Sequence[TreeSource],
    test_rows: CwolaRows,
    truth: npt.NDArray[np.int64],
    out_dir: Path,
) -> tuple[RunResult, FloatArray]:
    from bsym.training.checkpoint import predict
    from bsym.training.config import load_config
    from bsym.training.cwola import apply_cwola
    from bsym.training.dataset import read_rows
    from bsym.training.loop import train
    from bsym.training.sweights import sweighted_auc

    began = time.perf_counter()
    name = row.config
    epoch_cap = min(settings.max_epochs, row.max_epochs or settings.max_epochs)
    files = "[" + ", ".join(str(p) for p in train_files) + "]"
    config = load_config(
        shipped_config(name),
        [
            f"data.train={files}",
            "data.test_fraction=0",
            f"optimizer.epochs={epoch_cap}",
            f"optimizer.patience={settings.patience}",
            f"seed={settings.seed}",
            f"supervision.type={supervision}",
            # the supervised reference trains on the same rows as CWoLa
            "supervision.select=true",
            f"output_dir={out_dir / 'runs' / f'{name}_{supervision}'}",
            *row.overrides,
        ],
    )
    loaded, best_epoch, epochs = _trained(config, train)
    features, _ = read_rows(test_sources, loaded.spec, with_label=False)
    batch = apply_cwola(features, test_rows)
    scores = predict(loaded, batch, batch_size=8192).astype(np.float64)
    auc, eff50, eff5 = _bootstrapped(truth, scores, settings)
    sweighted = None
    if supervision == "cwola":
        low, high = loaded.config.supervision.window
        fitted = sweighted_auc(
            scores,
            test_rows.mass,
            low=low,
            high=high,
            n_bootstrap=settings.bootstraps,
            seed=settings.seed,
        )
        sweighted = Figure(fitted.auc, fitted.auc_err)
    run = RunResult(
        title=row.title,
        config=name,
        supervision=supervision,
        auc=auc,
        eff50=eff50,
        eff5=eff5,
        auc_sweighted=sweighted,
        best_epoch=best_epoch,
        epochs=epochs,
        seconds=time.perf_counter() - began,
    )
    return run, scores


def paired_differences(
    scores: dict[str, dict[str, FloatArray]],
    truth: npt.NDArray[np.int64],
    mass: FloatArray,
    settings: StudySettings,
) -> list[Difference]:
    """Supervised AUC against the 18-cone network's, CWoLa against supervised, sWeighted
    against true; errors from the same resamplings for both figures (mass refitted in each)."""
    from bsym.training.sweights import fit_mass, sweighted_roc_inputs, sweights

    low, high = SupervisionConfig(type="cwola").window

    def figures(rows: Indices, fit: MassFit) -> dict[str, float]:
        signal, background = sweights(mass[rows], fit)
        values: dict[str, float] = {}
        for title, by_supervision in scores.items():
            auc = {sup: roc_auc(truth[rows], s[rows]) for sup, s in by_supervision.items()}
            if REFERENCE in scores and title != REFERENCE and "truth" in auc:
                reference = roc_auc(truth[rows], scores[REFERENCE]["truth"][rows])
                values[f"{title} − {REFERENCE}, supervised AUC"] = auc["truth"] - reference
            if "cwola" in auc and "truth" in auc:
                values[f"{title}: CWoLa − supervised AUC"] = auc["cwola"] - auc["truth"]
            if "cwola" in auc:
                labels, doubled, weights = sweighted_roc_inputs(
                    by_supervision["cwola"][rows], signal, background
                )
                sweighted = roc_auc(labels, doubled, weights)
                values[f"{title}: CWoLa sWeighted − true AUC"] = sweighted - auc["cwola"]
        return values

    every = np.arange(truth.size, dtype=np.int64)
    central = figures(every, fit_mass(mass, low=low, high=high))
    rng = np.random.default_rng([settings.seed, 8])
    samples: dict[str, list[float]] = {name: [] for name in central}
    for _ in range(settings.bootstraps):
        rows = rng.integers(0, truth.size, truth.size).astype(np.int64)
        for name, value in figures(rows, fit_mass(mass[rows], low=low, high=high)).items():
            samples[name].append(value)
    return [
        Difference(name, value, float(np.std(samples[name], ddof=1)))
        for name, value in central.items()
    ]


def _trained(
    config: TrainConfig, train: Callable[..., TrainResult]
) -> tuple[LoadedModel, int, int]:
    """Train, or reuse a finished training of exactly this config in its output folder.

    Returns the best model, its epoch and the number of epochs run.
    """
    from bsym.training.checkpoint import load_checkpoint, read_checkpoint

    last = config.output_dir / "last.pt"
    if last.is_file() and (config.output_dir / "checkpoint.pt").is_file():
        previous = read_checkpoint(last)
        if previous.finished and previous.config == config:
            loaded = load_checkpoint(config.output_dir / "checkpoint.pt")
            return loaded, previous.best_epoch, previous.epoch
    result = train(config, overwrite=True, progress=False)
    return load_checkpoint(result.checkpoint), result.best_epoch, result.epochs


def signal_efficiency_at(
    labels: npt.ArrayLike, scores: npt.ArrayLike, background_efficiency: float
) -> float:
    """ε_S of the cut where the ROC curve reaches ``background_efficiency`` (interpolated)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.interp(background_efficiency, fpr, tpr))


def _figures(truth: npt.NDArray[np.int64], scores: FloatArray) -> list[float]:
    """AUC and ε_S at each working point."""
    fpr, tpr, _ = roc_curve(truth, scores)
    efficiencies = [float(np.interp(point, fpr, tpr)) for point in WORKING_POINTS]
    return [roc_auc(truth, scores), *efficiencies]


def _bootstrapped(
    truth: npt.NDArray[np.int64], scores: FloatArray, settings: StudySettings
) -> tuple[Figure, Figure, Figure]:
    central = _figures(truth, scores)
    rng = np.random.default_rng([settings.seed, 7])
    samples = []
    for _ in range(settings.bootstraps):
        rows = rng.integers(0, truth.size, truth.size)
        samples.append(_figures(truth[rows], scores[rows]))
    spread = np.std(np.asarray(samples), axis=0, ddof=1)
    auc, eff50, eff5 = (Figure(c, float(e)) for c, e in zip(central, spread, strict=True))
    return auc, eff50, eff5


def _train_prompt_fractions(train_files: Sequence[Path]) -> dict[str, float]:
    """Prompt fraction of the selected pair muons of the training sample, per CWoLa group."""
    from bsym.rootio import read_all

    config = SupervisionConfig(type="cwola")
    parts = [
        read_all(
            TreeSource(path, "Muons"),
            ["dimuon_mass", "dimuon_os", "Muon_genPartFlav", *config.selection],
        )
        for path in train_files
    ]
    mass = np.concatenate([np.asarray(p["dimuon_mass"], dtype=np.float64) for p in parts])
    opposite = np.concatenate([np.asarray(p["dimuon_os"]) != 0 for p in parts])
    truth = np.concatenate([np.asarray(p["Muon_genPartFlav"]) == 1 for p in parts])
    selected = np.ones(mass.size, dtype=np.bool_)
    for branch in config.selection:
        selected &= np.concatenate([np.asarray(p[branch]) != 0 for p in parts])
    return prompt_fractions(
        mass[selected], opposite[selected], truth[selected].astype(np.int64), config
    )


def plot_rocs(result: StudyResult, path: Path) -> None:
    """True ROC curves (ε_B against ε_S), supervised and CWoLa side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(11.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2, sharey=True)
    for axes, supervision in zip(panels, SUPERVISIONS, strict=True):
        for title, curves in result.curves.items():
            run = result.run(title, supervision)
            if supervision not in curves or run is None:
                continue
            fpr, tpr = curves[supervision]
            axes.plot(tpr, fpr, label=f"{title} (AUC {run.auc.value:.3f})")
        axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        axes.set_yscale("log")
        axes.set_ylim(1e-3, 1.0)
        axes.set_xlim(0.0, 1.0)
        axes.set_xlabel("prompt efficiency $\\varepsilon_S$")
        axes.set_title("supervised (truth labels)" if supervision == "truth" else "CWoLa")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    panels[0].set_ylabel("non-prompt efficiency $\\varepsilon_B$")
    figure.savefig(path, format="png", dpi=120)


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``isolation_study.json`` and ``roc_isolation.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "isolation_study.json"
    json_path.write_text(result.to_json(), encoding="utf-8")
    roc_path = out_dir / "roc_isolation.png"
    plot_rocs(result, roc_path)
    return [json_path, roc_path]


def isolation_table(result: StudyResult) -> Table:
    """Paper 4's layout: one row per model, supervised and CWoLa figures side by side."""
    from rich.table import Table

    settings = result.settings
    table = Table(
        title=f"Muon isolation on {result.n_test} test muons "
        f"(± std over {settings.bootstraps} bootstraps)",
        caption="ε_S@x%: prompt efficiency where x% of non-prompt muons pass; "
        "sW AUC: sWeighted AUC from the dimuon mass fit (no truth)",
    )
    table.add_column("model", justify="left", no_wrap=True)
    for header in ("AUC", "ε_S@50%", "ε_S@5%"):
        table.add_column(f"supervised\n{header}", justify="center", no_wrap=True)
    for header in ("true AUC", "sW AUC", "ε_S@50%", "ε_S@5%"):
        table.add_column(f"CWoLa\n{header}", justify="center", no_wrap=True)
    for title in result.curves:
        truth, cwola = result.run(title, "truth"), result.run(title, "cwola")
        table.add_row(
            title,
            *(_cell(getattr(truth, name, None)) for name in ("auc", "eff50", "eff5")),
            *(
                _cell(getattr(cwola, name, None))
                for name in ("auc", "auc_sweighted", "eff50", "eff5")
            ),
        )
    return table


def differences_table(result: StudyResult) -> Table:
    """The paired differences, each ± its bootstrap error and the ratio of the two."""
    from rich.table import Table

    table = Table(title="Differences on the same test rows (paired bootstrap)")
    table.add_column("difference", justify="left", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("/ error", justify="right", no_wrap=True)
    for difference in result.differences:
        pull = difference.value / difference.error if difference.error > 0 else math.nan
        table.add_row(
            difference.name, f"{difference.value:+.4f} ± {difference.error:.4f}", f"{pull:+.1f}"
        )
    return table


TABLE_WIDTH = 150


def _cell(figure: Figure | None) -> str:
    return "–" if figure is None else f"{figure.value:.4f} ± {figure.error:.4f}"


def report_run(run: RunResult) -> None:
    """One line per finished training on the terminal."""
    from tqdm import tqdm

    sweighted = "" if run.auc_sweighted is None else f", sW AUC {_cell(run.auc_sweighted)}"
    tqdm.write(
        f"{run.title:>15} {run.supervision:>5}: AUC {_cell(run.auc)}{sweighted}, "
        f"ε_S@50% {_cell(run.eff50)}, ε_S@5% {_cell(run.eff5)} "
        f"(best epoch {run.best_epoch}/{run.epochs}, {run.seconds:.0f} s)"
    )
