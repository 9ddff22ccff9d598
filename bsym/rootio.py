"""Reading ROOT trees with uproot, with errors that name the file, tree and branch."""

from __future__ import annotations

import glob
import os
import re
import secrets
import socket
import stat
import struct
import time
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
    """Expand ``file.root``, ``dir/*.root`` and ``file.root:dir/tree`` (uproot's syntax)."""
    sources: list[TreeSource] = []
    for spec in specs:
        pattern, tree = _split_tree(spec, default_tree)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputFileError(f"no file matches '{pattern}'")
        sources += [TreeSource(Path(match), tree) for match in matches]
    return list(dict.fromkeys(sources))


def _split_tree(spec: str, default_tree: str) -> tuple[str, str]:
    head, sep, tail = spec.rpartition(".root:")
    if sep and head and tail:
        return head + ".root", tail  # uproot's rule: the object path may hold directories
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.endswith(".root"):
        return head, tail
    return spec, default_tree


def open_tree(source: TreeSource) -> Any:
    """Open a tree, turning uproot's many failure modes into one clear :class:`InputFileError`."""
    import uproot

    if not source.path.is_file():
        raise InputFileError(f"{source.path}: no such file")
    check_complete(source.path)
    try:
        file = uproot.open(source.path)
    except Exception as error:  # uproot raises ValueError, OSError, struct.error...
        raise InputFileError(
            f"{source.path}: not a readable ROOT file ({_without(error, source.path)})"
        ) from error
    try:
        keys = set(file.keys(recursive=True, cycle=False))
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
            f"{source}: cannot read the tree ({_without(error, source.path)})"
        ) from error
    return tree


def check_complete(path: Path) -> None:
    """Raise for an empty file or one shorter than the end its ROOT header records (fEND)."""
    import uproot

    size = path.stat().st_size
    if size == 0:
        raise InputFileError(f"{path}: empty (0 bytes)")
    try:
        header = uproot.reading.ReadOnlyFile(str(path))
    except Exception as error:
        end = _recorded_end(path)
        if end is not None and size < end:  # too short even for uproot's first read
            raise InputFileError(f"{path}: truncated: {size} of {end} bytes") from error
        raise InputFileError(
            f"{path}: not a readable ROOT file ({_without(error, path)})"
        ) from error
    try:
        end = int(header.fEND)
    finally:
        header.close()
    if size < end:
        raise InputFileError(f"{path}: truncated: {size} of {end} bytes")


_ROOT_BEGIN = 100  # where every ROOT file's first record starts, after its header


def _recorded_end(path: Path) -> int | None:
    """fEND from the first bytes of a ROOT file header, or None if they are not one."""
    with path.open("rb") as stream:
        head = stream.read(20)
    if len(head) < 16 or not head.startswith(b"root"):
        return None
    version, begin = struct.unpack(">ii", head[4:12])
    if begin != _ROOT_BEGIN:
        return None
    if version >= 1_000_000:  # large files store fBEGIN as 4 bytes and fEND as 8
        return int(struct.unpack(">q", head[12:20])[0]) if len(head) == 20 else None
    return int(struct.unpack(">i", head[12:16])[0])


def _without(error: Exception, path: Path) -> str:
    """uproot's message without its own mention of the file, which the caller names once."""
    text = " ".join(str(error).split())
    names = "|".join(re.escape(str(name)) for name in (path, path.resolve()))
    return re.sub(rf"\s*(?:(?:in|for) )?file(?: path)?:? (?:{names})", "", text).strip(" :")


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


PARTIAL_SUFFIX = ".partial"
# A partial file of an ended process is removed only once it is this old, and only when it
# was made on this host: a process id says nothing about another machine's processes.
STALE_PARTIAL_SECONDS = 10.0
_CREATE_ATTEMPTS = 16


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _create_partial(path: Path) -> Path:
    """Create ``.<name>.<host>.<pid>.<random>.partial`` beside ``path``, exclusively.

    ``O_CREAT | O_EXCL`` fails on any existing name, a planted symlink included, so the write
    can only go to a new regular file; mode 0o666 lets the umask decide as for any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(_CREATE_ATTEMPTS):
        name = f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
        temporary = path.with_name(name)
        try:
            os.close(os.open(temporary, flags, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"cannot create a temporary file beside {path}: every name was taken")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a new temporary file beside ``path``; rename it into place only if the block succeeds.

    The temporary has an unpredictable name and is created exclusively, so a planted symlink is
    never written through; ``os.replace`` replaces a symlink at ``path`` instead of following it.
    Writers must write to the yielded file in place (``uproot.recreate``, ``torch.save`` and
    ``open(..., "w")`` do), not delete and recreate it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_partial(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_partials(folder: Path, *, min_age: float = STALE_PARTIAL_SECONDS) -> list[Path]:
    """Remove the partial files in ``folder`` that processes of this host left when they ended.

    Only regular files named by :func:`atomic_output` on this host whose process no longer
    exists and that are older than ``min_age`` seconds; anything else is left alone.
    """
    if not folder.is_dir():
        return []
    pattern = re.compile(
        rf"^\..+\.{re.escape(_host())}\.(\d+)\.[0-9a-f]{{16}}{re.escape(PARTIAL_SUFFIX)}$"
    )
    removed: list[Path] = []
    now = time.time()
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        try:
            status = entry.lstat()
            if not stat.S_ISREG(status.st_mode) or now - status.st_mtime < min_age:
                continue
            entry.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(entry)
    return sorted(removed)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a process id
        return True
    return True
