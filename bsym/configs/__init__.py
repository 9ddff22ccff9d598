"""The shipped training configs, one YAML file per model; see each file's header. Feature
specs shared by several models are in ``features/``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_config(name: str) -> Path:
    """The path of the shipped config ``<name>.yaml`` (it may not exist), wherever bsym is
    installed: a source checkout or a wheel."""
    return Path(str(resources.files(__name__) / f"{name}.yaml"))


def shipped_features(name: str) -> Path:
    """The path of the shipped feature spec ``features/<name>.yaml`` (it may not exist)."""
    return Path(str(resources.files(__name__) / "features" / f"{name}.yaml"))
