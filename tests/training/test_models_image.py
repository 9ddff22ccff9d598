"""Image models: in-graph binning, config checks, ONNX parity, scoring ROOT files, training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
import uproot

from bsym.configs import shipped_config
from bsym.errors import ConfigError
from bsym.export.onnx_export import DEFAULT_TOLERANCE, check_parity, export_onnx, to_onnx
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint
from bsym.training.config import TrainConfig, load_config
from bsym.training.models.image import (
    CNN,
    ISOLATION_Y_EDGES,
    ImageBinning,
    ImageFCN,
    UniformEdges,
    edge_values,
)
from bsym.training.train import TrainResult, train

# max pooling here; the rectangular CNN test below covers average pooling
SMALL_CNN = ["model.channels=[4, 8]", "model.dense_sizes=[16]", "model.pooling=max"]
# image_fcn from the CNN config: same features, the model section replaced
SMALL_FCN = [
    "model={type: image_fcn, x_edges: {low: -0.4, high: 0.4, bins: 16},"
    " y_edges: {low: -0.4, high: 0.4, bins: 16}, hidden_sizes: [32], use_globals: true}"
]


def cells(rows: list[list[tuple[float, float, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Constituents [N, P, 3] (value, x, y) and mask from lists of cells, zero padded."""
    width = max(len(row) for row in rows)
    constituents = torch.zeros(len(rows), width, 3)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            constituents[i, j] = torch.tensor(cell)
            mask[i, j] = True
    return constituents, mask


def test_uniform_binning_puts_cells_into_their_pixels() -> None:
    binning = ImageBinning([-1.0, -0.5, 0.0, 0.5, 1.0], [-1.0, 0.0, 1.0])
    constituents, mask = cells(
        [
            [(1.0, -0.9, -0.5), (2.0, 0.2, 0.7), (4.0, 0.3, 0.9)],
            [(8.0, 0.99, -0.01), (16.0, -0.5, 0.0)],
        ]
    )
    image = binning(constituents, mask).reshape(2, 4, 2)
    expected = torch.zeros(2, 4, 2)
    expected[0, 0, 0] = 1.0
    expected[0, 2, 1] = 2.0 + 4.0
    expected[1, 3, 0] = 8.0
    expected[1, 1, 1] = 16.0  # a cell on an inner edge goes to the bin above it
    torch.testing.assert_close(image, expected)


def test_binning_agrees_with_numpy_histogram2d() -> None:
    generator = np.random.default_rng(4)
    x_edges = np.linspace(-0.4, 0.4, 33)
    y_edges = np.array(edge_values(ISOLATION_Y_EDGES))
    values = generator.exponential(size=(50, 40)).astype(np.float32)
    x = generator.uniform(-0.5, 0.5, size=(50, 40)).astype(np.float32)
    y = generator.uniform(-0.5, 0.5, size=(50, 40)).astype(np.float32)
    mask = generator.random((50, 40)) < 0.8
    constituents = torch.from_numpy(np.stack([values, x, y], axis=-1))
    binning = ImageBinning(x_edges.tolist(), y_edges.tolist())
    image = binning(constituents, torch.from_numpy(mask)).reshape(50, 32, 32).numpy()
    for row in range(50):
        expected, _, _ = np.histogram2d(
            x[row][mask[row]],
            y[row][mask[row]],
            bins=[x_edges, y_edges],
            weights=values[row][mask[row]],
        )
        np.testing.assert_allclose(image[row], expected, rtol=1e-5, atol=1e-5)


def test_non_uniform_edges_and_dropped_cells() -> None:
    binning = ImageBinning([0.0, 0.1, 0.5, 2.0], [-1.0, 1.0])
    constituents, mask = cells(
        [
            [
                (1.0, 0.05, 0.0),  # first, narrow bin
                (2.0, 0.45, 0.0),  # second bin
                (4.0, 1.9, 0.0),  # third, wide bin
                (8.0, 2.0, 0.0),  # on the last edge: outside
                (16.0, -0.01, 0.0),  # below the first edge
                (32.0, 0.3, 1.5),  # outside in y
                (64.0, 0.3, 0.0),  # masked below
            ]
        ]
    )
    mask[0, 6] = False
    image = binning(constituents, mask)
    torch.testing.assert_close(image, torch.tensor([[1.0, 2.0, 4.0]]))


def test_uniform_edges_expand_to_the_isolation_cells() -> None:
    edges = edge_values(ISOLATION_Y_EDGES)
    assert len(edges) == 33
    np.testing.assert_allclose(np.diff(edges), math.pi / 126)
    assert edge_values(UniformEdges(low=-1, high=1, bins=4)) == [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("features.constituents.features.0.transform=log", r"transform 'none', not 'log'"),
        (
            "features.constituents.features=[{branch: CaloCell_et}, {branch: CaloCell_eta}]",
            r"at least three features",
        ),
        ("model.x_edges=[0.0, 0.2, 0.1]", r"strictly increasing"),
        ("model.y_edges={low: 1, high: -1, bins: 4}", r"high \(-1.0\) must be above low"),
        ("features.globals=[]", r"use_globals is true but features has no globals"),
    ],
)
def test_config_rejects_images_that_cannot_be_built(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(shipped_config("isolation_cnn"), [override])


def test_rectangular_average_pooled_cnn_exports_with_parity() -> None:
    """The 32×4 "rect" binning of arXiv:2311.05952: the 4-cell axis stops pooling at 1."""
    x_edges = np.linspace(-1, 1, 33).tolist()
    y_edges = np.linspace(-1, 1, 5).tolist()
    model = CNN(1, x_edges, y_edges, [4, 4, 4], 3, [8], "log1p", True, "avg").eval()
    generator = np.random.default_rng(5)
    inputs = {
        "constituents": np.stack(
            [
                generator.exponential(size=(300, 50)),
                generator.uniform(-1.1, 1.1, size=(300, 50)),
                generator.uniform(-1.1, 1.1, size=(300, 50)),
            ],
            axis=-1,
        ).astype(np.float32),
        "mask": generator.random((300, 50)) < 0.7,
        "globals": generator.normal(size=(300, 1)).astype(np.float32),
    }
    proto = to_onnx(model, inputs, model.input_names, ("score",))
    report = check_parity(model, proto, inputs, ("score",))
    assert report.max_abs_diff["score"] <= DEFAULT_TOLERANCE
    assert "AveragePool" in {node.op_type for node in proto.graph.node}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 2000, seed=21)
    return out


def image_config(data_dir: Path, out: Path, model: list[str], epochs: int) -> TrainConfig:
    return load_config(
        shipped_config("isolation_cnn"),
        [
            f"data.train=['{data_dir}/isolation_muons_*.root']",
            f"output_dir={out}",
            "data.test_fraction=0.3",
            f"optimizer.epochs={epochs}",
            *model,
        ],
    )


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    runs = tmp_path_factory.mktemp("runs")
    return {
        "cnn": train(image_config(data_dir, runs / "cnn", SMALL_CNN, 4), progress=False),
        "image_fcn": train(image_config(data_dir, runs / "fcn", SMALL_FCN, 4), progress=False),
    }


@pytest.mark.parametrize("kind", ["cnn", "image_fcn"])
def test_training_learns_to_isolate(trained: dict[str, TrainResult], kind: str) -> None:
    result = trained[kind]
    model = load_checkpoint(result.checkpoint).model
    assert model.kind == kind
    assert isinstance(model, CNN if kind == "cnn" else ImageFCN)
    losses = [record["train_loss"] for record in result.history]
    assert isinstance(losses[0], float) and isinstance(losses[-1], float)
    assert losses[-1] < losses[0]
    assert result.best_val_auc > 0.75


@pytest.mark.parametrize("kind", ["cnn", "image_fcn"])
def test_export_parity_and_scoring_a_root_file(
    trained: dict[str, TrainResult], data_dir: Path, tmp_path: Path, kind: str
) -> None:
    out = tmp_path / f"{kind}.onnx"
    report = export_onnx(trained[kind].checkpoint, out)
    assert 0 <= report.parity.max_abs_diff["score"] <= DEFAULT_TOLERANCE == 1e-4
    model = onnx.load(str(out))
    assert "ScatterElements" in {node.op_type for node in model.graph.node}

    backend = OnnxRuntimeBackend(out, threads=1)
    events = data_dir / "isolation_events_000.root"
    summary = score_files([f"{events}:Events"], backend, tmp_path / "scores", progress=False)
    assert not summary.failed and len(summary.scored) == 1
    with uproot.open(events) as source, uproot.open(summary.scored[0].output) as scored:
        n_muon = source["Events/nMuon"].array(library="np")
        scores = scored["Events"][f"Muon_{backend.name}"].array()
    counts: npt.NDArray[np.int64] = np.asarray([len(row) for row in scores])
    np.testing.assert_array_equal(counts, n_muon)
    flat = np.concatenate([np.asarray(row) for row in scores])
    assert np.all((flat >= 0) & (flat <= 1))
