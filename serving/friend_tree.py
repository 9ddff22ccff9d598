"""The scorer's output: a friend tree aligned entry by entry with its input, and its provenance.

uproot cannot write a friend link, so each output file records where it came from as
TObjStrings in a ``bsym`` directory (``bsym/source_file``, ``bsym/model_name``...). ROOT
users read them with ``file->Get<TObjString>("bsym/source_file")``; the scorer reads them
back to decide whether an existing output is complete and current.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt

from bsym import __version__
from bsym.errors import SpecMismatchError
from bsym.serving.backend import Tensor

PROVENANCE_DIR = "bsym"
# uproot writes one basket per branch per extend; fewer, larger ones are much faster to write
# and to read back.
FLUSH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Column:
    """One output branch: column ``index`` of model output ``output`` (``None``: 1-D)."""

    name: str
    output: str
    index: int | None
    dtype: np.dtype[np.generic]

    def take(self, outputs: Mapping[str, Tensor]) -> Tensor:
        values = outputs[self.output]
        if self.index is not None:
            flat_width = int(np.prod(values.shape[1:]))  # explicit: -1 is ambiguous for 0 rows
            values = values.reshape(len(values), flat_width)[:, self.index]
        return np.ascontiguousarray(values, dtype=self.dtype)


def plan_columns(
    model: str, examples: Mapping[str, Tensor], labels: Sequence[str] | None
) -> list[Column]:
    """Branches for every model output: ``<model>``, ``<model>_<class>``, ``<model>_<out>_<k>``.

    ``examples`` holds each output for one row (``score`` first); scores are written as
    float32, other outputs keep their dtype.
    """
    columns: list[Column] = []
    for output, example in examples.items():
        shape = example.shape[1:]
        size = int(np.prod(shape))
        dtype: np.dtype[np.generic]
        if output == "score":
            dtype = np.dtype(np.float32)
            names = [model] if size == 1 else _class_names(model, labels, size)
        else:
            dtype = example.dtype
            names = (
                [f"{model}_{output}_{k}" for k in range(size)] if shape else [f"{model}_{output}"]
            )
        for index, name in enumerate(names):
            columns.append(Column(_sanitise(name), output, index if shape else None, dtype))
    seen: set[str] = set()
    for column in columns:
        if column.name in seen:
            raise SpecMismatchError(
                f"model '{model}': two outputs would both write '{column.name}'"
            )
        seen.add(column.name)
    return columns


def _class_names(model: str, labels: Sequence[str] | None, size: int) -> list[str]:
    if labels is not None and len(labels) == size:
        return [f"{model}_{label}" for label in labels]
    return [f"{model}_{k}" for k in range(size)]


def _sanitise(name: str) -> str:
    return re.sub(r"\W", "_", name)


@dataclass(frozen=True)
class Provenance:
    """What an output was made from; an existing output is reused only if all of it matches."""

    source_file: str
    source_uuid: str
    source_bytes: int
    source_mtime_ns: int
    source_tree: str
    source_entries: int
    layout: str
    model_name: str
    model_version: str
    model_sha256: str
    feature_spec_sha256: str
    model_bsym_version: str
    model_git_commit: str
    branches: str
    discriminant: str = ""
    """A flavour tagger's discriminant as written (its f_c included); not kept when empty."""

    def strings(self) -> dict[str, str]:
        strings = {key: str(value) for key, value in asdict(self).items()}
        if not self.discriminant:
            del strings["discriminant"]
        return strings


# The model as a rerun compares it (the bsym version and git commit are recorded, not compared:
# the same model file exported twice is the same model).
MODEL_KEYS = {
    "model_name": "name",
    "model_version": "version",
    "model_sha256": "sha256",
    "feature_spec_sha256": "feature-spec sha256",
}
_RECORDED_ONLY = {"model_bsym_version", "model_git_commit"}


class FriendTreeWriter:
    """Write a tree of scores with large ``extend`` calls, buffering chunks in between.

    ``objects`` is ``None`` in the object layout (one flat branch per column) and the
    collection name in the event layout (``n<objects>`` plus jagged ``<objects>_<column>``).
    """

    def __init__(
        self,
        path: Path,
        *,
        tree: str,
        title: str,
        columns: Sequence[Column],
        objects: str | None,
        provenance: Provenance,
        extra: Mapping[str, str] | None = None,
        flush_bytes: int | None = None,
        counter_dtype: np.dtype[np.generic] | None = None,
    ) -> None:
        import uproot

        self.columns = list(columns)
        self.objects = objects
        self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
        self.entries = 0
        self._buffers: list[list[Tensor]] = [[] for _ in self.columns]
        self._counts: list[npt.NDArray[np.int64]] = []
        self._buffered_bytes = 0
        self._buffered_entries = 0
        self._file: Any = uproot.recreate(path)
        try:
            for key, value in {**provenance.strings(), **(extra or {})}.items():
                self._file[f"{PROVENANCE_DIR}/{key}"] = value
            self._file[f"{PROVENANCE_DIR}/scorer_version"] = __version__
            self._tree: Any = self._file.mktree(tree, self._branch_types(), title=title)
            if objects is not None and counter_dtype is not None:
                _set_counter_dtype(self._tree, f"n{objects}", counter_dtype)
        except BaseException:
            self._file.close()
            raise

    def _branch_types(self) -> dict[str, Any]:
        if self.objects is None:
            return {column.name: column.dtype for column in self.columns}
        record = ak.types.RecordType(
            [
                ak.types.NumpyType(ak.types.numpytype.dtype_to_primitive(c.dtype))
                for c in self.columns
            ],
            [column.name for column in self.columns],
        )
        return {self.objects: ak.types.ListType(record)}

    def append(
        self, outputs: Mapping[str, Tensor], *, entries: int, counts: npt.NDArray[np.int64] | None
    ) -> None:
        """Add the scores of ``entries`` tree entries (``counts`` objects each, event layout)."""
        rows = entries if counts is None else int(counts.sum())
        largest = 0
        for buffer, column in zip(self._buffers, self.columns, strict=True):
            values = column.take(outputs)
            if len(values) != rows:
                raise SpecMismatchError(
                    f"output '{column.output}' has {len(values)} rows for {rows} objects"
                )
            buffer.append(values)
            largest = max(largest, values.nbytes)
        if counts is not None:
            self._counts.append(counts)
            largest = max(largest, counts.nbytes)
        self.entries += entries
        self._buffered_entries += entries
        self._buffered_bytes += largest
        if self._buffered_bytes >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._buffered_entries == 0:
            return
        columns = {
            column.name: np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            for column, buffer in zip(self.columns, self._buffers, strict=True)
        }
        if self.objects is None:
            self._tree.extend(columns)
        else:
            counts = np.concatenate(self._counts)
            jagged = {name: ak.unflatten(values, counts) for name, values in columns.items()}
            self._tree.extend({self.objects: ak.zip(jagged)})
        self._buffers = [[] for _ in self.columns]
        self._counts = []
        self._buffered_bytes = 0
        self._buffered_entries = 0

    def close(self) -> None:
        """Write what is buffered and close the file; call it only after a complete run."""
        try:
            self.flush()
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close the file without writing the buffer (its content is about to be deleted)."""
        self._file.close()


def _set_counter_dtype(tree: Any, name: str, dtype: np.dtype[np.generic]) -> None:
    """Give the counter the input's integer type: uproot declares every counter int32, where
    NanoAOD's ``nMuon`` is uint32. uproot has no option for it, so its branch record is changed
    and the tree's metadata rewritten (in place of the first) before the first ``extend``."""
    from uproot.writing._cascadetree import _dtype_to_char

    cascading = tree._cascading
    datum = cascading._branch_data[cascading._branch_lookup[name]]
    stored = dtype.newbyteorder(">")
    if datum["kind"] != "counter" or stored not in _dtype_to_char or dtype.kind not in "iu":
        raise SpecMismatchError(f"cannot write the counter '{name}' as {dtype}")
    datum["dtype"] = stored
    datum["fTitle"] = f"{name}/{_dtype_to_char[stored]}"
    cascading.write_anew(tree._file.sink)


def read_provenance(path: Path) -> dict[str, str]:
    """The ``bsym/*`` strings of an output file."""
    import uproot

    with uproot.open(path) as file:
        return _provenance_strings(file)


def _provenance_strings(file: Any) -> dict[str, str]:
    directory = file[PROVENANCE_DIR]
    return {key: str(directory[key]) for key in directory.keys(cycle=False)}


def output_mismatch(path: Path, expected: Provenance) -> str | None:
    """Why the existing output at ``path`` cannot be reused, or ``None`` if it is complete."""
    import uproot

    try:
        with uproot.open(path) as file:
            found = _provenance_strings(file)
            entries = int(file[expected.source_tree].num_entries)
    except Exception as error:  # any unreadable file is simply not a usable output
        return f"it is unreadable ({type(error).__name__}: {error})"
    if entries != expected.source_entries:
        return f"it has {entries} entries, the input has {expected.source_entries}"
    wanted = expected.strings()
    changes = [
        f"{label} {found.get(key) or 'none recorded'} → {wanted[key] or 'none'}"
        for key, label in MODEL_KEYS.items()
        if found.get(key) != wanted[key]
    ]
    if changes:
        return "model changed: " + ", ".join(changes)
    for key, value in wanted.items():
        if key not in _RECORDED_ONLY and key not in MODEL_KEYS and found.get(key) != value:
            return f"its {key} is {found.get(key)!r}, now {value!r}"
    return None
