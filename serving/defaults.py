"""Defaults of the scoring library, in a module light enough for ``bsym score --help``."""

from __future__ import annotations

from enum import Enum

DEFAULT_STEP_SIZE = "10 MB"
"""Entries read per chunk (uproot's step size). Small enough that reading one chunk takes
less time than the model takes for the slices queued before it (the reader would otherwise
leave the model idle at every chunk), large enough that uproot's per-chunk work is noise."""
DEFAULT_BATCH_SIZE = 1024
"""Rows per inference call (ONNX Runtime) or per request (Triton)."""
DEFAULT_IN_FLIGHT = 4
DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for one answer from a Triton server."""
DEFAULT_RETRY_TIMEOUT = 30.0
"""Seconds to keep retrying, with backoff, while a Triton server is unavailable."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds ``bsym score --dask tcp://...`` waits for the Dask scheduler to answer."""


class Padding(str, Enum):
    """How the scorer feeds a model with a dynamic constituent axis (a model with a fixed
    axis is always padded to ``max_count``); the scores are the same whichever is chosen."""

    group = "group"
    """Sort each slice's rows by their number of constituents and run groups of
    ``batch_size`` rows, each cut to its own longest row; outputs go back in input order.
    Where that would save under 10% of the slots, the slice is cut as with ``longest``."""
    longest = "longest"
    """Cut each slice to its longest row."""
    fixed = "fixed"
    """Pad every row to ``max_count``."""


DEFAULT_PADDING = Padding.group
