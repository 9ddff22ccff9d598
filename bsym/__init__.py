"""bsym: symmetry-aware taggers for collider physics, from ROOT ntuples to Triton."""

from __future__ import annotations

__version__ = "0.1.0"
