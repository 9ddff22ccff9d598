"""The calorimeter cell geometries of the calo-rotation task, light enough for the CLIs."""

from __future__ import annotations

from enum import Enum


class Geometry(str, Enum):
    """Preset cells on [−1, 1]²: ``rect`` 32×4, ``uniform`` 32×32."""

    rect = "rect"
    uniform = "uniform"

    def __str__(self) -> str:
        return self.value
