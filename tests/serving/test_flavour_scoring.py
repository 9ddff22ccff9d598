"""Scoring a three-class flavour tagger: one jagged branch per class probability and D_b.

The tagger (a small PFN with outputs light, c, b) is trained on a hand-made file of the
PFNano layout and exported with ``bsym export``; it scores another hand-made file, the real
PFNano file and its RNTuple, embedded and through a real Triton server. The friend trees
must hold ``nJet`` equal to the input's and ``Jet_<model>_pu/_pc/_pb/_Db`` equal, jet by
jet and in order, to the checkpoint's own probabilities and the discriminant formula.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from flavour_files import CLASS_LABELS, flavour_config, write_jets

from bsym.discriminant import Discriminant
from bsym.errors import BsymError, ConfigError
from bsym.export.onnx_export import export_to_repository
from bsym.features import build_features, detect_layout, required_branches
from bsym.rootio import TreeSource
from bsym.serving.friend_tree import read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.serving.serve import ServedRepository
from bsym.serving.triton_client import TritonBackend
from bsym.serving.triton_server import find_tritonserver
from bsym.training.checkpoint import load_checkpoint, predict_probabilities
from bsym.training.train import train

MODEL = "flavour_pfn"
BRANCHES = [f"Jet_{MODEL}_{label}" for label in (*CLASS_LABELS, "Db")]
TRAINED_FC = 0.1


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, model repository) of the tagger."""
    folder = tmp_path_factory.mktemp("flavour_tagger")
    jets = write_jets(folder / "train.root", 1500, seed=21)
    checkpoint = train(flavour_config([f"{jets}:Events"], folder / "run"), progress=False)
    repository = folder / "repository"
    export_to_repository(checkpoint.checkpoint, repository)
    return checkpoint.checkpoint, repository


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, nanoaod_dir: Path) -> Path:
    """A hand-made file (with events of no jets) and copies of the real PFNano files."""
    folder = tmp_path_factory.mktemp("flavour_inputs")
    write_jets(folder / "jets.root", 300, seed=22)
    for name in ("pfnano.root", "pfnano_rntuple.root"):
        shutil.copy(nanoaod_dir / name, folder / name)
    return folder


def expected_scores(checkpoint: Path, path: Path, f_c: float) -> tuple[np.ndarray, ...]:
    """nJet, the probabilities [jets, 3] and D_b of the checkpoint, in the file's jet order."""
    loaded = load_checkpoint(checkpoint)
    spec = loaded.spec
    with uproot.open(path) as file:
        tree = file["Events"]
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=False))
    assert layout == "event"
    batch = build_features(arrays, spec, layout)
    probabilities = predict_probabilities(loaded, batch)
    d = Discriminant(f_c=f_c).of(probabilities, CLASS_LABELS)
    return np.asarray(arrays["nJet"]), probabilities, d


def check_friend(output: Path, checkpoint: Path, source: Path, f_c: float) -> int:
    """The friend tree lines up with ``source`` and holds the checkpoint's scores; its jets."""
    n_jet, probabilities, d = expected_scores(checkpoint, source, f_c)
    with uproot.open(output) as file:
        tree = file["Events"]
        assert {"nJet", *BRANCHES} <= set(tree.keys())
        friend = tree.arrays(["nJet", *BRANCHES])
    np.testing.assert_array_equal(np.asarray(friend["nJet"]), n_jet)
    for branch in BRANCHES:
        np.testing.assert_array_equal(ak.num(friend[branch]), n_jet)
    columns = {
        label: ak.to_numpy(ak.flatten(friend[f"Jet_{MODEL}_{label}"])) for label in CLASS_LABELS
    }
    for index, label in enumerate(CLASS_LABELS):
        np.testing.assert_allclose(columns[label], probabilities[:, index], atol=1e-5)
    written = ak.to_numpy(ak.flatten(friend[f"Jet_{MODEL}_Db"]))
    np.testing.assert_allclose(written, d, rtol=1e-4, atol=1e-4)
    return int(n_jet.sum())


def test_embedded_scoring_writes_probabilities_and_db_per_jet(
    tagger: tuple[Path, Path], inputs: Path, tmp_path: Path
) -> None:
    checkpoint, repository = tagger
    model_path = repository / MODEL / "1" / "model.onnx"
    with OnnxRuntimeBackend(model_path, threads=1) as backend:
        assert backend.output_names == ("score",)
        names = ["jets.root", "pfnano.root", "pfnano_rntuple.root"]
        summary = score_files([str(inputs / n) for n in names], backend, tmp_path, progress=False)
    assert not summary.failed and len(summary.scored) == 3
    jets = {
        name: check_friend(
            tmp_path / f"{Path(name).stem}.{MODEL}.root", checkpoint, inputs / name, TRAINED_FC
        )
        for name in names
    }
    assert jets["pfnano.root"] == jets["pfnano_rntuple.root"] > 0
    assert jets["jets.root"] > 300
    recorded = Discriminant.from_metadata(
        read_provenance(tmp_path / f"jets.{MODEL}.root")["discriminant"]
    )
    assert recorded.f_c == TRAINED_FC


def test_fc_is_overridden_at_scoring_and_recorded(
    tagger: tuple[Path, Path], inputs: Path, tmp_path: Path
) -> None:
    checkpoint, repository = tagger
    source = inputs / "jets.root"
    output = tmp_path / f"jets.{MODEL}.root"
    with OnnxRuntimeBackend(repository / MODEL / "1" / "model.onnx", threads=1) as backend:
        score_files([str(source)], backend, tmp_path, progress=False, f_c=0.5)
        check_friend(output, checkpoint, source, 0.5)
        again = score_files([str(source)], backend, tmp_path, progress=False, f_c=0.5)
        assert [r.status for r in again.results] == ["skipped"]
        changed = score_files([str(source)], backend, tmp_path, progress=False)
        assert [r.status for r in changed.results] == ["scored"]
        assert "discriminant" in changed.results[0].note
    check_friend(output, checkpoint, source, TRAINED_FC)


def test_fc_on_a_model_without_discriminant_is_refused(
    trained_models: dict[str, Path], tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    export_to_repository(trained_models["dnn"], repository)
    (model,) = [p for p in repository.iterdir() if p.is_dir()]
    with (
        OnnxRuntimeBackend(model / "1" / "model.onnx", threads=1) as backend,
        pytest.raises(ConfigError, match="has no flavour discriminant"),
    ):
        score_files(["any.root"], backend, tmp_path / "out", progress=False, f_c=0.2)


@pytest.fixture(scope="module")
def served_tagger(tagger: tuple[Path, Path]) -> Iterator[str]:
    """The gRPC URL of a real Triton server serving the tagger's repository."""
    try:
        find_tritonserver()
    except BsymError as error:
        pytest.skip(f"tritonserver unavailable: {error}")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
    with ServedRepository(tagger[1], grpc_port=0, http_port=0) as running:
        yield running.grpc_url


@pytest.mark.triton
def test_triton_scoring_writes_the_same_branches(
    tagger: tuple[Path, Path], served_tagger: str, inputs: Path, tmp_path: Path
) -> None:
    checkpoint, _ = tagger
    names = ["jets.root", "pfnano.root", "pfnano_rntuple.root"]
    with TritonBackend(served_tagger, MODEL, batch_size=256) as backend:
        summary = score_files(
            [str(inputs / n) for n in names], backend, tmp_path, progress=False, f_c=0.3
        )
    assert not summary.failed and len(summary.scored) == 3
    for name in names:
        check_friend(tmp_path / f"{Path(name).stem}.{MODEL}.root", checkpoint, inputs / name, 0.3)


@pytest.fixture(scope="module")
def dips_tagger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, model.onnx, simulated sample) of a small three-class network on the
    shipped DIPS track features, trained on the training layout (tree Jets)."""
    from bsym.simulate.flavour import write_flavour
    from bsym.training.studies.flavour import Row, StudySettings, train_config

    folder = tmp_path_factory.mktemp("dips_tagger")
    write_flavour(folder / "sample", 1500, seed=31)
    row = Row("two-level", {"type": "pfn", "phi_sizes": [16], "f_sizes": [16]}, "flavour_dips")
    settings = StudySettings(max_epochs=2)
    sources = [TreeSource(folder / "sample" / "flavour_jets_000.root", "Jets")]
    config = train_config(row, settings, sources, folder, train_rows=None)
    checkpoint = train(config, progress=False).checkpoint
    repository = folder / "repository"
    parity = [f"{sources[0]}"]
    entry = export_to_repository(checkpoint, repository, parity_data=parity)
    return checkpoint, entry.export.onnx_path, folder / "sample"


def test_two_level_link_scores_align_with_the_training_layout_and_real_pfnano(
    dips_tagger: tuple[Path, Path, Path], inputs: Path, tmp_path: Path
) -> None:
    checkpoint, model_path, sample = dips_tagger
    loaded = load_checkpoint(checkpoint)
    name = loaded.name
    events = sample / "flavour_events_000.root"
    sources = [str(events), str(inputs / "pfnano.root"), str(inputs / "pfnano_rntuple.root")]
    with OnnxRuntimeBackend(model_path, threads=1) as backend:
        summary = score_files(sources, backend, tmp_path, progress=False)
    assert not summary.failed and len(summary.scored) == 3
    # the same jets in the training layout, one entry per jet, in event order
    with uproot.open(sample / "flavour_jets_000.root") as file:
        tree = file["Jets"]
        arrays = tree.arrays(required_branches(loaded.spec, "object", with_label=False))
    flat = predict_probabilities(loaded, build_features(arrays, loaded.spec, "object"))
    with uproot.open(tmp_path / f"flavour_events_000.{name}.root") as file:
        friend = file["Events"].arrays()
    with uproot.open(events) as file:
        n_jet = file["Events"]["nJet"].array(library="np")
    np.testing.assert_array_equal(friend["nJet"], n_jet)
    pb = ak.to_numpy(ak.flatten(friend[f"Jet_{name}_pb"]))
    np.testing.assert_allclose(pb, flat[:, 2], atol=1e-5)
    for stem in ("pfnano", "pfnano_rntuple"):
        with uproot.open(tmp_path / f"{stem}.{name}.root") as file:
            scored = file["Events"].arrays()
        with uproot.open(inputs / f"{stem}.root") as file:
            tree = file["Events"]
            real = tree.arrays(required_branches(loaded.spec, "event", with_label=False))
        expected = predict_probabilities(loaded, build_features(real, loaded.spec, "event"))
        np.testing.assert_array_equal(scored["nJet"], np.asarray(real["nJet"]))
        for index, label in enumerate(CLASS_LABELS):
            column = ak.to_numpy(ak.flatten(scored[f"Jet_{name}_{label}"]))
            np.testing.assert_allclose(column, expected[:, index], atol=1e-5)
        d = ak.to_numpy(ak.flatten(scored[f"Jet_{name}_Db"]))
        np.testing.assert_allclose(d, Discriminant().of(expected, CLASS_LABELS), atol=1e-4)
