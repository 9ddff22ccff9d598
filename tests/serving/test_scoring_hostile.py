"""Scoring bad inputs as a hostile user would (issue 11): model changes, wrong branch shapes,
failing inputs beside good ones, truncated and empty files, directories in tree paths."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from test_scoring import MODEL, cli_app, make_model, make_muons, write_object_file
from typer.testing import CliRunner

from bsym.contract import sha256_of
from bsym.serving.backend import Backend, Tensor
from bsym.serving.cli import print_summary, write_tracebacks
from bsym.serving.friend_tree import read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import ScoreSummary, score_files


def run(inputs: list[str], backend: Backend, out: Path, **options: Any) -> ScoreSummary:
    return score_files(inputs, backend, out, progress=False, **options)


def score_cli(*args: str) -> Any:
    return CliRunner().invoke(cli_app(), ["score", *args, "--no-progress"])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.exists() else []


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two versions of one model that give different scores' provenance (different files)."""
    repo = tmp_path_factory.mktemp("repo")
    for version, commit in (("1", "aaaa111"), ("2", "bbbb222")):
        (repo / MODEL / version).mkdir(parents=True)
        make_model(repo / MODEL / version / "model.onnx", metadata={"bsym_git_commit": commit})
    return repo


def test_provenance_records_the_model_file(tmp_path: Path, repository: Path) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(40, seed=1))
    model = repository / MODEL / "2" / "model.onnx"
    with OnnxRuntimeBackend(model, threads=1) as backend:
        run([str(source)], backend, tmp_path / "out")
    provenance = read_provenance(tmp_path / "out" / f"muons.{MODEL}.root")
    assert provenance["model_name"] == MODEL
    assert provenance["model_version"] == "2"
    assert provenance["model_sha256"] == sha256_of(model)
    assert len(provenance["feature_spec_sha256"]) == 64


def test_new_version_rescores_and_says_why(tmp_path: Path, repository: Path) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(40, seed=2))
    out = tmp_path / "out"
    args = [str(source), "-m", MODEL, "--repository", str(repository), "-o", str(out)]
    (repository / MODEL / "2").rename(tmp_path / "held")  # only version 1 exported yet
    try:
        assert score_cli(*args).exit_code == 0
    finally:
        (tmp_path / "held").rename(repository / MODEL / "2")
    assert read_provenance(out / f"muons.{MODEL}.root")["model_version"] == "1"
    result = score_cli(*args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 scored, 0 skipped, 0 failed" in text
    old, new = (sha256_of(repository / MODEL / v / "model.onnx") for v in ("1", "2"))
    assert f"model changed: version 1 → 2, sha256 {old} → {new}" in text
    assert read_provenance(out / f"muons.{MODEL}.root")["model_sha256"] == new
    assert "0 scored, 1 skipped" in " ".join(score_cli(*args).output.split())


def test_changed_bare_model_file_rescores(tmp_path: Path, repository: Path) -> None:
    source = write_object_file(tmp_path / "muons.root", make_muons(40, seed=3))
    model = tmp_path / "model.onnx"
    out = tmp_path / "out"
    for version in ("1", "2"):
        shutil.copyfile(repository / MODEL / version / "model.onnx", model)
        with OnnxRuntimeBackend(model, threads=1) as backend:
            [result] = run([str(source)], backend, out).results
    assert result.status == "scored"
    old, new = (sha256_of(repository / MODEL / v / "model.onnx") for v in ("1", "2"))
    assert result.note == f"replaced an out-of-date output: model changed: sha256 {old} → {new}"
    assert read_provenance(out / f"muons.{MODEL}.root")["model_version"] == ""


def test_output_without_model_sha256_is_rescored(tmp_path: Path, repository: Path) -> None:
    """An output written before the sha256 was recorded cannot be trusted to be current."""
    source = write_object_file(tmp_path / "muons.root", make_muons(40, seed=4))
    out = tmp_path / "out"
    output = out / f"muons.{MODEL}.root"
    with OnnxRuntimeBackend(repository / MODEL / "1" / "model.onnx", threads=1) as backend:
        run([str(source)], backend, out)
        strings = read_provenance(output)
        with uproot.open(output) as file:
            scores = file["Muons"].arrays(library="np")
        with uproot.recreate(output) as file:
            for key, value in strings.items():
                if key not in {"model_version", "model_sha256", "feature_spec_sha256"}:
                    file[f"bsym/{key}"] = value
            file["Muons"] = scores
        [result] = run([str(source)], backend, out).results
    assert result.status == "scored"
    assert "model changed: version none recorded → 1, sha256 none recorded →" in result.note
    assert read_provenance(output)["model_sha256"] == sha256_of(
        repository / MODEL / "1" / "model.onnx"
    )


@pytest.fixture()
def backend(repository: Path) -> Backend:
    return OnnxRuntimeBackend(repository / MODEL / "1" / "model.onnx", threads=1)


def flat_cells_file(path: Path) -> Path:
    """Constituent branches stored flat (one value per entry) instead of jagged."""
    data = make_muons(60, seed=5)
    n = int(data["n_muon"].sum())
    flat = {f"CaloCell_{k}": np.ones(n) for k in ("et", "eta", "phi")}
    return write_object_file(path, data, CaloCell=None, **flat)


def test_flat_constituent_branch_fails_that_file_only(tmp_path: Path, repository: Path) -> None:
    bad = flat_cells_file(tmp_path / "a_flat.root")
    good = [write_object_file(tmp_path / f"b{k}.root", make_muons(30, seed=k)) for k in (6, 7)]
    out = tmp_path / "out"
    model = repository / MODEL / "1" / "model.onnx"
    result = score_cli(str(bad), *map(str, good), "-m", str(model), "-o", str(out))
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "2 scored, 0 skipped, 1 failed" in text
    assert (
        f"failed: {bad}:Muons: entries 0..86: constituent branch 'CaloCell_et': expected a "
        "jagged branch "
        "(one list per entry), found one value per entry" in text
    )
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == [f"b6.{MODEL}.root", f"b7.{MODEL}.root"]


class FailingOnce:
    """The real backend, except that the first file's first batch meets a bug (a KeyError)."""

    def __init__(self, real: Backend) -> None:
        self.real = real
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def predict(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == 2:  # the first call is the scorer's probe of the outputs
            raise KeyError("no such output 'oops'")
        return self.real.predict(inputs)


def test_unexpected_exception_is_the_file_failure_with_a_logged_traceback(
    tmp_path: Path, backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    sources = [write_object_file(tmp_path / f"m{k}.root", make_muons(30, seed=k)) for k in (1, 2)]
    out = tmp_path / "out"
    summary = run([str(s) for s in sources], FailingOnce(backend), out)  # type: ignore[arg-type]
    assert [r.source for r in summary.scored] == [f"{sources[1]}:Muons"]
    assert summary.failed == [
        (f"{sources[0]}:Muons", "unexpected KeyError: \"no such output 'oops'\"")
    ]
    assert leftovers(out) == []
    log = write_tracebacks(summary, out, debug=False)
    assert log == out / "bsym-score.log"
    assert "Traceback" in log.read_text() and "raise KeyError" in log.read_text()
    print_summary(summary, log=log)
    printed = " ".join(capsys.readouterr().err.split())
    assert f"tracebacks of the unexpected errors: {log}" in printed
    assert write_tracebacks(summary, out, debug=True) is None
    assert "raise KeyError" in capsys.readouterr().err


@pytest.mark.parametrize("order", ["bad first", "good first"])
def test_a_missing_tree_does_not_block_the_default_tree(
    tmp_path: Path, backend: Backend, order: str
) -> None:
    source = write_object_file(tmp_path / "f.root", make_muons(30, seed=8))
    inputs = [f"{source}:Nope", str(source)]
    if order == "good first":
        inputs.reverse()
    out = tmp_path / "out"
    summary = run(inputs, backend, out)
    assert [r.source for r in summary.scored] == [f"{source}:Muons"]
    assert summary.failed == [(f"{source}:Nope", "has no tree 'Nope'; it has Muons (TTree)")]
    assert sorted(p.name for p in out.iterdir()) == [f"f.{MODEL}.root"]


@pytest.mark.parametrize("kept", [0.99, 0.5, 0.1])
def test_truncated_file_is_detected_before_scoring(
    tmp_path: Path, backend: Backend, kept: float
) -> None:
    source = write_object_file(tmp_path / "cut.root", make_muons(400, seed=9))
    good = write_object_file(tmp_path / "good.root", make_muons(30, seed=10))
    content = source.read_bytes()
    size = int(len(content) * kept)
    source.write_bytes(content[:size])
    out = tmp_path / "out"
    summary = run([str(source), str(good)], backend, out)
    # no tree was read, so none is named
    assert summary.failed == [(str(source), f"truncated: {size} of {len(content)} bytes")]
    assert [r.source for r in summary.scored] == [f"{good}:Muons"]
    assert sorted(p.name for p in out.iterdir()) == [f"good.{MODEL}.root"]


def test_zero_byte_file_is_called_empty(tmp_path: Path, backend: Backend) -> None:
    source = tmp_path / "zero.root"
    source.touch()
    summary = run([str(source)], backend, tmp_path / "out")
    assert summary.failed == [(str(source), "empty (0 bytes)")]
    assert not (tmp_path / "out").exists()


def test_tree_in_a_directory(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "nested.root", make_muons(30, seed=11), tree="dir/Muons")
    out = tmp_path / "out"
    summary = run([f"{source}:dir/Muons"], backend, out)
    assert [r.source for r in summary.scored] == [f"{source}:dir/Muons"], summary.failed
    with uproot.open(out / f"nested.{MODEL}.root") as file, uproot.open(source) as original:
        assert file["dir/Muons"].num_entries == original["dir/Muons"].num_entries
    assert len(run([f"{source}:dir/Muons"], backend, out).skipped) == 1
    [(_, message)] = run([f"{source}:dir/Muon"], backend, out).failed
    assert message == (
        "has no tree 'dir/Muon'; did you mean 'dir/Muons'? It has dir (TDirectory), "
        "dir/Muons (TTree)"
    )


def test_jagged_global_names_the_branch(tmp_path: Path, backend: Backend) -> None:
    data = make_muons(40, seed=12)
    n = int(data["n_muon"].sum())
    jagged = ak.unflatten(np.ones(2 * n), np.full(n, 2))
    source = write_object_file(tmp_path / "muons.root", data, Muon_pt=jagged)
    [(_, message)] = run([str(source)], backend, tmp_path / "out").failed
    assert "'Muon_pt'" in message and "jagged" in message


def test_model_outside_the_repository_is_named(tmp_path: Path, repository: Path) -> None:
    (tmp_path / "repo").mkdir()
    shutil.copytree(repository / MODEL, tmp_path / "other" / MODEL)
    source = write_object_file(tmp_path / "muons.root", make_muons(20, seed=13))
    model = f"{tmp_path / 'repo'}/../other/{MODEL}"
    result = score_cli(
        str(source), "-m", model, "--repository", str(tmp_path / "repo"), "-o", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    resolved = tmp_path / "other" / MODEL / "2" / "model.onnx"
    text = "".join(result.output.split())
    assert "".join(f"--model {model} is {resolved}, outside --repository".split()) in text


def test_file_cut_inside_its_header_is_truncated(tmp_path: Path, backend: Backend) -> None:
    source = write_object_file(tmp_path / "cut.root", make_muons(40, seed=14))
    size = len(source.read_bytes())
    source.write_bytes(source.read_bytes()[:50])
    summary = run([str(source)], backend, tmp_path / "out")
    assert summary.failed == [(str(source), f"truncated: 50 of {size} bytes")]
    assert not (tmp_path / "out").exists()
