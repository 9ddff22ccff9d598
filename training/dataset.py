"""Training rows: read ROOT inputs into one feature batch and split them reproducibly.

Features come from :func:`bsym.features.build_features` only, so training sees exactly the
tensors scoring will. The split is recorded (indices, seed and the files with their entry
counts) so evaluation can take the same held-out rows and notice if the files changed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import (
    FeatureBatch,
    FeatureSpec,
    build_features,
    detect_layout,
    required_branches,
)
from bsym.rootio import (
    TreeSource,
    input_path,
    iterate_chunks,
    open_input,
    parse_inputs,
    reading,
)
from bsym.training.config import TrainConfig
from bsym.training.cwola import apply_cwola, read_columns, read_cwola_rows

log = logging.getLogger(__name__)
Indices = npt.NDArray[np.int64]
G = TypeVar("G", bound=np.generic)
SplitCounts = dict[str, float]
SUBSETS = ("train", "validation", "test")


@dataclass(frozen=True)
class SourceRecord:
    """One input tree as it was when the rows were read."""

    path: str
    tree: str
    entries: int


@dataclass(frozen=True)
class Split:
    """Row indices of the three subsets, and what they index into."""

    train: Indices
    validation: Indices
    test: Indices
    seed: int
    n_rows: int
    sources: list[SourceRecord] = field(default_factory=list)
    summary: dict[str, SplitCounts] = field(default_factory=dict)
    """Rows and weight sums of each subset, per class (see :func:`split_summary`)."""


@dataclass(frozen=True)
class TrainingData:
    """All rows read for training and their split."""

    batch: FeatureBatch
    split: Split
    extras: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    """Per-row values beside the features (the decorrelation variable), by branch."""

    def subset(self, name: str) -> FeatureBatch:
        """The ``train``, ``validation`` or ``test`` rows."""
        rows: Indices = getattr(self.split, name)
        return take(self.batch, rows)

    def subset_extras(self, name: str) -> dict[str, npt.NDArray[np.float64]]:
        """The extras of the ``train``, ``validation`` or ``test`` rows."""
        rows: Indices = getattr(self.split, name)
        return {branch: values[rows] for branch, values in self.extras.items()}


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read ``config.data.train`` and split it by ``config.seed``."""
    tree = config.data.tree or config.features.tree
    sources = parse_inputs(config.data.train, default_tree=tree)
    batch, records, kept = _read_training_rows(sources, config, max_rows=config.data.max_rows)
    split = split_rows(
        batch.n_rows,
        seed=config.seed,
        validation_fraction=config.data.validation_fraction,
        test_fraction=config.data.test_fraction,
        train_rows=config.data.train_rows,
        sources=records,
    )
    split = replace(split, summary=split_summary(batch, split))
    for line in describe_split(split):
        log.info("%s", line)
    extras = {}
    if config.decorrelation is not None:
        variable = config.decorrelation.variable
        extras[variable] = read_row_values(
            sources, config.features, variable, kept, max_rows=config.data.max_rows
        )
    return TrainingData(batch, split, extras)


def read_row_values(
    sources: Sequence[TreeSource],
    spec: FeatureSpec,
    branch: str,
    kept: npt.NDArray[np.bool_],
    *,
    max_rows: int | None,
) -> npt.NDArray[np.float64]:
    """``branch``'s value of the rows ``kept`` (of the rows read, as :func:`read_training_rows`
    leaves them out), in their order."""
    values = read_columns(sources, spec, [branch], max_rows=max_rows)[branch]
    if values.size != kept.size:
        raise SpecMismatchError(
            f"the decorrelation variable '{branch}' gives {values.size} rows, the "
            f"features {kept.size}; it needs one value per row (docs/decorrelation.md)"
        )
    return values[kept]


def held_out_test(config: TrainConfig, split: Split) -> FeatureBatch:
    """Re-read the recorded training inputs and return the test rows of ``split``."""
    if len(split.test) == 0:
        raise ConfigError("this model was trained with data.test_fraction=0: it has no test rows")
    return recorded_rows(config, split, split.test)


def recorded_rows(config: TrainConfig, split: Split, rows: Indices) -> FeatureBatch:
    """Re-read the recorded training inputs and return ``rows`` (indices into ``split``'s rows),
    refusing inputs that changed since training."""
    sources = [TreeSource(input_path(record.path), record.tree) for record in split.sources]
    batch, records = read_training_rows(sources, config, max_rows=config.data.max_rows)
    for before, now in zip(split.sources, records, strict=True):
        if before.entries != now.entries:
            raise SpecMismatchError(
                f"{now.path}:{now.tree} has {now.entries} entries, but {before.entries} when "
                "the model was trained; its held-out test rows are lost (pass --data instead)"
            )
    if batch.n_rows != split.n_rows:
        raise SpecMismatchError(
            f"the training inputs now give {batch.n_rows} rows, not {split.n_rows} as in training"
        )
    return take(batch, rows)


def read_training_rows(
    sources: Sequence[TreeSource], config: TrainConfig, *, max_rows: int | None
) -> tuple[FeatureBatch, list[SourceRecord]]:
    """The labelled rows of ``config.supervision``: truth labels, or CWoLa's kept rows."""
    batch, records, _ = _read_training_rows(sources, config, max_rows=max_rows)
    return batch, records


def _read_training_rows(
    sources: Sequence[TreeSource], config: TrainConfig, *, max_rows: int | None
) -> tuple[FeatureBatch, list[SourceRecord], npt.NDArray[np.bool_]]:
    """:func:`read_training_rows`, and which of the rows read it keeps."""
    spec, supervision = config.features, config.supervision
    if supervision.type == "cwola":
        batch, records = read_rows(sources, spec, max_rows=max_rows, with_label=False)
        rows = read_cwola_rows(sources, spec, supervision, max_rows=max_rows)
        return apply_cwola(batch, rows), records, _kept(batch.n_rows, rows.keep)
    batch, records = read_rows(sources, spec, max_rows=max_rows, leave_out_neither=False)
    n_read = batch.n_rows
    keep: Indices | None = None
    if supervision.select:
        keep = read_cwola_rows(sources, spec, supervision, max_rows=max_rows).keep
        batch = take(batch, keep)
    batch, of_one_class = _leave_out_neither(batch, spec, sources)
    if of_one_class is not None:
        keep = of_one_class if keep is None else keep[of_one_class]
    return batch, records, _kept(n_read, keep)


def _kept(n_rows: int, keep: Indices | None) -> npt.NDArray[np.bool_]:
    """``keep`` (``None``: every row) as a mask over ``n_rows`` rows."""
    if keep is None:
        return np.ones(n_rows, dtype=np.bool_)
    kept = np.zeros(n_rows, dtype=np.bool_)
    kept[keep] = True
    return kept


def read_rows(
    sources: Sequence[TreeSource],
    spec: FeatureSpec,
    *,
    max_rows: int | None = None,
    with_label: bool = True,
    leave_out_neither: bool = True,
) -> tuple[FeatureBatch, list[SourceRecord]]:
    """Features (and labels, ``with_label``) of every row in ``sources``, in file order.

    With labels, rows of neither class (``label.negative`` given) are left out unless
    ``leave_out_neither`` is false; ``max_rows`` counts the rows before that.
    """
    batches: list[FeatureBatch] = []
    records: list[SourceRecord] = []
    n_rows = 0
    for unresolved in sources:
        if max_rows is not None and n_rows >= max_rows:
            break
        source, tree = open_input(unresolved, spec.count_branch)
        log.info("%s", reading(source, tree, spec.count_branch))
        try:
            layout = detect_layout(tree.keys(), spec)
            branches = required_branches(spec, layout, with_label=with_label)
            records.append(SourceRecord(source.location, source.tree, tree.num_entries))
            for chunk in iterate_chunks(tree, source, branches):
                batches.append(build_features(chunk, spec, layout, with_label=with_label))
                n_rows += batches[-1].n_rows
                if max_rows is not None and n_rows >= max_rows:
                    break
        finally:
            tree.file.close()
        log.info("read %s: %d rows so far", source, n_rows)
    batch = concatenate(batches)
    if max_rows is not None and batch.n_rows > max_rows:
        batch = take(batch, np.arange(max_rows, dtype=np.int64))
    if with_label and leave_out_neither:
        batch, _ = _leave_out_neither(batch, spec, sources)
    return batch, records


def _leave_out_neither(
    batch: FeatureBatch, spec: FeatureSpec, sources: Sequence[TreeSource]
) -> tuple[FeatureBatch, Indices | None]:
    """The rows of ``batch`` whose truth is of one class and their positions in ``batch``
    (``None`` where that is every row); the others are counted in the log."""
    if batch.label is None or spec.label is None or not spec.label.leaves_out:
        return batch, None
    neither = batch.label < 0
    if not neither.any():
        return batch, None
    truth = batch.truth if batch.truth is not None else np.full(batch.n_rows, -1, np.int64)
    found = Counter(truth[neither].tolist())
    values = ", ".join(f"{value}: {count}" for value, count in sorted(found.items()))
    log.info(
        "%s: left out %d of %d rows of neither class (%s %s)",
        ", ".join(str(source) for source in sources),
        int(neither.sum()),
        batch.n_rows,
        spec.label.branch,
        values,
    )
    of_one_class = np.flatnonzero(~neither).astype(np.int64)
    return take(batch, of_one_class), of_one_class


def split_rows(
    n_rows: int,
    *,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    train_rows: int | None = None,
    sources: Sequence[SourceRecord] = (),
) -> Split:
    """Shuffle rows with ``seed`` and cut them into test, validation and training rows.

    Test and validation rows are cut first, so they do not depend on ``train_rows``, which
    takes the first rows of the remaining shuffled ones (default: all of them).
    """
    permutation = np.random.default_rng([seed, 0]).permutation(n_rows).astype(np.int64)
    n_test = round(n_rows * test_fraction)
    n_validation = round(n_rows * validation_fraction)
    test = np.sort(permutation[:n_test])
    validation = np.sort(permutation[n_test : n_test + n_validation])
    remaining = permutation[n_test + n_validation :]
    if train_rows is not None and train_rows > len(remaining):
        raise ConfigError(
            f"data.train_rows={train_rows} asks for more training rows than the "
            f"{len(remaining)} left of {n_rows} after {n_test} test and {n_validation} "
            "validation rows"
        )
    train = np.sort(remaining[:train_rows])
    return Split(train, validation, test, seed, n_rows, list(sources))


def split_summary(batch: FeatureBatch, split: Split) -> dict[str, SplitCounts]:
    """Rows and weight sums (weight 1 without a weight branch) of each subset, per class."""
    summary: dict[str, SplitCounts] = {}
    for name in SUBSETS:
        rows: Indices = getattr(split, name)
        label = np.zeros(len(rows), np.int64) if batch.label is None else batch.label[rows]
        weight = np.ones(len(rows)) if batch.weight is None else batch.weight[rows]
        positive = label == 1
        summary[name] = {
            "rows": float(len(rows)),
            "rows_positive": float(positive.sum()),
            "rows_negative": float((~positive).sum()),
            "weight": float(weight.sum(dtype=np.float64)),
            "weight_positive": float(weight[positive].sum(dtype=np.float64)),
            "weight_negative": float(weight[~positive].sum(dtype=np.float64)),
        }
    return summary


def describe_split(split: Split) -> list[str]:
    """One line per subset: rows and weight sums, per class."""
    return [
        f"{name}: {counts['rows']:.0f} rows ({counts['rows_positive']:.0f} positive, "
        f"{counts['rows_negative']:.0f} negative), weight sum {counts['weight']:.6g} "
        f"({counts['weight_positive']:.6g} positive, {counts['weight_negative']:.6g} negative)"
        for name, counts in split.summary.items()
    ]


def take(batch: FeatureBatch, rows: Indices) -> FeatureBatch:
    """The given rows of a batch; ``counts`` is dropped, as rows no longer follow entries."""
    return FeatureBatch(
        n_rows=len(rows),
        constituents=_pick(batch.constituents, rows),
        mask=_pick(batch.mask, rows),
        globals=_pick(batch.globals, rows),
        label=_pick(batch.label, rows),
        weight=_pick(batch.weight, rows),
        counts=None,
        truth=_pick(batch.truth, rows),
    )


def concatenate(batches: Sequence[FeatureBatch]) -> FeatureBatch:
    """Rows of several batches, one after the other."""
    if not batches:
        raise SpecMismatchError("no rows were read")
    return FeatureBatch(
        n_rows=sum(b.n_rows for b in batches),
        constituents=_join([b.constituents for b in batches]),
        mask=_join([b.mask for b in batches]),
        globals=_join([b.globals for b in batches]),
        label=_join([b.label for b in batches]),
        weight=_join([b.weight for b in batches]),
        counts=_join([b.counts for b in batches]),
        truth=_join([b.truth for b in batches]),
    )


def _pick(array: npt.NDArray[G] | None, rows: Indices) -> npt.NDArray[G] | None:
    return None if array is None else array[rows]


def _join(arrays: Sequence[npt.NDArray[G] | None]) -> npt.NDArray[G] | None:
    present = [a for a in arrays if a is not None]
    if len(present) < len(arrays):
        return None
    return np.concatenate(present)
