"""The calo-rotation simulator: showers, the configurable detector, files, resimulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
import uproot
from conftest import CALO_EVENTS
from typer.testing import CliRunner

from bsym.errors import ConfigError, InputFileError
from bsym.simulate.calo_rotation import (
    DETECTOR_KEY,
    DetectorConfig,
    Hits,
    bin_cells,
    cell_noise,
    detect,
    generate,
    linspace_edges,
    preset_detector,
    read_detector,
    rotate,
    rotate_image,
)
from bsym.simulate.calo_rotation_cli import calo_rotation_command
from bsym.training.augmentation import read_calo_events


def same_cells(a: Hits, b: Hits) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("x", "y", "energy", "counts"))


@pytest.mark.parametrize("geometry", ["rect", "uniform"])
def test_rotation_by_0_and_360_degrees_resimulates_identical_cells(geometry: str) -> None:
    showers = generate(400, seed=2)
    detector = preset_detector(geometry)
    cells = detect(showers.particles, showers.event, detector)
    for angle in (0.0, 360.0, -360.0, 720.0):
        again = detect(rotate(showers.particles, angle), showers.event, detector)
        assert same_cells(again, cells), angle
    turned = detect(rotate(showers.particles, 45.0), showers.event, detector)
    assert not same_cells(turned, cells)


def test_four_quarter_turns_are_exact() -> None:
    particles = generate(200, seed=3).particles
    turned = particles
    for _ in range(4):
        turned = rotate(turned, 90.0)
    assert np.array_equal(turned.x, particles.x) and np.array_equal(turned.y, particles.y)


def test_resimulating_a_file_at_0_degrees_gives_its_cells(calo_rotation_sample: Path) -> None:
    events = read_calo_events([calo_rotation_sample])
    again = detect(rotate(events.particles, 0.0), events.event, events.detector)
    assert np.array_equal(again.counts, events.cells.counts)
    for field in ("x", "y", "energy"):
        assert np.array_equal(
            getattr(again, field).astype(np.float32), getattr(events.cells, field)
        )


def test_file_layout_and_detector_record(calo_rotation_sample: Path) -> None:
    with uproot.open(calo_rotation_sample) as file:
        tree = file["Events"]
        assert tree.num_entries == CALO_EVENTS
        for branch in ("event", "label", "Particle_x", "Particle_E", "Cell_x", "Cell_y", "Cell_E"):
            assert branch in tree
        labels = tree["label"].array(library="np")
    assert set(np.unique(labels)) == {0, 1}
    assert read_detector(calo_rotation_sample) == preset_detector("rect")


def test_file_without_detector_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.root"
    with uproot.recreate(path) as file:
        file["Events"] = {"label": np.zeros(3, dtype=np.int32)}
    with pytest.raises(InputFileError, match=DETECTOR_KEY):
        read_detector(path)


def test_rect_preset_is_32_by_4() -> None:
    rect = preset_detector("rect")
    assert rect.x_edges == pytest.approx(np.linspace(-1, 1, 33).tolist(), abs=0)
    assert rect.y_edges == pytest.approx(np.linspace(-1, 1, 5).tolist(), abs=0)
    assert rect.n_cells == 128 and preset_detector("uniform").n_cells == 1024
    with pytest.raises(ConfigError):
        preset_detector("hexagonal")


def test_cells_sit_at_centres_of_non_uniform_edges_and_keep_energy() -> None:
    detector = DetectorConfig(
        x_edges=[-1.0, -0.2, 0.1, 1.0],
        y_edges=[-1.0, 0.5, 1.0],
        stochastic=0.0,
        constant=0.0,
        threshold=0.0,
    )
    particles = Hits(
        x=np.array([-0.5, -0.4, 0.0, 0.9, 1.5]),
        y=np.array([0.0, 0.2, 0.7, 1.0, 0.0]),
        energy=np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        counts=np.array([5], dtype=np.int64),
    )
    cells = detect(particles, np.array([7], dtype=np.int64), detector)
    centres = np.stack([cells.x, cells.y, cells.energy], axis=1)
    # ordered by cell index; (−0.5, 0) and (−0.4, 0.2) share a cell; (1.5, 0) is lost
    expected = [[-0.6, -0.25, 3.0], [-0.05, 0.75, 3.0], [0.55, 0.75, 4.0]]
    assert np.allclose(centres, expected) and cells.counts.tolist() == [3]


def test_threshold_and_resolution() -> None:
    showers = generate(2000, seed=4)
    detector = preset_detector("uniform", threshold=1.0)
    cells = detect(showers.particles, showers.event, detector)
    assert cells.energy.min() > 1.0
    true_cells, _ = bin_cells(showers.particles, detector)
    assert cells.energy.size < true_cells.energy.size
    noise = cell_noise(3, np.arange(200_000), np.full(200_000, 17))
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    assert np.array_equal(noise, cell_noise(3, np.arange(200_000), np.full(200_000, 17)))
    assert not np.array_equal(noise, cell_noise(4, np.arange(200_000), np.full(200_000, 17)))


def test_bad_edges_are_refused() -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        DetectorConfig(x_edges=[0.0, 0.0, 1.0], y_edges=linspace_edges(-1, 1, 4))


def test_classes_differ_only_in_shape() -> None:
    showers = generate(40_000, seed=6)
    particles, label = showers.particles, showers.label
    event = particles.event_index
    signal = label[event] == 1
    assert 0.48 < label.mean() < 0.52
    counts = particles.counts
    assert abs(counts[label == 1].mean() - counts[label == 0].mean()) < 0.1
    # same mean squared distance from the shower centre (energy-weighted centroid)
    weights = np.bincount(event, particles.energy)
    centre_x = np.bincount(event, particles.energy * particles.x) / weights
    centre_y = np.bincount(event, particles.energy * particles.y) / weights
    r2 = (particles.x - centre_x[event]) ** 2 + (particles.y - centre_y[event]) ** 2
    assert abs(r2[signal].mean() / r2[~signal].mean() - 1) < 0.1
    assert np.hypot(particles.x, particles.y).max() <= 1.0


def test_post_detector_rotation_by_quarter_turns_on_square_cells_permutes_cells() -> None:
    showers = generate(300, seed=7)
    detector = preset_detector("uniform")
    cells = detect(showers.particles, showers.event, detector)
    turned = rotate_image(cells, 90.0, detector)
    assert np.array_equal(turned.counts, cells.counts)
    assert np.allclose(np.sort(turned.energy), np.sort(cells.energy))
    assert same_cells(rotate_image(cells, 360.0, detector), bin_cells(cells, detector)[0])


def test_simulate_command(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(calo_rotation_command)
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["-n", "50", "--geometry", "uniform", "--y-edges", "-1,-0.2,0.4,1", "-o", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("calo_rotation_uniform_custom_*.root")
    assert read_detector(path).y_edges == [-1.0, -0.2, 0.4, 1.0]
    bad = runner.invoke(app, ["-n", "5", "--x-edges", "1,0", "-o", str(tmp_path)])
    assert bad.exit_code == 1
    assert "increase strictly" in bad.output
