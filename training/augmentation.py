"""Rotation augmentation for the calorimeter task (arXiv:2311.05952; docs/papers.md,
"Rotation symmetry").

Three ways to make training rows from calo-rotation events, all returning the rows of each
event contiguous (event-major: event 0 at every angle, then event 1, ...):

- ``none``: the recorded cells, one row per event;
- ``post_detector``: the recorded cells rotated as an image (:func:`rotate_image`: each cell's
  energy moves with its centre and is binned again into the same cells);
- ``resimulation``: the pre-detector particles rotated and passed through the same detector
  again (:func:`bsym.simulate.calo_rotation.detect` with the file's detector config).

Rows go through :func:`bsym.features.build_features` like any file, so training and scoring
see the same tensors. The encouraged-invariance loss is
``c1·BCE + c2·mean over events of Var(sigmoid score over that event's copies)`` (the
variance with divisor K, i.e. the squared standard deviation), which needs every batch to
hold whole events with all their copies: the training loop (:mod:`bsym.training.fit`) makes
such batches from rows given with their number of copies, and adds the term
(:class:`bsym.training.losses.InvarianceTerm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import awkward as ak
import numpy as np
import numpy.typing as npt

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import (
    Constituents,
    Feature,
    FeatureBatch,
    FeatureSpec,
    Label,
    build_features,
    required_branches,
)
from bsym.simulate.calo_rotation import (
    TREE,
    DetectorConfig,
    Hits,
    detect,
    read_detector,
    rotate,
    rotate_image,
)
from bsym.training.config import TrainConfig
from bsym.training.dataset import Split


class AugmentationMode(str, Enum):
    """How the rotated copies are made (the values of a config's ``augmentation.mode``)."""

    none = "none"
    post_detector = "post_detector"
    resimulation = "resimulation"

    def __str__(self) -> str:
        return self.value


DEFAULT_ANGLES = tuple(45.0 * k for k in range(8))
CELL_BRANCHES = ("Cell_E", "Cell_x", "Cell_y")
PARTICLE_BRANCHES = ("Particle_x", "Particle_y", "Particle_E")
Ints = npt.NDArray[np.int64]


def calo_feature_spec(max_count: int = 32) -> FeatureSpec:
    """Cells as constituents with columns (value, x, y) = (Cell_E, Cell_x, Cell_y), the most
    energetic ``max_count`` kept; one row per event (object layout), label ``label``."""
    return FeatureSpec(
        tree=TREE,
        objects="Shower",
        constituents=Constituents(
            features=[Feature(branch=b) for b in CELL_BRANCHES],
            max_count=max_count,
            sort_by="Cell_E",
        ),
        label=Label(branch="label", positive=[1]),
    )


@dataclass(frozen=True)
class CaloEvents:
    """Events of calo-rotation files: particles, recorded cells, truth and the detector."""

    particles: Hits
    cells: Hits
    label: npt.NDArray[np.int64]
    event: Ints
    detector: DetectorConfig

    @property
    def n_events(self) -> int:
        return len(self.label)

    def take(self, events: Ints) -> CaloEvents:
        return CaloEvents(
            self.particles.take(events),
            self.cells.take(events),
            self.label[events],
            self.event[events],
            self.detector,
        )


def read_calo_events(
    paths: Sequence[Path], *, tree: str = TREE, max_rows: int | None = None
) -> CaloEvents:
    """Read calo-rotation files in order (at most ``max_rows`` events); all must share one
    detector config, the one training resimulates with."""
    from bsym.rootio import TreeSource, read_all

    branches = ["event", "label", *PARTICLE_BRANCHES, *CELL_BRANCHES]
    chunks = []
    detector: DetectorConfig | None = None
    for path in paths:
        this = read_detector(path)
        if detector is not None and this != detector:
            raise SpecMismatchError(
                f"{path} was simulated with another detector than the files before it "
                f"({this.to_json()} against {detector.to_json()}); resimulation needs one"
            )
        detector = this
        chunks.append(read_all(TreeSource(Path(path), tree), branches))
        if max_rows is not None and sum(len(c) for c in chunks) >= max_rows:
            break
    if detector is None:
        raise ConfigError("no calo-rotation files given")
    arrays = ak.concatenate(chunks)
    if max_rows is not None:
        arrays = arrays[:max_rows]
    return CaloEvents(
        particles=Hits.from_jagged(arrays, "Particle"),
        cells=Hits.from_jagged(arrays, "Cell"),
        label=np.asarray(arrays["label"], dtype=np.int64),
        event=np.asarray(arrays["event"], dtype=np.int64),
        detector=detector,
    )


def check_angles(angles: Sequence[float]) -> tuple[float, ...]:
    if not angles:
        raise ConfigError("augmentation needs at least one angle")
    return tuple(float(a) for a in angles)


def resimulated_copies(events: CaloEvents, angles: Sequence[float]) -> Hits:
    """Cells of every event's particles rotated by each angle and detected again, event-major."""
    copies = [detect(rotate(events.particles, a), events.event, events.detector) for a in angles]
    return interleave(copies)


def post_detector_copies(events: CaloEvents, angles: Sequence[float]) -> Hits:
    """The recorded cells rotated by each angle and binned again into the same cells."""
    copies = [rotate_image(events.cells, a, events.detector) for a in angles]
    return interleave(copies)


def interleave(copies: Sequence[Hits]) -> Hits:
    """K sets of the same N events → N·K events ordered event-major (event, then copy)."""
    n_events, n_copies = copies[0].n_events, len(copies)
    joined = Hits.concatenate(copies)
    order = (np.arange(n_copies)[None, :] * n_events + np.arange(n_events)[:, None]).ravel()
    return joined.take(order.astype(np.int64))


def cell_features(cells: Hits, label: npt.NDArray[np.int64], spec: FeatureSpec) -> FeatureBatch:
    """Model tensors of cells, through :func:`build_features` with the file's branch names."""
    arrays = ak.Array({**cells.jagged("Cell"), "label": label.astype(np.int32)})
    return build_features(arrays, spec, "object", with_label=True)


def augmented_rows(
    events: CaloEvents,
    mode: AugmentationMode | str,
    angles: Sequence[float],
    spec: FeatureSpec,
) -> tuple[FeatureBatch, int]:
    """Training rows of ``events`` under ``mode`` and the number of copies per event."""
    try:
        mode = AugmentationMode(mode)
    except ValueError as error:
        choices = ", ".join(m.value for m in AugmentationMode)
        raise ConfigError(f"unknown augmentation mode '{mode}'; choose from {choices}") from error
    if mode is AugmentationMode.none:
        return cell_features(events.cells, events.label, spec), 1
    angles = check_angles(angles)
    if mode is AugmentationMode.resimulation:
        cells = resimulated_copies(events, angles)
    else:
        cells = post_detector_copies(events, angles)
    label = np.repeat(events.label, len(angles))
    return cell_features(cells, label, spec), len(angles)


@dataclass(frozen=True)
class AugmentedTraining:
    """Training rows with their rotated copies, event-major."""

    rows: FeatureBatch
    n_copies: int


def augment_training_rows(config: TrainConfig, split: Split) -> AugmentedTraining:
    """The training rows of ``split`` with the copies ``config.augmentation`` asks for.

    The events are read again from the recorded training inputs with their particles and
    detector config; resimulation first checks that the detector reproduces the recorded
    cells of these events, so a file whose cells came from another detector is refused.
    """
    settings = config.augmentation
    if settings is None:
        raise ConfigError("the config has no augmentation section")
    spec = config.features
    needed = set(required_branches(spec, "object", with_label=True))
    extra = sorted(needed - {*CELL_BRANCHES, "label"})
    if extra:
        raise ConfigError(
            "augmentation rotates the cells (Cell_E, Cell_x, Cell_y) and the label only; "
            f"the feature spec also reads {', '.join(extra)}"
        )
    trees = {record.tree for record in split.sources}
    events = read_calo_events(
        [Path(record.path) for record in split.sources],
        tree=trees.pop() if len(trees) == 1 else TREE,
        max_rows=config.data.max_rows,
    )
    if events.n_events != split.n_rows:
        raise SpecMismatchError(
            f"the calo-rotation inputs give {events.n_events} events for {split.n_rows} rows"
        )
    train = events.take(split.train)
    mode = AugmentationMode(settings.mode)
    if mode is AugmentationMode.resimulation:
        check_reproduces_cells(train)
    rows, n_copies = augmented_rows(train, mode, settings.angles, spec)
    return AugmentedTraining(rows, n_copies)


def check_reproduces_cells(events: CaloEvents) -> None:
    """Refuse to resimulate events whose recorded cells the recorded detector does not give."""
    again = detect(events.particles, events.event, events.detector)
    recorded = events.cells
    same = np.array_equal(again.counts, recorded.counts) and all(
        np.array_equal(getattr(again, f).astype(np.float32), getattr(recorded, f))
        for f in ("x", "y", "energy")
    )
    if not same:
        raise SpecMismatchError(
            "the recorded cells are not what the recorded detector gives for these particles "
            f"(detector {events.detector.to_json()}); resimulation would train on another "
            "detector than the one the files were made with"
        )
