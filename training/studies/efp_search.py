"""Guided search for energy flow polynomials by average decision ordering (arXiv:2010.11998,
as arXiv:2102.02278 and arXiv:2306.15737 use it; docs/papers.md, "Muon isolation").

The decision ordering of two classifiers f and g on a pair (x, y) of a prompt and a
non-prompt muon is 1 when they order the pair alike, sign(f(x) − f(y)) = sign(g(x) − g(y)),
0 when they order it oppositely and 1/2 on a tie; the average decision ordering (ADO) is its
mean over pairs. Starting from a small network on the baseline features (18 cones, ΣpT and
log pT), each step

1. finds the pairs on which the current network and the particle-flow network (PFN)
   disagree,
2. computes on those pairs the ADO of every candidate EFP with the PFN, and takes the EFP of
   highest max(ADO, 1 − ADO) (an ADO below 1/2 means that −EFP agrees; the sign is
   recorded, the network does not need it),
3. retrains the small network on the baseline plus every EFP chosen so far.

Data
    The PFN's own training inputs, split by the PFN's seed and fractions, so every network
    sees the same training, validation and test rows (checked). The ADO is computed on
    ``ado_rows`` validation rows, on ``pairs`` (prompt, non-prompt) pairs drawn at random with
    replacement (fixed for the whole search); the test rows only report the AUC.
Candidates
    Every connected multigraph with at most ``max_degree`` edges (490 for degree ≤ 7, from
    energyflow's list) whose contraction costs at most N·M^``max_complexity`` (3 leaves out
    the 4 graphs built on K4, which cost N·M^4, 4 includes them), at every (κ, β) of the grid,
    computed on the ``max_cells`` highest-ET cells as the ``efps`` feature section does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from bsym.configs import shipped_config
from bsym.efp import Cells, Multigraph, Polynomial, efp_values
from bsym.errors import ConfigError, SpecMismatchError
from bsym.extras import require
from bsym.features import (
    EFP,
    EFPs,
    Feature,
    FeatureBatch,
    FeatureSpec,
    efp_cell_constituents,
    efp_cells_from,
)
from bsym.settings import Settings
from bsym.training.checkpoint import LoadedModel, load_checkpoint, predict
from bsym.training.config import TrainConfig, load_config
from bsym.training.dataset import Split, read_rows, take
from bsym.training.metrics import roc_auc
from bsym.training.studies.harness import write_json

FloatArray = npt.NDArray[np.float64]
DEFAULT_BASELINE = shipped_config("isolation_cones_sumpt")
CANDIDATE_CHUNK = 512


class SearchSettings(Settings):
    """Everything that defines one search."""

    steps: int = Field(default=5, ge=1)
    kappas: tuple[float, ...] = Field(default=(-1.0, 0.0, 0.5, 1.0, 2.0), min_length=1)
    betas: tuple[Annotated[float, Field(gt=0)], ...] = Field(default=(0.5, 1.0, 2.0), min_length=1)
    max_degree: int = Field(default=7, ge=0, le=7)
    max_complexity: int = Field(default=3, ge=0)
    max_cells: int = Field(default=32, ge=1)
    include_axis: bool = False
    ado_rows: int = Field(default=2000, ge=2)
    pairs: int = Field(default=200_000, ge=1)
    epochs: int = Field(default=80, ge=1)
    patience: int = Field(default=10, ge=1)
    seed: int = 0


QUICK = SearchSettings(
    steps=2,
    kappas=(0.5, 1.0, 2.0),
    betas=(0.5, 1.0, 2.0),
    max_degree=4,
    ado_rows=1500,
    pairs=50_000,
    epochs=25,
    patience=5,
)


@dataclass
class Step:
    """One row of the search table: the EFP added and where the network got to."""

    step: int
    edges: list[list[int]] | None
    kappa: float | None
    beta: float | None
    sign: int | None
    efp_ado: float | None
    """ADO of the chosen EFP (with its sign) with the PFN on the disagreeing pairs."""
    disagreeing_pairs: int
    """Pairs on which the network before this step disagreed with the PFN."""
    model_ado: float
    """ADO of the network after this step with the PFN, on all sampled pairs."""
    test_auc: float
    val_auc: float
    seconds: float

    @property
    def label(self) -> str:
        if self.edges is None:
            return "baseline"
        return Multigraph.of(self.edges).label


@dataclass
class SearchResult:
    """The steps of a search, with the reference numbers and the settings."""

    settings: SearchSettings
    pfn: str
    pfn_test_auc: float
    candidates: int
    muons: int
    """Validation muons the EFPs are computed on and the pairs drawn from."""
    efp_seconds: float
    efp_muons_per_second: float
    """Muons per second with every candidate EFP computed."""
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0

    def chosen(self) -> list[EFP]:
        """The EFPs chosen, in order, as entries of a feature spec's ``efps.polynomials``."""
        return [
            EFP(edges=[(a, b) for a, b in s.edges], kappa=s.kappa, beta=s.beta)
            for s in self.steps
            if s.edges is not None and s.kappa is not None and s.beta is not None
        ]

    def document(self) -> dict[str, object]:
        """The search, as written to ``efp_search.json``."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "pfn": self.pfn,
            "pfn_test_auc": self.pfn_test_auc,
            "candidates": self.candidates,
            "muons": self.muons,
            "efp_seconds": self.efp_seconds,
            "efp_muons_per_second": self.efp_muons_per_second,
            "seconds": self.seconds,
            "steps": [asdict(s) for s in self.steps],
            "chosen_polynomials": [e.model_dump(mode="json") for e in self.chosen()],
        }


@functools.cache
def connected_graphs(max_degree: int) -> tuple[Multigraph, ...]:
    """Every connected multigraph with at most ``max_degree`` edges, from energyflow's list."""
    energyflow = require("energyflow", "efp", purpose="the EFP search's list of graphs")
    graphs = energyflow.EFPSet(f"d<={max_degree}", "p==1").graphs()
    return tuple(Multigraph.of(edges) for edges in graphs)


def candidate_polynomials(settings: SearchSettings) -> list[Polynomial]:
    """All connected multigraphs of the settings' degree and cost, at every (κ, β)."""
    graphs = connected_graphs(settings.max_degree)
    chosen = [g for g in graphs if g.complexity <= settings.max_complexity]
    # β does not enter the graph without edges (Σ z_i): it is a candidate once per κ
    return [
        Polynomial(graph, kappa, beta)
        for kappa in settings.kappas
        for beta in settings.betas
        for graph in chosen
        if graph.degree > 0 or beta == settings.betas[0]
    ]


def decision_signs(
    scores: npt.NDArray[np.floating[Any]],
    first: npt.NDArray[np.int64],
    second: npt.NDArray[np.int64],
) -> npt.NDArray[np.int8]:
    """sign(score[first] − score[second]) per pair, as int8."""
    return np.sign(scores[first] - scores[second]).astype(np.int8)


def ado(signs: npt.NDArray[np.int8], reference: npt.NDArray[np.int8]) -> float:
    """Average decision ordering of two classifiers from their per-pair signs."""
    if len(signs) == 0:
        return float("nan")
    product = signs.astype(np.int16) * reference
    return float(np.mean(product > 0) + 0.5 * np.mean(product == 0))


def candidate_ados(
    values: npt.NDArray[np.float32],
    first: npt.NDArray[np.int64],
    second: npt.NDArray[np.int64],
    reference: npt.NDArray[np.int8],
) -> FloatArray:
    """ADO with ``reference`` of every column of ``values`` [rows, K] on the given pairs."""
    result = np.empty(values.shape[1], dtype=np.float64)
    if len(first) == 0:
        result[:] = np.nan
        return result
    for start in range(0, values.shape[1], CANDIDATE_CHUNK):
        block = values[:, start : start + CANDIDATE_CHUNK]
        product = np.sign(block[first] - block[second]) * reference[:, None]
        result[start : start + block.shape[1]] = (product > 0).mean(axis=0) + 0.5 * (
            product == 0
        ).mean(axis=0)
    return result


def run_search(
    pfn_path: Path,
    out_dir: Path,
    settings: SearchSettings,
    *,
    baseline: Path = DEFAULT_BASELINE,
    on_step: Callable[[Step], None] | None = None,
    threads: int | None = None,
) -> SearchResult:
    """The guided search (see the module docstring); trainings go to ``out_dir/step<k>``."""
    import torch
    from tqdm import tqdm

    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    pfn = load_checkpoint(pfn_path)
    base_config = _aligned_config(load_config(baseline), pfn, settings)
    validation_rows = _sample_rows(pfn.split.validation, settings)

    pfn_rows = _rows(pfn, validation_rows)
    pfn_validation = predict(pfn, pfn_rows)
    pfn_test_batch = pfn.held_out_test()
    pfn_test_auc = roc_auc(_labels(pfn_test_batch), predict(pfn, pfn_test_batch))
    labels = _labels(pfn_rows)
    first, second = _pairs(labels, settings)
    pfn_signs = decision_signs(pfn_validation, first, second)

    cells = _cells(pfn, validation_rows, settings, base_config)
    candidates = candidate_polynomials(settings)
    efp_started = time.perf_counter()
    values = _candidate_values(cells, candidates, settings, tqdm)
    efp_seconds = time.perf_counter() - efp_started
    result = SearchResult(
        settings=settings,
        pfn=str(pfn_path),
        pfn_test_auc=pfn_test_auc,
        candidates=len(candidates),
        muons=len(cells),
        efp_seconds=efp_seconds,
        efp_muons_per_second=len(cells) / efp_seconds,
    )

    chosen: list[int] = []
    signs: list[int] = []
    model_signs: npt.NDArray[np.int8] | None = None
    for step in range(settings.steps + 1):
        begun = time.perf_counter()
        efp_ado: float | None = None
        disagreeing = 0
        if step > 0:
            assert model_signs is not None
            disagree = (model_signs.astype(np.int16) * pfn_signs) < 0
            disagreeing = int(disagree.sum())
            scores = candidate_ados(values, first[disagree], second[disagree], pfn_signs[disagree])
            strength = np.maximum(scores, 1 - scores)
            strength[chosen] = -1.0
            best = int(np.nanargmax(strength))
            chosen.append(best)
            signs.append(1 if scores[best] >= 0.5 else -1)
            efp_ado = float(strength[best])
        config = _step_config(base_config, [candidates[i] for i in chosen], settings, out_dir, step)
        loaded = _train(config)
        if not np.array_equal(loaded.split.validation, pfn.split.validation):
            raise SpecMismatchError(
                f"the network of step {step} was split differently from the PFN {pfn_path}"
            )
        model_signs = decision_signs(predict(loaded, _rows(loaded, validation_rows)), first, second)
        test_batch = loaded.held_out_test()
        polynomial = candidates[chosen[-1]] if step > 0 else None
        record = Step(
            step=step,
            edges=[list(e) for e in polynomial.graph.edges] if polynomial else None,
            kappa=polynomial.kappa if polynomial else None,
            beta=polynomial.beta if polynomial else None,
            sign=signs[-1] if polynomial else None,
            efp_ado=efp_ado,
            disagreeing_pairs=disagreeing,
            model_ado=ado(model_signs, pfn_signs),
            test_auc=roc_auc(_labels(test_batch), predict(loaded, test_batch)),
            val_auc=loaded.checkpoint.best_val_auc,
            seconds=time.perf_counter() - begun,
        )
        result.steps.append(record)
        if on_step is not None:
            on_step(record)
    result.seconds = time.perf_counter() - started
    return result


def _aligned_config(config: TrainConfig, pfn: LoadedModel, settings: SearchSettings) -> TrainConfig:
    """The baseline config on the PFN's inputs and split, with the search's epochs."""
    if config.model.type != "dnn":
        raise ConfigError(f"the baseline must be a 'dnn' config, got '{config.model.type}'")
    optimizer = config.optimizer.model_copy(
        update={"epochs": settings.epochs, "patience": settings.patience}
    )
    return config.model_copy(
        update={"data": pfn.config.data, "seed": pfn.config.seed, "optimizer": optimizer}
    )


def _step_config(
    base: TrainConfig,
    polynomials: Sequence[Polynomial],
    settings: SearchSettings,
    out_dir: Path,
    step: int,
) -> TrainConfig:
    features = base.features
    if polynomials:
        efps = EFPs(
            polynomials=[
                EFP(edges=list(p.graph.edges), kappa=p.kappa, beta=p.beta) for p in polynomials
            ],
            max_cells=settings.max_cells,
            include_axis=settings.include_axis,
        )
        features = features.model_copy(update={"efps": efps})
    data = base.model_dump(mode="json")
    data.update(
        name=f"{base.name}_efp_search_step{step}",
        features=features.model_dump(mode="json"),
        output_dir=str(out_dir / f"step{step}"),
    )
    return TrainConfig.model_validate(data)


def _train(config: TrainConfig) -> LoadedModel:
    from bsym.training.train import train

    result = train(config, overwrite=True, progress=False)
    return load_checkpoint(result.checkpoint)


def _sample_rows(rows: npt.NDArray[np.int64], settings: SearchSettings) -> npt.NDArray[np.int64]:
    if len(rows) <= settings.ado_rows:
        return rows
    generator = np.random.default_rng([settings.seed, 2])
    return np.sort(generator.choice(rows, size=settings.ado_rows, replace=False))


def _rows(model: LoadedModel, rows: npt.NDArray[np.int64]) -> FeatureBatch:
    """The given rows of the model's training inputs, read through its own feature spec."""
    return _read(model.config, model.spec, model.split, rows)


def _read(
    config: TrainConfig, spec: FeatureSpec, split: Split, rows: npt.NDArray[np.int64]
) -> FeatureBatch:
    from bsym.rootio import TreeSource, input_path

    sources = [TreeSource(input_path(s.path), s.tree) for s in split.sources]
    batch, _ = read_rows(sources, spec, max_rows=config.data.max_rows)
    if batch.n_rows != split.n_rows:
        raise SpecMismatchError(
            f"the training inputs now give {batch.n_rows} rows, not {split.n_rows} as in training"
        )
    return take(batch, rows)


def _cells(
    pfn: LoadedModel, rows: npt.NDArray[np.int64], settings: SearchSettings, base: TrainConfig
) -> Cells:
    """The cells of the given rows exactly as the ``efps`` feature section reads them."""
    efps = EFPs(polynomials=[EFP()], max_cells=settings.max_cells)
    spec = FeatureSpec(
        tree=base.features.tree,
        objects=base.features.objects,
        constituents=efp_cell_constituents(efps),
        globals=[Feature(branch=efps.normalise_by)],
        label=base.features.label,
    )
    batch = _read(pfn.config, spec, pfn.split, rows)
    assert batch.constituents is not None and batch.mask is not None and batch.globals is not None
    return efp_cells_from(batch.constituents, batch.mask, batch.globals[:, 0])


def _candidate_values(
    cells: Cells, candidates: Sequence[Polynomial], settings: SearchSettings, tqdm: Any
) -> npt.NDArray[np.float32]:
    """log EFP [rows, K] (float32; order is all the ADO needs, and the log keeps κ = −1 in
    range), one (κ, β) at a time."""
    values = np.empty((len(cells), len(candidates)), dtype=np.float32)
    groups: dict[tuple[float, float], list[int]] = {}
    for index, polynomial in enumerate(candidates):
        groups.setdefault((polynomial.kappa, polynomial.beta), []).append(index)
    for indices in tqdm(groups.values(), desc="EFPs", unit="(κ,β)"):
        computed = efp_values(
            cells, [candidates[i] for i in indices], include_axis=settings.include_axis
        )
        values[:, indices] = np.log(np.maximum(computed, 1e-300))
    return values


def _pairs(
    labels: npt.NDArray[np.int64], settings: SearchSettings
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    positive = np.flatnonzero(labels == 1)
    negative = np.flatnonzero(labels == 0)
    if len(positive) == 0 or len(negative) == 0:
        raise ConfigError("the ADO rows need both prompt and non-prompt muons")
    generator = np.random.default_rng([settings.seed, 3])
    return (
        generator.choice(positive, size=settings.pairs),
        generator.choice(negative, size=settings.pairs),
    )


def _labels(batch: FeatureBatch) -> npt.NDArray[np.int64]:
    if batch.label is None:
        raise SpecMismatchError("the search needs labelled rows")
    return batch.label


def write_outputs(result: SearchResult, out_dir: Path) -> list[Path]:
    """``efp_search.json`` and ``chosen_efps.yaml`` (the chosen EFPs as a spec section)."""
    import yaml

    from bsym.rootio import atomic_output

    paths = [
        write_json(out_dir / "efp_search.json", result.document()),
        out_dir / "chosen_efps.yaml",
    ]
    section = {
        "efps": {
            "max_cells": result.settings.max_cells,
            "include_axis": result.settings.include_axis,
            "polynomials": [
                {"edges": [list(e) for e in p.edges], "kappa": p.kappa, "beta": p.beta}
                for p in result.chosen()
            ],
        }
    }
    with atomic_output(paths[1]) as temporary:
        temporary.write_text(yaml.safe_dump(section, sort_keys=False, default_flow_style=None))
    return paths
