"""Simulated muon isolation and pT against CMS NanoAOD: the numbers docs/papers.md records.

    .venv/bin/python -m bsym.simulate.isolation_check [--events 20000] [--seed 1] [FILE ...]

prints the table for a fresh simulation with the default config and for each FILE (a 'Muons'
or 'Events' tree with Muon_pt, Muon_pfRelIso04_all and Muon_genPartFlav: an older
simulation's output, or real NanoAOD).

CMS NanoAOD simulation (prompt muons, ``Muon_genPartFlav`` 1 from W, Z and top decays):
``Muon_pfRelIso04_all`` has a median of 0.02–0.05, 25–30 % of the muons exactly at 0 and
82–94 % below 0.15 (the tight working point), and pT well past 100 GeV at the 99th percentile.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
import uproot

from bsym.errors import InputFileError, MissingBranchError

__all__ = [
    "CMS_PROMPT",
    "TIGHT_ISOLATION",
    "MuonSummary",
    "format_table",
    "main",
    "read_muons",
    "summarise",
]

TIGHT_ISOLATION = 0.15
# (low, high) of CMS NanoAOD simulation for prompt muons: median, fraction at 0, below 0.15.
CMS_PROMPT = {"median": (0.02, 0.05), "zero": (0.25, 0.30), "tight": (0.82, 0.94)}
CLASSES = {"prompt": (1,), "non-prompt (b, c)": (4, 5)}
PT_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class MuonSummary:
    """Isolation and pT of one class of muons of one sample."""

    sample: str
    muon_class: str
    muons: int
    median_iso: float
    zero_iso: float
    tight_iso: float
    pt_percentiles: tuple[float, ...]


def summarise(
    sample: str,
    pt: npt.NDArray[np.floating[Any]],
    iso: npt.NDArray[np.floating[Any]],
    flav: npt.NDArray[np.integer[Any]],
) -> list[MuonSummary]:
    """One summary per class of CLASSES (classes without muons are left out)."""
    rows = []
    for name, flavours in CLASSES.items():
        mask = np.isin(flav, flavours)
        if not mask.any():
            continue
        rows.append(
            MuonSummary(
                sample=sample,
                muon_class=name,
                muons=int(mask.sum()),
                median_iso=float(np.median(iso[mask])),
                zero_iso=float(np.mean(iso[mask] == 0)),
                tight_iso=float(np.mean(iso[mask] < TIGHT_ISOLATION)),
                pt_percentiles=tuple(float(p) for p in np.percentile(pt[mask], PT_PERCENTILES)),
            )
        )
    return rows


def read_muons(
    path: Path,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(pt, pfRelIso04_all, genPartFlav) of every muon of a 'Muons' or 'Events' tree."""
    with uproot.open(path) as file:
        tree_name = "Muons" if "Muons" in file else "Events"
        if tree_name not in file:
            raise InputFileError(f"{path} has neither a 'Muons' nor an 'Events' tree")
        tree = file[tree_name]
        branches = ["Muon_pt", "Muon_pfRelIso04_all", "Muon_genPartFlav"]
        for branch in branches:
            if branch not in tree:
                raise MissingBranchError(
                    branch, file=str(path), tree=tree_name, available=tree.keys()
                )
        arrays = tree.arrays(branches)
    columns = [ak.to_numpy(ak.flatten(arrays[b], axis=None)) for b in branches]
    return (
        columns[0].astype(np.float64),
        columns[1].astype(np.float64),
        columns[2].astype(np.int64),
    )


def format_table(rows: list[MuonSummary]) -> str:
    """A Markdown table of the summaries, with the CMS targets for prompt muons on top."""
    low = {k: v[0] for k, v in CMS_PROMPT.items()}
    high = {k: v[1] for k, v in CMS_PROMPT.items()}
    lines = [
        "| sample | muons | class | median pfRelIso04_all | at 0 | < 0.15 | pT p50 / p90 / p99 |",
        "|---|---|---|---|---|---|---|",
        f"| CMS NanoAOD simulation | | prompt | {low['median']:.2f}–{high['median']:.2f} "
        f"| {low['zero']:.0%}–{high['zero']:.0%} | {low['tight']:.0%}–{high['tight']:.0%} "
        "| p99 > 100 GeV |",
    ]
    for r in rows:
        pts = " / ".join(f"{p:.0f}" for p in r.pt_percentiles)
        lines.append(
            f"| {r.sample} | {r.muons} | {r.muon_class} | {r.median_iso:.3f} | {r.zero_iso:.1%} "
            f"| {r.tight_iso:.1%} | {pts} GeV |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the table for a fresh simulation and for the files given."""
    from bsym.simulate.isolation import simulate_isolation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="ROOT files to compare as well")
    parser.add_argument("--events", type=int, default=20_000, help="dimuon events to simulate")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    training, _ = simulate_isolation(args.events, seed=args.seed)
    rows = summarise(
        f"simulated ({args.events} events)",
        training.Muon_pt.to_numpy(),
        training.Muon_pfRelIso04_all.to_numpy(),
        training.Muon_genPartFlav.to_numpy(),
    )
    for path in args.files:
        rows += summarise(path.name, *read_muons(path))
    print(format_table(rows))


if __name__ == "__main__":
    main()
