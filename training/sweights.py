"""sWeights from a fit of the dimuon mass, and the sWeighted ROC AUC (arXiv:2306.15737).

Without truth labels, how well a score separates prompt from non-prompt muons is measured
with the sPlot technique (Pivk and Le Diberder, physics/0402083): the mass spectrum is fitted
with a peak (the Z, a Voigt profile: Breit-Wigner of half width γ convolved with a Gaussian of
width σ) and a background (an exponential), both normalised in the fit window. The sWeights
of the peak, summed over the rows with a given score, estimate how many prompt muons have
that score, provided the score and the mass are independent within each class; those of the
background estimate the non-prompt ones. The ROC curve and its AUC follow with the peak's
sWeights as signal weights and the background's as background weights (negative weights
included: :func:`bsym.training.metrics.roc_auc` accepts them).

Fit
    Extended binned maximum likelihood (Poisson, bins of 0.1 GeV, far below the peak width)
    in all six parameters (two yields, mean, σ, γ, background slope) with
    :func:`scipy.optimize.minimize` (L-BFGS-B, bounded). The normalisation of the Voigt
    profile in the window is a trapezoidal integral on a fine grid. The sWeights use the
    fitted densities at each row's own mass.
sWeights
    With the shapes fixed at the fit, the inverse covariance of the yields is
    V⁻¹_nj = Σ_e f_n(m_e) f_j(m_e) / (Σ_k N_k f_k(m_e))², and the sWeight of species n for
    row e is Σ_j V_nj f_j(m_e) / Σ_k N_k f_k(m_e). The signal sWeights sum to the fitted
    signal yield, and sqrt(V_ss) is its error.
Errors
    The error of the sWeighted AUC is the standard deviation over bootstrap resamplings of
    the rows, each refitted (``refit=True``, the default) or with the sWeights kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import integrate, optimize, special

from bsym.errors import BadValueError
from bsym.training.metrics import roc_auc

FloatArray = npt.NDArray[np.float64]

_GRID_POINTS = 2001
# The fit is binned this finely (0.1 GeV against a peak width of about 2 GeV) for speed.
_BINS_PER_GEV = 10
# Parameter order of the fit: signal yield, background yield, mean, sigma, gamma, slope.
_NAMES = ("signal_yield", "background_yield", "mean", "sigma", "gamma", "slope")


@dataclass(frozen=True)
class MassFit:
    """The fitted mass model in the window [low, high) and the yields' covariance (sPlot)."""

    low: float
    high: float
    signal_yield: float
    background_yield: float
    mean: float
    sigma: float
    gamma: float
    slope: float
    covariance: FloatArray
    """2×2 covariance of (signal, background) yields with the shapes fixed."""
    converged: bool

    @property
    def signal_yield_err(self) -> float:
        return float(math.sqrt(self.covariance[0, 0]))

    @property
    def background_yield_err(self) -> float:
        return float(math.sqrt(self.covariance[1, 1]))

    def densities(self, mass: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Normalised signal and background densities at ``mass``."""
        return (
            _signal_density(mass, self.mean, self.sigma, self.gamma, self.low, self.high),
            _background_density(mass, self.slope, self.low, self.high),
        )


@dataclass(frozen=True)
class SWeightedAUC:
    """The sWeighted AUC of a score, its bootstrap error, and the fit it used."""

    auc: float
    auc_err: float
    fit: MassFit


def fit_mass(
    mass: npt.ArrayLike,
    *,
    low: float,
    high: float,
    peak: float = 91.0,
) -> MassFit:
    """Fit Voigt peak + exponential to the masses in [low, high) (others are an error)."""
    m = _checked_mass(mass, low, high)
    n = float(m.size)
    inside_peak = np.abs(m - peak) < 5.0
    start = np.array(
        [
            max(float(inside_peak.sum()), 1.0),
            max(n - float(inside_peak.sum()), 1.0),
            peak,
            1.5,
            1.2,
            1.0 / 30.0,
        ]
    )
    bounds = [
        (1e-3, 2.0 * n + 10.0),
        (1e-3, 2.0 * n + 10.0),
        (low, high),
        (0.05, 0.25 * (high - low)),
        (1e-3, 0.25 * (high - low)),
        (-1.0, 1.0),
    ]
    scale = np.array([n, n, 1.0, 1.0, 1.0, 0.01])

    counts, edges = np.histogram(m, bins=_BINS_PER_GEV * math.ceil(high - low), range=(low, high))
    centres = 0.5 * (edges[1:] + edges[:-1])
    widths = np.diff(edges)
    filled = counts > 0

    def nll(scaled: FloatArray) -> float:
        ns, nb, mean, sigma, gamma, slope = scaled * scale
        fs = _signal_density(centres, mean, sigma, gamma, low, high)
        fb = _background_density(centres, slope, low, high)
        expected = np.maximum((ns * fs + nb * fb) * widths, 1e-300)
        # Extended Poisson likelihood of the bin counts (constant terms dropped).
        return float(expected.sum() - np.sum(counts[filled] * np.log(expected[filled])))

    scaled_bounds = [(lo / s, hi / s) for (lo, hi), s in zip(bounds, scale, strict=True)]
    result = optimize.minimize(
        nll, start / scale, method="L-BFGS-B", bounds=scaled_bounds, options={"maxiter": 2000}
    )
    ns, nb, mean, sigma, gamma, slope = (float(v) for v in result.x * scale)
    fs = _signal_density(m, mean, sigma, gamma, low, high)
    fb = _background_density(m, slope, low, high)
    covariance = _yield_covariance(fs, fb, ns, nb)
    return MassFit(low, high, ns, nb, mean, sigma, gamma, slope, covariance, bool(result.success))


def sweights(mass: npt.ArrayLike, fit: MassFit) -> tuple[FloatArray, FloatArray]:
    """Signal (peak) and background sWeights of each row, with the fit's shapes and yields."""
    m = _checked_mass(mass, fit.low, fit.high)
    fs, fb = fit.densities(m)
    total = fit.signal_yield * fs + fit.background_yield * fb
    v = fit.covariance
    signal = (v[0, 0] * fs + v[0, 1] * fb) / total
    background = (v[1, 0] * fs + v[1, 1] * fb) / total
    return signal, background


def sweighted_roc_inputs(
    scores: npt.ArrayLike, signal_weight: FloatArray, background_weight: FloatArray
) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray]:
    """Labels, scores and weights of the sWeighted ROC: every row once per species."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.concatenate((np.ones(s.size, np.int64), np.zeros(s.size, np.int64)))
    return labels, np.concatenate((s, s)), np.concatenate((signal_weight, background_weight))


def sweighted_auc(
    scores: npt.ArrayLike,
    mass: npt.ArrayLike,
    *,
    low: float,
    high: float,
    n_bootstrap: int = 50,
    seed: int = 0,
    refit: bool = True,
) -> SWeightedAUC:
    """AUC of ``scores`` with the peak's sWeights as signal and the background's as background."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = _checked_mass(mass, low, high)
    if s.size != m.size:
        raise BadValueError(f"{s.size} scores but {m.size} masses; they must be one per row")
    fit = fit_mass(m, low=low, high=high)
    signal, background = sweights(m, fit)
    auc = _auc_of(s, signal, background)
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    for _ in range(n_bootstrap):
        rows = rng.integers(0, s.size, size=s.size)
        if refit:
            resampled = fit_mass(m[rows], low=low, high=high, peak=fit.mean)
            ws, wb = sweights(m[rows], resampled)
        else:
            ws, wb = signal[rows], background[rows]
        try:
            samples.append(_auc_of(s[rows], ws, wb))
        except ValueError:  # a resampling with no net weight in one species
            continue
    error = float(np.std(samples, ddof=1)) if len(samples) >= 2 else math.nan
    return SWeightedAUC(auc, error, fit)


def _auc_of(scores: FloatArray, signal: FloatArray, background: FloatArray) -> float:
    labels, doubled, weights = sweighted_roc_inputs(scores, signal, background)
    return roc_auc(labels, doubled, weights)


def _checked_mass(mass: npt.ArrayLike, low: float, high: float) -> FloatArray:
    m = np.asarray(mass, dtype=np.float64).reshape(-1)
    if m.size < 10:
        raise BadValueError(f"a mass fit needs at least 10 rows, got {m.size}")
    outside = int(np.count_nonzero(~((m >= low) & (m < high))))
    if outside:
        raise BadValueError(
            f"{outside} of {m.size} masses lie outside the fit window [{low}, {high})"
        )
    return m


def _signal_density(
    mass: FloatArray, mean: float, sigma: float, gamma: float, low: float, high: float
) -> FloatArray:
    grid = np.linspace(low, high, _GRID_POINTS)
    norm = float(integrate.trapezoid(special.voigt_profile(grid - mean, sigma, gamma), grid))
    density: FloatArray = special.voigt_profile(mass - mean, sigma, gamma) / norm
    return density


def _background_density(mass: FloatArray, slope: float, low: float, high: float) -> FloatArray:
    width = high - low
    # ∫ exp(-slope·x) dx over [0, width], written to stay exact as slope → 0
    norm = width if abs(slope) < 1e-12 else float(-np.expm1(-slope * width) / slope)
    density: FloatArray = np.exp(-slope * (mass - low)) / norm
    return density


def _yield_covariance(fs: FloatArray, fb: FloatArray, ns: float, nb: float) -> FloatArray:
    total = ns * fs + nb * fb
    densities = np.stack((fs, fb))
    inverse = (densities[:, None, :] * densities[None, :, :] / total**2).sum(axis=2)
    covariance: FloatArray = np.linalg.inv(inverse)
    return covariance
