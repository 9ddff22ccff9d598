"""Mass decorrelation on the isolation task (arXiv:1703.03507, 1611.01046, 2001.05310).

One isolation network (a shipped config, by default 18 cones + ΣpT) is trained with
``decorrelation`` on the dimuon mass (:mod:`bsym.training.decorrelation`), decorrelating
within each training class (``classes: all``), for a scan of the strength λ of each method,
and scored on one common test sample, the CWoLa rows of the isolation study (pair muons in
the mass window 70–110 GeV, :mod:`bsym.training.studies.isolation`).

Runs
    Supervised (truth labels, on the CWoLa rows): λ = 0 (DisCo of strength 0, so that it is
    trained exactly like the others: its last epoch is kept), DisCo at each of
    ``disco_strengths`` and the adversary at each of ``adversary_strengths``. CWoLa (labels
    from the mass regions, decorrelating within each region class): λ = 0, DisCo at
    ``cwola_disco`` and the adversary at ``cwola_adversary``.
Figures (on the test rows; truth: prompt against non-prompt)
    The true AUC; the background rejection R50 = 1/ε_B at the cut that keeps 50% of the
    prompt muons; 1/JSD, where JSD is the Jensen-Shannon divergence (base 2) between the
    normalised mass histograms (``jsd_bins`` bins over the window) of the non-prompt muons
    passing and failing that cut (the metric of arXiv:1703.03507's code: large when the cut
    does not sculpt the background mass); and the sWeighted AUC from a fit of the test rows'
    mass (:mod:`bsym.training.sweights`) minus the true AUC, the bias of the sWeighted
    evaluation, which sPlot's assumption of a score independent of the mass within each
    component should remove.
Errors
    The standard deviation over ``bootstraps`` resamplings of the test rows, the same
    resamplings for every run and the mass refitted in each; the training is not repeated,
    so the spread of retrainings is not included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from pydantic import Field

from bsym.configs import shipped_config
from bsym.rootio import TreeSource
from bsym.settings import Settings
from bsym.training.cwola import CwolaRows, SupervisionConfig, read_cwola_rows
from bsym.training.metrics import roc_auc
from bsym.training.studies.harness import Figure, bootstrap, write_json

if TYPE_CHECKING:
    from bsym.training.sweights import MassFit

FloatArray = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]
METHODS = ("disco", "adversary")
FIGURES = ("auc", "rejection50", "inverse_jsd", "sweighted_bias")


class StudySettings(Settings):
    """Everything that defines one decorrelation study."""

    train_events: int = Field(default=60_000, ge=1)
    test_events: int = Field(default=20_000, ge=1)
    config: str = Field(default="isolation_cones_sumpt", description="shipped config")
    variable: str = "dimuon_mass"
    disco_strengths: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    adversary_strengths: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0, 300.0)
    cwola_disco: float = Field(default=1.0, ge=0)
    cwola_adversary: float = Field(default=10.0, ge=0)
    max_epochs: int = Field(default=20, ge=1)
    bootstraps: int = Field(default=20, ge=2)
    jsd_bins: int = Field(default=40, ge=2)
    seed: int = 0


QUICK = StudySettings(train_events=8_000, test_events=6_000, max_epochs=6, bootstraps=10)


@dataclass(frozen=True)
class Run:
    """One training: its supervision, decorrelation method and strength."""

    supervision: str
    method: str
    strength: float

    @property
    def label(self) -> str:
        kind = "plain" if self.strength == 0 else f"{self.method} λ={self.strength:g}"
        return f"{self.supervision} {kind}"


@dataclass(frozen=True)
class RunResult:
    """One run's figures on the test rows, each ± its bootstrap standard deviation."""

    supervision: str
    method: str
    strength: float
    auc: Figure
    rejection50: Figure
    inverse_jsd: Figure
    sweighted_bias: Figure
    bias_change: Figure
    """sweighted_bias minus that of the plain run of the same labels (paired bootstrap)."""
    inverse_jsd_random: float
    """1/JSD of a random cut passing as many non-prompt muons: the finite-sample ceiling."""
    epochs: int
    seconds: float


@dataclass
class StudyResult:
    """All runs and what they were tested on."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    n_test: int = 0
    seconds: float = 0.0

    def document(self) -> dict[str, object]:
        """The numbers of the study, as written to ``decorrelation_study.json``."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "n_test": self.n_test,
            "seconds": self.seconds,
            "runs": [asdict(run) for run in self.runs],
        }


def planned_runs(settings: StudySettings) -> list[Run]:
    """The supervised λ scan of both methods, then CWoLa plain and with each method."""
    runs = [Run("truth", "disco", 0.0)]
    runs += [Run("truth", "disco", strength) for strength in settings.disco_strengths]
    runs += [Run("truth", "adversary", strength) for strength in settings.adversary_strengths]
    runs += [
        Run("cwola", "disco", 0.0),
        Run("cwola", "disco", settings.cwola_disco),
        Run("cwola", "adversary", settings.cwola_adversary),
    ]
    return runs


def run_study(
    settings: StudySettings,
    data_dir: Path,
    out_dir: Path,
    *,
    on_run: Callable[[Run, float], None] | None = None,
    threads: int = 1,
) -> StudyResult:
    """Train every planned run, score them on the common test rows, bootstrap the figures."""
    import torch

    from bsym.features import Feature, FeatureSpec
    from bsym.training.studies.isolation import StudySettings as IsolationSettings
    from bsym.training.studies.isolation import simulate_samples

    torch.set_num_threads(threads)
    start = time.perf_counter()
    samples = IsolationSettings(
        train_events=settings.train_events, test_events=settings.test_events, seed=settings.seed
    )
    train_files, test_files = simulate_samples(samples, data_dir)
    train_sources = [TreeSource(path, "Muons") for path in train_files]
    test_sources = [TreeSource(path, "Muons") for path in test_files]
    any_spec = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    test_rows = read_cwola_rows(test_sources, any_spec, SupervisionConfig(type="cwola"))
    assert test_rows.truth is not None
    truth, mass = test_rows.truth, test_rows.mass
    runs = planned_runs(settings)
    scores: list[FloatArray] = []
    trained: list[tuple[int, float]] = []
    for run in runs:
        began = time.perf_counter()
        run_scores, epochs = _train_and_score(
            run, settings, train_sources, test_sources, test_rows, out_dir
        )
        scores.append(run_scores)
        trained.append((epochs, time.perf_counter() - began))
        if on_run is not None:
            on_run(run, trained[-1][1])
    plain = {run.supervision: i for i, run in enumerate(runs) if run.strength == 0}
    references = [plain[run.supervision] for run in runs]
    figures = bootstrapped_figures(scores, truth, mass, settings, references)
    result = StudyResult(settings, n_test=int(truth.size))
    window = SupervisionConfig(type="cwola").window
    for run, run_figures, (epochs, seconds) in zip(runs, figures, trained, strict=True):
        ceiling = random_cut_inverse_jsd(
            mass[truth == 0],
            1 / run_figures[1].value,
            window=window,
            bins=settings.jsd_bins,
            rng=np.random.default_rng([settings.seed, 10]),
        )
        result.runs.append(
            RunResult(
                run.supervision, run.method, run.strength, *run_figures, ceiling, epochs, seconds
            )
        )
    result.seconds = time.perf_counter() - start
    return result


def _train_and_score(
    run: Run,
    settings: StudySettings,
    train_sources: Sequence[TreeSource],
    test_sources: Sequence[TreeSource],
    test_rows: CwolaRows,
    out_dir: Path,
) -> tuple[FloatArray, int]:
    from bsym.training.checkpoint import predict
    from bsym.training.config import load_config
    from bsym.training.cwola import apply_cwola
    from bsym.training.dataset import read_rows
    from bsym.training.studies.isolation import _trained
    from bsym.training.train import train

    files = "[" + ", ".join(f"'{source}'" for source in train_sources) + "]"
    name = f"{run.supervision}_{run.method}_{run.strength:g}"
    config = load_config(
        shipped_config(settings.config),
        [
            f"data.train={files}",
            "data.test_fraction=0",
            f"optimizer.epochs={settings.max_epochs}",
            f"seed={settings.seed}",
            f"supervision.type={run.supervision}",
            "supervision.select=true",
            f"output_dir={out_dir / 'runs' / name}",
            f"decorrelation={{method: {run.method}, variable: {settings.variable}, "
            f"strength: {run.strength}, classes: all}}",
        ],
    )
    loaded, _, epochs = _trained(config, train)
    features, _ = read_rows(test_sources, loaded.spec, with_label=False)
    scores = predict(loaded, apply_cwola(features, test_rows), batch_size=8192)
    return scores.astype(np.float64), epochs


def rejection_and_inverse_jsd(
    truth: npt.NDArray[np.int64],
    scores: FloatArray,
    mass: FloatArray,
    *,
    window: tuple[float, float],
    bins: int,
) -> tuple[float, float]:
    """1/ε_B at ε_S = 50%, and 1/JSD (base 2) of the background mass passing and failing."""
    threshold = float(np.quantile(scores[truth == 1], 0.5))
    background = truth == 0
    passing = scores[background] > threshold
    efficiency = float(passing.mean())
    rejection = 1.0 / efficiency if efficiency > 0 else math.inf
    jsd = jensen_shannon(mass[background][passing], mass[background][~passing], window, bins)
    return rejection, 1.0 / jsd if jsd > 0 else math.inf


def random_cut_inverse_jsd(
    background_mass: FloatArray,
    efficiency: float,
    *,
    window: tuple[float, float],
    bins: int,
    rng: np.random.Generator,
    repeats: int = 10,
) -> float:
    """Mean 1/JSD of random cuts passing the fraction ``efficiency`` of the background: what
    a score independent of the mass reaches on this many rows."""
    n_pass = round(efficiency * background_mass.size)
    values = []
    for _ in range(repeats):
        passing = np.zeros(background_mass.size, dtype=np.bool_)
        passing[rng.permutation(background_mass.size)[:n_pass]] = True
        jsd = jensen_shannon(background_mass[passing], background_mass[~passing], window, bins)
        values.append(1.0 / jsd if jsd > 0 else math.inf)
    return float(np.mean(values))


def jensen_shannon(a: FloatArray, b: FloatArray, window: tuple[float, float], bins: int) -> float:
    """JSD (base 2, in [0, 1]) of the normalised histograms of ``a`` and ``b``."""
    if a.size == 0 or b.size == 0:
        return math.nan
    p = np.histogram(a, bins=bins, range=window)[0].astype(np.float64)
    q = np.histogram(b, bins=bins, range=window)[0].astype(np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x: FloatArray) -> float:
        filled = x > 0
        return float(np.sum(x[filled] * np.log2(x[filled] / m[filled])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def bootstrapped_figures(
    scores: Sequence[FloatArray],
    truth: npt.NDArray[np.int64],
    mass: FloatArray,
    settings: StudySettings,
    references: Sequence[int],
) -> list[tuple[Figure, Figure, Figure, Figure, Figure]]:
    """AUC, R50, 1/JSD, sWeighted − true AUC, and that bias minus the bias of the run
    ``references[i]``, of each run i, ± the spread over the same resamplings of the test
    rows for every run (the mass refitted in each)."""
    from bsym.training.sweights import fit_mass, sweighted_roc_inputs, sweights

    window = SupervisionConfig(type="cwola").window

    def figures(rows: Indices, fit: MassFit) -> list[list[float]]:
        signal, background = sweights(mass[rows], fit)
        values = []
        for s in scores:
            auc = roc_auc(truth[rows], s[rows])
            rejection, inverse_jsd = rejection_and_inverse_jsd(
                truth[rows], s[rows], mass[rows], window=window, bins=settings.jsd_bins
            )
            labels, doubled, weights = sweighted_roc_inputs(s[rows], signal, background)
            values.append([auc, rejection, inverse_jsd, roc_auc(labels, doubled, weights) - auc])
        for value, reference in zip(values, references, strict=True):
            value.append(value[3] - values[reference][3])
        return values

    every = np.arange(truth.size, dtype=np.int64)
    central = np.asarray(figures(every, fit_mass(mass, low=window[0], high=window[1])))
    samples = np.asarray(
        bootstrap(
            truth.size,
            lambda rows: figures(rows, fit_mass(mass[rows], low=window[0], high=window[1])),
            n_bootstrap=settings.bootstraps,
            rng=np.random.default_rng([settings.seed, 9]),
        )
    )
    errors = np.std(samples, axis=0, ddof=1)
    return [
        (
            Figure(float(c[0]), float(e[0])),
            Figure(float(c[1]), float(e[1])),
            Figure(float(c[2]), float(e[2])),
            Figure(float(c[3]), float(e[3])),
            Figure(float(c[4]), float(e[4])),
        )
        for c, e in zip(central, errors, strict=True)
    ]


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``decorrelation_study.json`` in ``out_dir`` (the plot is :mod:`.plots`'); its path."""
    return [write_json(out_dir / "decorrelation_study.json", result.document())]
