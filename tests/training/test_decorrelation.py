"""Decorrelation: gradient reversal, distance correlation, the adversary's own training state,
the config's checks, and a decorrelated model's export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from test_fit import LinearClassifier, blobs
from test_train import SMALL, assert_same_state, small_config, state

from bsym.errors import ConfigError
from bsym.export.onnx_export import export_onnx
from bsym.rootio import TreeSource
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint, predict, read_checkpoint
from bsym.training.cwola import SupervisionConfig, read_cwola_rows
from bsym.training.dataset import load_training_data
from bsym.training.decorrelation import (
    AdversaryConfig,
    AdversaryTerm,
    DecorrelationConfig,
    DiscoTerm,
    distance_correlation,
    reverse_gradient,
)
from bsym.training.fit import OptimizerConfig, Rows, fit
from bsym.training.losses import LossBatch, TrainedTerm
from bsym.training.train import train

ADVERSARY = [
    "decorrelation.method=adversary",
    "decorrelation.variable=dimuon_mass",
    "decorrelation.strength=2.0",
    "decorrelation.classes=all",
    "decorrelation.adversary={components: 4, hidden_sizes: [8], pretrain_epochs: 2, steps: 2}",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 800 simulated muons in both layouts."""
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 400, seed=3)
    return out


def test_gradient_reversal_flips_the_sign_of_the_gradient() -> None:
    x = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    (plain,) = torch.autograd.grad((x**3).sum(), x)
    reversed_ = reverse_gradient(x)
    torch.testing.assert_close(reversed_, x)
    (flipped,) = torch.autograd.grad((reversed_**3).sum(), x)
    torch.testing.assert_close(flipped, -plain)
    assert not torch.equal(plain, torch.zeros(3))


def test_distance_correlation_of_independent_and_identical_variables() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2000, generator=generator, dtype=torch.float64)
    y = torch.rand(2000, generator=generator, dtype=torch.float64)
    weight = torch.rand(2000, generator=generator, dtype=torch.float64) + 0.1
    assert float(distance_correlation(x, y)) < 0.005
    assert float(distance_correlation(x, y, weight)) < 0.005
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-9)
    assert float(distance_correlation(x, 3 * x - 1, weight)) == pytest.approx(1.0, abs=1e-9)
    # dependent but uncorrelated: Pearson's r is 0, the distance correlation is not
    centred = x - 0.5
    assert float(distance_correlation(centred, centred**2)) > 0.2


def test_distance_correlation_weights_count_as_repeated_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(50, generator=generator, dtype=torch.float64)
    y = x + 0.3 * torch.rand(50, generator=generator, dtype=torch.float64)
    counts = torch.randint(1, 4, (50,), generator=generator)
    repeated = distance_correlation(x.repeat_interleave(counts), y.repeat_interleave(counts))
    weighted = distance_correlation(x, y, counts.to(torch.float64))
    torch.testing.assert_close(weighted, repeated)
    assert not torch.isclose(weighted, distance_correlation(x, y))


def correlated_blobs(n: int, *, seed: int) -> Rows:
    """Blobs whose first input is the 'mass' extra plus noise; the second input separates
    the classes as well and is independent of the mass."""
    rows = blobs(n, 2, seed=seed)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    mass = rows.inputs[0][:, 0] + 0.1 * noise
    scaled = (mass - mass.min()) / (mass.max() - mass.min())
    return Rows(rows.inputs, rows.label, None, extras={"mass": scaled})


def dcorr_of(model: LinearClassifier, rows: Rows) -> float:
    with torch.no_grad():
        score = torch.sigmoid(model.logits(*rows.inputs)[:, 0])
    background = torch.from_numpy(rows.label == 0)
    return float(distance_correlation(score[background], rows.extras["mass"][background]))


@pytest.mark.parametrize("method", ["disco", "adversary"])
def test_decorrelation_lowers_the_background_score_mass_correlation(method: str) -> None:
    train_rows, validation = correlated_blobs(800, seed=1), correlated_blobs(400, seed=2)
    schedule = OptimizerConfig(lr=0.03, batch_size=100, epochs=6)
    correlations = {}
    for strength in (0.0, 5.0):
        config = DecorrelationConfig(method=method, variable="mass", strength=strength)
        if method == "adversary":
            strong = AdversaryConfig(lr=1e-2, steps=5, pretrain_epochs=20)
            config = config.model_copy(update={"adversary": strong})
        term = DiscoTerm(config) if method == "disco" else AdversaryTerm(config, seed=0)
        torch.manual_seed(0)
        model = LinearClassifier(4, 1)
        fit(model, train_rows, validation, schedule, seed=0, terms=[term], keep_last=True)
        correlations[strength] = dcorr_of(model, validation)
    assert correlations[5.0] < 0.2 * correlations[0.0], correlations


def test_the_adversary_is_pretrained_and_optimised_by_its_own_optimiser() -> None:
    config = DecorrelationConfig(method="adversary", variable="mass", strength=1.0)
    term = AdversaryTerm(config, seed=0)
    assert isinstance(term, TrainedTerm) and not isinstance(DiscoTerm(config), TrainedTerm)
    initial = {k: v.clone() for k, v in term.network.state_dict().items()}
    rows = correlated_blobs(300, seed=3)
    batch = LossBatch(rows.inputs, torch.from_numpy(rows.label), None, 1, rows.extras)
    logits = torch.randn(300, 1, generator=torch.Generator().manual_seed(0))
    before = float(term.loss(torch.sigmoid(logits[:, 0]), batch).detach())
    term.pretrain(logits, batch)
    after = float(term.loss(torch.sigmoid(logits[:, 0]), batch).detach())
    assert term.pretrained and after < before
    changed = [k for k, v in term.network.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed == list(initial)
    saved = term.state_dict()
    again = AdversaryTerm(config, seed=5)
    again.load_state_dict(saved)
    assert again.pretrained
    assert_same_state(dict(again.network.state_dict()), dict(term.network.state_dict()))
    assert again.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()


def test_a_resumed_adversarial_run_repeats_an_uninterrupted_one(
    data_dir: Path, tmp_path: Path
) -> None:
    small = ["model.hidden_sizes=[16]", *ADVERSARY]
    full = train(
        small_config("isolation_cones", data_dir, tmp_path / "full", "optimizer.epochs=3", *small),
        progress=False,
    )
    first = train(
        small_config("isolation_cones", data_dir, tmp_path / "part", *small), progress=False
    )
    saved = read_checkpoint(first.last).term_states
    assert len(saved) == 1 and saved[0]["pretrained"] and saved[0]["optimizer"]["state"]
    resumed = train(
        small_config("isolation_cones", data_dir, tmp_path / "part", "optimizer.epochs=3", *small),
        resume=first.last,
        progress=False,
    )
    assert resumed.history == full.history
    # decorrelated runs keep their last epoch, not the best validation AUC
    assert resumed.best_epoch == 3
    assert_same_state(state(resumed.last), state(full.last))
    end, uninterrupted = read_checkpoint(resumed.last), read_checkpoint(full.last)
    assert_same_state(end.term_states[0]["network"], uninterrupted.term_states[0]["network"])
    assert not read_checkpoint(resumed.checkpoint).term_states


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("decorrelation.method=pivot", "decorrelation.method: Input should be 'adversary' or"),
        ("decorrelation.strength=-1", "decorrelation.strength: Input should be greater than"),
        ("decorrelation.classes=signal", "decorrelation.classes: Input should be 'background'"),
        ("decorrelation.methd=disco", "unknown key 'decorrelation.methd'; did you mean 'method'?"),
        ("decorrelation.adversary.steps=0", "decorrelation.adversary.steps: Input should be"),
        ("decorrelation.adversary.components=3", "method is 'disco'; remove it"),
        ("augmentation.mode=post_detector", "decorrelation and augmentation do not combine"),
    ],
)
def test_bad_decorrelation_configs_are_explained(
    data_dir: Path, tmp_path: Path, override: str, expected: str
) -> None:
    disco = ["decorrelation.method=disco", "decorrelation.variable=m", "decorrelation.strength=1"]
    with pytest.raises(ConfigError) as error:
        small_config("isolation_cones", data_dir, tmp_path, *SMALL["isolation_cones"],
                     *disco, override)  # fmt: skip
    assert expected in str(error.value)


def test_a_missing_variable_branch_is_named(data_dir: Path, tmp_path: Path) -> None:
    overrides = [*ADVERSARY, "decorrelation.variable=dimuon_mas"]
    config = small_config("isolation_cones", data_dir, tmp_path, *overrides)
    with pytest.raises(Exception, match="dimuon_mas") as error:
        train(config, progress=False)
    assert "Error" in type(error.value).__name__


@pytest.mark.parametrize("method", ["disco", "adversary"])
def test_a_decorrelated_model_exports_with_parity(
    data_dir: Path, tmp_path: Path, method: str
) -> None:
    overrides = [*ADVERSARY, "data.test_fraction=0.3"]
    if method == "disco":
        overrides = [*ADVERSARY[1:4], "decorrelation.method=disco", "data.test_fraction=0.3"]
    config = small_config("isolation_cones", data_dir, tmp_path / "run", *overrides)
    result = train(config, progress=False)
    out = tmp_path / "model.onnx"
    report = export_onnx(result.checkpoint, out)
    assert report.parity.worst <= 1e-4
    loaded = load_checkpoint(result.checkpoint)
    batch = loaded.held_out_test()
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    # the graph is the classifier's alone: its inputs are the model's, nothing of an adversary
    assert [i.name for i in session.get_inputs()] == list(loaded.model.input_names)
    feed = {name: batch.inputs()[name] for name in loaded.model.input_names}
    (score,) = session.run(["score"], feed)
    np.testing.assert_allclose(score[:, 0], predict(loaded, batch), atol=1e-5)


@pytest.mark.parametrize("supervision", ["truth", "select", "cwola"])
def test_the_variable_is_read_for_the_training_rows_in_their_order(
    data_dir: Path, tmp_path: Path, supervision: str
) -> None:
    labels = {
        "truth": ["supervision.type=truth"],
        "select": ["supervision.type=truth", "supervision.select=true"],
        "cwola": ["supervision.type=cwola"],
    }[supervision]
    values = {}
    for layout, tree in (("muons", "Muons"), ("events", "Events")):
        inputs = [f"data.train=['{data_dir}/isolation_{layout}_000.root']", f"data.tree={tree}"]
        config = small_config("isolation_cones", data_dir, tmp_path, *ADVERSARY, *labels, *inputs)
        data = load_training_data(config)
        values[layout] = data.extras["dimuon_mass"]
        assert values[layout].shape == (data.batch.n_rows,)
    np.testing.assert_array_equal(values["muons"], values["events"])
    if supervision != "truth":  # the CWoLa rows: their masses, read on their own path
        sources = [TreeSource(data_dir / "isolation_muons_000.root", "Muons")]
        rows = read_cwola_rows(sources, config.features, SupervisionConfig(type="cwola"))
        np.testing.assert_array_equal(values["muons"], rows.mass)
