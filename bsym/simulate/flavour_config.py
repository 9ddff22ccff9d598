"""Parameters of the toy flavour-tagging simulation, apart from the simulator so that the CLI
can show their defaults without importing numpy and awkward."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from bsym.settings import Settings

__all__ = ["FlavourConfig"]

Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


class FlavourConfig(Settings):
    """Parameters of the toy b/c/light jet simulation (GeV, cm, µm where the name says so);
    see :mod:`bsym.simulate.flavour` for what each one does."""

    b_fraction: Fraction = 1 / 3
    c_fraction: Fraction = 1 / 3
    jet_pt_min: Positive = 20.0
    jet_pt_max: Positive = 1000.0
    jet_pt_index_b: Positive = 2.6
    jet_pt_index_c: Positive = 2.9
    jet_pt_index_light: Positive = 3.2
    jet_eta_max: Positive = 2.5
    jet_eta_width_b: Positive = 1.2
    jet_eta_width_c: Positive = 1.4
    jet_eta_width_light: Positive = 1.7
    extra_jets_mean: float = Field(default=1.0, ge=0)
    b_fragmentation: tuple[Positive, Positive] = (8.0, 2.5)
    c_fragmentation: tuple[Positive, Positive] = (4.0, 3.0)
    d_from_b_share: tuple[Positive, Positive] = (6.0, 4.0)
    hadron_angle: float = Field(default=0.02, ge=0)
    b_decay_extra_tracks: float = Field(default=1.3, ge=0)
    d_decay_extra_tracks: float = Field(default=1.2, ge=0)
    b_decay_kt: Positive = 1.0
    d_decay_kt: Positive = 0.6
    decay_charged_share: tuple[Fraction, Fraction] = (0.5, 0.9)
    fragmentation_tracks: float = Field(default=10.0, ge=0)
    fragmentation_tracks_per_log_pt: float = Field(default=5.0, ge=0)
    fragmentation_charged_share: Fraction = 0.6
    fragmentation_kt: Positive = 0.3
    k0s_fraction: Fraction = 0.10
    lambda_fraction: Fraction = 0.03
    conversion_fraction: Fraction = 0.05
    unassociated_tracks: float = Field(default=5.0, ge=0)
    track_pt_min: Positive = 0.5
    track_eta_max: Positive = 2.5
    jet_radius: Positive = 0.4
    d0_resolution_um: Positive = 15.0
    d0_scattering_um: Positive = 80.0
    z0_resolution_um: Positive = 30.0
    z0_scattering_um: Positive = 100.0
    pt_resolution: float = Field(default=0.01, ge=0)
    pt_resolution_per_gev: float = Field(default=1.5e-4, ge=0)
    error_spread: float = Field(default=0.05, ge=0)
    tail_fraction: Fraction = 0.02
    tail_scale: Positive = 4.0
    first_layer_efficiency: Fraction = 0.9
    pixel_layers_cm: tuple[Positive, ...] = (2.9, 6.8, 10.9, 16.0)
    tracker_radius_cm: Positive = 30.0

    @model_validator(mode="after")
    def _consistent(self) -> FlavourConfig:
        if self.b_fraction + self.c_fraction > 1:
            raise ValueError("b_fraction + c_fraction must not exceed 1")
        if self.jet_pt_min >= self.jet_pt_max:
            raise ValueError("jet_pt_min must be below jet_pt_max")
        low, high = self.decay_charged_share
        if low > high:
            raise ValueError("decay_charged_share must be (low, high) with low <= high")
        if list(self.pixel_layers_cm) != sorted(self.pixel_layers_cm):
            raise ValueError("pixel_layers_cm must be increasing")
        return self
