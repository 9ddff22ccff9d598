"""Throughput of ``bsym score`` against its parts: reading alone, inference alone, end to end.

    .venv/bin/python benchmarks/bench_score.py [--muons 1000000] [--model model.onnx]
        [--precision fp32 bf16 int8]

On one file of N muons (object layout, ~20-25 calorimeter cells each; generated once and
cached under --data-dir) and one PFN-like model (P=32, F=3), it measures
(a) uproot reading the branches the model needs, at the scorer's step size;
(b) ONNX Runtime inference on the prepared tensors, in the same chunks and batches;
(c) ``score_files`` end to end, in a subprocess so that its peak memory is its own.
(b) and (c) are measured for each --precision (default all three): the bf16 and int8
variants of the fp32 model are built as ``bsym export --precision`` builds them (int8
calibrated on the first 2,000 rows of the file, the faster of QDQ and QOperator kept) and
cached under --data-dir. Feature building alone is shown too: the end-to-end run must hide it
behind (a) and (b). Targets: (c) / ((a) + (b)) <= 1.15 and a peak RSS below 1.5 GiB.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
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
from bsym.export.defaults import CALIBRATION_ROWS, Precision
from bsym.features import (
    Constituents,
    Feature,
    FeatureBatch,
    FeatureSpec,
    build_features,
    detect_layout,
    required_branches,
)
from bsym.rootio import TreeSource, atomic_output, iterate_chunks, open_tree
from bsym.serving.defaults import DEFAULT_BATCH_SIZE, DEFAULT_STEP_SIZE
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.scorer import ENTRIES_PER_BATCH
from bsym.simulate.rootwrite import write_tree

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
MODEL_NAME = "bench_pfn"
TARGET_RATIO = 1.15
TARGET_PEAK_GIB = 1.5
WARM_UP_BATCHES = 4


def bench_spec(max_count: int = 32) -> FeatureSpec:
    """The spec of the isolation PFN: log ET, Δη, Δφ of ``max_count`` cells and log pT."""
    return FeatureSpec(
        tree="Muons",
        constituents=Constituents(
            features=[
                Feature(branch="CaloCell_et", transform="log"),
                Feature(branch="CaloCell_eta", relative_to="Muon_eta"),
                Feature(branch="CaloCell_phi", relative_to="Muon_phi", periodic=True),
            ],
            max_count=max_count,
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
    """A PFN like the isolation config's (Φ 64-64-64, F 64-64), random weights, with a
    dynamic constituent axis as ``bsym export`` writes it."""
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
    slots = spec.constituents.max_count if spec.constituents else 32
    example = (
        torch.zeros(2, slots, 3),
        torch.ones(2, slots, dtype=torch.bool),
        torch.zeros(2, 1),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PFN().eval(),
            example,
            str(path),
            input_names=names[:3],
            output_names=names[3:],
            dynamic_axes={
                **{name: {0: "N"} for name in names},
                "constituents": {0: "N", 1: "P"},
                "mask": {0: "N", 1: "P"},
            },
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


def make_variant(
    model: Path, precision: Precision, batches: list[FeatureBatch], data: Path, data_dir: Path
) -> Path:
    """The ``precision`` variant of the fp32 ``model``, built as ``bsym export --precision``
    builds it (int8 calibrated on the first rows of ``batches``, read from ``data``), with the
    model's metadata and the precision and format added; cached under ``data_dir`` by the
    model's content and the calibration file's name. The int8 format is the one that ran
    faster on the machine that built it."""
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    path = data_dir / f"{model.stem}.{digest}.{data.stem}.{precision.value}.onnx"
    if path.is_file():
        console.print(f"reusing {path} (delete it to build it again)", highlight=False)
        return path
    import onnx

    from bsym.export.precision import fastest_variant
    from bsym.training.dataset import concatenate

    proto = onnx.load_model(str(model))
    head: list[FeatureBatch] = []
    for batch in batches:
        if sum(b.n_rows for b in head) >= CALIBRATION_ROWS:
            break
        head.append(batch)
    graph_inputs = {node.name for node in proto.graph.input}
    calibration = {
        name: values[:CALIBRATION_ROWS]
        for name, values in concatenate(head).inputs().items()
        if name in graph_inputs
    }
    console.print(f"building the {precision.value} variant of {model}…", highlight=False)
    variant = fastest_variant(proto, precision, calibration, calibration=calibration)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    metadata |= {
        contract.PRECISION_KEY: precision.value,
        contract.PRECISION_FORMAT_KEY: variant.format,
    }
    onnx.helper.set_model_props(variant.proto, metadata)
    with atomic_output(path) as temporary:
        onnx.save_model(variant.proto, str(temporary))
    built = ", ".join(f"{name} {rate:,.0f}" for name, rate in variant.format_rates.items())
    console.print(f"wrote {path} ({built} rows/s on one thread)", highlight=False)
    return path


def model_precision(backend: OnnxRuntimeBackend) -> Precision:
    return Precision(backend.metadata.get(contract.PRECISION_KEY, Precision.fp32.value))


def precision_label(backend: OnnxRuntimeBackend) -> str:
    """``fp32``, or the precision with its format: ``int8 (QOperator)``, or the format alone
    where it names the precision (``bf16 weights, fp32 compute``)."""
    precision: str = model_precision(backend).value
    quant_format = backend.metadata.get(contract.PRECISION_FORMAT_KEY)
    if quant_format is None:
        return precision
    return quant_format if quant_format.startswith(precision) else f"{precision} ({quant_format})"


def chosen_precisions(asked: list[str] | None, own: Precision, model: Path) -> list[Precision]:
    """The precisions to measure, in the order fp32, bf16, int8; a model that is itself
    reduced is measured as it is."""
    if own is not Precision.fp32:
        if asked not in (None, [own.value]):
            raise SystemExit(
                f"--model {model} is already {own.value}; variants are derived from an fp32 "
                f"model (pass --precision {own.value}, or an fp32 model)"
            )
        return [own]
    names = set(asked or [p.value for p in Precision])
    return [p for p in Precision if p.value in names]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds (all threads of the process) of one stage, and the peak
    resident memory of the process that ran it (0 where the stage ran in this process)."""

    wall: float
    cpu: float
    peak_bytes: int = 0


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
    source: TreeSource, spec: FeatureSpec, step_size: str, max_rows: int | None = None
) -> tuple[Timing, list[FeatureBatch]]:
    """Building the tensors (in the scorer's slices) from chunks already read; the tensors."""
    tree, branches = _branches(source, spec)
    stop = None if max_rows is None else min(max_rows, int(tree.num_entries))
    chunks = list(tree.iterate(branches, step_size=step_size, entry_stop=stop, library="ak"))
    tree.file.close()
    layout = detect_layout(branches, spec)
    batches: list[FeatureBatch] = []
    with stopwatch() as timing:
        for chunk in chunks:
            for first in range(0, len(chunk), ENTRIES_PER_BATCH):
                part = chunk[first : first + ENTRIES_PER_BATCH]
                batches.append(build_features(part, spec, layout))
    return timing[0], batches


def measure_inference(
    backend: OnnxRuntimeBackend, batches: list[FeatureBatch], padding: str
) -> Timing:
    """(b) inference over every slice's tensors, batched and padded as the scorer does."""
    from bsym.serving.defaults import Padding
    from bsym.serving.scorer import predict_padded

    chosen = Padding(padding)
    for batch in batches[:WARM_UP_BATCHES]:  # the first calls of each shape are slower
        predict_padded(backend, batch.inputs(), chosen, backend.batch_size)
    with stopwatch() as timing:
        for batch in batches:
            predict_padded(backend, batch.inputs(), chosen, backend.batch_size)
    return timing[0]


# The end-to-end run and the plain loop, each alone in a child process so that its peak
# memory is its own. The code uses only what every bsym revision since the scorer has
# (score_files, OnnxRuntimeBackend, build_features), so that the python of an older checkout
# runs it against its own code.
CHILD = r"""
import json, sys, time
from pathlib import Path

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

args = json.loads(sys.argv[1])
wall, cpu = time.perf_counter(), time.process_time()
if args["mode"] == "score":
    from bsym.serving.onnx_backend import OnnxRuntimeBackend
    from bsym.serving.scorer import score_files
    backend = OnnxRuntimeBackend(
        Path(args["model"]), threads=args["threads"], batch_size=args["batch_size"]
    )
    options = {"padding": args["padding"]} if args["padding"] else {}
    wall, cpu = time.perf_counter(), time.process_time()
    if args["step_size"]:
        options["step_size"] = args["step_size"]
    summary = score_files(
        [args["data"]], backend, Path(args["out"]), force=True, progress=False, **options
    )
    if summary.failed:
        raise SystemExit(f"end-to-end run failed: {summary.failed}")
else:
    import onnxruntime as ort
    import uproot
    from bsym.features import FeatureSpec, build_features, detect_layout, required_branches
    options = ort.SessionOptions()
    if args["threads"]:
        options.intra_op_num_threads = args["threads"]
    session = ort.InferenceSession(args["model"], options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    spec = FeatureSpec.from_json(meta["bsym_feature_spec"])
    names = [node.name for node in session.get_inputs()]
    wall, cpu = time.perf_counter(), time.process_time()
    with uproot.open(args["data"]) as file:
        tree = file[spec.tree]
        layout = detect_layout(tree.keys(), spec)
        branches = required_branches(spec, layout, with_label=False)
        # as a user writes it: uproot's own step size unless --step-size says otherwise
        chunking = {"step_size": args["step_size"]} if args["step_size"] else {}
        for arrays in tree.iterate(branches, library="ak", **chunking):
            inputs = build_features(arrays, spec, layout).inputs()
            rows = len(inputs[names[0]])
            for start in range(0, rows, args["batch_size"]):
                feed = {n: inputs[n][start : start + args["batch_size"]] for n in names}
                session.run(["score"], feed)
print(json.dumps(
    {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "peak": peak()}
))
"""


def run_child(python: Path, mode: str, args: argparse.Namespace, **settings: Any) -> Timing:
    """Run :data:`CHILD` with ``python`` (whose ``bsym`` is the code measured)."""
    payload = {
        "mode": mode,
        "data": str(args.data),
        "model": str(args.model),
        "out": str(args.data_dir / "out"),
        "step_size": args.step_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "padding": None,
        **settings,
    }
    result = subprocess.run(
        [str(python), "-c", CHILD, json.dumps(payload)],
        check=False,
        capture_output=True,
        text=True,
        cwd="/",
    )
    if result.returncode != 0:
        raise SystemExit(f"{python} ({mode}) failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return Timing(report["wall"], report["cpu"], report["peak"])


def checkout_python(checkout: Path) -> Path:
    """The python of a checkout's own virtual environment."""
    python = checkout / ".venv" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"--before-checkout: {python} not found (a checkout with its .venv)")
    return python


# ---------------------------------------------------------------------------------------------
# Padding: inference rate with the constituent axis cut to the rows against fixed padding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaddingRow:
    max_count: int
    padding: str
    rows: int
    timing: Timing
    mean_slots: float
    """Constituent slots the model ran per row, on average."""


def slots_run(batches: list[FeatureBatch], padding: str, group_rows: int) -> float:
    """The mean number of slots per row the model is given with ``padding``."""
    from bsym.serving.defaults import Padding
    from bsym.serving.scorer import padded_feeds

    total = rows = 0
    for batch in batches:
        rows += batch.n_rows
        for feed in padded_feeds(batch.inputs(), Padding(padding), group_rows).feeds:
            total += feed["mask"].size
    return total / max(rows, 1)


def padding_benchmark(args: argparse.Namespace) -> list[PaddingRow]:
    """Inference alone on the simulator's cell counts, for 32 and 128 cells, per padding."""
    rows: list[PaddingRow] = []
    for max_count in args.padding_cells:
        spec = bench_spec(max_count)
        model = make_model(args.data_dir / f"{MODEL_NAME}_p{max_count}.onnx", spec)
        backend = OnnxRuntimeBackend(model, threads=args.threads, batch_size=args.batch_size)
        source = TreeSource(args.data, spec.tree)
        _, batches = measure_features(source, spec, args.read_step_size, max_rows=args.padding_rows)
        n_rows = sum(batch.n_rows for batch in batches)
        paddings = ("fixed", "longest", "group")
        timings: dict[str, list[Timing]] = {padding: [] for padding in paddings}
        for _ in range(args.repeat):  # interleaved, best of each
            for padding in paddings:
                timings[padding].append(measure_inference(backend, batches, padding))
        for padding in paddings:
            best = min(timings[padding], key=lambda t: t.wall)
            mean = slots_run(batches, padding, backend.batch_size)
            rows.append(PaddingRow(max_count, padding, n_rows, best, mean))
            console.print(
                f"  padding {max_count} cells, {padding}: {n_rows / best.wall:,.0f} muons/s",
                highlight=False,
            )
        del batches
    return rows


# ---------------------------------------------------------------------------------------------
# Main and report
# ---------------------------------------------------------------------------------------------


def load_line() -> str:
    """``uptime``'s load averages and the number of CPUs."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


Key = tuple[str, Precision | None]
"""A stage and the precision of the model it ran (``None`` for reading, which has none)."""


def main() -> None:
    args = parse_args()
    spec = bench_spec()
    args.data = make_data(args.data_dir / f"bench_muons_{args.muons}.root", args.muons)
    args.model = args.model or make_model(args.data_dir / f"{MODEL_NAME}_p32.onnx", spec)
    base = OnnxRuntimeBackend(args.model, threads=args.threads, batch_size=args.batch_size)
    spec = base.feature_spec
    own = model_precision(base)
    precisions = chosen_precisions(args.precision, own, args.model)
    source = TreeSource(args.data, spec.tree)
    before = None if args.before_checkout is None else checkout_python(args.before_checkout)
    loads = [load_line()]
    console.print(
        f"model {base.name} ({args.model}); {args.read_step_size} chunks, slices of "
        f"{ENTRIES_PER_BATCH} entries, inference batches of {args.batch_size}, padding "
        f"{args.padding}; {loads[0]}"
    )
    features, batches = measure_features(source, spec, args.read_step_size)
    rows = sum(batch.n_rows for batch in batches)
    models = {
        precision: (
            args.model
            if precision is own
            else make_variant(args.model, precision, batches, args.data, args.data_dir)
        )
        for precision in precisions
    }
    backends = {
        precision: OnnxRuntimeBackend(path, threads=args.threads, batch_size=args.batch_size)
        for precision, path in models.items()
    }
    labels = {precision: precision_label(backend) for precision, backend in backends.items()}
    console.print(f"precisions: {', '.join(labels.values())}", highlight=False)
    runs: dict[Key, list[Timing]] = {}

    def record(key: Key, timing: Timing) -> None:
        runs.setdefault(key, []).append(timing)
        stage, precision = key
        label = stage if precision is None else f"{stage} {precision.value}"
        console.print(f"  {label}: {timing.wall:.2f} s", highlight=False)

    # interleaved, best of each: robust to a busy machine; the precisions side by side, and
    # each (c) right after its (b), so that the ratio of one repeat spans seconds, not minutes
    for number in range(args.repeat):
        console.print(f"run {number + 1}/{args.repeat}")
        read, entries = measure_read(source, spec, args.read_step_size)
        record(("read", None), read)
        for precision, backend in backends.items():
            record(("inference", precision), measure_inference(backend, batches, args.padding))
            end_to_end = run_child(
                Path(sys.executable),
                "score",
                args,
                model=str(models[precision]),
                padding=args.padding,
            )
            record(("end_to_end", precision), end_to_end)
        for precision, backend in backends.items():
            record(("inference_fixed", precision), measure_inference(backend, batches, "fixed"))
        if before is not None:
            record(("before", own), run_child(before, "score", args))
        if not args.no_plain:
            record(("plain", own), run_child(Path(sys.executable), "plain", args))
    del batches
    padding_rows = [] if args.no_padding_bench else padding_benchmark(args)
    loads.append(load_line())
    best = {key: min(timings, key=lambda t: t.wall) for key, timings in runs.items()}
    report(args, entries, rows, features, best, labels, own, padding_rows, loads)
    for precision, label in labels.items():
        each = repeat_ratios(runs, precision)
        Console(width=150).print(
            f"(c)/((a)+(b)) in each repeat, {label}: {' '.join(f'{r:.3f}' for r in each)}; "
            f"median {statistics.median(each):.3f}",
            highlight=False,
        )


def repeat_ratios(runs: dict[Key, list[Timing]], precision: Precision) -> list[float]:
    """(c)/((a)+(b)) of each repeat from that repeat's own three measurements: on a machine
    whose speed drifts, the best (a), (b) and (c) may come from different minutes."""
    reads, inferences = runs[("read", None)], runs[("inference", precision)]
    ends = runs[("end_to_end", precision)]
    return [
        end.wall / (read.wall + inference.wall)
        for read, inference, end in zip(reads, inferences, ends, strict=True)
    ]


def report(
    args: argparse.Namespace,
    entries: int,
    rows: int,
    features: Timing,
    best: dict[Key, Timing],
    labels: dict[Precision, str],
    own: Precision,
    padding_rows: list[PaddingRow],
    loads: list[str],
) -> None:
    """The stages with each precision's (b), (b0) and (c) side by side, then the ratios of
    each (c) to its parts."""
    out = Console(width=150)
    read = best[("read", None)]
    for precision in labels:
        inference = best[("inference", precision)]
        best[("parts", precision)] = Timing(read.wall + inference.wall, read.cpu + inference.cpu)
    table = Table(title=f"bsym score benchmark: {rows:,} muons in {entries:,} entries")
    for column in ("stage", "precision", "wall s", "muons/s", "CPU s", "peak RSS GiB", "× fp32"):
        table.add_column(column, justify="left" if column in {"stage", "precision"} else "right")

    def add(stage: str, label: str, timing: Timing, fp32: Timing | None, last: bool) -> None:
        table.add_row(
            stage,
            label,
            f"{timing.wall:.2f}",
            f"{rows / timing.wall:,.0f}",
            f"{timing.cpu:.2f}",
            f"{timing.peak_bytes / 2**30:.2f}" if timing.peak_bytes else "-",
            "" if fp32 is None else f"{fp32.wall / timing.wall:.2f}",
            end_section=last,
        )

    add("(a) read (uproot)", "-", read, None, False)
    add("    feature building (hidden in (c))", "-", features, None, True)
    for stage, name in (
        ("inference", f"(b) inference, padding {args.padding}"),
        ("inference_fixed", "(b0) inference, padding fixed"),
        ("parts", "(a) + (b)"),
        ("end_to_end", "(c) bsym score end to end, this checkout"),
    ):
        for k, (precision, label) in enumerate(labels.items()):
            fp32 = best.get((stage, Precision.fp32))
            add(name if k == 0 else "", label, best[(stage, precision)], fp32, k == len(labels) - 1)
    if ("before", own) in best:
        name = f"(c0) bsym score end to end, {args.before_checkout}"
        add(name, labels.get(own, own.value), best[("before", own)], None, False)
    if ("plain", own) in best:
        name = "(d) plain uproot + ONNX Runtime loop"
        add(name, labels.get(own, own.value), best[("plain", own)], None, False)
    out.print(table)

    ratios = Table(title="End to end against its parts")
    for column in (
        "end to end",
        "precision",
        "(c)/((a)+(b))",
        f"<= {TARGET_RATIO}",
        "(c)/max((a),(b))",
        "CPU s (c)/((a)+(b))",
        "peak RSS GiB",
        f"< {TARGET_PEAK_GIB} GiB",
    ):
        ratios.add_column(
            column, justify="left" if column in {"end to end", "precision"} else "right"
        )

    def ratio_row(name: str, label: str, end: Timing, inference: Timing) -> None:
        ratio = end.wall / (read.wall + inference.wall)
        peak = end.peak_bytes / 2**30
        ratios.add_row(
            name,
            label,
            f"{ratio:.3f}",
            "ok" if ratio <= TARGET_RATIO else "MISSED",
            f"{end.wall / max(read.wall, inference.wall):.3f}",
            f"{end.cpu / (read.cpu + inference.cpu):.3f}",
            f"{peak:.2f}",
            "ok" if peak < TARGET_PEAK_GIB else "MISSED",
        )

    for k, (precision, label) in enumerate(labels.items()):
        end, inference = best[("end_to_end", precision)], best[("inference", precision)]
        ratio_row("(c) this checkout" if k == 0 else "", label, end, inference)
    measured_own = own in labels
    if ("before", own) in best and measured_own:
        before, fixed = best[("before", own)], best[("inference_fixed", own)]
        ratio_row("(c0) before, over this checkout's (a), (b0)", labels[own], before, fixed)
    out.print(ratios)
    lines = []
    if ("before", own) in best and measured_own:
        speedup = best[("before", own)].wall / best[("end_to_end", own)].wall
        lines.append(f"speed-up of (c) over (c0), {labels[own]}: {speedup:.2f}x")
    if ("plain", own) in best and measured_own:
        plain, end = best[("plain", own)], best[("end_to_end", own)]
        lines.append(
            f"lead of (c) over the plain loop (d), {labels[own]}: {plain.wall / end.wall:.2f}x "
            f"faster, peak RSS {end.peak_bytes / max(plain.peak_bytes, 1):.2f} of its"
        )
    for line in lines:
        out.print(line, highlight=False)
    if padding_rows:
        table = Table(title="Padding: inference alone on the simulator's cell counts")
        for column in (
            "max cells",
            "padding",
            "muons",
            "mean slots run",
            "wall s",
            "muons/s",
            "x fixed",
        ):
            table.add_column(column, justify="right")
        fixed_rate = {
            row.max_count: row.rows / row.timing.wall
            for row in padding_rows
            if row.padding == "fixed"
        }
        for row in padding_rows:
            rate = row.rows / row.timing.wall
            table.add_row(
                str(row.max_count),
                row.padding,
                f"{row.rows:,}",
                f"{row.mean_slots:.1f}",
                f"{row.timing.wall:.2f}",
                f"{rate:,.0f}",
                f"{rate / fixed_rate[row.max_count]:.2f}",
            )
        out.print(table)
    out.print(f"start: {loads[0]}\nend:   {loads[-1]}", highlight=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--muons", type=int, default=1_000_000, help="muons in the test file")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data", help="cache directory")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="an exported model.onnx (default: the bench PFN); --precision applies to it",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=[p.value for p in Precision],
        default=None,
        help="precisions of (b) and (c), measured in the order fp32, bf16, int8 (default: all;\n"
        "a --model that is itself bf16 or int8: its own)",
    )
    parser.add_argument(
        "--step-size",
        default=None,
        help="uproot step size (default: each checkout's scorer default, this one's for (a))",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each stage; best kept")
    parser.add_argument(
        "--padding", default="group", choices=["group", "longest", "fixed"], help="for (b), (c)"
    )
    parser.add_argument(
        "--before-checkout",
        type=Path,
        default=None,
        help="another checkout (with its .venv) whose bsym score runs as (c0) on the same data",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (d)")
    parser.add_argument(
        "--no-padding-bench", action="store_true", help="skip the padding benchmark"
    )
    parser.add_argument(
        "--padding-cells", type=int, nargs="+", default=[32, 128], help="padding benchmark models"
    )
    parser.add_argument(
        "--padding-rows", type=int, default=300_000, help="muons in the padding benchmark"
    )
    args = parser.parse_args()
    args.read_step_size = args.step_size or DEFAULT_STEP_SIZE
    return args


if __name__ == "__main__":
    main()
