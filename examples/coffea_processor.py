"""A coffea processor that scores muons with a model served by Triton.

Needs coffea (not a bsym dependency): ``pip install 'coffea>=2024.4' 'bsym[triton]'``, and a
server that serves the model (``bsym serve`` here, a Triton container at a site: see
docs/triton.md). Run it on NanoAOD-style files with an ``Events`` tree:

    python examples/coffea_processor.py data/isolation/isolation_events_000.root \
        --server localhost:8001 --model isolation_pfn

``TritonModel`` takes coffea's NanoEvents as they are (``events.Muon.pt``,
``events.CaloCell.et``...), in eager mode; with dask-awkward collections call the processor
inside ``dask_awkward.map_partitions``. The model pickles without its connection, so every
worker of an executor opens its own.
"""

from __future__ import annotations

import argparse
from typing import Any

import awkward as ak
import numpy as np

from bsym.serving import TritonModel

try:
    from coffea import processor
except ImportError:  # the module still imports, so the processor can be read and tested
    processor = None

ProcessorABC: Any = processor.ProcessorABC if processor is not None else object


class IsolationProcessor(ProcessorABC):  # type: ignore[misc]
    """Counts events with two prompt-like muons and histograms their scores."""

    def __init__(self, model: TritonModel, cut: float = 0.5) -> None:
        self.model = model
        self.cut = cut
        self.bins = np.linspace(0.0, 1.0, 21)

    def process(self, events: Any) -> dict[str, Any]:
        scores = self.model(events)  # jagged like events.Muon
        muons = ak.with_field(events.Muon, scores, "iso_score")
        prompt = muons[muons.iso_score > self.cut]
        histogram, _ = np.histogram(ak.to_numpy(ak.flatten(scores)), bins=self.bins)
        return {
            "events": len(events),
            "muons": int(ak.sum(ak.num(muons))),
            "two_prompt_muons": int(ak.sum(ak.num(prompt) >= 2)),
            "score_histogram": histogram,
        }

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return accumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a NanoAOD-style ROOT file with an 'Events' tree")
    parser.add_argument("--server", default="localhost:8001", help="Triton gRPC HOST:PORT")
    parser.add_argument("--model", default="isolation_pfn", help="model name on the server")
    args = parser.parse_args()
    if processor is None:
        raise SystemExit("coffea is not installed: pip install 'coffea>=2024.4'")
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    events = NanoEventsFactory.from_root(
        {args.file: "Events"}, schemaclass=NanoAODSchema, mode="eager"
    ).events()
    with TritonModel(args.server, args.model) as model:
        result = IsolationProcessor(model).process(events)
    print(result)


if __name__ == "__main__":
    main()
