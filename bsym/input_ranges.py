"""Input-range monitoring: what each model input looked like in training, and how far the
inputs being scored are from it.

Training stores, per input feature (each column of ``globals``, each constituent feature
over real, unmasked constituents), quantiles and a histogram of its training rows in the
feature spec (:attr:`bsym.features.FeatureSpec.input_ranges`). Scoring counts, per feature,
the values below the training minimum and above the training maximum, and fills the same
histogram, from which the population stability index (PSI) against training follows.

A feature is *flagged* when more than ``OUTSIDE_THRESHOLD`` of its values lie outside the
training range, or, once it has ``PSI_MIN_VALUES`` values, when its PSI exceeds
``PSI_THRESHOLD`` (0.25 is the usual mark of a significant shift).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from bsym.settings import StrictModel

if TYPE_CHECKING:
    from bsym.features import FeatureBatch, FeatureSpec

QUANTILE_LEVELS = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)
HISTOGRAM_BINS = 20
OUTSIDE_THRESHOLD = 0.01
PSI_THRESHOLD = 0.25
PSI_MIN_VALUES = 1000
PSI_FLOOR = 1e-4
"""Bin fractions are raised to this before the logarithm, so an empty bin stays finite."""

Tensor = Literal["globals", "constituents"]


class FeatureRange(StrictModel):
    """One input feature over the training rows."""

    name: str
    tensor: Tensor
    column: int = Field(ge=0)
    count: int = Field(ge=0)
    quantiles: list[float] = Field(description="values at QUANTILE_LEVELS")
    edges: list[float] = Field(
        description="HISTOGRAM_BINS + 1 edges between the 0.001 and 0.999 quantiles"
    )
    histogram: list[int] = Field(
        description="underflow, one count per bin, overflow (len(edges) + 1 counts)"
    )

    @property
    def minimum(self) -> float:
        return self.quantiles[0]

    @property
    def maximum(self) -> float:
        return self.quantiles[-1]


class InputRanges(StrictModel):
    """The training range of every input feature of a model."""

    levels: list[float] = Field(default_factory=lambda: list(QUANTILE_LEVELS))
    features: list[FeatureRange]


def feature_columns(
    spec: FeatureSpec, batch: FeatureBatch
) -> Iterator[tuple[str, Tensor, int, npt.NDArray[np.float64]]]:
    """(name, tensor, column, values) of every input feature; constituents unmasked only."""
    if batch.globals is not None:
        for column, name in enumerate(spec.global_names):
            yield name, "globals", column, batch.globals[:, column].astype(np.float64)
    if batch.constituents is not None and batch.mask is not None and spec.constituents:
        real = batch.constituents[batch.mask]
        for column, name in enumerate(spec.constituent_names):
            yield name, "constituents", column, real[:, column].astype(np.float64)


def training_ranges(spec: FeatureSpec, batch: FeatureBatch) -> InputRanges:
    """Quantiles and histograms of every input feature of ``batch`` (the training rows)."""
    features = []
    for name, tensor, column, values in feature_columns(spec, batch):
        if len(values) == 0:
            continue
        quantiles = np.quantile(values, QUANTILE_LEVELS)
        edges = np.linspace(quantiles[1], quantiles[-2], HISTOGRAM_BINS + 1)
        features.append(
            FeatureRange(
                name=name,
                tensor=tensor,
                column=column,
                count=len(values),
                quantiles=[float(q) for q in quantiles],
                edges=[float(e) for e in edges],
                histogram=[int(c) for c in histogram(values, edges)],
            )
        )
    return InputRanges(features=features)


def histogram(values: npt.NDArray[np.float64], edges: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Underflow, one count per bin (the last one closed), overflow."""
    edges = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(edges, values, side="right")
    index[values == edges[-1]] = len(edges) - 1
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def psi(expected: npt.ArrayLike, observed: npt.ArrayLike) -> float:
    """Population stability index of two histograms over the same bins (0 when identical)."""
    p = np.asarray(expected, dtype=np.float64)
    q = np.asarray(observed, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    p = np.maximum(p / p.sum(), PSI_FLOOR)
    q = np.maximum(q / q.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


@dataclass
class FeatureCounts:
    """What one feature's scored values look like against its training range."""

    range: FeatureRange
    count: int = 0
    below: int = 0
    above: int = 0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    histogram: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if len(self.histogram) == 0:
            self.histogram = np.zeros(len(self.range.edges) + 1, dtype=np.int64)

    @property
    def outside_fraction(self) -> float:
        return (self.below + self.above) / self.count if self.count else 0.0

    @property
    def psi(self) -> float:
        return psi(self.range.histogram, self.histogram)

    @property
    def flagged(self) -> bool:
        drifted = self.count >= PSI_MIN_VALUES and self.psi > PSI_THRESHOLD
        return self.outside_fraction > OUTSIDE_THRESHOLD or drifted

    def add(self, values: npt.NDArray[np.float64]) -> None:
        if len(values) == 0:
            return
        self.count += len(values)
        self.below += int(np.count_nonzero(values < self.range.minimum))
        self.above += int(np.count_nonzero(values > self.range.maximum))
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        self.histogram += histogram(values, self.range.edges)

    def merged(self, other: FeatureCounts) -> FeatureCounts:
        return FeatureCounts(
            self.range,
            self.count + other.count,
            self.below + other.below,
            self.above + other.above,
            min(self.minimum, other.minimum),
            max(self.maximum, other.maximum),
            self.histogram + other.histogram,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.range.tensor,
            "count": self.count,
            "below_training_min": self.below,
            "above_training_max": self.above,
            "outside_fraction": self.outside_fraction,
            "psi": self.psi,
            "flagged": self.flagged,
            "training_min": self.range.minimum,
            "training_max": self.range.maximum,
            "min": self.minimum if self.count else None,
            "max": self.maximum if self.count else None,
            "histogram_edges": self.range.edges,
            "training_histogram": self.range.histogram,
            "histogram": [int(c) for c in self.histogram],
        }


@dataclass
class InputCounts:
    """Per-feature counts of the inputs seen so far against the training ranges."""

    features: dict[str, FeatureCounts]

    @classmethod
    def of(cls, ranges: InputRanges) -> InputCounts:
        return cls({f"{r.tensor}:{r.name}": FeatureCounts(r) for r in ranges.features})

    def merged(self, other: InputCounts) -> InputCounts:
        return InputCounts(
            {key: counts.merged(other.features[key]) for key, counts in self.features.items()}
        )

    def flagged(self) -> list[FeatureCounts]:
        return [counts for counts in self.features.values() if counts.flagged]

    def to_dict(self) -> dict[str, Any]:
        return {counts.range.name: counts.to_dict() for counts in self.features.values()}


def count_inputs(counts: InputCounts, spec: FeatureSpec, batch: FeatureBatch) -> None:
    """Add one chunk of model inputs to ``counts``."""
    for name, tensor, _, values in feature_columns(spec, batch):
        feature = counts.features.get(f"{tensor}:{name}")
        if feature is not None:
            feature.add(values)


def describe(counts: FeatureCounts) -> str:
    """'Muon_pt: 62.0% outside [3.1, 58.2] (PSI 4.1)'."""
    return (
        f"{counts.range.name}: {counts.outside_fraction:.1%} outside the training range "
        f"[{counts.range.minimum:.4g}, {counts.range.maximum:.4g}] "
        f"({counts.below:,} below, {counts.above:,} above; PSI {counts.psi:.2f})"
    )


THRESHOLDS = {
    "outside_fraction": OUTSIDE_THRESHOLD,
    "psi": PSI_THRESHOLD,
    "psi_min_values": PSI_MIN_VALUES,
}
