"""``bsym score --dask``: a real Dask LocalCluster of 2 worker processes scoring real ROOT
files with the real PFN (ONNX Runtime here, or the real Triton server)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import typer
import uproot
from conftest import PFN
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from bsym.serving.cli import score_command
from bsym.serving.defaults import DEFAULT_STEP_SIZE
from bsym.serving.distributed import (
    BackendSettings,
    ScoreSettings,
    models_opened,
    score_files_distributed,
)
from bsym.serving.friend_tree import read_provenance
from bsym.serving.scorer import model_file_identity, score_files
from bsym.serving.serve import ServedRepository
from bsym.simulate.isolation import write_isolation

PARTIAL = re.compile(r"\.(\d+)\.[0-9a-f]{16}\.partial$")


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("score")(score_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the 'score' name
    return app


def score_cli(*args: str) -> str:
    result = CliRunner().invoke(cli_app(), ["score", *args, "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_outputs(serial: Path, distributed: Path) -> None:
    """The same files, every branch and entry equal, the same provenance strings."""
    names = sorted(p.name for p in serial.iterdir())
    assert sorted(p.name for p in distributed.iterdir()) == names
    for name in names:
        if not name.endswith(".root"):
            assert (serial / name).read_text() == (distributed / name).read_text(), name
            continue
        with uproot.open(serial / name) as a, uproot.open(distributed / name) as b:
            (tree,) = {key.split(";")[0] for key in a.keys(filter_classname="TTree")}
            left, right = a[tree], b[tree]
            branches = left.keys()
            assert branches == right.keys() and left.num_entries == right.num_entries
            for branch in branches:
                x, y = left[branch].array(library="np"), right[branch].array(library="np")
                if x.dtype == object:
                    x, y = np.concatenate(x), np.concatenate(y)
                np.testing.assert_array_equal(x, y, err_msg=f"{name}:{branch}")
        assert read_provenance(serial / name) == read_provenance(distributed / name)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as running,
    ):
        yield running


def pfn_settings(
    model_repository: Path, *, step_size: int | str = DEFAULT_STEP_SIZE
) -> ScoreSettings:
    backend = BackendSettings(str(model_repository / PFN / "1" / "model.onnx"), threads=1)
    with backend.open() as opened:
        return ScoreSettings(backend, model_file_identity(opened)[1], step_size=step_size)


def score_on(
    client: Client, inputs: list[str], settings: ScoreSettings, out: Path
) -> tuple[int, int, list[tuple[str, str]]]:
    with settings.backend.open() as backend:
        summary = score_files_distributed(inputs, backend, settings, out, client, progress=False)
    assert summary.workers == 2
    return len(summary.scored), len(summary.skipped), summary.failed


def test_local_2_outputs_equal_the_serial_run(
    model_repository: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    inputs = [str(isolation_sample / "*.root")]
    common = ["--model", PFN, "--repository", str(model_repository)]
    score_cli(*inputs, *common, "--threads", "1", "--out", str(tmp_path / "serial"))
    output = score_cli(*inputs, *common, "--dask", "local:2", "--out", str(tmp_path / "dask"))
    text = output.replace("\n", "")
    assert "4 scored, 0 skipped, 0 failed" in text and "on 2 Dask workers" in text
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")


def test_rerun_skips_and_a_bad_file_fails_alone(
    client: Client, model_repository: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "in" / "broken.root"
    bad.parent.mkdir()
    bad.write_bytes(b"not a ROOT file at all" * 100)
    inputs = [str(isolation_sample / "isolation_muons_*.root"), str(bad)]
    settings = pfn_settings(model_repository)
    out = tmp_path / "out"
    scored, skipped, failed = score_on(client, inputs, settings, out)
    assert (scored, skipped) == (2, 0)
    assert [source for source, _ in failed] == [str(bad)]
    assert "not a readable ROOT file" in failed[0][1]
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert score_on(client, inputs[:1], settings, out) == (0, 2, [])
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_unreachable_scheduler_is_named(
    model_repository: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    result = CliRunner().invoke(
        cli_app(),
        [
            "score",
            str(isolation_sample / "isolation_muons_000.root"),
            *("--model", PFN, "--repository", str(model_repository)),
            *("--out", str(tmp_path / "out"), "--dask", address, "--dask-timeout", "2"),
        ],
    )
    assert result.exit_code == 1, result.output
    text = result.output.replace("\n", "")
    assert f"no Dask scheduler answered at {address} within 2 s" in text
    assert not (tmp_path / "out").exists()


def test_a_killed_worker_s_file_is_scored_elsewhere(
    client: Client, model_repository: Path, tmp_path: Path
) -> None:
    # Small reads make each file take seconds, so the kill lands while files are written.
    files = write_isolation(tmp_path / "in", 24_000, seed=5, events_per_file=6_000)
    inputs = [str(path) for path in files if "muons" in path.name]
    settings = pfn_settings(model_repository, step_size=100)
    with settings.backend.open() as backend:
        score_files(inputs, backend, tmp_path / "serial", step_size=100, progress=False)
    out = tmp_path / "dask"
    workers = set(client.run(os.getpid).values())
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(score_on, client, inputs, settings, out)
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and not running.done():
            partials = [PARTIAL.search(p.name) for p in out.glob(".*.partial")]
            pids = {int(m.group(1)) for m in partials if m is not None} & workers
            victim = min(pids) if pids else None
            time.sleep(0.05)
        assert victim is not None, "no worker was seen writing"
        os.kill(victim, signal.SIGKILL)
        assert running.result(timeout=300) == (len(inputs), 0, [])
    assert victim not in set(client.run(os.getpid).values())
    assert not list(out.glob(".*.partial"))
    assert_same_outputs(tmp_path / "serial", out)


def test_workers_send_to_one_triton_server(
    client: Client,
    served_repository: ServedRepository,
    model_repository: Path,
    isolation_sample: Path,
    tmp_path: Path,
) -> None:
    inputs = [str(isolation_sample / "*.root")]
    url = served_repository.grpc_url
    backend = BackendSettings(PFN, server=url)
    with backend.open() as remote:
        settings = ScoreSettings(backend, model_file_identity(remote)[1])
        score_files(inputs, remote, tmp_path / "serial", progress=False)
    before = sum(client.run(models_opened).values())
    assert score_on(client, inputs, settings, tmp_path / "dask") == (4, 0, [])
    assert 1 <= sum(client.run(models_opened).values()) - before <= 2  # once a worker, 4 files
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")


@pytest.mark.parametrize("dask", ["local:0", "local:two", "scheduler:8786"])
def test_a_malformed_dask_address_is_refused(
    dask: str, model_repository: Path, isolation_sample: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli_app(),
        [
            "score",
            str(isolation_sample / "isolation_muons_000.root"),
            *("--model", PFN, "--repository", str(model_repository)),
            *("--out", str(tmp_path / "out"), "--dask", dask),
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"'{dask}': expected" in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()
