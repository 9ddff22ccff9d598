"""Reading ROOT trees with uproot, with errors that name the file, tree and branch."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak

from bsym.errors import InputFileError, MissingBranchError, did_you_mean


@dataclass(frozen=True)
class TreeSource:
    """One input: a ROOT file and the tree in it."""

    path: Path
    tree: str

    def __str__(self) -> str:
        return f"{self.path}:{self.tree}"


def parse_inputs(specs: Sequence[str], default_tree: str) -> list[TreeSource]:
    """Expand ``file.root``, ``dir/*.root`` and ``file.root:tree`` (uproot's syntax) to sources."""
    sources: list[TreeSource] = []
    for spec in specs:
        pattern, tree = _split_tree(spec, default_tree)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputFileError(f"no file matches '{pattern}'")
        sources += [TreeSource(Path(match), tree) for match in matches]
    return list(dict.fromkeys(sources))


def _split_tree(spec: str, default_tree: str) -> tuple[str, str]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.endswith(".root"):
        return head, tail
    return spec, default_tree


def open_tree(source: TreeSource) -> Any:
    """Open a tree, turning uproot's many failure modes into one clear :class:`InputFileError`."""
    import uproot

    if not source.path.is_file():
        raise InputFileError(f"{source.path}: no such file")
    try:
        file = uproot.open(source.path)
    except Exception as error:  # uproot raises ValueError, OSError, struct.error...
        raise InputFileError(f"{source.path}: not a readable ROOT file ({error})") from error
    try:
        keys = {key.split(";")[0] for key in file.keys(recursive=False)}
        if source.tree not in keys:
            raise InputFileError(
                f"{source.path} has no tree '{source.tree}'" + did_you_mean(source.tree, keys)
            )
        tree = file[source.tree]
        if not hasattr(tree, "num_entries"):
            raise InputFileError(f"{source} is a {type(tree).__name__}, not a TTree")
        tree.keys()  # reads the branch metadata now, where a truncated file fails
    except InputFileError:
        file.close()
        raise
    except Exception as error:
        file.close()
        raise InputFileError(
            f"{source}: cannot read the tree, is the file truncated? ({error})"
        ) from error
    return tree


def check_branches(tree: Any, source: TreeSource, branches: Sequence[str]) -> None:
    """Raise :class:`MissingBranchError` for the first branch the tree lacks."""
    available = set(tree.keys())
    for branch in branches:
        if branch not in available:
            raise MissingBranchError(
                branch, file=str(source.path), tree=source.tree, available=available
            )


def iterate_chunks(
    tree: Any, source: TreeSource, branches: Sequence[str], *, step_size: int | str = "100 MB"
) -> Iterator[ak.Array]:
    """Yield the branches in chunks; a truncated or corrupt basket becomes an InputFileError."""
    check_branches(tree, source, branches)
    if tree.num_entries == 0:
        raise InputFileError(f"{source} is empty (0 entries)")
    iterator = tree.iterate(list(branches), step_size=step_size, library="ak")
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            raise InputFileError(f"{source}: failed reading entries ({error})") from error
        yield chunk


def read_all(source: TreeSource, branches: Sequence[str]) -> ak.Array:
    """Read whole branches of one tree (for training sets that fit in memory)."""
    tree = open_tree(source)
    try:
        return ak.concatenate(list(iterate_chunks(tree, source, branches)))
    finally:
        tree.file.close()


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
