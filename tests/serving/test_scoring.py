"""Batch scoring: friend-tree alignment in both layouts, bad inputs, atomic and resumable output."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
import pytest
import typer
import uproot
from typer.testing import CliRunner

from bsym.errors import SpecMismatchError
from bsym.features import Constituents, Feature, FeatureSpec
from bsym.rootio import atomic_output
from bsym.serving import friend_tree
from bsym.serving.backend import Backend, TensorSpec, check_inputs
from bsym.serving.cli import resolve_model, score_command, serve_command
from bsym.serving.friend_tree import plan_columns, read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.prefetch import prefetched
from bsym.serving.scorer import ScoreSummary, score_files

MODEL = "iso_test"
MAX_CELLS = 8


def make_spec(
    *, globals_: tuple[str, ...] = ("Muon_pt",), max_count: int = MAX_CELLS
) -> FeatureSpec:
    return FeatureSpec(
        tree="Muons",
        constituents=Constituents(
            features=[
                Feature(branch="CaloCell_et"),
                Feature(branch="CaloCell_eta", relative_to="Muon_eta"),
                Feature(branch="CaloCell_phi", relative_to="Muon_phi", periodic=True),
            ],
            max_count=max_count,
            sort_by="CaloCell_et",
            link="CaloCell_muonIdx",
        ),
        globals=[Feature(branch=name) for name in globals_],
    )


def make_model(
    path: Path,
    spec: FeatureSpec | None = None,
    *,
    name: str = MODEL,
    model_cells: int = MAX_CELLS,
    metadata: dict[str, str] | None = None,
) -> Path:
    """An ONNX model with the bsym contract whose score is the first global (Muon_pt).

    ``symmetry_weight`` is [sum of the first constituent feature, number of constituents].
    """
    import onnx
    import torch

    class DeepSet(torch.nn.Module):
        def forward(
            self, constituents: torch.Tensor, mask: torch.Tensor, globals: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            weights = mask.to(constituents.dtype)
            summed = (constituents[:, :, 0] * weights).sum(dim=1, keepdim=True)
            count = weights.sum(dim=1, keepdim=True)
            return globals[:, :1], torch.cat([summed, count], dim=1)

    spec = spec or make_spec()
    example = (
        torch.zeros(2, model_cells, 3),
        torch.ones(2, model_cells, dtype=torch.bool),
        torch.ones(2, max(len(spec.global_names), 1)),
    )
    names = ["constituents", "mask", "globals", "score", "symmetry_weight"]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            DeepSet(),
            example,
            str(path),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes={n: {0: "N"} for n in names},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    props = {
        "bsym_feature_spec": spec.to_json(),
        "bsym_model_name": name,
        "bsym_version": "0.1.0",
        "bsym_git_commit": "abc1234",
        "bsym_config": "{}",
        "bsym_class_labels": json.dumps(["prompt"]),
        **(metadata or {}),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        if value:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def make_muons(n_events: int, seed: int, *, empty_events: int = 0) -> dict[str, Any]:
    """Events with 0-3 muons (none in the first ``empty_events``), each with 0-12 cells."""
    rng = np.random.default_rng(seed)
    n_muon = rng.integers(0, 4, n_events)
    n_muon[:empty_events] = 0
    n_mu = int(n_muon.sum())
    n_cell = rng.integers(0, 13, n_mu)
    cells = int(n_cell.sum())
    muon: dict[str, npt.NDArray[Any]] = {
        "pt": rng.uniform(5, 100, n_mu),
        "eta": rng.uniform(-2.4, 2.4, n_mu),
        "phi": rng.uniform(-np.pi, np.pi, n_mu),
        "charge": rng.choice([-1, 1], n_mu).astype(np.int32),
        "pfRelIso03_all": rng.exponential(0.1, n_mu),
        "pfRelIso04_all": rng.exponential(0.15, n_mu),
        "sumTrackPt03": rng.exponential(2.0, n_mu),
        "genPartFlav": rng.choice([1, 5, 0], n_mu).astype(np.int32),
    }
    owner = np.repeat(np.arange(n_mu), n_cell)
    cell = {
        "eta": muon["eta"][owner] + rng.normal(0, 0.2, cells),
        "phi": muon["phi"][owner] + rng.normal(0, 0.2, cells),
        "et": rng.exponential(1.0, cells) + 0.01,
    }
    return {
        "n_muon": n_muon,
        "n_cell": n_cell,
        "muon": muon,
        "cell": cell,
        "event": np.arange(n_events, dtype=np.int64),
        "mass": rng.uniform(60, 120, n_events),
    }


def write_object_file(
    path: Path, data: dict[str, Any], *, tree: str = "Muons", **overrides: Any
) -> Path:
    """One entry per muon (the simulator's isolation_muons_XXX.root layout)."""
    event_of = np.repeat(data["event"], data["n_muon"])
    branches: dict[str, Any] = {f"Muon_{k}": v for k, v in data["muon"].items()}
    branches["dimuon_mass"] = data["mass"][event_of]
    branches["event"] = event_of
    branches["CaloCell"] = ak.zip(
        {k: ak.unflatten(v, data["n_cell"]) for k, v in data["cell"].items()}
    )
    branches.update(overrides)
    branches = {k: v for k, v in branches.items() if v is not None}
    with uproot.recreate(path) as file:
        file.mktree(tree, branches)
    return path


def write_event_file(path: Path, data: dict[str, Any]) -> Path:
    """One entry per event, NanoAOD style (the simulator's isolation_events_XXX.root layout)."""
    rng = np.random.default_rng(0)
    n_muon, n_cell = data["n_muon"], data["n_cell"]
    event_of_muon = np.repeat(np.arange(len(n_muon)), n_muon)
    cells_per_event = np.bincount(event_of_muon, weights=n_cell, minlength=len(n_muon)).astype(int)
    first_muon = np.cumsum(n_muon) - n_muon
    local = np.repeat(np.arange(len(n_cell)) - np.repeat(first_muon, n_muon), n_cell)
    event_of_cell = np.repeat(event_of_muon, n_cell)
    # shuffle cells within each event so the link, not the order, ties a cell to its muon
    order = np.lexsort((rng.random(len(local)), event_of_cell))
    cell = {k: v[order] for k, v in data["cell"].items()}
    cell["muonIdx"] = local[order].astype(np.int32)
    with uproot.recreate(path) as file:
        file.mktree(
            "Events",
            {
                "Muon": ak.zip({k: ak.unflatten(v, n_muon) for k, v in data["muon"].items()}),
                "CaloCell": ak.zip({k: ak.unflatten(v, cells_per_event) for k, v in cell.items()}),
                "dimuon_mass": data["mass"],
                "event": data["event"],
            },
        )
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture()
def backend(model_path: Path) -> Backend:
    return OnnxRuntimeBackend(model_path, threads=1, batch_size=64)


def run(inputs: list[str], backend: Backend, out: Path, **options: Any) -> ScoreSummary:
    return score_files(inputs, backend, out, progress=False, **options)


def test_object_layout_friend_tree_is_aligned(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(300, seed=1)
    source = write_object_file(tmp_path / "muons.root", data)
    summary = run([str(source)], backend, tmp_path / "out", step_size=97)
    assert not summary.failed and len(summary.scored) == 1
    output = tmp_path / "out" / f"muons.{MODEL}.root"
    with uproot.open(output) as file:
        tree = file["Muons"]
        assert tree.num_entries == len(data["muon"]["pt"]) == summary.objects
        assert set(tree.keys()) == {
            MODEL,
            f"{MODEL}_symmetry_weight_0",
            f"{MODEL}_symmetry_weight_1",
        }
        assert tree[MODEL].typename == "float"
        arrays = tree.arrays(library="np")
    np.testing.assert_array_equal(arrays[MODEL], data["muon"]["pt"].astype(np.float32))
    expected_count = np.minimum(data["n_cell"], MAX_CELLS)
    np.testing.assert_array_equal(arrays[f"{MODEL}_symmetry_weight_1"], expected_count)


def test_event_layout_is_jagged_like_the_collection(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(300, seed=2)
    source = write_event_file(tmp_path / "events.root", data)
    summary = run([f"{source}:Events"], backend, tmp_path / "out", step_size=41)
    assert not summary.failed
    with uproot.open(tmp_path / "out" / f"events.{MODEL}.root") as file:
        tree = file["Events"]
        assert tree.num_entries == 300
        assert f"Muon_{MODEL}" in tree and "nMuon" in tree
        scores = tree.arrays(["nMuon", f"Muon_{MODEL}"])
    np.testing.assert_array_equal(scores["nMuon"], data["n_muon"])
    np.testing.assert_array_equal(ak.num(scores[f"Muon_{MODEL}"]), data["n_muon"])
    np.testing.assert_array_equal(
        ak.flatten(scores[f"Muon_{MODEL}"]), data["muon"]["pt"].astype(np.float32)
    )
    assert summary.objects == int(data["n_muon"].sum())


def test_event_layout_slices_without_objects(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(120, seed=15, empty_events=50)
    source = write_event_file(tmp_path / "events.root", data)
    summary = run([f"{source}:Events"], backend, tmp_path / "out", step_size=20)
    assert not summary.failed
    with uproot.open(tmp_path / "out" / f"events.{MODEL}.root") as file:
        scores = file["Events"].arrays()
    np.testing.assert_array_equal(ak.num(scores[f"Muon_{MODEL}"]), data["n_muon"])
    np.testing.assert_array_equal(
        ak.flatten(scores[f"Muon_{MODEL}"]), data["muon"]["pt"].astype(np.float32)
    )


def test_output_branch_names() -> None:
    examples: dict[str, npt.NDArray[np.generic]] = {
        "score": np.zeros((1, 3), np.float32),
        "symmetry_weight": np.zeros((1, 2), np.float32),
        "aux": np.zeros(1, np.int64),
    }
    columns = plan_columns("iso", examples, ["prompt", "b jet", "c"])
    assert [c.name for c in columns] == [
        "iso_prompt",
        "iso_b_jet",
        "iso_c",
        "iso_symmetry_weight_0",
        "iso_symmetry_weight_1",
        "iso_aux",
    ]
    assert [c.dtype for c in columns][-1] == np.int64
    assert [c.name for c in plan_columns("iso", {"score": examples["score"]}, None)] == [
        "iso_0",
        "iso_1",
        "iso_2",
    ]


def test_both_layouts_give_the_same_scores(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(200, seed=3)
    objects = write_object_file(tmp_path / "muons.root", data)
    events = write_event_file(tmp_path / "events.root", data)
    summary = run([str(objects), f"{events}:Events"], backend, tmp_path / "out")
    assert not summary.failed
    with uproot.open(tmp_path / "out" / f"muons.{MODEL}.root") as file:
        per_muon = file["Muons"].arrays(library="np")
    with uproot.open(tmp_path / "out" / f"events.{MODEL}.root") as file:
        per_event = file["Events"].arrays()
    for column in (MODEL, f"{MODEL}_symmetry_weight_0", f"{MODEL}_symmetry_weight_1"):
        np.testing.assert_allclose(
            ak.to_numpy(ak.flatten(per_event[f"Muon_{column}"])), per_muon[column], rtol=1e-6
        )


def test_simulated_files_score_alike_in_both_layouts(
    isolation_sample: Path, tmp_path: Path, backend: Backend
) -> None:
    # no ':Events' needed: a file without the spec's tree is scored through its event tree
    summary = run([str(isolation_sample / "*.root")], backend, tmp_path / "out")
    assert not summary.failed and len(summary.scored) == len(list(isolation_sample.glob("*.root")))
    with uproot.open(isolation_sample / "isolation_events_000.root") as file:
        n_muon = file["Events"]["nMuon"].array(library="np")
    with uproot.open(tmp_path / "out" / f"isolation_muons_000.{MODEL}.root") as file:
        per_muon = file["Muons"].arrays(library="np")
    with uproot.open(tmp_path / "out" / f"isolation_events_000.{MODEL}.root") as file:
        per_event = file["Events"].arrays()
    np.testing.assert_array_equal(per_event["nMuon"], n_muon)
    assert len(per_muon[MODEL]) == n_muon.sum()
    for column in (MODEL, f"{MODEL}_symmetry_weight_0", f"{MODEL}_symmetry_weight_1"):
        np.testing.assert_allclose(
            ak.to_numpy(ak.flatten(per_event[f"Muon_{column}"])), per_muon[column], rtol=1e-6
        )


def test_output_records_its_provenance(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(50, seed=4))
    run([str(source)], backend, tmp_path / "out")
    provenance = read_provenance(tmp_path / "out" / f"muons.{MODEL}.root")
    assert provenance["source_file"] == str(source.resolve())
    assert provenance["source_tree"] == "Muons"
    assert provenance["model_name"] == MODEL
    assert provenance["model_git_commit"] == "abc1234"
    assert provenance["model_bsym_version"] == "0.1.0"
    assert FeatureSpec.from_json(provenance["feature_spec"]) == backend.feature_spec


def test_missing_branch_is_named_with_a_suggestion(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(50, seed=5)
    source = write_object_file(
        tmp_path / "muons.root", data, Muon_pt=None, Muon_pT=data["muon"]["pt"]
    )
    summary = run([str(source)], backend, tmp_path / "out")
    [(where, message)] = summary.failed
    assert where.startswith(str(source))
    assert "'Muon_pt'" in message and "did you mean 'Muon_pT'" in message
    assert not (tmp_path / "out" / f"muons.{MODEL}.root").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_unreadable_files_fail_without_output(
    tmp_path: Path, backend: Backend, damage: str
) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(400, seed=6))
    content = source.read_bytes()
    if damage == "truncated":
        source.write_bytes(content[: len(content) * 2 // 3])
    elif damage == "garbage":
        source.write_bytes(np.random.default_rng(0).bytes(len(content)))
    else:
        source.unlink()
    summary = run([str(source)], backend, tmp_path / "out", step_size=50)
    assert len(summary.failed) == 1 and not summary.results
    assert str(source) in summary.failed[0][0]
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_empty_tree_fails(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "empty.root", make_muons(0, seed=0))
    summary = run([str(source)], backend, tmp_path / "out")
    [(_, message)] = summary.failed
    assert "empty (0 entries)" in message
    assert not (tmp_path / "out" / f"empty.{MODEL}.root").exists()


def test_nan_input_fails_naming_branch_and_entries(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(300, seed=7)
    data["muon"]["pt"][-3] = np.nan
    source = write_object_file(tmp_path / "muons.root", data)
    summary = run([str(source)], backend, tmp_path / "out", step_size=100)
    [(_, message)] = summary.failed
    first = (len(data["muon"]["pt"]) - 3) // 100 * 100
    assert "Muon_pt" in message and "NaN" in message and f"entries {first}.." in message


def test_model_needing_an_absent_branch(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model.onnx", make_spec(globals_=("Muon_pt", "Muon_dxy")))
    source = write_object_file(tmp_path / "muons.root", make_muons(20, seed=8))
    summary = run([str(source)], OnnxRuntimeBackend(model), tmp_path / "out")
    [(_, message)] = summary.failed
    assert "'Muon_dxy'" in message


def test_model_whose_spec_disagrees_with_its_inputs(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model.onnx", make_spec(max_count=16), model_cells=8)
    with pytest.raises(SpecMismatchError, match=r"'constituents'.*\[N, 8, 3\].*\[1, 16, 3\]"):
        run(["whatever.root"], OnnxRuntimeBackend(model), tmp_path / "out")


def test_model_without_feature_spec(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model.onnx", metadata={"bsym_feature_spec": ""})
    with pytest.raises(SpecMismatchError, match="bsym_feature_spec"):
        OnnxRuntimeBackend(model)


def test_input_tensors_are_checked(backend: Backend) -> None:
    good = {
        "constituents": np.zeros((3, MAX_CELLS, 3), np.float32),
        "mask": np.zeros((3, MAX_CELLS), np.bool_),
        "globals": np.zeros((3, 1), np.float32),
    }
    assert backend.predict(good)["score"].shape == (3, 1)
    with pytest.raises(SpecMismatchError, match="'mask': expected dtype bool"):
        backend.predict({**good, "mask": good["mask"].astype(np.float32)})
    with pytest.raises(SpecMismatchError, match=r"'globals': expected shape \[N, 1\].*\[3, 2\]"):
        backend.predict({**good, "globals": np.zeros((3, 2), np.float32)})
    with pytest.raises(SpecMismatchError, match="did you mean 'globals'"):
        backend.predict({**good, "global": good["globals"]})
    with pytest.raises(SpecMismatchError, match="batch size"):
        check_inputs(
            "m",
            [
                TensorSpec("a", np.dtype(np.float32), (None,)),
                TensorSpec("b", np.dtype(np.float32), (None,)),
            ],
            {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)},
        )


def _nan_in_second_half(tmp_path: Path) -> Callable[[], Path]:
    data = make_muons(400, seed=9)

    def spoil() -> Path:
        data["muon"]["pt"][-1] = np.nan
        return write_object_file(tmp_path / "muons.root", data)

    write_object_file(tmp_path / "muons.root", data)
    return spoil


def test_failure_mid_file_leaves_no_output(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(friend_tree, "FLUSH_BYTES", 64)  # write baskets before the failure
    spoil = _nan_in_second_half(tmp_path)
    spoil()
    out = tmp_path / "out"
    summary = run([str(tmp_path / "muons.root")], backend, out, step_size=60)
    assert summary.failed
    assert list(out.iterdir()) == []  # neither the output nor a temporary file


def test_failure_keeps_an_existing_output(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(friend_tree, "FLUSH_BYTES", 64)
    spoil = _nan_in_second_half(tmp_path)
    out = tmp_path / "out"
    assert not run([str(tmp_path / "muons.root")], backend, out).failed
    output = out / f"muons.{MODEL}.root"
    before = output.read_bytes()
    spoil()
    for force in (False, True):  # the input changed: its output is stale either way
        summary = run([str(tmp_path / "muons.root")], backend, out, step_size=60, force=force)
        assert summary.failed and not summary.results
        assert output.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [output.name]


def test_rerun_skips_complete_outputs(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(100, seed=10))
    out = tmp_path / "out"
    assert len(run([str(source)], backend, out).scored) == 1
    output = out / f"muons.{MODEL}.root"
    stamp = output.stat().st_mtime_ns
    summary = run([str(source)], backend, out)
    assert len(summary.skipped) == 1 and not summary.scored
    assert output.stat().st_mtime_ns == stamp
    assert len(run([str(source)], backend, out, force=True).scored) == 1


def test_stale_output_is_replaced(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(100, seed=11))
    out = tmp_path / "out"
    run([str(source)], backend, out)
    write_object_file(source, make_muons(120, seed=12))
    [result] = run([str(source)], backend, out).results
    assert result.status == "scored" and "out-of-date" in result.note
    with uproot.open(out / f"muons.{MODEL}.root") as file:
        assert file["Muons"].num_entries == result.entries


def test_same_stem_twice_is_refused(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(30, seed=13)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_object_file(tmp_path / folder / "muons.root", data)
    summary = run([str(tmp_path / "*" / "muons.root")], backend, tmp_path / "out")
    assert len(summary.scored) == 1
    [(where, message)] = summary.failed
    assert "b" in Path(where.split(":")[0]).parts and "also the output" in message


def cli_app() -> typer.Typer:
    """The real ``bsym`` app, or just the scoring commands while sibling stages are unwritten."""
    try:
        from bsym.cli import app
    except ImportError:
        app = typer.Typer()
        app.command("score")(score_command)
        app.command("serve")(serve_command)
    return app


def test_cli_multi_file_run_reports_the_bad_file(tmp_path: Path, model_path: Path) -> None:
    good = [write_object_file(tmp_path / f"good{k}.root", make_muons(40, seed=k)) for k in (1, 2)]
    bad = tmp_path / "bad.root"
    bad.write_bytes(b"not a ROOT file at all" * 100)
    out = tmp_path / "out"
    args = ["score", str(good[0]), str(bad), str(good[1]), "--model", str(model_path)]
    result = CliRunner().invoke(cli_app(), [*args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"good1.{MODEL}.root", f"good2.{MODEL}.root"]
    text = result.output.replace("\n", "")
    assert "2 scored, 0 skipped, 1 failed" in text and "bad.root" in text
    assert "not a readable ROOT file" in text


def test_cli_resolves_model_names_in_the_repository(tmp_path: Path, model_path: Path) -> None:
    for version in ("1", "2", "10"):
        (tmp_path / "repo" / MODEL / version).mkdir(parents=True)
    (tmp_path / "repo" / MODEL / "10" / "model.onnx").write_bytes(model_path.read_bytes())
    (tmp_path / "repo" / MODEL / "2" / "model.onnx").write_bytes(model_path.read_bytes())
    found = resolve_model(MODEL, tmp_path / "repo")
    assert found == tmp_path / "repo" / MODEL / "10" / "model.onnx"
    with pytest.raises(typer.BadParameter, match=f"did you mean '{MODEL}'"):
        resolve_model("iso_tset", tmp_path / "repo")
    source = write_object_file(tmp_path / "muons.root", make_muons(20, seed=14))
    args = ["score", str(source), "-m", MODEL, "--repository", str(tmp_path / "repo")]
    result = CliRunner().invoke(cli_app(), [*args, "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / f"muons.{MODEL}.root").is_file()


def test_serve_refuses_an_empty_repository(tmp_path: Path) -> None:
    """The real server is tested in test_triton_scoring.py; nothing starts without models."""
    result = CliRunner().invoke(cli_app(), ["serve", "--repository", str(tmp_path)])
    assert result.exit_code == 1 and "holds no model" in result.output


def test_prefetch_passes_items_and_errors_and_stops_early() -> None:
    produced: list[int] = []

    def numbers() -> Iterator[int]:
        for number in range(100):
            produced.append(number)
            yield number
        raise ValueError("producer failed")

    with prefetched(numbers, depth=2) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
    assert len(produced) <= 6  # stopped soon after the consumer left
    with pytest.raises(ValueError, match="producer failed"), prefetched(numbers) as items:
        assert sum(items) == sum(range(100))


def test_sigterm_removes_partials_and_keeps_complete_outputs(
    tmp_path: Path, backend: Backend, model_path: Path
) -> None:
    done = write_object_file(tmp_path / "done.root", make_muons(50, seed=20))
    big = write_object_file(tmp_path / "big.root", make_muons(100_000, seed=21))
    out = tmp_path / "out"
    assert len(run([str(done)], backend, out).scored) == 1
    complete = (out / f"done.{MODEL}.root").read_bytes()
    with atomic_output(out / "host.probe") as probe:
        host = probe.name.split(".")[-4]
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    stale = out / f".big.{MODEL}.root.{host}.{ended.pid}.0123456789abcdef.partial"
    alive = out / f".big.{MODEL}.root.{host}.{os.getpid()}.fedcba9876543210.partial"
    for partial in (stale, alive):
        partial.write_bytes(b"half")
        os.utime(partial, (time.time() - 60,) * 2)

    command = [sys.executable, "-m", "bsym", "score", str(done), str(big)]
    options = ["--model", str(model_path), "--out", str(out), "--no-progress", "--threads", "1"]
    process = subprocess.Popen(
        [*command, *options, "--step-size", "200", "--batch-size", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob(f".big.*.{process.pid}.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    assert not stale.exists()  # removed when the run started
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 143, error
    assert "terminated by SIGTERM" in error and "Traceback" not in error
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [alive.name, f"done.{MODEL}.root", "host.probe"]
    )
    assert (out / f"done.{MODEL}.root").read_bytes() == complete


def test_scoring_replaces_a_planted_symlink_and_writes_no_other_file(
    tmp_path: Path, backend: Backend
) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(50, seed=22))
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "out"
    out.mkdir()
    output = f"muons.{MODEL}.root"
    links = [out / output] + [
        out / f".{output}.{pid}.partial" for pid in range(os.getpid(), os.getpid() + 64)
    ]
    for link in links:
        link.symlink_to(victim)
    summary = run([str(source)], backend, out)
    assert len(summary.scored) == 1, summary.failed
    assert victim.read_text() == "someone else's file"
    assert stat.S_ISREG((out / output).lstat().st_mode)
    assert all(link.is_symlink() for link in links[1:])
    assert len(list(out.iterdir())) == len(links)
