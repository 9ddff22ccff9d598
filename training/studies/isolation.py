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
User files (:class:`UserData`, ``--data`` and ``--test-data``)
    Files of the object layout (one entry per muon, docs/formats.md) take the place of the two
    samples: the training files need the branches of every config and the CWoLa branches,
    the test files those and the truth ``Muon_genPartFlav``.
Training
    Each config's network and optimiser, with at most ``max_epochs`` epochs and patience
    ``patience`` (early stopping on the validation AUC of the training's own labels: truth,
    or CWoLa's with no truth looked at). One torch thread by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from pydantic import Field

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.rootio import TreeSource, check_branches, open_input
from bsym.settings import Settings
from bsym.training.cwola import CwolaRows, SupervisionConfig, prompt_fractions, read_cwola_rows
from bsym.training.metrics import roc_auc, roc_curve, signal_efficiency
from bsym.training.studies.harness import Figure, bootstrap, simulated_samples, write_json

if TYPE_CHECKING:
    from bsym.features import FeatureSpec
    from bsym.training.checkpoint import LoadedModel
    from bsym.training.config import TrainConfig
    from bsym.training.sweights import MassFit
    from bsym.training.train import TrainResult

FloatArray = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]
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


class StudySettings(Settings):
    """Everything that defines one isolation study."""

    train_events: int = Field(default=60_000, ge=1)
    test_events: int = Field(default=20_000, ge=1)
    max_epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=5, ge=1)
    bootstraps: int = Field(default=20, ge=2)
    seed: int = 0
    rows: tuple[Row, ...] = ROWS


QUICK = StudySettings(train_events=8_000, test_events=6_000, max_epochs=4, patience=2, bootstraps=8)


@dataclass(frozen=True)
class UserData:
    """The user's training and test files (object layout), in place of the simulated samples."""

    train: tuple[TreeSource, ...]
    test: tuple[TreeSource, ...]


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

    def document(self) -> dict[str, object]:
        """The numbers of the study, as written to ``isolation_study.json``."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "skipped": self.skipped,
            "prompt_fractions": self.prompt_fractions,
            "n_test": self.n_test,
            "seconds": self.seconds,
            "runs": [asdict(run) for run in self.runs],
            "differences": [asdict(difference) for difference in self.differences],
        }


def simulate_samples(settings: StudySettings, data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The training and test samples (files of the 'Muons' tree), simulated or reused."""
    from bsym.simulate import write_isolation

    return simulated_samples(
        data_dir,
        (settings.train_events, settings.test_events),
        seeds=(2 * settings.seed + 101, 2 * settings.seed + 102),
        unit="events",
        write=lambda out, size, seed: write_isolation(out, size, seed=seed),
        prefix="isolation_muons_",
    )


def run_study(
    settings: StudySettings,
    data: Path | UserData,
    out_dir: Path,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    threads: int = 1,
) -> StudyResult:
    """Train every available row under both supervisions and score them on the test rows.

    ``data`` is the cache directory of the simulated samples, or the user's files.
    """
    import torch

    from bsym.features import Feature, FeatureSpec

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = StudyResult(settings)
    if isinstance(data, UserData):
        train_sources, test_sources = list(data.train), list(data.test)
    else:
        train_files, test_files = simulate_samples(settings, data)
        train_sources = [TreeSource(path, "Muons") for path in train_files]
        test_sources = [TreeSource(path, "Muons") for path in test_files]
    # The rows depend on the CWoLa branches only: the same for every model's feature spec.
    any_spec = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    _check_truth(test_sources, any_spec)
    test_rows = read_cwola_rows(test_sources, any_spec, SupervisionConfig(type="cwola"))
    if test_rows.truth is None:
        raise ConfigError("the test files gave no truth label")
    truth = test_rows.truth
    result.n_test = int(test_rows.keep.size)
    result.prompt_fractions = _train_prompt_fractions(train_sources)
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
                train_sources,
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
    train_sources: Sequence[TreeSource],
    test_sources: Sequence[TreeSource],
    test_rows: CwolaRows,
    truth: npt.NDArray[np.int64],
    out_dir: Path,
) -> tuple[RunResult, FloatArray]:
    from bsym.training.checkpoint import predict
    from bsym.training.config import load_config
    from bsym.training.cwola import apply_cwola
    from bsym.training.dataset import read_rows
    from bsym.training.sweights import sweighted_auc
    from bsym.training.train import train

    began = time.perf_counter()
    name = row.config
    epoch_cap = min(settings.max_epochs, row.max_epochs or settings.max_epochs)
    files = "[" + ", ".join(f"'{source}'" for source in train_sources) + "]"
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
    samples = bootstrap(
        truth.size,
        lambda rows: figures(rows, fit_mass(mass[rows], low=low, high=high)),
        n_bootstrap=settings.bootstraps,
        rng=np.random.default_rng([settings.seed, 8]),
    )
    return [
        Difference(name, value, float(np.std([s[name] for s in samples], ddof=1)))
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
        recorded = previous.config.features.without_ranges()
        same = previous.config.model_copy(update={"features": recorded}) == config
        if previous.finished and same:
            loaded = load_checkpoint(config.output_dir / "checkpoint.pt")
            return loaded, previous.best_epoch, previous.epoch
    result = train(config, overwrite=True, progress=False)
    return load_checkpoint(result.checkpoint), result.best_epoch, result.epochs


def _figures(truth: npt.NDArray[np.int64], scores: FloatArray) -> list[float]:
    """AUC and ε_S at each working point."""
    fpr, tpr, _ = roc_curve(truth, scores)
    efficiencies = [signal_efficiency(fpr, tpr, point) for point in WORKING_POINTS]
    return [roc_auc(truth, scores), *efficiencies]


def _bootstrapped(
    truth: npt.NDArray[np.int64], scores: FloatArray, settings: StudySettings
) -> tuple[Figure, Figure, Figure]:
    central = _figures(truth, scores)
    samples = bootstrap(
        truth.size,
        lambda rows: _figures(truth[rows], scores[rows]),
        n_bootstrap=settings.bootstraps,
        rng=np.random.default_rng([settings.seed, 7]),
    )
    spread = np.std(np.asarray(samples), axis=0, ddof=1)
    auc, eff50, eff5 = (Figure(c, float(e)) for c, e in zip(central, spread, strict=True))
    return auc, eff50, eff5


def _check_truth(sources: Sequence[TreeSource], spec: FeatureSpec) -> None:
    """Raise, naming the file and tree, where a test file lacks the truth label."""
    assert spec.label is not None
    for unresolved in sources:
        source, tree = open_input(unresolved, spec.count_branch)
        try:
            check_branches(tree, source, [spec.label.branch])
        finally:
            tree.file.close()


def _train_prompt_fractions(sources: Sequence[TreeSource]) -> dict[str, float]:
    """Prompt fraction of the selected pair muons of the training sample, per CWoLa group."""
    from bsym.features import Feature, FeatureSpec, detect_layout
    from bsym.rootio import read_all

    config = SupervisionConfig(type="cwola")
    objects = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    resolved = []
    for unresolved in sources:
        source, tree = open_input(unresolved, objects.count_branch)
        layout = detect_layout(tree.keys(), objects)
        tree.file.close()
        resolved.append(source)
        if layout != "object":
            raise ConfigError(
                f"{source} has '{objects.count_branch}' (the event layout); the isolation "
                "study reads the object layout, one entry per muon (docs/formats.md)"
            )
    parts = [
        read_all(source, ["dimuon_mass", "dimuon_os", "Muon_genPartFlav", *config.selection])
        for source in resolved
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


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``isolation_study.json`` in ``out_dir`` (the plot is :mod:`.plots`'); its path."""
    return [write_json(out_dir / "isolation_study.json", result.document())]
