"""Inputs at URLs: a real XRootD server and a local HTTP server serve simulated files."""

from __future__ import annotations

import http.server
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import pytest
import uproot
from test_scoring import MODEL, cli_app, make_model
from typer.testing import CliRunner

from bsym.errors import MissingExtraError
from bsym.extras import install_hint
from bsym.rootio import PARTIAL_SUFFIX, TreeSource, parse_inputs, require_remote
from bsym.serving.friend_tree import read_provenance
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import ScoreSummary, output_path, score_files

FILES = ("isolation_muons_000.root", "isolation_events_000.root")


def test_urls_keep_their_slashes_ports_and_tree() -> None:
    url = "root://eos.example.org:1094//store/mc/nano_dy.root"
    [explicit] = parse_inputs([f"{url}:Events"], "Muons")
    assert explicit == TreeSource(url, "Events") and explicit.explicit
    assert str(explicit) == f"{url}:Events" and explicit.name == "nano_dy.root"
    assert output_path(Path("out"), explicit, MODEL) == Path("out") / f"nano_dy.{MODEL}.root"
    [default] = parse_inputs([url], "Muons")
    assert default.path == url and default.tree == "Muons" and not default.explicit
    assert default.location == url
    # A URL is never a glob: '?' and '*' stay as they are.
    query = "https://example.org/f*.root?token=a:b"
    assert [s.path for s in parse_inputs([query, "s3://bucket/key/x.root"], "Muons")] == [
        query,
        "s3://bucket/key/x.root",
    ]


def test_a_missing_remote_extra_names_the_url_and_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "XRootD", None)  # what Python does for a missing module
    url = "root://127.0.0.1:1//x.root"
    with pytest.raises(MissingExtraError, match=re.escape(f"reading {url} needs XRootD")) as err:
        require_remote(url)
    assert install_hint("xrootd") in str(err.value)


def test_a_missing_s3_package_names_the_remote_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(MissingExtraError, match=re.escape(install_hint("remote"))):
        require_remote("s3://bucket/key.root")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):
        if process.poll() is not None:
            pytest.fail(f"xrootd exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return
        except OSError:
            threading.Event().wait(0.05)
    pytest.fail(f"xrootd did not listen on port {port}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def served_folder(isolation_sample: Path) -> Iterator[Path]:
    """A folder of simulated files that the XRootD server (which refuses to run as root and so
    runs as another user) can read: outside pytest's private temporary folders."""
    folder = Path(tempfile.mkdtemp(prefix="bsym-served-"))
    folder.chmod(0o755)
    (folder / "data").mkdir(mode=0o755)
    for name in FILES:
        shutil.copy(isolation_sample / name, folder / "data" / name)
        (folder / "data" / name).chmod(0o644)
    yield folder / "data"
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def xrootd_port(served_folder: Path) -> Iterator[int]:
    """A real XRootD server on 127.0.0.1 that serves ``served_folder`` as its root."""
    binary = shutil.which("xrootd")
    if binary is None:
        pytest.skip(
            "no xrootd binary: install the XRootD server (Debian: apt-get install xrootd-server)"
        )
    pytest.importorskip("XRootD", reason=f"no XRootD Python bindings; {install_hint('xrootd')}")
    pytest.importorskip("fsspec_xrootd", reason=f"no fsspec-xrootd; {install_hint('xrootd')}")
    base = served_folder.parent
    admin = base / "admin"
    admin.mkdir()
    user = ["-R", "xrootd" if _has_user("xrootd") else "nobody"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(admin, user=user[1])
    port = _free_port()
    config = base / "xrootd.cfg"
    config.write_text(
        f"xrd.port {port}\nall.export /\noss.localroot {served_folder}\n"
        f"all.adminpath {admin}\nall.pidpath {admin}\n"
    )
    log = base / "xrootd.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [binary, *user, "-c", str(config), "-n", "bsym"], stdout=stream, stderr=stream
        )
    try:
        _wait_for_port(port, process, log)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file handler plus the single byte ranges (``Range: bytes=a-b``) uproot asks for."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        first = int(match.group(1))
        last = min(int(match.group(2) or len(data) - 1), len(data) - 1)
        if first >= len(data):
            self.send_error(416)
            return
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[first : last + 1])


@pytest.fixture(scope="module")
def http_port(served_folder: Path) -> Iterator[int]:
    """A local HTTP server in a thread, serving ``served_folder`` with range requests."""
    pytest.importorskip("aiohttp", reason=f"no aiohttp; {install_hint('remote')}")

    def handler(*args: object) -> RangeHandler:
        return RangeHandler(*args, directory=str(served_folder))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model.onnx")


def score(inputs: list[str], model_path: Path, out: Path) -> ScoreSummary:
    backend = OnnxRuntimeBackend(model_path, threads=1, batch_size=256)
    return score_files(inputs, backend, out, progress=False)


def _arrays(path: Path) -> dict[str, ak.Array]:
    with uproot.open(path) as file:
        [tree] = [name for name, kind in file.classnames(cycle=False).items() if kind == "TTree"]
        return {branch.name: branch.array() for branch in file[tree].branches}


@pytest.mark.parametrize("scheme", ["root", "http"])
def test_remote_scores_equal_the_local_ones_and_a_rerun_skips(
    scheme: str,
    request: pytest.FixtureRequest,
    served_folder: Path,
    model_path: Path,
    tmp_path: Path,
) -> None:
    port = request.getfixturevalue("xrootd_port" if scheme == "root" else "http_port")
    base = f"root://127.0.0.1:{port}/" if scheme == "root" else f"http://127.0.0.1:{port}"
    urls = [f"{base}/{FILES[0]}:Muons", f"{base}/{FILES[1]}"]  # one names its tree
    local = score([str(served_folder / name) for name in FILES], model_path, tmp_path / "local")
    remote = score(urls, model_path, tmp_path / "remote")
    assert not local.failed and not remote.failed, remote.failed
    assert [r.status for r in remote.results] == ["scored", "scored"]
    for name in FILES:
        output = f"{name.removesuffix('.root')}.{MODEL}.root"
        expected, found = (
            _arrays(tmp_path / "local" / output),
            _arrays(tmp_path / "remote" / output),
        )
        assert expected.keys() == found.keys() and len(found) >= 2
        for branch, values in expected.items():
            assert ak.to_list(found[branch]) == ak.to_list(values), branch
        provenance = read_provenance(tmp_path / "remote" / output)
        url = f"{base}/{name}"
        assert provenance["source_file"] == url and provenance["source_mtime_ns"] == "0"
        assert provenance["source_bytes"] == str((served_folder / name).stat().st_size)
        with uproot.open(served_folder / name) as file:
            assert provenance["source_uuid"] == str(file.file.uuid)
    again = score(urls, model_path, tmp_path / "remote")
    assert [r.status for r in again.results] == ["skipped", "skipped"] and not again.failed


def test_vanished_files_and_refusing_servers_fail_by_url_and_the_rest_is_scored(
    served_folder: Path, xrootd_port: int, http_port: int, model_path: Path, tmp_path: Path
) -> None:
    doomed = served_folder / "vanishing.root"
    shutil.copy(served_folder / FILES[0], doomed)
    doomed.chmod(0o644)
    gone_root = f"root://127.0.0.1:{xrootd_port}//{doomed.name}"
    gone_http = f"http://127.0.0.1:{http_port}/{doomed.name}"
    for url in (gone_root, gone_http):  # both there before it goes
        assert not score([url], model_path, tmp_path / url.split(":")[0]).failed
    doomed.unlink()
    closed = _free_port()
    refused_root = f"root://127.0.0.1:{closed}//{FILES[0]}"
    refused_http = f"http://127.0.0.1:{closed}/{FILES[0]}"
    good = f"root://127.0.0.1:{xrootd_port}//{FILES[1]}"
    out = tmp_path / "out"
    inputs = [gone_root, refused_root, good, gone_http, refused_http]
    args = ["score", *inputs, "--model", str(model_path), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 1, result.output
    text = result.output.replace("\n", "")
    assert "1 scored, 0 skipped, 4 failed" in text, text
    for url in (gone_root, refused_root, gone_http, refused_http):
        assert url in text
    assert sorted(p.name for p in out.iterdir()) == [f"isolation_events_000.{MODEL}.root"]
    assert not [p for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_remote_file_shorter_than_its_header_says_is_truncated(
    served_folder: Path, http_port: int, model_path: Path, tmp_path: Path
) -> None:
    whole = (served_folder / FILES[0]).read_bytes()
    short = served_folder / "short.root"
    short.write_bytes(whole[: len(whole) // 2])
    short.chmod(0o644)
    url = f"http://127.0.0.1:{http_port}/{short.name}"
    summary = score([url], model_path, tmp_path / "out")
    assert summary.failed == [(url, f"truncated: {len(whole) // 2} of {len(whole)} bytes")]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
