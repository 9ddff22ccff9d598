"""Calorimeter showers with a rotation-breaking detector (arXiv:2311.05952; docs/papers.md,
"Rotation symmetry").

Each event is a list of pre-detector particles (x, y, E) on the square [−1, 1]²; a detector
bins them into cells, smears each cell's energy and drops cells below a threshold. The
detector is a function of the particles, the event number and a :class:`DetectorConfig`, so
training can rotate the particles and pass them through exactly the same detector again
(resimulation augmentation). Every choice the paper leaves open is written down here.

Classes (the ideal separation is rotation invariant: both are isotropic about the origin)
    Both classes draw the same multiplicity, ``MIN_PARTICLES`` + Poisson(``EXTRA_PARTICLES``),
    and the same particle energies, exponential with mean ``MEAN_ENERGY`` GeV; the shower is
    centred at a point drawn uniformly in a disc of radius ``CENTRE_JITTER`` about the origin.
    Signal: two prongs at a fixed opening ``OPENING`` (distance between the prong axes) and a
    uniformly random orientation; each particle joins either prong with probability 1/2 and
    lies at a Gaussian offset of width ``PRONG_WIDTH`` from its prong axis. Background: one
    broader prong, a Gaussian of width ``BROAD_WIDTH`` chosen so that both classes have the
    same mean squared distance of a particle from the shower centre. Multiplicity, energies
    and the radial second moment carry no information; only the two-prong shape does.
    Particles farther than 1 from the origin are dropped (a few per mille), so every rotation
    of an event stays inside the square.
Detector (the geometry is configuration)
    Particles are binned into cells by x and y edges (a particle on the last edge belongs to
    the last cell, one outside the edges is lost); a cell's true energy is the sum of its
    particles'. The measured energy is E + σ(E)·n with σ(E) = √(a²·E + b²·E²) (stochastic
    term a, constant term b) and n a standard normal, clipped at 0; cells whose measured
    energy is not above ``threshold`` are dropped. Each cell is recorded at its centre.
    Presets: ``uniform`` 32×32 cells; ``rect`` 32×4 cells (x edges linspace(−1, 1, 33), y
    edges linspace(−1, 1, 5)), whose coarse, non-square cells break the rotational symmetry.
Detector randomness, reproducible per event and per cell
    n is a function of (detector seed, event number, cell index) alone: a splitmix64 hash of
    the three, turned into a normal by Box–Muller. Resimulating an event with the same
    detector therefore gives identical cells, and a rotated copy gets the noise of the cells
    it lands in. Angles are taken modulo 360° and multiples of 90° use exact sines and
    cosines, so a rotation by 0° or 360° returns the particles bit for bit.
Files
    TTree ``Events``, one entry per event: ``event`` (the event number, the key of the
    detector noise), ``label`` (1 = two prongs), jagged ``Particle_x/y/E`` and
    ``Cell_x/y/E`` (with uproot's ``nParticle`` and ``nCell``), and the detector config as
    JSON in the TObjString ``bsym/detector`` (and the generator settings in
    ``bsym/generator``), which training reads to resimulate with the same detector.
Reproducibility
    Events are generated in blocks of ``BLOCK_EVENTS``, block k from
    ``SeedSequence(seed, spawn_key=(k,))``; event numbers count from 0 across all files.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from bsym.errors import ConfigError, InputFileError
from bsym.settings import StrictModel
from bsym.simulate.geometry import Geometry
from bsym.simulate.rootwrite import write_branches

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

TREE = "Events"
FILE_PATTERN = "calo_rotation_{geometry}_{index:03d}.root"
DETECTOR_KEY = "bsym/detector"
GENERATOR_KEY = "bsym/generator"
BLOCK_EVENTS = 10_000

MIN_PARTICLES = 4
EXTRA_PARTICLES = 6.0
MEAN_ENERGY = 5.0
CENTRE_JITTER = 0.1
OPENING = 0.4
PRONG_WIDTH = 0.08
BROAD_WIDTH = math.sqrt(((OPENING / 2) ** 2 + 2 * PRONG_WIDTH**2) / 2)
RADIUS = 1.0


class DetectorConfig(StrictModel):
    """Cell edges, energy resolution, threshold and the seed of the per-cell noise."""

    x_edges: list[float] = Field(min_length=2)
    y_edges: list[float] = Field(min_length=2)
    stochastic: float = Field(default=0.5, ge=0, description="a in σ(E) = √(a²E + b²E²), √GeV")
    constant: float = Field(default=0.05, ge=0, description="b in σ(E) = √(a²E + b²E²)")
    threshold: float = Field(default=0.5, ge=0, description="cells need measured E above it")
    seed: int = Field(default=0, ge=0, description="seed of the per-cell smearing noise")

    @model_validator(mode="after")
    def _edges_increase(self) -> DetectorConfig:
        for name, edges in (("x_edges", self.x_edges), ("y_edges", self.y_edges)):
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"{name} must increase strictly, got {edges}")
            if not all(math.isfinite(e) for e in edges):
                raise ValueError(f"{name} must be finite numbers, got {edges}")
        return self

    @property
    def n_cells(self) -> int:
        return (len(self.x_edges) - 1) * (len(self.y_edges) - 1)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> DetectorConfig:
        return cls.model_validate(json.loads(text))


def linspace_edges(low: float, high: float, bins: int) -> list[float]:
    return [float(v) for v in np.linspace(low, high, bins + 1)]


def preset_detector(geometry: Geometry | str, **settings: Any) -> DetectorConfig:
    """``uniform``: 32×32 cells on [−1, 1]²; ``rect``: 32×4 cells."""
    try:
        preset = Geometry(geometry)
    except ValueError as error:
        choices = " or ".join(g.value for g in Geometry)
        raise ConfigError(f"unknown geometry '{geometry}'; choose {choices}") from error
    y_bins = {Geometry.uniform: 32, Geometry.rect: 4}[preset]
    return DetectorConfig(
        x_edges=linspace_edges(-1, 1, 32), y_edges=linspace_edges(-1, 1, y_bins), **settings
    )


@dataclass(frozen=True)
class Hits:
    """Points with energies for a set of events: flat columns and per-event counts."""

    x: Floats
    y: Floats
    energy: Floats
    counts: Ints

    @property
    def n_events(self) -> int:
        return len(self.counts)

    @property
    def event_index(self) -> Ints:
        """For every point, the position of its event in this set."""
        return np.repeat(np.arange(self.n_events, dtype=np.int64), self.counts)

    def take(self, events: Ints) -> Hits:
        """The given events (by position), in that order."""
        offsets = np.concatenate(([0], np.cumsum(self.counts)))
        counts = self.counts[events]
        starts = np.repeat(offsets[events], counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        points = starts + within
        return Hits(self.x[points], self.y[points], self.energy[points], counts)

    def jagged(self, prefix: str) -> dict[str, ak.Array]:
        """``{prefix_x, prefix_y, prefix_E}`` as jagged float32 arrays."""
        columns = {"x": self.x, "y": self.y, "E": self.energy}
        return {
            f"{prefix}_{name}": ak.unflatten(values.astype(np.float32), self.counts)
            for name, values in columns.items()
        }

    @classmethod
    def concatenate(cls, parts: Sequence[Hits]) -> Hits:
        """The events of ``parts``, one set after the other."""
        return cls(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.energy for p in parts]),
            np.concatenate([p.counts for p in parts]),
        )

    @classmethod
    def from_jagged(cls, arrays: ak.Array, prefix: str) -> Hits:
        """Read ``prefix_x/y/E`` jagged branches back (float64)."""
        counts = np.asarray(ak.num(arrays[f"{prefix}_E"], axis=1), dtype=np.int64)

        def flat(name: str) -> Floats:
            return np.asarray(ak.flatten(arrays[f"{prefix}_{name}"]), dtype=np.float64)

        return cls(flat("x"), flat("y"), flat("E"), counts)


def rotate(hits: Hits, angle_degrees: float) -> Hits:
    """All points rotated by the same angle about the origin (counter-clockwise)."""
    cosine, sine = rotation_matrix(angle_degrees)
    if cosine == 1.0 and sine == 0.0:
        return hits
    x = cosine * hits.x - sine * hits.y
    y = sine * hits.x + cosine * hits.y
    return Hits(x, y, hits.energy, hits.counts)


def rotation_matrix(angle_degrees: float) -> tuple[float, float]:
    """(cos, sin) of the angle modulo 360°, exact for multiples of 90°."""
    angle = math.fmod(float(angle_degrees), 360.0)
    if angle < 0:
        angle += 360.0
    exact = {0.0: (1.0, 0.0), 90.0: (0.0, 1.0), 180.0: (-1.0, 0.0), 270.0: (0.0, -1.0)}
    if angle in exact:
        return exact[angle]
    radians = math.radians(angle)
    return math.cos(radians), math.sin(radians)


def cell_index(hits: Hits, detector: DetectorConfig) -> Ints:
    """Flat cell index ``ix·n_y + iy`` of every point, −1 where it falls outside the edges."""
    ix = _axis_bin(hits.x, np.asarray(detector.x_edges))
    iy = _axis_bin(hits.y, np.asarray(detector.y_edges))
    n_y = len(detector.y_edges) - 1
    return np.where((ix >= 0) & (iy >= 0), ix * n_y + iy, -1)


def _axis_bin(values: Floats, edges: Floats) -> Ints:
    index = np.searchsorted(edges, values, side="right").astype(np.int64) - 1
    index[values == edges[-1]] = len(edges) - 2
    index[(index < 0) | (index >= len(edges) - 1) | ~np.isfinite(values)] = -1
    return index


def cell_centres(index: Ints, detector: DetectorConfig) -> tuple[Floats, Floats]:
    x_edges, y_edges = np.asarray(detector.x_edges), np.asarray(detector.y_edges)
    n_y = len(y_edges) - 1
    ix, iy = index // n_y, index % n_y
    return (x_edges[ix] + x_edges[ix + 1]) / 2, (y_edges[iy] + y_edges[iy + 1]) / 2


def bin_cells(hits: Hits, detector: DetectorConfig) -> tuple[Hits, Ints]:
    """Sum the points' energies per cell: cells at their centres, ordered by cell index within
    each event, and the flat cell index of each; no smearing, no threshold."""
    index = cell_index(hits, detector)
    inside = index >= 0
    event = hits.event_index[inside]
    key = event * detector.n_cells + index[inside]
    unique, inverse = np.unique(key, return_inverse=True)
    energy = np.bincount(inverse, weights=hits.energy[inside], minlength=len(unique)).astype(
        np.float64
    )
    cell_event, cell = unique // detector.n_cells, unique % detector.n_cells
    counts = np.bincount(cell_event, minlength=hits.n_events).astype(np.int64)
    x, y = cell_centres(cell, detector)
    return Hits(x, y, energy, counts), cell


def detect(particles: Hits, event_numbers: Ints, detector: DetectorConfig) -> Hits:
    """The detector: bin, smear each cell with its own (event, cell) noise, apply the threshold."""
    if len(event_numbers) != particles.n_events:
        raise ConfigError(f"{len(event_numbers)} event numbers for {particles.n_events} events")
    cells, index = bin_cells(particles, detector)
    noise = cell_noise(detector.seed, np.repeat(event_numbers, cells.counts), index)
    sigma = np.sqrt(detector.stochastic**2 * cells.energy + (detector.constant * cells.energy) ** 2)
    measured = np.maximum(cells.energy + sigma * noise, 0.0)
    keep = measured > detector.threshold
    counts = np.bincount(cells.event_index[keep], minlength=cells.n_events).astype(np.int64)
    return Hits(cells.x[keep], cells.y[keep], measured[keep], counts)


def rotate_image(cells: Hits, angle_degrees: float, detector: DetectorConfig) -> Hits:
    """Post-detector rotation: each cell's energy moved with its centre and binned again into
    the same cells (no new smearing or threshold; cells rotated off the grid are lost)."""
    return bin_cells(rotate(cells, angle_degrees), detector)[0]


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & _MASK64


def cell_noise(seed: int, event_numbers: Ints, cells: Ints) -> Floats:
    """A standard normal for every (seed, event number, cell index): a pure function of them."""
    base = _splitmix64(np.full(len(cells), seed, dtype=np.uint64))
    keyed = _splitmix64(base ^ event_numbers.astype(np.uint64))
    keyed = _splitmix64(keyed ^ cells.astype(np.uint64))
    first = _splitmix64(keyed ^ np.uint64(1))
    second = _splitmix64(keyed ^ np.uint64(2))
    scale = 2.0**-53
    u1 = 1.0 - (first >> np.uint64(11)).astype(np.float64) * scale  # in (0, 1]
    u2 = (second >> np.uint64(11)).astype(np.float64) * scale
    result: Floats = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return result


@dataclass(frozen=True)
class Showers:
    """Generated events before the detector."""

    particles: Hits
    label: npt.NDArray[np.int32]
    event: Ints


def generate(n_events: int, *, seed: int, first_event: int = 0) -> Showers:
    """``n_events`` pre-detector events (half signal on average), numbered from ``first_event``."""
    if n_events <= 0:
        raise ConfigError(f"the number of events must be a positive integer, got {n_events}")
    blocks = [
        _generate_block(min(BLOCK_EVENTS, n_events - start), seed, k)
        for k, start in enumerate(range(0, n_events, BLOCK_EVENTS))
    ]
    particles = Hits.concatenate([b.particles for b in blocks])
    label = np.concatenate([b.label for b in blocks])
    event = np.arange(first_event, first_event + n_events, dtype=np.int64)
    return Showers(particles, label, event)


def _generate_block(n: int, seed: int, block: int) -> Showers:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))
    label = (rng.random(n) < 0.5).astype(np.int32)
    counts = MIN_PARTICLES + rng.poisson(EXTRA_PARTICLES, n).astype(np.int64)
    radius = CENTRE_JITTER * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    centre_x, centre_y = radius * np.cos(phi), radius * np.sin(phi)
    orientation = rng.uniform(0, 2 * np.pi, n)
    event = np.repeat(np.arange(n), counts)
    total = len(event)
    energy = rng.exponential(MEAN_ENERGY, total)
    side = np.where(rng.random(total) < 0.5, 0.5, -0.5) * OPENING
    signal = label[event] == 1
    width = np.where(signal, PRONG_WIDTH, BROAD_WIDTH)
    axis_x = np.where(signal, side * np.cos(orientation[event]), 0.0)
    axis_y = np.where(signal, side * np.sin(orientation[event]), 0.0)
    x = centre_x[event] + axis_x + width * rng.normal(size=total)
    y = centre_y[event] + axis_y + width * rng.normal(size=total)
    # float32 values, as the file stores them, so resimulating from a file is exact
    x, y, energy = (v.astype(np.float32).astype(np.float64) for v in (x, y, energy))
    keep = np.hypot(x, y) <= RADIUS - 1e-6
    kept = np.bincount(event[keep], minlength=n).astype(np.int64)
    return Showers(Hits(x[keep], y[keep], energy[keep], kept), label, np.arange(n))


def generator_settings(seed: int) -> dict[str, float | int]:
    return {
        "seed": seed,
        "min_particles": MIN_PARTICLES,
        "extra_particles": EXTRA_PARTICLES,
        "mean_energy": MEAN_ENERGY,
        "centre_jitter": CENTRE_JITTER,
        "opening": OPENING,
        "prong_width": PRONG_WIDTH,
        "broad_width": BROAD_WIDTH,
        "radius": RADIUS,
    }


def write_calo_rotation(
    out_dir: Path,
    n_events: int,
    *,
    seed: int,
    detector: DetectorConfig,
    name: str = "rect",
    events_per_file: int = 100_000,
) -> list[Path]:
    """Generate, detect and write ``calo_rotation_<name>_XXX.root`` files into ``out_dir``."""
    if events_per_file <= 0:
        raise ConfigError(f"events_per_file must be a positive integer, got {events_per_file}")
    showers = generate(n_events, seed=seed)
    cells = detect(showers.particles, showers.event, detector)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, start in enumerate(range(0, n_events, events_per_file)):
        events = np.arange(start, min(start + events_per_file, n_events), dtype=np.int64)
        path = out_dir / FILE_PATTERN.format(geometry=name, index=index)
        file_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"bsym-calo-rotation/{seed}/{path.name}")
        _write_file(
            path,
            particles=showers.particles.take(events),
            cells=cells.take(events),
            label=showers.label[events],
            event=showers.event[events],
            detector=detector,
            generator=generator_settings(seed),
            file_uuid=file_uuid,
        )
        written.append(path)
    return written


def _write_file(
    path: Path,
    *,
    particles: Hits,
    cells: Hits,
    label: npt.NDArray[np.int32],
    event: Ints,
    detector: DetectorConfig,
    generator: dict[str, float | int],
    file_uuid: uuid.UUID,
) -> None:
    particle_columns = particles.jagged("Particle")
    cell_columns = cells.jagged("Cell")
    branches: dict[str, Any] = {
        "event": event.astype(np.int64),
        "label": label.astype(np.int32),
        "Particle": ak.zip({k.removeprefix("Particle_"): v for k, v in particle_columns.items()}),
        "Cell": ak.zip({k.removeprefix("Cell_"): v for k, v in cell_columns.items()}),
    }
    strings = {DETECTOR_KEY: detector.to_json(), GENERATOR_KEY: json.dumps(generator)}
    write_branches(path, TREE, branches, file_uuid=file_uuid, strings=strings)


def read_detector(path: Path) -> DetectorConfig:
    """The detector config a calo-rotation file was simulated with."""
    import uproot

    try:
        with uproot.open(path) as file:
            keys = {key.split(";")[0] for key in file.keys(recursive=True)}
            if DETECTOR_KEY not in keys:
                raise InputFileError(
                    f"{path} has no '{DETECTOR_KEY}' record: it was not written by "
                    "'bsym simulate calo-rotation', so it cannot be resimulated"
                )
            text = str(file[DETECTOR_KEY])
    except InputFileError:
        raise
    except Exception as error:
        raise InputFileError(f"{path}: not a readable ROOT file ({error})") from error
    return DetectorConfig.from_json(text)
