"""Batch scoring: ROOT files in, one friend tree of model scores per file out.

Each file is streamed one chunk at a time: a background thread reads the next chunk and
builds its tensors while the backend runs the current one, and scores are buffered into
large writes. A bad file is recorded and skipped; the others are still scored.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from bsym.contract import DISCRIMINANT_KEY, GIT_COMMIT_KEY, MASK, VERSION_KEY, sha256_of
from bsym.errors import (
    BadValueError,
    BsymError,
    ConfigError,
    InputFileError,
    ServerError,
    SpecMismatchError,
)
from bsym.features import (
    FeatureBatch,
    FeatureSpec,
    Layout,
    build_features,
    detect_layout,
    narrowed,
    request_width,
    required_branches,
    slot_lengths,
)
from bsym.input_ranges import THRESHOLDS, InputCounts, count_inputs, describe
from bsym.rootio import (
    TreeSource,
    atomic_output,
    check_branches,
    counter_dtype,
    find_tree,
    input_identity,
    iterate_chunks,
    open_input,
    parse_inputs,
    reading,
    remove_stale_partials,
)
from bsym.serving.backend import (
    Backend,
    Tensor,
    class_labels,
    dynamic_constituents,
    probe_outputs,
    sharing_cores,
)
from bsym.serving.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PADDING,
    DEFAULT_STEP_SIZE,
    Padding,
)
from bsym.serving.discriminant import with_discriminant
from bsym.serving.friend_tree import (
    Column,
    FriendTreeWriter,
    Provenance,
    output_mismatch,
    plan_columns,
)
from bsym.serving.prefetch import prefetched
from bsym.serving.triton_served import SERVED_SHA256_KEY

# Tensors are built for slices of this many entries of each chunk read (see feature_batches),
# and up to PREFETCH_DEPTH such slices wait for inference: enough to run while the reader
# reads the next chunk of DEFAULT_STEP_SIZE.
ENTRIES_PER_BATCH = 8192
PREFETCH_DEPTH = 8
# Padding.group cuts a slice into groups only where that leaves at most this fraction of the
# slots of cutting it to its longest row.
GROUPING_WORTH = 0.9
# Why the files after a server error are listed as failed.
NOT_SCORED = "not scored: the run stopped at the server error above"


@dataclass(frozen=True)
class FileResult:
    """One input that was scored now, or whose complete output was already there."""

    source: str
    output: Path
    status: Literal["scored", "skipped"]
    entries: int
    objects: int
    note: str = ""
    reading: str = ""
    """Which tree was read: 'f.root: reading Events (RNTuple, event layout, 40 entries)'."""


@dataclass(frozen=True)
class FileOutcome:
    """What scoring one source gave: its result or its (source, message) failure, and its
    inputs counted against the training ranges; a picklable value a Dask worker returns."""

    source: str
    result: FileResult | None = None
    failure: tuple[str, str] | None = None
    tracebacks: list[tuple[str, str]] = field(default_factory=list)
    counts: InputCounts | None = None
    server_error: bool = False
    """The failure was the server's: every later file would fail the same way."""


@dataclass
class ScoreSummary:
    """What a scoring run did; ``failed`` holds (source, message) for every bad input and
    ``tracebacks`` (source, traceback) for the unexpected exceptions among them."""

    model: str
    results: list[FileResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    tracebacks: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    removed_partials: list[Path] = field(default_factory=list)
    monitored: bool = True
    """Whether the model's feature spec has input ranges to check the inputs against."""
    input_counts: dict[str, InputCounts] = field(default_factory=dict)
    """Per source read in this run, its inputs counted against the training ranges."""
    input_report: Path | None = None
    workers: int = 0
    """Dask workers the run was spread over (0: scored in this process)."""

    def add(self, outcome: FileOutcome) -> None:
        """Record what scoring one source gave."""
        if outcome.result is not None:
            self.results.append(outcome.result)
        if outcome.failure is not None:
            self.failed.append(outcome.failure)
        self.tracebacks += outcome.tracebacks
        if outcome.counts is not None:
            self.input_counts[outcome.source] = outcome.counts

    @property
    def overall_inputs(self) -> InputCounts | None:
        """The counts of every source read in this run together."""
        total: InputCounts | None = None
        for counts in self.input_counts.values():
            total = counts if total is None else total.merged(counts)
        return total

    def input_warnings(self) -> list[str]:
        """One line per source and flagged feature."""
        return [
            f"{source}: {describe(feature)}"
            for source, counts in self.input_counts.items()
            for feature in counts.flagged()
        ]

    @property
    def scored(self) -> list[FileResult]:
        return [result for result in self.results if result.status == "scored"]

    @property
    def skipped(self) -> list[FileResult]:
        return [result for result in self.results if result.status == "skipped"]

    @property
    def entries(self) -> int:
        """Tree entries scored in this run (rows of the output trees)."""
        return sum(result.entries for result in self.scored)

    @property
    def objects(self) -> int:
        """Objects scored in this run (equal to entries in the object layout)."""
        return sum(result.objects for result in self.scored)

    @property
    def objects_per_second(self) -> float:
        return self.objects / self.seconds if self.seconds > 0 else 0.0


def output_path(out_dir: Path, source: TreeSource, model: str) -> Path:
    """Where the friend tree of ``source`` goes: ``<out_dir>/<input stem>.<model>.root``."""
    return out_dir / f"{source.stem}.{model}.root"


def score_files(
    inputs: list[str],
    backend: Backend,
    out_dir: Path,
    *,
    step_size: int | str = DEFAULT_STEP_SIZE,
    force: bool = False,
    progress: bool = True,
    strict_inputs: bool = False,
    padding: Padding | str = DEFAULT_PADDING,
    f_c: float | None = None,
) -> ScoreSummary:
    """Score every input (``file.root``, ``dir/*.root``, ``file.root:tree``) into ``out_dir``.

    A spec that does not match the model raises at once; a bad input file is recorded in
    the summary's ``failed`` list and the run goes on with the next one. A server error
    stops the run: the files not yet scored are listed as such.

    Every file's inputs are counted against the training ranges in the model's feature spec
    (:mod:`bsym.input_ranges`), and the report goes to ``<out_dir>/<model>.inputs.json``;
    with ``strict_inputs`` a file with a flagged feature fails and keeps no output.
    ``padding`` says how rows are padded for a model with a dynamic constituent axis
    (:data:`Padding`); the scores are the same whichever is chosen.
    A flavour tagger's discriminant is written too, with the charm fraction ``f_c`` if given.
    """
    summary = new_summary(backend, out_dir, strict_inputs=strict_inputs)
    scorer = _Scorer(
        backend,
        step_size=step_size,
        force=force,
        progress=progress,
        strict=strict_inputs,
        padding=padding,
        f_c=f_c,
    )
    start = time.perf_counter()
    queue = plan_outputs(inputs, backend.feature_spec, backend.name, out_dir, summary)
    for number, (source, target) in enumerate(queue, start=1):
        outcome = scorer.outcome(source, target, f"[{number}/{len(queue)}]")
        summary.add(outcome)
        if outcome.server_error:
            # Every later file would fail the same way; say so once instead.
            summary.failed += [(str(rest), NOT_SCORED) for rest, _ in queue[number:]]
            break
    return finish_summary(summary, start, out_dir)


def finish_summary(summary: ScoreSummary, start: float, out_dir: Path) -> ScoreSummary:
    """``summary`` with the run's wall time since ``start`` and its input report written."""
    summary.seconds = time.perf_counter() - start
    if summary.input_counts:
        summary.input_report = write_input_report(summary, out_dir)
    return summary


def new_summary(backend: Backend, out_dir: Path, *, strict_inputs: bool) -> ScoreSummary:
    """The summary of a run starting now, after removing the partials of ended processes."""
    monitored = backend.feature_spec.input_ranges is not None
    if strict_inputs and not monitored:
        raise ConfigError(
            f"--strict-inputs: model '{backend.name}' records no input ranges (it was exported "
            "before bsym recorded them); retrain and export it to check its inputs"
        )
    return ScoreSummary(
        model=backend.name, removed_partials=remove_stale_partials(out_dir), monitored=monitored
    )


def plan_outputs(
    inputs: list[str], spec: FeatureSpec, model: str, out_dir: Path, summary: ScoreSummary
) -> list[tuple[TreeSource, Path]]:
    """(source, output) for every input whose tree opens; the others go to ``summary.failed``.

    Only inputs whose tree opens claim an output name, so a bad one never blocks a good one.
    """
    sources: list[TreeSource] = []
    for pattern in inputs:
        try:
            sources += parse_inputs([pattern], spec.tree)
        except BsymError as error:
            summary.failed.append((pattern, str(error)))
    targets: dict[Path, TreeSource] = {}
    for source in dict.fromkeys(sources):
        try:
            resolved = find_tree(source, spec.count_branch)
        except Exception as error:
            failure = _Failure.of(source, error)
            summary.failed.append((failure.source, failure.message))
            summary.tracebacks += failure.details
            continue
        target = output_path(out_dir, resolved, model)
        claimed = targets.setdefault(target, resolved)
        if claimed != resolved:
            summary.failed.append(
                (
                    str(resolved),
                    f"its output {target} is also the output of {claimed}; "
                    "score them into separate output directories",
                )
            )
    return [(source, target) for target, source in targets.items()]


def input_report(summary: ScoreSummary) -> dict[str, Any]:
    """The JSON report: thresholds, then per feature the counts of each file and overall."""
    overall = summary.overall_inputs
    return {
        "model": summary.model,
        "thresholds": THRESHOLDS,
        "overall": {} if overall is None else overall.to_dict(),
        "files": {source: counts.to_dict() for source, counts in summary.input_counts.items()},
    }


def write_input_report(summary: ScoreSummary, out_dir: Path) -> Path:
    path = out_dir / f"{summary.model}.inputs.json"
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(input_report(summary), indent=1) + "\n")
    return path


class _Failure(Exception):
    """A source that could not be scored, and why."""

    def __init__(self, source: str, message: str, details: list[tuple[str, str]]) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
        self.details = details

    @classmethod
    def of(cls, source: TreeSource, error: Exception) -> _Failure:
        """A bsym or OS error is its message; anything else is a bug, kept with its traceback."""
        if isinstance(error, BsymError | OSError):
            return cls(str(source), _unprefixed(str(error), source), [])
        trace = "".join(traceback.format_exception(error))
        message = f"unexpected {type(error).__name__}: {error}"
        return cls(str(source), message, [(str(source), trace)])


def _unprefixed(message: str, source: TreeSource) -> str:
    """The message without its leading file name: the summary names the source once."""
    for name in (str(source), str(source.path)):
        for separator in (": ", " "):
            if message.startswith(name + separator):
                return message.removeprefix(name + separator)
    return message


class _Scorer:
    """Scores one source at a time with a model whose outputs have been probed."""

    def __init__(
        self,
        backend: Backend,
        *,
        step_size: int | str,
        force: bool,
        progress: bool,
        strict: bool,
        padding: Padding | str = DEFAULT_PADDING,
        f_c: float | None = None,
    ) -> None:
        try:
            chosen = Padding(padding)
        except ValueError:
            choices = [member.value for member in Padding]
            raise ConfigError(f"unknown padding '{padding}'; expected one of {choices}") from None
        self.backend = with_discriminant(backend, f_c)
        backend = self.backend
        self.padding = chosen if dynamic_constituents(backend) else Padding.fixed
        self.group_rows = int(getattr(backend, "batch_size", DEFAULT_BATCH_SIZE))
        self.spec: FeatureSpec = backend.feature_spec
        self.examples = probe_outputs(backend)
        self.columns: list[Column] = plan_columns(
            backend.name, self.examples, class_labels(backend.metadata)
        )
        self.step_size = step_size
        self.force = force
        self.progress = progress
        self.model_version, self.model_sha256 = model_file_identity(backend)
        self.spec_sha256 = hashlib.sha256(self.spec.to_json().encode()).hexdigest()
        self.strict = strict
        self.counts: InputCounts | None = None
        """The inputs of the source being scored, counted against the training ranges."""

    def outcome(self, source: TreeSource, target: Path, label: str) -> FileOutcome:
        """Score one source into ``target``; what went wrong is in the outcome, not raised."""
        self.counts = None
        try:
            result = self.score(source, target, label)
        except _Failure as failure:
            return FileOutcome(
                failure.source,
                failure=(failure.source, failure.message),
                tracebacks=failure.details,
                counts=self.counts,
                server_error=isinstance(failure.__cause__, ServerError),
            )
        return FileOutcome(result.source, result=result, counts=self.counts)

    def score(self, source: TreeSource, target: Path, label: str) -> FileResult:
        """Score one source; any error raises :class:`_Failure` naming the tree it read."""
        try:
            source, tree = open_input(source, self.spec.count_branch)
        except Exception as error:
            raise _Failure.of(source, error) from error
        try:
            return self._score_tree(source, tree, target, label)
        except Exception as error:
            raise _Failure.of(source, error) from error
        finally:
            tree.file.close()

    def _score_tree(self, source: TreeSource, tree: Any, target: Path, label: str) -> FileResult:
        layout = detect_layout(tree.keys(), self.spec)
        branches = required_branches(self.spec, layout, with_label=False)
        check_branches(tree, source, branches)
        entries = int(tree.num_entries)
        if entries == 0:
            raise InputFileError(f"{source} is empty (0 entries)")
        provenance = self._provenance(source, tree.file, entries, layout)
        read = reading(source, tree, self.spec.count_branch)
        note = ""
        if target.exists() and not self.force:
            reason = output_mismatch(target, provenance)
            if reason is None:
                return FileResult(str(source), target, "skipped", entries, 0, reading=read)
            note = f"replaced an out-of-date output: {reason}"
        objects = self._write(tree, source, target, layout, branches, provenance, label)
        return FileResult(str(source), target, "scored", entries, objects, note, read)

    def _provenance(
        self, source: TreeSource, file: Any, entries: int, layout: Layout
    ) -> Provenance:
        metadata = self.backend.metadata
        size, mtime_ns = input_identity(source, file)
        return Provenance(
            source_file=source.location,
            source_uuid=str(file.uuid),
            source_bytes=size,
            source_mtime_ns=mtime_ns,
            source_tree=source.tree,
            source_entries=entries,
            layout=layout,
            model_name=self.backend.name,
            model_version=self.model_version,
            model_sha256=self.model_sha256,
            feature_spec_sha256=self.spec_sha256,
            model_bsym_version=metadata.get(VERSION_KEY, ""),
            model_git_commit=metadata.get(GIT_COMMIT_KEY, ""),
            branches=",".join(self._branch_names(layout)),
            discriminant=metadata.get(DISCRIMINANT_KEY, ""),
        )

    def _branch_names(self, layout: Layout) -> list[str]:
        if layout == "object":
            return [column.name for column in self.columns]
        objects = self.spec.objects
        return [self.spec.count_branch, *(f"{objects}_{column.name}" for column in self.columns)]

    def _write(
        self,
        tree: Any,
        source: TreeSource,
        target: Path,
        layout: Layout,
        branches: list[str],
        provenance: Provenance,
        label: str,
    ) -> int:
        from tqdm import tqdm

        objects = 0
        ranges = self.spec.input_ranges
        counts = None if ranges is None else InputCounts.of(ranges)
        self.counts = counts

        def produce() -> Iterator[tuple[int, int, FeatureBatch, PaddedFeeds | None]]:
            # Everything but inference and writing runs here, in the prefetch thread.
            for first, entries, batch in feature_batches(
                tree, source, branches, self.spec, layout, step_size=self.step_size
            ):
                if counts is not None:
                    count_inputs(counts, self.spec, batch)
                yield first, entries, batch, self._padded(batch)

        with atomic_output(target) as temporary:
            writer = FriendTreeWriter(
                temporary,
                tree=source.tree,
                title=f"{self.backend.name} scores, friend of {source.name}:{source.tree}",
                columns=self.columns,
                objects=self.spec.objects if layout == "event" else None,
                counter_dtype=(
                    counter_dtype(tree, self.spec.count_branch) if layout == "event" else None
                ),
                provenance=provenance,
                extra={"feature_spec": self.spec.to_json()},
            )
            try:
                with (
                    prefetched(produce, depth=PREFETCH_DEPTH) as chunks,
                    sharing_cores(self.backend, lambda: chunks.producing),
                    tqdm(
                        total=provenance.source_entries,
                        desc=f"{label} {source.name}",
                        unit=" entries",
                        unit_scale=True,
                        leave=False,
                        disable=not self.progress,
                    ) as bar,
                ):
                    for first, entries, batch, padded in chunks:
                        outputs = self._predict(batch, padded, first, entries)
                        writer.append(outputs, entries=entries, counts=batch.counts)
                        objects += batch.n_rows
                        bar.update(entries)
                if self.strict and counts is not None and counts.flagged():
                    raise BadValueError(
                        "inputs outside the model's training range (--strict-inputs): "
                        + "; ".join(describe(feature) for feature in counts.flagged())
                    )
            except BaseException:
                writer.abort()
                raise
            writer.close()
            if writer.entries != provenance.source_entries:
                raise InputFileError(
                    f"{source}: read {writer.entries} entries, the tree has "
                    f"{provenance.source_entries}"
                )
        return objects

    def _padded(self, batch: FeatureBatch) -> PaddedFeeds | None:
        """The feeds of ``batch`` cut as ``self.padding`` says; ``None`` for no rows."""
        if batch.n_rows == 0:
            return None
        tensors = batch.inputs()
        feed = {name: tensors[name] for name in self.backend.input_names}
        return padded_feeds(feed, self.padding, self.group_rows)

    def _predict(
        self, batch: FeatureBatch, padded: PaddedFeeds | None, first: int, entries: int
    ) -> Mapping[str, Tensor]:
        rows = batch.n_rows
        if padded is None:
            return {
                name: np.empty((0, *example.shape[1:]), dtype=example.dtype)
                for name, example in self.examples.items()
            }
        outputs = run_padded(self.backend, padded)
        where = f"entries {first}..{first + entries - 1}"
        for name, example in self.examples.items():
            found = outputs.get(name)
            expected = (rows, *example.shape[1:])
            if found is None or found.shape != expected:
                shape = "nothing" if found is None else list(found.shape)
                raise SpecMismatchError(
                    f"model '{self.backend.name}' output '{name}' for {where}: expected shape "
                    f"{list(expected)}, found {shape}"
                )
            if np.issubdtype(found.dtype, np.floating) and not np.isfinite(found).all():
                bad = int(np.count_nonzero(~np.isfinite(found)))
                raise BadValueError(
                    f"model '{self.backend.name}' returned {bad} NaN or infinite values in "
                    f"output '{name}' for {where}"
                )
        return outputs


@dataclass(frozen=True)
class PaddedFeeds:
    """The feeds of one batch as the backend is to run them, and how to put the outputs
    back: ``order[i]`` is the input row of row ``i`` of the concatenated outputs."""

    feeds: list[dict[str, Tensor]]
    order: npt.NDArray[np.int64] | None = None
    """``None``: the outputs are in input order already."""


def padded_feeds(feed: dict[str, Tensor], padding: Padding, group_rows: int) -> PaddedFeeds:
    """``feed`` (tensors padded to ``max_count``) cut as ``padding`` says (see
    :class:`~bsym.serving.defaults.Padding`); anything but ``fixed`` needs a model with a
    dynamic constituent axis."""
    if padding is Padding.fixed or MASK not in feed:
        return PaddedFeeds([feed])
    lengths = slot_lengths(feed[MASK])
    max_count = feed[MASK].shape[1]
    longest = request_width(int(lengths.max()), max_count)
    if padding is Padding.longest:
        return PaddedFeeds([narrowed(feed, longest)])
    order = np.argsort(lengths, kind="stable")
    groups = [order[start : start + group_rows] for start in range(0, len(order), group_rows)]
    widths = [request_width(int(lengths[group[-1]]), max_count) for group in groups]
    slots = sum(len(group) * width for group, width in zip(groups, widths, strict=True))
    if slots > GROUPING_WORTH * len(order) * longest:
        # most rows are as long as the longest: gathering the groups would cost more
        return PaddedFeeds([narrowed(feed, longest)])
    feeds = [narrowed(feed, width, group) for group, width in zip(groups, widths, strict=True)]
    return PaddedFeeds(feeds, None if np.all(order[1:] >= order[:-1]) else order)


def run_padded(backend: Backend, padded: PaddedFeeds) -> Mapping[str, Tensor]:
    """``backend``'s outputs for every feed of ``padded``, joined in input order."""
    parts = [backend.predict(feed) for feed in padded.feeds]
    if len(parts) == 1 and padded.order is None:
        return parts[0]
    outputs: dict[str, Tensor] = {}
    sizes = [len(next(iter(feed.values()))) for feed in padded.feeds]
    for name in parts[0]:
        pieces = [part.get(name) for part in parts]
        if any(p is None or len(p) != n for p, n in zip(pieces, sizes, strict=True)):
            return parts[0]  # a part of the wrong shape: the caller names the problem
        merged = np.concatenate([p for p in pieces if p is not None])
        if padded.order is None:
            outputs[name] = merged
            continue
        restored = np.empty_like(merged)
        restored[padded.order] = merged
        outputs[name] = restored
    return outputs


def predict_padded(
    backend: Backend, feed: dict[str, Tensor], padding: Padding, group_rows: int
) -> Mapping[str, Tensor]:
    """``backend``'s outputs for ``feed``, run as ``padding`` says, in the rows' order."""
    return run_padded(backend, padded_feeds(feed, padding, group_rows))


def model_file_identity(backend: Backend) -> tuple[str, str]:
    """(version, sha256) of the backend's model file; the version is that of the repository
    folder holding the file ('' for a bare ``model.onnx``), or the version a server serves."""
    path = getattr(backend, "path", None)
    if isinstance(path, Path):
        folder = path.resolve().parent.name
        return (folder if folder.isdigit() else ""), sha256_of(path)
    version = getattr(backend, "version", None)
    return ("" if version is None else str(version)), backend.metadata.get(SERVED_SHA256_KEY, "")


def feature_batches(
    tree: Any,
    source: TreeSource,
    branches: list[str],
    spec: FeatureSpec,
    layout: Layout,
    *,
    step_size: int | str,
    entries_per_batch: int = ENTRIES_PER_BATCH,
) -> Iterator[tuple[int, int, FeatureBatch]]:
    """(first entry, entries, tensors) for consecutive slices of the tree.

    Each chunk read at ``step_size`` is cut into slices of ``entries_per_batch`` before its
    tensors are built: the padded tensors and the sorting temporaries of a whole large chunk
    would take several times its size, and smaller sorts are faster.
    """
    first = 0
    for arrays in iterate_chunks(tree, source, branches, step_size=step_size):
        for start in range(0, len(arrays), entries_per_batch):
            part = arrays[start : start + entries_per_batch]
            entries = len(part)
            try:
                batch = build_features(part, spec, layout)
            except (BadValueError, SpecMismatchError) as error:
                where = f"entries {first}..{first + entries - 1}"
                raise type(error)(f"{where}: {error}") from error
            yield first, entries, batch
            first += entries
