"""Toy simulation of b, c and light jets with their tracks, for flavour tagging.

What makes flavour tagging work is here, in a few vectorised steps; the rest is left out.

Jets
    Each jet is b (``Jet_hadronFlavour`` 5), c (4) or light (0) with probabilities
    ``b_fraction``, ``c_fraction`` and the rest. pT follows a power law pT^-n on
    [``jet_pt_min``, ``jet_pt_max``] with a flavour's own index (b jets harder), η a normal
    distribution truncated to |η| < ``jet_eta_max`` with a flavour's own width (b jets more
    central), φ is uniform. ``Jet_weight`` is the ratio of the b-jet density to the jet's own
    flavour's density at its (pT, η), exactly (from the formulas, not histograms), so the
    weighted spectra of all flavours are the b-jet spectrum and the weights average 1 per
    flavour. Events hold 1 + min(Poisson(``extra_jets_mean``), 3) jets, sorted by pT.
Heavy hadrons
    b jets hold a B hadron (B⁺, B⁰, B_s, Λ_b in proportions 40/40/10/10 %) carrying a fraction
    x ~ Beta(``b_fragmentation``) of the jet momentum; c jets a charm hadron (D⁰, D⁺, D_s, Λ_c,
    56/24/10/10 %) with x ~ Beta(``c_fragmentation``). The hadron flies along the jet axis,
    tilted by a Rayleigh angle of scale ``hadron_angle``, a distance L = βγ·cτ·Exp(1) with
    βγ = p/m and the species' cτ (B: 441–491 µm, D: 61–312 µm). Every B decays to a charm
    hadron carrying a share ~ Beta(``d_from_b_share``) of its momentum (the b → c cascade),
    which flies on from the B vertex, plus 1 + Poisson(``b_decay_extra_tracks``) charged
    tracks; a charm hadron decays to 1 + Poisson(``d_decay_extra_tracks``) charged tracks.
Decay tracks
    The charged tracks of a decay share a fraction U(``decay_charged_share``) of what is left
    of the parent's momentum (Dirichlet(1) among them; the rest is neutrals and neutrinos)
    and leave it at an angle atan(kT/p) with kT Rayleigh of scale ``b_decay_kt`` or
    ``d_decay_kt``, about a uniform azimuth. So the impact parameter, about L·kT/p, is about
    cτ·kT/m whatever the boost: the lifetime signature.
Fragmentation
    Every jet has Poisson(``fragmentation_tracks`` + ``fragmentation_tracks_per_log_pt``·
    ln(pT/20 GeV)) prompt tracks sharing ``fragmentation_charged_share`` of the momentum the
    heavy hadron leaves (all of it in light jets), at angles atan(kT/p) with kT Rayleigh of
    scale ``fragmentation_kt`` about the axis. Independently of flavour, a jet holds a K0s
    (``k0s_fraction``; cτ 2.68 cm, two pions with p* = 206 MeV), a Λ (``lambda_fraction``; cτ
    7.89 cm, p π with p* = 101 MeV) or a photon conversion (``conversion_fraction``; e⁺e⁻ at
    the beam pipe or a pixel layer) of 5–30 % of the jet momentum: the long-lived light
    particles that keep light rejection finite.
Event
    Besides its jets' tracks an event holds Poisson(``unassociated_tracks``) prompt tracks
    that belong to no jet (as PFNano's PFCands hold the constituents of other collections), so
    the jet → JetPFCands → PFCands link is not the identity.
Detector
    Straight tracks (no magnetic field) from their production point; the primary vertex is at
    the origin. d0 and dz are those of the transverse point of closest approach, with CMS's
    sign convention (``pat::PackedCandidate::dxy``): d0 = −x·sin φ + y·cos φ, dz = z there.
    They are smeared with σ_d0 = ``d0_resolution_um`` ⊕ ``d0_scattering_um``/(pT·√sin θ) and
    σ_z0 = (``z0_resolution_um`` ⊕ ``z0_scattering_um``/(pT·√sin θ))/sin θ (µm, pT in GeV),
    times 1 + the pixel layers the track misses; a fraction ``tail_fraction`` of tracks is
    smeared ``tail_scale`` times wider than its recorded error (non-Gaussian tails). Recorded
    errors scatter by a log-normal of width ``error_spread``. pT is smeared by
    ``pt_resolution`` ⊕ ``pt_resolution_per_gev``·pT; the angles are exact. Tracks are kept
    with pT > ``track_pt_min``, |η| < ``track_eta_max``, ΔR(track, jet) < ``jet_radius``
    (jet tracks only) and produced inside ``tracker_radius_cm``. ``PFCands_lostInnerHits``
    uses CMS's encoding: −1 hit in the first pixel layer, 0 none lost but the first layer
    missed (probability 1 − ``first_layer_efficiency`` for prompt tracks), 1 one, 2 more
    layers lost (pixel layers inside the production radius, ``pixel_layers_cm``).
    ``PFCands_vx/vy/vz`` are the measured closest approach, (−d0·sin φ, d0·cos φ, dz).
Left out
    Neutral particles, the magnetic field and track curvature, vertex finding and the primary
    vertex's resolution, pile-up vertices, fake tracks, hadronic interactions, charge and
    momentum conservation in decays (decay products share momentum, they do not balance it),
    semileptonic decays and soft leptons, gluon splitting (g → bb̄) and jet energy response.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import numpy.typing as npt

from bsym.errors import ConfigError
from bsym.simulate.flavour_config import FlavourConfig
from bsym.simulate.rootwrite import tree_data, write_branches

__all__ = [
    "B_HADRONS",
    "C_HADRONS",
    "EVENT_TREE",
    "JET_TREE",
    "Hadron",
    "simulate_flavour",
    "write_flavour",
]

JET_TREE = "Jets"
EVENT_TREE = "Events"
CONFIG_KEY = "bsym/flavour"
PION_MASS = 0.13957
ORIGIN_PROMPT, ORIGIN_B, ORIGIN_C, ORIGIN_V0, ORIGIN_CONVERSION = 0, 1, 2, 3, 4

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Hadron:
    """A long-lived particle: PDG id (absolute), mass (GeV), cτ (cm), production share."""

    pdg_id: int
    mass: float
    ctau: float
    share: float


B_HADRONS = (
    Hadron(521, 5.27934, 0.04911, 0.4),
    Hadron(511, 5.27965, 0.04557, 0.4),
    Hadron(531, 5.36688, 0.04527, 0.1),
    Hadron(5122, 5.61960, 0.04410, 0.1),
)
C_HADRONS = (
    Hadron(421, 1.86484, 0.01229, 0.56),
    Hadron(411, 1.86966, 0.03118, 0.24),
    Hadron(431, 1.96835, 0.01499, 0.10),
    Hadron(4122, 2.28646, 0.00607, 0.10),
)
K0S = Hadron(310, 0.497611, 2.6844, 1.0)
LAMBDA = Hadron(3122, 1.115683, 7.89, 1.0)
K0S_PSTAR, LAMBDA_PSTAR = 0.206, 0.101
CONVERSION_RADII_CM = (2.2, 2.9, 6.8, 10.9)

_TRACK_FIELDS = (
    "pt",
    "eta",
    "phi",
    "mass",
    "charge",
    "pdgId",
    "d0",
    "d0Err",
    "dz",
    "dzErr",
    "lostInnerHits",
    "px",
    "py",
    "pz",
    "vx",
    "vy",
    "vz",
    "origin",
)
_INT_FIELDS = {"hadronFlavour", "charge", "pdgId", "lostInnerHits", "origin", "nTracks"}


@dataclass
class _Tracks:
    """Flat true tracks: owning jet (−1: none), event, 3-momentum, production point, kind."""

    jet: IntArray
    p: FloatArray  # [n, 3]
    vertex: FloatArray  # [n, 3]
    origin: IntArray
    pdg: IntArray  # absolute PDG id

    @staticmethod
    def concat(parts: list[_Tracks]) -> _Tracks:
        return _Tracks(
            np.concatenate([t.jet for t in parts]),
            np.concatenate([t.p for t in parts]),
            np.concatenate([t.vertex for t in parts]),
            np.concatenate([t.origin for t in parts]),
            np.concatenate([t.pdg for t in parts]),
        )


@dataclass
class _Jets:
    flavour: IntArray
    pt: FloatArray
    eta: FloatArray
    phi: FloatArray
    weight: FloatArray
    axis: FloatArray  # [n, 3] unit vectors
    truth: dict[str, FloatArray]


# --------------------------------------------------------------------------------------------
# Kinematics helpers
# --------------------------------------------------------------------------------------------


def _unit(eta: FloatArray, phi: FloatArray) -> FloatArray:
    cosh = np.cosh(eta)
    return np.stack([np.cos(phi) / cosh, np.sin(phi) / cosh, np.tanh(eta)], axis=1)


def _deflect(u: FloatArray, theta: FloatArray, azimuth: FloatArray) -> FloatArray:
    """Unit vectors at angle ``theta`` from the unit vectors ``u``, about azimuth ``azimuth``."""
    helper = np.zeros_like(u)
    helper[:, 2] = 1.0
    along_z = np.abs(u[:, 2]) > 0.9
    helper[along_z] = (1.0, 0.0, 0.0)
    e1 = np.cross(u, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(u, e1)
    sin = np.sin(theta)[:, None]
    deflected = (
        np.cos(theta)[:, None] * u
        + sin * np.cos(azimuth)[:, None] * e1
        + sin * np.sin(azimuth)[:, None] * e2
    )
    return np.asarray(deflected, dtype=np.float64)


def _species(rng: np.random.Generator, table: tuple[Hadron, ...], n: int) -> IntArray:
    shares = np.array([h.share for h in table])
    return rng.choice(len(table), size=n, p=shares / shares.sum()).astype(np.int64)


def _fly(
    rng: np.random.Generator, momentum: FloatArray, mass: FloatArray, ctau: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Flight vectors (cm) from exponential proper decay lengths, and βγ = p/m."""
    p = np.linalg.norm(momentum, axis=1)
    beta_gamma = p / mass
    length = beta_gamma * ctau * rng.exponential(size=p.size)
    return momentum / p[:, None] * length[:, None], beta_gamma


def _shares(rng: np.random.Generator, counts: IntArray) -> FloatArray:
    """Dirichlet(1, ..., 1) shares, flat, for groups of ``counts`` (each > 0)."""
    draws = rng.exponential(size=int(counts.sum()))
    group = np.repeat(np.arange(counts.size), counts)
    totals = np.bincount(group, weights=draws, minlength=counts.size)
    return np.asarray(draws / totals[group], dtype=np.float64)


def _decay(
    rng: np.random.Generator,
    jet: IntArray,
    momentum: FloatArray,
    vertex: FloatArray,
    counts: IntArray,
    kt_scale: float,
    charged_share: FloatArray,
    origin: int,
) -> _Tracks:
    """Charged tracks of the decays of parents (one row each) at ``vertex``: ``counts`` tracks
    sharing ``charged_share`` of the parent momentum, at angles atan(kT/p) about it."""
    group = np.repeat(np.arange(counts.size), counts)
    p_parent = np.linalg.norm(momentum, axis=1)
    p = _shares(rng, counts) * (charged_share * p_parent)[group]
    kt = rng.rayleigh(kt_scale, size=p.size)
    direction = _deflect(
        (momentum / p_parent[:, None])[group],
        np.arctan2(kt, p),
        rng.uniform(0, 2 * np.pi, size=p.size),
    )
    return _Tracks(
        jet[group],
        direction * p[:, None],
        vertex[group],
        np.full(p.size, origin, dtype=np.int64),
        np.full(p.size, 211, dtype=np.int64),
    )


def _two_body(
    rng: np.random.Generator,
    jet: IntArray,
    momentum: FloatArray,
    vertex: FloatArray,
    p_star: float,
    origin: int,
    pdg: tuple[int, int],
) -> _Tracks:
    """Both daughters of two-body decays, back to back about the parent direction."""
    n = momentum.shape[0]
    p_parent = np.linalg.norm(momentum, axis=1)
    u = momentum / p_parent[:, None]
    cos_star = rng.uniform(-1, 1, size=n)
    kt = p_star * np.sqrt(1 - cos_star**2)
    share = np.clip(0.5 * (1 + cos_star), 0.02, 0.98)
    azimuth = rng.uniform(0, 2 * np.pi, size=n)
    p = np.concatenate([share * p_parent, (1 - share) * p_parent])
    direction = _deflect(
        np.concatenate([u, u]),
        np.arctan2(np.concatenate([kt, kt]), p),
        np.concatenate([azimuth, azimuth + np.pi]),
    )
    return _Tracks(
        np.concatenate([jet, jet]),
        direction * p[:, None],
        np.concatenate([vertex, vertex]),
        np.full(2 * n, origin, dtype=np.int64),
        np.concatenate([np.full(n, pdg[0]), np.full(n, pdg[1])]).astype(np.int64),
    )


# --------------------------------------------------------------------------------------------
# Jets and their particles
# --------------------------------------------------------------------------------------------


def _power_law(rng: np.random.Generator, index: FloatArray, low: float, high: float) -> FloatArray:
    a = 1 - index
    u = rng.uniform(size=index.size)
    return np.asarray((low**a + u * (high**a - low**a)) ** (1 / a), dtype=np.float64)


def _power_law_density(x: FloatArray, index: FloatArray, low: float, high: float) -> FloatArray:
    a = 1 - index
    return np.asarray(a * x ** (-index) / (high**a - low**a), dtype=np.float64)


def _normal_density(x: FloatArray, width: FloatArray, cut: float) -> FloatArray:
    erf = {w: math.erf(cut / (w * math.sqrt(2))) for w in np.unique(width)}
    inside = np.vectorize(erf.__getitem__, otypes=[np.float64])(width)
    return np.asarray(
        np.exp(-0.5 * (x / width) ** 2) / (width * math.sqrt(2 * np.pi) * inside),
        dtype=np.float64,
    )


def _truncated_normal(rng: np.random.Generator, width: FloatArray, cut: float) -> FloatArray:
    values = rng.normal(size=width.size) * width
    bad = np.abs(values) >= cut
    while np.any(bad):
        values[bad] = rng.normal(size=int(bad.sum())) * width[bad]
        bad = np.abs(values) >= cut
    return values


def _draw_jets(rng: np.random.Generator, n: int, cfg: FlavourConfig) -> _Jets:
    u = rng.uniform(size=n)
    flavour = np.where(
        u < cfg.b_fraction, 5, np.where(u < cfg.b_fraction + cfg.c_fraction, 4, 0)
    ).astype(np.int64)
    index = {5: cfg.jet_pt_index_b, 4: cfg.jet_pt_index_c, 0: cfg.jet_pt_index_light}
    width = {5: cfg.jet_eta_width_b, 4: cfg.jet_eta_width_c, 0: cfg.jet_eta_width_light}
    n_index = np.vectorize(index.__getitem__, otypes=[np.float64])(flavour)
    eta_width = np.vectorize(width.__getitem__, otypes=[np.float64])(flavour)
    pt = _power_law(rng, n_index, cfg.jet_pt_min, cfg.jet_pt_max)
    eta = _truncated_normal(rng, eta_width, cfg.jet_eta_max)
    phi = rng.uniform(-np.pi, np.pi, size=n)
    b_index = np.full(n, cfg.jet_pt_index_b)
    b_width = np.full(n, cfg.jet_eta_width_b)
    weight = (
        _power_law_density(pt, b_index, cfg.jet_pt_min, cfg.jet_pt_max)
        * _normal_density(eta, b_width, cfg.jet_eta_max)
    ) / (
        _power_law_density(pt, n_index, cfg.jet_pt_min, cfg.jet_pt_max)
        * _normal_density(eta, eta_width, cfg.jet_eta_max)
    )
    truth = {
        f"{prefix}{field}": np.zeros(n)
        for prefix in ("hadron", "cascade")
        for field in ("Id", "Flight", "BetaGamma")
    }
    return _Jets(flavour, pt, eta, phi, weight, _unit(eta, phi), truth)


def _heavy_decays(
    rng: np.random.Generator, jets: _Jets, cfg: FlavourConfig
) -> tuple[list[_Tracks], FloatArray]:
    """Decay tracks of the b and c hadrons, and each jet's momentum fraction left to
    fragmentation."""
    n = jets.pt.size
    p_jet = jets.pt * np.cosh(jets.eta)
    left = np.ones(n)
    tracks: list[_Tracks] = []
    charged = cfg.decay_charged_share

    def hadron_momentum(rows: IntArray, x: FloatArray) -> FloatArray:
        angle = rng.rayleigh(cfg.hadron_angle, size=rows.size) if cfg.hadron_angle > 0 else 0
        direction = _deflect(
            jets.axis[rows],
            np.broadcast_to(angle, rows.shape),
            rng.uniform(0, 2 * np.pi, rows.size),
        )
        return np.asarray(direction * (x * p_jet[rows])[:, None], dtype=np.float64)

    def record(
        prefix: str,
        rows: IntArray,
        kind: IntArray,
        table: tuple[Hadron, ...],
        flight: FloatArray,
        beta_gamma: FloatArray,
    ) -> None:
        jets.truth[f"{prefix}Id"][rows] = np.array([h.pdg_id for h in table])[kind]
        jets.truth[f"{prefix}Flight"][rows] = np.linalg.norm(flight, axis=1)
        jets.truth[f"{prefix}BetaGamma"][rows] = beta_gamma

    def charm(rows: IntArray, momentum: FloatArray, origin_vertex: FloatArray, prefix: str) -> None:
        kind = _species(rng, C_HADRONS, rows.size)
        mass = np.array([h.mass for h in C_HADRONS])[kind]
        ctau = np.array([h.ctau for h in C_HADRONS])[kind]
        flight, beta_gamma = _fly(rng, momentum, mass, ctau)
        record(prefix, rows, kind, C_HADRONS, flight, beta_gamma)
        counts = 1 + rng.poisson(cfg.d_decay_extra_tracks, size=rows.size)
        share = rng.uniform(*charged, size=rows.size)
        tracks.append(
            _decay(
                rng, rows, momentum, origin_vertex + flight, counts, cfg.d_decay_kt, share, ORIGIN_C
            )
        )

    b_rows = np.flatnonzero(jets.flavour == 5)
    if b_rows.size:
        x = rng.beta(*cfg.b_fragmentation, size=b_rows.size)
        left[b_rows] -= x
        momentum = hadron_momentum(b_rows, x)
        kind = _species(rng, B_HADRONS, b_rows.size)
        mass = np.array([h.mass for h in B_HADRONS])[kind]
        ctau = np.array([h.ctau for h in B_HADRONS])[kind]
        flight, beta_gamma = _fly(rng, momentum, mass, ctau)
        record("hadron", b_rows, kind, B_HADRONS, flight, beta_gamma)
        d_share = rng.beta(*cfg.d_from_b_share, size=b_rows.size)
        p_b = np.linalg.norm(momentum, axis=1)
        kt = rng.rayleigh(cfg.b_decay_kt, size=b_rows.size)
        d_direction = _deflect(
            momentum / p_b[:, None],
            np.arctan2(kt, d_share * p_b),
            rng.uniform(0, 2 * np.pi, size=b_rows.size),
        )
        charm(b_rows, d_direction * (d_share * p_b)[:, None], flight, "cascade")
        counts = 1 + rng.poisson(cfg.b_decay_extra_tracks, size=b_rows.size)
        share = rng.uniform(*charged, size=b_rows.size) * (1 - d_share)
        tracks.append(
            _decay(rng, b_rows, momentum, flight, counts, cfg.b_decay_kt, share, ORIGIN_B)
        )
    c_rows = np.flatnonzero(jets.flavour == 4)
    if c_rows.size:
        x = rng.beta(*cfg.c_fragmentation, size=c_rows.size)
        left[c_rows] -= x
        charm(c_rows, hadron_momentum(c_rows, x), np.zeros((c_rows.size, 3)), "hadron")
    return tracks, left


def _long_lived(rng: np.random.Generator, jets: _Jets, cfg: FlavourConfig) -> list[_Tracks]:
    """K0s, Λ and photon conversions, in jets of every flavour."""
    n = jets.pt.size
    p_jet = jets.pt * np.cosh(jets.eta)
    tracks = []
    for fraction, particle, p_star, pdg in (
        (cfg.k0s_fraction, K0S, K0S_PSTAR, (211, 211)),
        (cfg.lambda_fraction, LAMBDA, LAMBDA_PSTAR, (2212, 211)),
    ):
        rows = np.flatnonzero(rng.uniform(size=n) < fraction)
        momentum = _soft_parent(rng, jets, rows, p_jet)
        flight, _ = _fly(
            rng, momentum, np.full(rows.size, particle.mass), np.full(rows.size, particle.ctau)
        )
        tracks.append(_two_body(rng, rows, momentum, flight, p_star, ORIGIN_V0, pdg))
    rows = np.flatnonzero(rng.uniform(size=n) < cfg.conversion_fraction)
    momentum = _soft_parent(rng, jets, rows, p_jet)
    radius = rng.choice(np.array(CONVERSION_RADII_CM), size=rows.size)
    direction = momentum / np.linalg.norm(momentum, axis=1, keepdims=True)
    vertex = direction * (radius / np.hypot(direction[:, 0], direction[:, 1]))[:, None]
    tracks.append(_two_body(rng, rows, momentum, vertex, 0.002, ORIGIN_CONVERSION, (11, 11)))
    return tracks


def _soft_parent(
    rng: np.random.Generator, jets: _Jets, rows: IntArray, p_jet: FloatArray
) -> FloatArray:
    p = rng.uniform(0.05, 0.3, size=rows.size) * p_jet[rows]
    kt = rng.rayleigh(0.4, size=rows.size)
    direction = _deflect(jets.axis[rows], np.arctan2(kt, p), rng.uniform(0, 2 * np.pi, rows.size))
    return np.asarray(direction * p[:, None], dtype=np.float64)


def _fragmentation(
    rng: np.random.Generator, jets: _Jets, left: FloatArray, cfg: FlavourConfig
) -> _Tracks:
    mean = cfg.fragmentation_tracks + cfg.fragmentation_tracks_per_log_pt * np.log(jets.pt / 20)
    counts = rng.poisson(np.maximum(mean, 0.1)).astype(np.int64)
    momentum = jets.axis * (jets.pt * np.cosh(jets.eta) * left)[:, None]
    has = counts > 0
    rows = np.flatnonzero(has)
    share = np.full(rows.size, cfg.fragmentation_charged_share)
    tracks = _decay(
        rng,
        rows,
        momentum[rows],
        np.zeros((rows.size, 3)),
        counts[rows],
        cfg.fragmentation_kt,
        share,
        ORIGIN_PROMPT,
    )
    return tracks


def _unassociated(
    rng: np.random.Generator, n_events: int, cfg: FlavourConfig
) -> tuple[_Tracks, IntArray]:
    counts = rng.poisson(cfg.unassociated_tracks, size=n_events).astype(np.int64)
    total = int(counts.sum())
    pt = cfg.track_pt_min + rng.exponential(1.0, size=total)
    eta = rng.uniform(-cfg.track_eta_max, cfg.track_eta_max, size=total)
    phi = rng.uniform(-np.pi, np.pi, size=total)
    p = _unit(eta, phi) * (pt * np.cosh(eta))[:, None]
    tracks = _Tracks(
        np.full(total, -1, dtype=np.int64),
        p,
        np.zeros((total, 3)),
        np.full(total, ORIGIN_PROMPT, dtype=np.int64),
        np.full(total, 211, dtype=np.int64),
    )
    return tracks, np.repeat(np.arange(n_events), counts)


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------


def _measure(
    rng: np.random.Generator, tracks: _Tracks, cfg: FlavourConfig
) -> dict[str, FloatArray]:
    """Track parameters as measured: smeared pT and impact parameters, hits, PCA."""
    n = tracks.jet.size
    px, py, pz = tracks.p.T
    pt_true = np.hypot(px, py)
    phi = np.arctan2(py, px)
    eta = np.arcsinh(pz / pt_true)
    sin_theta = 1 / np.cosh(eta)
    x, y, z = tracks.vertex.T
    # straight line X(s) = V + s·p/pT; its transverse closest approach to the origin
    step = -(x * np.cos(phi) + y * np.sin(phi))
    pca_x, pca_y = x + step * np.cos(phi), y + step * np.sin(phi)
    pca_z = z + step * pz / pt_true
    d0_true = -pca_x * np.sin(phi) + pca_y * np.cos(phi)

    radius = np.hypot(x, y)
    missed = np.searchsorted(np.array(cfg.pixel_layers_cm), radius, side="left").astype(np.int64)
    lost = np.minimum(missed, 2)
    first_missed = (missed == 0) & (rng.uniform(size=n) > cfg.first_layer_efficiency)
    lost = np.where(missed == 0, np.where(first_missed, 0, -1), lost)

    pt_scale = pt_true * np.sqrt(sin_theta)
    degrade = 1.0 + missed
    sigma_d0 = np.hypot(cfg.d0_resolution_um, cfg.d0_scattering_um / pt_scale) * degrade * 1e-4
    sigma_dz = (
        np.hypot(cfg.z0_resolution_um, cfg.z0_scattering_um / pt_scale) / sin_theta * degrade * 1e-4
    )
    tail = np.where(rng.uniform(size=n) < cfg.tail_fraction, cfg.tail_scale, 1.0)
    d0 = d0_true + sigma_d0 * tail * rng.normal(size=n)
    dz = pca_z + sigma_dz * tail * rng.normal(size=n)
    spread = cfg.error_spread
    pt = pt_true * (
        1 + np.hypot(cfg.pt_resolution, cfg.pt_resolution_per_gev * pt_true) * rng.normal(size=n)
    )
    pt = np.abs(pt)
    charge = rng.choice(np.array([-1, 1]), size=n)
    mass = np.where(tracks.pdg == 11, 0.000511, np.where(tracks.pdg == 2212, 0.938272, PION_MASS))
    return {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": mass,
        "charge": charge.astype(np.float64),
        "pdgId": (charge * tracks.pdg * np.where(tracks.pdg == 11, -1, 1)).astype(np.float64),
        "d0": d0,
        "d0Err": sigma_d0 * np.exp(spread * rng.normal(size=n)),
        "dz": dz,
        "dzErr": sigma_dz * np.exp(spread * rng.normal(size=n)),
        "lostInnerHits": lost.astype(np.float64),
        "px": pt * np.cos(phi),
        "py": pt * np.sin(phi),
        "pz": pt * np.sinh(eta),
        "vx": -d0 * np.sin(phi),
        "vy": d0 * np.cos(phi),
        "vz": dz,
        "origin": tracks.origin.astype(np.float64),
        "radius": radius,
        "z": z,
    }


# --------------------------------------------------------------------------------------------
# Blocks and layouts
# --------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    jets: dict[str, FloatArray]
    event_of_jet: IntArray
    n_events: int
    tracks: dict[str, FloatArray]
    track_jet: IntArray
    track_event: IntArray


def _event_sizes(rng: np.random.Generator, n_jets: int, cfg: FlavourConfig) -> IntArray:
    sizes = 1 + np.minimum(rng.poisson(cfg.extra_jets_mean, size=n_jets), 3)
    ends = np.cumsum(sizes)
    n_events = int(np.searchsorted(ends, n_jets, side="left")) + 1
    sizes = sizes[:n_events].astype(np.int64)
    sizes[-1] -= int(ends[n_events - 1]) - n_jets
    return sizes


def _simulate_block(seed: int, block: int, n_jets: int, cfg: FlavourConfig) -> _Sample:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(block,)))
    sizes = _event_sizes(rng, n_jets, cfg)
    event_of_jet = np.repeat(np.arange(sizes.size), sizes)
    jets = _draw_jets(rng, n_jets, cfg)
    order = np.lexsort((-jets.pt, event_of_jet))
    jets = _Jets(
        jets.flavour[order],
        jets.pt[order],
        jets.eta[order],
        jets.phi[order],
        jets.weight[order],
        jets.axis[order],
        jets.truth,
    )
    heavy, left = _heavy_decays(rng, jets, cfg)
    jet_tracks = _Tracks.concat(
        [*heavy, *_long_lived(rng, jets, cfg), _fragmentation(rng, jets, left, cfg)]
    )
    loose, loose_event = _unassociated(rng, sizes.size, cfg)
    tracks = _Tracks.concat([jet_tracks, loose])
    track_event = np.concatenate([event_of_jet[jet_tracks.jet], loose_event])
    measured = _measure(rng, tracks, cfg)

    keep = (
        (measured["pt"] > cfg.track_pt_min)
        & (np.abs(measured["eta"]) < cfg.track_eta_max)
        & (measured["radius"] < cfg.tracker_radius_cm)
        & (np.abs(measured["z"]) < 2 * cfg.tracker_radius_cm)
    )
    in_jet = tracks.jet >= 0
    owner = np.where(in_jet, tracks.jet, 0)
    d_phi = (measured["phi"] - jets.phi[owner] + np.pi) % (2 * np.pi) - np.pi
    delta_r = np.hypot(measured["eta"] - jets.eta[owner], d_phi)
    keep &= ~in_jet | (delta_r < cfg.jet_radius)
    measured = {k: v[keep] for k, v in measured.items()}
    track_jet = tracks.jet[keep]
    track_event = track_event[keep]

    n_tracks = np.bincount(track_jet[track_jet >= 0], minlength=n_jets)
    jet_columns = _jet_columns(jets, measured, track_jet, n_tracks)
    return _Sample(jet_columns, event_of_jet, sizes.size, measured, track_jet, track_event)


def _jet_columns(
    jets: _Jets, tracks: dict[str, FloatArray], track_jet: IntArray, n_tracks: IntArray
) -> dict[str, FloatArray]:
    """Jet branches; the mass is the charged tracks' mass scaled to the jet momentum."""
    n = jets.pt.size
    associated = track_jet >= 0
    owner = track_jet[associated]
    energy = np.sqrt(
        tracks["px"] ** 2 + tracks["py"] ** 2 + tracks["pz"] ** 2 + tracks["mass"] ** 2
    )[associated]
    sums = [
        np.bincount(owner, weights=tracks[k][associated], minlength=n) for k in ("px", "py", "pz")
    ]
    total_e = np.bincount(owner, weights=energy, minlength=n)
    p_charged = np.sqrt(sum(s**2 for s in sums))
    m_charged = np.sqrt(np.maximum(total_e**2 - p_charged**2, 0))
    p_jet = jets.pt * np.cosh(jets.eta)
    mass = np.where(p_charged > 0, m_charged * p_jet / np.maximum(p_charged, 1e-9), 0.0)
    return {
        "pt": jets.pt,
        "eta": jets.eta,
        "phi": jets.phi,
        "mass": mass,
        "px": jets.pt * np.cos(jets.phi),
        "py": jets.pt * np.sin(jets.phi),
        "pz": jets.pt * np.sinh(jets.eta),
        "hadronFlavour": jets.flavour.astype(np.float64),
        "weight": jets.weight,
        "nTracks": n_tracks.astype(np.float64),
        **jets.truth,
    }


def _column(name: str, values: FloatArray) -> npt.NDArray[np.generic]:
    return (
        values.astype(np.int32)
        if name in _INT_FIELDS or name.endswith("Id")
        else values.astype(np.float32)
    )


def _training_layout(sample: _Sample) -> ak.Array:
    """One record per jet, with its tracks (pT-descending)."""
    associated = np.flatnonzero(sample.track_jet >= 0)
    order = associated[np.lexsort((-sample.tracks["pt"][associated], sample.track_jet[associated]))]
    counts = np.bincount(sample.track_jet[order], minlength=sample.event_of_jet.size)
    fields: dict[str, object] = {f"Jet_{k}": _column(k, v) for k, v in sample.jets.items()}
    fields["nPFCands"] = counts.astype(np.int32)
    for k in _TRACK_FIELDS:
        fields[f"PFCands_{k}"] = ak.unflatten(_column(k, sample.tracks[k][order]), counts)
    return ak.Array(fields)


def _event_layout(sample: _Sample) -> ak.Array:
    """One record per event, PFNano style: Jet_*, PFCands_*, and the JetPFCands links."""
    n_events = sample.n_events
    jets_per_event = np.bincount(sample.event_of_jet, minlength=n_events)
    first_jet = np.concatenate(([0], np.cumsum(jets_per_event)[:-1]))
    pt = sample.tracks["pt"]
    by_event = np.lexsort((-pt, sample.track_event))
    tracks_per_event = np.bincount(sample.track_event, minlength=n_events)
    first_track = np.concatenate(([0], np.cumsum(tracks_per_event)[:-1]))
    position = np.empty_like(by_event)
    position[by_event] = np.arange(by_event.size) - first_track[sample.track_event[by_event]]

    fields: dict[str, object] = {"nJet": jets_per_event.astype(np.int32)}
    for k, v in sample.jets.items():
        fields[f"Jet_{k}"] = ak.unflatten(_column(k, v), jets_per_event)
    fields["nPFCands"] = tracks_per_event.astype(np.int32)
    for k in _TRACK_FIELDS:
        fields[f"PFCands_{k}"] = ak.unflatten(
            _column(k, sample.tracks[k][by_event]), tracks_per_event
        )
    associated = np.flatnonzero(sample.track_jet >= 0)
    links = associated[np.lexsort((-pt[associated], sample.track_jet[associated]))]
    link_event = sample.track_event[links]
    links_per_event = np.bincount(link_event, minlength=n_events)
    jet_idx = sample.track_jet[links] - first_jet[link_event]
    fields["nJetPFCands"] = links_per_event.astype(np.int32)
    fields["JetPFCands_jetIdx"] = ak.unflatten(jet_idx.astype(np.int32), links_per_event)
    fields["JetPFCands_pFCandsIdx"] = ak.unflatten(
        position[links].astype(np.int32), links_per_event
    )
    return ak.Array(fields)


_COUNTERS = ("nJet", "nPFCands", "nJetPFCands")


def _check_request(n_jets: int) -> None:
    if n_jets <= 0:
        raise ConfigError(f"n_jets must be a positive integer, got {n_jets}")


def simulate_flavour(
    n_jets: int, *, seed: int, config: FlavourConfig | None = None
) -> tuple[ak.Array, ak.Array]:
    """Return (training_layout, event_layout) record arrays of the same ``n_jets`` jets, with
    the fields of the 'Jets' and 'Events' trees of :func:`write_flavour`."""
    _check_request(n_jets)
    sample = _simulate_block(seed, 0, n_jets, config or FlavourConfig())
    return _training_layout(sample), _event_layout(sample)


def write_flavour(
    out_dir: Path,
    n_jets: int,
    *,
    seed: int = 1,
    config: FlavourConfig | None = None,
    jets_per_file: int = 100_000,
) -> list[Path]:
    """Write ``flavour_jets_{k:03d}.root`` (TTree 'Jets', one entry per jet) and
    ``flavour_events_{k:03d}.root`` (TTree 'Events', PFNano layout) for each chunk k of
    ``jets_per_file`` jets, atomically; return the paths. Chunk k is drawn from the seed
    sequence (seed, k), so the jets depend on ``jets_per_file``."""
    _check_request(n_jets)
    if jets_per_file <= 0:
        raise ConfigError(f"jets_per_file must be a positive integer, got {jets_per_file}")
    config = config or FlavourConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    strings = {CONFIG_KEY: config.model_dump_json()}
    written: list[Path] = []
    for k, start in enumerate(range(0, n_jets, jets_per_file)):
        sample = _simulate_block(seed, k, min(jets_per_file, n_jets - start), config)
        for name, tree, layout in (
            (f"flavour_jets_{k:03d}.root", JET_TREE, _training_layout(sample)),
            (f"flavour_events_{k:03d}.root", EVENT_TREE, _event_layout(sample)),
        ):
            file_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"bsym-flavour/{seed}/{name}")
            written.append(
                write_branches(
                    out_dir / name,
                    tree,
                    tree_data(layout, _COUNTERS),
                    file_uuid=file_uuid,
                    strings=strings,
                )
            )
    return written
