"""A coffea processor that scores muons with a bsym model, run with coffea's processor.Runner.

Needs the coffea extra: ``pip install 'bsym[coffea]'`` (and ``'bsym[triton]'`` for --server).
Score NanoAOD files in-process with ONNX Runtime, one chunk of 10,000 events at a time:

    python examples/coffea_processor.py nano_*.root --repository model_repository \
        --model isolation_reliso

or through a Triton server (``bsym serve`` here, a Triton container at a site: see
docs/triton.md) with ``--server localhost:8001``; ``--executor dask --workers 4`` runs the
chunks on a local Dask cluster. The wrappers of :mod:`bsym.serving.coffea` load the model once
per worker process, not per chunk, and take NanoEvents in eager, virtual and dask mode.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from bsym.serving.coffea import OnnxModelWrapper, TritonModelWrapper, model_loads

BINS = np.linspace(0.0, 1.0, 21)


class IsolationProcessor(processor.ProcessorABC):  # type: ignore[misc]
    """Counts events with two prompt-like muons and histograms the muons' scores."""

    def __init__(self, model: Callable[[Any], Any], cut: float = 0.5) -> None:
        self.model = model
        self.cut = cut

    def process(self, events: Any) -> dict[str, Any]:
        scores = self.model(events)  # jagged like events.Muon
        muons = ak.with_field(events.Muon, scores, "iso_score")
        prompt = muons[muons.iso_score > self.cut]
        histogram, _ = np.histogram(ak.to_numpy(ak.flatten(scores)), bins=BINS)
        return {
            "events": len(events),
            "muons": int(ak.sum(ak.num(muons))),
            "two_prompt_muons": int(ak.sum(ak.num(prompt) >= 2)),
            "score_histogram": histogram,
            # (process id, models it has loaded so far): one per process, however many chunks
            "model_loads": {(os.getpid(), model_loads())},
        }

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return accumulator


def run(
    files: list[Path],
    model: Callable[[Any], Any],
    *,
    executor: str = "iterative",
    workers: int = 2,
    chunksize: int = 10_000,
) -> dict[str, Any]:
    """Run :class:`IsolationProcessor` over ``files`` (tree ``Events``) with processor.Runner."""
    fileset = {"events": {"files": {str(path): "Events" for path in files}}}
    if executor == "iterative":
        return _run(processor.IterativeExecutor(), fileset, model, chunksize)
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        client.upload_file(__file__)  # the workers unpickle IsolationProcessor from it
        return _run(processor.DaskExecutor(client=client), fileset, model, chunksize)


def _run(
    executor: Any, fileset: dict[str, Any], model: Callable[[Any], Any], chunksize: int
) -> dict[str, Any]:
    runner = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=chunksize)
    result: dict[str, Any] = runner(fileset, processor_instance=IsolationProcessor(model))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="NanoAOD files (tree 'Events')")
    parser.add_argument("--model", default="isolation_reliso", help="model name (or model.onnx)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--server", help="Triton gRPC HOST:PORT; default: run in-process")
    parser.add_argument("--executor", choices=["iterative", "dask"], default="iterative")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (--executor dask)")
    parser.add_argument("--chunksize", type=int, default=10_000, help="events per chunk")
    args = parser.parse_args()
    model: Callable[[Any], Any]
    if args.server:
        model = TritonModelWrapper(args.server, args.model)
    elif args.model.endswith(".onnx"):
        model = OnnxModelWrapper(args.model)
    else:
        model = OnnxModelWrapper(args.repository, args.model)
    result = run(
        args.files, model, executor=args.executor, workers=args.workers, chunksize=args.chunksize
    )
    print(result)


if __name__ == "__main__":
    main()
