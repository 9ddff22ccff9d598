"""Rotation augmentation against training size (arXiv:2311.05952; docs/papers.md,
"Rotation symmetry").

Trains a fully connected network on the image (``image_fcn``) and a particle-flow network on
the cells (``pfn``) with five ways of using the training events, at several training sizes
with bootstraps, and reports the test AUC and the signal efficiency at 50% background
efficiency, laid out like the paper's table.

Columns
    ``resim_inv``  pre-detector rotation (resimulation) + encouraged invariance
    ``post_inv``   post-detector rotation (image rotation) + encouraged invariance
    ``resim``      pre-detector rotation alone
    ``post``       post-detector rotation alone
    ``none``       no augmentation
    Rotations are the 8 multiples of 45°; the copies come from
    :mod:`bsym.training.augmentation`, the same functions ``bsym train`` uses, and so does
    the loss c1·BCE + c2·mean Var(score over an event's copies) (c1 = 1, c2 =
    ``invariance_weight``).
Data
    One calo-rotation sample per geometry (cached in the data directory and reused): the
    first ``test_events`` events are the (unrotated) test set, the next ``val_events`` the
    (unrotated) validation set, the rest the pool. Bootstrap b draws each training set of n
    events from the pool without replacement with its own seed (the same events for every
    column and network), and seeds the network's initial weights with it too.
Training (in memory, one torch thread)
    Adam (AdamW, weight decay 0), lr 1e-3, batches of ``events_per_batch`` = 16 events with
    all their copies (so every column takes the same number of steps per epoch), at most
    ``max_epochs`` = 12 epochs; training stops after ``patience`` = 5 epochs without a better
    validation AUC and keeps the best-validation epoch. A training set too small for
    ``min_steps`` = 1,500 optimiser steps in 12 epochs has both numbers stretched by the same
    factor, at most 4 (480 events: 48 epochs, patience 20; 960 events: 25 and 11). The PFN
    learns in steps (plateaus near AUC 0.65 and 0.79 on the rect cells that some trainings
    leave late), so its three numbers are multiplied by ``pfn_schedule_factor`` = 3 (36
    epochs, patience 15, 4,500 steps; 480 events: 144 epochs). The validation set is the same
    for every run and never rotated.
Invariance weight
    c2 = 10 (c1 = 1): with c2 = 1 the term, a variance of probabilities of order 10⁻², hardly
    moves the training (one tuning check on 480 rect events, PFN test AUC: 0.685 with c2 = 1
    against 0.682 without; 0.777 with c2 = 10 against 0.754 without, at 30 epochs).
Reference
    A rotation-invariant classifier (:mod:`bsym.training.studies.invariant_reference`: pair-distance
    histograms and an MLP) trained on the whole pool, on the pre-detector particles and on the
    cells, printed for context.
Networks
    PFN: Φ 3→32→32→32→32 per cell (log(1 + E/GeV), x, y, standardised; the log is in the
    feature spec, :func:`pfn_feature_spec`), masked sum, F 32→32→32→32→1; both read the
    ``MAX_CELLS`` = 16 most energetic cells (rect events have at most 16).
    FCN: the image binned in the graph on the detector's own cells, log1p and per-pixel
    standardisation, dense 64→64→64→1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.simulate.calo_rotation import preset_detector, write_calo_rotation
from bsym.training.augmentation import (
    DEFAULT_ANGLES,
    CaloEvents,
    augmented_rows,
    calo_feature_spec,
    cell_features,
    read_calo_events,
)
from bsym.training.fit import FitState, OptimizerConfig, Rows, fit, predict_logits
from bsym.training.losses import InvarianceTerm
from bsym.training.metrics import roc_auc, roc_curve
from bsym.training.models import PFN, NetworkModel, model_inputs
from bsym.training.models.base import need

COLUMNS = ("resim_inv", "post_inv", "resim", "post", "none")
COLUMN_TITLES = {
    "resim_inv": "pre-det + inv",
    "post_inv": "post-det + inv",
    "resim": "pre-det aug",
    "post": "post-det aug",
    "none": "no aug",
}
COLUMN_MODES = {
    "resim_inv": ("resimulation", True),
    "post_inv": ("post_detector", True),
    "resim": ("resimulation", False),
    "post": ("post_detector", False),
    "none": ("none", False),
}
NETWORKS = ("fcn", "pfn")
NETWORK_TITLES = {"fcn": "FCN", "pfn": "PFN"}
PFN_PHI = (32, 32, 32, 32)
PFN_F = (32, 32, 32)
FCN_HIDDEN = (64, 64, 64)
MAX_CELLS = 16
MAX_STRETCH = 4.0
EVAL_BATCH = 8192
BACKGROUND_EFFICIENCY = 0.5
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines one augmentation study."""

    geometry: str = "rect"
    sizes: tuple[int, ...] = (480, 960, 1440, 1920, 2400)
    bootstraps: int = 5
    seed: int = 1
    test_events: int = 20_000
    val_events: int = 1_000
    pool_events: int = 12_000
    max_epochs: int = 12
    patience: int = 5
    min_steps: int = 1_500
    events_per_batch: int = 16
    learning_rate: float = 1e-3
    pfn_schedule_factor: float = 3.0
    invariance_weight: float = 10.0
    networks: tuple[str, ...] = NETWORKS
    reference: bool = True
    columns: tuple[str, ...] = COLUMNS

    def __post_init__(self) -> None:
        if self.geometry not in ("rect", "uniform"):
            raise ConfigError(f"unknown geometry '{self.geometry}'; choose rect or uniform")
        if not self.sizes or min(self.sizes) < 2:
            raise ConfigError(f"training sizes must be at least 2 events, got {self.sizes}")
        if max(self.sizes) > self.pool_events:
            raise ConfigError(
                f"the largest training size ({max(self.sizes)}) exceeds the pool "
                f"({self.pool_events} events)"
            )
        if self.pfn_schedule_factor <= 0:
            raise ConfigError(
                f"pfn_schedule_factor must be positive, got {self.pfn_schedule_factor}"
            )
        if self.bootstraps < 1:
            raise ConfigError(f"bootstraps must be at least 1, got {self.bootstraps}")
        for name, chosen, known in (
            ("network", self.networks, NETWORKS),
            ("column", self.columns, COLUMNS),
        ):
            unknown = sorted(set(chosen) - set(known))
            if unknown:
                raise ConfigError(f"unknown {name}(s) {unknown}; choose from {list(known)}")

    @property
    def total_events(self) -> int:
        return self.test_events + self.val_events + self.pool_events


QUICK = StudySettings(
    sizes=(480, 2400),
    bootstraps=2,
    test_events=5_000,
    val_events=1_000,
    pool_events=4_000,
    max_epochs=10,
    patience=4,
    min_steps=600,
)


@dataclass
class RunResult:
    """One training: network, column, size and bootstrap, and what it reached."""

    network: str
    column: str
    size: int
    bootstrap: int
    test_auc: float
    signal_efficiency: float
    val_auc: float
    best_epoch: int
    epochs: int
    seconds: float


@dataclass
class StudyResult:
    """All runs of a study, with the settings that produced them."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    networks_run: tuple[str, ...] = ()
    reference: dict[str, float] = field(default_factory=dict)
    """Test AUC of the rotation-invariant reference on ``particles`` and on ``cells``."""

    def summary(self, metric: str) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
        """Mean and std over bootstraps of ``metric``, per network, column and size."""
        table: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
        for network in self.networks_run:
            table[network] = {}
            for column in self.settings.columns:
                table[network][column] = {}
                for size in self.settings.sizes:
                    values = [
                        getattr(r, metric)
                        for r in self.runs
                        if r.network == network and r.column == column and r.size == size
                    ]
                    if values:
                        table[network][column][size] = (float(np.mean(values)), _std(values))
        return table

    def to_json(self) -> str:
        return json.dumps(
            {
                "settings": asdict(self.settings),
                "seconds": self.seconds,
                "notes": self.notes,
                "invariant_reference_auc": self.reference,
                "auc": _jsonable(self.summary("test_auc")),
                "signal_efficiency_at_50pct_background": _jsonable(
                    self.summary("signal_efficiency")
                ),
                "runs": [asdict(run) for run in self.runs],
            },
            indent=2,
        )


def _jsonable(
    table: dict[str, dict[str, dict[int, tuple[float, float]]]],
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    return {
        network: {
            column: {str(size): {"mean": m, "std": s} for size, (m, s) in rows.items()}
            for column, rows in columns.items()
        }
        for network, columns in table.items()
    }


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def load_events(settings: StudySettings, data_dir: Path) -> CaloEvents:
    """Simulate the study's sample into ``data_dir`` (or reuse it) and read it back."""
    sample_dir = data_dir / f"{settings.geometry}_seed{settings.seed}_n{settings.total_events}"
    wanted = {"geometry": settings.geometry, "seed": settings.seed, "n": settings.total_events}
    manifest = sample_dir / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("sample") == wanted:
        paths = [sample_dir / name for name in json.loads(manifest.read_text())["files"]]
    else:
        paths = write_calo_rotation(
            sample_dir,
            settings.total_events,
            seed=settings.seed,
            detector=preset_detector(settings.geometry),
            name=settings.geometry,
        )
        manifest.write_text(json.dumps({"sample": wanted, "files": [p.name for p in paths]}))
    return read_calo_events(paths)


def pfn_feature_spec(max_count: int) -> FeatureSpec:
    """The cells for the PFN: (log1p(Cell_E), Cell_x, Cell_y). The cell energies are
    exponential-like; their log keeps a few hard cells from dominating the standardised
    inputs of Φ."""
    spec = calo_feature_spec(max_count)
    if spec.constituents is None:
        raise SpecMismatchError("the calo-rotation feature spec has no constituents")
    energy, *position = spec.constituents.features
    log_energy = energy.model_copy(update={"transform": "log1p"})
    constituents = spec.constituents.model_copy(update={"features": [log_energy, *position]})
    return spec.model_copy(update={"constituents": constituents})


def network_feature_spec(name: str) -> FeatureSpec:
    """The feature spec a network of the study reads (the FCN bins the raw energies)."""
    return pfn_feature_spec(MAX_CELLS) if name == "pfn" else calo_feature_spec(MAX_CELLS)


def network_schedule(name: str, settings: StudySettings) -> StudySettings:
    """``settings`` with the epoch limit, patience and minimum steps of ``name``."""
    if name != "pfn":
        return settings
    factor = settings.pfn_schedule_factor
    return replace(
        settings,
        max_epochs=round(settings.max_epochs * factor),
        patience=round(settings.patience * factor),
        min_steps=round(settings.min_steps * factor),
    )


def build_network(name: str, settings: StudySettings) -> NetworkModel:
    """A fresh, unfitted network of the study."""
    if name == "pfn":
        return PFN(3, 0, PFN_PHI, PFN_F, use_globals=False)
    from bsym.training.models.image import ImageFCN

    detector = preset_detector(settings.geometry)
    return ImageFCN(0, detector.x_edges, detector.y_edges, FCN_HIDDEN)


def image_fcn_available() -> bool:
    try:
        from bsym.training.models.image import ImageFCN  # noqa: F401
    except ImportError:
        return False
    return True


def scores(model: NetworkModel, rows: FeatureBatch) -> npt.NDArray[np.float64]:
    """The model's probabilities on ``rows``, in eval mode."""
    logits = predict_logits(model, model_inputs(model, rows))
    return torch.sigmoid(logits[:, 0]).numpy().astype(np.float64)


def signal_efficiency_at(
    labels: npt.NDArray[np.int64],
    score: npt.NDArray[np.float64],
    background_efficiency: float = BACKGROUND_EFFICIENCY,
) -> float:
    """Signal efficiency where the background efficiency reaches ``background_efficiency``."""
    fpr, tpr, _ = roc_curve(labels, score)
    return float(np.interp(background_efficiency, fpr, tpr))


def train_network(
    name: str,
    train: FeatureBatch,
    n_copies: int,
    val: FeatureBatch,
    settings: StudySettings,
    *,
    invariance: bool,
    seed: int,
) -> tuple[NetworkModel, FitState]:
    """Train one network with the one training loop on event-major rows with ``n_copies``
    per event; it ends at its best validation AUC."""
    torch.manual_seed(seed)
    model = build_network(name, settings)
    model.prepare(train)
    c2 = settings.invariance_weight if invariance else 0.0
    state = fit(
        model,
        Rows.of(model, train, copies=n_copies),
        Rows.of(model, val),
        schedule(settings, n_copies),
        seed=seed,
        terms=[InvarianceTerm(c2)],
    )
    return model, state


def schedule(settings: StudySettings, n_copies: int) -> OptimizerConfig:
    """Adam, ``events_per_batch`` events with all their copies per batch, the epoch limit
    and patience stretched to give small sets ``min_steps`` steps."""
    return OptimizerConfig(
        lr=settings.learning_rate,
        weight_decay=0.0,
        batch_size=settings.events_per_batch * n_copies,
        epochs=settings.max_epochs,
        patience=settings.patience,
        min_steps=settings.min_steps,
        max_stretch=MAX_STRETCH,
    )


def run_study(
    settings: StudySettings,
    data_dir: Path,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> StudyResult:
    """Train every network and column at every size and bootstrap."""
    from tqdm import tqdm

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    result = StudyResult(settings)
    networks = list(settings.networks)
    if "fcn" in networks and not image_fcn_available():
        networks.remove("fcn")
        note = "FCN row skipped: model type 'image_fcn' (training/models/image.py) is missing"
        result.notes.append(note)
        if on_note is not None:
            on_note(note)
    result.networks_run = tuple(networks)
    events = load_events(settings, data_dir)
    specs = {network: network_feature_spec(network) for network in networks}
    test_stop = settings.test_events
    val_stop = test_stop + settings.val_events
    tests = {n: unrotated_rows(events, np.arange(test_stop), spec) for n, spec in specs.items()}
    vals = {
        n: unrotated_rows(events, np.arange(test_stop, val_stop), spec) for n, spec in specs.items()
    }
    pool = np.arange(val_stop, events.n_events, dtype=np.int64)
    if settings.reference:
        result.reference = invariant_reference(events, test_stop, val_stop)
    jobs = [
        (b, size, column, network)
        for b in range(settings.bootstraps)
        for size in settings.sizes
        for column in settings.columns
        for network in networks
    ]
    cache: dict[tuple[int, int, str, str], tuple[FeatureBatch, int]] = {}
    for b, size, column, network in tqdm(jobs, desc="augmentation study", unit="run"):
        begun = time.perf_counter()
        seed = settings.seed * 10_000 + b * 100 + settings.sizes.index(size)
        mode, invariance = COLUMN_MODES[column]
        key = (b, size, mode, network)
        if key not in cache:
            cache.clear() if len(cache) > 12 else None
            chosen = np.random.default_rng([seed, 0]).choice(pool, size, replace=False)
            cache[key] = augmented_rows(
                events.take(np.sort(chosen)), mode, DEFAULT_ANGLES, specs[network]
            )
        train_rows, n_copies = cache[key]
        model, state = train_network(
            network,
            train_rows,
            n_copies,
            vals[network],
            network_schedule(network, settings),
            invariance=invariance,
            seed=seed,
        )
        test_scores = scores(model, tests[network])
        labels = need(tests[network].label, "label")
        run = RunResult(
            network=network,
            column=column,
            size=size,
            bootstrap=b,
            test_auc=roc_auc(labels, test_scores),
            signal_efficiency=signal_efficiency_at(labels, test_scores),
            val_auc=state.best_auc,
            best_epoch=state.best_epoch,
            epochs=state.epoch,
            seconds=time.perf_counter() - begun,
        )
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    result.seconds = time.perf_counter() - started
    return result


def invariant_reference(events: CaloEvents, test_stop: int, val_stop: int) -> dict[str, float]:
    """The invariant-feature reference trained on the whole pool, on particles and cells."""
    from bsym.training.studies.invariant_reference import reference_auc

    parts = [
        events.take(np.arange(start, stop, dtype=np.int64))
        for start, stop in ((val_stop, events.n_events), (test_stop, val_stop), (0, test_stop))
    ]
    return {
        name: reference_auc(*((getattr(part, name), part.label) for part in parts))
        for name in ("particles", "cells")
    }


def unrotated_rows(
    events: CaloEvents, index: npt.NDArray[np.int64], spec: FeatureSpec
) -> FeatureBatch:
    """The recorded cells of the given events, as feature rows."""
    chosen = events.take(index.astype(np.int64))
    return cell_features(chosen.cells, chosen.label, spec)


def with_overrides(settings: StudySettings, **overrides: object) -> StudySettings:
    """``settings`` with the given fields replaced (``None`` values are ignored)."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def plot_metric(result: StudyResult, metric: str, label: str, path: Path) -> None:
    """Mean ± std against training size: one panel per network, one line per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.summary(metric)
    networks = list(summary)
    figure, axes_list = plt.subplots(
        1, max(len(networks), 1), figsize=(5.5 * max(len(networks), 1), 4), squeeze=False
    )
    for axes, network in zip(axes_list[0], networks, strict=False):
        for column, rows in summary[network].items():
            sizes = sorted(rows)
            axes.errorbar(
                sizes,
                [rows[s][0] for s in sizes],
                yerr=[rows[s][1] for s in sizes],
                marker="o",
                capsize=3,
                label=COLUMN_TITLES[column],
            )
        axes.set_xlabel("training events")
        axes.set_ylabel(label)
        axes.set_title(f"{NETWORK_TITLES[network]}, {result.settings.geometry} cells")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """The JSON of the numbers and the two plots; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / "augmentation.json",
        out_dir / "auc_vs_size.png",
        out_dir / "signal_efficiency_vs_size.png",
    ]
    paths[0].write_text(result.to_json())
    plot_metric(result, "test_auc", "test AUC", paths[1])
    plot_metric(result, "signal_efficiency", "signal efficiency at 50% background", paths[2])
    return paths
