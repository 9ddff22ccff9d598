"""The toy's NanoAOD-named isolation follows NanoAOD's definition and lands in CMS's ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bsym.simulate import simulate_isolation, write_isolation
from bsym.simulate.isolation import (
    PF_CHARGED_PU,
    PF_CHARGED_PV,
    PF_NEUTRAL_HADRON,
    PF_PHOTON,
    delta_beta_isolation,
)
from bsym.simulate.isolation_check import (
    CMS_PROMPT,
    MuonSummary,
    format_table,
    read_muons,
    summarise,
)
from bsym.simulate.isolation_config import IsolationConfig

N_EVENTS = 4_000


@pytest.fixture(scope="module")
def summaries() -> dict[str, MuonSummary]:
    training, _ = simulate_isolation(N_EVENTS, seed=11)
    rows = summarise(
        "toy",
        training.Muon_pt.to_numpy(),
        training.Muon_pfRelIso04_all.to_numpy(),
        training.Muon_genPartFlav.to_numpy(),
    )
    return {r.muon_class: r for r in rows}


def test_delta_beta_from_hand_made_particles() -> None:
    # Muon 0: a charged PV hadron (counted without threshold, even inside the veto cone), a
    # photon and a neutral hadron (counted), a soft photon (below 0.5 GeV) and a photon in the
    # veto cone (both left out), a pile-up hadron (half subtracted), one particle outside the
    # cone. Muon 1: pile-up outweighs the neutrals, so the correction clips at 0.
    muon = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    kind = np.array(
        [
            PF_CHARGED_PV,
            PF_CHARGED_PV,
            PF_PHOTON,
            PF_NEUTRAL_HADRON,
            PF_PHOTON,
            PF_PHOTON,
            PF_CHARGED_PU,
            PF_NEUTRAL_HADRON,
            PF_PHOTON,
            PF_CHARGED_PU,
            PF_CHARGED_PV,
        ]
    )
    et = np.array([2.0, 0.2, 3.0, 1.5, 0.4, 5.0, 2.0, 9.0, 1.0, 6.0, 0.5])
    dr = np.array([0.1, 0.005, 0.2, 0.35, 0.1, 0.005, 0.25, 0.45, 0.1, 0.2, 0.38])
    pt = np.array([50.0, 25.0])
    all04, chg04 = delta_beta_isolation(muon, kind, et, dr, pt, 0.4)
    assert all04 == pytest.approx([(2.2 + (3.0 + 1.5 - 0.5 * 2.0)) / 50.0, 0.5 / 25.0])
    assert chg04 == pytest.approx([2.2 / 50.0, 0.5 / 25.0])
    all03, chg03 = delta_beta_isolation(muon, kind, et, dr, pt, 0.3)
    assert all03 == pytest.approx([(2.2 + (3.0 - 0.5 * 2.0)) / 50.0, 0.0])
    assert chg03 == pytest.approx([2.2 / 50.0, 0.0])


def test_prompt_isolation_in_cms_ranges(summaries: dict[str, MuonSummary]) -> None:
    prompt = summaries["prompt"]
    assert prompt.muons > 3_500
    low, high = CMS_PROMPT["median"]
    assert low <= prompt.median_iso <= high
    low, high = CMS_PROMPT["zero"]
    assert low <= prompt.zero_iso <= high
    low, high = CMS_PROMPT["tight"]
    assert low <= prompt.tight_iso <= high


def test_pt_reaches_hundreds_of_gev(summaries: dict[str, MuonSummary]) -> None:
    for muon_class in ("prompt", "non-prompt (b, c)"):
        p50, _, p99 = summaries[muon_class].pt_percentiles
        assert p99 > 100.0, muon_class
        assert p50 < 50.0, muon_class


def test_pt_tails_stop_at_their_maximum() -> None:
    """The Lomax tails are truncated: untruncated, 20,000 events reach 12 TeV."""
    config = IsolationConfig()
    training, _ = simulate_isolation(20_000, seed=3)
    pt = training.Muon_pt.to_numpy()
    assert np.percentile(pt, 99.9) > 300.0
    assert pt.max() < config.tail_max_pt + config.mass_max


def test_nonprompt_muons_are_not_isolated(summaries: dict[str, MuonSummary]) -> None:
    nonprompt = summaries["non-prompt (b, c)"]
    assert nonprompt.median_iso > 0.15
    assert nonprompt.tight_iso < 0.5


def test_table_from_files(tmp_path: Path) -> None:
    paths = write_isolation(tmp_path, 300, seed=2)
    for path in paths:
        pt, iso, flav = read_muons(path)
        assert pt.size == iso.size == flav.size > 600
    table = format_table(summarise("toy", pt, iso, flav))
    assert "| CMS NanoAOD simulation |" in table
    assert "| toy |" in table and "| prompt |" in table
