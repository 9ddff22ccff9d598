"""Scoring through a real Triton server: parity with ONNX Runtime, faults, the CLI, the API.

One session-scoped server (``bsym serve``'s machinery on free loopback ports) serves a
repository with a model of every type the project trains (PFN, DNN on cones, cone cut),
trained for one epoch on a small simulated sample and exported with ``bsym export`` in the
production flavour; the server runs the cpu flavour derived from it. Scores from Triton must
equal the embedded ONNX Runtime backend's within ``TOLERANCE``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from conftest import BAD_SPEC, DUAL, MODEL_TYPES, PFN, bsym_serve
from typer.testing import CliRunner, Result

from bsym.contract import CONFIG_FILENAME, LABELS_FILENAME
from bsym.errors import BsymError, ConfigError, ServerError, SpecMismatchError
from bsym.export.triton.common import Flavour
from bsym.export.triton.parse import model_from_config, parse_config
from bsym.export.triton.render import render_config
from bsym.export.triton.repository import derive_repository
from bsym.features import build_features, detect_layout, required_branches
from bsym.serving import TritonModel
from bsym.serving.friend_tree import read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.serving.serve import ServedRepository
from bsym.serving.triton_client import TritonBackend
from bsym.serving.triton_server import find_tritonserver, free_ports
from bsym.simulate.isolation import write_isolation

pytestmark = pytest.mark.triton

try:
    find_tritonserver()
except BsymError as error:  # only where nvidia-pytriton (Linux wheels only) is not installed
    pytest.skip(f"tritonserver unavailable: {error}", allow_module_level=True)
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
"""Largest allowed |Triton − embedded ONNX Runtime| on any output value: the same model.onnx
runs in both, but the dynamic batcher may run a row in a batch of another size."""
MODELS = [name for name, _ in MODEL_TYPES.values()]


@dataclass(frozen=True)
class Served:
    url: str
    repository: Path
    data: Path


def run_cli(*args: str) -> Result:
    from bsym.cli import app

    return CliRunner().invoke(app, list(args))


def cli_process(*args: str) -> list[str]:
    """A command line running ``bsym`` in a fresh interpreter."""
    return [sys.executable, "-c", "from bsym.cli import app; app()", *args]


def embedded(repository: Path, model: str) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(repository / model / "1" / "model.onnx", threads=1)


@pytest.fixture(scope="session")
def served(served_repository: ServedRepository, isolation_sample: Path) -> Served:
    return Served(served_repository.grpc_url, served_repository.repository, isolation_sample)


def muon_batch(data_dir: Path, model: str, repository: Path) -> dict[str, Any]:
    """The model's input tensors for every muon of the object-layout file."""
    spec = embedded(repository, model).feature_spec
    with uproot.open(data_dir / "isolation_muons_000.root") as file:
        tree = file["Muons"]
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=False))
    return build_features(arrays, spec, layout).inputs()


# -- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_both_flavours_parse_with_tritons_protobuf_and_agree(
    model_repository: Path, tmp_path: Path, model: str
) -> None:
    text = (model_repository / model / CONFIG_FILENAME).read_text(encoding="utf-8")
    derive_repository(model_repository, tmp_path, Flavour.cpu)
    derived = (tmp_path / model / CONFIG_FILENAME).read_text(encoding="utf-8")
    production, cpu = parse_config(text), parse_config(derived)  # model_config_pb2.ModelConfig
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(production, field) == getattr(cpu, field), field
    assert (production.platform, production.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert (cpu.platform, cpu.backend) == ("", "python")
    assert production.instance_group[0].kind == production.instance_group[0].KIND_GPU
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU
    assert production.max_batch_size > 0 and production.output[0].label_filename == "labels.txt"
    # generated, not written twice: the production config is the render of what it describes
    labels = (model_repository / model / LABELS_FILENAME).read_text().splitlines()
    description = model_from_config(production, labels)
    assert render_config(description, Flavour.production) == text
    assert render_config(description, Flavour.cpu) == derived
    assert description.metadata[1]["bsym_model_name"] == model
    assert (tmp_path / model / "1" / "model.onnx").resolve() == (
        model_repository / model / "1" / "model.onnx"
    ).resolve()


def test_a_changed_model_file_is_refused_before_serving(
    model_repository: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "repository"
    shutil.copytree(model_repository / PFN, copy / PFN)
    with (copy / PFN / "1" / "model.onnx").open("ab") as stream:
        stream.write(b"\0")
    refused = (
        r"fails its check .* refusing to serve it:\n  model 'isolation_pfn' version 1: .* sha256"
    )
    with pytest.raises(ConfigError, match=refused):
        ServedRepository(copy, grpc_port=0, http_port=0).start()


# -- parity with the embedded backend ---------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_triton_scores_equal_the_embedded_backend(served: Served, model: str) -> None:
    inputs = muon_batch(served.data, model, served.repository)
    reference = embedded(served.repository, model)
    with TritonBackend(served.url, model, batch_size=500) as backend:
        assert backend.name == model and backend.version == 1
        assert backend.feature_spec == reference.feature_spec
        assert backend.input_names == reference.input_names
        assert backend.output_names == reference.output_names
        for key in ("bsym_version", "bsym_git_commit", "bsym_class_labels"):
            assert backend.metadata[key] == reference.metadata[key]
        found = backend.predict({name: inputs[name] for name in backend.input_names})
    expected = reference.predict({name: inputs[name] for name in reference.input_names})
    for name, values in expected.items():
        assert found[name].shape == values.shape and len(values) > 2000
        assert np.max(np.abs(found[name] - values)) <= TOLERANCE


def test_dual_subnet_serves_its_symmetry_weight(served: Served, lorentz_sample: Path) -> None:
    reference = embedded(served.repository, DUAL)
    spec = reference.feature_spec
    with uproot.open(lorentz_sample / "lorentz_000.root") as file:
        tree = file[spec.tree]
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=False))
    inputs = build_features(arrays, spec, layout).inputs()
    with TritonBackend(served.url, DUAL, batch_size=700) as backend:
        assert backend.output_names == ("score", "symmetry_weight")
        found = backend.predict({name: inputs[name] for name in backend.input_names})
    expected = reference.predict({name: inputs[name] for name in reference.input_names})
    assert found["symmetry_weight"].shape == (3000, 2)
    np.testing.assert_allclose(found["symmetry_weight"].sum(axis=1), 1.0, atol=1e-5)
    for name, values in expected.items():
        assert np.max(np.abs(found[name] - values)) <= TOLERANCE, name


def friend_tree_structure(path: Path) -> dict[str, Any]:
    """Everything about an output file except the score values."""
    with uproot.open(path) as file:
        classes = dict(sorted(file.classnames().items()))
        trees = {
            name: (
                file[name].num_entries,
                [(branch.name, branch.typename) for branch in file[name].branches],
            )
            for name, kind in classes.items()
            if kind == "TTree"
        }
    return {"classes": classes, "trees": trees, "provenance": read_provenance(path)}


@pytest.mark.parametrize("model", MODELS)
def test_score_server_writes_the_embedded_friend_trees(
    served: Served, tmp_path: Path, model: str
) -> None:
    files = [
        str(served.data / "isolation_muons_000.root"),
        f"{served.data / 'isolation_events_000.root'}:Events",
    ]
    common = ["--model", model, "--no-progress", "--step-size", "700", "--batch-size", "256"]
    local = run_cli(
        "score",
        *files,
        *common,
        "--repository",
        str(served.repository),
        "-o",
        str(tmp_path / "embedded"),
    )
    remote = run_cli(
        "score", *files, *common, "--server", served.url, "-o", str(tmp_path / "triton")
    )
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    names = sorted(p.name for p in (tmp_path / "embedded").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "triton").iterdir()) and len(names) == 3
    report = f"{model}.inputs.json"
    assert json.loads((tmp_path / "triton" / report).read_text()) == json.loads(
        (tmp_path / "embedded" / report).read_text()
    )
    names.remove(report)
    for name in names:
        ours, theirs = tmp_path / "triton" / name, tmp_path / "embedded" / name
        assert friend_tree_structure(ours) == friend_tree_structure(theirs)
        tree = next(iter(friend_tree_structure(ours)["trees"]))
        with uproot.open(ours) as a, uproot.open(theirs) as b:
            for branch in a[tree].keys():  # noqa: SIM118 (a TTree, not a dict)
                found, expected = a[tree][branch].array(), b[tree][branch].array()
                if found.ndim > 1:  # jagged: the same objects per entry, then flat values
                    assert ak.all(ak.num(found) == ak.num(expected)), branch
                    found, expected = ak.flatten(found), ak.flatten(expected)
                difference = np.abs(ak.to_numpy(found) - ak.to_numpy(expected))
                assert len(difference) > 0 and np.max(difference) <= TOLERANCE, branch


# -- load and faults --------------------------------------------------------------------------


def test_sixteen_concurrent_clients(served: Served) -> None:
    inputs = muon_batch(served.data, PFN, served.repository)
    expected = embedded(served.repository, PFN).predict(inputs)["score"]
    rows = len(expected)
    errors: list[BaseException] = []
    requests = [0] * 16
    deadline = time.monotonic() + 3.0

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        try:
            with TritonBackend(served.url, PFN, batch_size=128, max_in_flight=2) as backend:
                while time.monotonic() < deadline:
                    start = int(rng.integers(0, rows - 1))
                    stop = min(rows, start + int(rng.integers(1, 300)))
                    found = backend.predict({k: v[start:stop] for k, v in inputs.items()})
                    assert np.max(np.abs(found["score"] - expected[start:stop])) <= TOLERANCE
                    requests[index] += 1
        except BaseException as error:
            errors.append(error)

    before = _statistics(served.url, PFN)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[0]
    assert all(count > 0 for count in requests), requests
    after = _statistics(served.url, PFN)
    assert after["fail"] == before["fail"]
    assert after["success"] - before["success"] >= sum(requests)


def _statistics(url: str, model: str) -> dict[str, int]:
    with grpcclient.InferenceServerClient(url) as client:
        (stats,) = client.get_inference_statistics(model).model_stats
    return {
        "success": int(stats.inference_stats.success.count),
        "fail": int(stats.inference_stats.fail.count),
    }


def test_oversize_request_is_split_under_the_message_limit(served: Served) -> None:
    inputs = muon_batch(served.data, PFN, served.repository)
    limit = 256 * 1024
    whole = sum(array.nbytes for array in inputs.values())
    assert whole > 4 * limit
    # the limit is real: one request of every row does not fit through such a channel
    with grpcclient.InferenceServerClient(
        served.url, channel_args=[("grpc.max_send_message_length", limit)]
    ) as client:
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(
                name, list(array.shape), "BOOL" if array.dtype == np.bool_ else "FP32"
            )
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        with pytest.raises(grpcclient.InferenceServerException, match="RESOURCE_EXHAUSTED"):
            client.infer(PFN, tensors)
    before = _statistics(served.url, PFN)
    with TritonBackend(served.url, PFN, batch_size=100_000, max_message_bytes=limit) as backend:
        step = backend.rows_per_request(inputs)
        row_bytes = whole // len(inputs["mask"])
        assert step < backend.max_batch_size and step * row_bytes < limit < 2 * step * row_bytes
        found = backend.predict(inputs)["score"]
    expected = embedded(served.repository, PFN).predict(inputs)["score"]
    assert np.max(np.abs(found - expected)) <= TOLERANCE
    requests = -(-len(expected) // step)
    assert _statistics(served.url, PFN)["success"] - before["success"] == requests


def test_unknown_model_or_version_is_named(served: Served, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match=f"has no model 'isolation_pfm'.*did you mean '{PFN}'"):
        TritonBackend(served.url, "isolation_pfm")
    with pytest.raises(ServerError, match=r"no version 7 of model 'isolation_pfn'.*\['1'\]"):
        TritonBackend(served.url, PFN, version=7)
    source = served.data / "isolation_muons_000.root"
    result = run_cli(
        "score",
        str(source),
        "-m",
        "isolation_pfm",
        "--server",
        served.url,
        "-o",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert result.exit_code == 1 and "did you mean 'isolation_pfn'" in result.output
    assert not (tmp_path / "out").exists()


def test_wrong_shapes_are_refused_with_names(served: Served) -> None:
    inputs = muon_batch(served.data, PFN, served.repository)
    with TritonBackend(served.url, PFN) as backend:
        with pytest.raises(
            SpecMismatchError,
            match=r"'constituents': expected shape \[N, P, 3\] float32, found \[\d+, 32, 2\]",
        ):
            backend.predict({**inputs, "constituents": inputs["constituents"][:, :, :2]})
        longer = {
            "constituents": np.pad(inputs["constituents"], ((0, 0), (0, 8), (0, 0))),
            "mask": np.pad(inputs["mask"], ((0, 0), (0, 8))),
            "globals": inputs["globals"],
        }
        with pytest.raises(
            SpecMismatchError,
            match=r"'constituents': expected at most 32 constituent slots .*, found 40",
        ):
            backend.predict(longer)
        with pytest.raises(SpecMismatchError, match="expected dtype float32"):
            backend.predict({**inputs, "globals": inputs["globals"].astype(np.float64)})
        # shorter constituents are padded (masked out) to a multiple of SLOT_QUANTUM slots
        cut = {
            **inputs,
            "constituents": inputs["constituents"][:, :20],
            "mask": inputs["mask"][:, :20],
        }
        padded = {
            **inputs,
            "constituents": np.pad(cut["constituents"], ((0, 0), (0, 12), (0, 0))),
            "mask": np.pad(cut["mask"], ((0, 0), (0, 12))),
        }
        np.testing.assert_allclose(
            backend.predict(cut)["score"], backend.predict(padded)["score"], atol=1e-6
        )
    # the server refuses them too, naming the tensor, if a client skips the checks
    with grpcclient.InferenceServerClient(served.url) as client:
        array = inputs["globals"][:, :0]
        tensor = grpcclient.InferInput("globals", list(array.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        with pytest.raises(grpcclient.InferenceServerException, match=r"unexpected shape.*globals"):
            client.infer("isolation_cone_cut", [tensor])


def test_served_spec_that_disagrees_with_the_model_is_refused(
    served: Served, tmp_path: Path
) -> None:
    with pytest.raises(
        SpecMismatchError,
        match=r"input 'globals' is \[N, 1\] float32 on the server but its feature spec "
        r"makes \[N, 2\] float32",
    ):
        TritonBackend(served.url, BAD_SPEC)
    source = served.data / "isolation_muons_000.root"
    result = run_cli(
        "score",
        str(source),
        "-m",
        BAD_SPEC,
        "--server",
        served.url,
        "-o",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert result.exit_code == 1 and "feature spec makes [N, 2]" in result.output


def test_server_down_at_start_fails_clearly(isolation_sample: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    url = f"127.0.0.1:{port}"
    started = time.monotonic()
    result = run_cli(
        "score",
        str(isolation_sample / "isolation_muons_000.root"),
        "-m",
        PFN,
        "--server",
        url,
        "--retry-timeout",
        "1",
        "-o",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 1
    assert f"the Triton server at {url} is unavailable" in result.output.replace("\n", "")
    assert 1 <= time.monotonic() - started < 20
    assert not (tmp_path / "out").exists()


def _outputs(out: Path) -> list[Path]:
    return sorted(out.glob("*.root")) if out.is_dir() else []


def _wait_for_outputs(out: Path, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(_outputs(out)) < count:
        assert process.poll() is None, "the run ended before the server could be killed"
        assert time.monotonic() < deadline, "no output appeared"
        time.sleep(0.01)


def _kill(served: ServedRepository) -> None:
    pid = served.server.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    served.stop()


def test_server_killed_and_restarted_mid_run(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Run 1 loses its server and fails cleanly; the rerun survives a restart in its retry
    window and completes; every row is then scored exactly once."""
    data = tmp_path_factory.mktemp("many")
    write_isolation(data, 6 * 700, seed=5, events_per_file=700)
    inputs = sorted(data.glob("isolation_muons_*.root"))
    out = tmp_path_factory.mktemp("scores")
    (port,) = free_ports(1)
    url = f"127.0.0.1:{port}"
    slow = ["--batch-size", "8", "--in-flight", "1", "--no-progress", "-o", str(out)]

    def serve() -> ServedRepository:
        served = ServedRepository(
            model_repository, grpc_port=port, http_port=0, instances=1, models=[PFN]
        )
        served.start()
        return served

    server = serve()
    try:
        command = cli_process(
            "score", *map(str, inputs), "-m", PFN, "--server", url, *slow, "--retry-timeout", "1.5"
        )
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as run:
            _wait_for_outputs(out, 1, run)
            _kill(server)
            log, _ = run.communicate(timeout=120)
        assert run.returncode == 1, log
        flat_log = " ".join(log.split())  # rich wraps long lines at spaces
        assert f"the Triton server at {url} is unavailable" in flat_log
        assert flat_log.count("is unavailable") == 1  # the run stops at the first server error
        done = _outputs(out)
        assert 1 <= len(done) < len(inputs)
        if len(done) < len(inputs) - 1:
            assert "not scored: the run stopped at the server error above" in flat_log
        # no partial outputs: friend trees and the input-range report only
        assert not [p for p in out.iterdir() if p.suffix not in {".root", ".json"}]

        server = serve()
        command = cli_process(
            "score", *map(str, inputs), "-m", PFN, "--server", url, *slow, "--retry-timeout", "60"
        )
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as run:
            _wait_for_outputs(out, len(done) + 1, run)
            _kill(server)
            server = serve()  # within the retry window: the run waits for it and goes on
            log, _ = run.communicate(timeout=120)
        assert run.returncode == 0, log
        assert f"{len(done)} skipped, 0 failed" in log.replace("\n", " ")
    finally:
        server.stop()
    assert not [p for p in out.iterdir() if p.suffix not in {".root", ".json"}]
    reference = tmp_path_factory.mktemp("reference")
    summary = score_files(
        [str(p) for p in inputs], embedded(model_repository, PFN), reference, progress=False
    )
    assert not summary.failed
    for source in inputs:
        name = f"{source.stem}.{PFN}.root"
        with uproot.open(out / name) as ours, uproot.open(reference / name) as theirs:
            found, expected = (
                ours["Muons"][PFN].array(library="np"),
                theirs["Muons"][PFN].array(library="np"),
            )
            with uproot.open(source) as raw:
                assert len(found) == raw["Muons"].num_entries == len(expected)
            assert np.max(np.abs(found - expected)) <= TOLERANCE


# -- bsym serve, the analysis API, the examples ----------------------------------------------


def test_bsym_serve_runs_until_sigterm(model_repository: Path, isolation_sample: Path) -> None:
    command = cli_process(
        "serve",
        "--repository",
        str(model_repository),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--instances",
        "1",
    )
    with bsym_serve(command) as serve:
        assert serve.servers
        with TritonModel(serve.url, PFN) as model:
            with uproot.open(isolation_sample / "isolation_muons_000.root") as file:
                arrays = file["Muons"].arrays(model.branches("object"))
            assert model(arrays).shape == (len(arrays),)
        with grpcclient.InferenceServerClient(serve.url) as client:
            for name in (*MODELS, BAD_SPEC):
                assert client.is_model_ready(name)
    assert serve.process.returncode == 0, serve.output
    assert "server stopped" in serve.output
    assert not serve.left_running


def test_triton_model_scores_either_layout_aligned(served: Served) -> None:
    with uproot.open(served.data / "isolation_events_000.root") as file:
        events = file["Events"].arrays()
    with uproot.open(served.data / "isolation_muons_000.root") as file:
        muons = file["Muons"].arrays()
    expected = embedded(served.repository, PFN).predict(
        muon_batch(served.data, PFN, served.repository)
    )["score"][:, 0]
    with TritonModel(served.url, PFN) as model:
        per_event = model(events)
        assert isinstance(per_event, ak.Array)
        np.testing.assert_array_equal(ak.num(per_event), events.nMuon)
        per_muon = model(muons)
        assert isinstance(per_muon, np.ndarray) and per_muon.shape == (len(muons),)
        assert np.max(np.abs(per_muon - expected)) <= TOLERANCE
        assert np.max(np.abs(ak.to_numpy(ak.flatten(per_event)) - per_muon)) <= TOLERANCE
        # a dict of arrays and coffea's NanoEvents layout (collections of records) alike
        as_dict = {name: events[name] for name in model.branches("event")}
        assert ak.all(model(as_dict) == per_event)
        with uproot.open(served.data / "isolation_events_000.root") as file:
            as_numpy = file["Events"].arrays(model.branches("event"), library="np")
        assert ak.all(model(as_numpy) == per_event)
        nested = ak.zip(
            {
                "Muon": ak.zip({f[5:]: events[f] for f in events.fields if f.startswith("Muon_")}),
                "CaloCell": ak.zip(
                    {f[9:]: events[f] for f in events.fields if f.startswith("CaloCell_")}
                ),
            },
            depth_limit=1,
        )
        assert ak.all(model(nested) == per_event)
        with pytest.raises(SpecMismatchError, match=r"no output 'scores'.*did you mean 'score'"):
            model(muons, output="scores")
        with pytest.raises(SpecMismatchError, match="no branch 'CaloCell_et'"):
            model({"Muon_pt": muons["Muon_pt"]})
        copy = pickle.loads(pickle.dumps(model))  # a coffea executor ships it to its workers
    with copy:
        assert np.max(np.abs(copy(muons) - per_muon)) == 0


def test_uproot_example_runs(served: Served) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "uproot_loop.py"),
            str(served.data / "isolation_events_*.root"),
            "--server",
            served.url,
            "--model",
            PFN,
            "--step-size",
            "500",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("chunk of") == 6  # two files of 1200 events, 500 at a time
    assert "in 2,400 events" in result.stdout
