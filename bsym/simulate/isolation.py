"""Toy detector simulation of muon isolation: prompt (Z→μμ) against non-prompt (b/c) muons.

(Over 700 lines: a fifth of it is this docstring, the physics record of the toy, and the
rest is one generator whose steps share the event's random stream; its config lives in
:mod:`bsym.simulate.isolation_config`.)

The sample mimics the setting of arXiv:2102.02278 and arXiv:2306.15737: dimuon events in a
70–110 GeV mass window, and around every muon the calorimeter cells (0.025 in η by π/126 in
φ, within ΔR < 0.45 of the muon) from which isolation classifiers are learnt.

Events
    Each event is a dimuon pair. With probability ``prompt_fraction`` it is prompt (Z→μμ, both
    muons ``Muon_genPartFlav`` = 1); otherwise both muons come from semileptonic decays of
    heavy-flavour hadrons inside jets, b (5) with probability ``b_fraction`` and c (4)
    otherwise. A fraction ``third_muon_fraction`` of events carries a third, soft non-prompt
    muon, so ``nMuon`` is 2 or 3. Muons are sorted by pT (descending) within each event.
Dimuon mass
    Drawn per event, independently of the muon kinematics: prompt pairs from a Breit-Wigner
    (Cauchy, FWHM ``z_width``) at ``z_mass`` smeared by a Gaussian of relative width
    ``mass_resolution``; non-prompt pairs from a falling exponential with decay length
    ``continuum_scale``. Both are restricted to [``mass_min``, ``mass_max``).
Muon kinematics
    Prompt pT is that of a two-body decay boosted by the recoil of its parent: in the rest
    frame the muon has momentum m/2 with cos θ* from 1 + cos²θ* and a uniform azimuth about
    the parent's direction, and the parent's transverse momentum (one per event) is a Lomax
    (Pareto II) variate of scale ``recoil_pt_scale`` and index ``recoil_pt_tail``: mostly
    a few GeV (the Jacobian peak near 40 GeV stays), with a power-law tail of W/Z + jets and
    top-like boosts that takes the 99th percentile of prompt pT to about 200 GeV. Each muon's
    decay angles are drawn on their own (a toy, not a consistent pair). Muons are restricted
    to pT > ``min_muon_pt``. Non-prompt pT is ``min_muon_pt`` plus a Lomax variate of scale
    ``nonprompt_pt_scale`` and index ``nonprompt_pt_tail`` (steeper at low pT, median about
    26 GeV, 99th percentile about 140 GeV). Both Lomax tails stop at ``tail_max_pt``
    (1.5 TeV), well inside the LHC's reach; the soft third muon starts at
    ``soft_muon_min_pt``. η is a Gaussian truncated to
    ``|η| < max_abs_eta``, wider for prompt muons. The second muon is roughly back-to-back in
    φ with the first. Prompt pairs are opposite sign; non-prompt pairs are opposite sign with
    probability ``nonprompt_opposite_sign``; the third muon's charge is random.
Particles around each muon (positions relative to the muon; ET in GeV)
    (a) Non-prompt muons: the parent jet. The muon carries a fraction z ~ Beta of the heavy
        hadron's momentum, the hadron a fraction x ~ Beta of the jet; both Betas pile up
        towards 1 (second parameter < 1), because the muon pT cut selects muons that took most
        of the momentum. The visible rest of the hadron decay is (1/z − 1)·pT scaled by a
        uniform ``visible_fraction`` (the neutrino escapes); the fragmentation rest is
        pT/(z·x)·(1 − x). Hard fragmentation (z and x near 1) leaves little activity, so
        isolation is not perfect. That energy is shared (Dirichlet(1)) among
        1 + Poisson(``jet_multiplicity_min`` + ``jet_multiplicity_per_gev``·E) particles,
        Gaussian around a jet axis offset from the muon by a 2-D Gaussian of width
        ``jet_axis_spread`` per coordinate (mean offset ≈ 0.19); softer particles spread
        wider (``jet_core_width``/√(ET/GeV), clipped to [0.02, 0.3]).
        Prompt muons: a fraction ``prompt_jet_fraction`` has a recoil jet nearby (W/Z + jets,
        the b jet of a top decay), of exponential ET of mean ``prompt_jet_et_mean``, fragmented
        the same way around an axis uniform in the window; it makes the non-isolated tail of
        prompt muons (CMS: 6–18 % above the tight cut).
    (b) Pile-up and underlying event, for both classes: Poisson(``pileup_mean``) particles,
        uniform in the disk ΔR < 0.45. A fraction ``underlying_event_fraction`` of them come
        from the primary vertex (underlying event, exponential ET of mean
        ``underlying_event_et_mean``), the rest from pile-up vertices (exponential ET of mean
        ``pileup_et_mean``). The defaults describe Run 2/3 conditions: pile-up adds about 0.5
        GeV of ET per unit η-φ area per interaction, so ⟨μ⟩ ≈ 40 (Run 2 averaged 34, Run 3
        reaches 50-60; arXiv:2102.02278 simulated 50) puts about 15 GeV into the window as
        some 49 soft deposits of 0.3 GeV on average (mostly photons from π⁰ decays); the
        underlying event adds 0.75 particles of 1.5 GeV on average (about 0.8 charged
        particles per unit η-φ area, as measured in the transverse region of Z events). Cone
        sums add this diffuse energy to that of a jet; in the cells it shows as many soft,
        scattered deposits, unlike the fewer, harder ones of a jet.
    (c) The muon's own minimum-ionising deposit: Gamma-distributed ET of mean ``mip_et_mean``
        (shape ``mip_shape``), put in the central cell.
    (d) Final-state radiation: a fraction ``fsr_fraction`` of prompt muons radiate one photon
        at an exponential distance of mean ``fsr_angle`` carrying an exponential fraction of
        mean ``fsr_energy_fraction`` of the muon pT; very collinear, so the cells tell it from
        a jet better than a cone sum does.
    Each particle has a particle-flow type: charged with probability ``charged_fraction``
    (a charged hadron from the primary vertex, or from a pile-up vertex for pile-up
    particles), else a photon with probability ``photon_fraction`` or a neutral hadron; FSR
    photons are photons. The types matter only for the PF isolation below: the calorimeter
    cells see the energy of every particle.
Calorimeter
    Cells on a grid centred on the muon (the muon sits at the centre of cell (0, 0)); each
    particle's ET goes to the cell that contains it, and cells whose centre is at ΔR ≥ 0.45
    from the muon are dropped (about 1020 cells remain). Each cell's summed ET gets a
    Gaussian resolution σ = ET·(a/√ET ⊕ b) (ET stands for E) and Gaussian electronic noise of
    ``cell_noise_sigma``; cells measured below ``noise_threshold`` are dropped. Empty cells are
    not simulated one by one: how many pass the threshold on noise alone is drawn from a
    binomial and their ET from the Gaussian tail (a noise cell landing on an occupied cell is
    dropped, a negligible loss). Cells are stored per muon in decreasing ET.
Pair branches (for training without labels, arXiv:2306.15737)
    ``Muon_fromPair`` is 1 for the two muons of the dimuon pair (0 for the soft third muon).
    Per event (and, in the 'Muons' tree, copied to each of its muons like ``dimuon_mass``):
    ``dimuon_os`` is 1 for an opposite-sign pair, ``dimuon_leadPt``/``dimuon_leadEta`` are
    the leading pair muon's pT and η, and ``dimuon_selected`` is 1 where both pair muons
    pass the paper's selection |η| < 2.1 and pT > 25 GeV. Nothing is cut here: the
    selection is applied by who needs it (``supervision: cwola`` in ``bsym train``).
Isolation variables (from the true, pre-detector particles; the muon's own deposit excluded)
    ``pfRelIso03_all``/``pfRelIso04_all``: NanoAOD's Δβ-corrected PF isolation within
    ΔR < 0.3/0.4, (ΣpT charged hadrons from the primary vertex + max(0, ΣET neutral hadrons +
    ΣET photons − 0.5·ΣpT charged hadrons from pile-up)) / pT, with CMS's muon thresholds:
    neutral hadrons, photons and pile-up hadrons count above ``PF_MIN_ET`` (0.5 GeV) and
    outside ``PF_VETO_RADIUS`` (0.01). ``pfRelIso03_chg``: the charged primary-vertex part
    within ΔR < 0.3 over pT. With the defaults prompt muons have a median ``pfRelIso04_all``
    of about 0.027, 28 % exactly 0 and 88 % below 0.15 (CMS NanoAOD simulation: 0.02–0.05,
    25–30 %, 82–94 %); non-prompt muons a median of about 0.28, 32 % below 0.15.
    ``coneIso03``/``coneIso04``: the raw cone isolation of the papers, summed ET of every
    particle with ΔR < 0.3/0.4 over pT (no names of NanoAOD's, since NanoAOD has no such
    branch). ``sumTrackPt03``: scalar sum of the pT of charged primary-vertex particles with
    ΔR < 0.3 and pT > ``track_pt_min`` (pile-up tracks point to other vertices).

With the defaults: about 36 cells per muon above threshold (34 prompt, 39 non-prompt);
ROC AUC about 0.85 for ``pfRelIso03_all``, 0.86 for ``pfRelIso04_all``, 0.87 for
``coneIso03``, 0.86 for the calorimeter cone ΔR < 0.3 and for the best one (ΔR < 0.35),
0.81 for ``sumTrackPt03``. (Before the PF types, the recoil jets and the pT tails, the
NanoAOD-named branches held the raw cone sums, at 0.89, and networks trained on 20 000
events reached about 0.915 on the 18 calorimeter cones and log pT and 0.925 on the cells.)

Reproducibility: events are generated in blocks of ``BLOCK_EVENTS``, block k from
``SeedSequence(seed, spawn_key=(k,))``, so the same seed gives the same events however the
output is split into files, and the files are the concatenation of ``simulate_isolation``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import numpy.typing as npt

from bsym.errors import ConfigError
from bsym.simulate.isolation_config import IsolationConfig
from bsym.simulate.rootwrite import write_tree

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "CELL_DETA",
    "CELL_DPHI",
    "EVENT_TREE",
    "FLAV_B",
    "FLAV_C",
    "FLAV_PROMPT",
    "MUON_TREE",
    "PF_CHARGED_PU",
    "PF_CHARGED_PV",
    "PF_NEUTRAL_HADRON",
    "PF_PHOTON",
    "WINDOW_RADIUS",
    "IsolationConfig",
    "delta_beta_isolation",
    "simulate_isolation",
    "write_isolation",
]

FLAV_PROMPT = 1
FLAV_C = 4
FLAV_B = 5

# Particle-flow candidate types, as the Δβ-corrected isolation sorts them.
PF_CHARGED_PV = 0
PF_CHARGED_PU = 1
PF_NEUTRAL_HADRON = 2
PF_PHOTON = 3
# CMS muon PF isolation: neutral hadrons, photons and pile-up charged hadrons count above
# 0.5 GeV and outside ΔR = 0.01 of the muon; charged hadrons from the primary vertex always.
PF_MIN_ET = 0.5
PF_VETO_RADIUS = 0.01

CELL_DETA = 0.025
CELL_DPHI = math.pi / 126
WINDOW_RADIUS = 0.45
# Half-width of the cell grid in cells: 18 cells of 0.025 (or π/126) cover 0.45.
_HALF = 18
_SIDE = 2 * _HALF + 1
_CODES = _SIDE * _SIDE

# The dimuon selection of arXiv:2306.15737, recorded per event in ``dimuon_selected``.
PAIR_MAX_ABS_ETA = 2.1
PAIR_MIN_PT = 25.0

MUON_TREE = "Muons"
EVENT_TREE = "Events"
BLOCK_EVENTS = 10_000

_MUON_FIELDS = (
    "pt",
    "eta",
    "phi",
    "charge",
    "pfRelIso03_all",
    "pfRelIso04_all",
    "pfRelIso03_chg",
    "coneIso03",
    "coneIso04",
    "sumTrackPt03",
    "genPartFlav",
    "fromPair",
)
_CELL_FIELDS = ("eta", "phi", "et")
_COUNTERS = ("nMuon", "nCaloCell")


# --------------------------------------------------------------------------------------------
# Columnar containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """Flat columns of a run of events: per event, per muon (event order) and per cell."""

    event: IntArray
    mass: FloatArray
    n_muon: IntArray
    muon: dict[str, npt.NDArray[np.generic]]
    n_cell: IntArray
    cell: dict[str, FloatArray]

    def slice_events(self, start: int, stop: int) -> _Columns:
        """Return the columns of events ``start:stop`` (positions within this run)."""
        mu_off = np.concatenate(([0], np.cumsum(self.n_muon)))
        m0, m1 = int(mu_off[start]), int(mu_off[stop])
        cell_off = np.concatenate(([0], np.cumsum(self.n_cell)))
        c0, c1 = int(cell_off[m0]), int(cell_off[m1])
        return _Columns(
            event=self.event[start:stop],
            mass=self.mass[start:stop],
            n_muon=self.n_muon[start:stop],
            muon={k: v[m0:m1] for k, v in self.muon.items()},
            n_cell=self.n_cell[m0:m1],
            cell={k: v[c0:c1] for k, v in self.cell.items()},
        )


def _concat(parts: list[_Columns]) -> _Columns:
    """Concatenate runs of events in order."""
    return _Columns(
        event=np.concatenate([p.event for p in parts]),
        mass=np.concatenate([p.mass for p in parts]),
        n_muon=np.concatenate([p.n_muon for p in parts]),
        muon={k: np.concatenate([p.muon[k] for p in parts]) for k in parts[0].muon},
        n_cell=np.concatenate([p.n_cell for p in parts]),
        cell={k: np.concatenate([p.cell[k] for p in parts]) for k in parts[0].cell},
    )


@dataclass(frozen=True)
class _Muons:
    """Per-muon truth used while simulating (flat, in event order)."""

    event: IntArray  # index of the event within the block
    flav: IntArray
    pt: FloatArray
    eta: FloatArray
    phi: FloatArray
    charge: IntArray
    in_pair: BoolArray


@dataclass(frozen=True)
class _Particles:
    """Particles around the muons, positions relative to their muon; ``kind`` is a PF_* type."""

    muon: IntArray
    deta: FloatArray
    dphi: FloatArray
    et: FloatArray
    kind: IntArray


# --------------------------------------------------------------------------------------------
# Small samplers
# --------------------------------------------------------------------------------------------


def _redraw_outside(
    draw: Callable[[IntArray], FloatArray], n: int, low: float, high: float
) -> FloatArray:
    """Draw ``draw(indices)`` for ``n`` items, redrawing those outside [low, high)."""
    out = np.empty(n)
    todo: IntArray = np.arange(n, dtype=np.int64)
    for _ in range(10_000):
        if todo.size == 0:
            return out
        x = draw(todo)
        ok = (x >= low) & (x < high)
        out[todo[ok]] = x[ok]
        todo = todo[~ok]
    raise ConfigError(f"cannot draw values in [{low}, {high}): the acceptance is too small")


def _wrap_phi(phi: FloatArray) -> FloatArray:
    """Map angles to [-π, π)."""
    wrapped: FloatArray = (phi + np.pi) % (2 * np.pi) - np.pi
    return wrapped


def _cos_theta_star(rng: np.random.Generator, n: int) -> FloatArray:
    """Draw cos θ* from 1 + cos²θ* by inverting its CDF (a cubic with one real root)."""
    q = 4.0 - 8.0 * rng.random(n)
    root = np.sqrt(q * q / 4.0 + 1.0)
    cos: FloatArray = np.cbrt(-q / 2.0 + root) + np.cbrt(-q / 2.0 - root)
    return np.clip(cos, -1.0, 1.0)


def _gaussian_tail(rng: np.random.Generator, n: int, cut: float) -> FloatArray:
    """Draw a standard normal conditioned on x > ``cut`` > 0 (Robert's exponential proposal)."""
    rate = 0.5 * (cut + math.sqrt(cut * cut + 4.0))

    def draw(idx: IntArray) -> FloatArray:
        x = cut + rng.exponential(1.0 / rate, idx.size)
        accept = rng.random(idx.size) < np.exp(-0.5 * (x - rate) ** 2)
        # Rejected proposals are sent out of range so that they are drawn again.
        return np.where(accept, x, -np.inf)

    return _redraw_outside(draw, n, cut, np.inf)


def _segment_sum(index: IntArray, weights: FloatArray, size: int) -> FloatArray:
    """Sum ``weights`` per ``index`` value, for indices 0..size-1."""
    return np.bincount(index, weights=weights, minlength=size).astype(np.float64, copy=False)


def _beta_by_flavour(
    rng: np.random.Generator,
    flav: IntArray,
    beta_b: tuple[float, float],
    beta_c: tuple[float, float],
) -> FloatArray:
    """Draw a Beta variate per item with the b or c parameters."""
    is_b = flav == FLAV_B
    alpha = np.where(is_b, beta_b[0], beta_c[0])
    beta = np.where(is_b, beta_b[1], beta_c[1])
    return rng.beta(alpha, beta)


# --------------------------------------------------------------------------------------------
# Events and muons
# --------------------------------------------------------------------------------------------


def _draw_mass(rng: np.random.Generator, prompt: BoolArray, cfg: IsolationConfig) -> FloatArray:
    """Dimuon mass: smeared Breit-Wigner for prompt events, exponential continuum otherwise."""
    gamma = cfg.z_width / 2.0

    def draw(idx: IntArray) -> FloatArray:
        n = idx.size
        peak = cfg.z_mass + gamma * np.tan(np.pi * (rng.random(n) - 0.5))
        peak *= 1.0 + cfg.mass_resolution * rng.standard_normal(n)
        continuum = cfg.mass_min + rng.exponential(cfg.continuum_scale, n)
        return np.where(prompt[idx], peak, continuum)

    return _redraw_outside(draw, prompt.size, cfg.mass_min, cfg.mass_max)


def _lomax(
    rng: np.random.Generator, scale: float, tail: float, n: int, maximum: float
) -> FloatArray:
    """Draw a Lomax (Pareto II) variate truncated to [0, maximum]: density ∝ (1 +
    x/scale)^-(tail + 1). Untruncated, its tail reaches tens of TeV in a sample of 10⁵."""
    below_maximum = 1.0 - (1.0 + maximum / scale) ** -tail
    x: FloatArray = scale * ((1.0 - below_maximum * rng.random(n)) ** (-1.0 / tail) - 1.0)
    return x


def _draw_muon_pt(
    rng: np.random.Generator,
    flav: IntArray,
    soft: BoolArray,
    mass: FloatArray,
    recoil: FloatArray,
    cfg: IsolationConfig,
) -> FloatArray:
    """Muon pT: boosted two-body decay for prompt muons, falling spectra for non-prompt ones."""
    prompt = flav == FLAV_PROMPT

    def draw(idx: IntArray) -> FloatArray:
        n = idx.size
        half = 0.5 * mass[idx]
        rest_pt = half * np.sqrt(1.0 - _cos_theta_star(rng, n) ** 2)
        azimuth = rng.uniform(-np.pi, np.pi, n)
        gamma_beta = recoil[idx] / mass[idx]
        along = np.sqrt(1.0 + gamma_beta**2) * rest_pt * np.cos(azimuth) + gamma_beta * half
        boosted = np.hypot(along, rest_pt * np.sin(azimuth))
        hard = cfg.min_muon_pt + _lomax(
            rng, cfg.nonprompt_pt_scale, cfg.nonprompt_pt_tail, n, cfg.tail_max_pt
        )
        soft_pt = cfg.soft_muon_min_pt + rng.exponential(cfg.soft_muon_pt_scale, n)
        return np.where(soft[idx], soft_pt, np.where(prompt[idx], boosted, hard))

    low = min(cfg.min_muon_pt, cfg.soft_muon_min_pt)
    pt = _redraw_outside(draw, flav.size, low, np.inf)
    # Prompt muons below min_muon_pt are redrawn; only the soft third muon may be softer.
    bad: IntArray = np.flatnonzero(~soft & (pt < cfg.min_muon_pt))
    if bad.size:
        pt[bad] = _redraw_outside(lambda i: draw(bad[i]), bad.size, cfg.min_muon_pt, np.inf)
    return pt


def _draw_muons(
    rng: np.random.Generator, n_events: int, cfg: IsolationConfig
) -> tuple[FloatArray, IntArray, _Muons]:
    """Draw the events (mass, muon count) and their muons, sorted by pT within each event."""
    prompt = rng.random(n_events) < cfg.prompt_fraction
    heavy = np.where(rng.random(n_events) < cfg.b_fraction, FLAV_B, FLAV_C)
    mass = _draw_mass(rng, prompt, cfg)
    n_muon = 2 + (rng.random(n_events) < cfg.third_muon_fraction).astype(np.int64)

    event = np.repeat(np.arange(n_events, dtype=np.int64), n_muon)
    first = np.concatenate(([0], np.cumsum(n_muon)[:-1]))
    slot = np.arange(event.size, dtype=np.int64) - first[event]
    soft = slot == 2
    heavy_soft = np.where(rng.random(event.size) < cfg.b_fraction, FLAV_B, FLAV_C)
    flav = np.where(prompt[event], FLAV_PROMPT, heavy[event])
    flav = np.where(soft & prompt[event], heavy_soft, flav).astype(np.int64)

    recoil = _lomax(rng, cfg.recoil_pt_scale, cfg.recoil_pt_tail, n_events, cfg.tail_max_pt)
    pt = _draw_muon_pt(rng, flav, soft, mass[event], recoil[event], cfg)
    width = np.where(flav == FLAV_PROMPT, cfg.prompt_eta_width, cfg.nonprompt_eta_width)
    eta = _redraw_outside(
        lambda i: width[i] * rng.standard_normal(i.size),
        event.size,
        -cfg.max_abs_eta,
        cfg.max_abs_eta,
    )
    phi0 = rng.uniform(-np.pi, np.pi, n_events)
    phi = np.where(
        slot == 0,
        phi0[event],
        np.where(
            slot == 1,
            phi0[event] + np.pi + 0.4 * rng.standard_normal(event.size),
            rng.uniform(-np.pi, np.pi, event.size),
        ),
    )
    charge = _draw_charges(rng, prompt, event, slot, cfg)

    order = np.lexsort((-pt, event))
    muons = _Muons(
        event=event[order],
        flav=flav[order],
        pt=pt[order],
        eta=eta[order],
        phi=_wrap_phi(phi[order]),
        charge=charge[order],
        in_pair=(slot < 2)[order],
    )
    return mass, n_muon, muons


def _draw_charges(
    rng: np.random.Generator,
    prompt: BoolArray,
    event: IntArray,
    slot: IntArray,
    cfg: IsolationConfig,
) -> IntArray:
    """Charges: prompt pairs opposite sign, non-prompt pairs mostly so, third muon random."""
    n = event.size
    first = np.where(rng.random(prompt.size) < 0.5, 1, -1)
    opposite = prompt | (rng.random(prompt.size) < cfg.nonprompt_opposite_sign)
    second = np.where(opposite, -first, first)
    third = np.where(rng.random(n) < 0.5, 1, -1)
    charge = np.where(slot == 0, first[event], np.where(slot == 1, second[event], third))
    return charge.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Particles around the muons
# --------------------------------------------------------------------------------------------


def _draw_kind(rng: np.random.Generator, pileup: BoolArray, cfg: IsolationConfig) -> IntArray:
    """PF type per particle: charged (from its vertex) with ``charged_fraction``, else neutral."""
    n = pileup.size
    charged = rng.random(n) < cfg.charged_fraction
    photon = rng.random(n) < cfg.photon_fraction
    kind = np.where(
        charged,
        np.where(pileup, PF_CHARGED_PU, PF_CHARGED_PV),
        np.where(photon, PF_PHOTON, PF_NEUTRAL_HADRON),
    )
    return kind.astype(np.int64)


def _soft_particles(rng: np.random.Generator, n_muons: int, cfg: IsolationConfig) -> _Particles:
    """Pile-up and underlying-event particles, uniform in the window around each muon."""
    count = rng.poisson(cfg.pileup_mean, n_muons)
    muon = np.repeat(np.arange(n_muons, dtype=np.int64), count)
    n = muon.size
    pileup = rng.random(n) >= cfg.underlying_event_fraction
    radius = WINDOW_RADIUS * np.sqrt(rng.random(n))
    angle = rng.uniform(-np.pi, np.pi, n)
    return _Particles(
        muon=muon,
        deta=radius * np.cos(angle),
        dphi=radius * np.sin(angle),
        et=np.where(
            pileup,
            rng.exponential(cfg.pileup_et_mean, n),
            rng.exponential(cfg.underlying_event_et_mean, n),
        ),
        kind=_draw_kind(rng, pileup, cfg),
    )


def _jet_energy(rng: np.random.Generator, muons: _Muons, cfg: IsolationConfig) -> FloatArray:
    """ET of the parent jet without the muon (and neutrino) for non-prompt muons; for prompt
    muons that of a nearby recoil jet (``prompt_jet_fraction`` of them), else zero."""
    z = _beta_by_flavour(rng, muons.flav, cfg.muon_fraction_beta_b, cfg.muon_fraction_beta_c)
    x = _beta_by_flavour(rng, muons.flav, cfg.fragmentation_beta_b, cfg.fragmentation_beta_c)
    z = np.clip(z, 1e-3, 1.0)
    x = np.clip(x, 1e-3, 1.0)
    visible = rng.uniform(cfg.visible_fraction[0], cfg.visible_fraction[1], muons.pt.size)
    hadron = muons.pt / z
    rest = (hadron - muons.pt) * visible + hadron * (1.0 - x) / x
    nearby = rng.random(muons.pt.size) < cfg.prompt_jet_fraction
    recoil_jet = np.where(nearby, rng.exponential(cfg.prompt_jet_et_mean, muons.pt.size), 0.0)
    return np.where(muons.flav == FLAV_PROMPT, recoil_jet, rest)


def _jet_particles(rng: np.random.Generator, muons: _Muons, cfg: IsolationConfig) -> _Particles:
    """Fragment the parent jets of non-prompt muons into collimated particles."""
    energy = _jet_energy(rng, muons, cfg)
    has_jet = energy > 0
    mean = cfg.jet_multiplicity_min + cfg.jet_multiplicity_per_gev * energy
    count = np.where(has_jet, 1 + rng.poisson(mean), 0)
    muon = np.repeat(np.arange(muons.pt.size, dtype=np.int64), count)
    n = muon.size

    # Dirichlet(1, ..., 1) sharing of the jet energy: normalised exponential weights.
    share = rng.exponential(1.0, n)
    share /= _segment_sum(muon, share, muons.pt.size)[muon]
    et = energy[muon] * share

    # A prompt muon's nearby jet is anywhere in the window, a parent jet close to its muon.
    prompt = muons.flav == FLAV_PROMPT
    distance = WINDOW_RADIUS * np.sqrt(rng.random(muons.pt.size))
    direction = rng.uniform(-np.pi, np.pi, muons.pt.size)
    axis_eta = np.where(
        prompt,
        distance * np.cos(direction),
        cfg.jet_axis_spread * rng.standard_normal(muons.pt.size),
    )
    axis_phi = np.where(
        prompt,
        distance * np.sin(direction),
        cfg.jet_axis_spread * rng.standard_normal(muons.pt.size),
    )
    width = np.clip(cfg.jet_core_width / np.sqrt(np.maximum(et, 1e-6)), 0.02, 0.3)
    return _Particles(
        muon=muon,
        deta=axis_eta[muon] + width * rng.standard_normal(n),
        dphi=axis_phi[muon] + width * rng.standard_normal(n),
        et=et,
        kind=_draw_kind(rng, np.zeros(n, dtype=np.bool_), cfg),
    )


def _fsr_photons(rng: np.random.Generator, muons: _Muons, cfg: IsolationConfig) -> _Particles:
    """Final-state radiation of prompt muons: one collinear photon for some of them."""
    radiates = (muons.flav == FLAV_PROMPT) & (rng.random(muons.pt.size) < cfg.fsr_fraction)
    muon = np.flatnonzero(radiates).astype(np.int64)
    n = muon.size
    radius = rng.exponential(cfg.fsr_angle, n)
    angle = rng.uniform(-np.pi, np.pi, n)
    return _Particles(
        muon=muon,
        deta=radius * np.cos(angle),
        dphi=radius * np.sin(angle),
        et=muons.pt[muon] * rng.exponential(cfg.fsr_energy_fraction, n),
        kind=np.full(n, PF_PHOTON, dtype=np.int64),
    )


def _merge(*parts: _Particles) -> _Particles:
    """Concatenate particle collections."""
    return _Particles(
        muon=np.concatenate([p.muon for p in parts]),
        deta=np.concatenate([p.deta for p in parts]),
        dphi=np.concatenate([p.dphi for p in parts]),
        et=np.concatenate([p.et for p in parts]),
        kind=np.concatenate([p.kind for p in parts]),
    )


def delta_beta_isolation(
    muon: IntArray,
    kind: IntArray,
    et: FloatArray,
    dr: FloatArray,
    muon_pt: FloatArray,
    radius: float,
) -> tuple[FloatArray, FloatArray]:
    """NanoAOD's PF isolation within ``radius``: (pfRelIso_all, pfRelIso_chg) per muon.

    pfRelIso_all = (ΣpT charged PV + max(0, ΣET neutral hadrons + ΣET photons − 0.5·ΣpT
    charged pile-up)) / pT and pfRelIso_chg = ΣpT charged PV / pT, with the thresholds and
    veto cone of PF_MIN_ET and PF_VETO_RADIUS for all but the charged PV hadrons.
    """
    n = muon_pt.size
    cone = dr < radius
    counted = (et > PF_MIN_ET) & (dr >= PF_VETO_RADIUS)
    neutral = (kind == PF_NEUTRAL_HADRON) | (kind == PF_PHOTON)
    charged_pv = _segment_sum(muon, et * (cone & (kind == PF_CHARGED_PV)), n)
    neutral_sum = _segment_sum(muon, et * (cone & counted & neutral), n)
    pileup_sum = _segment_sum(muon, et * (cone & counted & (kind == PF_CHARGED_PU)), n)
    corrected = np.maximum(0.0, neutral_sum - 0.5 * pileup_sum)
    return (charged_pv + corrected) / muon_pt, charged_pv / muon_pt


def _isolation(muons: _Muons, particles: _Particles, cfg: IsolationConfig) -> dict[str, FloatArray]:
    """Isolation from the true particles (the muon's own deposit excluded): NanoAOD's
    Δβ-corrected PF isolation, the raw cone sums and the track sum."""
    n = muons.pt.size
    dr = np.hypot(particles.deta, particles.dphi)
    pf03, chg03 = delta_beta_isolation(
        particles.muon, particles.kind, particles.et, dr, muons.pt, 0.3
    )
    pf04, _ = delta_beta_isolation(particles.muon, particles.kind, particles.et, dr, muons.pt, 0.4)
    cone03 = _segment_sum(particles.muon, particles.et * (dr < 0.3), n)
    cone04 = _segment_sum(particles.muon, particles.et * (dr < 0.4), n)
    track = (particles.kind == PF_CHARGED_PV) & (particles.et > cfg.track_pt_min)
    tracks03 = _segment_sum(particles.muon, particles.et * (track & (dr < 0.3)), n)
    return {
        "pfRelIso03_all": pf03,
        "pfRelIso04_all": pf04,
        "pfRelIso03_chg": chg03,
        "coneIso03": cone03 / muons.pt,
        "coneIso04": cone04 / muons.pt,
        "sumTrackPt03": tracks03,
    }


# --------------------------------------------------------------------------------------------
# Calorimeter
# --------------------------------------------------------------------------------------------


def _window_codes() -> IntArray:
    """Codes (i + 18)·37 + (j + 18) of the grid cells whose centre is within ΔR < 0.45."""
    i, j = np.meshgrid(np.arange(-_HALF, _HALF + 1), np.arange(-_HALF, _HALF + 1), indexing="ij")
    inside = np.hypot(i * CELL_DETA, j * CELL_DPHI) < WINDOW_RADIUS
    codes: IntArray = ((i + _HALF) * _SIDE + (j + _HALF))[inside].astype(np.int64)
    return codes


_WINDOW_CODES = _window_codes()
_IN_WINDOW = np.zeros(_CODES, dtype=np.bool_)
_IN_WINDOW[_WINDOW_CODES] = True
_CENTRE_CODE = _HALF * _SIDE + _HALF


def _deposit(
    rng: np.random.Generator, muons: _Muons, particles: _Particles, cfg: IsolationConfig
) -> tuple[IntArray, FloatArray]:
    """Sum the true ET per cell (particles plus the muon's MIP); return (keys, ET)."""
    i = np.rint(particles.deta / CELL_DETA).astype(np.int64)
    j = np.rint(particles.dphi / CELL_DPHI).astype(np.int64)
    on_grid = (np.abs(i) <= _HALF) & (np.abs(j) <= _HALF)
    code = np.where(on_grid, (i + _HALF) * _SIDE + (j + _HALF), 0)
    keep = on_grid & _IN_WINDOW[code]
    n = muons.pt.size
    mip = rng.gamma(cfg.mip_shape, cfg.mip_et_mean / cfg.mip_shape, n)
    keys = np.concatenate((particles.muon[keep] * _CODES + code[keep], np.arange(n) * _CODES))
    et = np.concatenate((particles.et[keep], mip))
    keys[-n:] += _CENTRE_CODE
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, _segment_sum(inverse.ravel(), et, unique.size)


def _noise_cells(
    rng: np.random.Generator, n_muons: int, occupied: IntArray, cfg: IsolationConfig
) -> tuple[IntArray, FloatArray]:
    """Empty cells whose electronic noise alone passes the threshold; return (keys, ET)."""
    cut = cfg.noise_threshold / cfg.cell_noise_sigma
    p_pass = 0.5 * math.erfc(cut / math.sqrt(2.0))
    count = rng.binomial(_WINDOW_CODES.size, p_pass, n_muons)
    muon = np.repeat(np.arange(n_muons, dtype=np.int64), count)
    keys = muon * _CODES + _WINDOW_CODES[rng.integers(0, _WINDOW_CODES.size, muon.size)]
    keys = np.unique(keys)
    keys = keys[~np.isin(keys, occupied, assume_unique=True)]
    if cut > 0:
        et = cfg.cell_noise_sigma * _gaussian_tail(rng, keys.size, cut)
    else:
        et = cfg.cell_noise_sigma * np.abs(rng.standard_normal(keys.size))
    return keys, et


def _calorimeter(
    rng: np.random.Generator, muons: _Muons, particles: _Particles, cfg: IsolationConfig
) -> tuple[IntArray, dict[str, FloatArray]]:
    """Measured cells above threshold: (cells per muon, flat eta/phi/et sorted by ET per muon)."""
    keys, true_et = _deposit(rng, muons, particles, cfg)
    a, b = cfg.energy_resolution_stochastic, cfg.energy_resolution_constant
    sigma = np.sqrt(a * a * true_et + b * b * true_et * true_et)
    n = true_et.size
    measured = true_et + sigma * rng.standard_normal(n)
    measured += cfg.cell_noise_sigma * rng.standard_normal(n)
    passed = measured >= cfg.noise_threshold

    noise_keys, noise_et = _noise_cells(rng, muons.pt.size, keys, cfg)
    keys = np.concatenate((keys[passed], noise_keys))
    et = np.concatenate((measured[passed], noise_et))

    muon, code = np.divmod(keys, _CODES)
    order = np.lexsort((-et, muon))
    muon, code, et = muon[order], code[order], et[order]
    i, j = np.divmod(code, _SIDE)
    cells = {
        "eta": muons.eta[muon] + (i - _HALF) * CELL_DETA,
        "phi": _wrap_phi(muons.phi[muon] + (j - _HALF) * CELL_DPHI),
        "et": et,
    }
    counts: IntArray = np.bincount(muon, minlength=muons.pt.size).astype(np.int64)
    return counts, cells


# --------------------------------------------------------------------------------------------
# Blocks and layouts
# --------------------------------------------------------------------------------------------


def _simulate_block(seed: int, block: int, n_events: int, cfg: IsolationConfig) -> _Columns:
    """Simulate ``n_events`` events of block ``block`` (events from block·BLOCK_EVENTS on)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))
    mass, n_muon, muons = _draw_muons(rng, n_events, cfg)
    particles = _merge(
        _soft_particles(rng, muons.pt.size, cfg),
        _jet_particles(rng, muons, cfg),
        _fsr_photons(rng, muons, cfg),
    )
    iso = _isolation(muons, particles, cfg)
    n_cell, cells = _calorimeter(rng, muons, particles, cfg)
    muon_cols: dict[str, npt.NDArray[np.generic]] = {
        "pt": muons.pt.astype(np.float32),
        "eta": muons.eta.astype(np.float32),
        "phi": muons.phi.astype(np.float32),
        "charge": muons.charge.astype(np.int32),
        **{k: v.astype(np.float32) for k, v in iso.items()},
        "genPartFlav": muons.flav.astype(np.int32),
        "fromPair": muons.in_pair.astype(np.int32),
    }
    first = block * BLOCK_EVENTS
    return _Columns(
        event=np.arange(first, first + n_events, dtype=np.int64),
        mass=mass.astype(np.float32),
        n_muon=n_muon,
        muon=muon_cols,
        n_cell=n_cell,
        cell={k: v.astype(np.float32) for k, v in cells.items()},
    )


def _simulate_range(start: int, stop: int, seed: int, cfg: IsolationConfig) -> _Columns:
    """Simulate events ``start:stop`` of the sequence defined by ``seed``."""
    first_block, last_block = start // BLOCK_EVENTS, (stop - 1) // BLOCK_EVENTS
    parts = [
        _simulate_block(seed, k, BLOCK_EVENTS, cfg) for k in range(first_block, last_block + 1)
    ]
    offset = first_block * BLOCK_EVENTS
    return _concat(parts).slice_events(start - offset, stop - offset)


def _pair_columns(cols: _Columns) -> dict[str, npt.NDArray[np.generic]]:
    """Per event: the pair's charge product sign, its leading muon and the analysis selection.

    The pair is the two muons with ``fromPair`` (the soft third muon is not part of it); muons
    are sorted by pT, so the first pair muon of an event leads.
    """
    in_pair = cols.muon["fromPair"].astype(np.bool_)
    event_of_muon = np.repeat(np.arange(cols.event.size), cols.n_muon)[in_pair]
    pt = np.asarray(cols.muon["pt"], dtype=np.float64)[in_pair].reshape(-1, 2)
    eta = np.asarray(cols.muon["eta"], dtype=np.float64)[in_pair].reshape(-1, 2)
    charge = np.asarray(cols.muon["charge"], dtype=np.int64)[in_pair].reshape(-1, 2)
    if not np.array_equal(event_of_muon[::2], np.arange(cols.event.size)):
        raise AssertionError("every event must hold exactly two pair muons")
    passes = (np.abs(eta) < PAIR_MAX_ABS_ETA) & (pt > PAIR_MIN_PT)
    return {
        "dimuon_os": (charge[:, 0] * charge[:, 1] < 0).astype(np.int32),
        "dimuon_leadPt": pt[:, 0].astype(np.float32),
        "dimuon_leadEta": eta[:, 0].astype(np.float32),
        "dimuon_selected": passes.all(axis=1).astype(np.int32),
    }


def _training_layout(cols: _Columns) -> ak.Array:
    """One record per muon, with its cells (the flattening of the event layout)."""
    event_of_muon = np.repeat(np.arange(cols.event.size), cols.n_muon)
    fields_: dict[str, object] = {f"Muon_{k}": cols.muon[k] for k in _MUON_FIELDS}
    fields_["dimuon_mass"] = cols.mass[event_of_muon]
    fields_["event"] = cols.event[event_of_muon]
    fields_["nCaloCell"] = cols.n_cell.astype(np.int32)
    for k in _CELL_FIELDS:
        fields_[f"CaloCell_{k}"] = ak.unflatten(cols.cell[k], cols.n_cell)
    for k, v in _pair_columns(cols).items():
        fields_[k] = v[event_of_muon]
    return ak.Array(fields_)


def _event_layout(cols: _Columns) -> ak.Array:
    """One record per event, NanoAOD style (jagged Muon_* and CaloCell_* collections)."""
    first = np.concatenate(([0], np.cumsum(cols.n_muon)[:-1]))
    event_of_muon = np.repeat(np.arange(cols.event.size), cols.n_muon)
    index_in_event = np.arange(event_of_muon.size) - first[event_of_muon]
    cells_per_event = np.bincount(event_of_muon, weights=cols.n_cell, minlength=cols.event.size)
    cells_per_event = cells_per_event.astype(np.int64)
    fields_: dict[str, object] = {"nMuon": cols.n_muon.astype(np.int32)}
    for k in _MUON_FIELDS:
        fields_[f"Muon_{k}"] = ak.unflatten(cols.muon[k], cols.n_muon)
    fields_["nCaloCell"] = cells_per_event.astype(np.int32)
    for k in _CELL_FIELDS:
        fields_[f"CaloCell_{k}"] = ak.unflatten(cols.cell[k], cells_per_event)
    muon_idx = np.repeat(index_in_event, cols.n_cell).astype(np.int32)
    fields_["CaloCell_muonIdx"] = ak.unflatten(muon_idx, cells_per_event)
    fields_["dimuon_mass"] = cols.mass
    fields_["event"] = cols.event
    fields_.update(_pair_columns(cols))
    return ak.Array(fields_)


def _check_request(n_events: int) -> None:
    """Reject a non-positive number of events."""
    if n_events <= 0:
        raise ConfigError(f"n_events must be a positive integer, got {n_events}")


def simulate_isolation(
    n_events: int, *, seed: int, config: IsolationConfig = IsolationConfig()
) -> tuple[ak.Array, ak.Array]:
    """Return (training_layout, event_layout) awkward record arrays.

    The training layout has one record per muon (fields as the branches of the 'Muons' tree),
    the event layout one record per event (fields as the branches of the 'Events' tree); both
    hold the same muons in the same order, and match what uproot reads back from the files of
    :func:`write_isolation`.
    """
    _check_request(n_events)
    cols = _simulate_range(0, n_events, seed, config)
    return _training_layout(cols), _event_layout(cols)


# --------------------------------------------------------------------------------------------
# ROOT output
# --------------------------------------------------------------------------------------------


def write_isolation(
    out_dir: Path,
    n_events: int,
    *,
    seed: int,
    config: IsolationConfig = IsolationConfig(),
    events_per_file: int = 50_000,
) -> list[Path]:
    """Write ROOT files (uproot.recreate) into out_dir and return the written paths.

    For each chunk k of ``events_per_file`` events: ``isolation_muons_{k:03d}.root`` with the
    TTree 'Muons' (training layout) and ``isolation_events_{k:03d}.root`` with the TTree
    'Events' (analysis layout). Each file is written under a temporary name and then moved
    into place with :func:`os.replace`, so an interrupted run never leaves a truncated file.
    """
    _check_request(n_events)
    if events_per_file <= 0:
        raise ConfigError(f"events_per_file must be a positive integer, got {events_per_file}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k, start in enumerate(range(0, n_events, events_per_file)):
        stop = min(start + events_per_file, n_events)
        cols = _simulate_range(start, stop, seed, config)
        for name, tree, layout in (
            (f"isolation_muons_{k:03d}.root", MUON_TREE, _training_layout(cols)),
            (f"isolation_events_{k:03d}.root", EVENT_TREE, _event_layout(cols)),
        ):
            file_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"bsym-isolation/{seed}/{name}")
            written.append(
                write_tree(out_dir / name, tree, layout, counters=_COUNTERS, file_uuid=file_uuid)
            )
    return written
