"""Reading ROOT trees with uproot, with errors that name the file, tree and branch."""

from __future__ import annotations

import glob
import importlib
import os
import re
import secrets
import socket
import stat
import struct
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import awkward as ak
import numpy as np

from bsym.errors import InputFileError, MissingBranchError, did_you_mean
from bsym.extras import require


@dataclass(frozen=True)
class TreeSource:
    """One input: a ROOT file and the tree in it.

    ``path`` is a local file, or a URL (``root://``, ``https://``, ``s3://``...) as a string:
    :class:`~pathlib.Path` would fold the ``//`` of ``root://host//file.root``.
    ``explicit`` is False while ``tree`` is only the default a command would try first
    (nothing named one): :func:`find_tree` then picks the tree by the discovery rule.
    """

    path: Path | str
    tree: str
    explicit: bool = field(default=True, compare=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.tree}" if self.explicit else str(self.path)

    @property
    def name(self) -> str:
        """The file name: the last part of the path or of the URL's path."""
        if isinstance(self.path, Path):
            return self.path.name
        return PurePosixPath(urlsplit(self.path).path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def location(self) -> str:
        """The absolute path of a local file, or the URL."""
        return str(self.path.resolve()) if isinstance(self.path, Path) else self.path


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(spec: str) -> bool:
    """Whether an input names a URL (``scheme://...``) rather than a local path."""
    return _URL.match(spec) is not None


def input_path(text: str) -> Path | str:
    """A recorded input location back as a :attr:`TreeSource.path`: a URL stays a string."""
    return text if is_url(text) else Path(text)


def parse_inputs(specs: Sequence[str], default_tree: str) -> list[TreeSource]:
    """Expand ``file.root``, ``dir/*.root`` and ``file.root:dir/tree`` (uproot's syntax).

    A URL (``root://host//store/f.root:Events``) is one input, never a glob: ``?`` and ``*``
    may be part of it, and remote storage has no listing in common.
    """
    sources: list[TreeSource] = []
    for spec in specs:
        pattern, tree = _split_tree(spec)
        if is_url(pattern):
            sources.append(TreeSource(pattern, tree or default_tree, explicit=tree is not None))
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputFileError(f"no file matches '{pattern}'")
        sources += [
            TreeSource(Path(match), tree or default_tree, explicit=tree is not None)
            for match in matches
        ]
    return list(dict.fromkeys(sources))


def _split_tree(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(".root:")
    if sep and head and tail:
        return head + ".root", tail  # uproot's rule: the object path may hold directories
    if is_url(spec) and urlsplit(spec).query:
        return spec, None  # a query's colons are its own: name the tree as 'f.root:tree'
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not tail.endswith(".root"):
        return head, tail
    return spec, None


TREE_KINDS = {
    "TTree": "TTree",
    "ROOT::RNTuple": "RNTuple",
    "ROOT::Experimental::RNTuple": "RNTuple",
}


def tree_kind(tree: Any) -> str:
    """``TTree`` or ``RNTuple``."""
    return "RNTuple" if "RNTuple" in type(tree).__name__ else "TTree"


def _trees(file: Any) -> dict[str, str]:
    """Every tree of an open file, by path, with its kind (TTree or RNTuple)."""
    return {
        name: TREE_KINDS[kind]
        for name, kind in file.classnames(recursive=True, cycle=False).items()
        if kind in TREE_KINDS
    }


_LISTED = 12  # objects an error lists before it says how many more there are


def _contents(file: Any) -> str:
    """'it has Events (RNTuple), Runs (TTree)': what a file holds, for error messages."""
    objects = sorted(file.classnames(recursive=True, cycle=False).items())
    if not objects:
        return "it holds nothing"
    listed = [f"{name} ({TREE_KINDS.get(kind, kind)})" for name, kind in objects[:_LISTED]]
    more = f" and {len(objects) - _LISTED} more" if len(objects) > _LISTED else ""
    return "it has " + ", ".join(listed) + more


def _no_tree(source: TreeSource, file: Any) -> InputFileError:
    hint = did_you_mean(source.tree, file.keys(recursive=True, cycle=False))
    return InputFileError(
        f"{source.path} has no tree '{source.tree}'"
        + (f"{hint} It" if hint else "; it")
        + _contents(file).removeprefix("it")
    )


def find_tree(source: TreeSource, count_branch: str) -> TreeSource:
    """The tree a command reads, by the one rule every command follows.

    A tree named on the command line (``file.root:tree``) must exist. Otherwise: the default
    tree (the spec's) if the file has it, else the file's only tree (TTree or RNTuple), else
    the one tree with the count branch ``count_branch`` (the event layout: NanoAOD's
    ``Events``). An error lists what the file has.
    """
    file = _open_file(source.path)
    try:
        return _pick_tree(source, file, count_branch)
    finally:
        file.close()


def _pick_tree(source: TreeSource, file: Any, count_branch: str) -> TreeSource:
    try:
        trees = _trees(file)
        if source.explicit or source.tree in trees:
            if source.tree not in trees:
                raise _no_tree(source, file)
            return replace(source, explicit=True)
        if len(trees) == 1:
            return TreeSource(source.path, next(iter(trees)))
        with_count = [name for name in trees if count_branch in set(file[name].keys())]
        if len(with_count) == 1:
            return TreeSource(source.path, with_count[0])
        found = f"{len(with_count)} trees have" if with_count else "no tree has"
        raise InputFileError(
            f"{source.path}: no tree to read: no '{source.tree}', and {found} a "
            f"'{count_branch}' branch; {_contents(file)}; name one as "
            f"'{source.path}:TREE'"
        )
    except InputFileError:
        raise
    except Exception as error:
        raise InputFileError(
            f"{source.path}: cannot list its trees ({_without(error, source.path)})"
        ) from error


def open_input(source: TreeSource, count_branch: str) -> tuple[TreeSource, Any]:
    """Find the tree by :func:`find_tree` and open it; say which with :func:`reading`."""
    file = _open_file(source.path)
    try:
        resolved = _pick_tree(source, file, count_branch)
    except BaseException:
        file.close()
        raise
    return resolved, _tree_in(resolved, file)


def reading(source: TreeSource, tree: Any, count_branch: str) -> str:
    """'nano_dy.root: reading Events (RNTuple, event layout, 40 entries)'."""
    layout = "event" if count_branch in set(tree.keys()) else "object"
    return (
        f"{source.name}: reading {source.tree} ({tree_kind(tree)}, {layout} layout, "
        f"{tree.num_entries:,} entries)"
    )


def _open_file(path: Path | str) -> Any:
    import uproot

    if isinstance(path, str):
        return _open_remote(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    check_complete(path)
    try:
        return uproot.open(path)
    except Exception as error:  # uproot raises ValueError, OSError, struct.error...
        raise InputFileError(
            f"{path}: not a readable ROOT file ({_without(error, path)})"
        ) from error


def open_tree(source: TreeSource) -> Any:
    """Open the named tree (TTree or RNTuple), turning uproot's many failure modes into one
    clear :class:`InputFileError`; :func:`open_input` finds the tree first."""
    return _tree_in(source, _open_file(source.path))


def _tree_in(source: TreeSource, file: Any) -> Any:
    """The tree of an open file; the file is closed if it fails."""
    try:
        if source.tree not in set(file.keys(recursive=True, cycle=False)):
            raise _no_tree(source, file)
        tree = file[source.tree]
        if not hasattr(tree, "num_entries"):
            raise InputFileError(f"{source} is a {type(tree).__name__}, not a TTree or RNTuple")
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


# What reading each URL scheme needs: (module, the extra that provides it).
REMOTE_MODULES = {
    "root": [("XRootD", "xrootd")],
    "http": [("aiohttp", "remote")],
    "https": [("aiohttp", "remote")],
    "s3": [("s3fs", "remote")],
}
# XRootD's own defaults retry a server that refuses for ten minutes; XRD_* variables win.
XROOTD_CONNECTION = {"ConnectionRetry": 2, "ConnectionWindow": 10}


def require_remote(url: str) -> None:
    """Raise :class:`MissingExtraError` with the install hint if reading ``url`` needs a
    package that is missing (XRootD for ``root://``, aiohttp for HTTP, s3fs for ``s3://``)."""
    scheme = urlsplit(url).scheme.lower()
    for module, extra in REMOTE_MODULES.get(scheme, []):
        require(module, extra, purpose=f"reading {url}")
    if scheme == "root":
        # At exit XRootD looks at every live object, torch's deprecated attributes included.
        warnings.filterwarnings("ignore", category=FutureWarning, module="XRootD.client.finalize")
        client = importlib.import_module("XRootD.client")
        for name, value in XROOTD_CONNECTION.items():
            if f"XRD_{name.upper()}" not in os.environ:
                client.EnvPutInt(name, value)


def _open_remote(url: str) -> Any:
    """Open a file at a URL, with what a remote file allows of the local checks: its size
    as the server reports it against the end its header records (fEND)."""
    import uproot

    require_remote(url)
    options: dict[str, Any] = {}
    if urlsplit(url).scheme.lower() == "root":
        # uproot's own XRootD source: through fsspec-xrootd, XRootD 6 refuses the numpy
        # offsets uproot reads baskets with ("integer argument expected for offset").
        options["handler"] = uproot.source.xrootd.XRootDSource
    try:
        header = uproot.reading.ReadOnlyFile(url, **options)
    except FileNotFoundError as error:
        said = " ".join(str(error).split())
        said = said.split(" Files may be specified as")[0]  # uproot's help on paths
        said = said.replace(repr(url), "").removeprefix("file not found").strip(" ()")
        raise InputFileError(
            f"{url}: no such file on the server" + (f" ({said})" if said else "")
        ) from error
    except Exception as error:  # OSError, ValueError, timeouts...
        raise InputFileError(f"{url}: cannot open it ({_without(error, url)})") from error
    try:
        size = remote_size(header)
        end = int(header.fEND)
        if size is not None and size < end:
            raise InputFileError(f"{url}: truncated: {size} of {end} bytes")
        return header.root_directory
    except InputFileError:
        header.close()
        raise
    except Exception as error:
        header.close()
        raise InputFileError(f"{url}: not a readable ROOT file ({_without(error, url)})") from error


def remote_size(file: Any) -> int | None:
    """The size in bytes that the server reports for an open uproot file, or None."""
    try:
        size = file.source.num_bytes
    except Exception:  # a server that does not say
        return None
    return None if size is None else int(size)


def input_identity(source: TreeSource, file: Any) -> tuple[int, int]:
    """(bytes, mtime in ns) of an input for its provenance; a remote file has no mtime (0),
    so its UUID and size stand for it."""
    if isinstance(source.path, Path):
        status = source.path.stat()
        return status.st_size, status.st_mtime_ns
    return remote_size(file) or 0, 0  # 0: not reported


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


def _without(error: Exception, path: Path | str) -> str:
    """uproot's message without its own mention of the file, which the caller names once."""
    text = " ".join(str(error).split())
    forms = (path, path.resolve()) if isinstance(path, Path) else (path,)
    names = "|".join(re.escape(str(name)) for name in forms)
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


def counter_dtype(tree: Any, branch: str) -> np.dtype[np.generic]:
    """The stored dtype of a count branch: NanoAOD's ``nMuon`` is uint32 (in an RNTuple, a
    ``RNTupleCardinality<std::uint32_t>``, which uproot reads as int64)."""
    if tree_kind(tree) == "TTree":
        return np.dtype(tree[branch].interpretation.to_dtype)
    types = [r.type_name for r in tree.field_records if r.field_name == branch]
    match = re.search(r"std::(u?int(?:8|16|32|64))_t", types[0] if types else "")
    return np.dtype(match.group(1) if match else np.int64)


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
