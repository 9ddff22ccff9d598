"""The typed training config: one YAML file, checked at load time, with ``--set`` overrides."""

from __future__ import annotations

import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from bsym.discriminant import Discriminant
from bsym.errors import ConfigError, did_you_mean
from bsym.features import FeatureSpec
from bsym.rootio import atomic_output
from bsym.settings import StrictModel
from bsym.training.cwola import SupervisionConfig
from bsym.training.decorrelation import DecorrelationConfig
from bsym.training.fit import OptimizerConfig
from bsym.training.models.base import ModelSettings, n_classes_of
from bsym.training.models.registry import model_config_annotation, model_types

if TYPE_CHECKING:
    ModelConfig = ModelSettings
else:
    ModelConfig = model_config_annotation()


class DataConfig(StrictModel):
    """Which ROOT files to train on and how the rows are split."""

    train: list[str] = Field(min_length=1, description="inputs in uproot syntax (file.root:tree)")
    tree: str | None = Field(default=None, description="overrides features.tree")
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    max_rows: int | None = Field(default=None, gt=0, description="read at most this many rows")
    train_rows: int | None = Field(
        default=None,
        gt=0,
        description="training rows: the first of the shuffled rows left after test and "
        "validation (default: all of them)",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction + test_fraction must be below 1 to leave training rows"
            )
        return self


class InvarianceConfig(StrictModel):
    """Encouraged invariance: loss = c1·BCE + c2·mean Var(score over an event's copies)."""

    c1: float = Field(default=1.0, ge=0)
    c2: float = Field(default=0.0, ge=0, description="0 switches the invariance term off")


class AugmentationConfig(StrictModel):
    """Rotated copies of every training event (calo-rotation files; see training/augmentation)."""

    mode: Literal["none", "post_detector", "resimulation"] = "none"
    angles: list[float] = Field(
        default_factory=lambda: [45.0 * k for k in range(8)], min_length=1, description="degrees"
    )
    invariance: InvarianceConfig = Field(default_factory=InvarianceConfig)


class TrainConfig(StrictModel):
    """Everything ``bsym train`` needs; stored in the checkpoint and as ``config.yaml``."""

    name: str = Field(description="model name; also names the output branches")
    model: ModelConfig
    features: FeatureSpec
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    seed: int = Field(default=0, ge=0)
    class_labels: list[str] = Field(
        default_factory=lambda: ["signal"], description="what the score is the probability of"
    )
    output_dir: Path = Field(description="default runs/<name>")
    supervision: SupervisionConfig = Field(
        default_factory=SupervisionConfig,
        description="labels from features.label (truth) or from the mass regions (cwola)",
    )
    augmentation: AugmentationConfig | None = Field(
        default=None, description="training-only rotated copies (calo-rotation task)"
    )
    decorrelation: DecorrelationConfig | None = Field(
        default=None, description="training-only decorrelation of the score from a variable"
    )
    class_weights: Literal["balanced"] | list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="loss weight per class: 'balanced' (inverse class frequency) or one each",
    )
    discriminant: Discriminant | None = Field(
        default=None, description="multi-class: D_b from the class probabilities (flavour)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_output_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("output_dir") is None and "name" in data:
            return {**data, "output_dir": f"runs/{data['name']}"}
        return data

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, name: str) -> str:
        if not (name.isascii() and name.isidentifier()):
            raise ValueError(
                f"'{name}' is not a valid identifier (letters, digits and '_', not starting "
                "with a digit); it names output branches"
            )
        return name

    @model_validator(mode="after")
    def _model_fits_features(self) -> TrainConfig:
        self.model.check_features(self.features)
        return self

    @model_validator(mode="after")
    def _decorrelation_without_copies(self) -> TrainConfig:
        augmented = self.augmentation is not None and self.augmentation.mode != "none"
        if self.decorrelation is not None and augmented:
            raise ValueError(
                "decorrelation and augmentation do not combine: the rotated copies carry no "
                "decorrelation variable; drop one of them"
            )
        return self

    @model_validator(mode="after")
    def _classes_agree(self) -> TrainConfig:
        n_classes = n_classes_of(self.features)
        if n_classes > 1 and len(self.class_labels) != n_classes:
            raise ValueError(
                f"class_labels {self.class_labels} must name the {n_classes} classes of "
                "features.label.classes, in order"
            )
        n_weights = max(n_classes, 2)
        if isinstance(self.class_weights, list) and len(self.class_weights) != n_weights:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} values for {n_weights} classes"
            )
        if self.discriminant is not None:
            if n_classes < 3:
                raise ValueError("discriminant needs a label of at least three classes")
            missing = self.discriminant.missing(self.class_labels)
            if missing:
                raise ValueError(
                    f"discriminant class label(s) {missing} are not in class_labels "
                    f"{self.class_labels}"
                )
        return self


def load_config(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``a.b.c=value`` overrides (values parsed as YAML), validate."""
    data = _read_yaml(path)
    for override in overrides:
        keys, value = parse_override(override)
        _set_path(data, keys, value, override)
    return config_from_dict(data, source=str(path), overrides=overrides)


def config_from_dict(
    data: dict[str, Any], *, source: str = "config", overrides: Sequence[str] = ()
) -> TrainConfig:
    """Validate plain data as a :class:`TrainConfig`, turning errors into one ConfigError."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        problems = [_describe(item, overrides) for item in error.errors()]
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(problems)) from error


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the config as YAML that :func:`load_config` reads back to an equal config."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({error})") from error
    return keys, value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, found {type(data).__name__}")
    return data


def _set_path(data: dict[str, Any], keys: list[str], value: Any, override: str) -> None:
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "the config"
        if isinstance(node, dict):
            if last:
                node[key] = value
            elif node.get(key) is None:
                node[key] = {}
            node = node[key]
        elif isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ConfigError(
                    f"override '{override}': '{where}' is a list of {len(node)} items, "
                    f"'{key}' is not an index into it"
                )
            if last:
                node[int(key)] = value
            node = node[int(key)]
        else:
            raise ConfigError(
                f"override '{override}': '{where}' is a {type(node).__name__}, not a mapping"
            )


def _describe(item: Any, overrides: Sequence[str]) -> str:
    """One readable line for one pydantic error, with the user's dotted key."""
    loc: tuple[str | int, ...] = tuple(item["loc"])
    key, owner = _resolve(loc)
    line = _explain(item, key, owner)
    override = _override_for(key, overrides)
    return f"--set {override}: {line}" if override else line


def _explain(item: Any, key: str, owner: type[BaseModel] | None) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        valid = list(owner.model_fields) if owner is not None else []
        hint = did_you_mean(str(item["loc"][-1]), valid)
        return f"unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})"
    if kind == "union_tag_invalid":
        tag = str(item["ctx"]["tag"])
        expected = [t.strip(" '") for t in str(item["ctx"]["expected_tags"]).split(",")]
        hint = did_you_mean(tag, expected)
        return f"{key}.type: unknown type '{tag}'{hint} (one of: {', '.join(expected)})"
    if kind == "union_tag_not_found":
        return f"{key}.type is required (one of: {', '.join(model_types())})"
    message = str(item["msg"]).removeprefix("Value error, ")
    shown = item.get("input")
    scalar = isinstance(shown, str | int | float | bool)
    got = f" (got {shown!r})" if scalar and kind != "value_error" else ""
    return f"{key or 'config'}: {message}{got}"


def _override_for(key: str, overrides: Sequence[str]) -> str | None:
    """The last override that set ``key``, a key inside it, or a mapping holding it."""
    for override in reversed(overrides):
        target = override.partition("=")[0].strip()
        if key and (target == key or target.startswith(key + ".") or key.startswith(target + ".")):
            return override
    return None


def _resolve(loc: tuple[str | int, ...]) -> tuple[str, type[BaseModel] | None]:
    """Map a pydantic error location to the user's dotted key and the model owning its last key.

    Pydantic puts the discriminator value into the location of a tagged union member
    (``model.pfn.phi_size``); the user wrote ``model.phi_size``, so tags are dropped.
    """
    current: Any = TrainConfig
    parts: list[str] = []
    owner: type[BaseModel] | None = None
    for item in loc:
        current = _strip(current)
        if isinstance(current, tuple):
            current = _member_with_tag(current, item)
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            field = current.model_fields.get(str(item))
            current = field.annotation if field is not None else None
        elif get_origin(current) in (list, tuple):
            current = get_args(current)[0]
        else:
            current = None
        parts.append(str(item))
    return ".".join(parts), owner


def _strip(annotation: Any) -> Any:
    """Remove ``Annotated`` and ``None`` from a type; several members come back as a tuple."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = tuple(a for a in get_args(annotation) if a is not type(None))
        return _strip(members[0]) if len(members) == 1 else members
    return annotation


def _member_with_tag(members: tuple[Any, ...], tag: str | int) -> Any:
    for member in members:
        if isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get("type")
            if field is not None and field.default == tag:
                return member
    return None
