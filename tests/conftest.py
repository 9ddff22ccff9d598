"""Fixtures shared by every test module: simulated samples, tiny trained models, an exported
model repository and a Triton server serving it.

The session-scoped ones are built once, when a test first asks for them; tests read them and
write their own outputs elsewhere (``tmp_path``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from bsym.configs import shipped_config
from bsym.contract import CONFIG_FILENAME
from bsym.errors import BsymError
from bsym.export.onnx_export import export_to_repository
from bsym.serving.serve import ServedRepository
from bsym.serving.triton_server import find_tritonserver
from bsym.simulate.calo_rotation import preset_detector, write_calo_rotation
from bsym.simulate.flavour import write_flavour
from bsym.simulate.isolation import write_isolation
from bsym.simulate.lorentz import write_lorentz
from bsym.training.config import load_config
from bsym.training.train import train

ISOLATION_EVENTS = 2400
"""Dimuon events in :func:`isolation_sample`, in two files of each layout: about 5000 muons, so
that a 40% test split gives the export's parity check its 2000 rows, while one file's muons
(about 2500) fit in one request to the served models."""
CALO_EVENTS = 600
FLAVOUR_JETS = 6000
# One shipped config per model type, shrunk to train in well under a second.
MODEL_TYPES = {
    "pfn": ("isolation_pfn", ["model.phi_sizes=[16, 16]", "model.f_sizes=[16]"]),
    "dnn": ("isolation_cones", ["model.hidden_sizes=[16]"]),
    "cone_cut": ("isolation_cone_cut", []),
}
PFN = "isolation_pfn"
DUAL = "lorentz_dual"
BAD_SPEC = "isolation_pfn_badspec"


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """Small networks train fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def isolation_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ISOLATION_EVENTS`` simulated events (seed 11) in both layouts, 1200 a file:
    isolation_muons_00{0,1}.root (tree Muons), isolation_events_00{0,1}.root (tree Events)."""
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, ISOLATION_EVENTS, seed=11, events_per_file=ISOLATION_EVENTS // 2)
    return out


@pytest.fixture(scope="session")
def nanoaod_dir() -> Path:
    """The real CMS NanoAOD test files: ``BSYM_NANOAOD_DIR``, else beside the repository."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nanoaod"
    path = Path(os.environ.get("BSYM_NANOAOD_DIR", default))
    if not path.is_dir():
        pytest.skip(f"no real NanoAOD files at {path} (set BSYM_NANOAOD_DIR)")
    return path


@pytest.fixture(scope="session")
def lorentz_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000 dimuon events (seed 12) for the Lorentz taggers, lorentz_000.root."""
    out = tmp_path_factory.mktemp("lorentz")
    write_lorentz(out, 3000, seed=12)
    return out


@pytest.fixture(scope="session")
def flavour_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``FLAVOUR_JETS`` b/c/light jets (seed 13), 2000 a file, both layouts:
    flavour_jets_00{0,1,2}.root (tree Jets), flavour_events_00{0,1,2}.root (tree Events)."""
    out = tmp_path_factory.mktemp("flavour")
    write_flavour(out, FLAVOUR_JETS, seed=13, jets_per_file=2000)
    return out


@pytest.fixture(scope="session")
def calo_rotation_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``CALO_EVENTS`` showers (seed 5) in the 'rect' detector preset: the one file."""
    out = tmp_path_factory.mktemp("calo")
    (path,) = write_calo_rotation(
        out, CALO_EVENTS, seed=5, detector=preset_detector("rect"), name="rect"
    )
    return path


@pytest.fixture(scope="session")
def trained_models(
    isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The checkpoint of one model of every type in ``MODEL_TYPES``, trained for one epoch on
    the isolation sample with a 40% test split."""
    runs = tmp_path_factory.mktemp("runs")
    checkpoints = {}
    for kind, (config_name, overrides) in MODEL_TYPES.items():
        config = load_config(
            shipped_config(config_name),
            [
                f"data.train=['{isolation_sample}/isolation_muons_*.root']",
                f"output_dir={runs / kind}",
                "data.test_fraction=0.4",
                "optimizer.epochs=1",
                "optimizer.batch_size=256",
                *overrides,
            ],
        )
        assert config.model.type == kind
        checkpoints[kind] = train(config, progress=False).checkpoint
    return checkpoints


@pytest.fixture(scope="session")
def model_repository(
    trained_models: dict[str, Path], lorentz_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The production repository ``bsym export`` writes: the trained models, the dual-subnet
    Lorentz tagger (``DUAL``, trained for one epoch), and ``BAD_SPEC``, a copy of the PFN whose
    served feature spec was edited to disagree with its tensors."""
    repository = tmp_path_factory.mktemp("model_repository")
    for checkpoint in trained_models.values():
        export_to_repository(checkpoint, repository)
    dual = load_config(
        shipped_config(DUAL),
        [
            f"data.train=['{lorentz_sample}/lorentz_*.root']",
            f"output_dir={tmp_path_factory.mktemp('runs') / DUAL}",
            "optimizer.epochs=1",
        ],
    )
    export_to_repository(train(dual, progress=False).checkpoint, repository)
    bad = repository / BAD_SPEC
    shutil.copytree(repository / PFN, bad)
    text = (bad / CONFIG_FILENAME).read_text(encoding="utf-8")
    text = text.replace(f'name: "{PFN}"', f'name: "{BAD_SPEC}"', 1)
    (bad / CONFIG_FILENAME).write_text(text.replace('max_count\\":32', 'max_count\\":16'))
    return repository


@pytest.fixture(scope="session")
def served_repository(model_repository: Path) -> Iterator[ServedRepository]:
    """A real Triton server (``bsym serve``'s machinery) on free loopback ports serving the
    model repository; stopped at the end of the session, whatever happened."""
    try:
        find_tritonserver()
    except BsymError as error:  # only where nvidia-pytriton (Linux wheels only) is missing
        pytest.skip(f"tritonserver unavailable: {error}")
    with ServedRepository(model_repository, grpc_port=0, http_port=0) as running:
        yield running


@dataclass
class BsymServe:
    """A ``bsym serve`` process that printed its gRPC URL, and the Triton servers it started;
    once stopped, the rest of its output and the servers it left running."""

    process: subprocess.Popen[str]
    url: str
    servers: list[psutil.Process]
    output: str = ""
    left_running: list[psutil.Process] = field(default_factory=list)


@contextlib.contextmanager
def bsym_serve(command: list[str]) -> Iterator[BsymServe]:
    """Run the ``bsym serve`` command line until it is ready; on leaving, stop it with SIGTERM
    as a user would, and kill whatever is left of it, whatever happened."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        servers: list[psutil.Process] = []
        try:
            assert process.stdout is not None
            lines = []
            for line in process.stdout:  # ends if the command exits before it is ready
                lines.append(line)
                if line.startswith("gRPC URL:"):
                    break
            assert lines and lines[-1].startswith("gRPC URL:"), "".join(lines)
            servers = psutil.Process(process.pid).children(recursive=True)
            running = BsymServe(process, lines[-1].split()[-1], servers)
            yield running
            process.send_signal(signal.SIGTERM)
            running.output, _ = process.communicate(timeout=60)
            _, left = psutil.wait_procs(servers, timeout=10)
            running.left_running = [p for p in left if p.status() != psutil.STATUS_ZOMBIE]
        finally:
            process.kill()
            for server in servers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    server.kill()
