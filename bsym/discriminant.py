"""The flavour-tagging discriminant of a multi-class model's probabilities.

``D_b = log(p_b / (f_c·p_c + (1 − f_c)·p_light))``: one number per jet, higher is more
b-like, with the charm fraction ``f_c`` weighing c against light jets in the background.
Training records it in the config, export writes it into the ONNX ``metadata_props``
(``bsym_discriminant``, see :mod:`bsym.contract`), and scoring writes it as one more branch,
``f_c`` overridable there. The classes are named by the model's class labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from bsym.errors import SpecMismatchError
from bsym.settings import StrictModel

FloatArray = npt.NDArray[np.float64]
DEFAULT_FC = 0.018
"""The charm fraction of ATLAS's DL1r b-tagging working points."""
_TINY = 1e-30


class Discriminant(StrictModel):
    """Which class labels are b, c and light, the charm fraction, and the branch suffix."""

    signal: str = Field(default="pb", description="class label of b jets")
    charm: str = Field(default="pc", description="class label of c jets")
    light: str = Field(default="pu", description="class label of light jets")
    f_c: float = Field(default=DEFAULT_FC, ge=0, le=1, description="charm fraction")
    name: str = Field(default="Db", description="suffix of the output branch")

    @model_validator(mode="after")
    def _distinct(self) -> Discriminant:
        labels = [self.signal, self.charm, self.light]
        if len(set(labels)) != 3:
            raise ValueError(f"the discriminant's classes must differ, found {labels}")
        if not self.name.isidentifier():
            raise ValueError(f"discriminant name {self.name!r} is not an identifier")
        return self

    def missing(self, class_labels: Sequence[str]) -> list[str]:
        """The discriminant's class labels that are not among ``class_labels``."""
        return [
            label for label in (self.signal, self.charm, self.light) if label not in class_labels
        ]

    def columns(self, class_labels: Sequence[str]) -> tuple[int, int, int]:
        """Indices of the b, c and light probabilities among ``class_labels``."""
        missing = self.missing(class_labels)
        if missing:
            raise SpecMismatchError(
                f"the discriminant needs class label(s) {', '.join(map(repr, missing))}; "
                f"the model's classes are {list(class_labels)}"
            )
        labels = list(class_labels)
        return labels.index(self.signal), labels.index(self.charm), labels.index(self.light)

    def of(self, probabilities: npt.ArrayLike, class_labels: Sequence[str]) -> FloatArray:
        """D_b [N] of probabilities [N, C] ordered as ``class_labels``."""
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(class_labels):
            raise SpecMismatchError(
                f"the discriminant takes probabilities [N, {len(class_labels)}], "
                f"found shape {list(p.shape)}"
            )
        b, c, light = self.columns(class_labels)
        return discriminant(p[:, b], p[:, c], p[:, light], self.f_c)

    def with_fc(self, f_c: float | None) -> Discriminant:
        """This discriminant with ``f_c`` replaced (``None``: unchanged), checked again."""
        if f_c is None:
            return self
        return Discriminant.model_validate({**self.model_dump(), "f_c": f_c})

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_metadata(cls, text: str) -> Discriminant:
        return cls.model_validate(json.loads(text))


def discriminant(
    p_b: npt.ArrayLike, p_c: npt.ArrayLike, p_light: npt.ArrayLike, f_c: float
) -> FloatArray:
    """``log(p_b / (f_c·p_c + (1 − f_c)·p_light))``, both sides floored at 1e-30."""
    b = np.maximum(np.asarray(p_b, dtype=np.float64), _TINY)
    background = f_c * np.asarray(p_c, dtype=np.float64) + (1 - f_c) * np.asarray(
        p_light, dtype=np.float64
    )
    result: FloatArray = np.log(b) - np.log(np.maximum(background, _TINY))
    return result
