"""Compare trained models on held-out rows: AUC and background rejection, with bootstrap errors.

For each checkpoint the rows are its own test split (re-read from the recorded files) or the
given files. Background rejection is 1/ε_B at a fixed signal efficiency ε_S, read off the ROC
curve of the cut ``score >= threshold`` and interpolated linearly between its points. Each
uncertainty is the standard deviation over ``n_bootstrap`` resamplings of the rows with
replacement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from bsym.errors import BadValueError, ConfigError, SpecMismatchError
from bsym.rootio import atomic_output
from bsym.training.metrics import background_rejection, flavour_figures, roc_auc, roc_curve
from bsym.training.tables import Column, Table, Value

if TYPE_CHECKING:
    from bsym.features import FeatureBatch
    from bsym.training.checkpoint import LoadedModel

WORKING_POINTS = (0.5, 0.9)
METRICS_FILENAME = "metrics.json"
ROC_FILENAME = "roc.png"
PREDICT_BATCH = 8192
HELD_OUT_TITLE = "Held-out performance"
FLAVOUR_COLUMNS = {
    "light_rej70": "light rej70",
    "light_rej77": "light rej77",
    "c_rej70": "c rej70",
    "c_rej77": "c rej77",
}
"""Flavour taggers' extra columns: rejection at 70% and 77% b-efficiency on D_b."""
T = TypeVar("T")


@dataclass(frozen=True)
class ModelMetrics:
    """One model's figures of merit on its evaluation rows; errors are bootstrap std devs."""

    name: str
    type: str
    checkpoint: str
    data: str
    n_test: int
    auc: float
    auc_err: float
    rej50: float
    rej50_err: float
    rej90: float
    rej90_err: float
    supervision: str = "truth"
    """For ``cwola`` models: auc/rej* against the truth where the rows have it, else sWeighted."""
    auc_sweighted: float = math.nan
    auc_sweighted_err: float = math.nan
    signal_yield: float = math.nan
    signal_yield_err: float = math.nan
    n_positive: int = 0
    """Rows of the positive class among the ``n_test`` (sWeighted CWoLa rows: 0)."""
    flavour: dict[str, float] = field(default_factory=dict)
    """Multi-class taggers: light and c rejection at 70% and 77% b-efficiency and the AUCs
    on D_b (:func:`~bsym.training.metrics.flavour_figures`); empty for binary models."""
    flavour_err: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Curve:
    name: str
    auc: float
    signal_efficiency: npt.NDArray[np.float64]
    background_efficiency: npt.NDArray[np.float64]


@dataclass(frozen=True)
class EvaluationResult:
    """Per-model metrics (in the order given) and the files written."""

    models: list[ModelMetrics]
    metrics_path: Path
    roc_path: Path
    title: str = HELD_OUT_TITLE
    """"Held-out performance", or "Performance on FILES (N objects, P positive)" with --data."""

    def ranked(self) -> list[ModelMetrics]:
        """Best AUC first."""
        return sorted(self.models, key=lambda m: -m.auc)


def evaluate(
    models: Sequence[Path],
    out_dir: Path,
    *,
    data: Sequence[str] | None = None,
    n_bootstrap: int = 100,
    seed: int = 0,
) -> EvaluationResult:
    """Score each checkpoint, write ``metrics.json`` and ``roc.png`` into ``out_dir``.

    ``data`` replaces every model's test split by the rows of these files (uproot syntax,
    ``file.root:tree``); ``seed`` fixes the bootstrap resamplings.
    """
    from bsym.training.checkpoint import load_checkpoint, predict

    if not models:
        raise ConfigError("evaluate needs at least one checkpoint")
    if n_bootstrap < 2:
        raise ConfigError(f"n_bootstrap must be at least 2 for an uncertainty, got {n_bootstrap}")
    metrics: list[ModelMetrics] = []
    curves: list[_Curve] = []
    titles: list[str] = []
    for path in models:
        loaded = load_checkpoint(Path(path))
        batch, source, files = _rows(loaded, data)
        if batch.label is None:
            raise SpecMismatchError(f"{source} gives no labels for model '{loaded.name}'")
        name = _unique(loaded.name, [m.name for m in metrics])
        labels, weights = batch.label, batch.weight
        flavour: tuple[dict[str, float], dict[str, float]] = ({}, {})
        if getattr(loaded.model, "n_classes", 1) == 1:
            scores = predict(loaded, batch, batch_size=PREDICT_BATCH).astype(np.float64)
        else:
            labels, scores, flavour = _multi_class(
                loaded, batch, n_bootstrap=n_bootstrap, seed=seed
            )
        n_positive = int(np.count_nonzero(labels == 1))
        cwola = None
        if loaded.config.supervision.type == "cwola":
            from bsym.training.cwola_evaluation import evaluate_cwola, evaluation_rows

            cwola = evaluate_cwola(
                scores,
                evaluation_rows(loaded, data),
                window=loaded.config.supervision.window,
                n_bootstrap=n_bootstrap,
                seed=seed,
            )
            labels, scores = cwola.labels, cwola.scores
            weights = None if cwola.weights is None else cwola.weights.astype(np.float32)
            n_positive = int(np.count_nonzero(labels == 1)) if cwola.has_truth else 0
        try:
            fpr, tpr, _ = roc_curve(labels, scores, weights)
            auc = roc_auc(labels, scores, weights)
        except ValueError as error:  # one class only, or non-finite weights
            raise BadValueError(f"model '{name}' on {source}: {error}") from error
        rej50, rej90 = (background_rejection(fpr, tpr, point) for point in WORKING_POINTS)
        errors = _bootstrap(labels, scores, weights, n_bootstrap=n_bootstrap, seed=seed)
        metrics.append(
            ModelMetrics(
                name=name,
                type=loaded.config.model.type,
                checkpoint=str(path),
                data=source,
                n_test=len(labels) if cwola is not None and cwola.has_truth else batch.n_rows,
                auc=auc,
                auc_err=errors[0],
                rej50=rej50,
                rej50_err=errors[1],
                rej90=rej90,
                rej90_err=errors[2],
                supervision=loaded.config.supervision.type,
                n_positive=n_positive,
                auc_sweighted=math.nan if cwola is None else cwola.auc_sweighted,
                auc_sweighted_err=math.nan if cwola is None else cwola.auc_sweighted_err,
                signal_yield=math.nan if cwola is None else cwola.fit.signal_yield,
                signal_yield_err=math.nan if cwola is None else cwola.fit.signal_yield_err,
                flavour=flavour[0],
                flavour_err=flavour[1],
            )
        )
        curves.append(_Curve(name, auc, tpr, fpr))
        titles.append(_title(files, metrics[-1], loaded.spec.objects))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Models with different specs may see different rows of the same files.
    title = titles[0] if len(set(titles)) == 1 else _title(files, None, "")
    result = EvaluationResult(metrics, out_dir / METRICS_FILENAME, out_dir / ROC_FILENAME, title)
    _write_json(result.metrics_path, metrics, n_bootstrap=n_bootstrap, seed=seed)
    _plot_roc(result.roc_path, curves)
    return result


def comparison_table(
    models: Sequence[ModelMetrics], *, n_bootstrap: int, title: str = HELD_OUT_TITLE
) -> Table:
    """The models side by side, best AUC first, under ``title`` (what the rows are)."""
    # CWoLa models: the sWeighted AUC from the mass fit beside the AUC (truth where known)
    cwola = any(m.supervision == "cwola" for m in models)
    flavour = [key for key in FLAVOUR_COLUMNS if any(key in m.flavour for m in models)]
    headers = [
        "rows",
        "AUC",
        "rej50",
        "rej90",
        *(["sWeighted AUC"] if cwola else []),
        *(FLAVOUR_COLUMNS[key] for key in flavour),
    ]
    table = Table(
        title,
        [
            Column("model", "left", no_wrap=True),
            Column("type", "left", no_wrap=True),
            *(Column(header, "right", no_wrap=True) for header in headers),
        ],
        notes=[
            "rej50, rej90: background rejection 1/ε_B at 50% and 90% signal efficiency;",
            *(
                [
                    "flavour taggers: signal b against the rest on D_b; light and c rejection "
                    "at 70% and 77% b-efficiency;"
                ]
                if flavour
                else []
            ),
            f"± bootstrap standard deviation over {n_bootstrap} resamplings",
        ],
        compact=True,
    )
    for m in sorted(models, key=lambda m: -m.auc):
        sweighted = Value(m.auc_sweighted, m.auc_sweighted_err)
        table.add_row(
            m.name,
            m.type,
            str(m.n_test),
            Value(m.auc, m.auc_err),
            Value(m.rej50, m.rej50_err, ".1f"),
            Value(m.rej90, m.rej90_err, ".1f"),
            *([None if math.isnan(m.auc_sweighted) else sweighted] if cwola else []),
            *(_flavour_cell(m, key) for key in flavour),
        )
    return table


def _flavour_cell(metrics: ModelMetrics, key: str) -> Value | None:
    if key not in metrics.flavour:
        return None
    value, error = metrics.flavour[key], metrics.flavour_err.get(key, math.nan)
    return Value(value, error, ".4f" if key.endswith("auc") else ".1f")


def _title(files: str | None, metrics: ModelMetrics | None, objects: str) -> str:
    if files is None:
        return HELD_OUT_TITLE
    if metrics is None:
        return f"Performance on {files}"
    known = metrics.supervision == "truth" or metrics.n_positive > 0
    positive = f", {metrics.n_positive} positive" if known else ""
    return f"Performance on {files} ({metrics.n_test} {objects.lower()}s{positive})"


def _rows(loaded: LoadedModel, data: Sequence[str] | None) -> tuple[FeatureBatch, str, str | None]:
    """The rows, what they are, and the file names of ``data`` (``None``: the test split)."""
    if not data:
        if len(loaded.split.test) == 0:
            raise ConfigError(
                f"{loaded.path} has no held-out test rows (data.test_fraction=0); pass "
                "--data FILES to evaluate it"
            )
        return loaded.held_out_test(), f"test split of {loaded.path}", None
    from bsym.rootio import parse_inputs
    from bsym.training.dataset import read_training_rows

    sources = parse_inputs(data, default_tree=loaded.config.data.tree or loaded.spec.tree)
    batch, records = read_training_rows(sources, loaded.config, max_rows=None)
    files = ", ".join(dict.fromkeys(Path(record.path).name for record in records))
    return batch, ", ".join(f"{record.path}:{record.tree}" for record in records), files


def _bootstrap(
    labels: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float32] | None,
    *,
    n_bootstrap: int,
    seed: int,
) -> tuple[float, float, float]:
    """Standard deviations of AUC, rej50 and rej90 over resamplings of the rows."""

    def figures(rows: npt.NDArray[np.int64]) -> tuple[float, float, float]:
        w = None if weights is None else weights[rows]
        fpr, tpr, _ = roc_curve(labels[rows], scores[rows], w)
        auc = roc_auc(labels[rows], scores[rows], w)
        rej50, rej90 = (background_rejection(fpr, tpr, point) for point in WORKING_POINTS)
        return auc, rej50, rej90

    samples = _resampled(len(scores), figures, n_bootstrap=n_bootstrap, seed=seed)
    values = np.asarray(samples, dtype=np.float64).reshape(-1, 3)
    return (finite_std(values[:, 0]), finite_std(values[:, 1]), finite_std(values[:, 2]))


def _resampled(
    n_rows: int, figures: Callable[[npt.NDArray[np.int64]], T], *, n_bootstrap: int, seed: int
) -> list[T]:
    """``figures`` of ``n_bootstrap`` resamplings of the rows with replacement, leaving out
    the resamplings it rejects with ``ValueError`` (one without one of the classes)."""
    rng = np.random.default_rng(seed)
    samples: list[T] = []
    for _ in range(n_bootstrap):
        rows = rng.integers(0, n_rows, size=n_rows)
        try:
            samples.append(figures(rows))
        except ValueError:
            continue
    return samples


def _multi_class(
    loaded: LoadedModel, batch: FeatureBatch, *, n_bootstrap: int, seed: int
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.float64], tuple[dict[str, float], dict[str, float]]
]:
    """A multi-class model as one signal class against the rest (its D_b, or the log-odds of
    its last class without a discriminant), and its flavour figures with bootstrap errors."""
    from bsym.training.checkpoint import predict_probabilities

    label = need_label(batch)
    probabilities = predict_probabilities(loaded, batch, batch_size=PREDICT_BATCH)
    names = loaded.config.class_labels
    discriminant = loaded.config.discriminant
    if discriminant is not None:
        scores = discriminant.of(probabilities, names)
        signal, charm, light = discriminant.columns(names)
        backgrounds = {"light": light, "c": charm}
    else:
        signal = len(names) - 1
        p = np.clip(probabilities[:, signal].astype(np.float64), 1e-30, 1 - 1e-7)
        scores = np.log(p) - np.log1p(-p)
        backgrounds = {names[k]: k for k in range(signal)}
    weights = batch.weight
    figures = flavour_figures(label, scores, backgrounds, signal, weights)

    def resampled(rows: npt.NDArray[np.int64]) -> dict[str, float]:
        w = None if weights is None else weights[rows]
        return flavour_figures(label[rows], scores[rows], backgrounds, signal, w)

    samples = _resampled(len(label), resampled, n_bootstrap=n_bootstrap, seed=seed)
    errors = {key: finite_std([sample[key] for sample in samples]) for key in figures}
    return (label == signal).astype(np.int64), scores, (figures, errors)


def need_label(batch: FeatureBatch) -> npt.NDArray[np.int64]:
    if batch.label is None:
        raise SpecMismatchError("the evaluation rows have no labels")
    return batch.label


def finite_std(values: npt.ArrayLike) -> float:
    """The spread (ddof 1) of the finite values; NaN with fewer than two."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    # Resamplings with no background left at the working point have infinite rejection;
    # the spread is taken over the others, and is undefined if fewer than two remain.
    return float(np.std(finite, ddof=1)) if len(finite) >= 2 else math.nan


def _unique(name: str, taken: Sequence[str]) -> str:
    if name not in taken:
        return name
    number = 2
    while f"{name}_{number}" in taken:
        number += 1
    return f"{name}_{number}"


def _write_json(path: Path, models: Sequence[ModelMetrics], *, n_bootstrap: int, seed: int) -> None:
    document = {
        "working_points": {"rej50": WORKING_POINTS[0], "rej90": WORKING_POINTS[1]},
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "models": [{k: json_number(v) for k, v in asdict(m).items()} for m in models],
    }
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def json_number(value: object) -> Any:
    """Infinite or undefined figures become ``null`` (in dicts and lists too): JSON has no
    infinity."""
    if isinstance(value, dict):
        return {key: json_number(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_number(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plot_roc(path: Path, curves: Sequence[_Curve]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for curve in sorted(curves, key=lambda c: -c.auc):
        shown = (curve.signal_efficiency > 0) & (curve.background_efficiency > 0)
        axes.plot(
            curve.signal_efficiency[shown],
            1.0 / curve.background_efficiency[shown],
            label=f"{curve.name} (AUC = {curve.auc:.4f})",
        )
    axes.set_yscale("log")
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("signal efficiency $\\varepsilon_S$")
    axes.set_ylabel("background rejection $1/\\varepsilon_B$")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
