"""An advisory lock per model of a repository, so concurrent exports and checks do not race.

The lock file lies beside the model folder (``<repository>/.<name>.lock``), so it exists before
the model folder does and never inside what Triton serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bsym.errors import ConfigError

DEFAULT_LOCK_TIMEOUT = 120.0
_POLL_SECONDS = 0.05


def lock_path(model_dir: Path) -> Path:
    """The lock file of ``model_dir``."""
    return model_dir.parent / f".{model_dir.name}.lock"


@contextlib.contextmanager
def model_lock(
    model_dir: Path, *, exclusive: bool = True, timeout: float = DEFAULT_LOCK_TIMEOUT
) -> Iterator[None]:
    """Hold the model's lock (exclusive to write, shared to read); wait at most ``timeout`` s.

    A shared lock is skipped where the lock file cannot be created (a read-only repository)."""
    path = lock_path(model_dir)
    if exclusive:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if exclusive:
            raise
        # A read-only repository (a site's copy, a read-only mount): nobody writes it either.
        yield
        return
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"model '{model_dir.name}': {path} is still locked by another process "
                        f"(a bsym export into {model_dir.parent}?) after {timeout:.0f} s; "
                        "retry when it has finished"
                    ) from None
                time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock
