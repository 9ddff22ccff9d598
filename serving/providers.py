"""ONNX Runtime execution providers for a ``--device``, and the check that they really run.

``cuda`` and ``cuda:N`` need onnxruntime-gpu (``pip install 'bsym[gpu]'``), whose
``CUDAExecutionProvider`` runs the graph on that GPU, with the CPU provider behind it only
for nodes CUDA has no kernel for. ONNX Runtime itself falls back to the CPU, with no more
than a log line, when the CUDA provider cannot start (a missing CUDA or cuDNN library, a
wrong device); :func:`check_session_providers` turns that into a
:class:`~bsym.errors.DeviceError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bsym.devices import Device, parse_device
from bsym.errors import DeviceError
from bsym.extras import install_hint

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

Provider = str | tuple[str, dict[str, str]]


def execution_providers(device: str, available: Sequence[str] | None = None) -> list[Provider]:
    """The providers to open a session with on ``device`` (``cpu``, ``cuda``, ``cuda:N``).

    ``available`` defaults to ``onnxruntime.get_available_providers()``; a CUDA device whose
    provider is not among them is a :class:`DeviceError`.
    """
    parsed = parse_device(device)
    if parsed.kind == "cpu":
        return [CPU_PROVIDER]
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        version = f"onnxruntime {ort.__version__}"
    else:
        version = "onnxruntime"
    if CUDA_PROVIDER not in available:
        raise DeviceError(
            f"device '{device}': the installed {version} has no {CUDA_PROVIDER} (it has "
            f"{', '.join(available)}); onnxruntime-gpu provides it: uninstall onnxruntime, "
            f"then {install_hint('gpu')}"
        )
    return [(CUDA_PROVIDER, {"device_id": str(parsed.cuda_index)}), CPU_PROVIDER]


def check_session_providers(session_providers: Sequence[str], device: str, model: str) -> None:
    """Refuse a session that does not run the provider ``device`` asked for: ONNX Runtime
    drops a provider that fails to start and carries on with the CPU."""
    parsed: Device = parse_device(device)
    wanted = CPU_PROVIDER if parsed.kind == "cpu" else CUDA_PROVIDER
    if wanted not in session_providers:
        raise DeviceError(
            f"{model}: ONNX Runtime could not start {wanted} for device '{device}' (the "
            f"session runs {', '.join(session_providers) or 'nothing'}); check that the CUDA "
            "and cuDNN libraries onnxruntime-gpu needs are installed and the GPU is visible "
            "(nvidia-smi, CUDA_VISIBLE_DEVICES)"
        )
