"""Write a model into a Triton model repository, and derive one flavour's repository from another.

Files are staged in a temporary directory inside the repository and renamed into place, so a
failed write leaves the repository as it was. Every ``model.onnx`` is checked against the
sha256 its config records before it is served.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from bsym.contract import (
    BACKEND_FILENAME,
    CONFIG_FILENAME,
    LABELS_FILENAME,
    MODEL_FILENAME,
    checksum_key,
    model_versions,
    repository_models,
    sha256_of,
)
from bsym.errors import ConfigError
from bsym.export.triton.check import check_repository
from bsym.export.triton.common import DEFAULT_CPU_INSTANCES, Flavour
from bsym.export.triton.description import (
    Batching,
    TritonModelConfig,
    check_model_name,
    describe_onnx,
)
from bsym.export.triton.lock import model_lock
from bsym.export.triton.parse import (
    model_from_config,
    parse_config,
    rejects_nonfinite,
    served_by_version,
)
from bsym.export.triton.render import flavour_of, render_config

BACKEND_PACKAGE = "bsym.serving.triton_backend"
"""Where the Python-backend ``model.py`` of the cpu flavour lies, read as package data."""


def write_model_repository(
    onnx_path: Path,
    repository: Path,
    name: str,
    version: int,
    *,
    flavour: Flavour,
    force: bool = False,
    batching: Batching | None = None,
    cpu_instances: int = DEFAULT_CPU_INSTANCES,
) -> Path:
    """Write ``repository/<name>/`` (config, labels, ``<version>/model.onnx``) and return it.

    The ``cpu`` flavour also gets ``<version>/model.py``. Other versions already in the model
    directory are kept, and must share this model's tensors, labels and flavour because one
    ``config.pbtxt`` serves them all; their checksums are carried over.
    """
    write_model_version(
        onnx_path,
        repository,
        name,
        version,
        flavour=flavour,
        force=force,
        batching=batching,
        cpu_instances=cpu_instances,
    )
    return Path(repository) / name


def write_model_version(
    onnx_path: Path,
    repository: Path,
    name: str,
    version: int | None,
    *,
    flavour: Flavour,
    force: bool = False,
    batching: Batching | None = None,
    cpu_instances: int = DEFAULT_CPU_INSTANCES,
) -> int:
    """:func:`write_model_repository`, returning the version written; ``None`` takes the next
    free one, chosen under the model's lock so that concurrent exports never take the same."""
    flavour = flavour_of(flavour)
    if version is not None and version < 1:
        raise ConfigError(f"model '{name}': version must be a positive integer, got {version}")
    onnx_path = Path(onnx_path)
    model_dir = Path(repository) / name
    check_model_name(name)
    with model_lock(model_dir):
        if version is None:
            version = max(model_versions(model_dir), default=0) + 1
        _write_locked(onnx_path, model_dir, version, flavour, force, batching, cpu_instances)
    return version


def _write_locked(
    onnx_path: Path,
    model_dir: Path,
    version: int,
    flavour: Flavour,
    force: bool,
    batching: Batching | None,
    cpu_instances: int,
) -> Path:
    repository, name = model_dir.parent, model_dir.name
    version_dir = model_dir / str(version)
    if version_dir.exists() and not force:
        raise ConfigError(
            f"model '{name}' version {version} already exists in {repository}; pass force=True "
            "(--force) to replace it or choose a new version"
        )
    description = describe_onnx(
        onnx_path, name, version, batching=batching, cpu_instances=cpu_instances
    )
    checksums, metadata, reject_nonfinite = _kept_versions(model_dir, version, description, flavour)
    description = description.with_versions(
        {**checksums, **description.checksums}, {**metadata, **description.metadata}
    ).model_copy(update={"reject_nonfinite": reject_nonfinite})

    repository.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repository, prefix=f".{name}.staging-") as tmp:
        staged = Path(tmp) / name
        _stage(staged, onnx_path, description, version, flavour)
        if not model_dir.exists():
            staged.rename(model_dir)
            return model_dir
        if version_dir.exists():
            version_dir.rename(Path(tmp) / "replaced")
        (staged / str(version)).rename(version_dir)
        for filename in (LABELS_FILENAME, CONFIG_FILENAME):
            os.replace(staged / filename, model_dir / filename)
    return model_dir


def _write_backend(version_dir: Path) -> None:
    backend = resources.files(BACKEND_PACKAGE).joinpath(BACKEND_FILENAME)
    (version_dir / BACKEND_FILENAME).write_bytes(backend.read_bytes())


def _stage(
    staged: Path, onnx_path: Path, model: TritonModelConfig, version: int, flavour: Flavour
) -> None:
    version_dir = staged / str(version)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_path, version_dir / MODEL_FILENAME)
    if sha256_of(version_dir / MODEL_FILENAME) != model.checksums[version]:
        raise ConfigError(f"model '{model.name}': {onnx_path} changed while it was being copied")
    if flavour.python_backend:
        _write_backend(version_dir)
    (staged / LABELS_FILENAME).write_text("\n".join(model.labels) + "\n", encoding="utf-8")
    (staged / CONFIG_FILENAME).write_text(render_config(model, flavour), encoding="utf-8")


def _read_labels(model_dir: Path) -> list[str]:
    path = model_dir / LABELS_FILENAME
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _kept_versions(
    model_dir: Path, version: int, model: TritonModelConfig, flavour: Flavour
) -> tuple[dict[int, str], dict[int, dict[str, str]], bool]:
    """Checksums and served metadata of the other versions in ``model_dir``, after checking
    they fit ``model``, and the config's ``reject_nonfinite`` (a user's choice, kept)."""
    others = [other for other in model_versions(model_dir) if other != version]
    config_path = model_dir / CONFIG_FILENAME
    if not others or not config_path.is_file():
        return {}, {}, model.reject_nonfinite
    existing = parse_config(config_path.read_text(encoding="utf-8"))
    new = parse_config(render_config(model, flavour))
    mismatches = [
        what
        for what, old, now in (
            ("backend", (existing.platform, existing.backend), (new.platform, new.backend)),
            ("inputs", list(existing.input), list(new.input)),
            ("outputs", list(existing.output), list(new.output)),
            ("labels", _read_labels(model_dir), list(model.labels)),
        )
        if old != now
    ]
    if mismatches:
        raise ConfigError(
            f"model '{model.name}': versions {others} in {model_dir} differ from the new version "
            f"{version} in {', '.join(mismatches)}; one config.pbtxt serves every version, so "
            "write this model under a new name or into another repository"
        )
    kept = {}
    for other in others:
        parameter = existing.parameters.get(checksum_key(other))
        if parameter is None or not parameter.string_value:
            raise ConfigError(
                f"model '{model.name}': {config_path} has no parameter '{checksum_key(other)}' "
                f"for existing version {other}"
            )
        kept[other] = parameter.string_value
    served = served_by_version(existing)
    kept_served = {other: served[other] for other in others if other in served}
    return kept, kept_served, rejects_nonfinite(existing)


def derive_repository(
    source: Path, target: Path, flavour: Flavour, *, cpu_instances: int = DEFAULT_CPU_INSTANCES
) -> list[str]:
    """Write into ``target`` the ``flavour`` repository of every model in ``source``.

    Configs are regenerated from the source configs (same tensors, batching, versions,
    checksums and served metadata) once :func:`~bsym.export.triton.check.check_repository`
    finds no problem; each version's ``model.onnx`` is linked, not copied. Returns the names.
    """
    flavour = flavour_of(flavour)
    source, target = Path(source), Path(target)
    names = repository_models(source)
    if not names:
        raise ConfigError(
            f"model repository {source} holds no model (no <name>/{CONFIG_FILENAME}); fill it "
            "with bsym export"
        )
    check_repository(source, names).raise_if_failed()
    for name in names:
        _derive_model(source / name, target, flavour, cpu_instances)
    return names


def _derive_model(model_dir: Path, target: Path, flavour: Flavour, cpu_instances: int) -> None:
    config_path = model_dir / CONFIG_FILENAME
    try:
        config = parse_config(config_path.read_text(encoding="utf-8"))
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from error
    labels = _read_labels(model_dir)
    model = model_from_config(config, labels, cpu_instances=cpu_instances)
    destination = target / model.name
    for version in sorted(model.checksums):
        onnx_path = model_dir / str(version) / MODEL_FILENAME
        if not onnx_path.is_file():
            continue  # a version recorded but removed: Triton would not serve it either
        version_dir = destination / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / MODEL_FILENAME).symlink_to(onnx_path.resolve())
        if flavour.python_backend:
            _write_backend(version_dir)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / LABELS_FILENAME).write_text("\n".join(labels) + "\n", encoding="utf-8")
    (destination / CONFIG_FILENAME).write_text(render_config(model, flavour), encoding="utf-8")
