"""The decorrelation study: its sculpting metric, and (slow) the whole study at a tiny scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bsym.cli import app
from bsym.training.studies.decorrelation import (
    QUICK,
    jensen_shannon,
    planned_runs,
    rejection_and_inverse_jsd,
)

WINDOW = (70.0, 110.0)


def test_jensen_shannon_is_zero_for_one_distribution_and_one_for_disjoint_ones() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(70, 110, 4000)
    assert jensen_shannon(a, a.copy(), WINDOW, 40) == 0.0
    assert jensen_shannon(a[a < 90], a[a >= 90], WINDOW, 40) == pytest.approx(1.0)
    assert 0 < jensen_shannon(a[:2000], a[2000:], WINDOW, 40) < 0.02


def test_a_mass_cut_sculpts_and_an_independent_score_does_not() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    truth = rng.integers(0, 2, n).astype(np.int64)
    mass = rng.uniform(70, 110, n)
    independent = rng.normal(truth.astype(np.float64), 1.0)
    sculpting = independent + 0.05 * (mass - 90)
    r_independent, inverse_independent = rejection_and_inverse_jsd(
        truth, independent, mass, window=WINDOW, bins=40
    )
    _, inverse_sculpting = rejection_and_inverse_jsd(truth, sculpting, mass, window=WINDOW, bins=40)
    # a shift of one standard deviation between the classes: ε_B ≈ 16% at ε_S = 50%
    assert r_independent == pytest.approx(1 / 0.159, rel=0.05)
    assert inverse_independent > 10 * inverse_sculpting


@pytest.mark.slow
def test_the_study_runs_end_to_end_at_a_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = CliRunner().invoke(
        app,
        ["study", "decorrelation", "--quick", "--events", "1500", "--test-events", "3000",
         "--epochs", "1", "--bootstraps", "2", "--out", str(out), "--cache",
         str(tmp_path / "cache")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads((out / "decorrelation_study.json").read_text())
    assert len(document["runs"]) == len(planned_runs(QUICK))
    assert {run["method"] for run in document["runs"]} == {"disco", "adversary"}
    assert all(0 < run["auc"]["value"] < 1 for run in document["runs"])
    assert (out / "rejection_vs_jsd.png").is_file()
    assert "sW − true AUC" in result.output
