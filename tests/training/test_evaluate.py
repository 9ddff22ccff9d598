"""bsym evaluate: AUC and rejections with bootstrap errors, metrics.json, the ROC plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from bsym.training.cli import evaluate_command
from bsym.training.evaluate import evaluate
from bsym.training.metrics import rejection_at

FIELDS = {
    "name",
    "type",
    "n_test",
    "auc",
    "auc_err",
    "rej50",
    "rej50_err",
    "rej90",
    "rej90_err",
}


@pytest.fixture(scope="module")
def checkpoints(trained_models: dict[str, Path]) -> list[Path]:
    """A one-epoch network on the cones and the single-cone cut."""
    return [trained_models["dnn"], trained_models["cone_cut"]]


def test_rejection_at_known_points() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    scores = [4.0, 3.0, 2.0, 1.0, 3.5, 2.5, 1.5, 0.5]
    # score >= 3 keeps half the signal and one background in four
    assert rejection_at(labels, scores, 0.5) == pytest.approx(4.0)
    assert rejection_at(labels, scores, 1.0) == pytest.approx(4 / 3)
    assert rejection_at([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], 0.5) == math.inf

    rng = np.random.default_rng(1)
    random_labels = rng.integers(0, 2, 200_000)
    random_scores = rng.random(200_000)
    assert rejection_at(random_labels, random_scores, 0.5) == pytest.approx(2.0, rel=0.02)
    assert rejection_at(random_labels, random_scores, 0.9) == pytest.approx(1 / 0.9, rel=0.02)


def test_evaluate_writes_metrics_and_plot(
    checkpoints: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = evaluate(checkpoints, tmp_path, n_bootstrap=20, seed=3)
    assert capsys.readouterr().out == ""  # the library returns the table, the CLI prints it

    document = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert document["n_bootstrap"] == 20
    models = document["models"]
    assert [m["name"] for m in models] == ["isolation_cones", "isolation_cone_cut"]
    assert [m["type"] for m in models] == ["dnn", "cone_cut"]
    for model in models:
        assert set(model) >= FIELDS
        assert model["n_test"] > 100
        assert 0.5 < model["auc"] <= 1.0
        assert model["rej50"] >= model["rej90"] >= 1.0
        for error in ("auc_err", "rej50_err", "rej90_err"):
            assert model[error] > 0, error
    assert result.ranked()[0].auc >= result.ranked()[1].auc

    png = (tmp_path / "roc.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    again = evaluate(checkpoints, tmp_path / "again", n_bootstrap=20, seed=3)
    assert again.models == result.models


def test_evaluate_on_given_files(
    checkpoints: list[Path], isolation_sample: Path, tmp_path: Path
) -> None:
    events = f"{isolation_sample}/isolation_events_000.root:Events"
    result = evaluate(checkpoints[1:], tmp_path, data=[events], n_bootstrap=5)
    (model,) = result.models
    assert "isolation_events_000.root:Events" in model.data
    # every muon of the file, not the 20% test split
    assert model.n_test > 2000


def test_cli_prints_table_sorted_by_auc(checkpoints: list[Path], tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(evaluate_command)
    args = [*(f"--model={path}" for path in checkpoints), f"--out={tmp_path}", "--bootstrap=5"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    best = max(document["models"], key=lambda m: m["auc"])["name"]
    worst = min(document["models"], key=lambda m: m["auc"])["name"]
    assert result.output.index(best) < result.output.index(worst)
    assert "AUC" in result.output and "roc.png" in result.output
