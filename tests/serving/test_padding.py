"""No wasted padding: models take any constituent count up to their maximum, the scorer cuts
each batch (or group of rows of similar count) to its longest row, and the scores are those
of full padding, in input order."""

from __future__ import annotations

import json
from pathlib import Path

import awkward as ak
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import uproot

from bsym import contract
from bsym.configs import shipped_config
from bsym.export.onnx_export import to_onnx
from bsym.export.triton.common import Flavour
from bsym.export.triton.description import DYNAMIC, describe_onnx
from bsym.export.triton.render import render_config
from bsym.features import (
    SLOT_QUANTUM,
    FeatureSpec,
    build_features,
    detect_layout,
    narrowed,
    request_width,
    required_branches,
    slot_lengths,
)
from bsym.serving.backend import dynamic_constituents
from bsym.serving.defaults import Padding
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.training.config import load_config
from bsym.training.models.lorentz import UnconstrainedNet
from bsym.training.models.sets import PFN

NAME = "pad_pfn"


def cell_spec(max_count: int) -> FeatureSpec:
    """The shipped isolation PFN's features, with ``max_count`` cells."""
    config = load_config(
        shipped_config("isolation_pfn"), [f"features.constituents.max_count={max_count}"]
    )
    return config.features


def export_pfn(path: Path, spec: FeatureSpec, sample: Path) -> Path:
    """A PFN with random weights, standardised on the sample, exported as bsym exports."""
    with uproot.open(sample / "isolation_muons_000.root") as file:
        tree = file["Muons"]
        arrays = tree.arrays(required_branches(spec, "object", with_label=False))
    batch = build_features(arrays, spec, "object")
    torch.manual_seed(3)
    model = PFN(3, 1, [32, 32], [32]).eval()
    model.prepare(batch)
    proto = to_onnx(model, batch.inputs(), model.input_names, ("score",))
    props = {
        contract.FEATURE_SPEC_KEY: spec.to_json(),
        contract.MODEL_NAME_KEY: NAME,
        contract.CLASS_LABELS_KEY: json.dumps(["prompt"]),
    }
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module", params=[32, 128], ids=["32cells", "128cells"])
def pfn_path(
    request: pytest.FixtureRequest, isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    max_count: int = request.param
    out = tmp_path_factory.mktemp("pad") / f"pfn{max_count}.onnx"
    return export_pfn(out, cell_spec(max_count), isolation_sample)


def reference_scores(model: Path, source: Path, tree_name: str) -> np.ndarray:
    """Every row of ``source`` padded in full, in file order, straight through ONNX Runtime."""
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    spec = FeatureSpec.from_json(session.get_modelmeta().custom_metadata_map["bsym_feature_spec"])
    with uproot.open(source) as file:
        tree = file[tree_name]
        layout = detect_layout(tree.keys(), spec)
        batch = build_features(
            tree.arrays(required_branches(spec, layout, with_label=False)), spec, layout
        )
    assert batch.constituents is not None
    assert batch.constituents.shape[1] == spec.constituents.max_count  # type: ignore[union-attr]
    (score,) = session.run(["score"], batch.inputs())
    return np.asarray(score[:, 0])


def test_exported_pfn_has_a_dynamic_constituent_axis(pfn_path: Path) -> None:
    session = onnxruntime.InferenceSession(pfn_path, providers=["CPUExecutionProvider"])
    shapes = {node.name: node.shape for node in session.get_inputs()}
    assert shapes["constituents"][1] == shapes["mask"][1] == "constituents"
    assert isinstance(shapes["constituents"][2], int)
    assert dynamic_constituents(OnnxRuntimeBackend(pfn_path))


@pytest.mark.parametrize(
    ("name", "tree"), [("isolation_muons_000", "Muons"), ("isolation_events_001", "Events")]
)
def test_every_padding_gives_the_scores_of_full_padding_in_input_order(
    pfn_path: Path, isolation_sample: Path, tmp_path: Path, name: str, tree: str
) -> None:
    source = isolation_sample / f"{name}.root"
    expected = reference_scores(pfn_path, source, tree)
    # Small groups, so that one slice holds many groups of different widths.
    backend = OnnxRuntimeBackend(pfn_path, threads=1, batch_size=97)
    branch = NAME if tree == "Muons" else f"Muon_{NAME}"
    found = {}
    for padding in Padding:
        out = tmp_path / padding
        summary = score_files([f"{source}:{tree}"], backend, out, progress=False, padding=padding)
        assert not summary.failed, summary.failed
        with uproot.open(summary.scored[0].output) as file:
            scores = file[tree][branch].array(library="ak")
        found[padding] = np.asarray(scores if tree == "Muons" else ak.flatten(scores))
    assert len(expected) > 1000
    for padding, scores in found.items():
        assert scores.shape == expected.shape, padding
        assert np.max(np.abs(scores - expected)) < 1e-5, padding
    # the rows really were reordered by the grouping: a sorted order would differ
    assert not np.allclose(np.sort(expected), expected)


def test_groups_are_narrower_than_the_maximum(pfn_path: Path, isolation_sample: Path) -> None:
    """What the backend is given: every group cut to its own longest row rounded up to a
    multiple of SLOT_QUANTUM slots, none wider."""
    seen: list[tuple[int, int]] = []

    class Recording(OnnxRuntimeBackend):
        def predict(self, inputs):  # type: ignore[no-untyped-def]
            mask = inputs["mask"]
            seen.append((mask.shape[1], int(slot_lengths(mask).max(initial=0))))
            return super().predict(inputs)

    backend = Recording(pfn_path, threads=1, batch_size=128)
    max_count = backend.feature_spec.constituents.max_count  # type: ignore[union-attr]
    source = f"{isolation_sample / 'isolation_muons_001.root'}:Muons"
    summary = score_files([source], backend, isolation_sample / "out_groups", progress=False)
    assert not summary.failed
    widths = [width for width, _ in seen[1:]]  # the first call is the probe of one row
    assert all(width == request_width(longest, max_count) for width, longest in seen[1:])
    assert all(width % SLOT_QUANTUM == 0 or width == max_count for width in widths)
    assert max(widths) <= max_count
    if max_count == 128:  # most muons have fewer; with 32 cells most have 32 or more
        assert min(widths) < 48 and len(set(widths)) > 1


def test_a_fixed_axis_model_is_always_padded(tmp_path: Path) -> None:
    """The Lorentz networks index both muon slots, so they keep a fixed axis of 2."""
    model = UnconstrainedNet().eval()
    mask = np.ones((8, 2), dtype=np.bool_)
    inputs = {"constituents": np.ones((8, 2, 4), np.float32), "mask": mask}
    proto = to_onnx(model, inputs, model.input_names, ("score",))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [2, 4]


def test_slot_lengths_and_narrowed() -> None:
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=np.bool_)
    assert slot_lengths(mask).tolist() == [2, 0, 3, 4]
    tensors = {
        "constituents": np.arange(16 * 2, dtype=np.float32).reshape(4, 4, 2),
        "mask": mask,
        "globals": np.arange(4, dtype=np.float32)[:, None],
    }
    cut = narrowed(tensors, 3, np.array([2, 0]))
    assert cut["constituents"].shape == (2, 3, 2) and cut["mask"].shape == (2, 3)
    assert cut["constituents"].flags.c_contiguous
    assert cut["globals"][:, 0].tolist() == [2.0, 0.0]
    assert cut["mask"].tolist() == [[True, False, True], [True, True, False]]
    np.testing.assert_array_equal(cut["constituents"][0], tensors["constituents"][2, :3])


def test_triton_request_widths() -> None:
    assert SLOT_QUANTUM == 8
    assert [request_width(n, 32) for n in (0, 1, 8, 9, 31, 32)] == [8, 8, 8, 16, 32, 32]
    assert request_width(5, 6) == 6
    assert len({request_width(n, 32) for n in range(33)}) == 4


def test_triton_config_of_a_dynamic_model(pfn_path: Path) -> None:
    model = describe_onnx(pfn_path, NAME)
    dims = {tensor.name: tensor.dims for tensor in model.inputs}
    assert dims == {"constituents": (DYNAMIC, 3), "mask": (DYNAMIC,), "globals": (1,)}
    text = render_config(model, Flavour.production)
    assert "dims: [ -1, 3 ]" in text and "dims: [ -1 ]" in text


def test_python_backend_runs_requests_of_several_widths(pfn_path: Path) -> None:
    """Requests cut to different widths reach one execute call; each gets its own rows."""
    from bsym.serving.triton_backend.model import make_session, run_batched

    session = make_session(pfn_path)
    rng = np.random.default_rng(1)
    requests = []
    for rows, width in ((5, 8), (3, 16), (4, 8), (2, 1)):
        mask = np.ones((rows, width), dtype=np.bool_)
        constituents = rng.normal(size=(rows, width, 3)).astype(np.float32)
        globals_ = rng.normal(size=(rows, 1)).astype(np.float32)
        requests.append({"constituents": constituents, "mask": mask, "globals": globals_})
    answers = run_batched(session, requests, ["score"])
    for request, answer in zip(requests, answers, strict=True):
        (alone,) = session.run(["score"], request)
        assert answer["score"].shape == alone.shape
        np.testing.assert_allclose(answer["score"], alone, atol=1e-6)
