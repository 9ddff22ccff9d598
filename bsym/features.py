"""The feature spec and the one implementation that turns ROOT arrays into model tensors.

Training and scoring both call :func:`build_features`, so a model sees exactly the same
inputs in both. The spec speaks in branch names; the same branch names serve two layouts:

- *object layout*: one tree entry per object (``Muon_pt`` scalar, ``CaloCell_et`` jagged);
- *event layout* (NanoAOD): one entry per event, ``nMuon`` and jagged ``Muon_*``, with
  constituents linked to their object by an index branch (``CaloCell_muonIdx``).

The layout is read off the tree (is there an ``n<objects>`` branch?), so a model trained on
one layout scores the other.

One module, near 500 lines, on purpose: the spec and the builder change together, and
keeping every branch-to-tensor step here is what makes training and scoring agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from bsym.contract import CONSTITUENTS, GLOBALS, MASK
from bsym.errors import BadValueError, SpecMismatchError
from bsym.input_ranges import InputRanges
from bsym.settings import StrictModel

if TYPE_CHECKING:
    from bsym.efp import Cells, Polynomial

Layout = Literal["object", "event"]
FloatArray = npt.NDArray[np.float32]

FEATURE_SPEC_VERSION = 1
DEFAULT_CONE_RADII = tuple(round(0.025 * k, 3) for k in range(1, 19))


class Feature(StrictModel):
    """One input branch and how it is transformed."""

    branch: str
    transform: Literal["none", "log", "log1p"] = "none"
    relative_to: str | None = Field(
        default=None, description="object branch subtracted from a constituent branch"
    )
    periodic: bool = Field(default=False, description="wrap the difference into [-pi, pi)")


class Constituents(StrictModel):
    """The per-object collection fed to set-based models, padded to ``max_count``."""

    features: list[Feature]
    max_count: int = Field(default=32, gt=0)
    sort_by: str | None = Field(
        default=None, description="branch; constituents kept by it, descending"
    )
    link: str | None = Field(
        default=None, description="event layout: index branch linking a constituent to its object"
    )


class Cones(StrictModel):
    """Cone isolations: summed constituent ET within ΔR < R of the axis over the object pT."""

    radii: list[float] = Field(default_factory=lambda: list(DEFAULT_CONE_RADII))
    et: str = "CaloCell_et"
    eta: str = "CaloCell_eta"
    phi: str = "CaloCell_phi"
    axis_eta: str = "Muon_eta"
    axis_phi: str = "Muon_phi"
    normalise_by: str = "Muon_pt"
    link: str | None = "CaloCell_muonIdx"

    @model_validator(mode="after")
    def _radii_positive(self) -> Cones:
        if not self.radii or min(self.radii) <= 0:
            raise ValueError("cone radii must be a non-empty list of positive numbers")
        return self


class EFP(StrictModel):
    """One energy flow polynomial: a multigraph, the energy exponent κ and the angle exponent β."""

    edges: list[tuple[int, int]] = Field(
        default_factory=list,
        description="pairs of vertices 0..n-1 (a repeated pair is a multi-edge); [] is Σ z_i",
    )
    kappa: float = Field(default=1.0, description="z_i = (ET_i / pT)^kappa")
    beta: float = Field(default=1.0, gt=0, description="θ_ij = ΔR_ij^beta")

    @model_validator(mode="after")
    def _valid_graph(self) -> EFP:
        from bsym.efp import Multigraph

        Multigraph.of(self.edges)
        return self

    def polynomial(self) -> Polynomial:
        from bsym.efp import Multigraph, Polynomial

        return Polynomial(Multigraph.of(self.edges), self.kappa, self.beta)


class EFPs(StrictModel):
    """Energy flow polynomials of the cells around the axis (see ``bsym.efp``), as globals.

    Each column is log(EFP) (EFPs are >= 0; values below ``floor`` are raised to it) or the
    EFP itself. The ``max_cells`` cells of highest ET enter; cells with ET <= 0 do not.
    """

    polynomials: list[EFP] = Field(min_length=1)
    et: str = "CaloCell_et"
    eta: str = "CaloCell_eta"
    phi: str = "CaloCell_phi"
    axis_eta: str = "Muon_eta"
    axis_phi: str = "Muon_phi"
    normalise_by: str = "Muon_pt"
    link: str | None = "CaloCell_muonIdx"
    max_cells: int = Field(default=32, gt=0)
    include_axis: bool = Field(
        default=False, description="the muon is one more particle at the centre with z = 1"
    )
    transform: Literal["log", "none"] = "log"
    floor: float = Field(default=1e-30, gt=0, description="smallest value before the log")


class Label(StrictModel):
    """Binary truth: 1 where ``branch`` takes one of the ``positive`` values, 0 where it takes
    one of the ``negative`` values (without ``negative``: every value that is not positive).

    With ``negative`` given, rows of neither class are left out of training and evaluation.

    Multi-class truth: ``classes`` lists the values of each class, ``[[0], [4], [5]]`` for
    light, c and b jets by ``Jet_hadronFlavour``; a row gets the index of its class,
    0 … C−1, and rows of no class are left out. ``positive`` and ``negative`` do not apply.
    """

    branch: str = "Muon_genPartFlav"
    positive: list[int] = Field(default_factory=lambda: [1])
    negative: list[int] | None = Field(
        default=None, description="absent: every value that is not positive"
    )
    classes: list[list[int]] | None = Field(
        default=None, description="multi-class: the values of each class, in class order"
    )

    @model_validator(mode="after")
    def _classes_apart(self) -> Label:
        both = sorted(set(self.positive) & set(self.negative or []))
        if both:
            raise ValueError(
                f"label values {both} of '{self.branch}' are both positive and negative"
            )
        if self.classes is not None:
            self._check_classes(self.classes)
        return self

    def _check_classes(self, classes: list[list[int]]) -> None:
        if "positive" in self.model_fields_set or self.negative is not None:
            raise ValueError(
                f"label of '{self.branch}': give either classes or positive/negative, not both"
            )
        if len(classes) < 2 or not all(classes):
            raise ValueError(
                f"label classes of '{self.branch}' must be at least two non-empty lists of "
                f"values, found {classes}"
            )
        values = [value for values in classes for value in values]
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"label values {repeated} of '{self.branch}' are in two classes")

    @model_serializer(mode="wrap")
    def _without_absent_negative(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Specs written before `negative` and `classes` existed stay byte for byte what they
        # were; a multi-class label is its branch and classes.
        data = handler(self)
        if isinstance(data, dict):
            if data.get("negative") is None:
                data.pop("negative", None)
            if data.get("classes") is None:
                data.pop("classes", None)
            else:
                data.pop("positive", None)
        return data

    @property
    def n_classes(self) -> int:
        """Outputs a model of this label has: 1 for a binary label, C for C classes."""
        return 1 if self.classes is None else len(self.classes)

    @property
    def leaves_out(self) -> bool:
        """Whether some values belong to no class (their rows are left out)."""
        return self.negative is not None or self.classes is not None

    def classify(self, truth: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """1 for positive values, 0 for negative ones, -1 for values of neither class; with
        ``classes``, the index of the value's class, -1 for values of none."""
        if self.classes is not None:
            label = np.full(truth.shape, -1, dtype=np.int64)
            for index, values in enumerate(self.classes):
                label[np.isin(truth, values)] = index
            return label
        label = np.isin(truth, self.positive).astype(np.int64)
        if self.negative is not None:
            label[~label.astype(np.bool_) & ~np.isin(truth, self.negative)] = -1
        return label


class FeatureSpec(StrictModel):
    """Which tree and branches a model reads and how they become tensors."""

    version: int = FEATURE_SPEC_VERSION
    tree: str = "Muons"
    objects: str = Field(
        default="Muon", description="object collection; n<objects> marks the event layout"
    )
    constituents: Constituents | None = None
    globals: list[Feature] = Field(default_factory=list)
    cones: Cones | None = None
    efps: EFPs | None = None
    label: Label | None = Field(default_factory=Label)
    weight: str | None = None
    input_ranges: InputRanges | None = Field(
        default=None,
        description="the inputs' ranges over the training rows, written by training "
        "(see bsym.input_ranges); specs without it load, and their models are not monitored",
    )

    @model_validator(mode="after")
    def _has_inputs(self) -> FeatureSpec:
        if (
            self.constituents is None
            and not self.globals
            and self.cones is None
            and self.efps is None
        ):
            raise ValueError("a feature spec needs constituents, globals, cones or efps")
        return self

    @property
    def count_branch(self) -> str:
        return f"n{self.objects}"

    @property
    def global_names(self) -> list[str]:
        """Names of the columns of the ``globals`` tensor, in order."""
        names = [
            f.branch if f.transform == "none" else f"{f.transform}({f.branch})"
            for f in self.globals
        ]
        if self.cones is not None:
            names += [f"cone{r:g}" for r in self.cones.radii]
        if self.efps is not None:
            names += [efp.polynomial().name for efp in self.efps.polynomials]
        return names

    def to_json(self) -> str:
        # A spec without ranges keeps the JSON (and hash) it had before the field existed.
        return self.model_dump_json(exclude={"input_ranges"} if self.input_ranges is None else None)

    def without_ranges(self) -> FeatureSpec:
        return self.model_copy(update={"input_ranges": None})

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls.model_validate(json.loads(text))


@dataclass
class FeatureBatch:
    """Model tensors for ``n_rows`` objects, plus how rows map back to tree entries."""

    n_rows: int
    constituents: FloatArray | None
    mask: npt.NDArray[np.bool_] | None
    globals: FloatArray | None
    label: npt.NDArray[np.int64] | None
    weight: FloatArray | None
    counts: npt.NDArray[np.int64] | None
    """Objects per tree entry in the event layout; ``None`` in the object layout."""
    truth: npt.NDArray[np.int64] | None = None
    """The label branch's values; ``label`` is -1 where they are of neither class."""

    def inputs(self) -> dict[str, npt.NDArray[np.generic]]:
        """The model's input tensors by their contract names."""
        tensors: dict[str, npt.NDArray[np.generic]] = {}
        if self.constituents is not None and self.mask is not None:
            tensors[CONSTITUENTS] = self.constituents
            tensors[MASK] = self.mask
        if self.globals is not None:
            tensors[GLOBALS] = self.globals
        return tensors


def detect_layout(branches: Iterable[str], spec: FeatureSpec) -> Layout:
    """The event layout has a count branch for the object collection."""
    return "event" if spec.count_branch in set(branches) else "object"


def required_branches(spec: FeatureSpec, layout: Layout, *, with_label: bool) -> list[str]:
    """Every branch :func:`build_features` reads, without duplicates, in a stable order."""
    names: list[str] = []
    if spec.constituents is not None:
        for feature in spec.constituents.features:
            names.append(feature.branch)
            if feature.relative_to:
                names.append(feature.relative_to)
        if spec.constituents.sort_by:
            names.append(spec.constituents.sort_by)
        if layout == "event" and spec.constituents.link:
            names.append(spec.constituents.link)
    for feature in spec.globals:
        names.append(feature.branch)
    if spec.cones is not None:
        cones = spec.cones
        names += [
            cones.et,
            cones.eta,
            cones.phi,
            cones.axis_eta,
            cones.axis_phi,
            cones.normalise_by,
        ]
        if layout == "event" and cones.link:
            names.append(cones.link)
    if spec.efps is not None:
        efps = spec.efps
        names += [efps.et, efps.eta, efps.phi, efps.axis_eta, efps.axis_phi, efps.normalise_by]
        if layout == "event" and efps.link:
            names.append(efps.link)
    if layout == "event":
        names.append(spec.count_branch)
    if with_label:
        if spec.label is not None:
            names.append(spec.label.branch)
        if spec.weight is not None:
            names.append(spec.weight)
    return list(dict.fromkeys(names))


class _Rows:
    """Branches of one chunk viewed per object row: objects flat, constituents jagged."""

    def __init__(self, arrays: ak.Array, spec: FeatureSpec, layout: Layout) -> None:
        self.arrays = arrays
        self.spec = spec
        self.layout = layout
        self.counts: npt.NDArray[np.int64] | None = None
        if layout == "event":
            self.counts = np.asarray(arrays[spec.count_branch], dtype=np.int64)
        self.n_rows = int(self.counts.sum()) if self.counts is not None else len(arrays)
        self._grouping: dict[str | None, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = {}

    def per_object(self, branch: str) -> npt.NDArray[np.float64]:
        """One value per row: an object branch (or an event branch broadcast to its objects)."""
        values = self.arrays[branch]
        if self.counts is None:
            return _as_flat(values, branch)
        if values.ndim == 1:
            return np.repeat(_as_flat(values, branch), self.counts)
        flat = _as_flat(ak.flatten(values), branch)
        if len(flat) != self.n_rows:
            raise SpecMismatchError(
                f"branch '{branch}' has {len(flat)} values but '{self.spec.count_branch}' "
                f"counts {self.n_rows} objects"
            )
        return flat

    def per_constituent(
        self, branch: str, link: str | None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """Flat constituent values in row order and the row offsets (length n_rows + 1)."""
        order, offsets = self._group(branch, link)
        flat = _as_flat(ak.flatten(self.jagged(branch)), branch)
        if len(flat) != len(order):
            raise SpecMismatchError(
                f"constituent branch '{branch}' has {len(flat)} values, expected {len(order)}"
            )
        return flat[order], offsets

    def jagged(self, branch: str) -> ak.Array:
        """A constituent (or link) branch, checked to hold one list per entry."""
        values = self.arrays[branch]
        if values.ndim != 2:
            found = "one value per entry" if values.ndim == 1 else f"{values.ndim - 1} nested lists"
            raise SpecMismatchError(
                f"constituent branch '{branch}': expected a jagged branch (one list per entry), "
                f"found {found}"
            )
        return values

    def _group(
        self, branch: str, link: str | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        key = link if self.layout == "event" else None
        if key in self._grouping:
            return self._grouping[key]
        if self.layout == "object":
            counts = np.asarray(ak.num(self.jagged(branch), axis=1), dtype=np.int64)
            order = np.arange(int(counts.sum()), dtype=np.int64)
        else:
            if link is None:
                raise SpecMismatchError(
                    f"the event layout needs a link branch to attach '{branch}' to its "
                    f"{self.spec.objects}; set 'link' in the feature spec"
                )
            assert self.counts is not None
            index = self.jagged(link)
            event_of = np.repeat(np.arange(len(self.counts)), np.asarray(ak.num(index, axis=1)))
            local = np.asarray(ak.flatten(index), dtype=np.int64)
            if np.any((local < 0) | (local >= self.counts[event_of])):
                raise BadValueError(
                    f"link branch '{link}' points outside the {self.spec.objects} collection "
                    f"(values must lie in [0, {self.spec.count_branch}))"
                )
            first_object = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
            row = first_object[event_of] + local
            in_order = bool(np.all(row[1:] >= row[:-1]))
            order = np.arange(len(row)) if in_order else np.argsort(row, kind="stable")
            counts = np.bincount(row, minlength=self.n_rows).astype(np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._grouping[key] = (order, offsets)
        return order, offsets


def build_features(
    arrays: ak.Array, spec: FeatureSpec, layout: Layout, *, with_label: bool = False
) -> FeatureBatch:
    """Turn one chunk of branches into padded tensors, masks, globals and (optionally) labels."""
    rows = _Rows(arrays, spec, layout)
    constituents = mask = None
    if spec.constituents is not None:
        constituents, mask = _build_constituents(rows, spec.constituents)
    global_columns = [_transform(rows.per_object(f.branch), f) for f in spec.globals]
    if spec.cones is not None:
        global_columns += _cone_isolations(rows, spec.cones)
    if spec.efps is not None:
        global_columns += _efp_columns(rows, spec.efps)
    globals_ = np.stack(global_columns, axis=1).astype(np.float32) if global_columns else None
    if globals_ is not None:
        _check_finite(globals_, spec.global_names, "globals")

    label = weight = truth = None
    if with_label:
        if spec.label is None:
            raise SpecMismatchError("training needs a label, but the feature spec has none")
        truth = rows.per_object(spec.label.branch).astype(np.int64)
        label = spec.label.classify(truth)
        if spec.weight is not None:
            weight = rows.per_object(spec.weight).astype(np.float32)
            _check_finite(weight[:, None], [spec.weight], "weight")
    return FeatureBatch(
        rows.n_rows, constituents, mask, globals_, label, weight, rows.counts, truth
    )


def _build_constituents(
    rows: _Rows, spec: Constituents
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    link = spec.link
    columns = []
    offsets = np.zeros(1, dtype=np.int64)
    for feature in spec.features:
        values, offsets = rows.per_constituent(feature.branch, link)
        if feature.relative_to is not None:
            axis = rows.per_object(feature.relative_to)
            values = values - np.repeat(axis, np.diff(offsets))
            if feature.periodic:
                values = (values + np.pi) % (2 * np.pi) - np.pi
        columns.append(_transform(values, feature))
    counts = np.diff(offsets)
    row = np.repeat(np.arange(rows.n_rows), counts)
    position = np.arange(len(row)) - np.repeat(offsets[:-1], counts)
    if spec.sort_by is not None:
        key, _ = rows.per_constituent(spec.sort_by, link)
        # Files usually store constituents sorted already; the check is far cheaper than a sort.
        if np.any((key[1:] > key[:-1]) & (row[1:] == row[:-1])):
            order = np.lexsort((-key, row))
            columns = [c[order] for c in columns]
    keep = position < spec.max_count
    dense = np.zeros((rows.n_rows, spec.max_count, len(columns)), dtype=np.float32)
    mask = np.zeros((rows.n_rows, spec.max_count), dtype=np.bool_)
    for index, column in enumerate(columns):
        dense[row[keep], position[keep], index] = column[keep]
    mask[row[keep], position[keep]] = True
    _check_finite(dense, [f.branch for f in spec.features], "constituents")
    return dense, mask


def _cone_isolations(rows: _Rows, cones: Cones) -> list[npt.NDArray[np.float64]]:
    et, offsets = rows.per_constituent(cones.et, cones.link)
    eta, _ = rows.per_constituent(cones.eta, cones.link)
    phi, _ = rows.per_constituent(cones.phi, cones.link)
    counts = np.diff(offsets)
    d_eta = eta - np.repeat(rows.per_object(cones.axis_eta), counts)
    d_phi = (phi - np.repeat(rows.per_object(cones.axis_phi), counts) + np.pi) % (2 * np.pi) - np.pi
    delta_r = np.hypot(d_eta, d_phi)
    pt = rows.per_object(cones.normalise_by)
    if np.any(pt <= 0):
        raise BadValueError(
            f"branch '{cones.normalise_by}' has values <= 0; cone isolation divides by it"
        )
    row = np.repeat(np.arange(rows.n_rows), counts)
    columns = []
    for radius in cones.radii:
        inside = delta_r < radius
        summed = np.bincount(row[inside], weights=et[inside], minlength=rows.n_rows)
        columns.append(summed / pt)
    return columns


def efp_cell_constituents(efps: EFPs) -> Constituents:
    """The cells the EFPs are computed from as a constituents section: ET, Δη and Δφ to the
    axis of the ``max_cells`` cells of highest ET."""
    return Constituents(
        features=[
            Feature(branch=efps.et),
            Feature(branch=efps.eta, relative_to=efps.axis_eta),
            Feature(branch=efps.phi, relative_to=efps.axis_phi, periodic=True),
        ],
        max_count=efps.max_cells,
        sort_by=efps.et,
        link=efps.link,
    )


def efp_cells_from(
    constituents: FloatArray, mask: npt.NDArray[np.bool_], pt: npt.NDArray[np.floating[Any]]
) -> Cells:
    """:class:`~bsym.efp.Cells` from the tensors of :func:`efp_cell_constituents` and pT."""
    from bsym.efp import Cells

    as_float = constituents.astype(np.float64)
    pt = np.asarray(pt, dtype=np.float64)
    return Cells(as_float[..., 0], as_float[..., 1], as_float[..., 2], mask, pt)


def _efp_cells(rows: _Rows, efps: EFPs) -> Cells:
    dense, mask = _build_constituents(rows, efp_cell_constituents(efps))
    pt = rows.per_object(efps.normalise_by)
    if np.any(pt <= 0):
        raise BadValueError(
            f"branch '{efps.normalise_by}' has values <= 0; the EFPs divide ET by it"
        )
    return efp_cells_from(dense, mask, pt)


def _efp_columns(rows: _Rows, efps: EFPs) -> list[npt.NDArray[np.float64]]:
    from bsym.efp import efp_values

    polynomials = [efp.polynomial() for efp in efps.polynomials]
    values = efp_values(_efp_cells(rows, efps), polynomials, include_axis=efps.include_axis)
    if efps.transform == "log":
        values = np.log(np.maximum(values, efps.floor))
    return list(values.T)


def _transform(values: npt.NDArray[np.float64], feature: Feature) -> npt.NDArray[np.float64]:
    if feature.transform == "none":
        return values
    floor = 0.0 if feature.transform == "log" else -1.0
    bad = ~(values > floor)
    if np.any(bad & np.isfinite(values)):
        raise BadValueError(
            f"branch '{feature.branch}' has {int(np.sum(bad))} values <= {floor:g}; "
            f"transform '{feature.transform}' needs values > {floor:g}"
        )
    return np.log(values) if feature.transform == "log" else np.log1p(values)


def _check_finite(tensor: FloatArray, names: Sequence[str], tensor_name: str) -> None:
    finite = np.isfinite(tensor)
    if finite.all():
        return
    bad_columns = ~finite.reshape(-1, tensor.shape[-1]).all(axis=0)
    culprits = [name for name, bad in zip(names, bad_columns, strict=True) if bad]
    raise BadValueError(
        f"{int((~finite).sum())} NaN or infinite values in tensor '{tensor_name}' "
        f"from branch(es) {', '.join(repr(c) for c in culprits)}"
    )


def _as_flat(values: ak.Array, branch: str) -> npt.NDArray[np.float64]:
    try:
        flat = np.asarray(ak.to_numpy(values), dtype=np.float64)
    except ValueError as error:
        raise SpecMismatchError(
            f"branch '{branch}' is jagged where the feature spec expects one value per object"
        ) from error
    if flat.ndim != 1:  # lists that happen to be of equal length convert to a regular array
        raise SpecMismatchError(
            f"branch '{branch}' is jagged (lists of {list(flat.shape[1:])} values) where the "
            "feature spec expects one value per object"
        )
    return flat
