"""What every study shares: settings, cached samples, statistics over runs, JSON output.

A study is data: typed settings in (:class:`Settings`), a result out that the CLI writes
(:func:`write_json`), tabulates (:mod:`bsym.training.tables`) and plots
(:mod:`bsym.training.studies.plots`). Nothing here prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from bsym.rootio import atomic_output

MANIFEST = "manifest.json"
T = TypeVar("T")
Indices = npt.NDArray[np.int64]


def cached_sample(
    directory: Path, key: Mapping[str, object], write: Callable[[Path], list[Path]]
) -> list[Path]:
    """The files of the sample ``key`` in ``directory``: reused if its manifest records the
    same key, else written by ``write(directory)`` and recorded (the manifest last, so an
    interrupted write is redone)."""
    manifest = directory / MANIFEST
    wanted = json.loads(json.dumps(key))
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
        if recorded.get("sample") == wanted:
            return [directory / name for name in recorded["files"]]
    paths = write(directory)
    document = {"sample": wanted, "files": [path.name for path in paths]}
    write_json(manifest, document)
    return paths


@dataclass(frozen=True)
class Figure:
    """A value and its bootstrap standard deviation."""

    value: float
    error: float


def simulated_samples(
    data_dir: Path,
    sizes: tuple[int, int],
    *,
    seeds: tuple[int, int],
    unit: str,
    write: Callable[[Path, int, int], list[Path]],
    prefix: str,
) -> tuple[list[Path], list[Path]]:
    """The training and test samples: the files named ``prefix*`` of ``write(folder, size,
    seed)``, each cached in ``<data_dir>/<train|test>_n<size>_s<seed>`` under the key
    ``{unit: size, "seed": seed}``."""
    samples = []
    for kind, size, seed in zip(("train", "test"), sizes, seeds, strict=True):

        def written(out: Path, size: int = size, seed: int = seed) -> list[Path]:
            return [path for path in write(out, size, seed) if path.name.startswith(prefix)]

        key = {unit: size, "seed": seed}
        samples.append(cached_sample(data_dir / f"{kind}_n{size}_s{seed}", key, written))
    return samples[0], samples[1]


def spread(values: Sequence[float]) -> float:
    """Standard deviation over runs (divisor n − 1); 0 for a single run."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), spread(values)


def summarise(
    runs: Sequence[object], metric: str, by: Sequence[str], levels: Sequence[Iterable[object]]
) -> dict[Any, Any]:
    """Mean and spread of ``metric`` over the runs, nested by the run fields ``by`` (e.g.
    network, column, size) in the order of ``levels``; the last level holds
    ``(mean, std)`` and leaves out keys without runs."""
    field, *inner_fields = by
    keys, *inner_levels = levels
    table: dict[Any, Any] = {}
    for key in keys:
        chosen = [run for run in runs if getattr(run, field) == key]
        if inner_fields:
            table[key] = summarise(chosen, metric, inner_fields, inner_levels)
        elif chosen:
            table[key] = mean_and_spread([getattr(run, metric) for run in chosen])
    return table


def jsonable_summary(table: Mapping[Any, Any]) -> dict[str, Any]:
    """A :func:`summarise` table for JSON: string keys, ``{"mean", "std"}`` leaves."""
    return {
        str(key): (
            {"mean": value[0], "std": value[1]}
            if isinstance(value, tuple)
            else jsonable_summary(value)
        )
        for key, value in table.items()
    }


def bootstrap(
    n_rows: int, figures: Callable[[Indices], T], *, n_bootstrap: int, rng: np.random.Generator
) -> list[T]:
    """``figures`` of ``n_bootstrap`` resamplings of the rows with replacement."""
    return [figures(rng.integers(0, n_rows, n_rows).astype(np.int64)) for _ in range(n_bootstrap)]


def write_json(path: Path, document: object) -> Path:
    """``document`` as indented JSON in ``path``, written atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
