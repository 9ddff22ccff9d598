"""``--device`` names: ``cpu``, ``cuda``, ``cuda:N`` and, where a command allows it, ``auto``.

A device that is asked for and absent is a :class:`~bsym.errors.DeviceError`, never a quiet
fall back to the CPU. ``auto`` is the one way to ask for "a GPU if there is one".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bsym.errors import DeviceError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
CUBLAS_DETERMINISTIC = ":4096:8"


@dataclass(frozen=True)
class Device:
    """A parsed device name; ``index`` is ``None`` for ``cpu``, ``auto`` and a bare ``cuda``."""

    kind: Literal["auto", "cpu", "cuda"]
    index: int | None = None

    @property
    def cuda_index(self) -> int:
        """The CUDA ordinal: ``cuda`` means device 0."""
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: str, *, allow_auto: bool = False) -> Device:
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` with ``allow_auto``) as a :class:`Device`."""
    name = text.strip().lower()
    kind, sep, index = name.partition(":")
    choices = "cpu, cuda, cuda:N" + (", auto" if allow_auto else "")
    if kind == "cuda" and sep and index.isdigit():
        return Device("cuda", int(index))
    if not sep and kind == "cuda":
        return Device("cuda")
    if not sep and kind == "cpu":
        return Device("cpu")
    if not sep and kind == AUTO and allow_auto:
        return Device("auto")
    raise DeviceError(f"unknown device '{text}'; expected one of {choices} (N: 0, 1, ...)")


def torch_device(text: str) -> torch.device:
    """The torch device for ``text`` (``auto``: the first CUDA device if PyTorch sees one).

    Raises :class:`DeviceError` for CUDA when PyTorch has no CUDA device, or not that many.
    """
    import torch

    device = parse_device(text, allow_auto=True)
    if device.kind == "auto":
        device = Device("cuda") if torch.cuda.is_available() else Device("cpu")
    if device.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        raise DeviceError(
            f"device '{text}': PyTorch sees no CUDA device (torch {torch.__version__}, "
            f"built with CUDA {built}); use --device cpu, or auto to take a GPU only if "
            "there is one"
        )
    count = torch.cuda.device_count()
    if device.cuda_index >= count:
        raise DeviceError(
            f"device '{text}': there is no CUDA device {device.cuda_index}; PyTorch sees "
            f"{count} (cuda:0 to cuda:{count - 1})"
        )
    # Deterministic cuBLAS (bsym trains with deterministic algorithms) needs this workspace
    # setting before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    return torch.device("cuda", device.cuda_index)
