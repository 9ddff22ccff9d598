"""Opening and reading ROOT inputs: path syntax and every way a file can be bad."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from bsym.errors import InputFileError, MissingBranchError
from bsym.rootio import (
    TreeSource,
    atomic_output,
    check_branches,
    counter_dtype,
    find_tree,
    iterate_chunks,
    open_input,
    open_tree,
    parse_inputs,
    read_all,
    remove_stale_partials,
)
from bsym.simulate.rootwrite import write_branches, write_tree


def write_muons(path: Path, entries: int = 100) -> Path:
    with uproot.recreate(path) as file:
        file["Muons"] = {"Muon_pt": np.linspace(1, 2, entries), "Muon_eta": np.zeros(entries)}
    return path


def test_parse_inputs_globs_and_tree_suffix(tmp_path: Path) -> None:
    for name in ("b.root", "a.root"):
        write_muons(tmp_path / name)
    sources = parse_inputs([f"{tmp_path}/*.root", f"{tmp_path}/a.root:Other"], "Muons")
    assert sources == [
        TreeSource(tmp_path / "a.root", "Muons"),
        TreeSource(tmp_path / "b.root", "Muons"),
        TreeSource(tmp_path / "a.root", "Other"),
    ]
    with pytest.raises(InputFileError, match="no file matches"):
        parse_inputs([f"{tmp_path}/*.nothing"], "Muons")


def test_read_all_and_chunks(tmp_path: Path) -> None:
    source = TreeSource(write_muons(tmp_path / "a.root", 1000), "Muons")
    arrays = read_all(source, ["Muon_pt"])
    assert len(arrays) == 1000
    tree = open_tree(source)
    chunks = list(iterate_chunks(tree, source, ["Muon_pt"], step_size=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]


def test_missing_file_tree_and_branch(tmp_path: Path) -> None:
    path = write_muons(tmp_path / "a.root")
    with pytest.raises(InputFileError, match="no such file"):
        open_tree(TreeSource(tmp_path / "nope.root", "Muons"))
    with pytest.raises(InputFileError, match="no tree 'Muon'; did you mean 'Muons'"):
        open_tree(TreeSource(path, "Muon"))
    source = TreeSource(path, "Muons")
    with pytest.raises(MissingBranchError, match="no branch 'Muon_ptt'; did you mean 'Muon_pt'"):
        list(iterate_chunks(open_tree(source), source, ["Muon_ptt"]))


def write_trees(path: Path, trees: dict[str, dict[str, np.ndarray]]) -> Path:
    """TTrees, except one named Runs: uproot writes that as an RNTuple (its default)."""
    with uproot.recreate(path) as file:
        for name, branches in trees.items():
            if name == "Runs":
                file[name] = branches
            else:
                file.mktree(name, {k: v.dtype for k, v in branches.items()}).extend(branches)
    return path


def test_one_tree_rule(tmp_path: Path) -> None:
    muons = {"Muon_pt": np.ones(3)}
    events = {"nMuon": np.ones(2, dtype=np.uint32)}
    runs = {"run": np.ones(1, dtype=np.int32)}
    cases = {  # trees in the file: the tree read when none is named
        "spec.root": ({"Muons": muons, "Events": events}, "Muons"),
        "only.root": ({"Other": muons}, "Other"),
        "event.root": ({"Events": events, "Runs": runs}, "Events"),
    }
    for name, (trees, expected) in cases.items():
        (source,) = parse_inputs([str(write_trees(tmp_path / name, trees))], "Muons")
        assert str(source) == str(tmp_path / name)  # no tree is claimed before one is found
        found = find_tree(source, "nMuon")
        assert found == TreeSource(tmp_path / name, expected) and found.explicit
        assert str(found) == f"{tmp_path / name}:{expected}"
    (named,) = parse_inputs([f"{tmp_path / 'event.root'}:Muons"], "Muons")
    with pytest.raises(InputFileError) as error:
        find_tree(named, "nMuon")
    assert str(error.value) == (
        f"{tmp_path / 'event.root'} has no tree 'Muons'; did you mean 'Runs'? It has "
        "Events (TTree), Runs (RNTuple)"
    )
    two = write_trees(tmp_path / "two.root", {"A": runs, "B": runs})
    with pytest.raises(InputFileError) as error:
        find_tree(parse_inputs([str(two)], "Muons")[0], "nMuon")
    assert str(error.value) == (
        f"{two}: no tree to read: no 'Muons', and no tree has a 'nMuon' branch; "
        f"it has A (TTree), B (TTree); name one as '{two}:TREE'"
    )


def test_rntuple_is_found_read_and_named(nanoaod_dir: Path) -> None:
    path = nanoaod_dir / "nano_dy_rntuple.root"
    source, tree = open_input(parse_inputs([str(path)], "Muons")[0], "nMuon")
    try:
        assert source == TreeSource(path, "Events")
        with pytest.raises(MissingBranchError, match=r"nano_dy_rntuple\.root:Events has no"):
            check_branches(tree, source, ["Muon_ptt"])
        chunks = list(iterate_chunks(tree, source, ["nMuon", "Muon_pt"], step_size=15))
        assert [len(chunk) for chunk in chunks] == [15, 15, 10]
        assert counter_dtype(tree, "nMuon") == np.dtype(np.uint32)
    finally:
        tree.file.close()
    with pytest.raises(InputFileError) as error:
        find_tree(TreeSource(path, "Muons"), "nMuon")
    assert str(error.value) == f"{path} has no tree 'Muons'; it has Events (RNTuple)"


def test_corrupt_truncated_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.root"
    garbage.write_bytes(b"this is not a ROOT file" * 100)
    with pytest.raises(InputFileError, match="not a readable ROOT file"):
        open_tree(TreeSource(garbage, "Muons"))

    whole = write_muons(tmp_path / "whole.root", 200_000).read_bytes()
    truncated = tmp_path / "truncated.root"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputFileError, match=r"truncated\.root"):
        read_all(TreeSource(truncated, "Muons"), ["Muon_pt"])

    empty = tmp_path / "empty.root"
    with uproot.recreate(empty) as file:
        file.mktree("Muons", {"Muon_pt": np.float64})
    with pytest.raises(InputFileError, match="empty"):
        read_all(TreeSource(empty, "Muons"), ["Muon_pt"])


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.root"
    target.write_text("previous complete output")
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "previous complete output"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_output(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def plant_symlinks(folder: Path, output: str, victim: Path) -> list[Path]:
    """Symlinks to ``victim`` at the output and at every name the old ``.<output>.<pid>.partial``
    scheme would give this process and the next few."""
    pid = os.getpid()
    links = [folder / output] + [folder / f".{output}.{n}.partial" for n in range(pid, pid + 64)]
    for link in links:
        link.symlink_to(victim)
    return links


def test_atomic_output_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    import torch

    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    out = tmp_path / "shared"
    out.mkdir()
    for name in ("scores.root", "model.pt"):
        links = plant_symlinks(out, name, victim)
        with atomic_output(out / name) as temporary:
            assert re.fullmatch(
                rf"\.{re.escape(name)}\.[\w-]+\.{os.getpid()}\.[0-9a-f]{{16}}"
                r"\.partial",
                temporary.name,
            )
            assert stat.S_ISREG(temporary.lstat().st_mode)
            if name == "model.pt":
                torch.save({"weights": torch.arange(3)}, temporary)
            else:
                with uproot.recreate(temporary) as file:
                    file["Muons"] = {"Muon_pt": np.arange(3.0)}
        assert victim.read_text() == "someone else's file"
        assert stat.S_ISREG((out / name).lstat().st_mode)
        assert all(link.is_symlink() for link in links[1:])
    with uproot.open(out / "scores.root") as file:
        assert file["Muons"]["Muon_pt"].array(library="np").tolist() == [0, 1, 2]
    assert torch.load(out / "model.pt")["weights"].tolist() == [0, 1, 2]
    assert not list(out.glob(f".*.{os.getpid()}.*.partial"))


def test_atomic_output_respects_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "out.json") as temporary:
            temporary.write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o640


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_stale_partials_of_ended_processes_are_removed(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "name.root") as live:
        host = live.name.split(".")[-4]
    dead = ended_pid()
    old = time.time() - 60

    def partial(pid: int, *, host: str = host, age: float = old) -> Path:
        path = tmp_path / f".out.v2.root.{host}.{pid}.{os.urandom(8).hex()}.partial"
        path.write_bytes(b"half")
        os.utime(path, (age, age))
        return path

    stale = partial(dead)
    kept = [
        partial(os.getpid()),
        partial(dead, host="another-host"),
        partial(dead, age=time.time()),
        tmp_path / "out.v2.root",
        tmp_path / f".out.root.{dead}.partial",
    ]
    kept[-1].write_bytes(b"old scheme, not ours to judge")
    (tmp_path / "out.v2.root").write_bytes(b"complete")
    link = tmp_path / f".link.root.{host}.{dead}.fedcba9876543210.partial"
    link.symlink_to(tmp_path / "out.v2.root")
    os.utime(link, (old, old), follow_symlinks=False)
    kept.append(link)

    assert remove_stale_partials(tmp_path) == [stale]
    assert not stale.exists()
    assert all(path.is_symlink() or path.exists() for path in kept)
    assert remove_stale_partials(tmp_path / "absent") == []


def test_simulated_files_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sim.root"
    muons = {"Muon": ak.zip({"pt": [[1.0, 2.0], [], [3.0]]}), "label": np.array([1, 0, 1])}
    write_branches(target, "Events", muons, strings={"bsym/note": "first"})
    with pytest.raises(ValueError):
        write_branches(target, "Events", {"label": np.arange(3), "other": np.arange(4)})
    assert list(tmp_path.iterdir()) == [target]
    with uproot.open(target) as file:
        assert str(file["bsym/note"]) == "first"
        assert file["Events"]["label"].array(library="np").tolist() == [1, 0, 1]
        assert ak.to_list(file["Events"]["Muon_pt"].array()) == [[1.0, 2.0], [], [3.0]]
        assert file["Events"]["nMuon"].array(library="np").tolist() == [2, 0, 1]


def test_simulated_files_in_baskets_hold_the_same_entries(tmp_path: Path) -> None:
    muons = ak.Array({"Muon_pt": [[float(i)] * (i % 3) for i in range(10)], "nMuon": [0] * 10})
    whole = write_tree(tmp_path / "whole.root", "Events", muons, counters=("nMuon",))
    baskets = write_tree(
        tmp_path / "baskets.root", "Events", muons, counters=("nMuon",), basket_entries=3
    )
    with uproot.open(whole) as one, uproot.open(baskets) as four:
        assert one["Events"]["Muon_pt"].num_baskets == 1
        assert four["Events"]["Muon_pt"].num_baskets == 4
        assert ak.to_list(four["Events"].arrays()) == ak.to_list(one["Events"].arrays())
