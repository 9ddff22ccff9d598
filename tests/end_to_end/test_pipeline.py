"""The whole pipeline through the ``bsym`` command line, as a user runs it, on a small sample:
simulate → train → evaluate → export → score (embedded ONNX Runtime) → serve (a real Triton
server) → score --server; the two backends must write the same scores."""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import uproot
from conftest import bsym_serve
from typer.testing import CliRunner

from bsym.cli import app
from bsym.configs import shipped_config
from bsym.errors import BsymError
from bsym.serving.friend_tree import Provenance, read_provenance
from bsym.serving.triton_server import find_tritonserver, free_ports

pytestmark = pytest.mark.triton

MODEL = "isolation_pfn"
TOLERANCE = 1e-5
"""Largest allowed |Triton − embedded ONNX Runtime| on a score (the same model.onnx)."""
SMALL = ["optimizer.epochs=2", "model.phi_sizes=[16, 16]", "model.f_sizes=[16]"]


def bsym(*args: str) -> str:
    """Run one ``bsym`` command in this process; it must succeed. Returns its output."""
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    assert result.exit_code == 0, f"bsym {' '.join(args)}:\n{result.output}"
    return result.output


def scores(directory: Path, source: Path) -> np.ndarray:
    with uproot.open(directory / f"{source.stem}.{MODEL}.root") as file:
        return np.asarray(file["Muons"][MODEL].array(library="np"))


def test_simulate_train_evaluate_export_score_serve_score(tmp_path: Path) -> None:
    data, run, repository = tmp_path / "data", tmp_path / "run", tmp_path / "model_repository"
    bsym("simulate", "isolation", "--events", "1500", "--seed", "4", "--out", str(data))
    source = data / "isolation_muons_000.root"
    assert source.is_file() and (data / "isolation_events_000.root").is_file()

    sets = [f"data.train=['{data}/isolation_muons_*.root']", f"output_dir={run}", *SMALL]
    bsym("train", str(shipped_config(MODEL)), *(f"--set={s}" for s in sets))
    checkpoint = run / "checkpoint.pt"
    assert checkpoint.is_file() and (run / "last.pt").is_file() and (run / "config.yaml").is_file()

    table = bsym("evaluate", "--model", str(checkpoint), "--out", str(tmp_path / "eval"))
    assert MODEL in table and "AUC" in table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    (evaluated,) = metrics["models"]
    assert evaluated["name"] == MODEL and 0.5 < evaluated["auc"] <= 1
    assert (tmp_path / "eval" / "roc.png").is_file()

    bsym("export", str(checkpoint), "--repository", str(repository))
    assert (repository / MODEL / "1" / "model.onnx").is_file()
    assert (repository / MODEL / "config.pbtxt").is_file()

    common = [str(source), "--model", MODEL, "--no-progress"]
    bsym("score", *common, "--repository", str(repository), "-o", str(tmp_path / "embedded"))
    embedded = scores(tmp_path / "embedded", source)
    with uproot.open(source) as file:
        assert len(embedded) == file["Muons"].num_entries
    assert np.all((embedded >= 0) & (embedded <= 1))
    provenance = read_provenance(tmp_path / "embedded" / f"{source.stem}.{MODEL}.root")
    assert {f.name for f in fields(Provenance) if f.default is MISSING} <= set(provenance)
    assert provenance["model_name"] == MODEL and provenance["source_entries"] == str(len(embedded))

    try:
        find_tritonserver()
    except BsymError as error:  # only where nvidia-pytriton (Linux wheels only) is missing
        pytest.skip(f"tritonserver unavailable: {error}")
    grpc_port, http_port = free_ports(2)
    command = [
        str(Path(sys.executable).with_name("bsym")),
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--instances",
        "1",
        "--startup-timeout",
        "90",
    ]
    with bsym_serve(command) as serve:
        assert serve.url == f"127.0.0.1:{grpc_port}" and serve.servers
        bsym("score", *common, "--server", serve.url, "-o", str(tmp_path / "triton"))
    assert serve.process.returncode == 0, serve.output
    assert "server stopped" in serve.output
    assert not serve.left_running, "bsym serve left its Triton server running"

    served = scores(tmp_path / "triton", source)
    assert served.shape == embedded.shape
    assert np.max(np.abs(served - embedded)) <= TOLERANCE
    assert read_provenance(tmp_path / "triton" / f"{source.stem}.{MODEL}.root") == provenance
