"""The one registry of model types, read by config validation and by the model builder.

A family is a module of :mod:`bsym.training.models` with ``CONFIGS`` (its config classes)
and ``MODELS`` (its model classes); this module finds every such module, so a new model type
is one new module and nothing else edited.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Annotated, Any, Union

from pydantic import Field

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch, FeatureSpec
from bsym.training.models.base import BsymModel, ModelSettings

NOT_FAMILIES = frozenset({"base", "registry"})


@functools.cache
def families() -> tuple[ModuleType, ...]:
    """The family modules of this package, in name order."""
    package = importlib.import_module("bsym.training.models")
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if info.name not in NOT_FAMILIES
    )
    return tuple(importlib.import_module(f"bsym.training.models.{name}") for name in names)


@functools.cache
def config_classes() -> tuple[type[ModelSettings], ...]:
    """Every model config class, one per model type."""
    classes = tuple(cls for family in families() for cls in _listed(family, "CONFIGS"))
    types = [config_type(cls) for cls in classes]
    repeated = sorted({t for t in types if types.count(t) > 1})
    if repeated:
        raise RuntimeError(f"model type(s) {repeated} are defined by more than one config class")
    return classes


@functools.cache
def model_classes() -> dict[str, type[BsymModel]]:
    """Every model class by its ``kind`` (the model type checkpoints record)."""
    return {cls.kind: cls for family in families() for cls in _listed(family, "MODELS")}


def _listed(family: ModuleType, name: str) -> tuple[Any, ...]:
    listed = getattr(family, name, None)
    if not isinstance(listed, tuple):
        raise RuntimeError(
            f"{family.__name__} is in bsym.training.models but has no tuple {name}; "
            "a model family lists its CONFIGS and MODELS"
        )
    return listed


def model_types() -> tuple[str, ...]:
    """The names of the model types, as ``model.type`` accepts them."""
    return tuple(config_type(cls) for cls in config_classes())


def config_type(cls: type[ModelSettings]) -> str:
    default = cls.model_fields["type"].default
    if not isinstance(default, str):
        raise RuntimeError(f"{cls.__name__} has no literal default for 'type'")
    return default


def model_config_annotation() -> Any:
    """The pydantic annotation of ``TrainConfig.model``: the tagged union of every config."""
    return Annotated[Union[config_classes()], Field(discriminator="type")]  # noqa: UP007


def build_model(settings: ModelSettings, spec: FeatureSpec, batch: FeatureBatch) -> BsymModel:
    """Construct the configured model for ``batch``'s shapes and fit it to that (training) data."""
    model = settings.build(spec, batch)
    if batch.globals is None and "globals" in model.input_names:
        raise ConfigError(f"model type '{model.kind}' needs globals, but the batch has none")
    model.prepare(batch)
    return model


def model_from_kwargs(kind: str, kwargs: dict[str, Any]) -> BsymModel:
    """Rebuild an (unfitted) model from its checkpointed type and constructor kwargs."""
    classes = model_classes()
    if kind not in classes:
        raise SpecMismatchError(
            f"unknown model type '{kind}'; this bsym knows {', '.join(classes)}"
        )
    return classes[kind](**kwargs)
