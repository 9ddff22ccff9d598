"""The one writer of simulated ROOT files: flat awkward record arrays or ready branches as
TTrees, NanoAOD style, atomically."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np

from bsym.rootio import atomic_output

__all__ = ["tree_data", "write_branches", "write_tree"]


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
    basket_entries: int | None = None,
) -> Path:
    """Write the flat record array ``layout`` as TTree ``tree`` in a new ROOT file at ``path``.

    The fields are grouped by :func:`tree_data`; see :func:`write_branches` for the rest.
    """
    return write_branches(
        path,
        tree,
        tree_data(layout, counters),
        file_uuid=file_uuid,
        basket_entries=basket_entries,
    )


def write_branches(
    path: Path,
    tree: str,
    branches: Mapping[str, Any],
    *,
    file_uuid: uuid.UUID | None = None,
    strings: Mapping[str, str] | None = None,
    basket_entries: int | None = None,
) -> Path:
    """Write ``branches`` (numpy arrays, or zipped awkward collections) as TTree ``tree`` in a
    new ROOT file at ``path``, through :func:`bsym.rootio.atomic_output`, so an interrupted write
    never leaves a truncated file at ``path``.

    ``strings`` become TObjStrings under their keys (``"bsym/detector"``) before the tree. The
    whole tree goes in with one ``extend`` (uproot is fast only with large baskets) unless
    ``basket_entries`` asks for baskets of that many entries. A fixed ``file_uuid`` removes one
    source of byte differences between identical runs; uproot still stamps the creation time.
    """
    import uproot

    branch_types = {
        k: v.type if isinstance(v, ak.Array) else np.asarray(v).dtype for k, v in branches.items()
    }
    options: dict[str, object] = {}
    if file_uuid is not None:
        options["uuid_function"] = lambda: file_uuid
    with atomic_output(path) as temporary, uproot.recreate(temporary, **options) as file:
        for key, value in (strings or {}).items():
            file[key] = value
        # mktree, not file[tree] = ...: uproot 5.7 writes an RNTuple for the latter
        output = file.mktree(tree, branch_types)
        if basket_entries is None:
            output.extend(dict(branches))
        else:
            entries = len(next(iter(branches.values())))
            for start in range(0, entries, basket_entries):
                output.extend({k: v[start : start + basket_entries] for k, v in branches.items()})
    return path
