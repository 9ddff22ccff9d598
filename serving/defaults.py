"""Defaults of the scoring library, in a module light enough for ``bsym score --help``."""

from __future__ import annotations

DEFAULT_STEP_SIZE = "100 MB"
"""Entries read per chunk (uproot's step size)."""
DEFAULT_BATCH_SIZE = 1024
"""Rows per inference call (ONNX Runtime) or per request (Triton)."""
DEFAULT_IN_FLIGHT = 4
DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for one answer from a Triton server."""
DEFAULT_RETRY_TIMEOUT = 30.0
"""Seconds to keep retrying, with backoff, while a Triton server is unavailable."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds ``bsym score --dask tcp://...`` waits for the Dask scheduler to answer."""
