"""docs/formats.md: its CSV conversion runs and gives the Lorentz format, and the studies
train and test on the user's files through --data and --test-data."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from typer.testing import CliRunner

from bsym.rootio import TreeSource
from bsym.simulate.lorentz import simulate_lorentz, write_lorentz
from bsym.training.studies.cli import study_app
from bsym.training.studies.learning_curve import StudySettings, read_study_rows

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "formats.md"
MARKER = "<!-- csv-to-lorentz -->"
COLUMNS = [f"mu{m}_{c}" for m in (1, 2) for c in ("px", "py", "pz", "E")] + ["label", "weight"]


def doc_converter() -> Callable[[str, str], None]:
    """``csv_to_lorentz`` from the code block after the marker in docs/formats.md."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, flags=re.DOTALL)
    assert block is not None, f"no python block after {MARKER} in {DOC}"
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)
    converter = namespace["csv_to_lorentz"]
    assert callable(converter)
    return converter  # type: ignore[no-any-return]


def write_csv(path: Path, n_events: int, *, seed: int, swap: bool) -> Path:
    """Simulated events as the doc's CSV; ``swap`` puts the subleading muon first."""
    events = simulate_lorentz(n_events, seed=seed)
    first, second = (1, 0) if swap else (0, 1)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        for event in events.to_list():
            row = [
                repr(event[f"Muon_{c}"][m])
                for m in (first, second)
                for c in ["px", "py", "pz", "E"]
            ]
            writer.writerow([*row, event["label"], repr(event["weight"])])
    return path


def cli(*args: str) -> tuple[int, str]:
    """Exit code and output without whitespace (rich wraps long paths anywhere)."""
    result = CliRunner().invoke(study_app, list(args))
    return result.exit_code, squeeze(result.output)


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_converted_csv_reads_as_the_simulated_events(tmp_path: Path) -> None:
    convert = doc_converter()
    convert(
        str(write_csv(tmp_path / "dimuons.csv", 400, seed=5, swap=True)), str(tmp_path / "c.root")
    )
    write_lorentz(tmp_path / "sim", 400, seed=5)
    with (
        uproot.open(tmp_path / "c.root") as converted_file,
        uproot.open(tmp_path / "sim" / "lorentz_000.root") as simulated_file,
    ):
        converted_tree, simulated_tree = converted_file["Events"], simulated_file["Events"]
        assert converted_tree.num_entries == 400
        types = {name: branch.typename for name, branch in simulated_tree.items()}
        del types["mass_true"]
        assert {name: branch.typename for name, branch in converted_tree.items()} == types
    settings = StudySettings()
    converted = read_study_rows([TreeSource(tmp_path / "c.root", "Events")], settings)
    simulated = read_study_rows(
        [TreeSource(tmp_path / "sim" / "lorentz_000.root", "Events")], settings
    )
    assert converted.constituents is not None and simulated.constituents is not None
    np.testing.assert_array_equal(converted.constituents, simulated.constituents)
    np.testing.assert_array_equal(converted.label, simulated.label)
    np.testing.assert_array_equal(converted.weight, simulated.weight)
    assert converted.globals is not None and simulated.globals is not None
    np.testing.assert_allclose(converted.globals, simulated.globals, rtol=1e-6)


def test_learning_curve_on_converted_files(tmp_path: Path) -> None:
    convert = doc_converter()
    convert(
        str(write_csv(tmp_path / "train.csv", 1400, seed=6, swap=False)),
        str(tmp_path / "converted.root"),
    )
    convert(
        str(write_csv(tmp_path / "test.csv", 800, seed=7, swap=False)),
        str(tmp_path / "converted_test.root"),
    )
    out = tmp_path / "out"
    code, output = cli(
        "learning-curve", "--task", "lorentz", "--quick",
        "--data", str(tmp_path / "converted.root"),
        "--test-data", str(tmp_path / "converted_test.root"),
        "--sizes", "512", "--repeats", "1", "--epochs", "2", "--val-rows", "600",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert squeeze("test AUC, mean ± std of 1 (converted.root, test converted_test.root)") in output
    numbers = json.loads((out / "learning_curve.json").read_text())
    assert numbers["data"]["data"] == [f"{tmp_path / 'converted.root'}:Events"]
    assert numbers["data"]["rows"] == {"test": 800, "validation": 600}
    assert {run["model"] for run in numbers["runs"]} == {"unconstrained", "invariant", "dual"}
    assert all(0.3 < run["test_auc"] < 1 for run in numbers["runs"])


def test_learning_curve_cuts_test_rows_from_data_and_says_what_is_missing(
    tmp_path: Path,
) -> None:
    write_lorentz(tmp_path / "sim", 1000, seed=8)
    data = str(tmp_path / "sim" / "lorentz_000.root")
    common = ["learning-curve", "--data", data, "--sizes", "512", "--repeats", "1"]
    code, output = cli(*common, "--test-rows", "600", "--val-rows", "100")
    assert code == 1
    assert squeeze(f"{data}:Events: 400 rows left for training, but the study needs 612") in output
    code, output = cli(*common, "--test-rows", "1000")
    assert code == 1 and squeeze("pass --test-data, or a smaller --test-rows") in output
    code, output = cli(*common, "--breaking", "0.2")
    assert code != 0 and squeeze("with --data it has none") in output


def test_learning_curve_names_the_missing_branch(tmp_path: Path) -> None:
    write_lorentz(tmp_path / "sim", 600, seed=9)
    arrays = uproot.open(tmp_path / "sim" / "lorentz_000.root")["Events"].arrays()
    path = tmp_path / "no_weight.root"
    with uproot.recreate(path) as file:
        muons = ak.zip({c: arrays[f"Muon_{c}"] for c in ("px", "py", "pz", "E", "pt")})
        branches = {"Muon": muons, "lead_pt": arrays["lead_pt"], "label": arrays["label"]}
        file.mktree("Events", {k: v.type for k, v in branches.items()}).extend(branches)
    code, output = cli("learning-curve", "--data", str(path), "--test-data", str(path))
    assert code == 1
    assert squeeze(f"{path}:Events has no branch 'weight'") in output


@pytest.mark.parametrize("flag", ["--data", "--test-data"])
def test_isolation_study_needs_both_data_options(tmp_path: Path, flag: str) -> None:
    code, output = cli("isolation", flag, str(tmp_path / "x.root"))
    assert code != 0 and squeeze("--data and --test-data go together") in output


def test_isolation_study_checks_the_user_files(tmp_path: Path, isolation_sample: Path) -> None:
    muons = str(isolation_sample / "isolation_muons_000.root")
    events = str(isolation_sample / "isolation_events_000.root:Events")
    no_truth = tmp_path / "no_truth.root"
    arrays = uproot.open(muons)["Muons"].arrays(["Muon_pt", "dimuon_mass"])
    with uproot.recreate(no_truth) as file:
        branches = {name: arrays[name].to_numpy() for name in arrays.fields}
        file.mktree("Muons", {k: v.dtype for k, v in branches.items()}).extend(branches)
    out = ["--out", str(tmp_path / "out"), "--quick"]
    code, output = cli("isolation", "--data", muons, "--test-data", str(no_truth), *out)
    assert code == 1 and squeeze(f"{no_truth}:Muons has no branch 'Muon_genPartFlav'") in output
    code, output = cli("isolation", "--data", events, "--test-data", muons, *out)
    assert code == 1
    assert squeeze("isolation_events_000.root:Events has 'nMuon' (the event layout)") in output


@pytest.mark.slow
def test_isolation_study_on_user_files(tmp_path: Path, isolation_sample: Path) -> None:
    from bsym.training.studies.isolation import QUICK, Row, UserData, run_study

    data = UserData(
        (TreeSource(isolation_sample / "isolation_muons_000.root", "Muons"),),
        (TreeSource(isolation_sample / "isolation_muons_001.root", "Muons"),),
    )
    settings = QUICK.with_overrides(rows=(Row("1 cone + ΣpT", "isolation_cone1_sumpt"),))
    result = run_study(settings, data, tmp_path / "out")
    assert [(r.title, r.supervision) for r in result.runs] == [
        ("1 cone + ΣpT", "truth"),
        ("1 cone + ΣpT", "cwola"),
    ]
    assert result.runs[0].auc.value > 0.75
    with uproot.open(data.test[0].path) as file:
        assert 0 < result.n_test < file["Muons"].num_entries
