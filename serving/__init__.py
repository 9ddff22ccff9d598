"""Scoring backends (embedded ONNX Runtime, Triton over gRPC), the batch scorer, Triton serving.

``bsym.serving.TritonModel`` is the client API for analysis code; it is imported on first use,
so that ``import bsym.serving`` (and ``bsym --help``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bsym.serving.analysis import TritonModel

__all__ = ["TritonModel"]


def __getattr__(name: str) -> Any:
    if name == "TritonModel":
        from bsym.serving.analysis import TritonModel

        return TritonModel
    raise AttributeError(f"module 'bsym.serving' has no attribute '{name}'")
