"""Write flat awkward record arrays as ROOT TTrees, NanoAOD style, atomically."""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

__all__ = ["tree_data", "write_tree"]


def tree_data(layout: ak.Array, counters: Collection[str]) -> dict[str, object]:
    """Group a record array's fields for uproot: jagged ``X_*`` fields zipped under ``X``.

    uproot names the branches of a zipped collection ``X`` as ``X_field`` with the int32
    counter ``nX``, so the counter fields named in ``counters`` are left out (uproot writes
    them again from the jagged fields). Scalar fields are passed as numpy arrays. The order
    of the fields is kept, each collection taking the place of its first field.
    """
    data: dict[str, object] = {}
    groups: dict[str, dict[str, ak.Array]] = {}
    for name in layout.fields:
        if name in counters:
            continue
        column = layout[name]
        if column.ndim == 2:
            prefix, field = name.split("_", 1)
            # A placeholder keeps the collection where its first field was (branch order).
            data.setdefault(prefix, None)
            groups.setdefault(prefix, {})[field] = column
        else:
            data[name] = ak.to_numpy(column)
    for prefix, columns in groups.items():
        data[prefix] = ak.zip(columns)
    return data


def write_tree(
    path: Path,
    tree: str,
    layout: ak.Array,
    *,
    counters: Collection[str],
    file_uuid: uuid.UUID | None = None,
) -> Path:
    """Write ``layout`` as TTree ``tree`` in a new ROOT file at ``path``, atomically.

    The file is written under a temporary name in the same folder and moved into place with
    :func:`os.replace`, so an interrupted write never leaves a truncated file at ``path``.
    The whole layout goes in with one ``extend`` (uproot is fast only with large baskets).
    A fixed ``file_uuid`` removes one source of byte differences between identical runs;
    uproot still stamps the creation time.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = tree_data(layout, counters)
    branch_types = {
        k: v.type if isinstance(v, ak.Array) else np.asarray(v).dtype for k, v in data.items()
    }
    options: dict[str, object] = {}
    if file_uuid is not None:
        options["uuid_function"] = lambda: file_uuid
    try:
        with uproot.recreate(tmp, **options) as file:
            file.mktree(tree, branch_types).extend(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
