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
    ``rpcn``       rPCN (:mod:`bsym.training.models.rpcn`) alone, no augmentation
    ``dual``       dual model (rPCN + PFN latents mixed by a learned weight), no augmentation
    ``dual_resim`` dual model with pre-detector rotation
    The last three are networks on the cells rather than augmentations: they fill the PFN
    row only (their networks replace the PFN; the FCN row leaves them empty).
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
Training (in memory, one torch thread, with the one training loop :func:`bsym.training.fit.fit`)
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
    rPCN: Φ 3→32→32→32 on (rotated x, rotated y, log(1 + E/GeV)) at the 8 multiples of 45°,
    one circular convolution 3·32→32 over the angles, max over them, F as the PFN's. Dual:
    that rPCN latent and a PFN latent (Φ as the PFN's) mixed by w = softmax(G(z_u ⊕ z_i)),
    G 64→32→32→2, then F. Both train on the PFN's schedule.
    FCN: the image binned in the graph on the detector's own cells, log1p and per-pixel
    standardisation, dense 64→64→64→1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator

from bsym.errors import SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.settings import Settings
from bsym.simulate.calo_rotation import preset_detector, write_calo_rotation
from bsym.simulate.geometry import Geometry
from bsym.training.augmentation import (
    DEFAULT_ANGLES,
    AugmentationMode,
    CaloEvents,
    augmented_rows,
    calo_feature_spec,
    cell_features,
    read_calo_events,
)
from bsym.training.checkpoint import predict
from bsym.training.fit import FitState, OptimizerConfig, Rows, fit
from bsym.training.losses import InvarianceTerm
from bsym.training.metrics import roc_auc, signal_efficiency_at
from bsym.training.models import PFN, NetworkModel
from bsym.training.models.base import need
from bsym.training.studies.harness import (
    cached_sample,
    jsonable_summary,
    summarise,
    write_json,
)

ColumnName = Literal["resim_inv", "post_inv", "resim", "post", "none", "rpcn", "dual", "dual_resim"]
NetworkName = Literal["fcn", "pfn"]
COLUMNS: tuple[ColumnName, ...] = (
    "resim_inv",
    "post_inv",
    "resim",
    "post",
    "none",
    "rpcn",
    "dual",
    "dual_resim",
)
COLUMN_TITLES = {
    "resim_inv": "pre-det + inv",
    "post_inv": "post-det + inv",
    "resim": "pre-det aug",
    "post": "post-det aug",
    "none": "no aug",
    "rpcn": "rPCN",
    "dual": "dual",
    "dual_resim": "dual + pre-det",
}
COLUMN_MODES = {
    "resim_inv": (AugmentationMode.resimulation, True),
    "post_inv": (AugmentationMode.post_detector, True),
    "resim": (AugmentationMode.resimulation, False),
    "post": (AugmentationMode.post_detector, False),
    "none": (AugmentationMode.none, False),
    "rpcn": (AugmentationMode.none, False),
    "dual": (AugmentationMode.none, False),
    "dual_resim": (AugmentationMode.resimulation, False),
}
# columns whose network replaces the PFN of the cells row
COLUMN_NETWORKS = {"rpcn": "rpcn", "dual": "dual", "dual_resim": "dual"}
NETWORKS: tuple[NetworkName, ...] = ("fcn", "pfn")
NETWORK_TITLES = {"fcn": "FCN", "pfn": "PFN"}
PFN_PHI = (32, 32, 32, 32)
PFN_F = (32, 32, 32)
FCN_HIDDEN = (64, 64, 64)
RPCN_ANGLES = 8
RPCN_PHI = PFN_PHI[:-1]
RPCN_CONV = PFN_PHI[-1:]
MAX_CELLS = 16
BACKGROUND_EFFICIENCY = 0.5


class StudySettings(Settings):
    """Everything that defines one augmentation study."""

    geometry: Geometry = Geometry.rect
    sizes: tuple[int, ...] = Field(default=(480, 960, 1440, 1920, 2400), min_length=1)
    bootstraps: int = Field(default=5, ge=1)
    seed: int = 1
    test_events: int = Field(default=20_000, ge=2)
    val_events: int = Field(default=1_000, ge=2)
    pool_events: int = Field(default=12_000, ge=2)
    max_epochs: int = Field(default=12, ge=1)
    patience: int = Field(default=5, ge=1)
    min_steps: int = Field(default=1_500, ge=0)
    events_per_batch: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    pfn_schedule_factor: float = Field(default=3.0, gt=0)
    invariance_weight: float = Field(default=10.0, ge=0)
    networks: tuple[NetworkName, ...] = NETWORKS
    reference: bool = True
    columns: tuple[ColumnName, ...] = COLUMNS

    @model_validator(mode="after")
    def _sizes_fit_the_pool(self) -> StudySettings:
        if min(self.sizes) < 2:
            raise ValueError(f"training sizes must be at least 2 events, got {self.sizes}")
        if max(self.sizes) > self.pool_events:
            raise ValueError(
                f"the largest training size ({max(self.sizes)}) exceeds the pool "
                f"({self.pool_events} events)"
            )
        return self

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
        settings = self.settings
        levels = (self.networks_run, settings.columns, settings.sizes)
        return summarise(self.runs, metric, ("network", "column", "size"), levels)

    def document(self) -> dict[str, object]:
        """The numbers of the study, as written to ``augmentation.json``."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "seconds": self.seconds,
            "notes": self.notes,
            "invariant_reference_auc": self.reference,
            "auc": jsonable_summary(self.summary("test_auc")),
            "signal_efficiency_at_50pct_background": jsonable_summary(
                self.summary("signal_efficiency")
            ),
            "runs": [asdict(run) for run in self.runs],
        }


def load_events(settings: StudySettings, data_dir: Path) -> CaloEvents:
    """Simulate the study's sample into ``data_dir`` (or reuse it) and read it back."""
    geometry = settings.geometry.value
    paths = cached_sample(
        data_dir / f"{geometry}_seed{settings.seed}_n{settings.total_events}",
        {"geometry": geometry, "seed": settings.seed, "n": settings.total_events},
        lambda out: write_calo_rotation(
            out,
            settings.total_events,
            seed=settings.seed,
            detector=preset_detector(settings.geometry),
            name=geometry,
        ),
    )
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
    return settings.with_overrides(
        max_epochs=round(settings.max_epochs * factor),
        patience=round(settings.patience * factor),
        min_steps=round(settings.min_steps * factor),
    )


def build_network(name: str, settings: StudySettings) -> NetworkModel:
    """A fresh, unfitted network of the study: ``fcn``, ``pfn``, ``rpcn`` or ``dual``."""
    from bsym.training.models.rpcn import RPCN, RotationDual

    if name == "pfn":
        return PFN(3, 0, PFN_PHI, PFN_F, use_globals=False)
    if name in ("rpcn", "dual"):
        network = RPCN if name == "rpcn" else RotationDual
        return network(3, 0, (1, 2), RPCN_ANGLES, RPCN_PHI, RPCN_CONV, f_sizes=PFN_F)
    from bsym.training.models.image import ImageFCN

    detector = preset_detector(settings.geometry)
    return ImageFCN(0, detector.x_edges, detector.y_edges, FCN_HIDDEN)


def image_fcn_available() -> bool:
    try:
        from bsym.training.models.image import ImageFCN  # noqa: F401
    except ImportError:
        return False
    return True


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
        if network == "pfn" or column not in COLUMN_NETWORKS
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
            COLUMN_NETWORKS.get(column, network),
            train_rows,
            n_copies,
            vals[network],
            network_schedule(network, settings),
            invariance=invariance,
            seed=seed,
        )
        test_scores = predict(model, tests[network])
        labels = need(tests[network].label, "label")
        run = RunResult(
            network=network,
            column=column,
            size=size,
            bootstrap=b,
            test_auc=roc_auc(labels, test_scores),
            signal_efficiency=signal_efficiency_at(labels, test_scores, BACKGROUND_EFFICIENCY),
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


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``augmentation.json`` in ``out_dir`` (the plots are :mod:`.plots`'); its path."""
    return [write_json(out_dir / "augmentation.json", result.document())]
