"""fp32 against int8 and bf16 for every shipped isolation network: inference rate and AUC.

    .venv/bin/python benchmarks/bench_precision.py [--events 8000] [--epochs 4]

Simulates ``--events`` isolation events once (cached under --data-dir), trains each shipped
``isolation_*`` config whose model is a network (its architecture as shipped, a few epochs),
and exports it through ``bsym export``'s own path in fp32, int8 (QDQ and QOperator) and
bf16. Each variant's held-out AUC is the exporter's parity figure (the checkpoint's test
split); the inference rate is ONNX Runtime on the CPU over the same ``--rows`` rows (the test
rows, repeated) in batches of ``--batch-size``, cycled for at least ``--min-seconds``, the
variants interleaved, best of ``--repeat``. Prints one table with the ratios to fp32, the load
average before and after, and the target: int8 or bf16 at least 2x fp32 with an AUC loss
below 0.002.

A second table is the ceiling: one fp32 MatMul against one int8 QLinearMatMul of the same
shape (65,536 rows, square weights of the shipped networks' widths and wider), nothing else
in the graph, beside the CPU's matrix instruction sets. A whole network cannot gain more from
int8 than its matrix products do.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from rich.console import Console
from rich.table import Table

from bsym.configs import shipped_config
from bsym.export.defaults import Precision, QuantFormat
from bsym.export.onnx_export import ExportReport, export_onnx
from bsym.export.precision import cpu_session, timed_rate
from bsym.simulate.isolation import write_isolation
from bsym.training.checkpoint import load_checkpoint
from bsym.training.config import load_config
from bsym.training.train import train

console = Console(stderr=True)
HERE = Path(__file__).resolve().parent
TARGET_SPEEDUP = 2.0
TARGET_AUC_LOSS = 0.002
FP32 = "fp32"


@dataclass(frozen=True)
class Row:
    config: str
    model_type: str
    variant: str
    rate: float
    auc: float
    auc_loss: float
    max_abs_diff: float


def network_configs() -> list[str]:
    """The shipped isolation configs, in name order (non-networks are dropped after training)."""
    folder = shipped_config("isolation_pfn").parent
    return sorted(path.stem for path in folder.glob("isolation_*.yaml"))


def simulate(data_dir: Path, events: int) -> Path:
    out = data_dir / f"isolation_{events}"
    if not any(out.glob("isolation_muons_*.root")):
        console.print(f"simulating {events} isolation events into {out}")
        write_isolation(out, events, seed=7, events_per_file=max(events // 4, 1))
    return out


def trained(data: Path, data_dir: Path, name: str, epochs: int) -> Path | None:
    """The checkpoint of config ``name`` trained on ``data``; ``None`` if it is no network."""
    output = data_dir / "runs" / f"{name}_{data.name}_e{epochs}"
    checkpoint = output / "checkpoint.pt"
    if not checkpoint.is_file():
        config = load_config(
            shipped_config(name),
            [
                f"data.train=['{data}/isolation_muons_*.root']",
                f"output_dir={output}",
                "data.test_fraction=0.3",
                f"optimizer.epochs={epochs}",
            ],
        )
        console.print(f"training {name} ({config.model.type}, {epochs} epochs)")
        train(config, progress=False)
    loaded = load_checkpoint(checkpoint)
    is_network = any(p.requires_grad for p in loaded.model.parameters())
    return checkpoint if is_network else None


VARIANTS: dict[str, tuple[Precision, QuantFormat]] = {
    "int8 QDQ": (Precision.int8, QuantFormat.qdq),
    "int8 QOperator": (Precision.int8, QuantFormat.qoperator),
    "bf16": (Precision.bf16, QuantFormat.auto),
}
"""Both int8 formats, so the table shows the choice ``--quant-format auto`` makes."""


def exports(checkpoint: Path, out_dir: Path) -> dict[str, ExportReport]:
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {FP32: export_onnx(checkpoint, out_dir / "fp32.onnx", force=True)}
    for label, (precision, quant_format) in VARIANTS.items():
        # forced, so the table shows a variant the exporter would refuse as well
        reports[label] = export_onnx(
            checkpoint,
            out_dir / f"{label.replace(' ', '_')}.onnx",
            precision=precision,
            quant_format=quant_format,
            force=True,
        )
    return reports


def timing_rows(checkpoint: Path, rows: int) -> dict[str, npt.NDArray[Any]]:
    loaded = load_checkpoint(checkpoint)
    batch = loaded.held_out_test()
    index = np.resize(np.arange(batch.n_rows), rows)
    return {
        name: np.ascontiguousarray(batch.inputs()[name][index]) for name in loaded.model.input_names
    }


def rates(
    paths: dict[str, Path],
    inputs: dict[str, npt.NDArray[Any]],
    *,
    batch_size: int,
    repeat: int,
    threads: int,
    min_seconds: float,
) -> dict[str, float]:
    """Rows/s of each model, the models interleaved in every repeat, best of ``repeat``; each
    measurement cycles through the batches for at least ``min_seconds``."""
    sessions = {p: cpu_session(str(path), threads=threads) for p, path in paths.items()}
    rows = len(next(iter(inputs.values())))
    feeds = [
        {name: value[start : start + batch_size] for name, value in inputs.items()}
        for start in range(0, rows, batch_size)
    ]
    for session in sessions.values():
        session.run(None, feeds[0])
    best = dict.fromkeys(sessions, 0.0)
    for _ in range(repeat):
        for variant, session in sessions.items():
            best[variant] = max(best[variant], timed_rate(session, feeds, min_seconds))
    return best


def measure(args: argparse.Namespace) -> tuple[list[Row], tuple[float, ...], tuple[float, ...]]:
    data = simulate(args.data_dir, args.events)
    rows: list[Row] = []
    load_before = os.getloadavg()
    for name in args.configs or network_configs():
        checkpoint = trained(data, args.data_dir, name, args.epochs)
        if checkpoint is None:
            console.print(f"{name}: not a network, skipped")
            continue
        reports = exports(checkpoint, args.data_dir / "onnx" / name)
        inputs = timing_rows(checkpoint, args.rows)
        measured = rates(
            {variant: r.onnx_path for variant, r in reports.items()},
            inputs,
            batch_size=args.batch_size,
            repeat=args.repeat,
            threads=args.threads,
            min_seconds=args.min_seconds,
        )
        model_type = reports[FP32].model_type
        first = reports["bf16"].precision
        assert first is not None
        rows.append(Row(name, model_type, FP32, measured[FP32], first.auc_fp32, 0.0, 0.0))
        for variant in VARIANTS:
            report = reports[variant].precision
            assert report is not None
            rows.append(
                Row(
                    name,
                    model_type,
                    variant,
                    measured[variant],
                    report.auc,
                    report.auc_loss,
                    report.max_abs_diff,
                )
            )
        console.print(f"{name}: done", highlight=False)
    return rows, load_before, os.getloadavg()


MATRIX_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
CEILING_ROWS = 65_536
CEILING_WIDTHS = (32, 64, 128, 256)


def cpu_matrix_flags() -> str:
    """Which of :data:`MATRIX_FLAGS` the CPU has, from /proc/cpuinfo."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):  # x86, ARM
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in MATRIX_FLAGS)


def matmul_graph(width: int, int8: bool) -> bytes:
    """One [N, width] x [width, width] product: MatMul in fp32, QLinearMatMul (u8 x s8) in int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        scalars = {"xs": np.float32(0.02), "xz": np.uint8(128), "ws": np.float32(0.01)}
        scalars |= {"wz": np.int8(0), "ys": np.float32(0.5), "yz": np.uint8(128)}
        weights = [numpy_helper.from_array(rng.integers(-127, 128, (width, width), np.int8), "w")]
        weights += [numpy_helper.from_array(np.array(v), name) for name, v in scalars.items()]
        node = helper.make_node(
            "QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"]
        )
        dtype = TensorProto.UINT8
    else:
        weights = [numpy_helper.from_array(rng.normal(size=(width, width)).astype("f4"), "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        dtype = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "matmul",
        [helper.make_tensor_value_info("x", dtype, ["N", width])],
        [helper.make_tensor_value_info("y", dtype, ["N", width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def matmul_seconds(width: int, int8: bool, threads: int, repeat: int) -> float:
    """The best of ``repeat`` runs of :func:`matmul_graph` on :data:`CEILING_ROWS` rows."""
    session = cpu_session(matmul_graph(width, int8), threads=threads)
    values = np.random.default_rng(1).random((CEILING_ROWS, width)) * 200
    x = values.astype(np.uint8 if int8 else np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return best


def ceiling_table(threads: int, repeat: int) -> Table:
    out = Table(
        title=f"The ceiling: one matrix product of {CEILING_ROWS:,} rows, int8 against fp32"
    )
    for column in ("width", "fp32 ms", "int8 ms", "int8 × fp32"):
        out.add_column(column, justify="right")
    for width in CEILING_WIDTHS:
        fp32 = matmul_seconds(width, False, threads, repeat)
        int8 = matmul_seconds(width, True, threads, repeat)
        out.add_row(str(width), f"{fp32 * 1e3:.2f}", f"{int8 * 1e3:.2f}", f"{fp32 / int8:.2f}")
    return out


def table(rows: list[Row]) -> Table:
    out = Table(title="fp32 against int8 and bf16, ONNX Runtime CPU")
    for column in (
        "config",
        "type",
        "model",
        "rows/s",
        "× fp32",
        "AUC",
        "AUC loss",
        "max |Δ score|",
        "target",
    ):
        out.add_column(
            column,
            justify="left" if column in {"config", "type", "model"} else "right",
        )
    fp32_rate = {row.config: row.rate for row in rows if row.variant == FP32}
    for row in rows:
        ratio = row.rate / fp32_rate[row.config]
        reduced = row.variant != FP32
        met = ratio >= TARGET_SPEEDUP and row.auc_loss < TARGET_AUC_LOSS
        out.add_row(
            row.config if not reduced else "",
            row.model_type if not reduced else "",
            row.variant,
            f"{row.rate:,.0f}",
            f"{ratio:.2f}",
            f"{row.auc:.4f}",
            f"{row.auc_loss:+.4f}" if reduced else "",
            f"{row.max_abs_diff:.3g}" if reduced else "",
            ("met" if met else "missed") if reduced else "",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=8_000, help="simulated events")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of each model")
    parser.add_argument("--rows", type=int, default=20_000, help="rows timed per model")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="least time of each measurement"
    )
    parser.add_argument("--configs", nargs="*", help="shipped configs (default: every isolation_*)")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data" / "precision")
    parser.add_argument(
        "--ceiling-only", action="store_true", help="only the matrix-product ceiling table"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    stdout = Console(width=160)
    if args.ceiling_only:
        stdout.print(ceiling_table(args.threads, args.repeat))
        stdout.print(f"CPU: {cpu_matrix_flags()}", highlight=False)
        return
    rows, before, after = measure(args)
    stdout.print(table(rows))
    stdout.print(ceiling_table(args.threads, args.repeat))
    stdout.print(f"CPU: {cpu_matrix_flags()}", highlight=False)
    stdout.print(
        f"{args.events} simulated events, {args.epochs} epochs, {args.rows} rows cycled in "
        f"batches of {args.batch_size} for >= {args.min_seconds:g} s, {args.threads} ONNX "
        f"Runtime thread(s), best of {args.repeat}; load average before "
        f"{before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
        f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} on {os.cpu_count()} CPUs",
        highlight=False,
    )
    stdout.print(
        f"target: int8 or bf16 >= {TARGET_SPEEDUP:g}x fp32 with an AUC loss < {TARGET_AUC_LOSS:g}",
        highlight=False,
    )


if __name__ == "__main__":
    main()
