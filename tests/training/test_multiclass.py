"""Multi-class labels, class weights, the flavour discriminant D_b and its evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flavour_files import CLASS_LABELS, flavour_config, write_jets

from bsym.discriminant import Discriminant, discriminant
from bsym.errors import ConfigError, SpecMismatchError
from bsym.features import FeatureSpec, Label
from bsym.training.checkpoint import load_checkpoint, predict_probabilities
from bsym.training.evaluate import comparison_table, evaluate
from bsym.training.losses import class_weighted, classification_loss, resolve_class_weights
from bsym.training.metrics import flavour_figures, rejection_at, roc_auc
from bsym.training.train import train


def test_multiclass_label_gives_class_indices_and_leaves_out_the_rest() -> None:
    label = Label(branch="Jet_hadronFlavour", classes=[[0], [4], [5, 55]])
    truth = np.array([5, 0, 4, 15, 55, 0], dtype=np.int64)
    assert label.classify(truth).tolist() == [2, 0, 1, -1, 2, 0]
    assert label.n_classes == 3 and label.leaves_out
    assert Label().n_classes == 1 and not Label().leaves_out


def test_old_specs_serialise_as_before_and_multiclass_round_trips() -> None:
    binary = FeatureSpec.model_validate(
        {"globals": [{"branch": "Muon_pt"}], "label": {"branch": "Muon_genPartFlav"}}
    )
    assert '"label":{"branch":"Muon_genPartFlav","positive":[1]}' in binary.to_json()
    spec = FeatureSpec.model_validate(
        {
            "objects": "Jet",
            "globals": [{"branch": "Jet_pt"}],
            "label": {"branch": "Jet_hadronFlavour", "classes": [[0], [4], [5]]},
        }
    )
    assert '"label":{"branch":"Jet_hadronFlavour","classes":[[0],[4],[5]]}' in spec.to_json()
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec and again.to_json() == spec.to_json()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"classes": [[0], [4], [0, 5]]}, r"values \[0\] .* two classes"),
        ({"classes": [[0]]}, "at least two"),
        ({"classes": [[0], []]}, "non-empty"),
        ({"classes": [[0], [5]], "positive": [5]}, "either classes or positive"),
        ({"classes": [[0], [5]], "negative": [0]}, "either classes or positive"),
    ],
)
def test_bad_multiclass_labels_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Label.model_validate({"branch": "Jet_hadronFlavour", **values})


def test_discriminant_formula_and_columns() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    d = Discriminant(f_c=0.25).of(p, CLASS_LABELS)
    expected = np.log(p[:, 2] / (0.25 * p[:, 1] + 0.75 * p[:, 0]))
    np.testing.assert_allclose(d, expected)
    np.testing.assert_allclose(discriminant(0.5, 0.0, 0.5, 0.0), 0.0)
    reordered = Discriminant(f_c=0.25).of(p[:, ::-1], CLASS_LABELS[::-1])
    np.testing.assert_allclose(reordered, d)
    assert Discriminant().with_fc(0.5).f_c == 0.5
    with pytest.raises(SpecMismatchError, match="'pc'"):
        Discriminant().of(p[:, [0, 2]], ["pu", "pb"])
    with pytest.raises(ValueError, match="f_c"):
        Discriminant().with_fc(1.5)


def test_balanced_class_weights_equalise_the_classes() -> None:
    label = np.array([0, 0, 0, 0, 1, 2, 2, 2], dtype=np.int64)
    weights = resolve_class_weights("balanced", label, None, 3)
    per_class = np.bincount(label, weights=np.asarray(weights)[label])
    np.testing.assert_allclose(per_class, per_class[0])
    row_weight = np.array([1, 1, 1, 1, 2, 1, 1, 1], dtype=np.float32)
    weighted = resolve_class_weights("balanced", label, row_weight, 3)
    totals = np.bincount(label, weights=np.asarray(weighted)[label] * row_weight)
    np.testing.assert_allclose(totals, totals[0])
    assert resolve_class_weights([1, 2, 3], label, None, 3) == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="every class"):
        resolve_class_weights("balanced", label[label != 1], None, 3)


def test_class_weights_scale_the_cross_entropy_of_their_class() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    label = torch.tensor([0, 1, 1])
    plain = torch.nn.functional.cross_entropy(logits, label, reduction="none")
    rows = class_weighted(label, None, [1.0, 3.0, 1.0])
    assert rows.tolist() == [1.0, 3.0, 3.0]
    loss = classification_loss(logits, label, rows)
    assert float(loss) == pytest.approx(float((plain * rows).sum() / rows.sum()))


def test_flavour_figures_match_one_against_one_rocs() -> None:
    rng = np.random.default_rng(3)
    label = rng.integers(0, 3, 3000)
    score = label + rng.normal(0, 1, 3000)
    figures = flavour_figures(label, score, {"light": 0, "c": 1}, signal=2)
    light = (label == 0) | (label == 2)
    assert figures["light_rej70"] == pytest.approx(
        rejection_at((label[light] == 2).astype(int), score[light], 0.70)
    )
    assert figures["c_auc"] == pytest.approx(
        roc_auc((label[label > 0] == 2).astype(int), score[label > 0])
    )
    assert figures["light_rej77"] > figures["c_rej77"] > 1


def test_config_checks_the_class_labels_weights_and_discriminant(tmp_path: Path) -> None:
    files = ["jets.root:Events"]
    with pytest.raises(ConfigError, match="must name the 3 classes"):
        flavour_config(files, tmp_path, ("class_labels", ["b", "c"]))
    with pytest.raises(ConfigError, match="2 values for 3 classes"):
        flavour_config(files, tmp_path, ("class_weights", [1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"\['pb'\] are not in class_labels"):
        flavour_config(files, tmp_path, ("class_labels", ["pu", "pc", "b"]))


@pytest.fixture(scope="module")
def flavour_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flavour")
    jets = write_jets(folder / "jets.root", 1500, seed=4, odd_flavour=3)
    config = flavour_config([f"{jets}:Events"], folder / "run")
    return train(config, progress=False).checkpoint


def test_three_class_pfn_trains_on_the_event_layout_and_separates_b(flavour_run: Path) -> None:
    loaded = load_checkpoint(flavour_run)
    assert loaded.model.n_classes == 3  # type: ignore[attr-defined]
    test = loaded.held_out_test()
    assert test.label is not None and set(np.unique(test.label)) == {0, 1, 2}
    probabilities = predict_probabilities(loaded, test)
    assert probabilities.shape == (test.n_rows, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    d = Discriminant(f_c=0.1).of(probabilities, CLASS_LABELS)
    assert roc_auc((test.label == 2).astype(int), d) > 0.8


def test_evaluate_reports_light_and_c_rejection(flavour_run: Path, tmp_path: Path) -> None:
    result = evaluate([flavour_run], tmp_path, n_bootstrap=5)
    (metrics,) = result.models
    assert set(metrics.flavour) == {
        f"{b}_{k}" for b in ("light", "c") for k in ("rej70", "rej77", "auc")
    }
    assert metrics.flavour["light_rej70"] > metrics.flavour["light_rej77"] > 1
    assert metrics.flavour["light_auc"] > metrics.flavour["c_auc"] > 0.5
    assert all(math.isfinite(e) and e > 0 for e in metrics.flavour_err.values())
    document = json.loads(result.metrics_path.read_text())
    assert document["models"][0]["flavour"]["c_rej77"] == pytest.approx(metrics.flavour["c_rej77"])
    table = comparison_table(result.models, n_bootstrap=5)
    headers = [column.header for column in table.columns]
    assert headers[-4:] == ["light rej70", "light rej77", "c rej70", "c rej77"]
