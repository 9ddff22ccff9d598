"""Defaults of the export library, in a module light enough for ``bsym export --help``."""

from __future__ import annotations

DEFAULT_TOLERANCE = 1e-4
"""Largest allowed |torch − ONNX Runtime| on any output value (probabilities, absolute)."""
DEFAULT_OPSET = 17
