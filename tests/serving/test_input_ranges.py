"""Input-range monitoring: training ranges in the spec, counts and PSI at scoring, the report,
``--strict-inputs``, and TritonModel counting the same as ``bsym score``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from typer.testing import CliRunner

from bsym.contract import FEATURE_SPEC_KEY
from bsym.features import Feature, FeatureBatch, FeatureSpec
from bsym.input_ranges import (
    PSI_THRESHOLD,
    InputCounts,
    count_inputs,
    histogram,
    psi,
    training_ranges,
)
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files

PFN = "isolation_pfn"
SHIFTED = {"Muon_pt": 4.0, "CaloCell_et": 0.01, "Muon_pfRelIso03_all": 0.01}


def globals_batch(values: np.ndarray) -> FeatureBatch:
    columns = values[:, None].astype(np.float32)
    return FeatureBatch(len(values), None, None, columns, None, None, None)


def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    rng = np.random.default_rng(3)
    spec = FeatureSpec(globals=[Feature(branch="x")], label=None)
    train = rng.normal(size=20_000)
    ranges = training_ranges(spec, globals_batch(train))
    (feature,) = ranges.features
    assert feature.quantiles[0] == pytest.approx(train.min(), rel=1e-6)
    assert feature.quantiles[-1] == pytest.approx(train.max(), rel=1e-6)
    assert sum(feature.histogram) == len(train)
    assert psi(feature.histogram, feature.histogram) == 0.0

    same, shifted = InputCounts.of(ranges), InputCounts.of(ranges)
    count_inputs(same, spec, globals_batch(rng.normal(size=20_000)))
    count_inputs(shifted, spec, globals_batch(rng.normal(loc=3.0, size=20_000)))
    (same_x,) = same.features.values()
    (shifted_x,) = shifted.features.values()
    assert same_x.psi < 0.01 and not same_x.flagged
    assert shifted_x.psi > 10 * PSI_THRESHOLD and shifted_x.flagged
    assert shifted_x.above > 0.05 * shifted_x.count and shifted_x.below == 0


def test_histogram_keeps_the_last_edge_and_counts_under_and_overflow() -> None:
    counts = histogram(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), [0.0, 0.5, 1.0])
    assert counts.tolist() == [1, 1, 2, 1]
    constant = histogram(np.array([1.0, 1.0, 2.0]), [1.0, 1.0])
    assert constant.tolist() == [0, 2, 1]


def test_spec_without_ranges_loads_and_keeps_its_json() -> None:
    spec = FeatureSpec(globals=[Feature(branch="Muon_pt")])
    assert "input_ranges" not in json.loads(spec.to_json())
    assert FeatureSpec.from_json(spec.to_json()).input_ranges is None


@pytest.fixture(scope="module")
def shifted_sample(isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """isolation_muons_000.root with Muon_pt × 4 and the isolation inputs × 0.01."""
    out = tmp_path_factory.mktemp("shifted") / "shifted_muons.root"
    with uproot.open(isolation_sample / "isolation_muons_000.root") as file:
        arrays = file["Muons"].arrays()
    columns = {name: arrays[name] * SHIFTED.get(name, 1.0) for name in arrays.fields}
    with uproot.recreate(out) as file:
        file["Muons"] = columns
    return out


def squeezed(text: str) -> str:
    """The text without whitespace: rich wraps long lines where it likes."""
    return "".join(text.split())


def score_cli(args: list[str]) -> tuple[int, str]:
    from bsym.cli import app

    result = CliRunner().invoke(app, ["score", *args, "--no-progress"])
    return result.exit_code, result.output


def plain_and_shifted(repository: Path, plain: Path, shifted: Path, out: Path) -> list[str]:
    """``bsym score`` arguments: the PFN on the unshifted and the shifted file into ``out``."""
    model = repository / PFN / "1" / "model.onnx"
    return [str(plain), str(shifted), "-m", str(model), "-o", str(out)]


def test_shifted_file_warns_and_writes_the_report(
    model_repository: Path, isolation_sample: Path, shifted_sample: Path, tmp_path: Path
) -> None:
    plain = isolation_sample / "isolation_muons_000.root"
    code, output = score_cli(plain_and_shifted(model_repository, plain, shifted_sample, tmp_path))
    assert code == 0, output
    text = squeezed(output)
    assert squeezed(f"warning: {shifted_sample}:Muons: log(Muon_pt):") in text
    assert squeezed(f"warning: {shifted_sample}:Muons: log(CaloCell_et):") in text
    assert squeezed(f"{plain}:Muons:") not in text.split("warning:", 1)[-1]
    report = json.loads((tmp_path / f"{PFN}.inputs.json").read_text())
    assert report["thresholds"]["outside_fraction"] == 0.01
    plain_counts = report["files"][f"{plain}:Muons"]
    shifted_counts = report["files"][f"{shifted_sample}:Muons"]
    assert not any(feature["flagged"] for feature in plain_counts.values())
    assert shifted_counts["log(CaloCell_et)"]["outside_fraction"] > 0.5
    assert shifted_counts["log(Muon_pt)"]["above_training_max"] > 0
    assert shifted_counts["log(Muon_pt)"]["psi"] > PSI_THRESHOLD
    assert not shifted_counts["CaloCell_eta - Muon_eta"]["flagged"]
    overall = report["overall"]["log(Muon_pt)"]
    assert overall["count"] == plain_counts["log(Muon_pt)"]["count"] * 2
    assert overall["above_training_max"] == (
        plain_counts["log(Muon_pt)"]["above_training_max"]
        + shifted_counts["log(Muon_pt)"]["above_training_max"]
    )
    share = shifted_counts["log(CaloCell_et)"]["outside_fraction"]
    assert squeezed(f"log(CaloCell_et): {share:.1%} outside the training range") in text


def test_strict_inputs_fails_the_shifted_file_and_leaves_no_output(
    model_repository: Path, isolation_sample: Path, shifted_sample: Path, tmp_path: Path
) -> None:
    plain = isolation_sample / "isolation_muons_000.root"
    args = plain_and_shifted(model_repository, plain, shifted_sample, tmp_path)
    code, output = score_cli([*args, "--strict-inputs"])
    assert code == 1, output
    text = squeezed(output)
    assert (
        squeezed(f"failed: {shifted_sample}:Muons: inputs outside the model's training range")
        in text
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"isolation_muons_000.{PFN}.root",
        f"{PFN}.inputs.json",
    ]


def test_spec_without_ranges_still_scores(
    model_repository: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    import onnx

    model = onnx.load(model_repository / PFN / "1" / "model.onnx")
    for prop in model.metadata_props:
        if prop.key == FEATURE_SPEC_KEY:
            prop.value = FeatureSpec.from_json(prop.value).without_ranges().to_json()
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with OnnxRuntimeBackend(path, threads=1) as backend:
        summary = score_files(
            [str(isolation_sample / "isolation_muons_000.root")],
            backend,
            tmp_path / "out",
            progress=False,
        )
    assert len(summary.scored) == 1 and not summary.failed
    assert not summary.monitored and summary.input_report is None
    plain = str(isolation_sample / "isolation_muons_000.root")
    code, output = score_cli([plain, "-m", str(path), "-o", str(tmp_path / "cli")])
    assert code == 0 and output.count("records no input ranges") == 1, output
    strict = [plain, "-m", str(path), "-o", str(tmp_path / "strict"), "--strict-inputs"]
    code, output = score_cli(strict)
    assert code == 1 and "--strict-inputs" in output, output


def test_triton_model_counts_as_bsym_score(
    served_repository: object, shifted_sample: Path, tmp_path: Path
) -> None:
    from bsym.serving import TritonModel
    from bsym.serving.analysis import InputRangeWarning
    from bsym.serving.serve import ServedRepository

    assert isinstance(served_repository, ServedRepository)
    model_path = served_repository.repository / PFN / "1" / "model.onnx"
    with OnnxRuntimeBackend(model_path, threads=1) as backend:
        summary = score_files([str(shifted_sample)], backend, tmp_path, progress=False)
    assert summary.input_report is not None
    expected = json.loads(summary.input_report.read_text())["overall"]
    with uproot.open(shifted_sample) as file:
        arrays = file["Muons"].arrays()
    with TritonModel(served_repository.grpc_url, PFN) as model:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(arrays[:1000])
            model(arrays[1000:])
        found = model.input_report()["features"]
    messages = [str(w.message) for w in caught if issubclass(w.category, InputRangeWarning)]
    flagged = [name for name, feature in expected.items() if feature["flagged"]]
    assert sorted(m.split(": ")[1] for m in messages) == sorted(flagged)
    for name, feature in expected.items():
        for key in ("count", "below_training_min", "above_training_max", "histogram"):
            assert found[name][key] == feature[key], (name, key)


def test_real_nanoaod_report_counts_what_lies_outside_the_training_range(
    isolation_sample: Path, nanoaod_dir: Path, tmp_path: Path
) -> None:
    from bsym.configs import shipped_config
    from bsym.export.onnx_export import export_onnx
    from bsym.training.config import load_config
    from bsym.training.train import train

    config = load_config(
        shipped_config("isolation_reliso"),
        [
            f"data.train=['{isolation_sample}/isolation_muons_*.root']",
            f"output_dir={tmp_path / 'run'}",
            "features.globals=[{branch: Muon_pt, transform: log}, {branch: Muon_pfRelIso04_all}]",
            "model.hidden_sizes=[8]",
            "data.test_fraction=0.4",
            "optimizer.epochs=1",
        ],
    )
    model = tmp_path / "model.onnx"
    export_onnx(train(config, progress=False).checkpoint, model)
    code, output = score_cli(
        [str(nanoaod_dir / "nano_dy.root"), "-m", str(model), "-o", str(tmp_path / "out")]
    )
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "isolation_reliso.inputs.json").read_text())
    (counts,) = report["files"].values()
    with uproot.open(nanoaod_dir / "nano_dy.root") as file:
        real = file["Events"].arrays(["Muon_pt", "Muon_pfRelIso04_all"], library="ak")
    columns = {
        "log(Muon_pt)": np.log(ak.to_numpy(ak.flatten(real["Muon_pt"]))),
        "Muon_pfRelIso04_all": ak.to_numpy(ak.flatten(real["Muon_pfRelIso04_all"])),
    }
    for name, values in columns.items():
        found = counts[name]
        assert found["count"] == len(values) > 0
        assert found["below_training_min"] == np.count_nonzero(values < found["training_min"])
        assert found["above_training_max"] == np.count_nonzero(values > found["training_max"])
        line = squeezed(f"{name}: {found['outside_fraction']:.1%} outside")
        assert (line in squeezed(output)) == (found["outside_fraction"] > 0.01), name
    # The real file has a 4.4 GeV muon, below every simulated one (the simulation starts at 10).
    assert counts["log(Muon_pt)"]["below_training_min"] >= 1
