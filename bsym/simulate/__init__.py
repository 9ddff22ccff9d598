"""Toy physics and detector simulators that write the ROOT ntuples bsym trains on."""

from __future__ import annotations

from bsym.simulate.isolation import IsolationConfig, simulate_isolation, write_isolation

__all__ = ["IsolationConfig", "simulate_isolation", "write_isolation"]
