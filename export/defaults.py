"""Defaults of the export library, in a module light enough for ``bsym export --help``."""

from __future__ import annotations

import enum

DEFAULT_TOLERANCE = 1e-4
"""Largest allowed |torch − ONNX Runtime| on any output value (probabilities, absolute)."""
DEFAULT_OPSET = 17
DEFAULT_AUC_TOLERANCE = 0.002
"""Largest allowed loss of held-out AUC of a reduced-precision model against fp32."""
CALIBRATION_ROWS = 2000
"""Training rows that calibrate the activation ranges of an int8 model."""


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


class QuantFormat(str, enum.Enum):
    """``auto`` builds both int8 formats and keeps the faster one on this CPU."""

    auto = "auto"
    qdq = "QDQ"
    qoperator = "QOperator"
