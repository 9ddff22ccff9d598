"""Rotation augmentation: copies and their grouping, the invariance loss, bsym train with it,
ONNX export and scoring of an augmented model, and the study."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import uproot
from conftest import CALO_EVENTS
from torch import Tensor, nn
from typer.testing import CliRunner

from bsym.configs import shipped_config
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export.onnx_export import DEFAULT_TOLERANCE, export_onnx
from bsym.rootio import TreeSource
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.simulate.calo_rotation import (
    bin_cells,
    preset_detector,
    write_calo_rotation,
)
from bsym.training.augmentation import (
    DEFAULT_ANGLES,
    CaloEvents,
    augment_training_rows,
    augmented_rows,
    calo_feature_spec,
    cell_features,
    check_reproduces_cells,
    read_calo_events,
)
from bsym.training.checkpoint import load_checkpoint, predict
from bsym.training.config import load_config
from bsym.training.dataset import Split, read_rows
from bsym.training.fit import batch_rows, shuffled_rows
from bsym.training.losses import InvarianceTerm, LossBatch, classification_loss, invariance_penalty
from bsym.training.models import PFN
from bsym.training.studies.augmentation import (
    COLUMNS,
    QUICK,
    StudySettings,
    network_feature_spec,
    network_schedule,
    run_study,
    write_outputs,
)
from bsym.training.studies.cli import study_app
from bsym.training.studies.plots import augmentation_plots
from bsym.training.studies.reports import augmentation_table
from bsym.training.train import train


@pytest.fixture(scope="module")
def rect_events(calo_rotation_sample: Path) -> CaloEvents:
    return read_calo_events([calo_rotation_sample])


@pytest.mark.parametrize("mode", ["resimulation", "post_detector"])
def test_copies_are_event_major_and_the_first_is_the_original(
    rect_events: CaloEvents, mode: str
) -> None:
    events = rect_events.take(np.arange(40))
    spec = calo_feature_spec(16)
    rows, copies = augmented_rows(events, mode, DEFAULT_ANGLES, spec)
    original = cell_features(events.cells, events.label, spec)
    assert copies == 8 and rows.n_rows == 8 * 40
    assert rows.label is not None and original.label is not None
    assert np.array_equal(rows.label, np.repeat(original.label, 8))
    assert rows.constituents is not None and original.constituents is not None
    # 0° is the first angle: resimulation reproduces the recorded cells (to their float32
    # storage), post-detector rotation by 0° rebins each cell into itself
    assert np.allclose(rows.constituents[::8], original.constituents, rtol=1e-6, atol=0)
    assert not np.allclose(rows.constituents[1::8], original.constituents)
    none_rows, one = augmented_rows(events, "none", DEFAULT_ANGLES, spec)
    assert one == 1 and np.array_equal(none_rows.constituents, original.constituents)


def test_batches_hold_whole_events_with_all_their_copies() -> None:
    order = shuffled_rows(np.random.default_rng(0), 80, 8)
    size = batch_rows(24, 8)
    batches = [order[start : start + size] for start in range(0, 80, size)]
    assert [len(b) for b in batches] == [24, 24, 24, 8]
    every = np.concatenate(batches)
    assert np.array_equal(np.sort(every), np.arange(80))
    for batch in batches:
        events = batch.reshape(-1, 8)
        assert np.all(events == events[:, :1] + np.arange(8))
        assert np.all(events[:, 0] % 8 == 0)


def test_training_batches_take_whole_events() -> None:
    assert [batch_rows(b, 8) for b in (128, 100, 4)] == [128, 96, 8]
    assert batch_rows(100, 1) == 100


def test_augmentation_refuses_a_spec_reading_more_than_the_cells() -> None:
    config = load_config(
        shipped_config("calo_rotation_pfn"), ["features.globals=[{branch: event}]"]
    )
    empty = np.zeros(0, dtype=np.int64)
    split = Split(empty, empty, empty, seed=0, n_rows=0)
    with pytest.raises(ConfigError, match="also reads event"):
        augment_training_rows(config, split)


def test_shuffle_keeps_copies_together_and_is_the_plain_permutation_for_one_copy() -> None:
    plain = np.random.default_rng([3, 1, 2]).permutation(50)
    assert np.array_equal(shuffled_rows(np.random.default_rng([3, 1, 2]), 50, 1), plain)
    grouped = shuffled_rows(np.random.default_rng(5), 40, 8).reshape(-1, 8)
    assert np.all(grouped == grouped[:, :1] + np.arange(8))
    with pytest.raises(SpecMismatchError):
        shuffled_rows(np.random.default_rng(5), 41, 8)


def test_invariance_penalty_is_the_mean_variance_of_scores() -> None:
    same = torch.tensor([0.3] * 8 + [-1.2] * 8)
    assert float(invariance_penalty(same, 8)) == 0.0
    logits = torch.tensor([[0.0], [2.0], [1.0], [1.0]])
    scores = torch.sigmoid(logits[:, 0]).reshape(2, 2)
    expected = float(((scores - scores.mean(1, keepdim=True)) ** 2).mean())
    assert float(invariance_penalty(logits, 2)) == pytest.approx(expected)
    label = torch.tensor([1, 1, 0, 0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], label.float())
    assert float(classification_loss(logits, label, None)) == pytest.approx(float(bce))
    batch = LossBatch(inputs=(), label=label, weight=None, copies=2)
    assert float(InvarianceTerm(0.0)(logits, batch)) == 0.0
    assert float(InvarianceTerm(3.0)(logits, batch)) == pytest.approx(3.0 * expected)


class EnergyOnly(nn.Module):
    """A network that ignores where the cells are: a function of their summed energy."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def logits(self, constituents: Tensor, mask: Tensor) -> Tensor:
        real = mask.to(constituents.dtype)
        energy = (constituents[..., 0] * real).sum(dim=1, keepdim=True)
        output: Tensor = self.head(torch.cat([energy, energy.log1p()], dim=1))
        return output


def test_invariance_term_zero_for_an_orientation_blind_network_positive_otherwise(
    tmp_path: Path,
) -> None:
    (path,) = write_calo_rotation(tmp_path, 60, seed=2, detector=preset_detector("uniform"))
    events = read_calo_events([path])
    spec = calo_feature_spec(32)
    # quarter turns of square cells only permute the cells, so the copies hold the same energies
    rows, copies = augmented_rows(events, "post_detector", (0.0, 90.0, 180.0, 270.0), spec)
    assert rows.constituents is not None and rows.mask is not None
    constituents = torch.from_numpy(rows.constituents)
    mask = torch.from_numpy(rows.mask)
    torch.manual_seed(0)
    seeing = PFN(3, 0, [16, 16], [16], use_globals=False)
    seeing.prepare(rows)
    with torch.no_grad():
        blind_penalty = invariance_penalty(EnergyOnly().logits(constituents, mask), copies)
        seeing_penalty = invariance_penalty(seeing.logits(constituents, mask), copies)
    assert float(blind_penalty) < 1e-12
    assert float(seeing_penalty) > 1e-6


def test_resimulation_refuses_another_detector(calo_rotation_sample: Path, tmp_path: Path) -> None:
    events = read_calo_events([calo_rotation_sample]).take(np.arange(50))
    check_reproduces_cells(events)
    other = replace(events, detector=preset_detector("rect", seed=1))
    with pytest.raises(SpecMismatchError, match="recorded detector"):
        check_reproduces_cells(other)
    (second,) = write_calo_rotation(
        tmp_path, 20, seed=3, detector=preset_detector("rect", threshold=0.7), name="other"
    )
    with pytest.raises(SpecMismatchError, match="another detector"):
        read_calo_events([calo_rotation_sample, second])


def test_post_detector_rotation_by_zero_is_identity(rect_events: CaloEvents) -> None:
    again, _ = bin_cells(rect_events.cells, rect_events.detector)
    assert np.array_equal(again.counts, rect_events.cells.counts)
    assert np.array_equal(again.energy, rect_events.cells.energy)


@pytest.mark.parametrize("name", ["calo_rotation_pfn", "calo_rotation_fcn"])
def test_augmented_training_exports_with_parity_and_scores(
    calo_rotation_sample: Path, tmp_path: Path, name: str
) -> None:
    config = load_config(
        shipped_config(name),
        [
            f"data.train=[{calo_rotation_sample}]",
            f"output_dir={tmp_path / 'run'}",
            "optimizer.epochs=2",
        ],
    )
    assert config.augmentation is not None and config.augmentation.mode == "resimulation"
    result = train(config, progress=False)
    assert result.epochs == 2
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.config.augmentation == config.augmentation

    report = export_onnx(result.checkpoint, tmp_path / "model.onnx")
    assert report.parity.worst <= DEFAULT_TOLERANCE

    summary = score_files(
        [str(calo_rotation_sample)],
        OnnxRuntimeBackend(tmp_path / "model.onnx", threads=1),
        tmp_path / "scores",
        progress=False,
    )
    assert len(summary.scored) == 1 and not summary.failed
    (output,) = (tmp_path / "scores").glob("*.root")
    with uproot.open(output) as file:
        tree = file[config.features.tree]
        (branch,) = [b for b in tree.keys() if b.startswith(config.name)]  # noqa: SIM118
        scored = tree[branch].array(library="np")
    rows, _ = read_rows([TreeSource(calo_rotation_sample, "Events")], config.features)
    assert len(scored) == CALO_EVENTS
    assert np.allclose(scored, predict(loaded, rows), atol=DEFAULT_TOLERANCE)


def test_study_pfn_reads_log_energies_through_the_spec_and_trains_longer(
    rect_events: CaloEvents,
) -> None:
    events = rect_events.take(np.arange(30))
    pfn_rows, _ = augmented_rows(
        events, "resimulation", DEFAULT_ANGLES, network_feature_spec("pfn")
    )
    fcn_rows, _ = augmented_rows(
        events, "resimulation", DEFAULT_ANGLES, network_feature_spec("fcn")
    )
    assert pfn_rows.mask is not None and fcn_rows.mask is not None
    assert pfn_rows.constituents is not None and fcn_rows.constituents is not None
    assert np.array_equal(pfn_rows.mask, fcn_rows.mask)
    real = fcn_rows.mask
    raw_energy = fcn_rows.constituents[..., 0][real]
    assert raw_energy.min() > 0.5  # above the detector threshold
    np.testing.assert_allclose(pfn_rows.constituents[..., 0][real], np.log1p(raw_energy), rtol=1e-6)
    assert np.array_equal(pfn_rows.constituents[..., 1:], fcn_rows.constituents[..., 1:])

    settings = StudySettings()
    assert network_schedule("fcn", settings) == settings
    pfn = network_schedule("pfn", settings)
    assert (pfn.max_epochs, pfn.patience, pfn.min_steps) == (36, 15, 4_500)
    with pytest.raises(ConfigError, match="pfn_schedule_factor"):
        StudySettings(pfn_schedule_factor=0.0)


def tiny_settings() -> StudySettings:
    return QUICK.with_overrides(
        sizes=(40, 80),
        bootstraps=1,
        test_events=400,
        val_events=200,
        pool_events=100,
        max_epochs=2,
        min_steps=0,
    )


def test_tiny_study_prints_the_paper_layout_and_writes_outputs(tmp_path: Path) -> None:
    settings = tiny_settings()
    result = run_study(settings, tmp_path / "data", threads=1)
    # the five augmentations for both networks, the three cell networks for the PFN row only
    assert len(result.runs) == 2 * (5 * 2 + 3)
    assert set(result.reference) == {"particles", "cells"}
    paths = write_outputs(result, tmp_path / "out")
    plots = augmentation_plots(result, tmp_path / "out")
    assert {p.name for p in plots} == {"auc_vs_size.png", "signal_efficiency_vs_size.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in [*paths, *plots])
    written = json.loads(paths[0].read_text())
    assert set(written["auc"]["pfn"]) == set(COLUMNS)
    assert all(written["auc"]["pfn"][c] for c in COLUMNS)
    assert not any(written["auc"]["fcn"][c] for c in ("rpcn", "dual", "dual_resim"))
    table = augmentation_table(result, "test_auc", "test AUC")
    assert table.headers == [
        "network",
        "train events",
        "pre-det + inv",
        "post-det + inv",
        "pre-det aug",
        "post-det aug",
        "no aug",
        "rPCN",
        "dual",
        "dual + pre-det",
    ]
    assert len(table.rows) == 4
    # the same data are reused from the cache
    again = run_study(settings.with_overrides(bootstraps=1, sizes=(40,)), tmp_path / "data")
    first = [r for r in result.runs if r.bootstrap == 0 and r.size == 40]
    assert [r.test_auc for r in again.runs] == [r.test_auc for r in first]


def test_study_command_help() -> None:
    result = CliRunner().invoke(study_app, ["augmentation", "--help"])
    assert result.exit_code == 0
    assert "--quick" in result.output and "--geometry" in result.output


@pytest.mark.slow
def test_quick_study_command(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        study_app,
        ["augmentation", "--quick", "-o", str(tmp_path / "out"), "--data", str(tmp_path / "d")],
    )
    assert result.exit_code == 0, result.output
    # rich wraps the headers at the runner's 80 columns
    assert "pre-det" in result.output and "post-det" in result.output
    written = json.loads((tmp_path / "out" / "augmentation.json").read_text())
    assert set(written["auc"]) == {"fcn", "pfn"}
    assert written["settings"]["sizes"] == [480, 2400]
