"""The studies' plots, made by the CLI from the results the studies return.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here chooses
or changes the process-wide backend; each file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bsym.rootio import atomic_output

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bsym.training.studies.augmentation import StudyResult as AugmentationResult
    from bsym.training.studies.decorrelation import StudyResult as DecorrelationResult
    from bsym.training.studies.flavour import StudyResult as FlavourResult
    from bsym.training.studies.isolation import StudyResult as IsolationResult
    from bsym.training.studies.learning_curve import StudyResult as LearningCurveResult


def _figure(width: float, height: float, **layout: Any) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), **layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, *, tight: bool = True) -> Path:
    if tight:
        figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return path


def _errorbars(axes: Any, rows: dict[int, tuple[float, float]], label: str) -> None:
    sizes = sorted(rows)
    axes.errorbar(
        sizes,
        [rows[s][0] for s in sizes],
        yerr=[rows[s][1] for s in sizes],
        marker="o",
        capsize=3,
        label=label,
    )


def learning_curve_plots(result: LearningCurveResult, out_dir: Path) -> list[Path]:
    """``auc_vs_size.png`` and, with a dual subnet, ``symmetry_weight_vs_pt.png``."""
    from bsym.training.studies.learning_curve import MODEL_TITLES, pt_bin_labels

    figure = _figure(6, 4)
    axes = figure.add_subplot()
    for model, rows in result.summary().items():
        _errorbars(axes, rows, MODEL_TITLES[model])
    axes.set_xscale("log")
    axes.set_xlabel("training events")
    axes.set_ylabel("test AUC (weighted)")
    axes.set_title(f"dimuon task, {result.sample}")
    axes.legend()
    paths = [_save(figure, out_dir / "auc_vs_size.png")]
    weights = result.weight_summary()
    if not weights:
        return paths
    labels = pt_bin_labels()
    positions = np.arange(len(labels))
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    for size, bins in weights.items():
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
    return [*paths, _save(figure, out_dir / "symmetry_weight_vs_pt.png")]


def augmentation_plots(result: AugmentationResult, out_dir: Path) -> list[Path]:
    """``auc_vs_size.png`` and ``signal_efficiency_vs_size.png``."""
    return [
        _augmentation_metric(result, "test_auc", "test AUC", out_dir / "auc_vs_size.png"),
        _augmentation_metric(
            result,
            "signal_efficiency",
            "signal efficiency at 50% background",
            out_dir / "signal_efficiency_vs_size.png",
        ),
    ]


def _augmentation_metric(result: AugmentationResult, metric: str, label: str, path: Path) -> Path:
    """Mean ± std against training size: one panel per network, one line per column."""
    from bsym.training.studies.augmentation import COLUMN_TITLES, NETWORK_TITLES

    summary = result.summary(metric)
    networks = list(summary)
    panels = max(len(networks), 1)
    figure = _figure(5.5 * panels, 4)
    axes_list = figure.subplots(1, panels, squeeze=False)
    for axes, network in zip(axes_list[0], networks, strict=False):
        for column, rows in summary[network].items():
            if rows:
                _errorbars(axes, rows, COLUMN_TITLES[column])
        axes.set_xlabel("training events")
        axes.set_ylabel(label)
        axes.set_title(f"{NETWORK_TITLES[network]}, {result.settings.geometry} cells")
        axes.legend(fontsize="small")
    return _save(figure, path)


def isolation_plots(result: IsolationResult, out_dir: Path) -> list[Path]:
    """``roc_isolation.png``: true ROC curves (ε_B against ε_S), supervised and CWoLa."""
    from bsym.training.studies.isolation import SUPERVISIONS

    figure = _figure(11.0, 4.8, layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, supervision in zip(panels, SUPERVISIONS, strict=True):
        for title, curves in result.curves.items():
            run = result.run(title, supervision)
            if supervision not in curves or run is None:
                continue
            fpr, tpr = curves[supervision]
            axes.plot(tpr, fpr, label=f"{title} (AUC {run.auc.value:.3f})")
        axes.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        axes.set_yscale("log")
        axes.set_ylim(1e-3, 1.0)
        axes.set_xlim(0.0, 1.0)
        axes.set_xlabel("prompt efficiency $\\varepsilon_S$")
        axes.set_title("supervised (truth labels)" if supervision == "truth" else "CWoLa")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    panels[0].set_ylabel("non-prompt efficiency $\\varepsilon_B$")
    return [_save(figure, out_dir / "roc_isolation.png", tight=False)]


def decorrelation_plots(result: DecorrelationResult, out_dir: Path) -> list[Path]:
    """``rejection_vs_jsd.png``: left, R50 against 1/JSD for each method's λ scan
    (supervised, from the plain model at λ = 0), the CWoLa runs and the random-cut ceiling;
    right, the sWeighted AUC's bias against the true AUC."""
    figure = _figure(12.0, 4.8, layout="constrained")
    left, right = figure.subplots(1, 2)
    plain = [r for r in result.runs if r.supervision == "truth" and r.strength == 0]
    for method, marker in (("disco", "o"), ("adversary", "s")):
        scan = plain + sorted(
            (r for r in result.runs if r.supervision == "truth" and r.method == method
             and r.strength > 0),
            key=lambda r: r.strength,
        )  # fmt: skip
        for axes, x, y in ((left, "inverse_jsd", "rejection50"), (right, "auc", "sweighted_bias")):
            axes.errorbar(
                [getattr(r, x).value for r in scan],
                [getattr(r, y).value for r in scan],
                xerr=[getattr(r, x).error for r in scan],
                yerr=[getattr(r, y).error for r in scan],
                marker=marker,
                capsize=3,
                label=f"supervised, {method}",
            )
            for run in scan:
                axes.annotate(
                    f"λ={run.strength:g}",
                    (getattr(run, x).value, getattr(run, y).value),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                )
    for run in (r for r in result.runs if r.supervision == "cwola"):
        kind = "plain" if run.strength == 0 else f"{run.method} λ={run.strength:g}"
        for axes, x, y in ((left, "inverse_jsd", "rejection50"), (right, "auc", "sweighted_bias")):
            axes.errorbar(
                getattr(run, x).value,
                getattr(run, y).value,
                xerr=getattr(run, x).error,
                yerr=getattr(run, y).error,
                marker="^",
                ls="none",
                capsize=3,
                label=f"CWoLa, {kind}",
            )
    left.scatter(
        [r.inverse_jsd_random for r in result.runs],
        [r.rejection50.value for r in result.runs],
        marker="x",
        color="grey",
        label="random cut, same ε_B",
    )
    left.set_xscale("log")
    left.set_xlabel("1 / JSD (non-prompt mass, passing vs failing)")
    left.set_ylabel("non-prompt rejection at 50% prompt efficiency")
    left.set_title("rejection against mass sculpting")
    right.axhline(0.0, color="grey", lw=0.8, ls=":")
    right.set_xlabel("true AUC")
    right.set_ylabel("sWeighted − true AUC")
    right.set_title("bias of the sWeighted AUC")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="x-small")
    return [_save(figure, out_dir / "rejection_vs_jsd.png", tight=False)]


def flavour_plots(result: FlavourResult, out_dir: Path) -> list[Path]:
    """``rejection_vs_beff.png`` in the conventions of ATLAS's puma: light (solid) and c
    (dashed) rejection against b-efficiency on a log axis, and one ratio panel per background
    class to the reference tagger; ``light_rejection_vs_size.png`` for the size scan."""
    from bsym.training.studies.flavour import CURVE_EFFICIENCIES

    efficiency = np.asarray(CURVE_EFFICIENCIES)
    reference = result.curves.get(result.settings.reference)
    figure = _figure(6.4, 7.2, layout="constrained")
    main, light_ratio, c_ratio = figure.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    colours = {title: f"C{index}" for index, title in enumerate(result.curves)}
    for title, curves in result.curves.items():
        colour = colours[title]
        main.plot(efficiency, _finite_or_nan(curves["light"]), color=colour, label=title)
        main.plot(efficiency, _finite_or_nan(curves["c"]), color=colour, ls="--")
        if reference is None:
            continue
        for axes, background in ((light_ratio, "light"), (c_ratio, "c")):
            ratio = _finite_or_nan(curves[background]) / _finite_or_nan(reference[background])
            axes.plot(efficiency, ratio, color=colour, ls="-" if background == "light" else "--")
    main.set_yscale("log")
    main.set_ylabel("background rejection")
    main.plot([], [], color="black", label="light-jet rejection")
    main.plot([], [], color="black", ls="--", label="c-jet rejection")
    main.legend(fontsize="small", ncol=2)
    main.grid(True, which="both", alpha=0.3)
    main.set_title(f"{result.n_test} test jets, f_c = {result.settings.f_c:g}")
    for axes, background in ((light_ratio, "light"), (c_ratio, "c")):
        axes.axhline(1.0, color="black", lw=0.8)
        axes.set_ylabel(f"{background} ratio\nto {result.settings.reference}", fontsize="small")
        axes.grid(True, alpha=0.3)
    c_ratio.set_xlabel("b-jet efficiency")
    c_ratio.set_xlim(efficiency[0], efficiency[-1])
    paths = [_save(figure, out_dir / "rejection_vs_beff.png", tight=False)]
    if result.scan:
        figure = _figure(6, 4)
        axes = figure.add_subplot()
        for title in dict.fromkeys(run.title for run in result.scan):
            runs = sorted((r for r in result.scan if r.title == title), key=lambda r: r.train_jets)
            rows = {
                r.train_jets: (r.figures["light_rej70"].value, r.figures["light_rej70"].error)
                for r in runs
            }
            _errorbars(axes, rows, title)
        axes.set_xscale("log")
        axes.set_xlabel("training jets")
        axes.set_ylabel("light rejection at 70% b-efficiency")
        axes.legend()
        paths.append(_save(figure, out_dir / "light_rejection_vs_size.png"))
    return paths


def _finite_or_nan(values: list[float]) -> Any:
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(array), array, np.nan)
