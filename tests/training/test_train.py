"""Training: configs and overrides, the loop (loss, determinism, resume), checkpoints, ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from bsym.configs import shipped_config
from bsym.errors import ConfigError, InputFileError
from bsym.rootio import TreeSource
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint, predict, read_checkpoint
from bsym.training.cli import train_command
from bsym.training.config import TrainConfig, load_config, parse_override, save_config
from bsym.training.dataset import read_rows, take
from bsym.training.metrics import roc_auc, roc_curve
from bsym.training.models import BsymModel, ConeCut, build_model, model_inputs
from bsym.training.train import train

SMALL = {
    "isolation_pfn": ["model.phi_sizes=[16, 16]", "model.f_sizes=[16]"],
    "isolation_cones": ["model.hidden_sizes=[16]"],
    "isolation_reliso": ["model.hidden_sizes=[16]"],
    "isolation_cone_cut": [],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 800 simulated muons in both layouts."""
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 400, seed=3)
    return out


def small_config(name: str, data_dir: Path, out: Path, *extra: str) -> TrainConfig:
    """A shipped config, shrunk to train in a fraction of a second per epoch."""
    overrides = [
        f"data.train=['{data_dir}/isolation_muons_*.root']",
        f"output_dir={out}",
        "optimizer.batch_size=64",
        "optimizer.epochs=2",
        "optimizer.lr=3e-3",
        *SMALL[name],
        *extra,
    ]
    return load_config(shipped_config(name), overrides)


def state(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(path).model.state_dict())


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- configs -------------------------------------------------------------------------------


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
name: iso
model: {type: pfn, phi_sizes: [8]}
features:
  constituents: {features: [{branch: CaloCell_et, transform: log}]}
  globals: [{branch: Muon_pt}]
data: {train: [x.root]}
"""


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shipped_configs_load(name: str) -> None:
    config = load_config(shipped_config(name))
    assert config.name == name
    assert config.output_dir == Path("runs") / name
    assert config.data.train == ["data/isolation/isolation_muons_*.root"]


def test_unknown_key_in_file_suggests_the_valid_one(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", MINIMAL.replace("phi_sizes", "phi_size"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "unknown key 'model.phi_size'" in message
    assert "did you mean 'phi_sizes'" in message
    assert str(path) in message


def test_unknown_key_in_override_names_the_override(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    expected = r"--set optimiser\.lr=1: unknown key 'optimiser'; did you mean 'optimizer'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path, ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown type 'pfnn'; did you mean 'pfn'"):
        load_config(path, ["model.type=pfnn"])


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    config = load_config(
        path,
        [
            "name=iso2",
            "model.phi_sizes=[32, 16]",
            "model.latent=8",
            "model.use_globals=false",
            "optimizer.lr=3e-4",
            "data.max_rows=100",
            "data.tree=Other",
            "features.constituents.features.0.transform=log1p",
        ],
    )
    assert config.name == "iso2"
    assert config.output_dir == Path("runs/iso2")
    assert config.model.type == "pfn" and config.model.phi_sizes == [32, 16]
    assert config.model.latent == 8 and not config.model.use_globals
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.data.max_rows == 100 and config.data.tree == "Other"
    assert config.features.constituents is not None
    assert config.features.constituents.features[0].transform == "log1p"
    assert parse_override("a.b= [1, x]") == (["a", "b"], [1, "x"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr", "not of the form"),
        ("optimizer.lr=-1", "optimizer.lr: Input should be greater than 0"),
        ("name=1x", "not a valid identifier"),
        ("name.first=x", "'name' is a str, not a mapping"),
        ("features.globals.5.branch=x", "list of 1 items"),
        ("model.use_globals=true", "use_globals"),
        ("data.validation_fraction=0.9", "must be below 1"),
    ],
)
def test_bad_values_give_readable_errors(tmp_path: Path, override: str, expected: str) -> None:
    text = MINIMAL
    if override.startswith("model.use_globals"):
        text = text.replace("  globals: [{branch: Muon_pt}]\n", "")
    path = write_yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert expected in str(error.value)


def test_saved_config_reads_back_equal(tmp_path: Path) -> None:
    config = load_config(shipped_config("isolation_pfn"), ["seed=7"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# --- metrics -------------------------------------------------------------------------------


def test_auc_matches_pairwise_count_with_ties_and_weights() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 8, 300) + labels  # many ties
    weights = rng.random(300)
    pos, neg = labels == 1, labels == 0
    diff = scores[pos][:, None] - scores[neg][None, :]
    pair = weights[pos][:, None] * weights[neg][None, :]
    expected = np.sum(pair * ((diff > 0) + 0.5 * (diff == 0))) / pair.sum()
    assert roc_auc(labels, scores, weights) == pytest.approx(expected, rel=1e-12)
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.5, 0.5]) == pytest.approx(0.875)
    fpr, tpr, thresholds = roc_curve(labels, scores, weights)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])


# --- training ------------------------------------------------------------------------------


def test_two_epochs_reduce_the_loss(data_dir: Path, tmp_path: Path) -> None:
    config = small_config("isolation_pfn", data_dir, tmp_path / "run")
    result = train(config, progress=False)
    losses = [record["train_loss"] for record in result.history]
    assert len(losses) == 2
    assert losses[1] < losses[0]  # type: ignore[operator]
    assert result.best_val_auc > 0.75
    for name in ("checkpoint.pt", "last.pt", "config.yaml"):
        assert (tmp_path / "run" / name).is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == config

    loaded = load_checkpoint(result.checkpoint)
    assert not loaded.model.training
    assert loaded.spec.input_ranges is not None
    assert loaded.spec.without_ranges() == config.features
    assert loaded.config.model_copy(update={"features": config.features}) == config
    test_rows = loaded.held_out_test()
    assert test_rows.n_rows == len(loaded.split.test) > 100
    scores = predict(loaded, test_rows, batch_size=50)
    assert scores.shape == (test_rows.n_rows,) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    with pytest.raises(ConfigError, match="already holds a trained model"):
        train(config, progress=False)


def test_same_seed_gives_identical_weights(data_dir: Path, tmp_path: Path) -> None:
    runs = {
        label: train(
            small_config("isolation_cones", data_dir, tmp_path / label, f"seed={seed}"),
            progress=False,
        )
        for label, seed in (("a", 1), ("b", 1), ("c", 2))
    }
    assert_same_state(state(runs["a"].last), state(runs["b"].last))
    assert runs["a"].history == runs["b"].history
    different = state(runs["c"].last)
    assert not torch.equal(state(runs["a"].last)["out.weight"], different["out.weight"])


@pytest.mark.parametrize("schedule", [[], ["optimizer.lr_patience=1", "optimizer.lr=0.02"]])
def test_resume_repeats_uninterrupted_training(
    data_dir: Path, tmp_path: Path, schedule: list[str]
) -> None:
    full = train(
        small_config("isolation_pfn", data_dir, tmp_path / "full", "optimizer.epochs=4", *schedule),
        progress=False,
    )
    first = train(
        small_config("isolation_pfn", data_dir, tmp_path / "part", *schedule), progress=False
    )
    assert first.epochs == 2
    resumed = train(
        small_config("isolation_pfn", data_dir, tmp_path / "part", "optimizer.epochs=4", *schedule),
        resume=first.last,
        progress=False,
    )
    assert resumed.epochs == 4
    assert resumed.history == full.history
    if schedule:  # the plateau schedule drops the rate inside the resumed epochs
        rates = [record["lr"] for record in full.history]
        assert rates[:2] == [0.02, 0.02] and rates[-1] == pytest.approx(0.02 / 3), rates
    assert_same_state(state(resumed.last), state(full.last))
    assert_same_state(state(resumed.checkpoint), state(full.checkpoint))
    with pytest.raises(ConfigError, match=r"differs in optimizer\.lr"):
        train(
            small_config("isolation_pfn", data_dir, tmp_path / "part", "optimizer.lr=0.1"),
            resume=first.last,
            progress=False,
        )


def test_early_stopping_keeps_the_best_epoch(data_dir: Path, tmp_path: Path) -> None:
    config = small_config(
        "isolation_reliso",
        data_dir,
        tmp_path / "run",
        "optimizer.lr=1e-12",
        "optimizer.epochs=10",
        "optimizer.patience=2",
    )
    result = train(config, progress=False)
    assert result.stopped_early
    assert result.best_epoch == 1 and result.epochs == 3
    assert load_checkpoint(result.checkpoint).checkpoint.epoch == 1


def test_cone_cut_picks_a_cone(data_dir: Path, tmp_path: Path) -> None:
    config = small_config("isolation_cone_cut", data_dir, tmp_path / "run")
    result = train(config, progress=False)
    loaded = load_checkpoint(result.checkpoint)
    model = loaded.model
    assert isinstance(model, ConeCut) and model.chosen.startswith("cone")
    assert result.best_val_auc > 0.7
    rows = loaded.held_out_test()
    assert rows.globals is not None
    column = rows.globals[:, int(model.column[0])]
    np.testing.assert_allclose(predict(loaded, rows), np.exp(-column), rtol=1e-6)
    again = train(config, resume=result.last, progress=False)
    assert (again.epochs, again.best_epoch, again.best_val_auc) == (1, 1, result.best_val_auc)


def test_both_layouts_give_the_same_rows(data_dir: Path) -> None:
    spec = load_config(shipped_config("isolation_pfn")).features
    muons, _ = read_rows([TreeSource(data_dir / "isolation_muons_000.root", "Muons")], spec)
    events, _ = read_rows([TreeSource(data_dir / "isolation_events_000.root", "Events")], spec)
    for name, tensor in muons.inputs().items():
        np.testing.assert_array_equal(events.inputs()[name], tensor, err_msg=name)
    assert events.label is not None and muons.label is not None
    np.testing.assert_array_equal(events.label, muons.label)


def test_train_command_through_typer(data_dir: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(train_command)
    sets = [
        f"data.train=['{data_dir}/isolation_muons_*.root']",
        f"output_dir={tmp_path / 'run'}",
        "optimizer.epochs=1",
        "model.hidden_sizes=[8]",
    ]
    args = [str(shipped_config("isolation_reliso"))]
    for override in sets:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "best validation AUC" in result.output
    bad = CliRunner().invoke(app, [*args, "--set", "optimizer.epoch=3"])
    assert bad.exit_code == 1
    assert "did you mean 'epochs'" in bad.output


# --- ONNX ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_exports_to_onnx(data_dir: Path, tmp_path: Path, name: str) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    config = small_config(name, data_dir, tmp_path)
    rows, _ = read_rows(
        [TreeSource(data_dir / "isolation_muons_000.root", "Muons")], config.features
    )
    torch.manual_seed(0)
    model = build_model(config.model, config.features, rows).eval()
    example = model_inputs(model, take(rows, np.arange(3, dtype=np.int64)))
    onnx_path = tmp_path / "model.onnx"
    axes = {tensor: {0: "batch"} for tensor in (*model.input_names, "score")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            model,
            example,
            onnx_path,
            input_names=list(model.input_names),
            output_names=["score"],
            dynamic_axes=axes,
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {k: v[:17] for k, v in rows.inputs().items() if k in model.input_names}
    (score,) = session.run(["score"], feed)
    assert score.shape == (17, 1)
    assert [i.name for i in session.get_inputs()] == list(model.input_names)
    assert isinstance(model, BsymModel)


def test_version_1_checkpoints_load_and_unknown_versions_are_refused(
    data_dir: Path, tmp_path: Path
) -> None:
    result = train(small_config("isolation_reliso", data_dir, tmp_path / "run"), progress=False)
    payload = torch.load(result.last, weights_only=True)
    version_1 = {
        key: value
        for key, value in payload.items()
        if key not in ("scheduler_state", "steps", "finished")
    }
    old = tmp_path / "v1.pt"
    torch.save({**version_1, "format_version": 1}, old)
    checkpoint = read_checkpoint(old)
    assert checkpoint.finished and checkpoint.steps == 0 and checkpoint.scheduler_state is None
    assert checkpoint.history == load_checkpoint(result.last).checkpoint.history
    loaded = load_checkpoint(old)
    rows = loaded.held_out_test()
    np.testing.assert_array_equal(
        predict(loaded, rows), predict(load_checkpoint(result.last), rows)
    )
    torch.save({**payload, "format_version": 9}, tmp_path / "v9.pt")
    with pytest.raises(InputFileError, match="checkpoint format 9, this bsym reads 1, 2"):
        read_checkpoint(tmp_path / "v9.pt")
    torch.save({k: v for k, v in payload.items() if k != "best_epoch"}, tmp_path / "cut.pt")
    with pytest.raises(InputFileError, match="the checkpoint has no 'best_epoch'"):
        read_checkpoint(tmp_path / "cut.pt")


class NotData:
    """Something a checkpoint must not hold."""


def test_checkpoints_with_objects_or_cut_short_are_refused_without_torch_hints(
    tmp_path: Path,
) -> None:
    objects = tmp_path / "objects.pt"
    torch.save({"format": "bsym-checkpoint", "model": NotData()}, objects)
    with pytest.raises(InputFileError, match="holds Python objects") as refused:
        read_checkpoint(objects)
    assert "NotData" in str(refused.value) and "weights_only" not in str(refused.value)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(objects.read_bytes()[:100])
    with pytest.raises(InputFileError, match=r"truncated or not written by torch\.save"):
        read_checkpoint(cut)
