"""``bsym serve``: a real Triton server on the model repository, on CPUs or (``--gpu``) GPUs.

The repository that ``bsym export`` writes is the production one (Triton's ONNX Runtime
backend, ``KIND_GPU``). The ``tritonserver`` binary of nvidia-pytriton has neither that backend
nor a GPU to use here, so :class:`ServedRepository` derives the ``cpu`` flavour of every model
into a temporary directory, with :func:`bsym.export.triton.repository.derive_repository`: the same
tensors, batching, versions, checksums and served metadata, regenerated from the production
configs (not written twice) for the Python backend, and ``model.onnx`` linked, not copied.
With ``gpu`` it derives the ``gpu`` flavour instead: ``KIND_GPU`` Python-backend instances
whose ``model.py`` runs ONNX Runtime's CUDA provider, for the same server on a GPU host.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from bsym.errors import ServerError
from bsym.export.triton.common import DEFAULT_CPU_INSTANCES, Flavour
from bsym.serving.triton_server import DEFAULT_STARTUP_TIMEOUT, HOST, TritonServer

DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
_WATCH_SECONDS = 0.5


class ServedRepository:
    """Serve the ``cpu`` (or, with ``gpu``, ``gpu``) flavour of a model repository with the
    local ``tritonserver``; ``instances`` are per model (cpu) or per GPU (gpu).

    A context manager: entering derives the repository into a temporary directory and starts
    the server (waiting until every model is ready); leaving stops it and removes the copy.
    """

    def __init__(
        self,
        repository: Path,
        *,
        host: str = HOST,
        grpc_port: int = DEFAULT_GRPC_PORT,
        http_port: int = DEFAULT_HTTP_PORT,
        instances: int = DEFAULT_CPU_INSTANCES,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        models: Sequence[str] | None = None,
        gpu: bool = False,
    ) -> None:
        self.repository = Path(repository)
        self.flavour = Flavour.gpu if gpu else Flavour.cpu
        self.host = host
        self.ports = (grpc_port, http_port)
        self.instances = instances
        self.startup_timeout = startup_timeout
        self.only = None if models is None else list(models)
        self.models: list[str] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: TritonServer | None = None

    @property
    def server(self) -> TritonServer:
        if self._server is None:
            raise ServerError(f"no Triton server is running for {self.repository}")
        return self._server

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def start(self) -> None:
        """Derive the repository and start the server on it; stop everything on failure."""
        from bsym.export.triton.repository import derive_repository

        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} is not a directory")
        self._tmp = tempfile.TemporaryDirectory(prefix="bsym-serve-")
        try:
            derived = Path(self._tmp.name)
            self.models = derive_repository(
                self.repository, derived, self.flavour, cpu_instances=self.instances
            )
            if self.only is not None:
                for name in set(self.models) - set(self.only):
                    _remove_model(derived / name)
                self.models = [name for name in self.models if name in self.only]
            self._server = TritonServer(
                derived,
                host=self.host,
                grpc_port=self.ports[0],
                http_port=self.ports[1],
                models=self.only,
                startup_timeout=self.startup_timeout,
            )
            self._server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and remove the derived repository; idempotent."""
        server, self._server = self._server, None
        try:
            if server is not None:
                server.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> ServedRepository:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _remove_model(model_dir: Path) -> None:
    shutil.rmtree(model_dir)


def serve_until_stopped(
    served: ServedRepository, on_ready: Callable[[ServedRepository], None]
) -> None:
    """Start ``served``, call ``on_ready``, and serve until SIGINT or SIGTERM; then stop.

    A signal during the start-up interrupts it (``KeyboardInterrupt``) after stopping what
    was started. Raises :class:`ServerError` if the server exits on its own.
    """
    # A plain flag: threading.Event.set() in a signal handler can deadlock with an
    # Event.wait() that the signal interrupted in the main thread.
    state = {"ready": False, "stop": False}

    def request_stop(signum: int, frame: FrameType | None) -> None:
        state["stop"] = True
        if not state["ready"]:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with served:
            state["ready"] = True
            on_ready(served)
            while not state["stop"]:
                server = served.server
                if not server.running:
                    raise ServerError(
                        f"the Triton server (pid {server.pid}) for {served.repository} exited "
                        f"unexpectedly: {server.exit_report()}"
                    )
                time.sleep(_WATCH_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
