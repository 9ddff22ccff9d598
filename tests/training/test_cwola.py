"""CWoLa: labels from the dimuon mass and sign, reweighting, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import uproot

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.rootio import TreeSource, parse_inputs
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint
from bsym.training.config import TrainConfig, load_config
from bsym.training.cwola import (
    SupervisionConfig,
    cwola_labels,
    read_cwola_rows,
    reweight_negatives,
)
from bsym.training.cwola_evaluation import evaluation_rows
from bsym.training.dataset import read_rows, read_training_rows
from bsym.training.evaluate import evaluate
from bsym.training.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 4_000, seed=5, events_per_file=2_500)
    return out


def _config(data_dir: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        shipped_config("isolation_cone1_sumpt"),
        [
            f"data.train=['{data_dir}/isolation_muons_*.root']",
            f"output_dir={out}",
            "supervision.type=cwola",
            "optimizer.epochs=3",
            *extra,
        ],
    )


def test_labels_from_mass_and_sign() -> None:
    config = SupervisionConfig(type="cwola")
    mass = np.array([90.0, 90.0, 75.0, 100.0, 84.0, 96.0, 69.0, 111.0, 83.99])
    opposite = np.array([True, False, True, False, True, True, True, True, False])
    in_region, label = cwola_labels(mass, opposite, config)
    assert in_region.tolist() == [True, True, True, True, True, True, False, False, True]
    # 84 <= m < 96 and opposite sign: 1; same sign in the signal region or a sideband: 0
    assert label[in_region].tolist() == [1, 0, 0, 0, 1, 0, 0]


def test_regions_configurable_and_checked() -> None:
    narrow = SupervisionConfig(type="cwola", signal_region=(88.0, 94.0), sidebands=[(70, 80)])
    in_region, label = cwola_labels(
        np.array([86.0, 90.0, 75.0]), np.array([True, True, True]), narrow
    )
    assert in_region.tolist() == [False, True, True]
    assert label.tolist() == [0, 1, 0]
    assert narrow.window == (70.0, 94.0)
    with pytest.raises(ValueError, match="overlap"):
        SupervisionConfig(signal_region=(84.0, 96.0), sidebands=[(70.0, 85.0)])


def test_reweighting_matches_the_positive_histogram() -> None:
    rng = np.random.default_rng(2)
    label = (rng.random(20_000) < 0.3).astype(np.int64)
    pt = np.where(label == 1, rng.normal(45, 8, label.size), 25 + rng.exponential(12, label.size))
    edges = [25.0, 35.0, 45.0, 55.0, 80.0]
    weight = reweight_negatives(label, [pt], [edges])
    assert weight[label == 1].tolist() == [1.0] * int(label.sum())
    assert weight[label == 0].sum() == pytest.approx(label.sum())
    bins = np.searchsorted(edges[1:-1], pt, side="right")
    positive = np.bincount(bins[label == 1], minlength=4)
    negative = np.bincount(bins[label == 0], weights=weight[label == 0], minlength=4)
    np.testing.assert_allclose(negative, positive, rtol=1e-9)


def test_set_supervision_switches_a_shipped_config(tmp_path: Path) -> None:
    config = load_config(shipped_config("isolation_cones_sumpt"), ["supervision.type=cwola"])
    assert config.supervision.type == "cwola"
    assert config.supervision.signal_region == (84.0, 96.0)
    assert config.supervision.sidebands == [(70.0, 84.0), (96.0, 110.0)]
    assert [axis.branch for axis in config.supervision.reweight] == [
        "dimuon_leadEta",
        "dimuon_leadPt",
    ]
    assert load_config(shipped_config("isolation_pfn")).supervision.type == "truth"
    with pytest.raises(ConfigError, match=r"supervision\.type"):
        load_config(shipped_config("isolation_pfn"), ["supervision.type=cwolla"])


def test_rows_and_labels_from_the_files(data_dir: Path, tmp_path: Path) -> None:
    config = _config(data_dir, tmp_path)
    sources = parse_inputs(config.data.train, default_tree="Muons")
    batch, _ = read_training_rows(sources, config, max_rows=None)
    everything, _ = read_rows(sources, config.features)
    rows = read_cwola_rows(sources, config.features, config.supervision)
    assert batch.n_rows == rows.keep.size < everything.n_rows
    assert batch.label is not None and batch.weight is not None
    np.testing.assert_array_equal(batch.label, rows.label)
    np.testing.assert_array_equal(batch.globals, everything.globals[rows.keep])

    # the same labels, by hand, from the branches written to the files
    columns = ["dimuon_mass", "dimuon_os", "Muon_fromPair", "dimuon_selected", "Muon_pt"]
    columns += ["Muon_eta", "Muon_genPartFlav"]
    arrays = [uproot.open(f"{s.path}:{s.tree}").arrays(columns, library="np") for s in sources]
    read = {k: np.concatenate([a[k] for a in arrays]) for k in columns}
    kept = read["Muon_fromPair"].astype(bool) & read["dimuon_selected"].astype(bool)
    mass = read["dimuon_mass"]
    kept &= (mass >= 70) & (mass < 110)
    np.testing.assert_array_equal(rows.keep, np.flatnonzero(kept))
    assert (read["Muon_pt"][kept] > 25).all() and (np.abs(read["Muon_eta"][kept]) < 2.1).all()
    signal = (mass >= 84) & (mass < 96) & (read["dimuon_os"] == 1)
    np.testing.assert_array_equal(rows.label, signal[kept].astype(np.int64))
    assert rows.truth is not None
    np.testing.assert_array_equal(rows.truth, (read["Muon_genPartFlav"][kept] == 1))
    # the signal region is much richer in prompt muons than the negative class
    assert rows.truth[rows.label == 1].mean() > 0.75 > 0.35 > rows.truth[rows.label == 0].mean()

    # the supervised reference on the same rows: truth labels, no weights
    reference = _config(data_dir, tmp_path, "supervision.type=truth", "supervision.select=true")
    same_rows, _ = read_training_rows(sources, reference, max_rows=None)
    assert same_rows.label is not None and same_rows.weight is None
    np.testing.assert_array_equal(same_rows.label, rows.truth)
    np.testing.assert_array_equal(same_rows.globals, batch.globals)


def test_no_truth_branch_needed(data_dir: Path, tmp_path: Path) -> None:
    config = _config(data_dir, tmp_path, "features.label.branch=Muon_noSuchTruth")
    sources = [TreeSource(p, "Muons") for p in sorted(data_dir.glob("isolation_muons_*.root"))]
    batch, _ = read_training_rows(sources, config, max_rows=None)
    rows = read_cwola_rows(sources, config.features, config.supervision)
    assert rows.truth is None
    assert batch.label is not None and set(batch.label.tolist()) == {0, 1}


def test_train_and_evaluate_with_cwola(data_dir: Path, tmp_path: Path) -> None:
    config = _config(data_dir, tmp_path / "run")
    result = train(config, progress=False)
    assert result.epochs == 3
    assert all(0.5 < float(r["val_auc"] or 0) < 1.0 for r in result.history)
    evaluated = evaluate([result.checkpoint], tmp_path / "eval", n_bootstrap=5)
    metrics = evaluated.models[0]
    assert metrics.supervision == "cwola"
    assert metrics.auc > 0.75  # true AUC: the truth exists in the simulation
    assert abs(metrics.auc_sweighted - metrics.auc) < max(0.05, 4 * metrics.auc_sweighted_err)
    assert metrics.signal_yield > 0
    document = json.loads(evaluated.metrics_path.read_text())
    assert document["models"][0]["auc_sweighted"] == pytest.approx(metrics.auc_sweighted)


def test_cwola_training_ignores_the_label_and_its_truth_auc_leaves_out_neither(
    data_dir: Path, tmp_path: Path
) -> None:
    plain = _config(data_dir, tmp_path / "plain")
    config = _config(
        data_dir, tmp_path / "run", "optimizer.epochs=1", "features.label.negative=[5]"
    )
    # the CWoLa labels come from the mass: the truth classes change none of the rows
    sources = parse_inputs(plain.data.train, default_tree="Muons")
    plain_rows, _ = read_training_rows(sources, plain, max_rows=None)
    loaded = load_checkpoint(train(config, progress=False).checkpoint)
    assert loaded.split.n_rows == plain_rows.n_rows
    truth = evaluation_rows(loaded, None).truth
    assert truth is not None and set(np.unique(truth).tolist()) == {-1, 0, 1}
    evaluated = evaluate([loaded.path], tmp_path / "eval", n_bootstrap=3)
    assert evaluated.models[0].n_test == int((truth >= 0).sum()) < truth.size


def test_study_command_is_registered() -> None:
    from typer.testing import CliRunner

    from bsym.training.studies.cli import study_app

    result = CliRunner().invoke(study_app, ["isolation", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--bootstraps" in result.output and "--quick" in result.output


@pytest.mark.slow
def test_quick_isolation_study(tmp_path: Path) -> None:
    from bsym.training.studies.isolation import QUICK, Row, run_study, write_outputs
    from bsym.training.studies.plots import isolation_plots

    settings = QUICK.with_overrides(
        train_events=4_000,
        test_events=3_000,
        rows=(Row("1 cone + ΣpT", "isolation_cone1_sumpt"), Row("missing", "no_such_config")),
    )
    result = run_study(settings, tmp_path / "data", tmp_path / "out")
    assert result.skipped and "no_such_config" in result.skipped[0]
    assert [(r.title, r.supervision) for r in result.runs] == [
        ("1 cone + ΣpT", "truth"),
        ("1 cone + ΣpT", "cwola"),
    ]
    cwola = result.runs[1]
    assert cwola.auc_sweighted is not None and cwola.auc.value > 0.75
    names = [difference.name for difference in result.differences]
    assert names == [
        "1 cone + ΣpT: CWoLa − supervised AUC",
        "1 cone + ΣpT: CWoLa sWeighted − true AUC",
    ]
    paths = write_outputs(result, tmp_path / "out") + isolation_plots(result, tmp_path / "out")
    assert [path.name for path in paths] == ["isolation_study.json", "roc_isolation.png"]
    assert all(path.is_file() for path in paths)
    again = run_study(settings, tmp_path / "data", tmp_path / "out")  # reuses the trainings
    assert [r.auc.value for r in again.runs] == [r.auc.value for r in result.runs]
