"""The studies' tables, as data: the CLI renders them (:func:`bsym.training.tables.to_rich`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from bsym.training.tables import Column, Table, Value, best_of

if TYPE_CHECKING:
    from bsym.training.studies.augmentation import StudyResult as AugmentationResult
    from bsym.training.studies.decorrelation import StudyResult as DecorrelationResult
    from bsym.training.studies.efp_search import SearchResult
    from bsym.training.studies.flavour import StudyResult as FlavourResult
    from bsym.training.studies.harness import Figure
    from bsym.training.studies.isolation import StudyResult as IsolationResult
    from bsym.training.studies.learning_curve import StudyResult as LearningCurveResult

ISOLATION_WIDTH = 150
DECORRELATION_WIDTH = 140
FLAVOUR_WIDTH = 150


def auc_table(result: LearningCurveResult) -> Table:
    """The paper's layout: one row per training size, one column per model, best in bold."""
    from bsym.training.studies.learning_curve import MODEL_TITLES

    summary = result.summary()
    settings = result.settings
    table = Table(
        f"test AUC, mean ± std of {settings.repeats} ({result.sample})",
        [Column("train events", "right"), *(Column(MODEL_TITLES[m]) for m in settings.models)],
    )
    for size in settings.sizes:
        cells = [
            Value(*summary[model][size]) if size in summary[model] else None
            for model in settings.models
        ]
        table.add_row(size_label(size), *best_of(cells))
    return table


def weight_table(result: LearningCurveResult) -> Table:
    """Mean learned weight on the unconstrained subnet: one row per leading-pT bin, one column
    per training size."""
    from bsym.training.studies.learning_curve import pt_bin_labels

    summary = result.weight_summary()
    table = Table(
        "dual subnet: mean w_unconstrained (± std over repeats)",
        [Column("pT0 [GeV]", "right"), *(Column(size_label(size)) for size in summary)],
    )
    for index, label in enumerate(pt_bin_labels()):
        table.add_row(label, *(Value(*bins[index], spec=".2f") for bins in summary.values()))
    return table


def size_label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def augmentation_table(result: AugmentationResult, metric: str, title: str) -> Table:
    """The paper's layout: rows network × training size, columns the five trainings."""
    from bsym.training.studies.augmentation import COLUMN_TITLES, NETWORK_TITLES

    settings = result.settings
    table = Table(
        f"{title}, {settings.geometry} cells, mean ± std of {settings.bootstraps} bootstraps",
        [
            Column("network", "left"),
            Column("train events", "right"),
            *(Column(COLUMN_TITLES[c]) for c in settings.columns),
        ],
    )
    for network, columns in result.summary(metric).items():
        for size in settings.sizes:
            cells = [
                Value(*columns[c][size], spec=".3f") if size in columns[c] else None
                for c in settings.columns
            ]
            table.add_row(NETWORK_TITLES[network], str(size), *best_of(cells))
    return table


def isolation_table(result: IsolationResult) -> Table:
    """Paper 4's layout: one row per model, supervised and CWoLa figures side by side."""
    supervised = ("AUC", "ε_S@50%", "ε_S@5%")
    cwola_headers = ("true AUC", "sW AUC", "ε_S@50%", "ε_S@5%")
    table = Table(
        f"Muon isolation on {result.n_test} test muons "
        f"(± std over {result.settings.bootstraps} bootstraps)",
        [
            Column("model", "left", no_wrap=True),
            *(Column(f"supervised\n{header}", no_wrap=True) for header in supervised),
            *(Column(f"CWoLa\n{header}", no_wrap=True) for header in cwola_headers),
        ],
        notes=[
            "ε_S@x%: prompt efficiency where x% of non-prompt muons pass; "
            "sW AUC: sWeighted AUC from the dimuon mass fit (no truth)"
        ],
        min_width=ISOLATION_WIDTH,
    )
    for title in result.curves:
        truth, cwola = result.run(title, "truth"), result.run(title, "cwola")
        table.add_row(
            title,
            *(figure_value(getattr(truth, name, None)) for name in ("auc", "eff50", "eff5")),
            *(
                figure_value(getattr(cwola, name, None))
                for name in ("auc", "auc_sweighted", "eff50", "eff5")
            ),
        )
    return table


def differences_table(result: IsolationResult) -> Table:
    """The paired differences, each ± its bootstrap error and the ratio of the two."""
    table = Table(
        "Differences on the same test rows (paired bootstrap)",
        [
            Column("difference", "left", no_wrap=True),
            Column("value", "right", no_wrap=True),
            Column("/ error", "right", no_wrap=True),
        ],
        min_width=ISOLATION_WIDTH,
    )
    for difference in result.differences:
        pull = difference.value / difference.error if difference.error > 0 else math.nan
        table.add_row(
            difference.name, Value(difference.value, difference.error, "+.4f"), f"{pull:+.1f}"
        )
    return table


def figure_value(figure: Figure | None) -> Value | None:
    return None if figure is None else Value(figure.value, figure.error)


def search_table(result: SearchResult) -> Table:
    """One row per step: the EFP added, its ADO on the disagreeing pairs, and the network's
    ADO with the PFN and test AUC after retraining."""
    headers = ("κ", "β", "sign", "pairs", "ADO EFP", "ADO network", "test AUC")
    table = Table(
        f"EFP search against {Path(result.pfn).parent.name} "
        f"(PFN test AUC {result.pfn_test_auc:.4f}; {result.candidates} candidates)",
        [
            Column("step", "right", no_wrap=True),
            Column("EFP graph (edges)", "left"),
            *(Column(name, "right", no_wrap=True) for name in headers),
        ],
        notes=[
            "pairs: prompt/non-prompt pairs on which the network before the step and the PFN "
            "disagree; ADO EFP: the chosen EFP's agreement with the PFN on them; ADO network: "
            "the retrained network's with the PFN on all pairs"
        ],
    )
    for step in result.steps:
        chosen = step.edges is not None
        table.add_row(
            str(step.step),
            step.label.replace(",", " "),
            f"{step.kappa:g}" if chosen else "",
            f"{step.beta:g}" if chosen else "",
            ("+" if step.sign == 1 else "−") if chosen else "",
            str(step.disagreeing_pairs) if chosen else "",
            f"{step.efp_ado:.4f}" if step.efp_ado is not None else "",
            f"{step.model_ado:.4f}",
            f"{step.test_auc:.4f}",
        )
    return table


def decorrelation_table(result: DecorrelationResult) -> Table:
    """One row per run: AUC, R50, 1/JSD and the sWeighted AUC's bias, each ± bootstrap."""
    settings = result.settings
    table = Table(
        f"Mass decorrelation, {settings.config} on {result.n_test} test muons "
        f"(± std over {settings.bootstraps} bootstraps)",
        [
            Column("labels", "left", no_wrap=True),
            Column("method", "left", no_wrap=True),
            Column("λ", "right", no_wrap=True),
            Column("true AUC", no_wrap=True),
            Column("R50", no_wrap=True),
            Column("1/JSD", no_wrap=True),
            Column("random", no_wrap=True),
            Column("sW − true AUC", no_wrap=True),
            Column("Δ vs plain", no_wrap=True),
        ],
        notes=[
            "R50: 1/ε_B at 50% prompt efficiency; JSD: non-prompt mass passing vs failing that "
            "cut (random: of a random cut passing as many, the ceiling on these rows); "
            "sW − true AUC: the bias of the sWeighted AUC from the dimuon mass fit; "
            "Δ vs plain: that bias minus the plain run's with the same labels (paired)"
        ],
        min_width=DECORRELATION_WIDTH,
    )
    for run in result.runs:
        table.add_row(
            "CWoLa" if run.supervision == "cwola" else "truth",
            "plain" if run.strength == 0 else run.method,
            f"{run.strength:g}",
            figure_value(run.auc),
            Value(run.rejection50.value, run.rejection50.error, ".2f"),
            Value(run.inverse_jsd.value, run.inverse_jsd.error, ".0f"),
            f"{run.inverse_jsd_random:.0f}",
            Value(run.sweighted_bias.value, run.sweighted_bias.error, "+.4f"),
            Value(run.bias_change.value, run.bias_change.error, "+.4f"),
        )
    return table


def flavour_table(result: FlavourResult) -> Table:
    """One row per tagger: light and c rejection at 70% and 77% b-efficiency, the AUCs on
    D_b, seconds per epoch and epochs to converge; best of each column in bold."""
    from bsym.training.studies.flavour import FIGURES

    settings = result.settings
    headers = {
        "light_rej70": "light rej 70%",
        "light_rej77": "light rej 77%",
        "c_rej70": "c rej 70%",
        "c_rej77": "c rej 77%",
        "light_auc": "AUC b/light",
        "c_auc": "AUC b/c",
    }
    table = Table(
        f"flavour tagging on {result.n_test} test jets ({_class_counts(result)})",
        [
            Column("tagger", "left", no_wrap=True),
            *(Column(headers[key], "right", no_wrap=True) for key in FIGURES),
            Column("s/epoch", "right"),
            Column("epochs (conv.)", "right"),
        ],
        notes=[
            f"on D_b with f_c = {settings.f_c:g}; ± bootstrap std over {settings.bootstraps} "
            "resamplings of the test jets (weighted by Jet_weight)",
            "s/epoch: wall seconds per epoch (training and validation); epochs: run "
            f"(converged: first within {100 * settings.converge_tolerance:g}% of the best "
            "validation loss)",
        ],
        compact=True,
        min_width=FLAVOUR_WIDTH,
    )
    columns = {
        key: best_of([_figure_value(run.figures[key], key) for run in result.runs])
        for key in FIGURES
    }
    for index, run in enumerate(result.runs):
        table.add_row(
            run.title,
            *(columns[key][index] for key in FIGURES),
            "—" if math.isnan(run.seconds_per_epoch) else f"{run.seconds_per_epoch:.1f}",
            f"{run.epochs} ({run.epochs_to_converge})" if run.epochs else "fitted",
        )
    return table


def _class_counts(result: FlavourResult) -> str:
    return ", ".join(f"{count} {name}" for name, count in result.n_test_by_class.items())


def _figure_value(figure: Figure, key: str) -> Value:
    return Value(figure.value, figure.error, ".4f" if key.endswith("auc") else ".1f")


def flavour_scan_table(result: FlavourResult) -> Table:
    """Light rejection at 70% b-efficiency against the training size, per scanned tagger."""
    titles = list(dict.fromkeys(run.title for run in result.scan))
    sizes = sorted({run.train_jets for run in result.scan})
    table = Table(
        "training-size scan: light rejection at 70% b-efficiency",
        [Column("training jets", "right"), *(Column(title) for title in titles)],
    )
    for size in sizes:
        cells = []
        for title in titles:
            run = next((r for r in result.scan if r.title == title and r.train_jets == size), None)
            cells.append(None if run is None else _figure_value(run.figures["light_rej70"], ""))
        table.add_row(str(size), *cells)
    return table


def flavour_claims_table(result: FlavourResult) -> Table:
    """The issue's claims and whether this run bears them out."""
    table = Table(
        "claims",
        [Column("claim", "left"), Column("here", "left"), Column("verdict", "left", no_wrap=True)],
    )
    for verdict in result.verdicts:
        word = {True: "holds", False: "does not hold", None: "not tested"}[verdict.holds]
        table.add_row(verdict.claim, verdict.evidence, word)
    return table
