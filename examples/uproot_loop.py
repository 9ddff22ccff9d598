"""Score muons in NanoAOD-style files chunk by chunk with a model served by Triton.

    bsym serve &                                   # or a Triton server at your site
    python examples/uproot_loop.py "data/isolation/isolation_events_*.root" \
        --server localhost:8001 --model isolation_pfn

Each chunk that uproot reads is scored with one call; the scores come back jagged, one per
muon, aligned with the chunk's ``Muon_*`` branches, ready to cut on or to fill histograms.
Needs bsym with its Triton extra (``pip install 'bsym[triton]'``) and a server that serves the
model (see docs/triton.md).
"""

from __future__ import annotations

import argparse

import awkward as ak
import numpy as np
import uproot

from bsym.serving import TritonModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="ROOT files or globs with an 'Events' tree")
    parser.add_argument("--server", default="localhost:8001", help="Triton gRPC HOST:PORT")
    parser.add_argument("--model", default="isolation_pfn", help="model name on the server")
    parser.add_argument("--step-size", default="50 MB", help="entries or size per chunk")
    parser.add_argument("--cut", type=float, default=0.5, help="score of a 'prompt' muon")
    args = parser.parse_args()

    events_seen = muons_seen = prompt = 0
    with TritonModel(args.server, args.model) as model:
        # Read only what the model needs (plus what the analysis itself uses).
        branches = [*model.branches("event"), "dimuon_mass"]
        inputs = [path if path.endswith(":Events") else f"{path}:Events" for path in args.files]
        step_size = int(args.step_size) if args.step_size.isdigit() else args.step_size
        for events in uproot.iterate(inputs, branches, step_size=step_size):
            scores = model(events)  # ak.num(scores) == events.nMuon
            selected = events.dimuon_mass[ak.all(scores > args.cut, axis=1) & (events.nMuon >= 2)]
            events_seen += len(events)
            muons_seen += int(ak.sum(events.nMuon))
            prompt += int(ak.sum(scores > args.cut))
            mean = float(np.mean(ak.to_numpy(ak.flatten(scores)))) if len(scores) else 0.0
            print(
                f"chunk of {len(events):,} events: mean score {mean:.3f}, "
                f"{len(selected):,} events with two prompt-like muons"
            )
    print(
        f"scored {muons_seen:,} muons in {events_seen:,} events with '{args.model}' at "
        f"{args.server}: {prompt:,} above {args.cut:g}"
    )


if __name__ == "__main__":
    main()
