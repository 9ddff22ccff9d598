"""One exception hierarchy: every user-facing failure is a :class:`BsymError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BsymError(Exception):
    """Base class of every error bsym raises on purpose; the CLI prints it and exits 1."""


class ConfigError(BsymError):
    """A configuration file or override is invalid."""


class InputFileError(BsymError):
    """A ROOT file cannot be opened or read (missing, corrupt, truncated, empty)."""


class MissingBranchError(InputFileError):
    """A branch the feature spec needs is not in the tree."""

    def __init__(self, branch: str, *, file: str, tree: str, available: Iterable[str]) -> None:
        self.branch = branch
        self.file = file
        self.tree = tree
        hint = did_you_mean(branch, available)
        super().__init__(f"{file}:{tree} has no branch '{branch}'{hint}")


class BadValueError(BsymError):
    """Input values that would give silently wrong scores (NaN, infinite)."""


class SpecMismatchError(BsymError):
    """A model's feature spec or tensors do not match the data or the server."""


class ServerError(BsymError):
    """An inference server is unreachable or refuses a request."""


class MissingExtraError(BsymError):
    """An optional extra (``bsym[triton]``, ``bsym[efp]``) that a feature needs is not installed."""


def did_you_mean(name: str, candidates: Iterable[str], *, limit: int = 3) -> str:
    """Return '; did you mean X?' for close matches of ``name``, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


class DeviceError(BsymError):
    """A device that was asked for (``--device cuda:1``) is unknown, absent or out of range."""
