"""Tests of the dimuon mass fit, the sPlot sWeights and the sWeighted ROC AUC."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from bsym.errors import BadValueError
from bsym.training.metrics import roc_auc
from bsym.training.sweights import fit_mass, sweighted_auc, sweights

LOW, HIGH = 70.0, 110.0
N_SIGNAL, N_BACKGROUND = 3_000, 5_000

FloatArray = npt.NDArray[np.float64]


def _peak(rng: np.random.Generator, n: int) -> FloatArray:
    """Breit-Wigner (Γ = 2.5 GeV) at 91.2 GeV smeared by 2% (a Voigt profile), in the window."""
    out = np.empty(0)
    while out.size < n:
        mass = 91.19 + 1.25 * np.tan(np.pi * (rng.random(n) - 0.5))
        mass = mass * (1.0 + 0.02 * rng.standard_normal(n))
        out = np.concatenate((out, mass[(mass >= LOW) & (mass < HIGH)]))
    return out[:n]


def _continuum(rng: np.random.Generator, n: int) -> FloatArray:
    out = np.empty(0)
    while out.size < n:
        mass = LOW + rng.exponential(30.0, n)
        out = np.concatenate((out, mass[mass < HIGH]))
    return out[:n]


@pytest.fixture(scope="module")
def toy() -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Masses, a score independent of the mass within each class, and the true classes."""
    rng = np.random.default_rng(11)
    mass = np.concatenate((_peak(rng, N_SIGNAL), _continuum(rng, N_BACKGROUND)))
    score = np.concatenate((rng.normal(1.0, 1.0, N_SIGNAL), rng.normal(-0.3, 1.0, N_BACKGROUND)))
    truth = np.concatenate((np.ones(N_SIGNAL, np.int64), np.zeros(N_BACKGROUND, np.int64)))
    return mass, score, truth


def test_fit_recovers_yields_and_peak(toy: tuple[FloatArray, FloatArray, FloatArray]) -> None:
    mass, _, _ = toy
    fit = fit_mass(mass, low=LOW, high=HIGH)
    assert fit.converged
    assert abs(fit.signal_yield - N_SIGNAL) < 3 * fit.signal_yield_err
    assert abs(fit.background_yield - N_BACKGROUND) < 3 * fit.background_yield_err
    assert fit.signal_yield + fit.background_yield == pytest.approx(mass.size, rel=1e-3)
    assert fit.mean == pytest.approx(91.2, abs=0.3)


def test_sweights_sum_to_yields_and_recover_the_signal(
    toy: tuple[FloatArray, FloatArray, FloatArray],
) -> None:
    mass, score, truth = toy
    fit = fit_mass(mass, low=LOW, high=HIGH)
    signal, background = sweights(mass, fit)
    # sPlot: each row's sWeights add up to one, each species' to its fitted yield (up to
    # the binning of the fit)
    np.testing.assert_allclose(signal + background, 1.0, atol=1e-3)
    assert signal.sum() == pytest.approx(fit.signal_yield, rel=1e-3)
    assert abs(signal.sum() - N_SIGNAL) < 3 * fit.signal_yield_err
    assert (signal < 0).any(), "sideband rows get negative signal sWeights"
    # The sWeighted mean of a mass-independent variable is the signal's (1.0), not the mix's.
    sweighted_mean = float(np.sum(signal * score) / signal.sum())
    assert sweighted_mean == pytest.approx(1.0, abs=0.1)
    assert float(score.mean()) < 0.5
    assert float(np.sum(background * score) / background.sum()) == pytest.approx(-0.3, abs=0.1)
    assert truth.sum() == N_SIGNAL


def test_sweighted_auc_agrees_with_true_auc(
    toy: tuple[FloatArray, FloatArray, FloatArray],
) -> None:
    mass, score, truth = toy
    true_auc = roc_auc(truth, score)
    result = sweighted_auc(score, mass, low=LOW, high=HIGH, n_bootstrap=10, seed=1)
    assert 0.0 < result.auc_err < 0.05
    assert abs(result.auc - true_auc) < 3 * result.auc_err
    kept = sweighted_auc(score, mass, low=LOW, high=HIGH, n_bootstrap=10, refit=False)
    assert kept.auc == result.auc
    assert 0.0 < kept.auc_err < 0.05


def test_masses_outside_the_window_are_refused() -> None:
    mass = np.linspace(60.0, 100.0, 50)
    with pytest.raises(BadValueError, match="outside the fit window"):
        fit_mass(mass, low=LOW, high=HIGH)
    with pytest.raises(BadValueError, match="scores but"):
        sweighted_auc(np.zeros(3), np.linspace(71.0, 109.0, 50), low=LOW, high=HIGH)
