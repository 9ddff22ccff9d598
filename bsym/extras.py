"""Optional extras: import what an extra provides where it is used, or say how to get it."""

from __future__ import annotations

import importlib
from types import ModuleType

from bsym.errors import MissingExtraError


def install_hint(extra: str) -> str:
    """The sentence that tells how to install an extra."""
    return f"install it with: pip install 'bsym[{extra}]'"


def require(module: str, extra: str, *, purpose: str) -> ModuleType:
    """Import ``module``, which the ``extra`` provides; ``purpose`` says what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".", 1)[0]
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed; {install_hint(extra)}"
        ) from error
