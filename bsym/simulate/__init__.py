"""Toy physics and detector simulators that write the ROOT ntuples bsym trains on.

The simulators are imported on first use, so that ``import bsym.simulate`` (and
``bsym --help``) does not load numpy, awkward and uproot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bsym.simulate.isolation import simulate_isolation, write_isolation
    from bsym.simulate.isolation_config import IsolationConfig

__all__ = ["IsolationConfig", "simulate_isolation", "write_isolation"]


def __getattr__(name: str) -> Any:
    if name == "IsolationConfig":
        from bsym.simulate.isolation_config import IsolationConfig

        return IsolationConfig
    if name in ("simulate_isolation", "write_isolation"):
        from bsym.simulate import isolation

        return getattr(isolation, name)
    raise AttributeError(f"module 'bsym.simulate' has no attribute '{name}'")
