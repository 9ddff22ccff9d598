"""The model contract: what a bsym model takes and gives, and how it is stored.

One home for the tensor names and dtypes (features build them, export checks them, serving
sends them), the ONNX ``metadata_props`` keys that ``bsym export`` writes, the file names of
a Triton model repository and the lookup of a model in one. It imports only the standard
library, so every layer (and ``bsym --help``) can use it.

The Triton Python backend (``bsym/serving/triton_backend/model.py``) runs inside Triton and
imports nothing from bsym: it keeps its own copy of the file name and the checksum key, and
a test asserts that copy agrees with this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bsym.errors import ConfigError, did_you_mean

CONSTITUENTS = "constituents"
MASK = "mask"
GLOBALS = "globals"
SCORE = "score"
SYMMETRY_WEIGHT = "symmetry_weight"


@dataclass(frozen=True)
class TensorContract:
    """A tensor's name, numpy dtype name and rank (the batch axis included)."""

    name: str
    dtype: str
    rank: int


INPUTS: dict[str, TensorContract] = {
    CONSTITUENTS: TensorContract(CONSTITUENTS, "float32", 3),
    MASK: TensorContract(MASK, "bool", 2),
    GLOBALS: TensorContract(GLOBALS, "float32", 2),
}
"""``constituents`` [N, P, F], ``mask`` [N, P] (true where a constituent is real), ``globals``
[N, G]; a model takes a subset."""
OUTPUTS: dict[str, TensorContract] = {
    SCORE: TensorContract(SCORE, "float32", 2),
    SYMMETRY_WEIGHT: TensorContract(SYMMETRY_WEIGHT, "float32", 2),
}
"""``score`` [N, C] (probabilities, C = 1 for binary tasks) is always there."""

FEATURE_SPEC_KEY = "bsym_feature_spec"
CONFIG_KEY = "bsym_config"
VERSION_KEY = "bsym_version"
GIT_COMMIT_KEY = "bsym_git_commit"
MODEL_NAME_KEY = "bsym_model_name"
MODEL_TYPE_KEY = "bsym_model_type"
CLASS_LABELS_KEY = "bsym_class_labels"
PARITY_MAX_ABS_DIFF_KEY = "bsym_parity_max_abs_diff"
PARITY_TOLERANCE_KEY = "bsym_parity_tolerance"
PARITY_ROWS_KEY = "bsym_parity_rows"
PRECISION_KEY = "bsym_precision"
"""``int8`` or ``bf16``; absent in an fp32 model. The ``bsym_precision_*`` keys below compare
the model with the fp32 export of the same checkpoint on held-out rows."""
PRECISION_FORMAT_KEY = "bsym_precision_format"
PRECISION_AUC_KEY = "bsym_precision_auc"
PRECISION_AUC_FP32_KEY = "bsym_precision_auc_fp32"
PRECISION_AUC_LOSS_KEY = "bsym_precision_auc_loss"
PRECISION_AUC_TOLERANCE_KEY = "bsym_precision_auc_tolerance"
PRECISION_MAX_ABS_DIFF_KEY = "bsym_precision_max_abs_diff"
PRECISION_ROWS_KEY = "bsym_precision_rows"
PRECISION_CALIBRATION_ROWS_KEY = "bsym_precision_calibration_rows"
PRECISION_SPEEDUP_KEY = "bsym_precision_speedup"
"""Rows/s of the model over rows/s of fp32, one ONNX Runtime CPU thread, measured at export."""
DISCRIMINANT_KEY = "bsym_discriminant"
"""A multi-class model's discriminant (:class:`bsym.discriminant.Discriminant` as JSON)."""
SPEC_VERSION_KEY = "bsym_spec_version"
"""Not in the ONNX file: added where the feature spec is served, so a client can refuse a spec
newer than it reads before parsing it."""

SERVED_METADATA: tuple[str, ...] = (
    MODEL_NAME_KEY,
    FEATURE_SPEC_KEY,
    SPEC_VERSION_KEY,
    VERSION_KEY,
    GIT_COMMIT_KEY,
    MODEL_TYPE_KEY,
    CLASS_LABELS_KEY,
    PRECISION_KEY,
    PRECISION_FORMAT_KEY,
    PRECISION_AUC_LOSS_KEY,
    PRECISION_MAX_ABS_DIFF_KEY,
    DISCRIMINANT_KEY,
)
"""Metadata served in a Triton config, in this order (the training config and parity numbers
stay in the file: clients do not need them); the precision keys only where the model has
them."""

MODEL_FILENAME = "model.onnx"
CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
BACKEND_FILENAME = "model.py"
DEFAULT_REPOSITORY = Path("model_repository")
CHECKSUM_PREFIX = "sha256:"
REJECT_NONFINITE_KEY = "reject_nonfinite"
"""Config ``parameters`` entry (``true``/``false``): whether the cpu flavour's Python backend
refuses requests with NaN or inf inputs."""
_HASH_CHUNK = 1 << 20


def checksum_key(version: int | str) -> str:
    """Name of the config ``parameters`` entry holding the sha256 of ``<version>/model.onnx``."""
    return f"{CHECKSUM_PREFIX}{version}/{MODEL_FILENAME}"


def metadata_key(version: int | str, key: str) -> str:
    """Name of the config ``parameters`` entry serving metadata ``key`` of ``version``."""
    return f"{version}/{key}"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large models do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def repository_models(repository: Path) -> list[str]:
    """Names of the models in a repository: the directories holding a ``config.pbtxt``."""
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILENAME).is_file())


def model_versions(model_dir: Path) -> list[int]:
    """The numbered version directories of a model directory, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def find_model(repository: Path, name: str, version: int | None = None) -> Path:
    """``<repository>/<name>/<version>/model.onnx``; ``version=None`` takes the highest one
    that holds a ``model.onnx``."""
    model_dir = repository / name
    if not model_dir.is_dir():
        names = [p.name for p in repository.iterdir() if p.is_dir()] if repository.is_dir() else []
        raise ConfigError(
            f"no model '{name}' in the model repository {repository}{did_you_mean(name, names)}"
        )
    held = [v for v in model_versions(model_dir) if (model_dir / str(v) / MODEL_FILENAME).is_file()]
    if version is None and held:
        version = held[-1]
    if version is None or version not in held:
        wanted = "numbered version directory" if version is None else f"version {version}"
        raise ConfigError(
            f"{model_dir} has no {wanted} holding {MODEL_FILENAME} (versions with one: "
            f"{held or 'none'})"
        )
    return model_dir / str(version) / MODEL_FILENAME
