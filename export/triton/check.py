"""``bsym repository check``: does every model of a repository serve what its config records?

Per model: the config parses and names its folder, and every version folder's ``model.onnx``
exists and has the sha256 the config records. ``bsym serve`` refuses a repository with a problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bsym.contract import CONFIG_FILENAME, MODEL_FILENAME, checksum_key, model_versions, sha256_of
from bsym.errors import ConfigError
from bsym.export.triton.lock import model_lock
from bsym.export.triton.parse import parse_config


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a repository: the model, its version (None: the model), the file."""

    model: str
    version: int | None
    path: Path
    message: str

    def __str__(self) -> str:
        version = "" if self.version is None else f" version {self.version}"
        return f"model '{self.model}'{version}: {self.path}: {self.message}"


@dataclass
class RepositoryCheck:
    """What :func:`check_repository` looked at and what it found wrong."""

    repository: Path
    versions: dict[str, list[int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        """A ConfigError naming every problem, if there is one (what ``bsym serve`` says)."""
        if self.problems:
            raise ConfigError(
                f"model repository {self.repository} fails its check "
                f"(bsym repository check --repository {self.repository}), refusing to serve it:"
                + "".join(f"\n  {problem}" for problem in self.problems)
            )


def check_repository(repository: Path, names: Sequence[str] | None = None) -> RepositoryCheck:
    """Check ``names`` (default: every non-hidden folder) of ``repository``."""
    repository = Path(repository)
    report = RepositoryCheck(repository)
    if not repository.is_dir():
        report.problems.append(Problem("-", None, repository, "is not a directory"))
        return report
    if names is None:
        names = sorted(
            p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    for name in names:
        model_dir = repository / name
        if not model_dir.is_dir():
            report.problems.append(Problem(name, None, model_dir, "no such model folder"))
            continue
        with model_lock(model_dir, exclusive=False):
            report.versions[name] = model_versions(model_dir)
            report.problems.extend(check_model(model_dir))
    return report


def check_model(model_dir: Path) -> list[Problem]:
    """The problems of one model folder (call it holding the model's lock)."""
    name = model_dir.name
    config_path = model_dir / CONFIG_FILENAME
    if not config_path.is_file():
        return [Problem(name, None, config_path, "missing")]
    try:
        config = parse_config(config_path.read_text(encoding="utf-8"))
    except ConfigError as error:
        return [Problem(name, None, config_path, str(error))]
    problems = []
    if config.name != name:
        problems.append(
            Problem(name, None, config_path, f"names model '{config.name}', not its folder")
        )
    for version in model_versions(model_dir):
        onnx_path = model_dir / str(version) / MODEL_FILENAME
        parameter = config.parameters.get(checksum_key(version))
        if not onnx_path.is_file():
            problems.append(Problem(name, version, onnx_path, "missing"))
        elif parameter is None or not parameter.string_value:
            problems.append(
                Problem(
                    name,
                    version,
                    config_path,
                    f"has no parameter '{checksum_key(version)}' (the sha256 of {onnx_path})",
                )
            )
        elif (found := sha256_of(onnx_path)) != parameter.string_value:
            problems.append(
                Problem(
                    name,
                    version,
                    onnx_path,
                    f"sha256 is {found} but {CONFIG_FILENAME} records {parameter.string_value}; "
                    "the file was changed after export",
                )
            )
    return problems
