"""``bsym study flavour``: a small run end to end, the verdict rules, and the full study (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bsym.training.studies.flavour import (
    DIPS,
    DIPS_LINEAR,
    FIGURES,
    PFN,
    ROWS,
    VECTOR,
    Row,
    RunResult,
    StudyResult,
    StudySettings,
    epochs_to_reach,
    run_study,
    verdicts,
    write_outputs,
)
from bsym.training.studies.harness import Figure
from bsym.training.studies.plots import flavour_plots
from bsym.training.studies.reports import flavour_claims_table, flavour_scan_table, flavour_table

SMALL = {"type": "pfn", "phi_sizes": [16, 16], "f_sizes": [16]}


def small_settings(**changes: object) -> StudySettings:
    rows = (
        Row(DIPS, SMALL, "flavour_dips"),
        Row(DIPS_LINEAR, SMALL, "flavour_dips_linear"),
        Row(PFN, {**SMALL, "use_globals": False}, "flavour_pfn12"),
        Row("not a model", {"type": "no_such_type"}, "flavour_dips"),
    )
    values: dict[str, object] = {
        "train_jets": 1500,
        "test_jets": 1200,
        "max_epochs": 2,
        "patience": 2,
        "batch_size": 256,
        "bootstraps": 3,
        "rows": rows,
        "scan": (DIPS,),
        "scan_sizes": (300, 600, 1200),
        **changes,
    }
    return StudySettings(**values)  # type: ignore[arg-type]


def test_small_study_trains_scores_scans_and_writes(tmp_path: Path) -> None:
    notes: list[str] = []
    result = run_study(small_settings(), tmp_path / "cache", tmp_path / "out", on_note=notes.append)
    assert notes == ["skipped 'not a model': this bsym has no model type 'no_such_type'"]
    assert [run.title for run in result.runs] == [DIPS, DIPS_LINEAR, PFN]
    assert result.n_test == 1200 and sum(result.n_test_by_class.values()) == 1200
    for run in result.runs:
        assert set(run.figures) == set(FIGURES)
        light, c = run.figures["light_rej70"], run.figures["c_rej70"]
        assert light.value > c.value > 1 and light.error > 0
        assert run.epochs == 2 and 1 <= run.epochs_to_converge <= 3
        assert run.seconds_per_epoch > 0 and len(run.val_loss) == 2
    dips = result.run(DIPS)
    assert dips is not None and dips.figures["light_auc"].value > 0.65
    assert [run.train_jets for run in result.scan] == [300, 600, 1200]
    ratio = result.ratios[f"{PFN} / {DIPS}"]["light_rej70"]
    pfn = result.run(PFN)
    assert pfn is not None
    assert ratio.value == pytest.approx(
        pfn.figures["light_rej70"].value / dips.figures["light_rej70"].value
    )
    light_curve = result.curves[DIPS]["light"]
    assert light_curve[0] >= light_curve[-1] >= 1
    claims = {v.claim.split()[0]: v for v in result.verdicts}
    assert claims["logarithmic"].holds is not None
    assert claims["DIPS"].holds is None and "missing" in claims["DIPS"].evidence

    paths = [*write_outputs(result, tmp_path / "out"), *flavour_plots(result, tmp_path / "out")]
    assert [p.name for p in paths] == [
        "flavour_study.json",
        "rejection_vs_beff.png",
        "light_rejection_vs_size.png",
    ]
    document = json.loads(paths[0].read_text())
    assert document["runs"][0]["figures"]["light_rej77"]["value"] == pytest.approx(
        dips.figures["light_rej77"].value
    )
    assert len(document["curves"][DIPS]["c"]) == len(document["b_efficiencies"])
    table = flavour_table(result)
    assert [row[0] for row in table.rows] == [DIPS, DIPS_LINEAR, PFN]
    assert len(flavour_scan_table(result).rows) == 3
    assert len(flavour_claims_table(result).rows) == len(result.verdicts) == 5


def figure_run(title: str, light70: float, **fields: object) -> RunResult:
    figures = {key: Figure(light70 if key == "light_rej70" else 2.0, 0.1) for key in FIGURES}
    values: dict[str, object] = {
        "title": title,
        "model": "pfn",
        "features": "flavour_dips",
        "train_jets": 100,
        "figures": figures,
        "seconds_per_epoch": 1.0,
        "epochs": 5,
        "best_epoch": 5,
        "epochs_to_converge": 5,
        "seconds": 5.0,
        **fields,
    }
    return RunResult(**values)  # type: ignore[arg-type]


def test_verdicts_follow_the_numbers() -> None:
    result = StudyResult(small_settings())
    result.runs = [
        figure_run(DIPS, 10, val_loss=[0.9, 0.7, 0.6, 0.6]),
        figure_run(DIPS_LINEAR, 10, val_loss=[0.9, 0.8, 0.7, 0.65, 0.6, 0.6]),
    ]
    result.ratios = {f"{VECTOR} / {PFN}": {"light_rej70": Figure(1.6, 0.1)}}
    claims = verdicts(result)
    log_claim = claims[1]
    assert log_claim.holds is True and "log 3, linear 5" in log_claim.evidence
    assert claims[2].holds is True and "1.60 ± 0.10" in claims[2].evidence
    assert claims[3].holds is None
    result.ratios[f"{VECTOR} / {PFN}"]["light_rej70"] = Figure(1.2, 0.1)
    assert verdicts(result)[2].holds is False
    assert epochs_to_reach([1.0, 0.5], 0.4) == 3


def test_every_shipped_row_builds_a_valid_config(tmp_path: Path) -> None:
    from bsym.rootio import TreeSource
    from bsym.training.studies.flavour import available_types, train_config

    settings = StudySettings()
    for row in ROWS:
        if row.model["type"] not in available_types():
            continue
        config = train_config(
            row, settings, [TreeSource(tmp_path / "jets.root", "Jets")], tmp_path, train_rows=None
        )
        assert config.features.label is not None and config.features.label.n_classes == 3
        assert config.discriminant is not None and config.discriminant.f_c == settings.f_c


def test_cli_quick_options_reach_the_settings() -> None:
    from bsym.cli import app

    result = CliRunner().invoke(app, ["study", "flavour", "--help"])
    assert result.exit_code == 0
    assert "--quick" in result.output and "--f-c" in result.output


@pytest.mark.slow
def test_full_flavour_study(tmp_path: Path) -> None:
    """The full study: 200k training and 300k test jets, every tagger, the size scan.

    Expected wall time on one thread of an idle core: about 2 hours for the DIPS, RNNIP, IP3D
    and PFN rows and the scan, 1 to 3.5 days for the four Vector/Tensor PFN rows at width 64
    (docs/flavour-study.md)."""
    from bsym.training.studies.flavour import QUICK

    settings = StudySettings()
    assert settings.train_jets > QUICK.train_jets
    result = run_study(settings, tmp_path / "cache", tmp_path / "out")
    assert not result.skipped, result.skipped
    assert all(math.isfinite(run.figures["light_rej70"].value) for run in result.runs)
    assert all(verdict.holds is not None for verdict in result.verdicts)
