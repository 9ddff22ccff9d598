"""Real CMS NanoAOD files (written by CMS software, not by bsym): every command finds their
``Events`` tree, TTree or RNTuple, and the friend trees line up with it entry by entry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot
from conftest import bsym_serve

from bsym.configs import shipped_config
from bsym.export.onnx_export import export_to_repository
from bsym.serving.friend_tree import read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import ScoreSummary, score_files
from bsym.serving.triton_client import TritonBackend
from bsym.training.config import load_config
from bsym.training.train import train

MODEL = "isolation_reliso"  # reads Muon_pfRelIso03_all and Muon_pfRelIso04_all, as NanoAOD has
SCORED = {  # file: (kind of its Events tree, entries)
    "nano_dy.root": ("TTree", 40),
    "nano_dy_rntuple.root": ("RNTuple", 40),
    "nano_dimuon.root": ("TTree", 40),
    "pfnano.root": ("TTree", 10),
    "pfnano_rntuple.root": ("RNTuple", 10),
}
EMPTY = "nano_dy_empty.root"


def cli(*args: str) -> str:
    """Run ``bsym`` as a user would; its stdout and stderr, after checking it succeeded."""
    command = [sys.executable, "-c", "from bsym.cli import app; app()", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def nano(nanoaod_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the NanoAOD files, so that nothing is ever written beside the originals."""
    folder = tmp_path_factory.mktemp("nanoaod")
    for name in [*SCORED, EMPTY]:
        shutil.copy(nanoaod_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reliso_checkpoint(isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        shipped_config(MODEL),
        [
            f"data.train=['{isolation_sample}/isolation_muons_*.root']",
            f"output_dir={tmp_path_factory.mktemp('runs') / MODEL}",
            "optimizer.epochs=1",
            "model.hidden_sizes=[16]",
        ],
    )
    return train(config, progress=False).checkpoint


@pytest.fixture(scope="module")
def reliso_repository(reliso_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("reliso_repository")
    export_to_repository(reliso_checkpoint, repository)
    return repository


def score_each(nano: Path, backend: OnnxRuntimeBackend | TritonBackend, out: Path) -> ScoreSummary:
    summary = score_files(
        [str(nano / name) for name in [*SCORED, EMPTY]], backend, out, progress=False
    )
    assert sorted(r.source for r in summary.scored) == sorted(f"{nano / n}:Events" for n in SCORED)
    assert summary.failed == [(f"{nano / EMPTY}:Events", "is empty (0 entries)")]
    assert not (out / f"nano_dy_empty.{MODEL}.root").exists()
    return summary


def friend_scores(out: Path, name: str) -> ak.Array:
    with uproot.open(out / f"{Path(name).stem}.{MODEL}.root") as file:
        tree = file["Events"]
        assert tree["nMuon"].interpretation.from_dtype == np.dtype(">u4")  # as in NanoAOD
        return tree.arrays()


def test_score_real_nanoaod_embedded_and_with_triton(
    nano: Path, reliso_repository: Path, tmp_path: Path
) -> None:
    onnx = reliso_repository / MODEL / "1" / "model.onnx"
    with OnnxRuntimeBackend(onnx, threads=1) as backend:
        summary = score_each(nano, backend, tmp_path / "embedded")
    for result in summary.scored:
        kind, entries = SCORED[Path(result.output).name.replace(f".{MODEL}", "")]
        name = Path(result.source.removesuffix(":Events")).name
        assert result.reading == f"{name}: reading Events ({kind}, event layout, {entries} entries)"
    command = [sys.executable, "-c", "from bsym.cli import app; app()", "serve"]
    command += ["--repository", str(reliso_repository), "--grpc-port", "0", "--http-port", "0"]
    with (
        bsym_serve([*command, "--instances", "1"]) as serve,
        TritonBackend(serve.url, MODEL) as served,
    ):
        score_each(nano, served, tmp_path / "triton")
    assert serve.process.returncode == 0, serve.output

    for name, (_, entries) in SCORED.items():
        with uproot.open(nano / name) as file:
            source = file["Events"]
            n_muon = source.arrays(["nMuon"])["nMuon"]
            iso = source.arrays(["Muon_pfRelIso04_all"])["Muon_pfRelIso04_all"]
        embedded = friend_scores(tmp_path / "embedded", name)
        triton = friend_scores(tmp_path / "triton", name)
        assert len(embedded) == len(triton) == entries == len(n_muon)
        np.testing.assert_array_equal(embedded["nMuon"], n_muon)
        np.testing.assert_array_equal(ak.num(embedded[f"Muon_{MODEL}"]), n_muon)
        np.testing.assert_array_equal(ak.num(embedded[f"Muon_{MODEL}"]), ak.num(iso))
        assert ak.all(embedded[f"Muon_{MODEL}"] == triton[f"Muon_{MODEL}"])
        provenance = read_provenance(tmp_path / "embedded" / f"{Path(name).stem}.{MODEL}.root")
        assert provenance["source_tree"] == "Events" and provenance["layout"] == "event"
    for ttree, rntuple in [("nano_dy", "nano_dy_rntuple"), ("pfnano", "pfnano_rntuple")]:
        a = friend_scores(tmp_path / "embedded", f"{ttree}.root")
        b = friend_scores(tmp_path / "embedded", f"{rntuple}.root")
        assert ak.all(a[f"Muon_{MODEL}"] == b[f"Muon_{MODEL}"]) and ak.sum(a["nMuon"]) > 0


def test_score_command_says_which_tree_it_read(
    nano: Path, reliso_repository: Path, tmp_path: Path
) -> None:
    common = ["--repository", str(reliso_repository), "--model", MODEL, "--no-progress"]
    output = cli("score", str(nano / "nano_dy_rntuple.root"), *common, "-o", str(tmp_path))
    assert "nano_dy_rntuple.root: reading Events (RNTuple, event layout, 40 entries)" in output


def test_train_and_evaluate_find_the_events_tree(
    nano: Path, reliso_checkpoint: Path, tmp_path: Path
) -> None:
    # the shipped config's spec reads tree Muons; the NanoAOD file has Events and Runs
    output = cli(
        "train", str(shipped_config(MODEL)),
        "--set", f"data.train=['{nano / 'nano_dy.root'}']",
        "--set", f"output_dir={tmp_path / 'run'}",
        "--set", "optimizer.epochs=1", "--set", "data.test_fraction=0",
    )  # fmt: skip
    assert "nano_dy.root: reading Events (TTree, event layout, 40 entries)" in output
    output = cli(
        "evaluate", "--model", str(reliso_checkpoint), "--out", str(tmp_path / "evaluation"),
        "--data", str(nano / "nano_dy.root"), "--data", str(nano / "nano_dy_rntuple.root"),
        "--bootstrap", "2",
    )  # fmt: skip
    assert "nano_dy.root: reading Events (TTree, event layout, 40 entries)" in output
    assert "nano_dy_rntuple.root: reading Events (RNTuple, event layout, 40 entries)" in output
    assert f"{nano / 'nano_dy_rntuple.root'}:Events" in output
    assert ":Muons" not in output
