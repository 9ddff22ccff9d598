"""Parameters of the toy isolation simulation, apart from the simulator so that the CLI can
show their defaults without importing numpy and awkward."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from bsym.settings import Settings

__all__ = ["IsolationConfig"]

Fraction = Annotated[float, Field(ge=0, le=1)]
Pair = tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


class IsolationConfig(Settings):
    """Parameters of the toy isolation simulation (energies in GeV); see
    :mod:`bsym.simulate.isolation` for what each one does."""

    pileup_mean: float = Field(default=50.0, ge=0)
    energy_resolution_stochastic: float = Field(default=0.5, ge=0)
    energy_resolution_constant: float = Field(default=0.03, ge=0)
    noise_threshold: float = Field(default=0.1, ge=0)
    prompt_fraction: Fraction = 0.5
    b_fraction: Fraction = 0.7
    third_muon_fraction: Fraction = 0.1
    mass_min: float = Field(default=70.0, gt=0)
    mass_max: float = Field(default=110.0, gt=0)
    z_mass: float = Field(default=91.1876, gt=0)
    z_width: float = Field(default=2.4952, gt=0)
    mass_resolution: float = Field(default=0.02, ge=0)
    continuum_scale: float = Field(default=30.0, gt=0)
    min_muon_pt: float = Field(default=20.0, gt=0)
    soft_muon_min_pt: float = Field(default=10.0, gt=0)
    soft_muon_pt_scale: float = Field(default=5.0, gt=0)
    recoil_pt_scale: float = Field(default=25.0, gt=0)
    recoil_pt_tail: float = Field(default=1.7, gt=0)
    nonprompt_pt_scale: float = Field(default=18.0, gt=0)
    nonprompt_pt_tail: float = Field(default=2.2, gt=0)
    tail_max_pt: float = Field(default=1500.0, gt=0)
    max_abs_eta: float = Field(default=2.4, gt=0)
    prompt_eta_width: float = Field(default=1.4, gt=0)
    nonprompt_eta_width: float = Field(default=1.1, gt=0)
    nonprompt_opposite_sign: Fraction = 0.7
    pileup_et_mean: float = Field(default=0.3, gt=0)
    underlying_event_fraction: Fraction = 0.015
    underlying_event_et_mean: float = Field(default=1.5, gt=0)
    prompt_jet_fraction: Fraction = 0.1
    prompt_jet_et_mean: float = Field(default=20.0, gt=0)
    charged_fraction: Fraction = 2.0 / 3.0
    photon_fraction: Fraction = 0.75
    track_pt_min: float = Field(default=0.5, ge=0)
    mip_et_mean: float = Field(default=1.8, gt=0)
    mip_shape: float = Field(default=4.0, gt=0)
    muon_fraction_beta_b: Pair = (2.0, 0.4)
    muon_fraction_beta_c: Pair = (2.0, 0.5)
    fragmentation_beta_b: Pair = (3.0, 0.4)
    fragmentation_beta_c: Pair = (2.5, 0.5)
    visible_fraction: Pair = (0.4, 0.9)
    fsr_fraction: Fraction = 0.1
    fsr_energy_fraction: float = Field(default=0.05, gt=0)
    fsr_angle: float = Field(default=0.03, gt=0)
    jet_multiplicity_min: float = Field(default=2.0, ge=0)
    jet_multiplicity_per_gev: float = Field(default=0.2, ge=0)
    jet_axis_spread: float = Field(default=0.15, gt=0)
    jet_core_width: float = Field(default=0.1, gt=0)
    cell_noise_sigma: float = Field(default=0.035, gt=0)

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> IsolationConfig:
        if not self.mass_min < self.mass_max:
            raise ValueError(f"mass_min ({self.mass_min}) must be below mass_max ({self.mass_max})")
        low, high = self.visible_fraction
        if low > high or high > 1:
            raise ValueError(
                "visible_fraction must be (low, high) with low <= high <= 1, "
                f"got {self.visible_fraction}"
            )
        return self
