"""Learning curve of the broken-Lorentz-symmetry task (arXiv:2412.18773; docs/papers.md,
"Lorentz symmetry").

Trains the unconstrained, invariant and dual-subnet networks at several training sizes with
repeats and reports the test AUC of each, and the learned weight of the dual subnet on its
unconstrained half in bins of leading-muon pT.

Data
    One sample from :func:`bsym.simulate.lorentz.write_lorentz` (cached in the cache directory
    under the breaking strength, seed and size, and reused), read back through the feature
    spec like any training file. Its first ``test_events`` events are the test set, the next
    ``val_events`` the validation set, and repeat r trains on the first n events of its own
    block of ``max(sizes)`` events, so the training sets of one repeat are nested and the
    repeats are disjoint.
User files (:class:`UserData`, ``--data`` and ``--test-data``; the format in docs/formats.md)
    Read through the same feature spec. The rows of ``--data`` are shuffled with the study's
    seed (a file sorted by class would otherwise give one-class training sets) and then cut
    as above: ``test_events`` test rows first unless ``--test-data`` gives the test set (all
    its rows, in file order), then ``val_events`` validation rows and the repeats' blocks.
    Without the background weights (``reweight=False``) the ``weight`` branch is not read.
Training (in memory, with the one training loop :func:`bsym.training.fit.fit`; the paper's
AdamW lr 1e-5, batch 128, 100 epochs is far too slow for the budget of an hour on two shared
CPU cores for 45 trainings)
    The schedule is :meth:`StudySettings.schedule`, the same as the ``optimizer`` section of
    the shipped ``lorentz_*.yaml`` configs, so ``bsym train`` trains like the study: AdamW,
    lr 1e-3, weight decay 0.01, batch 256, at most 40 epochs; the learning rate drops by 3
    after 3 epochs without a better validation AUC and training stops after 8. A training
    set too small for 2,400 optimiser steps in 40 epochs has the three numbers stretched by
    the same factor, at most 4 (8k events: 78 epochs, patience 16, lr patience 6). The
    invariant network converges in about 10 epochs, the dual subnet in 10–20; the
    unconstrained one learns the mass from four-vectors slowly, in 40 or more. One torch
    thread by default: these small networks gain little from two, and lose several-fold
    when other jobs compete for the cores. The model kept is the one of the best validation
    AUC (not the best test AUC: the test set never chooses anything). The background weights
    enter as a weighted loss: per-event BCE with logits times the event weight, divided by
    the sum of the weights in the batch. ``--quick``: sizes 8k and 32k, 2 repeats, at most
    12 epochs, 50k test events.
Metric
    ROC AUC on the test set with the background weights (signal weight 1), so the leading
    pT alone gives 0.5. The learned weight of the dual subnet is the plain mean of
    w_unconstrained over the test events in each leading-pT bin.
Control without weights (``reweight=False``)
    All weights set to 1 in training and in the AUC. The pT reweighting is itself not
    Lorentz invariant: it makes the leading pT at fixed mass differ between the classes, so
    even at breaking 0 the best weighted classifier uses pT0 as well as the mass. Without the
    weights the ideal classifier at breaking 0 is a function of the mass alone.
Results (breaking 0.1, 3 repeats, 200k test events; 45 trainings in 48.9 min on one core)
    Test AUC, mean ± std over repeats::

        events  unconstrained     invariant         dual subnet
        8k      0.7365 ± 0.0045   0.7793 ± 0.0003   0.7990 ± 0.0016
        16k     0.7701 ± 0.0054   0.7797 ± 0.0001   0.8022 ± 0.0007
        32k     0.7811 ± 0.0014   0.7798 ± 0.0001   0.8070 ± 0.0011
        64k     0.7865 ± 0.0122   0.7796 ± 0.0000   0.8092 ± 0.0008
        80k     0.7743 ± 0.0188   0.7797 ± 0.0001   0.8091 ± 0.0008

    The dual subnet beats both at every size; its weight on the unconstrained half (80k:
    0.37, 0.31, 0.28, 0.48, 0.53, 0.55, 0.55 in the bins of :data:`PT_EDGES`) dips where the
    Z puts most signal muons and rises above 60 GeV, where the paper's reaches 0.99. One of
    three unconstrained trainings at 80k stops on a plateau (0.753), hence its spread.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator
from torch import Tensor

from bsym.errors import ConfigError
from bsym.features import FeatureBatch
from bsym.rootio import TreeSource
from bsym.settings import Settings
from bsym.training.fit import (
    EVAL_BATCH,
    FitState,
    OptimizerConfig,
    Rows,
    classifier_auc,
    fit,
    predict_logits,
)
from bsym.training.models.base import model_inputs, need
from bsym.training.models.lorentz import (
    DualSubnet,
    InvariantNet,
    LorentzNetwork,
    UnconstrainedNet,
    lorentz_feature_spec,
)
from bsym.training.studies.harness import (
    cached_sample,
    jsonable_summary,
    spread,
    summarise,
    write_json,
)

ModelName = Literal["unconstrained", "invariant", "dual"]
MODELS: dict[str, Callable[[], LorentzNetwork]] = {
    "unconstrained": UnconstrainedNet,
    "invariant": InvariantNet,
    "dual": DualSubnet,
}
MODEL_TITLES = {"unconstrained": "unconstrained", "invariant": "invariant", "dual": "dual subnet"}
PT_EDGES = (0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0, math.inf)


class StudySettings(Settings):
    """Everything that defines one learning-curve study."""

    sizes: tuple[int, ...] = Field(default=(8_000, 16_000, 32_000, 64_000, 80_000), min_length=1)
    repeats: int = Field(default=3, ge=1)
    breaking: float = Field(default=0.10, ge=0)
    seed: int = 1
    test_events: int = Field(default=200_000, ge=2)
    val_events: int = Field(default=20_000, ge=2)
    max_epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=8, ge=1)
    lr_patience: int = Field(default=3, ge=1)
    min_steps: int = Field(default=2_400, ge=0)
    batch_size: int = Field(default=256, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    models: tuple[ModelName, ...] = ("unconstrained", "invariant", "dual")
    reweight: bool = True

    @model_validator(mode="after")
    def _sizes_hold_two_batches(self) -> StudySettings:
        if min(self.sizes) < 2 * self.batch_size:
            raise ValueError(
                f"training sizes must be at least {2 * self.batch_size} events, got {self.sizes}"
            )
        return self

    @property
    def total_events(self) -> int:
        return self.test_events + self.val_events + self.repeats * max(self.sizes)

    def schedule(self) -> OptimizerConfig:
        """The training schedule of every run (the shipped lorentz_*.yaml configs' too)."""
        return OptimizerConfig(
            lr=self.learning_rate,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.max_epochs,
            patience=self.patience,
            lr_patience=self.lr_patience,
            min_steps=self.min_steps,
        )


QUICK = StudySettings(
    sizes=(8_000, 32_000),
    repeats=2,
    test_events=50_000,
    val_events=10_000,
    max_epochs=12,
    patience=4,
    lr_patience=2,
    min_steps=0,
)


@dataclass
class RunResult:
    """One training: which model, size and repeat, and what it reached."""

    model: str
    size: int
    repeat: int
    test_auc: float
    val_auc: float
    best_epoch: int
    epochs: int
    seconds: float
    weight_vs_pt: list[float] | None = None


@dataclass(frozen=True)
class UserData:
    """The user's files: training rows (validation and, without ``test``, test rows cut from
    them with the study's seed) and the test set."""

    train: tuple[TreeSource, ...]
    test: tuple[TreeSource, ...] = ()

    def resolved(self) -> UserData:
        """The same files with the tree each one is read from (bsym.rootio.find_tree)."""
        from bsym.rootio import find_tree

        count = lorentz_feature_spec().count_branch
        return UserData(
            tuple(find_tree(source, count) for source in self.train),
            tuple(find_tree(source, count) for source in self.test),
        )


@dataclass
class StudyResult:
    """All runs of a study, with the settings and the data that produced them."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0
    data: dict[str, object] = field(default_factory=dict)
    sample: str = ""
    """What was trained on, for titles: 'breaking 0.1', or the user's file names."""

    def summary(self) -> dict[str, dict[int, tuple[float, float]]]:
        """Mean and standard deviation of the test AUC, per model and training size."""
        levels = (self.settings.models, self.settings.sizes)
        return summarise(self.runs, "test_auc", ("model", "size"), levels)

    def weight_summary(self) -> dict[int, list[tuple[float, float]]]:
        """Mean and std over repeats of the dual subnet's w_unconstrained per pT bin, by size."""
        summary: dict[int, list[tuple[float, float]]] = {}
        for size in self.settings.sizes:
            curves = [r.weight_vs_pt for r in self.runs if r.size == size and r.weight_vs_pt]
            if curves:
                values = np.array(curves, dtype=np.float64)
                summary[size] = [
                    (float(np.nanmean(column)), spread(column[~np.isnan(column)].tolist()))
                    for column in values.T
                ]
        return summary

    def document(self) -> dict[str, object]:
        """The numbers of the study, as written to ``learning_curve.json``."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "data": self.data,
            "seconds": self.seconds,
            "pt_bins": pt_bin_labels(),
            "auc": jsonable_summary(self.summary()),
            "weight_unconstrained_vs_pt": {
                str(size): [{"mean": m, "std": s} for m, s in bins]
                for size, bins in self.weight_summary().items()
            },
            "runs": [asdict(run) for run in self.runs],
        }


def pt_bin_labels() -> list[str]:
    """Labels of the leading-pT bins, '<20', '20–40', ..., '>120' (GeV)."""
    labels = []
    for low, high in itertools.pairwise(PT_EDGES):
        if low == 0:
            labels.append(f"<{high:g}")
        elif math.isinf(high):
            labels.append(f">{low:g}")
        else:
            labels.append(f"{low:g}–{high:g}")
    return labels


def load_data(settings: StudySettings, data_dir: Path) -> FeatureBatch:
    """Simulate the study's sample into ``data_dir`` (or reuse it) and read it as rows."""
    from bsym.simulate.lorentz import write_lorentz

    sample_dir = data_dir / (
        f"breaking{settings.breaking:g}_seed{settings.seed}_n{settings.total_events}"
    )
    paths = cached_sample(
        sample_dir,
        {"breaking": settings.breaking, "seed": settings.seed, "n": settings.total_events},
        lambda out: write_lorentz(
            out, settings.total_events, seed=settings.seed, breaking=settings.breaking
        ),
    )
    return read_study_rows(
        [TreeSource(path, lorentz_feature_spec().tree) for path in paths], settings
    )


def read_study_rows(sources: Sequence[TreeSource], settings: StudySettings) -> FeatureBatch:
    """The rows of ``sources`` through the Lorentz feature spec; weights 1 without ``reweight``
    (the ``weight`` branch is then not read)."""
    from bsym.training.dataset import read_rows

    spec = lorentz_feature_spec()
    if not settings.reweight:
        spec = spec.model_copy(update={"weight": None})
    rows, _ = read_rows(sources, spec)
    if rows.weight is None:
        rows = dataclasses.replace(rows, weight=np.ones(rows.n_rows, dtype=np.float32))
    return rows


def split(
    data: FeatureBatch, settings: StudySettings
) -> tuple[FeatureBatch, FeatureBatch, list[FeatureBatch]]:
    """Test set, validation set and one training pool per repeat (see the module docstring)."""
    from bsym.training.dataset import take

    order = np.arange(data.n_rows, dtype=np.int64)
    test, rest = order[: settings.test_events], order[settings.test_events :]
    val, pools = _cut(rest, settings, "the simulated sample")
    return take(data, test), take(data, val), [take(data, pool) for pool in pools]


def split_user_data(
    data: UserData, settings: StudySettings
) -> tuple[FeatureBatch, FeatureBatch, list[FeatureBatch]]:
    """Test, validation and training pools from the user's files (see the module docstring)."""
    from bsym.training.dataset import take

    rows = read_study_rows(data.train, settings)
    order = np.random.default_rng([settings.seed, 0]).permutation(rows.n_rows).astype(np.int64)
    what = describe(data.train)
    if data.test:
        test = read_study_rows(data.test, settings)
        rest = order
    else:
        if rows.n_rows <= settings.test_events:
            raise ConfigError(
                f"{what} has {rows.n_rows} rows, not more than the {settings.test_events} test "
                "rows to cut from it: pass --test-data, or a smaller --test-rows"
            )
        test = take(rows, np.sort(order[: settings.test_events]))
        rest = order[settings.test_events :]
    val, pools = _cut(rest, settings, what)
    return test, take(rows, val), [take(rows, pool) for pool in pools]


def _cut(
    rows: npt.NDArray[np.int64], settings: StudySettings, what: str
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.int64]]]:
    """Validation rows, then one block of ``max(sizes)`` rows per repeat."""
    block = max(settings.sizes)
    needed = settings.val_events + settings.repeats * block
    if len(rows) < needed:
        raise ConfigError(
            f"{what}: {len(rows)} rows left for training, but the study needs {needed} "
            f"({settings.val_events} validation + {settings.repeats} repeats × {block}, the "
            "largest size): pass fewer or smaller --sizes, fewer --repeats or a smaller --val-rows"
        )
    start = settings.val_events
    pools = [rows[start + r * block : start + (r + 1) * block] for r in range(settings.repeats)]
    return rows[:start], pools


def file_names(sources: Sequence[TreeSource]) -> str:
    """'a.root' or 'a.root + 2 more', for titles."""
    more = f" + {len(sources) - 1} more" if len(sources) > 1 else ""
    return f"{sources[0].name}{more}"


def describe(sources: Sequence[TreeSource]) -> str:
    """'a.root:Events' or 'a.root:Events and 2 more files', for messages."""
    more = f" and {len(sources) - 1} more files" if len(sources) > 1 else ""
    return f"{sources[0]}{more}"


def weighted_auc(model: LorentzNetwork, data: FeatureBatch) -> float:
    """Test AUC of ``model`` on ``data`` with the event weights."""
    rows = Rows.of(model, data)
    return classifier_auc(rows.label, predict_logits(model, rows.inputs), rows.weight)


@torch.no_grad()
def symmetry_weights(model: DualSubnet, data: FeatureBatch) -> Tensor:
    """The dual subnet's symmetry weights [N, 2] on ``data``, in eval mode."""
    model.eval()
    inputs = model_inputs(model, data)
    return torch.cat(
        [
            model.logits_and_weight(*(t[start : start + EVAL_BATCH] for t in inputs))[1]
            for start in range(0, data.n_rows, EVAL_BATCH)
        ]
    )


def weight_vs_pt(weights: Tensor, lead_pt: npt.NDArray[np.float32]) -> list[float]:
    """Mean w_unconstrained in the leading-pT bins of :data:`PT_EDGES` (NaN where empty)."""
    index = np.digitize(lead_pt, PT_EDGES[1:-1])
    w = weights[:, 0].numpy()
    return [
        float(w[index == b].mean()) if np.any(index == b) else math.nan
        for b in range(len(PT_EDGES) - 1)
    ]


def train_model(
    name: str, train: FeatureBatch, val: FeatureBatch, settings: StudySettings, *, seed: int
) -> tuple[LorentzNetwork, FitState]:
    """Train one network with the one training loop; it ends at its best validation AUC."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.prepare(train)
    state = fit(model, Rows.of(model, train), Rows.of(model, val), settings.schedule(), seed=seed)
    return model, state


def run_study(
    settings: StudySettings,
    data: Path | UserData,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    threads: int | None = None,
) -> StudyResult:
    """Train every model at every size and repeat; ``on_run`` sees each result as it comes.

    ``data`` is the cache directory of the simulated sample, or the user's files.
    """
    from tqdm import tqdm

    from bsym.training.dataset import take

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    if isinstance(data, UserData):
        data = data.resolved()
        test, val, pools = split_user_data(data, settings)
        record: dict[str, object] = {
            "data": [str(source) for source in data.train],
            "test_data": [str(source) for source in data.test],
        }
        tested = f"test {file_names(data.test)}" if data.test else "test rows cut from it"
        sample = f"{file_names(data.train)}, {tested}"
    else:
        test, val, pools = split(load_data(settings, data), settings)
        record = {"simulated": {"breaking": settings.breaking, "cache": str(data)}}
        sample = f"breaking {settings.breaking:g}"
    record["rows"] = {"test": test.n_rows, "validation": val.n_rows}
    result = StudyResult(settings, data=record, sample=sample)
    jobs = [
        (repeat, size, name)
        for repeat in range(settings.repeats)
        for size in settings.sizes
        for name in settings.models
    ]
    for repeat, size, name in tqdm(jobs, desc="learning curve", unit="run"):
        begun = time.perf_counter()
        seed = settings.seed * 10_000 + repeat * 100 + settings.sizes.index(size)
        train = take(pools[repeat], np.arange(size, dtype=np.int64))
        model, state = train_model(name, train, val, settings, seed=seed)
        run = RunResult(
            model=name,
            size=size,
            repeat=repeat,
            test_auc=weighted_auc(model, test),
            val_auc=state.best_auc,
            best_epoch=state.best_epoch,
            epochs=state.epoch,
            seconds=time.perf_counter() - begun,
        )
        if isinstance(model, DualSubnet):
            lead_pt = need(test.globals, "globals")[:, model.gate_index]
            run.weight_vs_pt = weight_vs_pt(symmetry_weights(model, test), lead_pt)
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    result.seconds = time.perf_counter() - started
    return result


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``learning_curve.json`` in ``out_dir`` (the plots are :mod:`.plots`'); its path."""
    return [write_json(out_dir / "learning_curve.json", result.document())]
