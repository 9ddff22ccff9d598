"""The feature spec and the one implementation that turns ROOT arrays into model tensors.

Training and scoring both call :func:`build_features`, so a model sees exactly the same
inputs in both. The spec speaks in branch names; the same branch names serve two layouts:

- *object layout*: one tree entry per object (``Muon_pt`` scalar, ``CaloCell_et`` jagged);
- *event layout* (NanoAOD): one entry per event, ``nMuon`` and jagged ``Muon_*``, with
  constituents linked to their object by an index branch (``CaloCell_muonIdx``), or through
  a link collection (PFNano: jet → ``JetPFCands_jetIdx`` / ``JetPFCands_pFCandsIdx`` →
  ``PFCands_*``).

The layout is read off the tree (is there an ``n<objects>`` branch?), so a model trained on
one layout scores the other.

One module, over 800 lines, on purpose: the spec and the builder change together, and
keeping every branch-to-tensor step here is what makes training and scoring agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from bsym.contract import CONSTITUENTS, GLOBALS, MASK
from bsym.errors import BadValueError, SpecMismatchError, did_you_mean
from bsym.input_ranges import InputRanges
from bsym.settings import StrictModel

if TYPE_CHECKING:
    from bsym.efp import Cells, Polynomial

Layout = Literal["object", "event"]
FloatArray = npt.NDArray[np.float32]

FEATURE_SPEC_VERSION = 1
DEFAULT_CONE_RADII = tuple(round(0.025 * k, 3) for k in range(1, 19))


class DeltaR(StrictModel):
    """ΔR of a constituent to the object's axis: the feature's branch is the constituent η."""

    phi: str = Field(description="constituent φ branch")
    axis_eta: str = Field(description="object η branch")
    axis_phi: str = Field(description="object φ branch")


class LifetimeSign(StrictModel):
    """The lifetime sign of an impact parameter relative to the object's (jet's) axis.

    ``transverse``: s = sign(d0 · sin(φ_axis − φ_track)), which is the sign of r⊥ · ĵ⊥ for
    the closest approach r⊥ = d0 · (−sin φ, cos φ) of CMS's d0 convention: positive when the
    track's closest approach lies on the side of the axis, as decay products of a particle
    flying along the axis do. ``longitudinal``: s = sign(dz · (η_axis − η_track)). The value
    becomes |value| · s (s = +1 where the product is 0).
    """

    plane: Literal["transverse", "longitudinal"]
    track: str = Field(description="constituent φ (transverse) or η (longitudinal) branch")
    axis: str = Field(description="object φ (transverse) or η (longitudinal) branch")


_FEATURE_OPTIONS: dict[str, object] = {
    "name": None,
    "from_object": False,
    "ratio_to": None,
    "divide_by": None,
    "delta_r": None,
    "lifetime_sign": None,
}
_CONSTITUENT_ONLY = ("from_object", "ratio_to", "divide_by", "delta_r", "lifetime_sign")


def _without_defaults(data: Any, defaults: dict[str, object]) -> Any:
    # Specs written before these optional fields existed stay byte for byte what they were.
    if isinstance(data, dict):
        for key, default in defaults.items():
            if key in data and data[key] == default:
                data.pop(key)
    return data


class Feature(StrictModel):
    """One input branch and how it is transformed.

    Constituent features are computed in this order: the branch's value (``from_object``: the
    object's value, repeated on each of its constituents); minus ``relative_to`` (wrapped
    with ``periodic``); over ``ratio_to``; over ``divide_by``; ``delta_r`` replaces the value
    by ΔR to the axis; ``lifetime_sign`` signs |value|; then ``transform``.
    """

    branch: str
    transform: Literal["none", "log", "log1p"] = "none"
    relative_to: str | None = Field(
        default=None, description="object branch subtracted from a constituent branch"
    )
    periodic: bool = Field(default=False, description="wrap the difference into [-pi, pi)")
    name: str | None = Field(default=None, description="the column's name (default: derived)")
    from_object: bool = Field(
        default=False, description="an object branch, repeated on each of its constituents"
    )
    ratio_to: str | None = Field(default=None, description="object branch the value is divided by")
    divide_by: str | None = Field(
        default=None, description="constituent branch the value is divided by (an error)"
    )
    delta_r: DeltaR | None = Field(default=None, description="ΔR of the constituent to the axis")
    lifetime_sign: LifetimeSign | None = Field(
        default=None, description="sign |value| by the constituent's side of the axis"
    )

    @model_validator(mode="after")
    def _compatible_options(self) -> Feature:
        where = f"feature '{self.name or self.branch}'"
        steps = [*self.constituent_only, *(["relative_to"] if self.relative_to else [])]
        if self.from_object and len(steps) > 1:
            others = ", ".join(step for step in steps if step != "from_object")
            raise ValueError(
                f"{where}: from_object takes the object's value as is, without {others}"
            )
        if self.delta_r is not None and len(set(steps) & {"relative_to", "ratio_to", "divide_by"}):
            raise ValueError(
                f"{where}: delta_r replaces the value; drop relative_to, ratio_to and divide_by"
            )
        if self.lifetime_sign is not None and self.delta_r is not None:
            raise ValueError(f"{where}: delta_r and lifetime_sign do not combine")
        if self.lifetime_sign is not None and self.transform != "none":
            raise ValueError(
                f"{where}: a lifetime-signed value can be negative; transform must be 'none', "
                f"not '{self.transform}'"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_absent_options(self, handler: SerializerFunctionWrapHandler) -> Any:
        return _without_defaults(handler(self), _FEATURE_OPTIONS)

    @property
    def constituent_only(self) -> list[str]:
        """The options set here that only constituent features can have."""
        return [key for key in _CONSTITUENT_ONLY if getattr(self, key) not in (None, False)]

    @property
    def column_name(self) -> str:
        """``name``, else one derived from the branch and the steps (for plain features: the
        branch, or ``log(branch)``)."""
        if self.name is not None:
            return self.name
        value = self.branch
        if self.ratio_to is not None:
            value = f"{value}/{self.ratio_to}"
        if self.divide_by is not None:
            value = f"{value}/{self.divide_by}"
        if self.delta_r is not None:
            value = f"dR({self.branch}, {self.delta_r.phi})"
        if self.lifetime_sign is not None:
            value = f"signed({value})"
        if self.transform != "none":
            value = f"{self.transform}({value})"
        if self.relative_to is not None:
            value = f"{value} - {self.relative_to}"
        return value


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
    index: str | None = Field(
        default=None,
        description="event layout, two-level link: branch of the link collection indexing the "
        "constituent collection (JetPFCands_pFCandsIdx)",
    )
    sort_abs: bool = Field(default=False, description="sort by |sort_by|, descending")

    @model_validator(mode="after")
    def _valid_names(self) -> Constituents:
        names = [f.column_name for f in self.features]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"constituent column names {repeated} are not unique; set 'name'")
        if self.index is not None and self.link is None:
            raise ValueError(f"index '{self.index}' needs the link branch ('link') it belongs to")
        if self.index is not None and self.link is not None:
            prefix = _collection(self.link)
            if _collection(self.index) != prefix:
                raise ValueError(
                    f"index '{self.index}' and link '{self.link}' must belong to one collection "
                    f"(both '{prefix}_*')"
                )
        return self

    @model_serializer(mode="wrap")
    def _without_absent_options(self, handler: SerializerFunctionWrapHandler) -> Any:
        return _without_defaults(handler(self), {"index": None, "sort_abs": False})

    @property
    def column_names(self) -> list[str]:
        return [f.column_name for f in self.features]


def _collection(branch: str) -> str:
    """'JetPFCands_jetIdx' → 'JetPFCands'."""
    return branch.split("_", 1)[0]


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
        for feature in self.globals:
            if feature.constituent_only:
                raise ValueError(
                    f"global '{feature.branch}': {', '.join(feature.constituent_only)} apply to "
                    "constituent features only"
                )
        return self

    @property
    def count_branch(self) -> str:
        return f"n{self.objects}"

    @property
    def global_names(self) -> list[str]:
        """Names of the columns of the ``globals`` tensor, in order."""
        names = [f.column_name for f in self.globals]
        if self.cones is not None:
            names += [f"cone{r:g}" for r in self.cones.radii]
        if self.efps is not None:
            names += [efp.polynomial().name for efp in self.efps.polynomials]
        return names

    @property
    def constituent_names(self) -> list[str]:
        """Names of the columns of the ``constituents`` tensor, in order."""
        return [] if self.constituents is None else self.constituents.column_names

    def constituent_column(self, name: str) -> int:
        """The column of the ``constituents`` tensor named ``name``."""
        return _column_of(name, self.constituent_names, CONSTITUENTS)

    def global_column(self, name: str) -> int:
        """The column of the ``globals`` tensor named ``name``."""
        return _column_of(name, self.global_names, GLOBALS)

    def to_json(self) -> str:
        # A spec without ranges keeps the JSON (and hash) it had before the field existed.
        return self.model_dump_json(exclude={"input_ranges"} if self.input_ranges is None else None)

    def without_ranges(self) -> FeatureSpec:
        return self.model_copy(update={"input_ranges": None})

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls.model_validate(json.loads(text))


def _column_of(name: str, names: list[str], tensor: str) -> int:
    if name not in names:
        raise SpecMismatchError(
            f"tensor '{tensor}' has no column '{name}' (columns: {', '.join(names) or 'none'})"
            f"{did_you_mean(name, names)}"
        )
    return names.index(name)


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
            names += _option_branches(feature)
        sort_by = spec.constituents.sort_by
        if sort_by and sort_by not in spec.constituents.column_names:
            names.append(sort_by)
        if layout == "event" and spec.constituents.link:
            names.append(spec.constituents.link)
            if spec.constituents.index:
                names.append(spec.constituents.index)
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


def _option_branches(feature: Feature) -> list[str]:
    names = [b for b in (feature.ratio_to, feature.divide_by) if b is not None]
    if feature.delta_r is not None:
        names += [feature.delta_r.phi, feature.delta_r.axis_eta, feature.delta_r.axis_phi]
    if feature.lifetime_sign is not None:
        names += [feature.lifetime_sign.track, feature.lifetime_sign.axis]
    return names


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
        self._grouping: dict[
            str | None, tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64]]
        ] = {}
        self._indexing: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = {}

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
        self, branch: str, link: str | None, index: str | None = None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """Flat constituent values in row order and the row offsets (length n_rows + 1).

        With ``index`` (event layout), ``link`` and ``index`` are branches of one link
        collection: ``branch`` is read per link if it is of that collection too, else through
        ``index`` from its own collection (jet → JetPFCands → PFCands).
        """
        order, offsets = self._group(branch, link)
        flat = _as_flat(ak.flatten(self.jagged(branch)), branch)
        linked = self.layout == "event" and index is not None and link is not None
        if linked and _collection(branch) != _collection(str(link)):
            sizes = np.asarray(ak.num(self.jagged(branch), axis=1), dtype=np.int64)
            flat = flat[self._positions(str(index), "index", sizes, f"'{branch}'")]
        if len(flat) != offsets[-1]:
            raise SpecMismatchError(
                f"constituent branch '{branch}' has {len(flat)} values, expected {offsets[-1]}"
            )
        return (flat if order is None else flat[order]), offsets

    def _positions(
        self, index: str, role: str, sizes: npt.NDArray[np.int64], into: str
    ) -> npt.NDArray[np.int64]:
        """Where the values of the jagged ``index`` branch point in a flat collection of
        ``sizes`` items per entry (a value counts from its own entry's first item); ``role``
        and ``into`` name the branch's part and the collection in the error for a value
        outside it."""
        if index not in self._indexing:
            values = self.jagged(index)
            event_of = np.repeat(np.arange(len(values)), np.asarray(ak.num(values, axis=1)))
            local = np.asarray(ak.flatten(values), dtype=np.int64)
            self._indexing[index] = (event_of, local)
        event_of, local = self._indexing[index]
        outside = (local < 0) | (local >= sizes[event_of])
        if np.any(outside):
            first_outside = int(np.argmax(outside))
            entry = int(event_of[first_outside])
            raise BadValueError(
                f"{role} branch '{index}' points outside {into} ({int(outside.sum())} "
                f"values; first in entry {entry}: {int(local[first_outside])} not in "
                f"[0, {int(sizes[entry])}))"
            )
        first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        return np.asarray(first[event_of] + local, dtype=np.int64)

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
    ) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64]]:
        """The order that puts the flat constituents in row order (``None`` where they are
        already: the identity needs no copy) and the row offsets."""
        key = link if self.layout == "event" else None
        if key in self._grouping:
            return self._grouping[key]
        order: npt.NDArray[np.int64] | None = None
        if self.layout == "object":
            counts = np.asarray(ak.num(self.jagged(branch), axis=1), dtype=np.int64)
        else:
            if link is None:
                raise SpecMismatchError(
                    f"the event layout needs a link branch to attach '{branch}' to its "
                    f"{self.spec.objects}; set 'link' in the feature spec"
                )
            assert self.counts is not None
            into = f"the {self.spec.objects} collection ('{self.spec.count_branch}')"
            row = self._positions(link, "link", self.counts, into)
            if not np.all(row[1:] >= row[:-1]):
                order = np.argsort(row, kind="stable")
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
    reference = next((f.branch for f in spec.features if not f.from_object), None)
    if reference is None:
        raise SpecMismatchError(
            "constituents need at least one constituent branch, but every feature is from_object"
        )
    read: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]] = {}
    repeated: dict[str, npt.NDArray[np.float64]] = {}

    # Features share branches (a track's phi for its sign and its ΔR, the jet axis for
    # several): each is read, linked and broadcast once per chunk.
    def values(branch: str) -> npt.NDArray[np.float64]:
        if branch not in read:
            read[branch] = rows.per_constituent(branch, spec.link, spec.index)
        return read[branch][0]

    def axis(branch: str) -> npt.NDArray[np.float64]:
        if branch not in repeated:
            repeated[branch] = np.repeat(rows.per_object(branch), counts)
        return repeated[branch]

    values(reference)
    offsets = read[reference][1]
    counts = np.diff(offsets)
    columns = [_constituent_feature(f, values, axis) for f in spec.features]
    row = np.repeat(np.arange(rows.n_rows), counts)
    position = np.arange(len(row)) - np.repeat(offsets[:-1], counts)
    if spec.sort_by is not None:
        if spec.sort_by in spec.column_names:
            key = columns[spec.column_names.index(spec.sort_by)]
        else:
            key = values(spec.sort_by)
        if spec.sort_abs:
            key = np.abs(key)
        # Files usually store constituents sorted already; the check is far cheaper than a sort.
        if np.any((key[1:] > key[:-1]) & (row[1:] == row[:-1])):
            order = np.lexsort((-key, row))
            columns = [c[order] for c in columns]
    width = spec.max_count
    keep = position < width
    # One scatter of whole rows of features into the flat slots is several times cheaper
    # than one three-index scatter per feature.
    slot = (row * width + position)[keep]
    stacked = np.empty((len(slot), len(columns)), dtype=np.float32)
    for index, column in enumerate(columns):
        stacked[:, index] = column[keep]
    dense = np.zeros((rows.n_rows * width, len(columns)), dtype=np.float32)
    dense[slot] = stacked
    mask = np.zeros(rows.n_rows * width, dtype=np.bool_)
    mask[slot] = True
    dense = dense.reshape(rows.n_rows, width, len(columns))
    _check_finite(dense, [f.name or f.branch for f in spec.features], "constituents")
    return dense, mask.reshape(rows.n_rows, width)


def _constituent_feature(
    feature: Feature,
    values: Callable[[str], npt.NDArray[np.float64]],
    axis: Callable[[str], npt.NDArray[np.float64]],
) -> npt.NDArray[np.float64]:
    """One constituent column in row order, through the steps of :class:`Feature`;
    ``values`` gives a constituent branch and ``axis`` an object branch, per constituent."""
    if feature.from_object:
        return _transform(axis(feature.branch), feature)
    value = values(feature.branch)
    raw = value
    if feature.relative_to is not None:
        value = value - axis(feature.relative_to)
        if feature.periodic:
            value = _wrap(value)
    if feature.ratio_to is not None:
        value = value / _nonzero(axis(feature.ratio_to), feature.ratio_to)
    if feature.divide_by is not None:
        value = value / _nonzero(values(feature.divide_by), feature.divide_by)
    if feature.delta_r is not None:
        delta = feature.delta_r
        d_phi = _wrap(values(delta.phi) - axis(delta.axis_phi))
        value = np.hypot(value - axis(delta.axis_eta), d_phi)
    if feature.lifetime_sign is not None:
        value = np.abs(value) * _lifetime_sign(raw, values, axis, feature.lifetime_sign)
    return _transform(value, feature)


def _lifetime_sign(
    raw: npt.NDArray[np.float64],
    values: Callable[[str], npt.NDArray[np.float64]],
    axis: Callable[[str], npt.NDArray[np.float64]],
    sign: LifetimeSign,
) -> npt.NDArray[np.float64]:
    """+1 where the constituent's closest approach lies on the side of the axis, else -1."""
    difference = axis(sign.axis) - values(sign.track)
    side = np.sin(difference) if sign.plane == "transverse" else difference
    return np.where(raw * side < 0, -1.0, 1.0)


def _wrap(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray((values + np.pi) % (2 * np.pi) - np.pi, dtype=np.float64)


def _nonzero(values: npt.NDArray[np.float64], branch: str) -> npt.NDArray[np.float64]:
    if np.any(values == 0):
        raise BadValueError(
            f"branch '{branch}' has {int(np.sum(values == 0))} values equal to 0; "
            "the feature spec divides by it"
        )
    return values


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


def slot_lengths(mask: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Per row, the index of its last real constituent slot plus one (0 for an empty row):
    the fewest slots that keep every real constituent of the row."""
    if mask.shape[1] == 0:
        return np.zeros(len(mask), dtype=np.int64)
    last_from_end = np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), mask.shape[1] - last_from_end, 0).astype(np.int64)


SLOT_QUANTUM = 8
"""Batches cut to their longest row keep a multiple of this many constituent slots: ONNX
Runtime plans memory per input shape, and Triton's dynamic batcher merges only requests of
one shape, so widths are kept to a few values (4 for 32 slots)."""


def request_width(longest: int, max_count: int) -> int:
    """The constituent slots of a batch whose longest row has ``longest``: the next
    multiple of :data:`SLOT_QUANTUM`, at most ``max_count`` (and never below ``longest``)."""
    rounded = -(-max(longest, 1) // SLOT_QUANTUM) * SLOT_QUANTUM
    return max(min(rounded, max_count), longest)


def narrowed(
    tensors: dict[str, npt.NDArray[np.generic]],
    width: int,
    rows: npt.NDArray[np.int64] | None = None,
) -> dict[str, npt.NDArray[np.generic]]:
    """The ``rows`` of ``tensors`` (all of them for ``None``) with the constituent axis of
    ``constituents`` and ``mask`` cut to its first ``width`` slots; the other tensors whole."""
    out: dict[str, npt.NDArray[np.generic]] = {}
    for name, tensor in tensors.items():
        picked = tensor if rows is None else tensor[rows]
        if name in (CONSTITUENTS, MASK):
            picked = np.ascontiguousarray(picked[:, :width])
        out[name] = picked
    return out
