"""The studies' harness: settings, the sample cache, run statistics, working points, tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bsym.errors import ConfigError
from bsym.training.metrics import rejection_at, signal_efficiency_at
from bsym.training.studies.augmentation import StudySettings
from bsym.training.studies.harness import MANIFEST, bootstrap, cached_sample, summarise
from bsym.training.tables import Column, Table, Value, best_of, to_rich


def test_settings_are_checked_and_overridden_as_config_errors() -> None:
    settings = StudySettings()
    assert settings.with_overrides(bootstraps=2, seed=None).bootstraps == 2
    assert settings.with_overrides(bootstraps=2).seed == settings.seed
    with pytest.raises(ConfigError, match="bootstraps"):
        settings.with_overrides(bootstraps=0)
    with pytest.raises(ConfigError, match="exceeds the pool"):
        settings.with_overrides(sizes=(480, 50_000))
    with pytest.raises(ConfigError, match="epochs"):
        settings.with_overrides(epochs=3)  # the field is max_epochs
    with pytest.raises(ConfigError, match="geometry"):
        StudySettings(geometry="hexagonal")
    assert StudySettings(geometry="uniform").model_dump(mode="json")["geometry"] == "uniform"


def test_cached_sample_reuses_files_of_the_same_key(tmp_path: Path) -> None:
    writes: list[Path] = []

    def write(out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sample_{len(writes)}.txt"
        path.write_text("events")
        writes.append(path)
        return [path]

    first = cached_sample(tmp_path / "s", {"seed": 1, "geometry": "rect"}, write)
    again = cached_sample(tmp_path / "s", {"seed": 1, "geometry": "rect"}, write)
    assert first == again == [tmp_path / "s" / "sample_0.txt"] and len(writes) == 1
    other = cached_sample(tmp_path / "s", {"seed": 2, "geometry": "rect"}, write)
    assert other == [tmp_path / "s" / "sample_1.txt"] and len(writes) == 2
    recorded = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert recorded == {"sample": {"seed": 2, "geometry": "rect"}, "files": ["sample_1.txt"]}
    assert [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".")] == []


@dataclass
class Run:
    network: str
    size: int
    auc: float


def test_summarise_nests_mean_and_spread_in_the_given_order() -> None:
    runs = [Run("pfn", 10, 0.6), Run("pfn", 10, 0.8), Run("fcn", 20, 0.7)]
    table = summarise(runs, "auc", ("network", "size"), (("fcn", "pfn", "gnn"), (10, 20)))
    assert list(table) == ["fcn", "pfn", "gnn"]
    assert table["fcn"] == {20: (0.7, 0.0)} and table["gnn"] == {}
    mean, std = table["pfn"][10]
    assert mean == pytest.approx(0.7) and std == pytest.approx(math.sqrt(0.02))


def test_bootstrap_resamples_rows_with_replacement() -> None:
    draws = bootstrap(5, lambda rows: rows, n_bootstrap=3, rng=np.random.default_rng(0))
    assert len(draws) == 3 and all(len(d) == 5 and d.min() >= 0 and d.max() < 5 for d in draws)
    expected = np.random.default_rng(0).integers(0, 5, 5)
    assert np.array_equal(draws[0], expected)


def test_working_points_take_the_best_cut_on_flat_stretches() -> None:
    labels = [1, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # ε_B = 1/3 is reached after the third event and held while the fourth (signal) passes
    assert signal_efficiency_at(labels, scores, 1 / 3) == pytest.approx(1.0)
    assert signal_efficiency_at(labels, scores, 1 / 6) == pytest.approx(2 / 3)
    # ε_S = 2/3 is reached before any background passes
    assert rejection_at(labels, scores, 2 / 3) == math.inf
    assert rejection_at(labels, scores, 1.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="background efficiency"):
        signal_efficiency_at(labels, scores, 1.5)


def test_tables_are_data_rendered_with_rich() -> None:
    assert str(Value(0.123456, 0.0012)) == "0.1235 ± 0.0012"
    assert str(Value(-0.5, 0.25, "+.2f")) == "-0.50 ± 0.25"
    assert str(Value(math.inf, 1.0, ".1f")) == "∞" and str(Value(2.0, math.nan, ".1f")) == "2.0"
    cells = best_of([Value(0.7), None, Value(0.9)])
    assert [c.best for c in cells if c is not None] == [False, True]
    table = Table("t", [Column("size", "right"), Column("a"), Column("b"), Column("c")])
    table.add_row("8k", *cells)
    with pytest.raises(ValueError, match="2 cells"):
        table.add_row("8k", None)
    rendered = to_rich(table)
    assert [c.header for c in rendered.columns] == table.headers == ["size", "a", "b", "c"]
    assert list(rendered.columns[2].cells) == ["–"]
    assert list(rendered.columns[3].cells) == ["[bold]0.9000[/]"]
