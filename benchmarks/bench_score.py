"""Throughput of ``bsym score`` against its parts: reading alone, inference alone, end to end.

    .venv/bin/python benchmarks/bench_score.py [--muons 1000000] [--model model.onnx]

On one file of N muons (object layout, ~20-25 calorimeter cells each; generated once and
cached under --data-dir) and one PFN-like model (P=32, F=3), it measures
(a) uproot reading the branches the model needs, at the scorer's step size;
(b) ONNX Runtime inference on the prepared tensors, in the same chunks and batches;
(c) ``score_files`` end to end, in a subprocess so that its peak memory is its own.
Feature building alone is shown too: the end-to-end run must hide it behind (a) and (b).
Targets: (c) / ((a) + (b)) <= 1.15 and a peak RSS below 1.5 GiB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
from rich.console import Console
from rich.table import Table

from bsym import contract
from bsym.features import (
    Constituents,
    Feature,
    FeatureBatch,
    FeatureSpec,
    build_features,
    detect_layout,
    required_branches,
)
from bsym.rootio import TreeSource, iterate_chunks, open_tree
from bsym.serving.defaults import DEFAULT_BATCH_SIZE
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import ENTRIES_PER_BATCH
from bsym.simulate.rootwrite import write_tree

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
MODEL_NAME = "bench_pfn"
TARGET_RATIO = 1.15
TARGET_PEAK_GIB = 1.5


def bench_spec() -> FeatureSpec:
    """The spec of the isolation PFN: log ET, Δη, Δφ of 32 cells and log pT of the muon."""
    return FeatureSpec(
        tree="Muons",
        constituents=Constituents(
            features=[
                Feature(branch="CaloCell_et", transform="log"),
                Feature(branch="CaloCell_eta", relative_to="Muon_eta"),
                Feature(branch="CaloCell_phi", relative_to="Muon_phi", periodic=True),
            ],
            max_count=32,
            sort_by="CaloCell_et",
            link="CaloCell_muonIdx",
        ),
        globals=[Feature(branch="Muon_pt", transform="log")],
    )


# ---------------------------------------------------------------------------------------------
# Data and model, cached
# ---------------------------------------------------------------------------------------------


def make_data(path: Path, muons: int, seed: int = 1) -> Path:
    """N muons in the object layout: the isolation simulator if present, else synthetic."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from bsym.simulate.isolation import simulate_isolation
    except ImportError:
        layout = _synthetic(muons, seed)
        source = "synthetic generator"
    else:
        parts, total, part_seed = [], 0, seed
        while total < muons:  # ~2.1 muons per event; simulate in slices to bound memory
            part, _ = simulate_isolation(100_000, seed=part_seed)
            parts.append(part[: muons - total])
            total += len(parts[-1])
            part_seed += 1
        layout = ak.concatenate(parts)
        source = "isolation simulator"
    # baskets of a realistic size, one extend each
    write_tree(path, "Muons", layout, counters=("nCaloCell",), basket_entries=100_000)
    console.print(f"wrote {path} ({muons:,} muons, {source})")
    return path


def _synthetic(muons: int, seed: int) -> ak.Array:
    """Same branches as the simulator's Muons tree, drawn fast with numpy."""
    rng = np.random.default_rng(seed)
    n_cell = rng.poisson(22, muons)
    cells = int(n_cell.sum())
    eta = rng.uniform(-2.4, 2.4, muons).astype(np.float32)
    phi = rng.uniform(-np.pi, np.pi, muons).astype(np.float32)
    owner = np.repeat(np.arange(muons), n_cell)
    fields: dict[str, Any] = {
        "Muon_pt": rng.exponential(20, muons).astype(np.float32) + 5,
        "Muon_eta": eta,
        "Muon_phi": phi,
        "Muon_charge": rng.choice(np.array([-1, 1], np.int32), muons),
        "Muon_pfRelIso03_all": rng.exponential(0.1, muons).astype(np.float32),
        "Muon_pfRelIso04_all": rng.exponential(0.15, muons).astype(np.float32),
        "Muon_sumTrackPt03": rng.exponential(2.0, muons).astype(np.float32),
        "Muon_genPartFlav": rng.choice(np.array([1, 4, 5], np.int32), muons),
        "dimuon_mass": rng.uniform(70, 110, muons).astype(np.float32),
        "event": np.arange(muons, dtype=np.int64) // 2,
        "nCaloCell": n_cell.astype(np.int32),
    }
    cell_values = {
        "CaloCell_eta": eta[owner] + rng.normal(0, 0.2, cells).astype(np.float32),
        "CaloCell_phi": phi[owner] + rng.normal(0, 0.2, cells).astype(np.float32),
        "CaloCell_et": rng.exponential(1.0, cells).astype(np.float32) + 0.1,
    }
    for name, values in cell_values.items():
        fields[name] = ak.unflatten(values, n_cell)
    return ak.Array(fields)


def make_model(path: Path, spec: FeatureSpec) -> Path:
    """A PFN like the isolation config's (Φ 64-64-64, F 64-64), random weights."""
    if path.is_file():
        return path
    import onnx
    import torch
    from torch import nn

    def mlp(sizes: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        return nn.Sequential(*layers)

    class PFN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.phi = mlp([3, 64, 64, 64])
            self.f = mlp([65, 64, 64])
            self.out = nn.Linear(64, 1)

        def forward(
            self, constituents: torch.Tensor, mask: torch.Tensor, globals: torch.Tensor
        ) -> torch.Tensor:
            real = mask.to(constituents.dtype).unsqueeze(-1)
            latent = (self.phi(constituents) * real).sum(dim=1)
            return torch.sigmoid(self.out(self.f(torch.cat([latent, globals], dim=1))))

    names = ["constituents", "mask", "globals", "score"]
    example = (torch.zeros(2, 32, 3), torch.ones(2, 32, dtype=torch.bool), torch.zeros(2, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PFN().eval(),
            example,
            str(path),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes={name: {0: "N"} for name in names},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    for key, value in {
        contract.FEATURE_SPEC_KEY: spec.to_json(),
        contract.MODEL_NAME_KEY: MODEL_NAME,
        contract.VERSION_KEY: "bench",
        contract.GIT_COMMIT_KEY: "bench",
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds (all threads of the process) of one stage."""

    wall: float
    cpu: float


@contextmanager
def stopwatch() -> Iterator[list[Timing]]:
    """Time the block; the timing is appended to the yielded list when it ends."""
    result: list[Timing] = []
    wall, cpu = time.perf_counter(), time.process_time()
    yield result
    result.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))


def _branches(source: TreeSource, spec: FeatureSpec) -> tuple[Any, list[str]]:
    tree = open_tree(source)
    layout = detect_layout(tree.keys(), spec)
    return tree, required_branches(spec, layout, with_label=False)


def measure_read(source: TreeSource, spec: FeatureSpec, step_size: str) -> tuple[Timing, int]:
    """(a) uproot reading the needed branches at the scorer's step size; the entries read."""
    tree, branches = _branches(source, spec)
    with stopwatch() as timing:
        chunks = iterate_chunks(tree, source, branches, step_size=step_size)
        entries = sum(len(chunk) for chunk in chunks)
    tree.file.close()
    return timing[0], entries


def measure_features(
    source: TreeSource, spec: FeatureSpec, step_size: str
) -> tuple[Timing, list[FeatureBatch]]:
    """Building the tensors (in the scorer's slices) from chunks already read; the tensors."""
    tree, branches = _branches(source, spec)
    chunks = list(iterate_chunks(tree, source, branches, step_size=step_size))
    tree.file.close()
    layout = detect_layout(branches, spec)
    batches: list[FeatureBatch] = []
    with stopwatch() as timing:
        for chunk in chunks:
            for first in range(0, len(chunk), ENTRIES_PER_BATCH):
                part = chunk[first : first + ENTRIES_PER_BATCH]
                batches.append(build_features(part, spec, layout))
    return timing[0], batches


def measure_inference(backend: OnnxRuntimeBackend, batches: list[FeatureBatch]) -> Timing:
    """(b) ``backend.predict`` over every slice's tensors (batched as the scorer does)."""
    backend.predict({k: v[:1] for k, v in batches[0].inputs().items()})  # warm-up
    with stopwatch() as timing:
        for batch in batches:
            backend.predict(batch.inputs())
    return timing[0]


def measure_end_to_end(args: argparse.Namespace, data: Path, model: Path) -> dict[str, Any]:
    """(c) ``score_files`` in a child process: its wall and CPU seconds and peak RSS."""
    command = [sys.executable, __file__, "--child", "--data", str(data), "--model", str(model)]
    command += ["--out", str(args.data_dir / "out"), "--step-size", args.step_size]
    command += ["--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def child(args: argparse.Namespace) -> None:
    """The end-to-end run, alone in its process; prints its timing and peak RSS as JSON."""
    from bsym.serving.scorer import score_files

    backend = OnnxRuntimeBackend(args.model, threads=args.threads, batch_size=args.batch_size)
    with stopwatch() as timing:
        summary = score_files(
            [str(args.data)],
            backend,
            args.out,
            step_size=args.step_size,
            force=True,
            progress=False,
        )
    if summary.failed:
        raise SystemExit(f"end-to-end run failed: {summary.failed}")
    report = {"wall": timing[0].wall, "cpu": timing[0].cpu, "peak_bytes": peak_rss()}
    print(json.dumps(report))


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    ``VmHWM`` belongs to the process's own address space; ``ru_maxrss`` is not used because
    Linux carries it over from the parent through fork and exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    spec = bench_spec()
    data = make_data(args.data_dir / f"bench_muons_{args.muons}.root", args.muons)
    model = args.model or make_model(args.data_dir / f"{MODEL_NAME}.onnx", spec)
    backend = OnnxRuntimeBackend(model, threads=args.threads, batch_size=args.batch_size)
    spec = backend.feature_spec
    source = TreeSource(data, spec.tree)
    console.print(
        f"model {backend.name} ({model}); {args.step_size} chunks, slices of "
        f"{ENTRIES_PER_BATCH} entries, inference batches of {args.batch_size}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    features, batches = measure_features(source, spec, args.step_size)
    rows = sum(batch.n_rows for batch in batches)
    runs: dict[str, list[Timing]] = {"read": [], "inference": [], "end_to_end": []}
    peaks: list[int] = []
    for _ in range(args.repeat):  # interleaved, best of each: robust to a busy machine
        read, entries = measure_read(source, spec, args.step_size)
        runs["read"].append(read)
        runs["inference"].append(measure_inference(backend, batches))
        end_to_end = measure_end_to_end(args, data, model)
        runs["end_to_end"].append(Timing(end_to_end["wall"], end_to_end["cpu"]))
        peaks.append(end_to_end["peak_bytes"])
    best = {stage: min(timings, key=lambda t: t.wall) for stage, timings in runs.items()}
    report(entries, rows, features, best, max(peaks))
    console.print(f"load average at the end {os.getloadavg()[0]:.1f}")


def report(
    entries: int, rows: int, features: Timing, best: dict[str, Timing], peak_bytes: int
) -> None:
    read, inference, end_to_end = best["read"], best["inference"], best["end_to_end"]
    parts = Timing(read.wall + inference.wall, read.cpu + inference.cpu)
    ratio = end_to_end.wall / parts.wall
    peak_gib = peak_bytes / 2**30
    table = Table(title=f"bsym score benchmark: {rows:,} muons in {entries:,} entries")
    for column in ("stage", "wall s", "muons/s", "CPU s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, timing in (
        ("(a) read (uproot)", read),
        ("    feature building (hidden in (c))", features),
        ("(b) inference (ONNX Runtime)", inference),
        ("(a) + (b)", parts),
        ("(c) score_files end to end", end_to_end),
    ):
        table.add_row(
            stage, f"{timing.wall:.2f}", f"{rows / timing.wall:,.0f}", f"{timing.cpu:.2f}"
        )
    out = Console()
    out.print(table)
    ok_ratio = "ok" if ratio <= TARGET_RATIO else "MISSED"
    ok_peak = "ok" if peak_gib < TARGET_PEAK_GIB else "MISSED"
    out.print(
        f"ratio (c) / ((a) + (b)) = {ratio:.3f} (target <= {TARGET_RATIO}: {ok_ratio}); "
        f"in CPU seconds {end_to_end.cpu / parts.cpu:.3f}\n"
        f"peak RSS of (c) = {peak_gib:.2f} GiB (target < {TARGET_PEAK_GIB} GiB: {ok_peak})",
        highlight=False,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--muons", type=int, default=1_000_000, help="muons in the test file")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data", help="cache directory")
    parser.add_argument("--model", type=Path, default=None, help="an exported model.onnx")
    parser.add_argument("--step-size", default="100 MB", help="uproot step size")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a), (b), (c); best kept")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
