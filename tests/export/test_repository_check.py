"""Concurrent writes into one model hold its lock; ``bsym repository check`` and ``bsym serve``
find and refuse a repository whose files differ from what its configs record."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
from test_triton_config import write_onnx
from typer.testing import CliRunner, Result

from bsym.contract import CONFIG_FILENAME, checksum_key, sha256_of
from bsym.errors import ConfigError
from bsym.export.triton.check import check_repository
from bsym.export.triton.common import Flavour
from bsym.export.triton.lock import lock_path, model_lock
from bsym.export.triton.parse import parse_config
from bsym.export.triton.repository import write_model_repository


def run_cli(*args: str) -> tuple[Result, str]:
    """The result and its output unwrapped (rich wraps long lines at the terminal width)."""
    from bsym.cli import app

    result = CliRunner().invoke(app, list(args))
    return result, result.output.replace("\n", "")


def checksums(model_dir: Path) -> dict[str, str]:
    config = parse_config((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    return {k: p.string_value for k, p in config.parameters.items() if k.startswith("sha256:")}


def two_versions(tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    for version in (1, 2):
        onnx_path = write_onnx(tmp_path / f"{version}.onnx")
        proto = onnx.load(str(onnx_path))
        proto.doc_string = f"version {version}"  # same signature, distinct bytes
        onnx.save(proto, str(onnx_path))
        write_model_repository(onnx_path, repository, "tagger", version, flavour=Flavour.cpu)
    return repository


@pytest.mark.parametrize("versions", [["5", "6"], [None, None]])
def test_concurrent_bsym_exports_into_one_model(
    trained_models: dict[str, Path], tmp_path: Path, versions: list[str | None]
) -> None:
    """Explicit versions, or none: then each export takes the next free one under the lock."""
    repository = tmp_path / "repository"
    bsym = [sys.executable, "-c", "from bsym.cli import app; app()"]
    export = [*bsym, "export", str(trained_models["cone_cut"]), "--repository", str(repository)]
    export += ["--name", "tagger"]
    commands = [[*export, "--version", v] if v else export for v in versions]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in commands
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    model_dir = repository / "tagger"
    written = (5, 6) if versions[0] else (1, 2)
    assert checksums(model_dir) == {
        checksum_key(v): sha256_of(model_dir / str(v) / "model.onnx") for v in written
    }
    result, output = run_cli("repository", "check", "--repository", str(repository))
    assert result.exit_code == 0, output
    assert "1 models, 2 versions checked, 0 problems" in output


def test_a_writer_waits_for_the_lock(tmp_path: Path) -> None:
    repository = two_versions(tmp_path)
    onnx_path = write_onnx(tmp_path / "3.onnx")
    done = threading.Event()

    def write() -> None:
        write_model_repository(onnx_path, repository, "tagger", 3, flavour=Flavour.cpu)
        done.set()

    with model_lock(repository / "tagger"):
        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)
        assert not done.is_set()  # still waiting for the lock
    writer.join(timeout=30)
    assert done.is_set()
    assert sorted(checksums(repository / "tagger")) == [checksum_key(v) for v in (1, 2, 3)]


def test_a_held_lock_times_out_with_a_clear_message(tmp_path: Path) -> None:
    model_dir = tmp_path / "tagger"
    held = r"'tagger': .*\.tagger\.lock is still locked by another process .* after 0 s"
    with model_lock(model_dir):
        with pytest.raises(ConfigError, match=held), model_lock(model_dir, timeout=0.2):
            pass
        with (
            pytest.raises(ConfigError, match=held),
            model_lock(model_dir, exclusive=False, timeout=0.2),
        ):
            pass
    assert lock_path(model_dir) == tmp_path / ".tagger.lock"


def test_check_finds_a_tampered_file_and_a_missing_checksum(tmp_path: Path) -> None:
    repository = two_versions(tmp_path)
    model_dir = repository / "tagger"
    assert check_repository(repository).ok
    tampered = model_dir / "1" / "model.onnx"
    tampered.write_bytes(tampered.read_bytes() + b"tampered")
    config = model_dir / CONFIG_FILENAME
    text = config.read_text(encoding="utf-8").replace(checksum_key(2), "sha256:dropped")
    config.write_text(text, encoding="utf-8")

    report = check_repository(repository)
    assert [(p.model, p.version, p.path) for p in report.problems] == [
        ("tagger", 1, tampered),
        ("tagger", 2, config),
    ]
    result, output = run_cli("repository", "check", "--repository", str(repository), "tagger")
    assert result.exit_code == 1
    assert f"model 'tagger' version 1: {tampered}: sha256 is {sha256_of(tampered)}" in output
    assert f"model 'tagger' version 2: {config}: has no parameter '{checksum_key(2)}'" in output
    assert "2 problems" in output

    served, output = run_cli("serve", "--repository", str(repository), "--grpc-port", "0")
    assert served.exit_code == 1
    assert f"model repository {repository} fails its check" in output
    assert f"version 1: {tampered}: sha256 is" in output
    assert f"version 2: {config}: has no parameter" in output
    assert "gRPC URL" not in output


def test_check_names_missing_models_and_misnamed_configs(tmp_path: Path) -> None:
    repository = two_versions(tmp_path)
    config = repository / "tagger" / CONFIG_FILENAME
    config.write_text(config.read_text().replace('name: "tagger"', 'name: "other"', 1))
    (repository / "empty").mkdir()
    report = check_repository(repository)
    assert [str(p) for p in report.problems] == [
        f"model 'empty': {repository / 'empty' / CONFIG_FILENAME}: missing",
        f"model 'tagger': {config}: names model 'other', not its folder",
    ]
    (missing,) = check_repository(repository, ["nope"]).problems
    assert str(missing) == f"model 'nope': {repository / 'nope'}: no such model folder"


def test_check_reads_where_no_lock_file_can_be_made(tmp_path: Path) -> None:
    """As in a read-only repository (root here may write anywhere, so a folder is in the way)."""
    repository = two_versions(tmp_path)
    lock_path(repository / "tagger").unlink()
    lock_path(repository / "tagger").mkdir()
    report = check_repository(repository)
    assert report.ok and report.versions == {"tagger": [1, 2]}
