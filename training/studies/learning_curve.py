"""Learning curve of the broken-Lorentz-symmetry task (arXiv:2412.18773; docs/papers.md,
"Lorentz symmetry").

Trains the unconstrained, invariant and dual-subnet networks at several training sizes with
repeats and reports the test AUC of each, and the learned weight of the dual subnet on its
unconstrained half in bins of leading-muon pT.

Data
    One sample from :func:`bsym.simulate.lorentz.write_lorentz` (cached in the data directory
    under the breaking strength, seed and size, and reused), read back through the feature
    spec like any training file. Its first ``test_events`` events are the test set, the next
    ``val_events`` the validation set, and repeat r trains on the first n events of its own
    block of ``max(sizes)`` events, so the training sets of one repeat are nested and the
    repeats are disjoint.
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
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureBatch
from bsym.training.fit import (
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

MODELS: dict[str, Callable[[], LorentzNetwork]] = {
    "unconstrained": UnconstrainedNet,
    "invariant": InvariantNet,
    "dual": DualSubnet,
}
MODEL_TITLES = {"unconstrained": "unconstrained", "invariant": "invariant", "dual": "dual subnet"}
PT_EDGES = (0.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0, math.inf)
MANIFEST = "manifest.json"
EVAL_BATCH = 8192
# a stretch beyond this would spend more time validating than training
MAX_STRETCH = 4.0


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines one learning-curve study."""

    sizes: tuple[int, ...] = (8_000, 16_000, 32_000, 64_000, 80_000)
    repeats: int = 3
    breaking: float = 0.10
    seed: int = 1
    test_events: int = 200_000
    val_events: int = 20_000
    max_epochs: int = 40
    patience: int = 8
    lr_patience: int = 3
    min_steps: int = 2_400
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    models: tuple[str, ...] = ("unconstrained", "invariant", "dual")
    reweight: bool = True

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 2 * self.batch_size:
            raise ConfigError(
                f"training sizes must be at least {2 * self.batch_size} events, got {self.sizes}"
            )
        if self.repeats < 1:
            raise ConfigError(f"repeats must be at least 1, got {self.repeats}")
        unknown = set(self.models) - set(MODELS)
        if unknown:
            raise ConfigError(f"unknown model(s) {sorted(unknown)}; choose from {list(MODELS)}")

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
            max_stretch=MAX_STRETCH,
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


@dataclass
class StudyResult:
    """All runs of a study, with the settings that produced them."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[int, tuple[float, float]]]:
        """Mean and standard deviation of the test AUC, per model and training size."""
        table: dict[str, dict[int, tuple[float, float]]] = {}
        for model in self.settings.models:
            table[model] = {}
            for size in self.settings.sizes:
                aucs = [r.test_auc for r in self.runs if r.model == model and r.size == size]
                if aucs:
                    table[model][size] = (float(np.mean(aucs)), _std(aucs))
        return table

    def weight_summary(self) -> dict[int, list[tuple[float, float]]]:
        """Mean and std over repeats of the dual subnet's w_unconstrained per pT bin, by size."""
        summary: dict[int, list[tuple[float, float]]] = {}
        for size in self.settings.sizes:
            curves = [r.weight_vs_pt for r in self.runs if r.size == size and r.weight_vs_pt]
            if curves:
                values = np.array(curves, dtype=np.float64)
                summary[size] = [
                    (float(np.nanmean(column)), _std(column[~np.isnan(column)].tolist()))
                    for column in values.T
                ]
        return summary

    def to_json(self) -> str:
        return json.dumps(
            {
                "settings": asdict(self.settings),
                "seconds": self.seconds,
                "pt_bins": pt_bin_labels(),
                "auc": {
                    model: {str(size): {"mean": m, "std": s} for size, (m, s) in rows.items()}
                    for model, rows in self.summary().items()
                },
                "weight_unconstrained_vs_pt": {
                    str(size): [{"mean": m, "std": s} for m, s in bins]
                    for size, bins in self.weight_summary().items()
                },
                "runs": [asdict(run) for run in self.runs],
            },
            indent=2,
        )


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


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
    from bsym.features import build_features, detect_layout, required_branches
    from bsym.rootio import TreeSource, open_tree, read_all
    from bsym.simulate.lorentz import write_lorentz
    from bsym.training.dataset import concatenate

    sample_dir = data_dir / (
        f"breaking{settings.breaking:g}_seed{settings.seed}_n{settings.total_events}"
    )
    wanted = {"breaking": settings.breaking, "seed": settings.seed, "n": settings.total_events}
    manifest = sample_dir / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("sample") == wanted:
        paths = [sample_dir / name for name in json.loads(manifest.read_text())["files"]]
    else:
        paths = write_lorentz(
            sample_dir, settings.total_events, seed=settings.seed, breaking=settings.breaking
        )
        manifest.write_text(json.dumps({"sample": wanted, "files": [p.name for p in paths]}))
    spec = lorentz_feature_spec()
    batches = []
    for path in paths:
        source = TreeSource(path, spec.tree)
        tree = open_tree(source)
        layout = detect_layout(tree.keys(), spec)
        tree.file.close()
        arrays = read_all(source, required_branches(spec, layout, with_label=True))
        batches.append(build_features(arrays, spec, layout, with_label=True))
    rows = concatenate(batches)
    if rows.weight is None:
        raise SpecMismatchError("the lorentz feature spec gave no event weights")
    if not settings.reweight:
        rows = dataclasses.replace(rows, weight=np.ones_like(rows.weight))
    return rows


def split(
    data: FeatureBatch, settings: StudySettings
) -> tuple[FeatureBatch, FeatureBatch, list[FeatureBatch]]:
    """Test set, validation set and one training pool per repeat (see the module docstring)."""
    from bsym.training.dataset import take

    def rows(start: int, stop: int) -> FeatureBatch:
        return take(data, np.arange(start, stop, dtype=np.int64))

    stop = settings.test_events + settings.val_events
    block = max(settings.sizes)
    pools = [rows(stop + r * block, stop + (r + 1) * block) for r in range(settings.repeats)]
    return rows(0, settings.test_events), rows(settings.test_events, stop), pools


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
    data_dir: Path,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    threads: int | None = None,
) -> StudyResult:
    """Train every model at every size and repeat; ``on_run`` sees each result as it comes."""
    from tqdm import tqdm

    from bsym.training.dataset import take

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    test, val, pools = split(load_data(settings, data_dir), settings)
    result = StudyResult(settings)
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


def with_overrides(settings: StudySettings, **overrides: object) -> StudySettings:
    """``settings`` with the given fields replaced (``None`` values are ignored)."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def plot_auc_vs_size(result: StudyResult, path: Path) -> None:
    """Mean test AUC ± std against training size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for model, rows in result.summary().items():
        sizes = sorted(rows)
        axes.errorbar(
            sizes,
            [rows[s][0] for s in sizes],
            yerr=[rows[s][1] for s in sizes],
            marker="o",
            capsize=3,
            label=MODEL_TITLES[model],
        )
    axes.set_xscale("log")
    axes.set_xlabel("training events")
    axes.set_ylabel("test AUC (weighted)")
    axes.set_title(f"dimuon task, breaking {result.settings.breaking:g}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_weight_vs_pt(result: StudyResult, path: Path) -> None:
    """Mean learned weight on the unconstrained subnet per leading-pT bin, per training size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = pt_bin_labels()
    positions = np.arange(len(labels))
    figure, axes = plt.subplots(figsize=(6, 4))
    for size, bins in result.weight_summary().items():
        axes.errorbar(
            positions,
            [m for m, _ in bins],
            yerr=[s for _, s in bins],
            marker="o",
            capsize=3,
            label=f"{size // 1000}k",
        )
    axes.set_xticks(positions, labels)
    axes.set_xlabel("leading-muon pT [GeV]")
    axes.set_ylabel("mean w_unconstrained")
    axes.set_ylim(0, 1)
    axes.set_title("dual subnet: learned symmetry factor")
    axes.legend(title="training events")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """The JSON of the numbers and both plots; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "learning_curve.json", out_dir / "auc_vs_size.png"]
    paths[0].write_text(result.to_json())
    plot_auc_vs_size(result, paths[1])
    if result.weight_summary():
        paths.append(out_dir / "symmetry_weight_vs_pt.png")
        plot_weight_vs_pt(result, paths[2])
    return paths
