"""The coffea integration, with real coffea: NanoEventsFactory in eager, virtual and dask mode,
processor.Runner with its iterative and Dask executors, on the real CMS NanoAOD files and on
simulated event-layout files; scores compared with ``bsym score``'s friend trees."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from conftest import PFN
from typer.testing import CliRunner

from bsym.cli import app
from bsym.configs import shipped_config
from bsym.export.onnx_export import export_to_repository
from bsym.serving.serve import ServedRepository
from bsym.training.config import load_config
from bsym.training.train import train

pytest.importorskip("coffea", reason="needs the coffea extra: pip install 'bsym[coffea]'")

from coffea.nanoevents import BaseSchema, NanoAODSchema, NanoEventsFactory

from bsym.serving.coffea import OnnxModelWrapper, TritonModelWrapper, model_loads

ROOT = Path(__file__).resolve().parents[2]
RELISO = "isolation_reliso"
NANO_FILES = ["nano_dy.root", "nano_dimuon.root"]
# NanoAODSchema warns about cross-references that these (trimmed) files lack
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:coffea.nanoevents.*")

sys.path.insert(0, str(ROOT / "examples"))
import coffea_processor  # noqa: E402

sys.path.remove(str(ROOT / "examples"))


@pytest.fixture(scope="module")
def reliso_repository(isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with isolation_reliso, whose inputs (Muon_pfRelIso03_all and 04) NanoAOD
    has, trained for one epoch on the simulated sample."""
    config = load_config(
        shipped_config(RELISO),
        [
            f"data.train=['{isolation_sample}/isolation_muons_*.root']",
            f"output_dir={tmp_path_factory.mktemp('runs') / RELISO}",
            "optimizer.epochs=1",
            "model.hidden_sizes=[16]",
        ],
    )
    repository = tmp_path_factory.mktemp("reliso_repository")
    export_to_repository(train(config, progress=False).checkpoint, repository)
    return repository


def copied(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copyfile(source, target)
    return target


def bsym_score(path: Path, model: str, out: Path, *options: str) -> ak.Array:
    """The scores ``bsym score`` writes to the friend tree of ``path``, jagged by event."""
    args = ["score", str(path), "--model", model, "--out", str(out), "--no-progress", *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (friend,) = out.glob(f"{path.stem}.*.root")
    with uproot.open(friend) as file:
        tree = file["Events"]
        (branch,) = tree.keys(filter_name="Muon_*")
        return tree[branch].array()


def events(path: Path, mode: str) -> Any:
    # the simulated files are not full NanoAOD (no run number, no muon mass): flat branches
    schema = NanoAODSchema if path.name.startswith("nano") else BaseSchema
    return NanoEventsFactory.from_root(
        {str(path): "Events"}, schemaclass=schema, mode=mode
    ).events()


def assert_same_scores(found: ak.Array, expected: ak.Array) -> None:
    """Entry by entry: ``expected`` holds nMuon scores in every event."""
    assert str(found.type) == f"{len(expected)} * var * float32"
    assert ak.num(found).tolist() == ak.num(expected).tolist()
    np.testing.assert_array_equal(ak.to_numpy(ak.flatten(found)), ak.flatten(expected))


@pytest.mark.parametrize("name", NANO_FILES)
def test_embedded_scores_of_nanoaod_equal_bsym_score(
    nanoaod_dir: Path, reliso_repository: Path, tmp_path: Path, name: str
) -> None:
    path = copied(nanoaod_dir / name, tmp_path)
    expected = bsym_score(path, str(reliso_repository / RELISO / "1" / "model.onnx"), tmp_path)
    wrapper = OnnxModelWrapper(reliso_repository, RELISO)
    # eager mode reads all of NanoAOD's 1,500 branches: once is enough
    for mode in ("eager", "virtual") if name == "nano_dy.root" else ("virtual",):
        chunk = events(path, mode)
        assert ak.num(expected).tolist() == ak.num(chunk.Muon).tolist()
        assert_same_scores(wrapper(chunk), expected)
    lazy = wrapper(events(path, "dask"))
    assert type(lazy).__module__.startswith("dask_awkward")
    assert_same_scores(lazy.compute(), expected)


def test_dask_mode_reads_only_the_feature_specs_branches(
    nanoaod_dir: Path, reliso_repository: Path, tmp_path: Path
) -> None:
    import dask_awkward as dak

    path = copied(nanoaod_dir / "nano_dy.root", tmp_path)
    lazy = OnnxModelWrapper(reliso_repository, RELISO)(events(path, "dask"))
    (columns,) = dak.necessary_columns(lazy).values()
    assert columns == {"nMuon", "Muon_pfRelIso03_all", "Muon_pfRelIso04_all"}


def test_simulated_event_files_and_the_triton_wrapper_equal_bsym_score(
    isolation_sample: Path, served_repository: ServedRepository, tmp_path: Path
) -> None:
    """The PFN (calorimeter cells linked to muons by CaloCell_muonIdx) embedded and through
    the real Triton server, on a simulated event-layout file."""
    path = copied(isolation_sample / "isolation_events_000.root", tmp_path)
    model_file = served_repository.repository / PFN / "1" / "model.onnx"
    expected = bsym_score(path, str(model_file), tmp_path / "embedded")
    served = bsym_score(path, PFN, tmp_path / "triton", "--server", served_repository.grpc_url)
    np.testing.assert_allclose(ak.flatten(served), ak.flatten(expected), rtol=1e-5, atol=1e-6)
    chunk = events(path, "eager")
    assert_same_scores(OnnxModelWrapper(model_file)(chunk), expected)
    triton = TritonModelWrapper(served_repository.grpc_url, PFN)
    assert_same_scores(triton(chunk), served)
    assert_same_scores(triton(events(path, "dask")).compute(), served)


def test_empty_chunk_gives_empty_jagged_scores(
    nanoaod_dir: Path, reliso_repository: Path, tmp_path: Path
) -> None:
    wrapper = OnnxModelWrapper(reliso_repository, RELISO)
    empty = events(copied(nanoaod_dir / "nano_dy_empty.root", tmp_path), "eager")
    assert str(wrapper(empty).type) == "0 * var * float32"
    path = copied(nanoaod_dir / "nano_dy.root", tmp_path)
    no_events = NanoEventsFactory.from_root(
        {str(path): "Events"}, schemaclass=NanoAODSchema, mode="eager", entry_stop=0
    ).events()
    assert str(wrapper(no_events).type) == "0 * var * float32"
    no_muons = events(path, "virtual")[:4]  # the first four events of nano_dy have no muon
    assert ak.num(no_muons.Muon).tolist() == [0, 0, 0, 0]
    assert wrapper(no_muons).tolist() == [[], [], [], []]
    assert str(wrapper(no_muons).type) == "4 * var * float32"


def test_wrapper_pickles_without_its_session_and_loads_once_per_process(
    reliso_repository: Path,
) -> None:
    wrapper = OnnxModelWrapper(reliso_repository, RELISO)
    session = wrapper.backend
    loads = model_loads()
    copy = pickle.loads(pickle.dumps(wrapper))
    assert b"InferenceSession" not in pickle.dumps(wrapper)
    assert copy.backend is session and model_loads() == loads


@pytest.mark.parametrize("executor", ["iterative", "dask"])
def test_example_processor_runs_with_processor_runner(
    nanoaod_dir: Path, reliso_repository: Path, tmp_path: Path, executor: str
) -> None:
    """80 events in 4 chunks of 20; the model is loaded once per process, not per chunk."""
    files = [copied(nanoaod_dir / name, tmp_path) for name in NANO_FILES]
    wrapper = OnnxModelWrapper(reliso_repository, RELISO)
    result = coffea_processor.run(files, wrapper, executor=executor, workers=2, chunksize=20)
    expected = [ak.flatten(wrapper(events(path, "virtual"))) for path in files]
    scores = ak.to_numpy(ak.concatenate(expected))
    assert result["events"] == 80 and result["muons"] == len(scores)
    histogram, _ = np.histogram(scores, bins=coffea_processor.BINS)
    np.testing.assert_array_equal(result["score_histogram"], histogram)
    seen: dict[int, set[int]] = {}
    for pid, loads in result["model_loads"]:
        seen.setdefault(pid, set()).add(loads)
    assert all(len(counts) == 1 for counts in seen.values()), seen  # no reload for a later chunk
    if executor == "dask":
        assert len(seen) == 2 and all(counts == {1} for counts in seen.values()), seen
