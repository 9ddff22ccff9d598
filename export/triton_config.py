"""Triton model configuration derived from an exported ``model.onnx``.

One description (:class:`TritonModel`, read off the ONNX graph and its metadata) renders to
``config.pbtxt`` in two flavours that agree on tensors and batching:

- ``production``: Triton's ONNX Runtime backend on GPUs (``KIND_GPU``);
- ``cpu``: the Python backend running the same ``model.onnx`` with ONNX Runtime on
  ``KIND_CPU`` instances (``bsym/serving/triton_backend/model.py``), for machines without a GPU.

Both record the sha256 of every version's ``model.onnx`` under a ``parameters`` entry named by
:func:`~bsym.serving.triton_backend.model.checksum_key`; the Python backend refuses to load a
file whose checksum differs.

Both also serve what a client needs to read ROOT files for the model: the ``bsym_*`` entries of
each version's ONNX ``metadata_props`` (feature spec, model name, class labels, bsym version and
git commit) plus ``bsym_spec_version``, as ``parameters`` named ``<version>/<key>``
(:func:`metadata_key`). Triton's model-metadata API gives only tensor names, types and shapes,
and nothing reads the ONNX file's own metadata on the server; the model config, which
``get_model_config`` returns verbatim, is the one place a gRPC client can read them. They are
per version because one ``config.pbtxt`` serves every version of a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import onnx
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tritonclient.grpc import model_config_pb2

from bsym.errors import ConfigError, SpecMismatchError, did_you_mean
from bsym.serving.triton_backend.model import MODEL_FILENAME, checksum_key, sha256_of

Flavour = Literal["production", "cpu"]
FLAVOURS: tuple[Flavour, ...] = ("production", "cpu")

CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
BACKEND_FILENAME = "model.py"
LABELS_KEY = "bsym_class_labels"
SPEC_KEY = "bsym_feature_spec"
SPEC_VERSION_KEY = "bsym_spec_version"
SCORE = "score"
SERVED_METADATA: tuple[str, ...] = (
    "bsym_model_name",
    SPEC_KEY,
    SPEC_VERSION_KEY,
    "bsym_version",
    "bsym_git_commit",
    "bsym_model_type",
    LABELS_KEY,
)
"""ONNX ``metadata_props`` keys served in the config (the training config and parity numbers
stay in the file: clients do not need them)."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METADATA_KEY = re.compile(r"(\d+)/(bsym_\w+)")

_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
}

# The model contract: tensor name -> (Triton type, rank including the batch axis).
_CONTRACT_INPUTS: dict[str, tuple[str, int]] = {
    "constituents": ("TYPE_FP32", 3),
    "mask": ("TYPE_BOOL", 2),
    "globals": ("TYPE_FP32", 2),
}
_CONTRACT_OUTPUTS: dict[str, tuple[str, int]] = {
    SCORE: ("TYPE_FP32", 2),
    "symmetry_weight": ("TYPE_FP32", 2),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Batching(_Frozen):
    """Batch limits and the dynamic batcher's settings, shared by both flavours."""

    max_batch_size: int = Field(default=4096, gt=0)
    preferred_batch_sizes: tuple[int, ...] = Field(
        default=(), description="empty: a quarter of max_batch_size and max_batch_size"
    )
    max_queue_delay_microseconds: int = Field(default=500, ge=0)

    @model_validator(mode="after")
    def _preferred_within_limit(self) -> Batching:
        sizes = self.preferred_batch_sizes
        if any(size <= 0 or size > self.max_batch_size for size in sizes):
            raise ValueError(
                f"preferred_batch_sizes {list(sizes)} must lie in [1, max_batch_size="
                f"{self.max_batch_size}]"
            )
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"preferred_batch_sizes {list(sizes)} must be strictly increasing")
        return self

    def preferred(self) -> tuple[int, ...]:
        """The preferred batch sizes written to the config."""
        if self.preferred_batch_sizes:
            return self.preferred_batch_sizes
        return tuple(sorted({max(1, self.max_batch_size // 4), self.max_batch_size}))


class TensorConfig(_Frozen):
    """One input or output: name, Triton data type, dimensions without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


class TritonModel(_Frozen):
    """Everything ``config.pbtxt`` says about one model, whatever the flavour."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    labels: tuple[str, ...]
    checksums: dict[int, str] = Field(description="version -> sha256 of its model.onnx")
    metadata: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="version -> served bsym_* metadata of its model.onnx"
    )
    batching: Batching = Batching()
    cpu_instances: int = Field(default=2, gt=0, description="KIND_CPU instances (cpu flavour)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        check_model_name(name)
        return name

    @field_validator("checksums")
    @classmethod
    def _valid_checksums(cls, checksums: dict[int, str]) -> dict[int, str]:
        for version, digest in checksums.items():
            if version < 1 or not _SHA256.fullmatch(digest):
                raise ValueError(f"version {version}: '{digest}' is not a lowercase hex sha256")
        return checksums

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, metadata: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
        for version, entries in metadata.items():
            unknown = sorted(set(entries) - set(SERVED_METADATA))
            if version < 1 or unknown:
                raise ValueError(
                    f"version {version}: metadata keys {unknown} are not among {SERVED_METADATA}"
                )
        return metadata

    def with_versions(
        self, checksums: Mapping[int, str], metadata: Mapping[int, Mapping[str, str]]
    ) -> TritonModel:
        """A copy recording ``checksums`` and ``metadata`` instead of the current ones."""
        return TritonModel.model_validate(
            {
                **self.model_dump(),
                "checksums": dict(checksums),
                "metadata": {version: dict(entries) for version, entries in metadata.items()},
            }
        )

    def with_checksums(self, checksums: Mapping[int, str]) -> TritonModel:
        """A copy recording ``checksums`` instead of the current ones."""
        return self.with_versions(checksums, self.metadata)


def check_model_name(name: str) -> None:
    """Triton model names are directory names: refuse separators and hidden names."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model name '{name}' is not usable as a Triton model directory: use letters, "
            "digits, '_', '-' and '.', not starting with '.' or '-'"
        )


def describe_onnx(
    onnx_path: Path,
    name: str,
    version: int = 1,
    *,
    batching: Batching | None = None,
    cpu_instances: int = 2,
) -> TritonModel:
    """Read tensors and class labels off an exported ONNX file and check the model contract."""
    check_model_name(name)
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as error:
        raise ConfigError(f"model '{name}': cannot read ONNX file {onnx_path}: {error}") from error
    graph = proto.graph
    initialisers = {init.name for init in graph.initializer}
    inputs = tuple(
        _tensor(name, value, "input") for value in graph.input if value.name not in initialisers
    )
    outputs = tuple(_tensor(name, value, "output") for value in graph.output)
    _check_contract(name, inputs, outputs)
    score = next(tensor for tensor in outputs if tensor.name == SCORE)
    props = {p.key: p.value for p in proto.metadata_props}
    labels = _labels(name, props, score.dims[0])
    return TritonModel(
        name=name,
        inputs=inputs,
        outputs=outputs,
        labels=labels,
        checksums={version: sha256_of(onnx_path)},
        metadata={version: served_metadata(props, name)},
        batching=batching or Batching(),
        cpu_instances=cpu_instances,
    )


def served_metadata(props: Mapping[str, str], model: str) -> dict[str, str]:
    """The ``metadata_props`` entries a config serves, with the feature spec's version added."""
    served = {key: props[key] for key in SERVED_METADATA if props.get(key)}
    if SPEC_KEY in served:
        try:
            spec = json.loads(served[SPEC_KEY])
        except json.JSONDecodeError as error:
            raise ConfigError(f"model '{model}': '{SPEC_KEY}' is not JSON: {error}") from error
        version = spec.get("version") if isinstance(spec, dict) else None
        if not isinstance(version, int):
            raise ConfigError(f"model '{model}': '{SPEC_KEY}' has no integer 'version'")
        served[SPEC_VERSION_KEY] = str(version)
    return served


def metadata_key(version: int | str, key: str) -> str:
    """Name of the config ``parameters`` entry serving metadata ``key`` of ``version``."""
    return f"{version}/{key}"


def _tensor(model: str, value: onnx.ValueInfoProto, kind: str) -> TensorConfig:
    tensor_type = value.type.tensor_type
    data_type = _ONNX_TO_TRITON.get(tensor_type.elem_type)
    if data_type is None:
        found = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': element type {found} has no Triton type"
        )
    shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    if not shape or shape[0] is not None:
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': expected a dynamic batch axis first, found "
            f"shape {_show(shape)}; export with a dynamic axis 0"
        )
    if any(dim is None for dim in shape[1:]):
        raise SpecMismatchError(
            f"model '{model}' {kind} '{value.name}': expected fixed non-batch dimensions, found "
            f"shape {_show(shape)}"
        )
    return TensorConfig(name=value.name, data_type=data_type, dims=tuple(d or 0 for d in shape[1:]))


def _show(shape: list[int | None]) -> str:
    return "[" + ", ".join("N" if dim is None else str(dim) for dim in shape) + "]"


def _check_contract(
    model: str, inputs: tuple[TensorConfig, ...], outputs: tuple[TensorConfig, ...]
) -> None:
    if not inputs:
        raise SpecMismatchError(f"model '{model}': the graph has no inputs")
    for tensor in inputs:
        if tensor.name not in _CONTRACT_INPUTS:
            hint = did_you_mean(tensor.name, _CONTRACT_INPUTS)
            raise SpecMismatchError(
                f"model '{model}': input '{tensor.name}' is not one of "
                f"{sorted(_CONTRACT_INPUTS)}{hint}"
            )
    if SCORE not in {tensor.name for tensor in outputs}:
        found = [tensor.name for tensor in outputs]
        raise SpecMismatchError(
            f"model '{model}': expected an output '{SCORE}', found {found}"
            f"{did_you_mean(SCORE, found)}"
        )
    for tensor in (*inputs, *outputs):
        expected = _CONTRACT_INPUTS.get(tensor.name) or _CONTRACT_OUTPUTS.get(tensor.name)
        if expected is None:
            continue
        data_type, rank = expected
        if tensor.data_type != data_type or len(tensor.dims) + 1 != rank:
            raise SpecMismatchError(
                f"model '{model}' tensor '{tensor.name}': expected {data_type} of rank {rank}, "
                f"found {tensor.data_type} of rank {len(tensor.dims) + 1}"
            )
    shapes = {tensor.name: tensor.dims for tensor in inputs}
    if (
        "constituents" in shapes
        and "mask" in shapes
        and shapes["constituents"][0] != shapes["mask"][0]
    ):
        raise SpecMismatchError(
            f"model '{model}': 'constituents' has {shapes['constituents'][0]} constituents but "
            f"'mask' has {shapes['mask'][0]}"
        )


def _labels(model: str, metadata: Mapping[str, str], classes: int) -> tuple[str, ...]:
    raw = metadata.get(LABELS_KEY)
    if raw is None:
        raise ConfigError(
            f"model '{model}': ONNX metadata_props lacks '{LABELS_KEY}' (found keys "
            f"{sorted(metadata)}); export the model with bsym export"
        )
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(f"model '{model}': '{LABELS_KEY}' is not JSON: {error}") from error
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ConfigError(f"model '{model}': '{LABELS_KEY}' must be a JSON list of strings")
    if len(labels) != classes or any(not label or "\n" in label for label in labels):
        raise SpecMismatchError(
            f"model '{model}': output '{SCORE}' has {classes} classes, expected as many "
            f"non-empty one-line labels in '{LABELS_KEY}', found {labels}"
        )
    return tuple(labels)


def render_config(model: TritonModel, flavour: Flavour) -> str:
    """``config.pbtxt`` text for ``model`` in the given flavour."""
    if flavour == "production":
        head = ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"']
        instances = ("KIND_GPU", 1)
    elif flavour == "cpu":
        head = ['backend: "python"']
        instances = ("KIND_CPU", model.cpu_instances)
    else:
        raise ConfigError(f"unknown Triton config flavour '{flavour}'; expected one of {FLAVOURS}")
    batching = model.batching
    lines = [
        f"name: {_quote(model.name)}",
        *head,
        f"max_batch_size: {batching.max_batch_size}",
        *_tensors("input", model.inputs),
        *_tensors("output", model.outputs),
        "instance_group [",
        "  {",
        f"    kind: {instances[0]}",
        f"    count: {instances[1]}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred()))} ]",
        f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}",
        "}",
        *_parameters(
            {
                **{checksum_key(v): d for v, d in sorted(model.checksums.items())},
                **{
                    metadata_key(version, key): entries[key]
                    for version, entries in sorted(model.metadata.items())
                    for key in SERVED_METADATA
                    if key in entries
                },
            }
        ),
    ]
    return "\n".join(lines) + "\n"


def _tensors(field: str, tensors: Iterable[TensorConfig]) -> list[str]:
    blocks = []
    for tensor in tensors:
        block = [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(map(str, tensor.dims))} ]",
        ]
        if field == "output" and tensor.name == SCORE:
            block.append(f"    label_filename: {_quote(LABELS_FILENAME)}")
        blocks.append("\n".join([*block, "  }"]))
    return [f"{field} [", ",\n".join(blocks), "]"]


def _parameters(values: Mapping[str, str]) -> list[str]:
    if not values:
        return []
    entries = [
        f"  {{\n    key: {_quote(key)}\n    value: {{ string_value: {_quote(value)} }}\n  }}"
        for key, value in values.items()
    ]
    return ["parameters [", ",\n".join(entries), "]"]


def _quote(text: str) -> str:
    # JSON string escapes are a subset of protobuf text-format escapes for printable text.
    return json.dumps(text)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` message."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"invalid config.pbtxt: {error}") from error
    return config


def write_model_repository(
    onnx_path: Path,
    repository: Path,
    name: str,
    version: int,
    *,
    flavour: Flavour,
    force: bool = False,
    batching: Batching | None = None,
    cpu_instances: int = 2,
) -> Path:
    """Write ``repository/<name>/`` (config, labels, ``<version>/model.onnx``) and return it.

    The ``cpu`` flavour also gets ``<version>/model.py``. Other versions already in the model
    directory are kept, and must share this model's tensors, labels and flavour because one
    ``config.pbtxt`` serves them all; their checksums are carried over. Files are staged in a
    temporary directory inside ``repository`` and renamed into place.
    """
    if version < 1:
        raise ConfigError(f"model '{name}': version must be a positive integer, got {version}")
    onnx_path = Path(onnx_path)
    repository = Path(repository)
    model_dir = repository / name
    version_dir = model_dir / str(version)
    if version_dir.exists() and not force:
        raise ConfigError(
            f"model '{name}' version {version} already exists in {repository}; pass force=True "
            "(--force) to replace it or choose a new version"
        )
    description = describe_onnx(
        onnx_path, name, version, batching=batching, cpu_instances=cpu_instances
    )
    checksums, metadata = _kept_versions(model_dir, version, description, flavour)
    description = description.with_versions(
        {**checksums, **description.checksums}, {**metadata, **description.metadata}
    )

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


def _stage(
    staged: Path, onnx_path: Path, model: TritonModel, version: int, flavour: Flavour
) -> None:
    version_dir = staged / str(version)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_path, version_dir / MODEL_FILENAME)
    if sha256_of(version_dir / MODEL_FILENAME) != model.checksums[version]:
        raise ConfigError(f"model '{model.name}': {onnx_path} changed while it was being copied")
    if flavour == "cpu":
        backend = resources.files("bsym.serving.triton_backend").joinpath(BACKEND_FILENAME)
        (version_dir / BACKEND_FILENAME).write_bytes(backend.read_bytes())
    (staged / LABELS_FILENAME).write_text("\n".join(model.labels) + "\n", encoding="utf-8")
    (staged / CONFIG_FILENAME).write_text(render_config(model, flavour), encoding="utf-8")


def _kept_versions(
    model_dir: Path, version: int, model: TritonModel, flavour: Flavour
) -> tuple[dict[int, str], dict[int, dict[str, str]]]:
    """Checksums and served metadata of the other versions in ``model_dir``, after checking
    they fit ``model``."""
    others = sorted(
        int(path.name)
        for path in model_dir.glob("*")
        if path.is_dir() and path.name.isdigit() and int(path.name) != version
    )
    config_path = model_dir / CONFIG_FILENAME
    if not others or not config_path.is_file():
        return {}, {}
    existing = parse_config(config_path.read_text(encoding="utf-8"))
    new = parse_config(render_config(model, flavour))
    labels_path = model_dir / LABELS_FILENAME
    old_labels = (
        labels_path.read_text(encoding="utf-8").splitlines() if labels_path.is_file() else []
    )
    mismatches = [
        what
        for what, old, now in (
            ("backend", (existing.platform, existing.backend), (new.platform, new.backend)),
            ("inputs", list(existing.input), list(new.input)),
            ("outputs", list(existing.output), list(new.output)),
            ("labels", old_labels, list(model.labels)),
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
    served = _served_by_version(existing)
    return kept, {other: served[other] for other in others if other in served}


def _served_by_version(config: model_config_pb2.ModelConfig) -> dict[int, dict[str, str]]:
    served: dict[int, dict[str, str]] = {}
    for key, parameter in config.parameters.items():
        match = _METADATA_KEY.fullmatch(key)
        if match and match.group(2) in SERVED_METADATA:
            served.setdefault(int(match.group(1)), {})[match.group(2)] = parameter.string_value
    return served


def model_from_config(
    config: model_config_pb2.ModelConfig, labels: Sequence[str], *, cpu_instances: int = 2
) -> TritonModel:
    """The :class:`TritonModel` a ``config.pbtxt`` of either flavour was rendered from.

    ``render_config(model_from_config(parse_config(text), labels), flavour)`` gives back
    ``text`` for a config this module wrote (the instance count of a ``cpu`` config aside,
    which is ``cpu_instances``), so a repository of one flavour yields the other.
    """

    def tensors(entries: Iterable[model_config_pb2.ModelInput]) -> tuple[TensorConfig, ...]:
        return tuple(
            TensorConfig(
                name=entry.name,
                data_type=model_config_pb2.DataType.Name(entry.data_type),
                dims=tuple(entry.dims),
            )
            for entry in entries
        )

    checksums = {}
    for key, parameter in config.parameters.items():
        match = re.fullmatch(re.escape(checksum_key("@")).replace("@", r"(\d+)"), key)
        if match:
            checksums[int(match.group(1))] = parameter.string_value
    batcher = config.dynamic_batching
    try:
        return TritonModel(
            name=config.name,
            inputs=tensors(config.input),
            outputs=tensors(config.output),
            labels=tuple(labels),
            checksums=checksums,
            metadata=_served_by_version(config),
            batching=Batching(
                max_batch_size=config.max_batch_size,
                preferred_batch_sizes=tuple(batcher.preferred_batch_size),
                max_queue_delay_microseconds=batcher.max_queue_delay_microseconds,
            ),
            cpu_instances=cpu_instances,
        )
    except ValueError as error:  # pydantic's ValidationError
        raise ConfigError(f"model '{config.name}': unusable config.pbtxt: {error}") from error


def derive_repository(
    source: Path, target: Path, flavour: Flavour, *, cpu_instances: int = 2
) -> list[str]:
    """Write into ``target`` the ``flavour`` repository of every model in ``source``.

    Configs are regenerated from the source configs (same tensors, batching, versions,
    checksums and served metadata); each version's ``model.onnx`` is checked against its
    recorded sha256 and linked, not copied. Returns the model names.
    """
    source, target = Path(source), Path(target)
    models = sorted(p for p in source.iterdir() if (p / CONFIG_FILENAME).is_file())
    if not models:
        raise ConfigError(
            f"model repository {source} holds no model (no <name>/{CONFIG_FILENAME}); fill it "
            "with bsym export"
        )
    for model_dir in models:
        config_path = model_dir / CONFIG_FILENAME
        try:
            config = parse_config(config_path.read_text(encoding="utf-8"))
        except ConfigError as error:
            raise ConfigError(f"{config_path}: {error}") from error
        labels_path = model_dir / LABELS_FILENAME
        labels = (
            labels_path.read_text(encoding="utf-8").splitlines() if labels_path.is_file() else []
        )
        model = model_from_config(config, labels, cpu_instances=cpu_instances)
        if model.name != model_dir.name:
            raise ConfigError(
                f"{config_path} names model '{model.name}' but lies in '{model_dir.name}/'"
            )
        destination = target / model.name
        for version, expected in sorted(model.checksums.items()):
            onnx_path = model_dir / str(version) / MODEL_FILENAME
            if not onnx_path.is_file():
                continue  # a version recorded but removed: Triton would not serve it either
            found = sha256_of(onnx_path)
            if found != expected:
                raise ConfigError(
                    f"model '{model.name}' version {version}: sha256 of {onnx_path} is {found} "
                    f"but {config_path} records {expected}; the file was changed after export, "
                    "refusing to serve it"
                )
            version_dir = destination / str(version)
            version_dir.mkdir(parents=True, exist_ok=True)
            (version_dir / MODEL_FILENAME).symlink_to(onnx_path.resolve())
            if flavour == "cpu":
                backend = resources.files("bsym.serving.triton_backend").joinpath(BACKEND_FILENAME)
                (version_dir / BACKEND_FILENAME).write_bytes(backend.read_bytes())
        destination.mkdir(parents=True, exist_ok=True)
        (destination / LABELS_FILENAME).write_text("\n".join(labels) + "\n", encoding="utf-8")
        (destination / CONFIG_FILENAME).write_text(render_config(model, flavour), encoding="utf-8")
    return [model_dir.name for model_dir in models]
