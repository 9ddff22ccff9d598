"""``bsym adopt``: weaver-, salt- and plain-torch-style models adopted, scored, served, refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import uproot
import yaml
from foreign_models import (
    SALT_OFFSETS,
    SALT_SCALES,
    WEAVER_CENTRE,
    WEAVER_SCALE,
    salt_adoption,
    salt_model,
    user_adoption,
    user_model,
    weaver_adoption,
    weaver_core_export,
    weaver_model,
)
from typer.testing import CliRunner

from bsym.errors import BsymError, ConfigError, SpecMismatchError
from bsym.export.adopt import adopt
from bsym.features import FeatureSpec, build_features, detect_layout, required_branches
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files


def muons(data: Path, name: str = "isolation_muons_000.root") -> str:
    return str(data / name)


def bsym_inputs(path: str, spec: FeatureSpec) -> dict[str, Any]:
    with uproot.open(path) as file:
        tree = file[spec.tree]
        layout = detect_layout(tree.keys(), spec)
        arrays = tree.arrays(required_branches(spec, layout, with_label=False))
    return build_features(arrays, spec, layout).inputs()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def weaver_feed(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """weaver's preprocessing in numpy: clip((x - center) * scale, -5, 5), zero padding,
    (N, F, P), mask (N, 1, P)."""
    mask = inputs["mask"]
    x = np.clip((inputs["constituents"] - WEAVER_CENTRE) * WEAVER_SCALE, -5, 5) * mask[..., None]
    return {
        "pf_features": x.transpose(0, 2, 1).astype(np.float32),
        "pf_mask": mask[:, None, :].astype(np.float32),
    }


@pytest.fixture(scope="module")
def adopted(isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adopt")
    parity = [muons(isolation_sample)]
    repo = root / "repository"
    weaver, _, _ = weaver_model(root / "weaver")
    salt = salt_model(root / "salt")
    user = user_model(root / "user")
    reports = {
        "weaver_pfn": adopt(weaver, weaver_adoption(root / "weaver"), "weaver_pfn", parity, repo),
        "salt_toy": adopt(salt, salt_adoption(root / "salt"), "salt_toy", parity, repo),
        "user_net": adopt(user, user_adoption(root / "user"), "user_net", parity, repo),
    }
    return {
        "root": root,
        "repository": repo,
        "reports": reports,
        "weaver": weaver,
        "salt": salt,
        "user": user,
    }


def test_weaver_model_matches_weavers_preprocessing_done_here(
    adopted: dict[str, Any], isolation_sample: Path
) -> None:
    report = adopted["reports"]["weaver_pfn"]
    backend = OnnxRuntimeBackend(report.onnx_path)
    inputs = bsym_inputs(muons(isolation_sample, "isolation_muons_001.root"), backend.feature_spec)
    scores = backend.predict({n: inputs[n] for n in backend.input_names})["score"]
    feed = weaver_feed(inputs)
    (original,) = session(adopted["weaver"]).run(["softmax"], feed)
    mask = inputs["mask"]
    assert scores.shape == (len(mask), 2) and len(mask) > 1000
    np.testing.assert_allclose(scores, original, atol=1e-5)
    # the standardisation matters: unstandardised features give other scores
    raw = {
        "pf_features": inputs["constituents"].transpose(0, 2, 1).copy(),
        "pf_mask": feed["pf_mask"],
    }
    assert np.max(np.abs(session(adopted["weaver"]).run(["softmax"], raw)[0] - scores)) > 1e-2
    metadata = backend.metadata
    assert metadata["bsym_model_type"] == "adopted:weaver"
    assert json.loads(metadata["bsym_class_labels"]) == ["label_prompt", "label_nonprompt"]
    assert float(metadata["bsym_parity_max_abs_diff"]) <= float(metadata["bsym_parity_tolerance"])
    assert int(metadata["bsym_parity_rows"]) == report.parity_rows > 1000


def test_salt_model_runs_row_by_row_in_the_graph(
    adopted: dict[str, Any], isolation_sample: Path
) -> None:
    report = adopted["reports"]["salt_toy"]
    assert report.per_row and report.labels == ["pb", "pc", "pu"]
    backend = OnnxRuntimeBackend(report.onnx_path)
    inputs = bsym_inputs(muons(isolation_sample, "isolation_muons_001.root"), backend.feature_spec)
    scores = backend.predict({n: inputs[n] for n in backend.input_names})["score"]
    original = session(adopted["salt"])
    rows = [0, 1, 7, len(scores) - 1]
    for row in rows:
        jet = ((inputs["globals"][row : row + 1] + SALT_OFFSETS) * SALT_SCALES).astype(np.float32)
        tracks = inputs["constituents"][row][inputs["mask"][row]]
        expected = [
            float(v) for v in original.run(None, {"jet_features": jet, "track_features": tracks})
        ]
        np.testing.assert_allclose(scores[row], expected, atol=1e-5)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert "gnn_config" in backend.metadata


def test_plain_export_keeps_its_auxiliary_output(adopted: dict[str, Any]) -> None:
    backend = OnnxRuntimeBackend(adopted["reports"]["user_net"].onnx_path)
    assert backend.output_names == ("score", "embedding")
    assert set(backend.input_names) == {"constituents", "mask", "globals"}


@pytest.mark.parametrize("model", ["weaver_pfn", "salt_toy", "user_net"])
def test_friend_trees_align_with_their_inputs(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path, model: str
) -> None:
    backend = OnnxRuntimeBackend(adopted["repository"] / model / "1" / "model.onnx")
    files = [muons(isolation_sample), f"{isolation_sample / 'isolation_events_000.root'}:Events"]
    summary = score_files(files, backend, tmp_path, step_size=500, progress=False)
    assert not summary.failed and len(summary.scored) == 2
    expected = {
        "weaver_pfn": ["weaver_pfn_label_prompt", "weaver_pfn_label_nonprompt"],
        "salt_toy": ["salt_toy_pb", "salt_toy_pc", "salt_toy_pu"],
        "user_net": ["user_net", *(f"user_net_embedding_{k}" for k in range(4))],
    }[model]
    trees = []
    for result, prefix in zip(summary.scored, ("", "Muon_"), strict=True):
        with uproot.open(result.output) as file:
            (name,) = [k for k, v in file.classnames().items() if v == "TTree"]
            tree = file[name]
            branches = [prefix + b for b in expected]
            assert tree.keys(filter_name=f"*{model}*") == branches
            trees.append([tree[b].array(library="np") for b in branches])
    # the same muons in both layouts: the object-layout file's rows, entry by entry
    by_object = np.stack(trees[0], axis=1)
    by_event = np.stack([np.concatenate(list(column)) for column in trees[1]], axis=1)
    np.testing.assert_allclose(by_object, by_event, atol=1e-6)
    spec = backend.feature_spec
    inputs = bsym_inputs(muons(isolation_sample), spec)
    direct = backend.predict({n: inputs[n] for n in backend.input_names})["score"]
    np.testing.assert_allclose(by_object[:, : direct.shape[1]], direct, atol=1e-6)


def test_served_by_triton_equals_embedded(adopted: dict[str, Any], isolation_sample: Path) -> None:
    from bsym.serving.serve import ServedRepository
    from bsym.serving.triton_client import TritonBackend
    from bsym.serving.triton_server import find_tritonserver

    try:
        find_tritonserver()
    except BsymError as error:
        pytest.skip(f"tritonserver unavailable: {error}")
    repository = adopted["repository"]
    with ServedRepository(repository, grpc_port=0, http_port=0) as served:
        for model in ("weaver_pfn", "salt_toy", "user_net"):
            reference = OnnxRuntimeBackend(repository / model / "1" / "model.onnx")
            inputs = bsym_inputs(muons(isolation_sample), reference.feature_spec)
            feed = {n: inputs[n] for n in reference.input_names}
            with TritonBackend(served.grpc_url, model, batch_size=500) as backend:
                assert backend.output_names == reference.output_names
                found = backend.predict(feed)
            for name, values in reference.predict(feed).items():
                assert found[name].shape == values.shape
                assert np.max(np.abs(found[name] - values)) <= 1e-5, (model, name)


def test_cli_adopts_and_prints_the_parity(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    from bsym.cli import app

    result = CliRunner().invoke(
        app,
        [
            "adopt",
            str(adopted["weaver"]),
            "--spec",
            str(adopted["root"] / "weaver" / "adopt.yaml"),
            "--name",
            "weaver_cli",
            "--repository",
            str(tmp_path),
            "--parity-data",
            muons(isolation_sample),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity: max |Δ| score" in result.output
    assert (tmp_path / "weaver_cli" / "1" / "model.onnx").is_file()


def test_weaver_cores_own_export_is_adopted_and_scores(
    isolation_sample: Path, tmp_path: Path
) -> None:
    pytest.importorskip("weaver", reason="weaver-core is not installed")
    from bsym.cli import app

    folder = tmp_path / "weaver_core"
    weaver_core_export(folder)
    spec = weaver_adoption(
        folder, weaver={"preprocess": "preprocess.json", "data_config": "data_config.yaml"}
    )
    repo = tmp_path / "repository"
    result = CliRunner().invoke(
        app,
        [
            "adopt",
            str(folder / "model.onnx"),
            "--spec",
            str(spec),
            "--name",
            "weaver_core_pfn",
            "--repository",
            str(repo),
            "--parity-data",
            muons(isolation_sample),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity: max |Δ| score" in result.output
    backend = OnnxRuntimeBackend(repo / "weaver_core_pfn" / "1" / "model.onnx")
    assert float(backend.metadata["bsym_parity_max_abs_diff"]) <= 1e-4
    inputs = bsym_inputs(muons(isolation_sample, "isolation_muons_001.root"), backend.feature_spec)
    scores = backend.predict({n: inputs[n] for n in backend.input_names})["score"]
    (original,) = session(folder / "model.onnx").run(["softmax"], weaver_feed(inputs))
    assert scores.shape == (len(inputs["mask"]), 2) and len(scores) > 1000
    np.testing.assert_allclose(scores, original, atol=1e-5)
    assert np.std(scores[:, 0]) > 1e-3
    summary = score_files(
        [muons(isolation_sample, "isolation_muons_001.root")],
        backend,
        tmp_path / "out",
        progress=False,
    )
    assert not summary.failed and len(summary.scored) == 1
    with uproot.open(summary.scored[0].output) as file:
        (name,) = [k for k, v in file.classnames().items() if v == "TTree"]
        friend = file[name].arrays(library="np")
    np.testing.assert_allclose(friend["weaver_core_pfn_label_prompt"], scores[:, 0], atol=1e-6)


# -- bad input --------------------------------------------------------------------------------


def edited(path: Path, change: Any) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    out = path.with_name("edited.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def test_unmapped_inputs_list_both_sides(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    spec = edited(
        adopted["root"] / "weaver" / "adopt.yaml", lambda d: d["adopt"]["inputs"].pop("pf_mask")
    )
    with pytest.raises(SpecMismatchError) as caught:
        adopt(adopted["weaver"], spec, "bad", [muons(isolation_sample)], tmp_path)
    message = str(caught.value)
    for part in (
        "model inputs: pf_features",
        "pf_mask",
        "not mapped: pf_mask",
        "constituents[?, 32, 3]",
    ):
        assert part in message, message
    assert not (tmp_path / "bad").exists()


def test_feature_count_mismatch_names_the_features(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    def two_columns(data: dict[str, Any]) -> None:
        data["adopt"]["inputs"]["cells"]["columns"] = [0, 1]

    spec = edited(adopted["root"] / "user" / "adopt.yaml", two_columns)
    with pytest.raises(
        SpecMismatchError,
        match=r"input 'cells' is \[\?, 32, 3\], but 'constituents' .* \[\?, 32, 2\].*CaloCell_et",
    ):
        adopt(adopted["user"], spec, "bad", [muons(isolation_sample)], tmp_path)


def test_a_preprocessing_file_for_another_model_is_refused(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    folder = adopted["root"] / "weaver"
    data = json.loads((folder / "preprocess.json").read_text())
    data["pf_features"]["var_names"].append("part_extra")
    data["pf_features"]["var_infos"]["part_extra"] = data["pf_features"]["var_infos"]["part_deta"]
    (tmp_path / "preprocess.json").write_text(json.dumps(data))
    spec = tmp_path / "adopt.yaml"
    spec.write_text((folder / "adopt.yaml").read_text())
    with pytest.raises(
        SpecMismatchError, match=r"gives 4 centre values, the mapping feeds 3 columns"
    ):
        adopt(adopted["weaver"], spec, "bad", [muons(isolation_sample)], tmp_path)


def test_a_fixed_batch_axis_is_refused_unless_run_per_row(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "adopt.yaml"
    text = (
        (adopted["root"] / "salt" / "adopt.yaml").read_text().replace("salt: true", "salt: false")
    )
    spec.write_text(text)
    with pytest.raises(SpecMismatchError, match=r"no dynamic batch axis.*adopt.batch: per_row"):
        adopt(adopted["salt"], spec, "bad", [muons(isolation_sample)], tmp_path)


def test_weaver_wrap_padding_is_refused(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    config = yaml.safe_load((adopted["root"] / "weaver" / "data_config.yaml").read_text())
    config["inputs"]["pf_features"]["pad_mode"] = "wrap"
    (tmp_path / "data_config.yaml").write_text(yaml.safe_dump(config))
    spec = edited(
        adopted["root"] / "weaver" / "adopt.yaml",
        lambda d: d["adopt"].update(weaver={"data_config": "data_config.yaml"}),
    )
    (tmp_path / "adopt.yaml").write_text(spec.read_text())
    with pytest.raises(ConfigError, match="pad_mode 'wrap'"):
        adopt(
            adopted["weaver"], tmp_path / "adopt.yaml", "bad", [muons(isolation_sample)], tmp_path
        )


def test_a_missing_input_is_fed_as_a_constant(
    adopted: dict[str, Any], isolation_sample: Path, tmp_path: Path
) -> None:
    def constant_x(data: dict[str, Any]) -> None:
        data["adopt"]["inputs"]["x"] = {"tensor": "constant", "value": 1.5}

    spec = edited(adopted["root"] / "user" / "adopt.yaml", constant_x)
    report = adopt(adopted["user"], spec, "user_const", [muons(isolation_sample)], tmp_path)
    backend = OnnxRuntimeBackend(report.onnx_path)
    assert set(backend.input_names) == {"constituents", "mask"}
    inputs = bsym_inputs(muons(isolation_sample), backend.feature_spec)
    found = backend.predict({n: inputs[n] for n in backend.input_names})["score"]
    feed = {
        "cells": inputs["constituents"],
        "x": np.full((len(found), 1), 1.5, dtype=np.float32),
    }
    np.testing.assert_allclose(found, session(adopted["user"]).run(["prob"], feed)[0], atol=1e-5)
