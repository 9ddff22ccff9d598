"""Classification without labels (CWoLa, arXiv:2306.15737): labels from the dimuon mass.

With ``supervision: {type: cwola}`` a training row (one muon, carrying its pair's mass) is
labelled 1 if its pair lies in the signal region (84 < m < 96 GeV by default) and is
opposite sign, and 0 if the pair lies in a sideband (70–84 or 96–110 GeV) or is same sign
inside the signal region. The signal region is rich in prompt Z → μμ muons, the sidebands
and same-sign pairs in non-prompt ones, so a classifier of the two mixtures is a classifier
of prompt against non-prompt muons (the optimal one is the same monotonic function of the
likelihood ratio), as long as nothing but the prompt fraction differs between them.

Rows are kept only where every ``selection`` branch is non-zero (by default: the muon belongs
to the pair, and both pair muons pass |η| < 2.1 and pT > 25 GeV) and the mass lies in the
signal region or a sideband; the others are dropped before the rows are split.

The leading muon's kinematics differ between the regions (the prompt Jacobian peak against
the falling heavy-flavour spectrum), which a network would learn as a proxy for the region.
The negative class is therefore reweighted to the positive class in bins of the
``reweight`` branches (leading-muon η and pT): each negative row gets
``positive(bin) / negative(bin)``, scaled so that the two classes carry the same total
weight; positive rows get 1. The histograms use all kept rows, labels only (no truth).

``select: true`` with ``type: truth`` keeps the same rows but trains on the truth labels
(unweighted): the supervised reference for a like-for-like comparison with CWoLa.

Validation and early stopping use these labels and weights (no truth is looked at); the
truth label (``features.label``), where the files have it, is kept beside the rows for
evaluation only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from bsym.errors import BadValueError, ConfigError
from bsym.features import FeatureBatch, FeatureSpec, detect_layout
from bsym.rootio import TreeSource, iterate_chunks, open_input
from bsym.settings import StrictModel

Indices = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Region = tuple[float, float]

_ETA_EDGES = [round(-2.1 + 0.3 * k, 2) for k in range(15)]
_PT_EDGES = [25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0, 70.0, 80.0, 100.0, 150.0]


class ReweightAxis(StrictModel):
    """One branch of the reweighting histogram and its bin edges (outside: the end bins)."""

    branch: str
    edges: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _edges_increase(self) -> ReweightAxis:
        if any(b <= a for a, b in itertools.pairwise(self.edges)):
            raise ValueError(f"reweight edges of '{self.branch}' must increase: {self.edges}")
        return self


def _default_reweight() -> list[ReweightAxis]:
    return [
        ReweightAxis(branch="dimuon_leadEta", edges=_ETA_EDGES),
        ReweightAxis(branch="dimuon_leadPt", edges=_PT_EDGES),
    ]


class SupervisionConfig(StrictModel):
    """Where the training labels come from: the truth branch or the mass regions (CWoLa)."""

    type: Literal["truth", "cwola"] = "truth"
    mass: str = Field(default="dimuon_mass", description="pair mass branch (GeV)")
    opposite_sign: str = Field(default="dimuon_os", description="non-zero for opposite sign")
    signal_region: Region = (84.0, 96.0)
    sidebands: list[Region] = Field(default_factory=lambda: [(70.0, 84.0), (96.0, 110.0)])
    selection: list[str] = Field(
        default_factory=lambda: ["Muon_fromPair", "dimuon_selected"],
        description="branches that must be non-zero for a row to be used",
    )
    reweight: list[ReweightAxis] = Field(default_factory=_default_reweight)
    select: bool = Field(
        default=False,
        description="truth: train on the CWoLa rows only (selection and regions), unweighted",
    )

    @model_validator(mode="after")
    def _regions_make_sense(self) -> SupervisionConfig:
        regions = [self.signal_region, *self.sidebands]
        if any(low >= high for low, high in regions):
            raise ValueError(f"every region needs low < high, got {regions}")
        ordered = sorted(regions)
        for (_, high), (low, _) in itertools.pairwise(ordered):
            if low < high:
                raise ValueError(f"the signal region and sidebands must not overlap: {regions}")
        return self

    @property
    def window(self) -> Region:
        """The mass range the regions span (the window of the sWeight fit)."""
        regions = [self.signal_region, *self.sidebands]
        return min(r[0] for r in regions), max(r[1] for r in regions)


@dataclass(frozen=True)
class CwolaRows:
    """The kept rows (indices into the rows read), their labels, weights, masses and truth."""

    keep: Indices
    label: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]
    mass: FloatArray
    truth: npt.NDArray[np.int64] | None

    def take(self, rows: Indices) -> CwolaRows:
        """A subset, by positions among the kept rows."""
        return CwolaRows(
            keep=self.keep[rows],
            label=self.label[rows],
            weight=self.weight[rows],
            mass=self.mass[rows],
            truth=None if self.truth is None else self.truth[rows],
        )


def cwola_labels(
    mass: FloatArray, opposite_sign: npt.NDArray[np.bool_], config: SupervisionConfig
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Which rows lie in a region, and their labels (1: signal region and opposite sign)."""
    low, high = config.signal_region
    in_signal = (mass >= low) & (mass < high)
    in_sideband = np.zeros(mass.shape, dtype=np.bool_)
    for low, high in config.sidebands:
        in_sideband |= (mass >= low) & (mass < high)
    label = (in_signal & opposite_sign).astype(np.int64)
    return in_signal | in_sideband, label


def reweight_negatives(
    label: npt.NDArray[np.int64], axes: Sequence[FloatArray], edges: Sequence[Sequence[float]]
) -> npt.NDArray[np.float64]:
    """Weights that give the negatives the positives' histogram in ``axes``, same total."""
    weight = np.ones(label.size)
    if not axes:
        n_pos, n_neg = np.count_nonzero(label == 1), np.count_nonzero(label == 0)
        weight[label == 0] = n_pos / max(n_neg, 1)
        return weight
    cells = np.zeros(label.size, dtype=np.int64)
    n_cells = 1
    for values, bin_edges in zip(axes, edges, strict=True):
        inner = np.asarray(bin_edges[1:-1], dtype=np.float64)
        cells = cells * (len(inner) + 1) + np.searchsorted(inner, values, side="right")
        n_cells *= len(inner) + 1
    positive = np.bincount(cells[label == 1], minlength=n_cells).astype(np.float64)
    negative = np.bincount(cells[label == 0], minlength=n_cells).astype(np.float64)
    ratio = np.divide(positive, negative, out=np.zeros(n_cells), where=negative > 0)
    weight[label == 0] = ratio[cells[label == 0]]
    total = weight[label == 0].sum()
    if total <= 0:
        raise BadValueError(
            "no negative (sideband or same-sign) row shares a reweighting bin with a positive "
            "one; widen the reweight bins"
        )
    weight[label == 0] *= np.count_nonzero(label == 1) / total
    return weight


def read_cwola_rows(
    sources: Sequence[TreeSource],
    spec: FeatureSpec,
    config: SupervisionConfig,
    *,
    max_rows: int | None = None,
) -> CwolaRows:
    """Read the CWoLa branches of ``sources`` row by row (as ``read_rows`` does), pick, label."""
    columns = _read_columns(sources, spec, config, max_rows=max_rows)
    mass = columns[config.mass]
    selected = np.ones(mass.size, dtype=np.bool_)
    for branch in config.selection:
        selected &= columns[branch] != 0
    in_region, label = cwola_labels(mass, columns[config.opposite_sign] != 0, config)
    keep = np.flatnonzero(selected & in_region).astype(np.int64)
    label = label[keep]
    if set(np.unique(label).tolist()) != {0, 1}:
        raise ConfigError(
            f"CWoLa needs rows in the signal region {config.signal_region} (opposite sign) and "
            f"in the sidebands {config.sidebands} or same sign; of {mass.size} rows, "
            f"{keep.size} pass the selection and lie in a region, with labels "
            f"{sorted(set(label.tolist()))}"
        )
    axes = [columns[axis.branch][keep] for axis in config.reweight]
    weight = reweight_negatives(label, axes, [axis.edges for axis in config.reweight])
    if spec.weight is not None:
        weight *= columns[spec.weight][keep]
    truth = None
    if spec.label is not None and spec.label.branch in columns:
        truth = spec.label.classify(columns[spec.label.branch][keep].astype(np.int64))
    return CwolaRows(keep, label, weight.astype(np.float32), mass[keep], truth)


def apply_cwola(batch: FeatureBatch, rows: CwolaRows) -> FeatureBatch:
    """The kept rows of ``batch`` with the CWoLa labels and weights."""
    if rows.keep.size and int(rows.keep[-1]) >= batch.n_rows:
        raise BadValueError(f"the CWoLa branches give more rows than the features ({batch.n_rows})")

    def pick(array: Any) -> Any:
        return None if array is None else array[rows.keep]

    return FeatureBatch(
        n_rows=int(rows.keep.size),
        constituents=pick(batch.constituents),
        mask=pick(batch.mask),
        globals=pick(batch.globals),
        label=rows.label,
        weight=rows.weight,
        counts=None,
    )


def _read_columns(
    sources: Sequence[TreeSource],
    spec: FeatureSpec,
    config: SupervisionConfig,
    *,
    max_rows: int | None,
) -> dict[str, FloatArray]:
    """One value per row for the CWoLa branches (and the truth label where every file has it)."""
    wanted = [config.mass, config.opposite_sign, *config.selection]
    wanted += [axis.branch for axis in config.reweight]
    if spec.weight is not None:
        wanted.append(spec.weight)
    truth = spec.label.branch if spec.label is not None else None
    return read_columns(sources, spec, wanted, max_rows=max_rows, if_everywhere=truth)


def read_columns(
    sources: Sequence[TreeSource],
    spec: FeatureSpec,
    branches: Sequence[str],
    *,
    max_rows: int | None,
    if_everywhere: str | None = None,
) -> dict[str, FloatArray]:
    """One value per row (as ``read_rows`` counts rows) of each branch, and of
    ``if_everywhere`` too where every file has it."""
    wanted = list(dict.fromkeys(branches))
    parts: dict[str, list[FloatArray]] = {}
    n_rows = 0
    with_optional = if_everywhere is not None
    for unresolved in sources:
        if max_rows is not None and n_rows >= max_rows:
            break
        source, tree = open_input(unresolved, spec.count_branch)
        try:
            keys = set(tree.keys())
            with_optional = with_optional and if_everywhere in keys
            layout = detect_layout(keys, spec)
            count = spec.count_branch if layout == "event" else None
            extra = [if_everywhere] if with_optional and if_everywhere is not None else []
            read = list(dict.fromkeys([*wanted, *extra, *([count] if count else [])]))
            for chunk in iterate_chunks(tree, source, read):
                counts = None if count is None else np.asarray(chunk[count], dtype=np.int64)
                for branch in read:
                    parts.setdefault(branch, []).append(_per_row(chunk[branch], counts))
                n_rows += len(parts[wanted[0]][-1])
                if max_rows is not None and n_rows >= max_rows:
                    break
        finally:
            tree.file.close()
    if not parts:
        raise ConfigError(f"no rows were read for the branches {', '.join(wanted)}")
    columns = {k: np.concatenate(v)[:max_rows] for k, v in parts.items()}
    if not with_optional and if_everywhere is not None:
        columns.pop(if_everywhere, None)
    return columns


def _per_row(values: ak.Array, counts: npt.NDArray[np.int64] | None) -> FloatArray:
    """Object layout: as is; event layout: per-object branches flattened, per-event repeated."""
    if counts is None or values.ndim == 1:
        flat = np.asarray(values, dtype=np.float64)
        return flat if counts is None else np.repeat(flat, counts)
    return np.asarray(ak.flatten(values), dtype=np.float64)


def prompt_fractions(
    mass: FloatArray,
    opposite_sign: npt.NDArray[np.bool_],
    truth: npt.NDArray[np.int64],
    config: SupervisionConfig,
) -> dict[str, float]:
    """Truth prompt fraction of the rows in each CWoLa class and region (for reports)."""
    low, high = config.signal_region
    in_signal = (mass >= low) & (mass < high)
    in_region, label = cwola_labels(mass, opposite_sign, config)
    groups = {
        "signal region, opposite sign (label 1)": in_signal & opposite_sign,
        "signal region, same sign": in_signal & ~opposite_sign,
        "sidebands": in_region & ~in_signal,
        "label 0 (sidebands + same sign)": in_region & (label == 0),
    }
    return {
        name: float(truth[rows].mean()) if rows.any() else math.nan for name, rows in groups.items()
    }
