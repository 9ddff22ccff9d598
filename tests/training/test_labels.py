"""Labels with a negative class, the training size, the split report and evaluation titles."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
import uproot
from typer.testing import CliRunner

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.features import FeatureSpec, Label
from bsym.rootio import TreeSource
from bsym.training.checkpoint import load_checkpoint
from bsym.training.cli import evaluate_command, train_command
from bsym.training.config import TrainConfig, load_config, save_config
from bsym.training.dataset import read_rows, split_rows
from bsym.training.evaluate import HELD_OUT_TITLE, evaluate
from bsym.training.train import train

FLAVOURS = np.array([0, 1, 3, 4, 5, 15, 1, 1, 5, 4, 0, 15, 3, 1, 5], dtype=np.int32)
"""genPartFlav of the hand-written file: 4 positive (1), 5 negative (4, 5), 6 of neither."""


@pytest.fixture(scope="module")
def flavours_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flavours") / "flavours.root"
    with uproot.recreate(path) as file:
        file["Muons"] = {
            "Muon_pt": np.arange(1, FLAVOURS.size + 1, dtype=np.float32),
            "Muon_genPartFlav": FLAVOURS,
        }
    return path


def reliso_config(isolation_sample: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        shipped_config("isolation_reliso"),
        [
            f"data.train=['{isolation_sample}/isolation_muons_*.root']",
            f"output_dir={out}",
            "optimizer.epochs=1",
            "optimizer.batch_size=64",
            "model.hidden_sizes=[8]",
            *extra,
        ],
    )


def simulated_flavours(isolation_sample: Path) -> np.ndarray:
    values = [
        uproot.open(f"{path}:Muons")["Muon_genPartFlav"].array(library="np")
        for path in sorted(isolation_sample.glob("isolation_muons_*.root"))
    ]
    return np.concatenate(values)


def test_negative_values_leave_out_rows_of_neither_class(
    flavours_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = FeatureSpec.model_validate(
        {
            "globals": [{"branch": "Muon_pt"}],
            "label": {"branch": "Muon_genPartFlav", "positive": [1], "negative": [4, 5]},
        }
    )
    with caplog.at_level(logging.INFO, logger="bsym"):
        batch, _ = read_rows([TreeSource(flavours_file, "Muons")], spec)
    kept = np.isin(FLAVOURS, [1, 4, 5])
    assert batch.n_rows == 9
    assert batch.globals is not None and batch.label is not None
    np.testing.assert_array_equal(batch.globals[:, 0], np.flatnonzero(kept) + 1)
    np.testing.assert_array_equal(batch.label, (FLAVOURS[kept] == 1).astype(np.int64))
    assert "left out 6 of 15 rows of neither class (Muon_genPartFlav 0: 2, 3: 2, 15: 2)" in (
        caplog.text
    )


def test_without_negative_every_other_value_is_background(flavours_file: Path) -> None:
    spec = FeatureSpec.model_validate({"globals": [{"branch": "Muon_pt"}]})
    batch, _ = read_rows([TreeSource(flavours_file, "Muons")], spec)
    assert batch.n_rows == FLAVOURS.size
    assert batch.label is not None
    np.testing.assert_array_equal(batch.label, (FLAVOURS == 1).astype(np.int64))
    # specs without `negative` are written exactly as before it existed
    assert Label().model_dump() == {"branch": "Muon_genPartFlav", "positive": [1]}
    assert "negative" not in spec.to_json()
    assert FeatureSpec.from_json(spec.to_json()) == spec


def test_overlapping_classes_are_a_config_error(isolation_sample: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"label values \[1\] .* both positive and negative"):
        reliso_config(isolation_sample, tmp_path, "features.label.negative=[1, 5]")


def test_training_leaves_out_neither_rows_and_the_test_split_is_reread(
    isolation_sample: Path, tmp_path: Path
) -> None:
    flavours = simulated_flavours(isolation_sample)
    assert set(np.unique(flavours).tolist()) == {1, 4, 5}
    config = reliso_config(isolation_sample, tmp_path / "run", "features.label.negative=[5]")
    result = train(config, progress=False)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.split.n_rows == int(np.isin(flavours, [1, 5]).sum())
    test = loaded.held_out_test()
    assert test.n_rows == len(loaded.split.test)
    assert test.truth is not None
    assert set(np.unique(test.truth).tolist()) == {1, 5}
    summary = loaded.split.summary
    assert summary["test"]["rows_positive"] == int((test.truth == 1).sum())
    evaluated = evaluate([result.checkpoint], tmp_path / "eval", n_bootstrap=3)
    assert evaluated.title == HELD_OUT_TITLE
    assert evaluated.models[0].n_test == test.n_rows


def test_cwola_selected_truth_leaves_out_neither_rows(
    isolation_sample: Path, tmp_path: Path
) -> None:
    flavours = simulated_flavours(isolation_sample)
    config = reliso_config(
        isolation_sample,
        tmp_path / "run",
        "features.label.negative=[5]",
        "supervision={type: truth, select: true}",
    )
    loaded = load_checkpoint(train(config, progress=False).checkpoint)
    assert 0 < loaded.split.n_rows < int(np.isin(flavours, [1, 5]).sum())
    test = loaded.held_out_test()
    assert test.truth is not None and set(np.unique(test.truth).tolist()) <= {1, 5}


def test_train_rows_sets_the_training_size_and_keeps_the_test_rows() -> None:
    common = {"seed": 3, "validation_fraction": 0.2, "test_fraction": 0.3}
    every = split_rows(1000, **common)
    some = split_rows(1000, train_rows=120, **common)
    np.testing.assert_array_equal(every.test, some.test)
    np.testing.assert_array_equal(every.validation, some.validation)
    assert len(every.train) == 500 and len(some.train) == 120
    assert set(some.train.tolist()) <= set(every.train.tolist())
    assert not set(some.train.tolist()) & set(some.test.tolist())
    with pytest.raises(ConfigError, match=r"data.train_rows=501 .* the 500 left of 1000"):
        split_rows(1000, train_rows=501, **common)


def test_train_rows_and_split_report_through_the_command(
    isolation_sample: Path, tmp_path: Path
) -> None:
    config = reliso_config(isolation_sample, tmp_path / "run", "data.train_rows=150")
    config_file = tmp_path / "config.yaml"
    save_config(config, config_file)
    app = typer.Typer()
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(config_file)], terminal_width=200)
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(loaded.split.train) == 150
    summary = loaded.split.summary
    n_rows = loaded.split.n_rows
    assert sum(summary[name]["rows"] for name in ("train", "validation", "test")) < n_rows
    train_counts = summary["train"]
    assert train_counts["rows"] == 150
    assert train_counts["rows_positive"] + train_counts["rows_negative"] == 150
    assert train_counts["weight"] == 150.0  # no weight branch: weight 1 a row
    positive = int(train_counts["rows_positive"])
    assert f"train: 150 rows ({positive} positive, {150 - positive} negative)" in result.output
    for name in ("validation", "test"):
        assert f"{name}: {summary[name]['rows']:.0f} rows" in result.output
    too_many = CliRunner().invoke(
        app, [str(config_file), "--force", "--set", "data.train_rows=100000"]
    )
    assert too_many.exit_code == 1
    assert "data.train_rows=100000" in too_many.output


def test_evaluate_on_files_is_titled_by_them(isolation_sample: Path, tmp_path: Path) -> None:
    checkpoint = train(reliso_config(isolation_sample, tmp_path / "run"), progress=False).checkpoint
    events = isolation_sample / "isolation_events_000.root"
    flavours = uproot.open(f"{events}:Events")["Muon_genPartFlav"].array(library="ak")
    n_muons = int(sum(len(row) for row in flavours))
    n_positive = int(sum(int((np.asarray(row) == 1).sum()) for row in flavours))
    app = typer.Typer()
    app.command()(evaluate_command)
    args = [f"--model={checkpoint}", f"--out={tmp_path / 'eval'}", "--bootstrap=3"]
    result = CliRunner().invoke(app, [*args, f"--data={events}:Events"], terminal_width=200)
    assert result.exit_code == 0, result.output
    title = f"Performance on isolation_events_000.root ({n_muons} muons, {n_positive} positive)"
    assert title in result.output
    assert HELD_OUT_TITLE not in result.output
    held_out = CliRunner().invoke(app, args, terminal_width=200)
    assert held_out.exit_code == 0, held_out.output
    assert HELD_OUT_TITLE in held_out.output


def test_evaluate_on_nanoaod_prompt_against_tau(
    nanoaod_dir: Path, isolation_sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nano = tmp_path / "nano_dy.root"
    shutil.copy(nanoaod_dir / "nano_dy.root", nano)
    config = reliso_config(isolation_sample, tmp_path / "run", "features.label.negative=[4, 5, 15]")
    checkpoint = train(config, progress=False).checkpoint
    with caplog.at_level(logging.INFO, logger="bsym"):
        result = evaluate([checkpoint], tmp_path / "eval", data=[f"{nano}:Events"], n_bootstrap=3)
    # nano_dy.root: 18 muons, flavours 1 (11), 15 (5) and 0 (2)
    assert result.title == "Performance on nano_dy.root (16 muons, 11 positive)"
    assert "left out 2 of 18 rows of neither class (Muon_genPartFlav 0: 2)" in caplog.text
