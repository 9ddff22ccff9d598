"""Readers of the preprocessing that other trainers ship beside (or inside) their ONNX models.

- weaver-core: the data-config YAML (``inputs: {group: {length, pad_mode, vars: [[name,
  center, scale, min, max, pad_value], ...]}}``, ``labels: {value: [...]}``) and the
  ``preprocess.json`` its ``--export-onnx`` writes (``input_names``, ``output_names`` and per
  group ``var_names``, ``var_length`` and ``var_infos`` with ``median``, ``norm_factor``,
  ``lower_bound``, ``upper_bound``, ``pad``). weaver standardises as
  ``clip((x - center) * scale, min, max)`` and pads after that.
- salt: the ``gnn_config`` JSON in the model's ``metadata_props`` (``inputs`` and
  ``input_sequences``, each a list of ``variables`` with lwtnn's ``offset`` and ``scale``:
  ``(x + offset) * scale``), and the outputs ``<model>_p<flavour>``.

Both give :class:`Standardisation` per ONNX input, which :mod:`bsym.export.adopt` builds
into the graph.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bsym.errors import ConfigError

WEAVER_DEFAULT_BOUNDS = (-5.0, 5.0)
"""weaver's clip bounds where a var gives a center but no min/max."""
UNBOUNDED = 1e32
"""weaver's export_json writes this bound for vars it does not standardise."""
SALT_CONFIG_KEY = "gnn_config"
SALT_OUTPUT = re.compile(r"^(?:(?P<model>\w+?)_)?(?P<label>p[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Standardisation:
    """One ONNX input's preprocessing: per variable ``clip((x - centre) * scale, lower, upper)``."""

    variables: tuple[str, ...]
    centre: tuple[float, ...]
    scale: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    length: int | None = None
    """Padded constituent count the trainer used (weaver's ``length``), if any."""
    pad_mode: str = "constant"


@dataclass(frozen=True)
class ForeignPreprocessing:
    """What a reader found: per ONNX input its standardisation, and the class labels."""

    source: str
    inputs: dict[str, Standardisation]
    labels: tuple[str, ...] | None = None


def read_weaver(preprocess: Path | None, data_config: Path | None) -> ForeignPreprocessing:
    """weaver's ``preprocess.json`` and/or data-config YAML; the JSON's numbers win where both
    are given (it is what the exported model was trained with), the YAML adds ``pad_mode``."""
    if preprocess is None and data_config is None:
        raise ConfigError("adopt.weaver needs 'preprocess' (preprocess.json) or 'data_config'")
    from_yaml = _weaver_yaml(data_config) if data_config is not None else None
    from_json = _weaver_json(preprocess) if preprocess is not None else None
    if from_json is None:
        assert from_yaml is not None
        return from_yaml
    if from_yaml is None:
        return from_json
    inputs = dict(from_json.inputs)
    for name, standard in from_yaml.inputs.items():
        if name not in inputs:
            raise ConfigError(
                f"weaver data config {data_config} has input group '{name}', but {preprocess} "
                f"lists only {sorted(inputs)}: the two files are not of the same model"
            )
        if standard.variables != inputs[name].variables:
            raise ConfigError(
                f"weaver input '{name}': {data_config} lists vars {list(standard.variables)}, "
                f"{preprocess} lists {list(inputs[name].variables)}"
            )
        inputs[name] = Standardisation(**{**inputs[name].__dict__, "pad_mode": standard.pad_mode})
    return ForeignPreprocessing(
        f"{preprocess} + {data_config}", inputs, from_json.labels or from_yaml.labels
    )


def _weaver_json(path: Path) -> ForeignPreprocessing:
    data = _load(path, json.loads)
    names = data.get("input_names")
    if not isinstance(names, list):
        raise ConfigError(f"{path}: not a weaver preprocess.json (no 'input_names' list)")
    inputs = {}
    for name in names:
        group = data.get(name)
        if not isinstance(group, dict) or "var_names" not in group:
            raise ConfigError(f"{path}: input '{name}' has no 'var_names'")
        variables = tuple(str(v) for v in group["var_names"])
        infos = group.get("var_infos", {})
        try:
            rows = [infos[v] for v in variables]
            inputs[name] = Standardisation(
                variables,
                tuple(float(r["median"]) for r in rows),
                tuple(float(r["norm_factor"]) for r in rows),
                tuple(float(r["lower_bound"]) for r in rows),
                tuple(float(r["upper_bound"]) for r in rows),
                int(group["var_length"]) if group.get("var_length") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"{path}: input '{name}': bad or missing var_infos ({error})"
            ) from error
    labels = data.get("output_names")
    return ForeignPreprocessing(
        str(path), inputs, tuple(map(str, labels)) if isinstance(labels, list) else None
    )


def _weaver_yaml(path: Path) -> ForeignPreprocessing:
    data = _load(path, yaml.safe_load)
    groups = data.get("inputs")
    if not isinstance(groups, dict):
        raise ConfigError(f"{path}: not a weaver data config (no 'inputs' mapping)")
    inputs = {}
    for name, group in groups.items():
        entries = [v if isinstance(v, list) else [v] for v in group.get("vars", [])]
        rows = [_weaver_var(path, name, entry) for entry in entries]
        inputs[str(name)] = Standardisation(
            tuple(r[0] for r in rows),
            tuple(r[1] for r in rows),
            tuple(r[2] for r in rows),
            tuple(r[3] for r in rows),
            tuple(r[4] for r in rows),
            int(group["length"]) if group.get("length") is not None else None,
            str(group.get("pad_mode", "constant")),
        )
    labels = (data.get("labels") or {}).get("value")
    return ForeignPreprocessing(
        str(path), inputs, tuple(map(str, labels)) if isinstance(labels, list) else None
    )


def _weaver_var(path: Path, group: str, entry: list[Any]) -> tuple[str, float, float, float, float]:
    name, centre = str(entry[0]), entry[1] if len(entry) > 1 else None
    if centre is None:
        return name, 0.0, 1.0, -UNBOUNDED, UNBOUNDED
    if centre == "auto" or (len(entry) > 2 and entry[2] == "auto"):
        raise ConfigError(
            f"{path}: input '{group}' var '{name}' has center 'auto'; pass the '.auto.yaml' "
            "weaver wrote beside it, or its preprocess.json"
        )
    scale = float(entry[2]) if len(entry) > 2 and entry[2] is not None else 1.0
    lower = float(entry[3]) if len(entry) > 3 else WEAVER_DEFAULT_BOUNDS[0]
    upper = float(entry[4]) if len(entry) > 4 else WEAVER_DEFAULT_BOUNDS[1]
    return name, float(centre), scale, lower, upper


def read_salt(metadata: dict[str, str], input_names: list[str], where: str) -> ForeignPreprocessing:
    """salt's ``gnn_config``: ``inputs`` feeds the first ONNX input (the jet), ``input_sequences``
    the next ones (tracks), in order."""
    raw = metadata.get(SALT_CONFIG_KEY)
    if raw is None:
        raise ConfigError(
            f"{where}: adopt.salt is set but the model has no '{SALT_CONFIG_KEY}' in its "
            f"metadata_props (found {sorted(metadata)})"
        )
    try:
        config = json.loads(raw)
        groups = [*config.get("inputs", []), *config.get("input_sequences", [])]
        if len(groups) != len(input_names):
            raise ConfigError(
                f"{where}: '{SALT_CONFIG_KEY}' describes {len(groups)} inputs "
                f"({[g.get('name') for g in groups]}), the graph takes {len(input_names)} "
                f"({input_names})"
            )
        inputs = {}
        for name, group in zip(input_names, groups, strict=True):
            variables = group["variables"]
            offsets = [float(v.get("offset", 0.0)) for v in variables]
            inputs[name] = Standardisation(
                tuple(str(v["name"]) for v in variables),
                tuple(-o for o in offsets),
                tuple(float(v.get("scale", 1.0)) for v in variables),
                tuple(-UNBOUNDED for _ in variables),
                tuple(UNBOUNDED for _ in variables),
            )
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{where}: unreadable '{SALT_CONFIG_KEY}' ({error})") from error
    return ForeignPreprocessing(f"{where} ({SALT_CONFIG_KEY})", inputs)


def salt_outputs(output_names: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """salt's class-probability outputs (``<model>_p<flavour>`` or ``p<flavour>``) in graph
    order, and their labels (``pb``, ``pc``, ...)."""
    found = [(name, m["label"]) for name in output_names if (m := SALT_OUTPUT.match(name))]
    return [name for name, _ in found], tuple(label for _, label in found)


def _load(path: Path, parse: Any) -> dict[str, Any]:
    try:
        data = parse(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from error
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} is not valid: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, found {type(data).__name__}")
    return data
