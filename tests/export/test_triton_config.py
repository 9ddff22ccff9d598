"""Triton ``config.pbtxt`` from an ONNX file: contract checks, both flavours, the repository."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from bsym.contract import checksum_key, sha256_of
from bsym.errors import ConfigError, SpecMismatchError
from bsym.export.triton.common import Flavour
from bsym.export.triton.description import (
    DYNAMIC,
    Batching,
    TensorConfig,
    TritonModelConfig,
    describe_onnx,
)
from bsym.export.triton.parse import parse_config
from bsym.export.triton.render import render_config
from bsym.export.triton.repository import write_model_repository

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("BSYM_UPDATE_GOLDEN") == "1"

Shape = list[int | str]
TAGGER_INPUTS: dict[str, tuple[int, Shape]] = {
    "constituents": (TensorProto.FLOAT, ["N", 16, 4]),
    "mask": (TensorProto.BOOL, ["N", 16]),
    "globals": (TensorProto.FLOAT, ["N", 3]),
}
TAGGER_OUTPUTS: dict[str, tuple[int, Shape]] = {
    "score": (TensorProto.FLOAT, ["N", 1]),
    "symmetry_weight": (TensorProto.FLOAT, ["N", 2]),
}


def write_onnx(
    path: Path,
    inputs: dict[str, tuple[int, Shape]] = TAGGER_INPUTS,
    outputs: dict[str, tuple[int, Shape]] = TAGGER_OUTPUTS,
    labels: list[str] | None = None,
    *,
    metadata: bool = True,
) -> Path:
    """An ONNX file with the given tensor signature; config writing never runs the graph."""
    graph = helper.make_graph(
        [],
        "signature",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(
            model,
            {"bsym_class_labels": json.dumps(labels or ["prompt"]), "bsym_model_name": "tagger"},
        )
    onnx.save(model, str(path))
    return path


def golden_model() -> TritonModelConfig:
    """A fixed description, independent of the exporter, for the golden files."""
    return TritonModelConfig(
        name="tagger",
        inputs=(
            TensorConfig(name="constituents", data_type="TYPE_FP32", dims=(DYNAMIC, 4)),
            TensorConfig(name="mask", data_type="TYPE_BOOL", dims=(DYNAMIC,)),
            TensorConfig(name="globals", data_type="TYPE_FP32", dims=(3,)),
        ),
        outputs=(
            TensorConfig(name="score", data_type="TYPE_FP32", dims=(1,)),
            TensorConfig(name="symmetry_weight", data_type="TYPE_FP32", dims=(2,)),
        ),
        labels=("prompt",),
        checksums={1: "0" * 64, 2: "ab" * 32},
    )


@pytest.mark.parametrize("flavour", list(Flavour))
def test_golden_config(flavour: Flavour) -> None:
    """Regenerate with BSYM_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
    text = render_config(golden_model(), flavour)
    golden = GOLDEN / f"triton_config_{flavour.value}.pbtxt"
    if UPDATE_GOLDEN:
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_describe_onnx_reads_tensors_labels_and_checksum(tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "model.onnx", labels=["prompt"])
    model = describe_onnx(path, "tagger", 3)
    assert [(t.name, t.data_type, t.dims) for t in model.inputs] == [
        ("constituents", "TYPE_FP32", (16, 4)),
        ("mask", "TYPE_BOOL", (16,)),
        ("globals", "TYPE_FP32", (3,)),
    ]
    assert [(t.name, t.dims) for t in model.outputs] == [("score", (1,)), ("symmetry_weight", (2,))]
    assert model.labels == ("prompt",)
    assert model.checksums == {3: sha256_of(path)}


def test_dynamic_constituent_axis_is_minus_one(tmp_path: Path) -> None:
    inputs = {
        "constituents": (TensorProto.FLOAT, ["N", "P", 4]),
        "mask": (TensorProto.BOOL, ["N", "P"]),
        "globals": (TensorProto.FLOAT, ["N", 3]),
    }
    model = describe_onnx(write_onnx(tmp_path / "model.onnx", inputs=inputs), "tagger")
    assert [t.dims for t in model.inputs] == [(-1, 4), (-1,), (3,)]
    config = parse_config(render_config(model, Flavour.cpu))
    assert [list(i.dims) for i in config.input] == [[-1, 4], [-1], [3]]


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [("globals", ["N", "G"]), ("constituents", ["N", 16, "F"]), ("score", ["N", "C"])],
)
def test_other_dynamic_axes_are_refused(tmp_path: Path, tensor: str, shape: Shape) -> None:
    inputs, outputs = dict(TAGGER_INPUTS), dict(TAGGER_OUTPUTS)
    table = outputs if tensor == "score" else inputs
    table[tensor] = (table[tensor][0], shape)
    path = write_onnx(tmp_path / "model.onnx", inputs=inputs, outputs=outputs)
    with pytest.raises(SpecMismatchError, match=f"'{tensor}': expected fixed non-batch"):
        describe_onnx(path, "tagger")


def test_globals_only_multiclass_model(tmp_path: Path) -> None:
    path = write_onnx(
        tmp_path / "cone.onnx",
        inputs={"globals": (TensorProto.FLOAT, ["batch", 18])},
        outputs={"score": (TensorProto.FLOAT, ["batch", 3])},
        labels=["prompt", "heavy", "light"],
    )
    config = parse_config(render_config(describe_onnx(path, "cone"), Flavour.production))
    assert [i.name for i in config.input] == ["globals"]
    assert list(config.output[0].dims) == [3]


def test_flavours_agree_on_tensors_and_batching(tmp_path: Path) -> None:
    batching = Batching(max_batch_size=512, preferred_batch_sizes=(64, 512))
    model = describe_onnx(write_onnx(tmp_path / "m.onnx"), "tagger", batching=batching)
    production = parse_config(render_config(model, Flavour.production))
    cpu = parse_config(render_config(model, Flavour.cpu))
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(production, field) == getattr(cpu, field), field
    assert production.max_batch_size == 512
    assert list(production.dynamic_batching.preferred_batch_size) == [64, 512]
    assert production.output[0].label_filename == "labels.txt"
    assert production.parameters[checksum_key(1)].string_value == model.checksums[1]
    assert (production.platform, production.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert (cpu.platform, cpu.backend) == ("", "python")
    kinds = {production.instance_group[0].kind, cpu.instance_group[0].kind}
    assert kinds == {production.instance_group[0].KIND_GPU, cpu.instance_group[0].KIND_CPU}
    assert cpu.instance_group[0].count == 2


def test_default_preferred_batch_sizes() -> None:
    assert Batching().preferred() == (1024, 4096)
    assert Batching(max_batch_size=2).preferred() == (1, 2)
    with pytest.raises(ValidationError, match="must lie in"):
        Batching(max_batch_size=64, preferred_batch_sizes=(128,))
    with pytest.raises(ValidationError, match="strictly increasing"):
        Batching(preferred_batch_sizes=(64, 32))


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({"globals": (TensorProto.FLOAT, [5, 3])}, None, r"dynamic batch axis first.*\[5, 3\]"),
        ({"globals": (TensorProto.FLOAT, ["N", "G"])}, None, "fixed non-batch dimensions"),
        ({"globls": (TensorProto.FLOAT, ["N", 3])}, None, "did you mean 'globals'"),
        ({"mask": (TensorProto.FLOAT, ["N", 16])}, None, "expected TYPE_BOOL of rank 2"),
        (
            {
                "constituents": (TensorProto.FLOAT, ["N", 16, 4]),
                "mask": (TensorProto.BOOL, ["N", 8]),
            },
            None,
            "'constituents' has 16 constituents but 'mask' has 8",
        ),
        (None, {"scores": (TensorProto.FLOAT, ["N", 1])}, "expected an output 'score'"),
        (None, {"score": (TensorProto.STRING, ["N", 1])}, "no Triton type"),
    ],
)
def test_contract_violations_are_named(
    tmp_path: Path,
    inputs: dict[str, tuple[int, Shape]] | None,
    outputs: dict[str, tuple[int, Shape]] | None,
    message: str,
) -> None:
    path = write_onnx(tmp_path / "bad.onnx", inputs or TAGGER_INPUTS, outputs or TAGGER_OUTPUTS)
    with pytest.raises(SpecMismatchError, match=message):
        describe_onnx(path, "bad")


def test_labels_must_exist_and_match_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lacks 'bsym_class_labels'"):
        describe_onnx(write_onnx(tmp_path / "a.onnx", metadata=False), "tagger")
    with pytest.raises(SpecMismatchError, match="has 1 classes"):
        describe_onnx(write_onnx(tmp_path / "b.onnx", labels=["a", "b"]), "tagger")


def test_bad_names_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not usable as a Triton model directory"):
        describe_onnx(write_onnx(tmp_path / "m.onnx"), "../escape")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="cannot read ONNX file"):
        describe_onnx(tmp_path / "junk.onnx", "tagger")
    with pytest.raises(ConfigError, match=r"invalid config\.pbtxt"):
        parse_config("max_batch_size: lots")


@pytest.mark.parametrize("flavour", list(Flavour))
def test_write_model_repository_layout(tmp_path: Path, flavour: Flavour) -> None:
    onnx_path = write_onnx(tmp_path / "model.onnx")
    repository = tmp_path / "repository"
    model_dir = write_model_repository(onnx_path, repository, "tagger", 1, flavour=flavour)
    assert model_dir == repository / "tagger"
    expected = {"config.pbtxt", "labels.txt", "1", "1/model.onnx"}
    if flavour.python_backend:
        expected.add("1/model.py")
        backend = resources.files("bsym.serving.triton_backend").joinpath("model.py")
        assert (model_dir / "1" / "model.py").read_bytes() == backend.read_bytes()
    assert {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")} == expected
    # no staging left behind, only the lock file beside the model
    assert sorted(p.name for p in repository.iterdir()) == [".tagger.lock", "tagger"]
    assert (model_dir / "labels.txt").read_text() == "prompt\n"
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.name == "tagger"
    assert config.parameters[checksum_key(1)].string_value == sha256_of(onnx_path)


def test_existing_version_needs_force(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    write_model_repository(
        write_onnx(tmp_path / "a.onnx"), repository, "tagger", 1, flavour=Flavour.cpu
    )
    replacement = write_onnx(tmp_path / "b.onnx", labels=["signal"])
    with pytest.raises(ConfigError, match="version 1 already exists"):
        write_model_repository(replacement, repository, "tagger", 1, flavour=Flavour.cpu)
    write_model_repository(replacement, repository, "tagger", 1, flavour=Flavour.cpu, force=True)
    assert (repository / "tagger" / "1" / "model.onnx").read_bytes() == replacement.read_bytes()
    assert (repository / "tagger" / "labels.txt").read_text() == "signal\n"
    assert sorted(p.name for p in repository.iterdir()) == [".tagger.lock", "tagger"]


def test_new_version_keeps_the_checksums_of_others(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    first = write_onnx(tmp_path / "a.onnx")
    second = write_onnx(tmp_path / "b.onnx")
    retrained = onnx.load(str(second))
    retrained.doc_string = "retrained"  # same signature, different bytes
    onnx.save(retrained, str(second))
    write_model_repository(first, repository, "tagger", 1, flavour=Flavour.cpu)
    config_path = repository / "tagger" / "config.pbtxt"
    text = config_path.read_text()
    config_path.write_text(text.replace('string_value: "true"', 'string_value: "false"'))
    write_model_repository(second, repository, "tagger", 2, flavour=Flavour.cpu)
    config = parse_config(config_path.read_text())
    parameters = {key: p.string_value for key, p in config.parameters.items()}
    assert {key: value for key, value in parameters.items() if key.startswith("sha256:")} == {
        checksum_key(1): sha256_of(first),
        checksum_key(2): sha256_of(second),
    }
    # served metadata is per version, and kept for the older one too
    assert parameters["1/bsym_model_name"] == parameters["2/bsym_model_name"] == "tagger"
    assert parameters["reject_nonfinite"] == "false"  # the user's choice is kept
    assert (repository / "tagger" / "2" / "model.py").is_file()


def test_new_version_must_fit_the_shared_config(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    write_model_repository(
        write_onnx(tmp_path / "a.onnx"), repository, "tagger", 1, flavour=Flavour.cpu
    )
    wider: dict[str, tuple[int, Shape]] = {
        **TAGGER_INPUTS,
        "globals": (TensorProto.FLOAT, ["N", 5]),
    }
    with pytest.raises(ConfigError, match=r"versions \[1\] .* differ .* in inputs"):
        write_model_repository(
            write_onnx(tmp_path / "b.onnx", wider), repository, "tagger", 2, flavour=Flavour.cpu
        )
    with pytest.raises(ConfigError, match="in backend"):
        write_model_repository(
            write_onnx(tmp_path / "c.onnx"), repository, "tagger", 2, flavour=Flavour.production
        )
    assert sorted(p.name for p in (repository / "tagger").iterdir()) == [
        "1",
        "config.pbtxt",
        "labels.txt",
    ]
