"""Run the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel on loopback ports.

The wheel carries Triton (with the Python backend, no ONNX Runtime backend) but not in a
runnable layout: the Python backend needs the stub built for our interpreter beside it, the
binary needs the wheel's bundled libraries and the interpreter's ``libpython`` on
``LD_LIBRARY_PATH``, and the stub must find this environment's packages (numpy < 2,
onnxruntime). :class:`TritonServer` prepares all that, starts the server as a subprocess and
stops it again.
"""

from __future__ import annotations

import contextlib
import filecmp
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from bsym.contract import CONFIG_FILENAME, repository_models
from bsym.errors import BsymError, MissingExtraError, ServerError, did_you_mean
from bsym.extras import install_hint, require

HOST = "127.0.0.1"
DEFAULT_STARTUP_TIMEOUT = 120.0
_ANY_ADDRESS = {"0.0.0.0", "::", ""}
STUB_NAME = "triton_python_backend_stub"
_BIND_FAILURES = ("address already in use", "failed to start")
_POLL_SECONDS = 0.2
_ERROR_LINE = re.compile(r"E\d{4} ")
_GPU_NOISE = re.compile(r"cuda|nvml|dcgm|gpu", re.IGNORECASE)
_LOAD_FAILURE = re.compile(r'"(failed to (?:load|poll model) \'[^\']+\'.*)"$', re.MULTILINE)

if TYPE_CHECKING:
    from tritonclient.grpc import InferenceServerClient


def pytriton_root() -> Path:
    """Directory of the installed ``pytriton`` package (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"nvidia-pytriton is not installed; {install_hint('triton')}")
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary inside the installed ``pytriton`` package."""
    binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not os.access(binary, os.X_OK):
        raise MissingExtraError(f"no executable tritonserver at {binary}; {install_hint('triton')}")
    return binary


def default_backend_cache() -> Path:
    """Where backends are prepared when site-packages is read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bsym" / "triton-backends"


def prepare_backends(cache: Path | None = None) -> Path:
    """A backend directory whose ``python/`` holds the stub for this interpreter.

    The stub is copied into the wheel's own backend directory when that is writable, otherwise
    the whole backend directory is copied once to ``cache`` (a folder per pytriton and Python
    version). Returns the directory to pass as ``--backend-directory``.
    """
    root = pytriton_root() / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / python_version / STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise BsymError(
            f"nvidia-pytriton has no Python backend stub for Python {python_version} "
            f"(stubs for {available}); use one of those Python versions"
        )
    backends = root / "backends"
    if _writable(backends / "python"):
        _install_stub(stub, backends / "python" / STUB_NAME)
        return backends
    version = importlib.metadata.version("nvidia-pytriton")
    cached = (cache or default_backend_cache()) / f"pytriton-{version}-py{python_version}"
    if not (cached / "python" / STUB_NAME).is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            staged = Path(tmp) / "backends"
            shutil.copytree(backends, staged, ignore=shutil.ignore_patterns("__pycache__"))
            _install_stub(stub, staged / "python" / STUB_NAME)
            with contextlib.suppress(FileExistsError, OSError):
                staged.rename(cached)  # another process may have won the race: use its copy
    if not (cached / "python" / STUB_NAME).is_file():
        raise BsymError(f"could not prepare the Triton Python backend in {cached}")
    return cached


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK)


def _install_stub(stub: Path, target: Path) -> None:
    if target.is_file() and filecmp.cmp(stub, target, shallow=False):
        return
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    shutil.copy2(stub, partial)
    partial.chmod(0o755)
    os.replace(partial, target)


def server_environment() -> dict[str, str]:
    """Environment for ``tritonserver`` and the Python-backend stubs it spawns."""
    env = dict(os.environ)
    libs = pytriton_root().parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [str(libs), *([str(libdir)] if libdir else [])]
    if env.get("LD_LIBRARY_PATH"):
        paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    # The stub embeds Python and finds its prefix from `python3` on PATH: putting this
    # interpreter's bin first makes it use this environment's site-packages (a venv too).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server's process group (it and its stubs) and reap the server."""
    if process.poll() is None:  # once reaped, its pid (and group id) may belong to another
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _abandon(process: subprocess.Popen[bytes], log_dir: Path) -> None:
    _kill_group(process)
    shutil.rmtree(log_dir, ignore_errors=True)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class TritonServer:
    """A ``tritonserver`` subprocess serving one model repository on loopback.

    ``models=None`` serves every model in the repository (``--model-control-mode none``, the
    server exits if one fails to load); a sequence of names uses explicit model control and
    loads just those, leaving the others to ``load_model`` calls.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        models: Sequence[str] | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        grace_period: float = 10.0,
        backend_cache: Path | None = None,
        extra_args: Sequence[str] = (),
        host: str = HOST,
        grpc_port: int = 0,
        http_port: int = 0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.requested_ports = (grpc_port, http_port)
        self.models = None if models is None else list(models)
        self.startup_timeout = startup_timeout
        self.grace_period = grace_period
        self.backend_cache = backend_cache
        self.extra_args = list(extra_args)
        self.grpc_port = self.http_port = self.metrics_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._final_log = ""
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], Path], TritonServer] | None = (
            None
        )

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as tritonclient.grpc wants it."""
        self._require_started()
        return f"{self._connect_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint."""
        self._require_started()
        return f"{self._connect_host}:{self.http_port}"

    @property
    def _connect_host(self) -> str:
        return HOST if self.host in _ANY_ADDRESS else self.host

    @property
    def running(self) -> bool:
        """Whether the server process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server while it was started, else None."""
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path | None:
        """The server's combined stdout/stderr while it runs (removed by :meth:`stop`)."""
        return None if self._log_dir is None else self._log_dir / "tritonserver.log"

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> None:
        """Start the server and wait until it and its models are ready.

        Ports are picked just before the start; if another process takes one meanwhile the
        server fails to bind and is started again on new ports.
        """
        if self.running:
            raise ServerError(f"Triton server on {self.grpc_url} is already running")
        self.stop()  # clears what a server that exited on its own left behind
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository {self.model_repository} is not a directory")
        self._check_models_exist()
        for port in self.requested_ports:
            if port:
                check_port_free(self.host, port)
        binary = find_tritonserver()
        backends = prepare_backends(self.backend_cache)
        for attempt in range(1, attempts + 1):
            self._launch(binary, backends)
            try:
                self.wait_ready(self.startup_timeout)
                return
            except ServerError:
                tail = self.log_tail().lower()
                self.stop()
                if attempt == attempts or not any(text in tail for text in _BIND_FAILURES):
                    raise
            except BaseException:  # KeyboardInterrupt included: never leave a server behind
                self.stop()
                raise

    def _check_models_exist(self) -> None:
        available = repository_models(self.model_repository)
        for name in self.models or ():
            if name not in available:
                raise ServerError(
                    f"model '{name}' is not in {self.model_repository} (models with a "
                    f"{CONFIG_FILENAME}: {available}){did_you_mean(name, available)}"
                )

    def _launch(self, binary: Path, backends: Path) -> None:
        free = iter(free_ports(3))
        self.grpc_port, self.http_port = (port or next(free) for port in self.requested_ports)
        self.metrics_port = next(free)
        self._log_dir = Path(tempfile.mkdtemp(prefix="bsym-triton-"))
        self._final_log = ""
        shm_prefix = f"bsym{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        command = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={max(1, int(self.grace_period))}",
        ]
        if self.models is None:
            command.append("--model-control-mode=none")
        else:
            command.append("--model-control-mode=explicit")
            command.extend(f"--load-model={name}" for name in self.models)
        command.extend(self.extra_args)
        assert self.log_path is not None
        with self.log_path.open("wb") as log:
            # Own session: a Ctrl-C in the terminal reaches us, not the server, and stop()
            # can end the server together with the Python-backend stubs it spawned.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(),
                start_new_session=True,
            )
        # Safety net for a server never stopped: ends it when this object or Python goes.
        self._finalizer = weakref.finalize(self, _abandon, self._process, self._log_dir)

    def wait_ready(self, timeout: float) -> None:
        """Block until the server and every expected model are ready, or raise ServerError."""
        grpc = require("tritonclient.grpc", "triton", purpose="talking to a Triton server")
        process = self._require_started()
        deadline = time.monotonic() + timeout
        client = grpc.InferenceServerClient(self.grpc_url)
        try:
            while True:
                code = process.poll()
                if code is not None:
                    raise self._failure(f"{describe_exit(code)} while starting")
                try:
                    if client.is_server_ready() and self._models_ready(client):
                        return
                except grpc.InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise self._failure(f"was not ready after {timeout:.0f} s")
                time.sleep(_POLL_SECONDS)
        finally:
            client.close()

    def _models_ready(self, client: InferenceServerClient) -> bool:
        """True when every expected model is ready; raise if one failed to load."""
        index = client.get_model_repository_index().models
        wanted = self.models if self.models is not None else sorted({m.name for m in index})
        states = {(m.name, m.state, m.reason) for m in index if m.name in wanted}
        for name, state, reason in states:
            if state == "UNAVAILABLE" and reason:
                raise self._failure(f"could not load model '{name}': {reason}")
        return all(client.is_model_ready(name) for name in wanted)

    def _failure(self, what: str) -> ServerError:
        log = self.log_tail(lines=1000)
        # Load failures are logged once per model, far above the tail of status tables.
        causes = dict.fromkeys(
            match.group(1).split("\\n")[0] for match in _LOAD_FAILURE.finditer(log)
        )
        lines = [line for line in log.splitlines() if not line.startswith(("|", "+"))]
        return ServerError(
            f"Triton server for {self.model_repository} (gRPC {HOST}:{self.grpc_port}) {what}"
            + "".join(f"\n  {cause}" for cause in causes)
            + "\nserver log tail:\n"
            + "\n".join(lines[-30:])
        )

    @property
    def returncode(self) -> int | None:
        """The server's exit status (negative: the signal that ended it), None while it runs."""
        return None if self._process is None else self._process.poll()

    def exit_report(self) -> str:
        """How the server ended and the last error lines of its log."""
        code = self.returncode
        log = self.log_tail(lines=1000)
        errors = error_lines(log)
        how = "is still running" if code is None else describe_exit(code)
        if errors:
            return f"{how}; last error lines of its log:\n" + "\n".join(errors)
        lines = log.splitlines()
        last = [line for line in lines if line.strip() and not line.startswith(("|", "+"))][-5:]
        return f"{how}; its log has no error lines, it ends:\n" + "\n".join(last)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the server printed."""
        path = self.log_path
        if path is None or not path.is_file():
            text = self._final_log
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it (and its stubs) after the grace period; idempotent."""
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.grace_period)
            except subprocess.TimeoutExpired:
                _kill_group(process)
        if self._log_dir is not None:
            self._final_log = self.log_tail(lines=1000)
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise ServerError(f"Triton server for {self.model_repository} is not running")
        return self._process


def describe_exit(code: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL`` for a Popen return code."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def error_lines(log: str, count: int = 10) -> list[str]:
    """The last ``count`` error lines of a Triton log (``E`` severity or saying "error"), not
    the status tables nor the GPU complaints of a machine without one (the served flavour runs
    on CPUs)."""
    found = [
        line
        for line in log.splitlines()
        if not line.startswith(("|", "+"))
        and (_ERROR_LINE.match(line) or "error" in line.lower())
        and not _GPU_NOISE.search(line)
    ]
    return found[-count:]


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ServerError` if ``port`` cannot be bound on ``host`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ServerError(
                f"cannot serve on {host}:{port}: {error.strerror}; choose another port "
                "(--grpc-port/--http-port, 0 for a free one)"
            ) from error
