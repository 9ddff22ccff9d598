"""Parameters of the toy isolation simulation, apart from the simulator so that the CLI can
show their defaults without importing numpy and awkward."""

from __future__ import annotations

from dataclasses import dataclass, fields

from bsym.errors import ConfigError

__all__ = ["IsolationConfig"]


@dataclass(frozen=True)
class IsolationConfig:
    """Parameters of the toy isolation simulation (energies in GeV); see
    :mod:`bsym.simulate.isolation` for what each one does."""

    pileup_mean: float = 50.0
    energy_resolution_stochastic: float = 0.5
    energy_resolution_constant: float = 0.03
    noise_threshold: float = 0.1
    prompt_fraction: float = 0.5
    b_fraction: float = 0.7
    third_muon_fraction: float = 0.1
    mass_min: float = 70.0
    mass_max: float = 110.0
    z_mass: float = 91.1876
    z_width: float = 2.4952
    mass_resolution: float = 0.02
    continuum_scale: float = 30.0
    min_muon_pt: float = 20.0
    soft_muon_min_pt: float = 10.0
    soft_muon_pt_scale: float = 5.0
    prompt_pt_smearing: float = 5.0
    nonprompt_pt_scale: float = 12.0
    max_abs_eta: float = 2.4
    prompt_eta_width: float = 1.4
    nonprompt_eta_width: float = 1.1
    nonprompt_opposite_sign: float = 0.7
    pileup_et_mean: float = 0.3
    underlying_event_fraction: float = 0.17
    charged_fraction: float = 2.0 / 3.0
    track_pt_min: float = 0.5
    mip_et_mean: float = 1.8
    mip_shape: float = 4.0
    muon_fraction_beta_b: tuple[float, float] = (2.0, 0.4)
    muon_fraction_beta_c: tuple[float, float] = (2.0, 0.5)
    fragmentation_beta_b: tuple[float, float] = (3.0, 0.4)
    fragmentation_beta_c: tuple[float, float] = (2.5, 0.5)
    visible_fraction: tuple[float, float] = (0.4, 0.9)
    fsr_fraction: float = 0.1
    fsr_energy_fraction: float = 0.05
    fsr_angle: float = 0.03
    jet_multiplicity_min: float = 2.0
    jet_multiplicity_per_gev: float = 0.2
    jet_axis_spread: float = 0.15
    jet_core_width: float = 0.1
    cell_noise_sigma: float = 0.035

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: IsolationConfig) -> None:
    """Raise :class:`ConfigError` for values that would make the simulation meaningless."""
    fractions = (
        "prompt_fraction",
        "b_fraction",
        "third_muon_fraction",
        "fsr_fraction",
        "nonprompt_opposite_sign",
        "underlying_event_fraction",
        "charged_fraction",
    )
    for name in fractions:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"IsolationConfig.{name} must be in [0, 1], got {value}")
    non_negative = {
        "pileup_mean",
        "noise_threshold",
        "energy_resolution_stochastic",
        "energy_resolution_constant",
        "mass_resolution",
        "track_pt_min",
        "jet_multiplicity_min",
        "jet_multiplicity_per_gev",
    }
    for field in fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, tuple):
            if len(value) != 2 or not all(v > 0 for v in value):
                raise ConfigError(
                    f"IsolationConfig.{field.name} must be two positive numbers, got {value}"
                )
        elif field.name in non_negative:
            if value < 0:
                raise ConfigError(f"IsolationConfig.{field.name} must be >= 0, got {value}")
        elif field.name not in fractions and value <= 0:
            raise ConfigError(f"IsolationConfig.{field.name} must be > 0, got {value}")
    if not cfg.mass_min < cfg.mass_max:
        raise ConfigError(
            f"IsolationConfig.mass_min ({cfg.mass_min}) must be below mass_max ({cfg.mass_max})"
        )
    if cfg.visible_fraction[0] > cfg.visible_fraction[1] or cfg.visible_fraction[1] > 1:
        raise ConfigError(
            f"IsolationConfig.visible_fraction must be (low, high) with low <= high <= 1, "
            f"got {cfg.visible_fraction}"
        )
