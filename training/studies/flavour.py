"""Flavour tagging of b, c and light jets (docs/flavour-study.md): one table, the
claims, rejection curves and a training-size scan.

Rows are three-class taggers (light, c, b), each a model section and a shipped feature spec
(``bsym/configs/features``), trained with ``bsym train``'s own loop on the same jets; a row
whose model type this bsym does not have is skipped with a note.

Data
    Two samples of ``bsym simulate flavour`` (cached by seed and size, reused): training jets
    (split by the configs into training and validation rows; no test rows) and, from another
    seed, the test jets, the same for every row. Rows are jets of the training layout (tree
    ``Jets``), weighted by ``Jet_weight`` (the (pT, η) reweighting to the b-jet spectrum).
Figures (on the test jets, each ± the standard deviation over ``bootstraps`` resamplings)
    On D_b = log(p_b / (f_c·p_c + (1 − f_c)·p_light)): light and c rejection at 70% and 77%
    b-efficiency and the AUCs of b against light and against c jets; per training, the
    seconds per epoch (training and validation, wall clock) and the epochs to converge: the
    first epoch whose validation loss is within ``converge_tolerance`` (relative) of the
    run's best. Ratios to a row (and their errors) come from the same resamplings.
Claims (the issue's Must show)
    DIPS against the IP3D- and RNNIP-style baselines at 77%; logarithmic against linear
    inputs (DIPS: epochs to the worse of the two runs' best validation loss, relaxed by the
    tolerance); Vector and Tensor PFN against the scalar PFN at 70% (target ≥ 1.5×), and
    the same without their bilinear layer.
Training-size scan
    The ``scan`` rows again at each of ``scan_sizes`` training jets (the first jets of the
    training sample), on the same test jets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import Field, model_validator

from bsym.configs import shipped_features
from bsym.discriminant import DEFAULT_FC
from bsym.errors import ConfigError
from bsym.rootio import TreeSource
from bsym.settings import Settings
from bsym.training.evaluate import finite_std, json_number
from bsym.training.metrics import B_EFFICIENCIES, flavour_figures, roc_curve
from bsym.training.studies.harness import Figure, bootstrap, simulated_samples, write_json

if TYPE_CHECKING:
    from bsym.training.config import TrainConfig
    from bsym.training.fit import EpochRecord
    from bsym.training.models import BsymModel

FloatArray = npt.NDArray[np.float64]
Indices = npt.NDArray[np.int64]
CLASS_LABELS = ["pu", "pc", "pb"]
LABEL = {"branch": "Jet_hadronFlavour", "classes": [[0], [4], [5]]}
BACKGROUNDS = {"light": 0, "c": 1}
SIGNAL = 2
VALIDATION_FRACTION = 0.2
FIGURES = ("light_rej70", "light_rej77", "c_rej70", "c_rej77", "light_auc", "c_auc")
CURVE_EFFICIENCIES = tuple(round(0.5 + 0.005 * k, 3) for k in range(97))
"""b-efficiencies of the rejection curves: 0.50 to 0.98."""


@dataclass(frozen=True)
class Row:
    """One tagger of the table: its model section, shipped feature spec and epoch cap."""

    title: str
    model: dict[str, Any]
    features: str
    max_epochs: int | None = None


DIPS = "DIPS"
DIPS_LINEAR = "DIPS, linear inputs"
IP3D = "IP3D-style"
RNNIP = "RNNIP-style"
PFN = "PFN (scalar)"
VECTOR = "Vector PFN"
TENSOR = "Tensor PFN"
VECTOR_PLAIN = "Vector PFN, no bilinear"
TENSOR_PLAIN = "Tensor PFN, no bilinear"
SO2_AXIS = {"axis": ["Jet_px", "Jet_py", "Jet_pz"]}
SO2_INPUTS = {
    "scalars": ["log_ptfrac", "charge"],
    "vectors": [
        ["PFCands_px", "PFCands_py", "PFCands_pz"],
        ["PFCands_vx", "PFCands_vy", "PFCands_vz"],
    ],
    **SO2_AXIS,
}
ROWS: tuple[Row, ...] = (
    Row(
        IP3D,
        {"type": "ip3d", "d0_significance": "sd0sig", "z0_significance": "sz0sig"},
        "flavour_dips",
    ),
    Row(RNNIP, {"type": "rnnip", "order_by": "sd0sig"}, "flavour_dips"),
    Row(DIPS, {"type": "dips"}, "flavour_dips"),
    Row(DIPS_LINEAR, {"type": "dips"}, "flavour_dips_linear"),
    Row(PFN, {"type": "flavour_pfn", "use_globals": False}, "flavour_pfn12"),
    Row(VECTOR, {"type": "vector_pfn", **SO2_INPUTS}, "flavour_vector"),
    Row(TENSOR, {"type": "tensor_pfn", **SO2_INPUTS}, "flavour_vector"),
    Row(VECTOR_PLAIN, {"type": "vector_pfn", **SO2_INPUTS, "bilinear": False}, "flavour_vector"),
    Row(TENSOR_PLAIN, {"type": "tensor_pfn", **SO2_INPUTS, "bilinear": False}, "flavour_vector"),
)
REFERENCE = DIPS


class StudySettings(Settings):
    """Everything that defines one flavour study."""

    train_jets: int = Field(default=200_000, ge=100)
    test_jets: int = Field(default=300_000, ge=100)
    max_epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=5, ge=1)
    batch_size: int = Field(default=512, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    bootstraps: int = Field(default=20, ge=2)
    f_c: float = Field(default=DEFAULT_FC, ge=0, le=1)
    converge_tolerance: float = Field(default=0.01, ge=0)
    seed: int = 0
    rows: tuple[Row, ...] = ROWS
    reference: str = REFERENCE
    scan: tuple[str, ...] = (DIPS, PFN)
    scan_sizes: tuple[int, ...] = (25_000, 50_000, 100_000)

    @model_validator(mode="after")
    def _scan_fits(self) -> StudySettings:
        available = self.train_jets - round(VALIDATION_FRACTION * self.train_jets)
        too_large = [size for size in self.scan_sizes if size > available]
        if too_large:
            raise ValueError(
                f"scan sizes {too_large} exceed the {available} training jets left of "
                f"{self.train_jets} after validation"
            )
        return self


SO2_TYPES = ("vector_pfn", "tensor_pfn")
QUICK_SO2 = {"width": 16, "head_sizes": [64, 64]}
"""--quick runs the Vector and Tensor PFN at a quarter of their width: at full width one epoch
of the Tensor PFN costs more than the rest of the quick study."""
QUICK_ROWS = tuple(
    Row(row.title, {**row.model, **QUICK_SO2}, row.features, row.max_epochs)
    if row.model["type"] in SO2_TYPES
    else row
    for row in ROWS
)
QUICK = StudySettings(
    rows=QUICK_ROWS,
    train_jets=8_000,
    test_jets=30_000,
    max_epochs=6,
    patience=3,
    batch_size=256,
    bootstraps=8,
    scan=(DIPS,),
    scan_sizes=(1_600, 3_200, 6_400),
)


@dataclass(frozen=True)
class RunResult:
    """One training of one row, scored on the test jets."""

    title: str
    model: str
    features: str
    train_jets: int
    figures: dict[str, Figure]
    seconds_per_epoch: float
    epochs: int
    best_epoch: int
    epochs_to_converge: int
    seconds: float
    val_loss: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """One claim of the issue, the numbers it rests on, and whether they bear it out here."""

    claim: str
    evidence: str
    holds: bool | None
    """None: not tested (a row is missing)."""


@dataclass
class StudyResult:
    """Every run (the table's and the scan's), the rows skipped, curves, ratios, verdicts."""

    settings: StudySettings
    runs: list[RunResult] = field(default_factory=list)
    scan: list[RunResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_test: int = 0
    n_test_by_class: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per row: ``light`` and ``c`` rejection at each of :data:`CURVE_EFFICIENCIES`."""
    ratios: dict[str, dict[str, Figure]] = field(default_factory=dict)
    """Per row: light and c rejection at 70% and 77% over the reference row's, paired."""
    verdicts: list[Verdict] = field(default_factory=list)

    def run(self, title: str) -> RunResult | None:
        return next((run for run in self.runs if run.title == title), None)

    def document(self) -> dict[str, object]:
        """The numbers of the study, as written to ``flavour_study.json``."""
        document: dict[str, object] = json_number(
            {
                "settings": self.settings.model_dump(mode="json"),
                "skipped": self.skipped,
                "n_test": self.n_test,
                "n_test_by_class": self.n_test_by_class,
                "seconds": self.seconds,
                "runs": [asdict(run) for run in self.runs],
                "scan": [asdict(run) for run in self.scan],
                "ratios": {
                    title: {key: asdict(figure) for key, figure in ratios.items()}
                    for title, ratios in self.ratios.items()
                },
                "b_efficiencies": list(CURVE_EFFICIENCIES),
                "curves": self.curves,
                "verdicts": [asdict(verdict) for verdict in self.verdicts],
            }
        )
        return document


def simulate_samples(settings: StudySettings, data_dir: Path) -> tuple[list[Path], list[Path]]:
    """The training and test jets (files of the 'Jets' tree), simulated or reused."""
    from bsym.simulate.flavour import write_flavour

    return simulated_samples(
        data_dir,
        (settings.train_jets, settings.test_jets),
        seeds=(2 * settings.seed + 201, 2 * settings.seed + 202),
        unit="jets",
        write=lambda out, size, seed: write_flavour(out, size, seed=seed),
        prefix="flavour_jets_",
    )


def available_types() -> set[str]:
    from bsym.training.models.registry import model_types

    return set(model_types())


def run_study(
    settings: StudySettings,
    data_dir: Path,
    out_dir: Path,
    *,
    on_run: Callable[[RunResult], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    threads: int = 1,
) -> StudyResult:
    """Train every available row on the training jets, score the test jets, judge the claims."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = StudyResult(settings)
    train_files, test_files = simulate_samples(settings, data_dir)
    train_sources = [TreeSource(path, "Jets") for path in train_files]
    test_sources = [TreeSource(path, "Jets") for path in test_files]
    types = available_types()
    rows = []
    for row in settings.rows:
        if row.model["type"] not in types:
            note = f"skipped '{row.title}': this bsym has no model type '{row.model['type']}'"
            result.skipped.append(note)
            if on_note is not None:
                on_note(note)
        else:
            rows.append(row)
    scored: dict[str, FloatArray] = {}
    truth: npt.NDArray[np.int64] | None = None
    weights: FloatArray | None = None
    for row in rows:
        run, discriminant, (label, weight) = _train_and_score(
            row, settings, train_sources, test_sources, out_dir, train_rows=None
        )
        if truth is None:
            truth, weights = label, weight
        elif not np.array_equal(truth, label):
            raise ConfigError(f"row '{row.title}' read other test jets than the rows before it")
        scored[row.title] = discriminant
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    if truth is not None and weights is not None:
        result.n_test = int(truth.size)
        result.n_test_by_class = {
            name: int(np.count_nonzero(truth == index))
            for name, index in {"light": 0, "c": 1, "b": 2}.items()
        }
        _with_errors(result, scored, truth, weights, settings)
        result.curves = {title: rejection_curves(truth, d, weights) for title, d in scored.items()}
    for title in settings.scan:
        scanned = next((r for r in rows if r.title == title), None)
        if scanned is None:
            continue
        for size in settings.scan_sizes:
            run, _, _ = _train_and_score(
                scanned, settings, train_sources, test_sources, out_dir, train_rows=size
            )
            result.scan.append(run)
            if on_run is not None:
                on_run(run)
    result.verdicts = verdicts(result)
    result.seconds = time.perf_counter() - start
    return result


def train_config(
    row: Row,
    settings: StudySettings,
    train_sources: Sequence[TreeSource],
    out_dir: Path,
    *,
    train_rows: int | None,
) -> TrainConfig:
    """The ``bsym train`` config of one row: its model and shipped spec, the multi-class label,
    balanced class weights, D_b with the study's f_c."""
    from bsym.training.config import config_from_dict

    spec_path = shipped_features(row.features)
    if not spec_path.is_file():
        raise ConfigError(f"no shipped feature spec {spec_path}")
    features = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    features["label"] = dict(LABEL)
    folder = "_".join(row.title.lower().replace(",", "").split())
    size = "" if train_rows is None else f"_n{train_rows}"
    data: dict[str, Any] = {
        "train": [str(source) for source in train_sources],
        "tree": "Jets",
        "test_fraction": 0.0,
        "validation_fraction": VALIDATION_FRACTION,
    }
    if train_rows is not None:
        data["train_rows"] = train_rows
    epochs = min(settings.max_epochs, row.max_epochs or settings.max_epochs)
    return config_from_dict(
        {
            "name": "flavour_" + "".join(c if c.isalnum() else "_" for c in folder),
            "model": row.model,
            "features": features,
            "data": data,
            "optimizer": {
                "epochs": epochs,
                "patience": settings.patience,
                "batch_size": settings.batch_size,
                "lr": settings.lr,
            },
            "seed": settings.seed,
            "class_labels": CLASS_LABELS,
            "class_weights": "balanced",
            "discriminant": {"f_c": settings.f_c},
            "output_dir": str(out_dir / "runs" / f"{folder}{size}"),
        },
        source=f"flavour study row '{row.title}'",
    )


def _train_and_score(
    row: Row,
    settings: StudySettings,
    train_sources: Sequence[TreeSource],
    test_sources: Sequence[TreeSource],
    out_dir: Path,
    *,
    train_rows: int | None,
) -> tuple[RunResult, FloatArray, tuple[npt.NDArray[np.int64], FloatArray]]:
    from bsym.training.checkpoint import predict_probabilities
    from bsym.training.dataset import read_rows

    began = time.perf_counter()
    config = train_config(row, settings, train_sources, out_dir, train_rows=train_rows)
    model, history, epoch_seconds, n_train = _trained(config)
    batch, _ = read_rows(test_sources, config.features, with_label=True)
    if batch.label is None:
        raise ConfigError(f"the test jets gave no labels for row '{row.title}'")
    weight = np.ones(batch.n_rows) if batch.weight is None else batch.weight.astype(np.float64)
    probabilities = predict_probabilities(model, batch, batch_size=8192)
    assert config.discriminant is not None
    discriminant = config.discriminant.of(probabilities, CLASS_LABELS)
    figures = _bootstrapped(batch.label, discriminant, weight, settings)
    val_loss = [math.nan if r["val_loss"] is None else float(r["val_loss"]) for r in history]
    finite = [loss for loss in val_loss if math.isfinite(loss)]
    run = RunResult(
        title=row.title,
        model=str(row.model["type"]),
        features=row.features,
        train_jets=n_train,
        figures=figures,
        seconds_per_epoch=float(np.median(epoch_seconds)) if epoch_seconds else math.nan,
        epochs=len(history),
        best_epoch=val_loss.index(min(finite)) + 1 if finite else 0,
        epochs_to_converge=(
            epochs_to_reach(val_loss, min(finite) * (1 + settings.converge_tolerance))
            if finite
            else 0
        ),
        seconds=time.perf_counter() - began,
        val_loss=val_loss,
    )
    return run, discriminant, (batch.label, weight)


def _trained(config: TrainConfig) -> tuple[BsymModel, list[EpochRecord], list[float], int]:
    """The model of ``config`` trained as ``bsym train`` trains it, without checkpoints (a
    model fitted to the data rather than trained, as IP3D, is only prepared); its epoch
    history, each epoch's wall seconds (training and validation) and the training jets."""
    from bsym.training.dataset import load_training_data
    from bsym.training.models import NetworkModel
    from bsym.training.train import fit_network, seeded_model

    data = load_training_data(config)
    train_rows, validation_rows = data.subset("train"), data.subset("validation")
    model = seeded_model(config, train_rows)
    if not isinstance(model, NetworkModel):
        return model, [], [], train_rows.n_rows
    seconds: list[float] = []
    last = [time.perf_counter()]

    def timed(_: object) -> None:
        now = time.perf_counter()
        seconds.append(now - last[0])
        last[0] = now

    state = fit_network(model, config, train_rows, validation_rows, on_epoch=timed)
    return model, state.history, seconds, train_rows.n_rows


def epochs_to_reach(val_loss: Sequence[float], target: float) -> int:
    """The first epoch (1-based) whose validation loss is at or below ``target``; one more
    than the epochs run if none is."""
    for epoch, loss in enumerate(val_loss, start=1):
        if loss <= target:
            return epoch
    return len(val_loss) + 1


def _figures(label: npt.NDArray[np.int64], d: FloatArray, weight: FloatArray) -> dict[str, float]:
    return flavour_figures(label, d, BACKGROUNDS, SIGNAL, weight, B_EFFICIENCIES)


def _bootstrapped(
    label: npt.NDArray[np.int64], d: FloatArray, weight: FloatArray, settings: StudySettings
) -> dict[str, Figure]:
    central = _figures(label, d, weight)
    samples = bootstrap(
        label.size,
        lambda rows: _figures(label[rows], d[rows], weight[rows]),
        n_bootstrap=settings.bootstraps,
        rng=np.random.default_rng([settings.seed, 15]),
    )
    return {key: Figure(central[key], finite_std([s[key] for s in samples])) for key in FIGURES}


def _with_errors(
    result: StudyResult,
    scored: dict[str, FloatArray],
    truth: npt.NDArray[np.int64],
    weights: FloatArray,
    settings: StudySettings,
) -> None:
    """Ratios of every row's rejections to the reference row's (and, for the claims, to the
    scalar PFN's), with errors from resampling the same test jets for both."""
    pairs = [(title, settings.reference) for title in scored if title != settings.reference]
    pairs += [(title, PFN) for title in (VECTOR, TENSOR, VECTOR_PLAIN, TENSOR_PLAIN)]
    pairs += [(DIPS, IP3D), (DIPS, RNNIP)]
    pairs = [(a, b) for a, b in dict.fromkeys(pairs) if a in scored and b in scored]
    keys = ("light_rej70", "light_rej77", "c_rej70", "c_rej77")

    def ratios(rows: Indices) -> dict[str, float]:
        figures = {
            title: _figures(truth[rows], scored[title][rows], weights[rows])
            for title in {name for pair in pairs for name in pair}
        }
        return {
            f"{a}|{b}|{key}": figures[a][key] / figures[b][key] for a, b in pairs for key in keys
        }

    central = ratios(np.arange(truth.size, dtype=np.int64))
    samples = bootstrap(
        truth.size,
        ratios,
        n_bootstrap=settings.bootstraps,
        rng=np.random.default_rng([settings.seed, 16]),
    )
    for name, value in central.items():
        a, b, key = name.split("|")
        result.ratios.setdefault(f"{a} / {b}", {})[key] = Figure(
            value, finite_std([sample[name] for sample in samples])
        )


def rejection_curves(
    truth: npt.NDArray[np.int64], d: FloatArray, weights: FloatArray
) -> dict[str, list[float]]:
    """Light and c rejection at each b-efficiency of :data:`CURVE_EFFICIENCIES`."""
    from bsym.training.metrics import background_rejection

    curves: dict[str, list[float]] = {}
    for name, background in BACKGROUNDS.items():
        rows = (truth == SIGNAL) | (truth == background)
        fpr, tpr, _ = roc_curve((truth[rows] == SIGNAL).astype(np.int64), d[rows], weights[rows])
        curves[name] = [background_rejection(fpr, tpr, e) for e in CURVE_EFFICIENCIES]
    return curves


def verdicts(result: StudyResult) -> list[Verdict]:
    """The issue's claims, judged on this study's numbers."""
    return [
        _dips_against_baselines(result),
        _log_against_linear(result),
        *(_so2_gain(result, title) for title in (VECTOR, TENSOR)),
        _ablation(result),
    ]


def _ratio(result: StudyResult, a: str, b: str, key: str) -> Figure | None:
    return result.ratios.get(f"{a} / {b}", {}).get(key)


def _cell(figure: Figure) -> str:
    return f"{figure.value:.2f} ± {figure.error:.2f}"


def _dips_against_baselines(result: StudyResult) -> Verdict:
    claim = (
        "DIPS beats the IP3D-style baseline and at least matches the RNNIP-style one in light "
        "rejection at 77% b-efficiency, while training faster per epoch than RNNIP"
    )
    dips, rnnip = result.run(DIPS), result.run(RNNIP)
    over_ip3d = _ratio(result, DIPS, IP3D, "light_rej77")
    over_rnnip = _ratio(result, DIPS, RNNIP, "light_rej77")
    if dips is None or rnnip is None or over_ip3d is None or over_rnnip is None:
        return Verdict(claim, "not tested: a row is missing", None)
    faster = dips.seconds_per_epoch < rnnip.seconds_per_epoch
    holds = over_ip3d.value > 1 and over_rnnip.value >= 1 - over_rnnip.error and faster
    evidence = (
        f"light rej77 DIPS/IP3D {_cell(over_ip3d)}, DIPS/RNNIP {_cell(over_rnnip)}; "
        f"s/epoch DIPS {dips.seconds_per_epoch:.1f}, RNNIP {rnnip.seconds_per_epoch:.1f}"
    )
    return Verdict(claim, evidence, holds)


def _log_against_linear(result: StudyResult) -> Verdict:
    claim = "logarithmic inputs converge in fewer epochs than linear ones (the talk: ≈20%)"
    log_run, linear = result.run(DIPS), result.run(DIPS_LINEAR)
    if log_run is None or linear is None:
        return Verdict(claim, "not tested: a row is missing", None)
    tolerance = result.settings.converge_tolerance
    target = max(min(log_run.val_loss), min(linear.val_loss)) * (1 + tolerance)
    epochs_log = epochs_to_reach(log_run.val_loss, target)
    epochs_linear = epochs_to_reach(linear.val_loss, target)
    saving = 1 - epochs_log / epochs_linear
    evidence = (
        f"epochs to validation loss {target:.4f}: log {epochs_log}, linear {epochs_linear} "
        f"({100 * saving:+.0f}% fewer with log); best val loss log "
        f"{min(log_run.val_loss):.4f}, linear {min(linear.val_loss):.4f}"
    )
    return Verdict(claim, evidence, epochs_log < epochs_linear)


def _so2_gain(result: StudyResult, title: str) -> Verdict:
    claim = f"{title} has ≥ 1.5× the scalar PFN's light rejection at 70% (paper: 2.4–2.7×)"
    ratio = _ratio(result, title, PFN, "light_rej70")
    if ratio is None:
        return Verdict(claim, "not tested: a row is missing", None)
    return Verdict(claim, f"light rej70 {title}/PFN {_cell(ratio)}", ratio.value >= 1.5)


def _ablation(result: StudyResult) -> Verdict:
    claim = "without the bilinear layer, Vector and Tensor PFN do not reach 1.5× the PFN"
    found = {
        title: _ratio(result, title, PFN, "light_rej70") for title in (VECTOR_PLAIN, TENSOR_PLAIN)
    }
    present = {title: ratio for title, ratio in found.items() if ratio is not None}
    if not present:
        return Verdict(claim, "not tested: the rows are missing", None)
    evidence = "; ".join(f"{title}/PFN {_cell(ratio)}" for title, ratio in present.items())
    return Verdict(claim, evidence, all(ratio.value < 1.5 for ratio in present.values()))


def write_outputs(result: StudyResult, out_dir: Path) -> list[Path]:
    """``flavour_study.json`` in ``out_dir`` (the plots are :mod:`.plots`'); its path."""
    return [write_json(out_dir / "flavour_study.json", result.document())]
