"""``bsym adopt``: a model bsym did not train (weaver, salt, any ONNX) into the model repository.

The adoption file is YAML with two sections: ``features`` (a :class:`FeatureSpec`, the same
schema as training's) and ``adopt`` (:class:`Adoption`: which ONNX input is which bsym
tensor, the axis order, the feature columns, standardisation, constants, which outputs form
``score``). The adapter is built *into* the graph: a front graph from bsym's tensors
(``constituents`` [N, P, F], ``mask`` [N, P], ``globals`` [N, G]) to the foreign inputs,
merged with the foreign graph (its names prefixed, so nothing collides), and ``score`` made
from the chosen outputs. Models without a batch axis (salt's, one jet per call) are run row
by row inside the graph by an ONNX ``Scan``, so the written model still takes [N, ...].

A parity check runs the original model through ONNX Runtime on the same rows, fed by the
same preprocessing done in numpy (row by row for per-row models), against the adopted graph;
a difference above the tolerance refuses the adoption and writes nothing.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationError

import bsym
from bsym import contract
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export.adopt_readers import (
    ForeignPreprocessing,
    Standardisation,
    read_salt,
    read_weaver,
    salt_outputs,
)
from bsym.export.defaults import DEFAULT_TOLERANCE
from bsym.export.onnx_export import (
    PARITY_BATCH_SIZES,
    PARITY_MAX_ROWS,
    PARITY_THREADS,
    check_graph,
    git_commit,
    onnx_inputs,
    worst_differences,
)
from bsym.export.precision import cpu_session
from bsym.export.triton.common import Flavour
from bsym.features import FeatureSpec
from bsym.rootio import parse_inputs
from bsym.settings import StrictModel

Tensor = npt.NDArray[Any]
MIN_OPSET = 13
PREFIX = "foreign/"
FRONT = "bsym_adopt/"
MODEL_TYPE_PREFIX = "adopted"


class InputMapping(StrictModel):
    """Where one ONNX input comes from."""

    tensor: Literal["constituents", "mask", "globals", "constant"]
    columns: list[int] | None = Field(
        default=None, description="feature columns of constituents/globals, in order; all if absent"
    )
    layout: Literal["NPF", "NFP"] = Field(
        default="NPF", description="constituents/mask axis order the model wants (weaver: NFP)"
    )
    centre: list[float] | None = None
    scale: list[float] | None = None
    lower: list[float] | None = Field(default=None, description="clip bounds after scaling")
    upper: list[float] | None = None
    value: float = Field(default=0.0, description="tensor: constant; fills the input")
    drop_padding: bool = Field(
        default=False, description="per-row models: feed only the real constituents (salt)"
    )


class WeaverFiles(StrictModel):
    preprocess: Path | None = None
    data_config: Path | None = None


class Adoption(StrictModel):
    """The ``adopt`` section of an adoption file."""

    inputs: dict[str, InputMapping] = Field(default_factory=dict)
    score: list[str] | None = Field(
        default=None, description="outputs concatenated into 'score'; default the first one"
    )
    keep: list[str] | None = Field(
        default=None, description="other outputs kept under their names; default all that fit"
    )
    class_labels: list[str] | None = None
    batch: Literal["auto", "batched", "per_row"] = "auto"
    weaver: WeaverFiles | None = None
    salt: bool = False
    tolerance: float = Field(default=DEFAULT_TOLERANCE, gt=0)


@dataclass(frozen=True)
class AdoptionFile:
    spec: FeatureSpec
    adoption: Adoption
    path: Path


@dataclass(frozen=True)
class Plan:
    """The adoption resolved against the model: every input's mapping and preprocessing."""

    inputs: dict[str, InputMapping]
    score: list[str]
    keep: list[str]
    labels: list[str]
    per_row: bool
    trainer: str
    preprocessing: str


@dataclass(frozen=True)
class AdoptReport:
    onnx_path: Path
    model_name: str
    version: int
    per_row: bool
    parity_rows: int
    max_abs_diff: dict[str, float]
    tolerance: float
    labels: list[str]


def load_adoption(path: Path) -> AdoptionFile:
    """Read the YAML; relative weaver paths are taken relative to its folder."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or set(data) - {"features", "adopt"} or "features" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: expected the keys 'features' and 'adopt', found {found}")
    try:
        spec = FeatureSpec.model_validate(data["features"])
        adoption = Adoption.model_validate(data.get("adopt") or {})
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        raise ConfigError(f"invalid adoption file {path}:\n  " + "\n  ".join(problems)) from error
    if adoption.weaver is not None:
        base = Path(path).parent
        adoption = adoption.model_copy(
            update={
                "weaver": WeaverFiles(
                    preprocess=base / p if (p := adoption.weaver.preprocess) else None,
                    data_config=base / c if (c := adoption.weaver.data_config) else None,
                )
            }
        )
    return AdoptionFile(spec, adoption, Path(path))


# -- planning ---------------------------------------------------------------------------------


def _dims(value: Any) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _show(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def bsym_shapes(spec: FeatureSpec) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    if spec.constituents is not None:
        count = spec.constituents.max_count
        shapes[contract.CONSTITUENTS] = [None, count, len(spec.constituents.features)]
        shapes[contract.MASK] = [None, count]
    if spec.global_names:
        shapes[contract.GLOBALS] = [None, len(spec.global_names)]
    return shapes


def plan(proto: Any, spec: FeatureSpec, adoption: Adoption, where: str) -> Plan:
    """Check the mapping against the graph's inputs and outputs; fill in the readers' numbers."""
    graph = proto.graph
    initialisers = {i.name for i in graph.initializer}
    model_inputs = {v.name: v for v in graph.input if v.name not in initialisers}
    output_names = [v.name for v in graph.output]
    available = bsym_shapes(spec)
    mappings = dict(adoption.inputs)
    trainer, found = "onnx", ForeignPreprocessing("none", {})
    if adoption.weaver is not None:
        trainer = "weaver"
        found = read_weaver(adoption.weaver.preprocess, adoption.weaver.data_config)
    elif adoption.salt:
        trainer = "salt"
        found = read_salt({p.key: p.value for p in proto.metadata_props}, list(model_inputs), where)
    unmapped = [name for name in model_inputs if name not in mappings]
    unknown = [name for name in mappings if name not in model_inputs]
    if unmapped or unknown:
        mapped = ", ".join(f"{k} <- {v.tensor}" for k, v in mappings.items()) or "none"
        raise SpecMismatchError(
            f"{where}: the adoption does not fit the model's inputs.\n"
            f"  model inputs: {_describe_inputs(model_inputs)}\n"
            f"  mapped:       {mapped}"
            f"\n  bsym tensors: {', '.join(f'{k}{_show(v)}' for k, v in available.items())}"
            + (f"\n  not mapped: {', '.join(unmapped)}" if unmapped else "")
            + (f"\n  not model inputs: {', '.join(unknown)}" if unknown else "")
        )
    per_row = adoption.batch == "per_row" or (adoption.batch == "auto" and trainer == "salt")
    if not per_row:
        fixed = [n for n, v in model_inputs.items() if (_dims(v) or [1])[0] is not None]
        if fixed:
            shown = ", ".join(f"{n}{_show(_dims(model_inputs[n]))}" for n in fixed)
            raise SpecMismatchError(
                f"{where}: input(s) {shown}"
                " have no dynamic batch axis; export with a dynamic axis 0, or set "
                "'adopt.batch: per_row' to run the model row by row inside the graph"
            )
    resolved: dict[str, InputMapping] = {}
    for name, mapping in mappings.items():
        if name in found.inputs:
            mapping = _with_standardisation(mapping, found.inputs[name], trainer, name, where)
        if trainer == "salt" and mapping.tensor == contract.CONSTITUENTS:
            mapping = mapping.model_copy(update={"drop_padding": True})
        resolved[name] = mapping
        _check_input(name, model_inputs[name], mapping, available, spec, per_row, where)
    score = adoption.score
    labels = adoption.class_labels
    if score is None and trainer == "salt":
        score, salt_labels = salt_outputs(output_names)
        labels = labels or list(salt_labels)
    score = score or output_names[:1]
    missing = [name for name in score if name not in output_names]
    if missing:
        raise SpecMismatchError(
            f"{where}: adopt.score names {missing}, the model's outputs are {output_names}"
        )
    keep = adoption.keep
    if keep is None:
        keep = [n for n in output_names if n not in score and _fixed_row(graph, n, per_row)]
    clash = [n for n in keep if n in (contract.SCORE, *contract.INPUTS) or n in score]
    if clash or any(n not in output_names for n in keep):
        raise SpecMismatchError(
            f"{where}: adopt.keep {keep}: every entry must be an output of the model "
            f"({output_names}), not in adopt.score and not named like a bsym tensor"
        )
    if labels is None and found.labels is not None:
        labels = list(found.labels)
    return Plan(
        resolved, list(score), list(keep), list(labels or []), per_row, trainer, found.source
    )


def _fixed_row(graph: Any, name: str, per_row: bool) -> bool:
    value = next(v for v in graph.output if v.name == name)
    dims = _dims(value)
    row = dims if per_row else dims[1:]
    return all(d is not None for d in row)


def _describe_inputs(inputs: dict[str, Any]) -> str:
    import onnx

    return ", ".join(
        f"{n}: {onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)}"
        f"{_show(_dims(v))}"
        for n, v in inputs.items()
    )


def _with_standardisation(
    mapping: InputMapping, found: Standardisation, trainer: str, name: str, where: str
) -> InputMapping:
    if found.pad_mode != "constant":
        raise ConfigError(
            f"{where}: {trainer} input '{name}' uses pad_mode '{found.pad_mode}'; bsym pads "
            "with zeros only (pad_mode: constant)"
        )
    if mapping.tensor == contract.MASK:
        return mapping.model_copy(update={"layout": "NFP"}) if trainer == "weaver" else mapping
    update: dict[str, Any] = {
        "centre": mapping.centre or list(found.centre),
        "scale": mapping.scale or list(found.scale),
        "lower": mapping.lower or list(found.lower),
        "upper": mapping.upper or list(found.upper),
    }
    if trainer == "weaver" and mapping.tensor == contract.CONSTITUENTS:
        update["layout"] = "NFP"
    mapping = mapping.model_copy(update=update)
    return mapping


def _columns(mapping: InputMapping, available: dict[str, list[int | None]]) -> list[int]:
    width = available[mapping.tensor][-1]
    assert width is not None
    return mapping.columns if mapping.columns is not None else list(range(width))


def _check_input(
    name: str,
    value: Any,
    mapping: InputMapping,
    available: dict[str, list[int | None]],
    spec: FeatureSpec,
    per_row: bool,
    where: str,
) -> None:
    dims = _dims(value)
    if mapping.tensor == "constant":
        fixed = dims if per_row else dims[1:]
        if any(d is None for d in fixed):
            raise SpecMismatchError(
                f"{where}: input '{name}' {_show(dims)} is mapped to a constant, which needs "
                "fixed dimensions besides the batch axis"
            )
        return
    if mapping.tensor not in available:
        raise SpecMismatchError(
            f"{where}: input '{name}' is mapped to '{mapping.tensor}', but the feature spec "
            f"gives only {', '.join(f'{k}{_show(v)}' for k, v in available.items())}"
        )
    produced = list(available[mapping.tensor])
    if mapping.tensor != contract.MASK:
        columns = _columns(mapping, available)
        width = produced[-1]
        assert width is not None
        bad = [c for c in columns if not 0 <= c < width]
        if bad:
            raise SpecMismatchError(
                f"{where}: input '{name}': columns {bad} lie outside '{mapping.tensor}' "
                f"(features 0..{width - 1}: {_feature_names(spec, mapping.tensor)})"
            )
        produced[-1] = len(columns)
        for key in ("centre", "scale", "lower", "upper"):
            numbers = getattr(mapping, key)
            if numbers is not None and len(numbers) != len(columns):
                raise SpecMismatchError(
                    f"{where}: input '{name}': the preprocessing gives {len(numbers)} {key} "
                    f"values, the mapping feeds {len(columns)} columns of '{mapping.tensor}' "
                    f"({_feature_names(spec, mapping.tensor)})"
                )
    elif len(dims) == 3:
        produced = [produced[0], 1, produced[1]] if mapping.layout == "NFP" else [*produced, 1]
    if mapping.tensor == contract.CONSTITUENTS and mapping.layout == "NFP":
        produced = [produced[0], produced[2], produced[1]]
    if per_row:
        produced = produced[1:]
        if mapping.drop_padding:
            produced[0] = None
        if len(dims) == len(produced) + 1 and dims[0] == 1:
            produced = [1, *produced]
    if (
        len(dims) != len(produced)
        or any(
            d is not None and p is not None and d != p for d, p in zip(dims, produced, strict=True)
        )
        or any(d is not None and p is None for d, p in zip(dims, produced, strict=False))
    ):
        raise SpecMismatchError(
            f"{where}: input '{name}' is {_show(dims)}, but '{mapping.tensor}' as mapped "
            f"(layout {mapping.layout}, {'per row' if per_row else 'batched'}) gives "
            f"{_show(produced)}; feature spec: {_feature_names(spec, mapping.tensor)}"
        )


def _feature_names(spec: FeatureSpec, tensor: str) -> str:
    if tensor == contract.CONSTITUENTS and spec.constituents is not None:
        return ", ".join(f.branch for f in spec.constituents.features)
    if tensor == contract.GLOBALS:
        return ", ".join(spec.global_names)
    return tensor


# -- the numpy reference ----------------------------------------------------------------------


def foreign_input(mapping: InputMapping, inputs: dict[str, Tensor], dtype: Any) -> Tensor:
    """The preprocessing done in numpy: what the original model is fed, batched."""
    if mapping.tensor == contract.MASK:
        mask = inputs[contract.MASK].astype(dtype)
        return mask
    source = inputs[mapping.tensor].astype(np.float64)
    columns = mapping.columns if mapping.columns is not None else list(range(source.shape[-1]))
    values = source[..., columns]
    if mapping.centre is not None:
        values = values - np.asarray(mapping.centre)
    if mapping.scale is not None:
        values = values * np.asarray(mapping.scale)
    if mapping.lower is not None:
        values = np.maximum(values, np.asarray(mapping.lower))
    if mapping.upper is not None:
        values = np.minimum(values, np.asarray(mapping.upper))
    if mapping.tensor == contract.CONSTITUENTS:
        values = values * inputs[contract.MASK][..., None]
    return values.astype(dtype)


def reference_outputs(
    proto: Any, plan_: Plan, inputs: dict[str, Tensor]
) -> dict[str, npt.NDArray[np.float64]]:
    """The original model through ONNX Runtime on the numpy preprocessing."""
    import onnx

    session = cpu_session(proto.SerializeToString(), threads=PARITY_THREADS)
    graph = proto.graph
    types = {
        v.name: (onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type), _dims(v))
        for v in graph.input
    }
    wanted = [*plan_.score, *plan_.keep]
    rows = len(next(iter(inputs.values())))
    parts: dict[str, list[Tensor]] = {name: [] for name in wanted}
    if not plan_.per_row:
        for start in range(0, rows, PARITY_BATCH_SIZES[0]):
            chunk = {k: v[start : start + PARITY_BATCH_SIZES[0]] for k, v in inputs.items()}
            n = len(next(iter(chunk.values())))
            feed = {}
            for name, mapping in plan_.inputs.items():
                dtype, dims = types[name]
                feed[name] = _reference_feed(mapping, chunk, dtype, dims, n)
            for name, result in zip(wanted, session.run(wanted, feed), strict=True):
                parts[name].append(np.asarray(result))
    else:
        prepared = {
            name: (foreign_input(m, inputs, types[name][0]) if m.tensor != "constant" else None)
            for name, m in plan_.inputs.items()
        }
        for row in range(rows):
            feed = {}
            for name, mapping in plan_.inputs.items():
                dtype, dims = types[name]
                value = prepared[name]
                if value is None:
                    feed[name] = np.full([d or 0 for d in dims], mapping.value, dtype=dtype)
                    continue
                one = value[row]
                if mapping.drop_padding:
                    one = one[inputs[contract.MASK][row]]
                else:
                    one = _layout(one[None], mapping, len(dims) + 1)[0]
                if len(dims) == one.ndim + 1:
                    one = one[None]
                feed[name] = np.ascontiguousarray(one)
            for name, result in zip(wanted, session.run(wanted, feed), strict=True):
                parts[name].append(np.asarray(result)[None])
    outputs = {name: np.concatenate(p).astype(np.float64) for name, p in parts.items()}
    score = np.concatenate([outputs[n].reshape(rows, -1) for n in plan_.score], axis=1)
    return {contract.SCORE: score, **{n: outputs[n] for n in plan_.keep}}


def _reference_feed(
    mapping: InputMapping, chunk: dict[str, Tensor], dtype: Any, dims: list[int | None], n: int
) -> Tensor:
    if mapping.tensor == "constant":
        return np.full([n, *(d or 0 for d in dims[1:])], mapping.value, dtype=dtype)
    return np.ascontiguousarray(_layout(foreign_input(mapping, chunk, dtype), mapping, len(dims)))


def _layout(values: Tensor, mapping: InputMapping, rank: int) -> Tensor:
    if mapping.tensor == contract.MASK and rank == 3:
        return values[:, None, :] if mapping.layout == "NFP" else values[:, :, None]
    if mapping.tensor == contract.CONSTITUENTS and mapping.layout == "NFP":
        return values.transpose(0, 2, 1)
    return values


# -- the graph --------------------------------------------------------------------------------


class _Front:
    """Nodes from bsym's tensors to one foreign input; ``batched`` or on one row."""

    def __init__(self, batched: bool) -> None:
        self.nodes: list[Any] = []
        self.initialisers: list[Any] = []
        self.batched = batched
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{FRONT}{hint}_{self._count}"

    def const(self, hint: str, values: Any, dtype: Any) -> str:
        import onnx

        name = self.name(hint)
        self.initialisers.append(onnx.numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        import onnx

        out = self.name(hint)
        self.nodes.append(onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def build(
        self,
        target: str,
        mapping: InputMapping,
        dtype: Any,
        dims: list[int | None],
        source: dict[str, str],
    ) -> None:
        """Write ``target`` from ``source`` (bsym tensor name → graph value)."""
        import onnx

        axis = 1 if self.batched else 0  # the P axis of constituents and mask
        if mapping.tensor == "constant":
            if self.batched:
                batch = self.node("Shape", [next(iter(source.values()))], "shape", start=0, end=1)
                shape = self.node(
                    "Concat", [batch, self.const("dims", dims[1:], np.int64)], "full", axis=0
                )
                fill = onnx.helper.make_tensor(
                    "value",
                    onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                    [1],
                    [mapping.value],
                )
                self.nodes.append(
                    onnx.helper.make_node("ConstantOfShape", [shape], [target], value=fill)
                )
            else:
                self.nodes.append(
                    onnx.helper.make_node(
                        "Identity",
                        [
                            self.const(
                                "constant", np.full([d or 0 for d in dims], mapping.value), dtype
                            )
                        ],
                        [target],
                    )
                )
            return
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        mask = source.get(contract.MASK)
        if mapping.tensor == contract.MASK:
            assert mask is not None
            value = self.node("Cast", [mask], "mask", to=elem)
        else:
            value = self.node("Cast", [source[mapping.tensor]], "cast", to=onnx.TensorProto.FLOAT)
            if mapping.columns is not None:
                index = self.const("columns", mapping.columns, np.int64)
                value = self.node(
                    "Gather",
                    [value, index],
                    "columns",
                    axis=axis + 1
                    if mapping.tensor == contract.CONSTITUENTS
                    else (1 if self.batched else 0),
                )
            for key, op in (
                ("centre", "Sub"),
                ("scale", "Mul"),
                ("lower", "Max"),
                ("upper", "Min"),
            ):
                numbers = getattr(mapping, key)
                if numbers is not None:
                    value = self.node(op, [value, self.const(key, numbers, np.float32)], key)
            if mapping.tensor == contract.CONSTITUENTS:
                assert mask is not None
                as_float = self.node("Cast", [mask], "mask_float", to=onnx.TensorProto.FLOAT)
                column = self.node(
                    "Unsqueeze", [as_float, self.const("axis", [axis + 1], np.int64)], "mask_column"
                )
                value = self.node("Mul", [value, column], "masked")
            value = self.node("Cast", [value], "typed", to=elem)
        if not self.batched and mapping.drop_padding:
            assert mask is not None
            count = self.node(
                "ReduceSum",
                [
                    self.node("Cast", [mask], "count_of", to=onnx.TensorProto.INT64),
                    self.const("all", [0], np.int64),
                ],
                "count",
                keepdims=1,
            )
            value = self.node(
                "Slice",
                [
                    value,
                    self.const("start", [0], np.int64),
                    count,
                    self.const("axis", [0], np.int64),
                ],
                "real",
            )
        elif mapping.tensor == contract.MASK and self.batched and len(dims) == 3:
            where = axis if mapping.layout == "NFP" else axis + 1
            value = self.node(
                "Unsqueeze", [value, self.const("axis", [where], np.int64)], "mask_axis"
            )
        elif mapping.tensor == contract.CONSTITUENTS and mapping.layout == "NFP":
            perm = [0, 2, 1] if self.batched else [1, 0]
            value = self.node("Transpose", [value], "nfp", perm=perm)
        produced_rank = _rank(mapping, self.batched, len(dims))
        if not self.batched and len(dims) == produced_rank + 1:
            value = self.node("Unsqueeze", [value, self.const("axis", [0], np.int64)], "one_row")
        self.nodes.append(onnx.helper.make_node("Identity", [value], [target]))


def _rank(mapping: InputMapping, batched: bool, model_rank: int) -> int:
    base = {contract.CONSTITUENTS: 3, contract.MASK: 2, contract.GLOBALS: 2}[mapping.tensor]
    if mapping.tensor == contract.MASK and batched and model_rank == 3:
        base = 3
    return base if batched else base - 1


def adapted_graph(proto: Any, spec: FeatureSpec, plan_: Plan, name: str) -> Any:
    """The adopted model: bsym's inputs, the front graph, the foreign graph, ``score``."""
    import onnx
    from onnx import compose, helper

    foreign = compose.add_prefix(proto, PREFIX)
    graph = foreign.graph
    shapes = bsym_shapes(spec)
    used: set[str] = {m.tensor for m in plan_.inputs.values() if m.tensor != "constant"}
    if any(m.tensor == contract.CONSTITUENTS or m.drop_padding for m in plan_.inputs.values()):
        used.add(contract.MASK)
    if not used:
        used = {next(iter(shapes))}
    order = [t for t in (contract.CONSTITUENTS, contract.MASK, contract.GLOBALS) if t in used]
    elem = {t: helper.np_dtype_to_tensor_dtype(np.dtype(contract.INPUTS[t].dtype)) for t in order}
    inputs = [helper.make_tensor_value_info(t, elem[t], ["N", *shapes[t][1:]]) for t in order]
    types = {
        v.name[len(PREFIX) :]: (
            onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
            _dims(v),
        )
        for v in graph.input
    }
    initialisers = {i.name for i in graph.initializer}
    wanted = [*plan_.score, *plan_.keep]
    if not plan_.per_row:
        front = _Front(batched=True)
        for target, mapping in plan_.inputs.items():
            dtype, dims = types[target]
            front.build(PREFIX + target, mapping, dtype, dims, {t: t for t in order})
        nodes = [*front.nodes, *graph.node]
        inits = [*front.initialisers, *graph.initializer]
        produced = {n: PREFIX + n for n in wanted}
    else:
        front = _Front(batched=False)
        row_names: dict[str, str] = {t: f"{FRONT}row/{t}" for t in order}
        for target, mapping in plan_.inputs.items():
            dtype, dims = types[target]
            front.build(PREFIX + target, mapping, dtype, dims, row_names)
        body_inputs = [
            helper.make_tensor_value_info(row_names[t], elem[t], shapes[t][1:]) for t in order
        ]
        body_outputs = [
            helper.make_tensor_value_info(
                f"{FRONT}row_out/{n}",
                next(v for v in graph.output if v.name == PREFIX + n).type.tensor_type.elem_type,
                None,
            )
            for n in wanted
        ]
        identities = [
            helper.make_node("Identity", [PREFIX + n], [f"{FRONT}row_out/{n}"]) for n in wanted
        ]
        body = helper.make_graph(
            [*front.nodes, *graph.node, *identities],
            f"{name}_row",
            body_inputs,
            body_outputs,
            initializer=[*front.initialisers, *graph.initializer],
        )
        scanned = [f"{FRONT}scan/{n}" for n in wanted]
        nodes = [helper.make_node("Scan", order, scanned, body=body, num_scan_inputs=len(order))]
        inits = []
        produced = dict(zip(wanted, scanned, strict=True))
        del initialisers
    tail = _Front(batched=True)
    flat = []
    for n in plan_.score:
        as_float = tail.node("Cast", [produced[n]], "score_part", to=onnx.TensorProto.FLOAT)
        flat.append(tail.node("Flatten", [as_float], "score_flat", axis=1))
    tail.nodes.append(
        helper.make_node("Concat", flat, [contract.SCORE], axis=1)
        if len(flat) > 1
        else helper.make_node("Identity", flat, [contract.SCORE])
    )
    for n in plan_.keep:
        tail.nodes.append(helper.make_node("Identity", [produced[n]], [n]))
    outputs = [
        helper.make_tensor_value_info(
            contract.SCORE, onnx.TensorProto.FLOAT, ["N", len(plan_.score)]
        )
    ]
    for n in plan_.keep:
        value = next(v for v in graph.output if v.name == PREFIX + n)
        dims = _dims(value)
        row = dims if plan_.per_row else dims[1:]
        outputs.append(
            helper.make_tensor_value_info(n, value.type.tensor_type.elem_type, ["N", *row])
        )
    merged = helper.make_graph(
        [*nodes, *tail.nodes], name, inputs, outputs, initializer=[*inits, *tail.initialisers]
    )
    model = helper.make_model(merged, opset_imports=list(foreign.opset_import))
    model.ir_version = foreign.ir_version
    for function in foreign.functions:
        model.functions.append(function)
    return model


def _score_width(model: Any, inputs: dict[str, Tensor]) -> int:
    session = cpu_session(model.SerializeToString(), threads=PARITY_THREADS)
    feed = {v.name: inputs[v.name][:2] for v in session.get_inputs()}
    return int(session.run([contract.SCORE], feed)[0].shape[1])


# -- adoption ---------------------------------------------------------------------------------


def adopt(
    model_path: Path,
    spec_path: Path,
    name: str,
    parity_data: Sequence[str],
    repository: Path = contract.DEFAULT_REPOSITORY,
    *,
    version: int | None = None,
    flavour: Flavour = Flavour.production,
    force: bool = False,
    tolerance: float | None = None,
) -> AdoptReport:
    """Adopt ``model_path`` as ``repository/<name>/<version>/model.onnx`` after the parity check."""
    import onnx

    from bsym.export.triton.description import check_model_name
    from bsym.export.triton.repository import write_model_version
    from bsym.training.dataset import read_rows

    check_model_name(name)
    where = str(model_path)
    try:
        proto = onnx.load_model(str(model_path))
    except Exception as error:  # onnx raises DecodeError and OSError subclasses alike
        raise ConfigError(f"cannot read ONNX model {model_path}: {error}") from error
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        proto = onnx.version_converter.convert_version(proto, MIN_OPSET)
    loaded = load_adoption(spec_path)
    spec, adoption = loaded.spec, loaded.adoption
    plan_ = plan(proto, spec, adoption, where)
    tolerance = adoption.tolerance if tolerance is None else tolerance
    if not parity_data:
        raise ConfigError("bsym adopt needs --parity-data FILES: the rows the parity check runs on")
    sources = parse_inputs(parity_data, default_tree=spec.tree)
    batch, _ = read_rows(sources, spec, max_rows=PARITY_MAX_ROWS, with_label=False)
    adopted = adapted_graph(proto, spec, plan_, name)
    inputs = onnx_inputs(batch, [v.name for v in adopted.graph.input])
    width = _score_width(adopted, inputs)
    if plan_.labels and len(plan_.labels) != width:
        raise SpecMismatchError(
            f"{where}: {len(plan_.labels)} class labels {plan_.labels} for a score of "
            f"{width} columns"
        )
    adopted.graph.output[0].type.tensor_type.shape.dim[1].dim_value = width
    check_graph(adopted, f"{where}: the adopted graph")
    expected = reference_outputs(proto, plan_, inputs)
    worst = _parity(adopted, inputs, expected, tolerance, ", ".join(map(str, sources)))
    labels = plan_.labels or ([] if width == 1 else [f"class{k}" for k in range(width)])
    foreign_meta = {p.key: p.value for p in proto.metadata_props if not p.key.startswith("bsym_")}
    metadata = {
        **foreign_meta,
        contract.FEATURE_SPEC_KEY: spec.to_json(),
        contract.CONFIG_KEY: json.dumps(
            {
                "adopted_from": str(model_path),
                "adopted_sha256": contract.sha256_of(Path(model_path)),
                "trainer": plan_.trainer,
                "preprocessing": plan_.preprocessing,
                "per_row": plan_.per_row,
                "inputs": {k: v.model_dump(mode="json") for k, v in plan_.inputs.items()},
                "score": plan_.score,
                "keep": plan_.keep,
            }
        ),
        contract.VERSION_KEY: bsym.__version__,
        contract.GIT_COMMIT_KEY: git_commit(Path(bsym.__file__).resolve().parent),
        contract.MODEL_NAME_KEY: name,
        contract.MODEL_TYPE_KEY: f"{MODEL_TYPE_PREFIX}:{plan_.trainer}",
        contract.CLASS_LABELS_KEY: json.dumps(labels or ["score"]),
        contract.PARITY_MAX_ABS_DIFF_KEY: repr(max(worst.values())),
        contract.PARITY_TOLERANCE_KEY: repr(tolerance),
        contract.PARITY_ROWS_KEY: str(batch.n_rows),
    }
    onnx.helper.set_model_props(adopted, metadata)
    with tempfile.TemporaryDirectory(prefix="bsym-adopt-") as tmp:
        staged = Path(tmp) / contract.MODEL_FILENAME
        onnx.save_model(adopted, str(staged))
        version = write_model_version(
            staged, repository, name, version, flavour=flavour, force=force
        )
    return AdoptReport(
        Path(repository) / name / str(version) / contract.MODEL_FILENAME,
        name,
        version,
        plan_.per_row,
        batch.n_rows,
        worst,
        tolerance,
        labels,
    )


def _parity(
    adopted: Any,
    inputs: dict[str, Tensor],
    expected: dict[str, npt.NDArray[np.float64]],
    tolerance: float,
    source: str,
) -> dict[str, float]:
    session = cpu_session(adopted.SerializeToString(), threads=PARITY_THREADS)
    names = [v.name for v in session.get_inputs()]
    rows = len(inputs[names[0]])
    feed = {n: inputs[n] for n in names}
    worst = worst_differences(
        session, feed, expected, source, candidate="the adopted graph", reference="the original"
    )
    for output, deviation in worst.items():
        if not deviation <= tolerance:
            raise SpecMismatchError(
                f"output '{output}': the adopted graph differs from the original model by up to "
                f"{deviation:.3g} on {rows} rows from {source}, above the tolerance {tolerance:g}; "
                "nothing was written"
            )
    return worst
