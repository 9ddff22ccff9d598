"""The one config idiom: frozen pydantic models that refuse unknown keys.

:class:`StrictModel` is the base of every config read from YAML (the training config, the
feature spec), whose loaders turn pydantic's errors into readable lines; :class:`Settings`
is the base of configs built in code (simulators, studies), whose construction raises a
:class:`~bsym.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from bsym.errors import ConfigError


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Settings(StrictModel):
    """Settings built in code: frozen, unknown keys refused, every check a ConfigError."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            problems = "; ".join(_problem(e["loc"], e["msg"]) for e in error.errors())
            raise ConfigError(f"invalid {type(self).__name__}: {problems}") from error

    def with_overrides(self, **overrides: object) -> Self:
        """These settings with the given fields replaced (``None`` values are ignored)."""
        chosen = {key: value for key, value in overrides.items() if value is not None}
        return type(self)(**{**dict(self), **chosen})


def _problem(location: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{'.'.join(str(part) for part in location)}: {message}" if location else message
