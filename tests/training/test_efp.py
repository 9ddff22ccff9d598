"""Energy flow polynomials: hand-computed values, invariances, the energyflow reference, the
feature spec section in both layouts, and a DNN on EFP globals exported to ONNX and scoring."""

from __future__ import annotations

import math
from pathlib import Path

import awkward as ak
import numpy as np
import onnxruntime
import pytest
import uproot
import yaml
from pydantic import ValidationError

from bsym.configs import shipped_config
from bsym.efp import Cells, Multigraph, Polynomial, efp_values
from bsym.errors import BadValueError
from bsym.export.onnx_export import DEFAULT_TOLERANCE, export_onnx
from bsym.features import FeatureSpec, build_features, detect_layout, required_branches
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import score_files
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint, predict
from bsym.training.config import load_config
from bsym.training.train import train

EDGE = [(0, 1)]
CHAIN = [(0, 1), (1, 2)]
TRIANGLE = [(0, 1), (1, 2), (0, 2)]
DOUBLE = [(0, 1), (0, 1)]


def cells_of(et: list[float], eta: list[float], phi: list[float], pt: float = 1.0) -> Cells:
    """One muon with the given cells (positions relative to the muon)."""
    row = np.asarray([et], dtype=np.float64)
    return Cells(
        row,
        np.asarray([eta], dtype=np.float64),
        np.asarray([phi], dtype=np.float64),
        np.ones_like(row, dtype=np.bool_),
        np.asarray([pt]),
    )


def value(
    cells: Cells, edges: list[tuple[int, int]], kappa: float, beta: float, **kw: bool
) -> float:
    polynomial = Polynomial(Multigraph.of(edges), kappa, beta)
    return float(efp_values(cells, [polynomial], **kw)[0, 0])


def random_cells(n: int, m: int, seed: int) -> Cells:
    rng = np.random.default_rng(seed)
    mask = np.arange(m)[None, :] < rng.integers(1, m + 1, size=n)[:, None]
    return Cells(
        np.where(mask, rng.exponential(2.0, (n, m)) + 0.1, 0.0),
        np.where(mask, rng.uniform(-0.3, 0.3, (n, m)), 0.0),
        np.where(mask, rng.uniform(-0.3, 0.3, (n, m)), 0.0),
        mask,
        rng.uniform(25.0, 60.0, n),
    )


def all_graphs(max_degree: int) -> list[Multigraph]:
    """A fixed set of connected multigraphs up to ``max_degree`` edges (c up to 4)."""
    graphs = [[], EDGE, DOUBLE, CHAIN, TRIANGLE, [(0, 1), (0, 2), (0, 3)]]
    graphs += [[(0, 1), (1, 2), (2, 3), (0, 3)], [(0, 1), (0, 1), (1, 2), (1, 2), (0, 2)]]
    graphs += [[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]]  # K4, c = 4
    graphs += [[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]]  # path of 7 edges
    return [Multigraph.of(g) for g in graphs if len(g) <= max_degree]


def test_hand_computed_values() -> None:
    # two cells at distance 0.5 with z = 0.2 and 0.1 (ET over pT = 10 GeV)
    two = cells_of([2.0, 1.0], [0.3, 0.0], [0.4, 0.0], pt=10.0)
    d = 0.5
    assert value(two, [], 1, 1) == pytest.approx(0.3)
    assert value(two, EDGE, 1, 1) == pytest.approx(2 * 0.2 * 0.1 * d)
    assert value(two, EDGE, 1, 2) == pytest.approx(2 * 0.2 * 0.1 * d**2)
    assert value(two, EDGE, 2, 0.5) == pytest.approx(2 * 0.04 * 0.01 * math.sqrt(d))
    assert value(two, EDGE, 0, 1) == pytest.approx(2 * d)  # κ = 0 counts pairs
    assert value(two, EDGE, -1, 1) == pytest.approx(2 * 5 * 10 * d)
    assert value(two, DOUBLE, 1, 1) == pytest.approx(2 * 0.2 * 0.1 * d**2)
    # i-j-k with i ≠ j ≠ k from two cells: i = k
    assert value(two, CHAIN, 1, 1) == pytest.approx(0.2 * 0.1 * (0.2 + 0.1) * d**2)
    # a triangle needs three different cells
    assert value(two, TRIANGLE, 1, 1) == 0.0
    equilateral = cells_of(
        [1.0, 2.0, 3.0], [0.0, 0.2, 0.1], [0.0, 0.0, 0.2 * math.sqrt(3) / 2], pt=10.0
    )
    assert value(equilateral, TRIANGLE, 1, 1) == pytest.approx(6 * 0.1 * 0.2 * 0.3 * 0.2**3)
    # the muon as a particle at the centre with z = 1
    one = cells_of([4.0], [0.3], [0.4], pt=40.0)
    assert value(one, EDGE, 1, 1) == 0.0
    assert value(one, EDGE, 1, 1, include_axis=True) == pytest.approx(2 * 0.1 * d)
    assert value(one, [], 1, 1, include_axis=True) == pytest.approx(1.1)


def test_phi_difference_wraps_around() -> None:
    across = cells_of([1.0, 1.0], [0.0, 0.0], [math.pi - 0.05, -math.pi + 0.05])
    assert value(across, EDGE, 1, 1) == pytest.approx(2 * 0.1)


def test_padding_and_non_positive_cells_do_not_enter() -> None:
    cells = cells_of([2.0, 1.0, 0.0, -0.5], [0.3, 0.0, 0.1, 0.2], [0.4, 0.0, 0.0, 0.1], 10.0)
    masked = Cells(cells.et, cells.d_eta, cells.d_phi, np.array([[1, 1, 0, 1]], bool), cells.pt)
    for kappa in (1.0, 0.0, -1.0):
        assert value(masked, EDGE, kappa, 1) == pytest.approx(2 * 0.5 * (0.2 * 0.1) ** kappa)


@pytest.mark.parametrize("include_axis", [False, True])
def test_invariant_under_permutation_and_rotation(include_axis: bool) -> None:
    cells = random_cells(40, 12, seed=1)
    polynomials = [
        Polynomial(graph, kappa, beta)
        for graph in all_graphs(7)
        for kappa, beta in ((1.0, 1.0), (0.5, 2.0), (-1.0, 0.5))
    ]
    reference = efp_values(cells, polynomials, include_axis=include_axis)

    rng = np.random.default_rng(2)
    order = np.stack([rng.permutation(12) for _ in range(40)])
    shuffled = Cells(
        *(np.take_along_axis(a, order, axis=1) for a in (cells.et, cells.d_eta, cells.d_phi)),
        np.take_along_axis(cells.mask, order, axis=1),
        cells.pt,
    )
    np.testing.assert_allclose(
        efp_values(shuffled, polynomials, include_axis=include_axis), reference, rtol=1e-10
    )

    angle = rng.uniform(0, 2 * np.pi, size=(40, 1))
    rotated = Cells(
        cells.et,
        np.cos(angle) * cells.d_eta - np.sin(angle) * cells.d_phi,
        np.sin(angle) * cells.d_eta + np.cos(angle) * cells.d_phi,
        cells.mask,
        cells.pt,
    )
    np.testing.assert_allclose(
        efp_values(rotated, polynomials, include_axis=include_axis), reference, rtol=1e-9
    )
    assert np.all(reference >= 0) and np.all(np.isfinite(reference))


def test_agrees_with_energyflow() -> None:
    ef = pytest.importorskip("energyflow", reason="energyflow is in the dev dependency group")
    cells = random_cells(6, 9, seed=3)
    events = [
        np.stack(
            [
                cells.et[i][cells.mask[i]] / cells.pt[i],
                cells.d_eta[i][cells.mask[i]],
                cells.d_phi[i][cells.mask[i]],
            ],
            axis=1,
        )
        for i in range(6)
    ]
    # all 490 connected graphs of degree <= 7 at two (κ, β), the small ones at three more
    grids = {(1.0, 1.0): 7, (-1.0, 0.5): 7, (0.5, 2.0): 4, (2.0, 0.5): 4, (0.0, 1.0): 4}
    for (kappa, beta), degree in grids.items():
        reference = ef.EFPSet(
            f"d<={degree}",
            "p==1",
            measure="hadr",
            beta=beta,
            kappa=kappa,
            normed=False,
            coords="ptyphim",
        )
        polynomials = [Polynomial(Multigraph.of(g), kappa, beta) for g in reference.graphs()]
        expected = reference.batch_compute(events, n_jobs=1)
        np.testing.assert_allclose(efp_values(cells, polynomials), expected, rtol=1e-10)


def test_multigraph_validation_and_complexity() -> None:
    for bad in ([(0, 0)], [(0, 2)], [(-1, 0)], [(0, 1)] * 11):
        with pytest.raises(ValueError):
            Multigraph.of(bad)
    assert Multigraph.of([(1, 0)]).edges == ((0, 1),)
    assert Multigraph.of([]).n_vertices == 1
    assert [g.complexity for g in all_graphs(7)] == [1, 2, 2, 2, 3, 2, 3, 3, 4, 2]
    assert Multigraph.of(CHAIN).is_connected()
    assert not Multigraph.of([(0, 1), (2, 3)]).is_connected()
    with pytest.raises(ValidationError, match="vertices must be numbered"):
        FeatureSpec.model_validate({"efps": {"polynomials": [{"edges": [[0, 2]]}]}})


SPEC = {
    "globals": [{"branch": "Muon_pt", "transform": "log"}],
    "cones": {"radii": [0.1, 0.3]},
    "efps": {
        "polynomials": [
            {"edges": []},
            {"edges": [[0, 1]], "kappa": 1, "beta": 0.5},
            {"edges": [[0, 1], [1, 2], [0, 2]], "kappa": 0.5, "beta": 2},
        ],
        "max_cells": 16,
    },
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isolation")
    write_isolation(out, 600, seed=5)
    return out


def read(path: Path, tree: str, spec: FeatureSpec) -> tuple[ak.Array, str]:
    with uproot.open(path) as file:
        layout = detect_layout(file[tree].keys(), spec)
        branches = required_branches(spec, layout, with_label=True)
        return file[tree].arrays(branches), layout


def test_spec_section_in_both_layouts(sample: Path) -> None:
    spec = FeatureSpec.model_validate(SPEC)
    assert spec.global_names == [
        "log(Muon_pt)",
        "cone0.1",
        "cone0.3",
        "efp(•;k=1;b=1)",
        "efp(0-1;k=1;b=0.5)",
        "efp(0-1,0-2,1-2;k=0.5;b=2)",
    ]
    objects, object_layout = read(sample / "isolation_muons_000.root", "Muons", spec)
    events, event_layout = read(sample / "isolation_events_000.root", "Events", spec)
    assert (object_layout, event_layout) == ("object", "event")
    assert "CaloCell_muonIdx" in required_branches(spec, "event", with_label=False)
    assert "CaloCell_muonIdx" not in required_branches(spec, "object", with_label=False)
    by_object = build_features(objects, spec, "object", with_label=True)
    by_event = build_features(events, spec, "event", with_label=True)
    assert by_object.globals is not None and by_event.globals is not None
    assert by_object.globals.shape == (by_object.n_rows, 6)
    np.testing.assert_allclose(by_event.globals, by_object.globals, rtol=1e-6)

    # the columns are log(EFP) of the 16 highest-ET cells, computed here by hand
    et = objects["CaloCell_et"]
    order = ak.argsort(et, ascending=False)[:, :16]
    d_eta = (objects["CaloCell_eta"] - objects["Muon_eta"])[order]
    d_phi = (objects["CaloCell_phi"] - objects["Muon_phi"] + np.pi) % (2 * np.pi) - np.pi
    pad = [
        ak.to_numpy(ak.fill_none(ak.pad_none(a, 16, clip=True), 0.0))
        for a in (et[order], d_eta, d_phi[order])
    ]
    mask = np.arange(16)[None, :] < ak.to_numpy(ak.num(order))[:, None]
    pt = ak.to_numpy(objects["Muon_pt"]).astype(np.float64)
    cells = Cells(*(p.astype(np.float64) for p in pad), mask, pt)
    polynomials = [efp.polynomial() for efp in spec.efps.polynomials]  # type: ignore[union-attr]
    expected = np.log(efp_values(cells, polynomials))
    np.testing.assert_allclose(by_object.globals[:, 3:], expected, rtol=1e-5, atol=1e-5)
    # the first EFP is Σ z over the 16 highest cells: at most the ET of all cells over pT
    all_cells = ak.to_numpy(ak.sum(et, axis=1)) / pt
    assert np.all(np.exp(by_object.globals[:, 3]) <= all_cells * (1 + 1e-5))


def test_bad_values_are_named(sample: Path) -> None:
    spec = FeatureSpec.model_validate(SPEC)
    arrays, _ = read(sample / "isolation_muons_000.root", "Muons", spec)
    bad_pt = ak.with_field(arrays, arrays["Muon_pt"] * 0, "Muon_pt")
    with pytest.raises(BadValueError, match="Muon_pt"):
        build_features(bad_pt, FeatureSpec.model_validate({"efps": SPEC["efps"]}), "object")
    et = arrays["CaloCell_et"]
    flat = ak.to_numpy(ak.flatten(et)).copy()
    flat[3] = np.nan
    bad_et = ak.with_field(arrays, ak.unflatten(flat, ak.num(et)), "CaloCell_et")
    with pytest.raises(BadValueError, match="CaloCell_et"):
        build_features(bad_et, FeatureSpec.model_validate({"efps": SPEC["efps"]}), "object")


def test_efp_dnn_exports_with_parity_and_scores_both_layouts(sample: Path, tmp_path: Path) -> None:
    config = load_config(
        shipped_config("isolation_efp"),
        [
            f"data.train=['{sample}/isolation_muons_*.root']",
            f"output_dir={tmp_path / 'run'}",
            "data.test_fraction=0.4",
            "optimizer.epochs=1",
            "model.hidden_sizes=[16]",
        ],
    )
    assert config.features.efps is not None and config.model.type == "dnn"
    result = train(config, progress=False)
    onnx_path = tmp_path / "model.onnx"
    report = export_onnx(result.checkpoint, onnx_path)
    assert report.parity.worst <= DEFAULT_TOLERANCE

    loaded = load_checkpoint(result.checkpoint)
    batch = loaded.held_out_test()
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(["score"], {"globals": batch.inputs()["globals"]})
    np.testing.assert_allclose(onnx_scores[:, 0], predict(loaded, batch), atol=DEFAULT_TOLERANCE)

    backend = OnnxRuntimeBackend(onnx_path, threads=1)
    summary = score_files([str(sample / "*.root")], backend, tmp_path / "out", progress=False)
    assert not summary.failed and len(summary.scored) == 2
    with uproot.open(tmp_path / "out" / "isolation_muons_000.isolation_efp.root") as file:
        per_muon = file["Muons"]["isolation_efp"].array(library="np")
    with uproot.open(tmp_path / "out" / "isolation_events_000.isolation_efp.root") as file:
        per_event = file["Events"]["Muon_isolation_efp"].array()
    np.testing.assert_allclose(ak.to_numpy(ak.flatten(per_event)), per_muon, rtol=1e-5)
    arrays, _ = read(sample / "isolation_muons_000.root", "Muons", loaded.spec)
    features = build_features(arrays, loaded.spec, "object")
    np.testing.assert_allclose(per_muon, predict(loaded, features), atol=DEFAULT_TOLERANCE)


def test_average_decision_ordering() -> None:
    from bsym.training.studies.efp_search import ado, candidate_ados, decision_signs

    first, second = np.array([0, 0, 1, 2]), np.array([3, 4, 3, 4])
    reference = decision_signs(np.array([0.9, 0.8, 0.7, 0.1, 0.2]), first, second)
    assert reference.tolist() == [1, 1, 1, 1]
    # pairs (0,3) (0,4) (1,3) (2,4): ordered alike, alike, tie, opposite
    scores = np.array([5.0, 1.0, 0.0, 1.0, 3.0])
    assert ado(decision_signs(scores, first, second), reference) == pytest.approx(2.5 / 4)
    values = np.stack([scores, -scores, np.ones(5)], axis=1).astype(np.float32)
    np.testing.assert_allclose(
        candidate_ados(values, first, second, reference), [2.5 / 4, 1.5 / 4, 0.5]
    )


def test_candidates_cover_the_connected_graphs() -> None:
    pytest.importorskip("energyflow", reason="energyflow is in the dev dependency group")
    from bsym.training.studies.efp_search import SearchSettings, candidate_polynomials

    candidates = candidate_polynomials(SearchSettings())
    graphs = {p.graph for p in candidates}
    assert len(graphs) == 486 and all(g.is_connected() and g.degree <= 7 for g in graphs)
    assert len(candidates) == 5 * (3 * 485 + 1)  # the empty graph once per κ
    assert (
        len(candidate_polynomials(SearchSettings(max_complexity=4, kappas=(1.0,)))) == 1 + 3 * 489
    )


def test_search_runs_end_to_end(sample: Path, tmp_path: Path) -> None:
    pytest.importorskip("energyflow", reason="energyflow is in the dev dependency group")
    from bsym.training.studies.efp_search import SearchSettings, run_search, write_outputs

    pfn = load_config(
        shipped_config("isolation_pfn"),
        [
            f"data.train=['{sample}/isolation_muons_*.root']",
            f"output_dir={tmp_path / 'pfn'}",
            "optimizer.epochs=3",
            "model.phi_sizes=[16]",
            "model.f_sizes=[16]",
        ],
    )
    checkpoint = train(pfn, progress=False).checkpoint
    settings = SearchSettings(
        steps=2,
        kappas=(1.0, 2.0),
        betas=(1.0,),
        max_degree=2,
        ado_rows=300,
        pairs=2000,
        epochs=3,
        patience=3,
    )
    result = run_search(checkpoint, tmp_path / "search", settings)
    assert [s.step for s in result.steps] == [0, 1, 2] and result.candidates == 2 * 4
    chosen = result.chosen()
    assert len(chosen) == 2 and chosen[0] != chosen[1]
    for step in result.steps[1:]:
        assert step.efp_ado is not None and 0.5 <= step.efp_ado <= 1
        assert step.disagreeing_pairs > 0
    assert 0.6 < result.pfn_test_auc <= 1
    assert all(0.7 < s.test_auc <= 1 and 0.5 < s.model_ado <= 1 for s in result.steps)
    json_path, yaml_path = write_outputs(result, tmp_path / "search")
    section = FeatureSpec.model_validate({"efps": yaml.safe_load(yaml_path.read_text())["efps"]})
    assert section.efps is not None and section.efps.polynomials == chosen
    assert '"chosen_polynomials"' in json_path.read_text()
