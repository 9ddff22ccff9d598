"""Scaling of ``bsym score --dask``: files x entries, serial against 1 and 2 Dask workers.

    .venv/bin/python benchmarks/bench_dask.py [--files 8] [--muons 100000] [--workers 1 2]

On ``--files`` files of ``--muons`` muons each (the data and PFN-like model of
bench_score.py, cached under --data-dir) it measures, in one run: the serial
``score_files`` with one ONNX Runtime thread, then for each worker count a
``LocalCluster`` of single-threaded worker processes scoring the same files with
``score_files_distributed`` (cluster start-up timed apart). It prints wall seconds,
muons/s, the speed-up over serial and the load average around each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from bench_score import HERE, MODEL_NAME, bench_spec, make_data, make_model
from distributed import Client, LocalCluster
from rich.console import Console
from rich.table import Table

from bsym.serving.defaults import DEFAULT_BATCH_SIZE
from bsym.serving.distributed import BackendSettings, ScoreSettings, score_files_distributed
from bsym.serving.scorer import ScoreSummary, model_file_identity, score_files

console = Console(stderr=True)


def run_serial(inputs: list[str], settings: ScoreSettings, out: Path) -> ScoreSummary:
    with settings.backend.open() as backend:
        return score_files(
            inputs, backend, out, step_size=settings.step_size, force=True, progress=False
        )


def run_dask(
    inputs: list[str], settings: ScoreSettings, out: Path, workers: int
) -> tuple[float, ScoreSummary]:
    """(cluster start-up seconds, summary of the scoring run)."""
    start = time.perf_counter()
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        startup = time.perf_counter() - start
        with settings.backend.open() as backend:
            summary = score_files_distributed(
                inputs, backend, settings, out, client, progress=False
            )
    return startup, summary


def main() -> None:
    args = parse_args()
    data_dir: Path = args.data_dir
    files = [
        make_data(data_dir / f"dask_muons_{args.muons}_{k:03d}.root", args.muons, seed=100 + k)
        for k in range(args.files)
    ]
    model = make_model(data_dir / f"{MODEL_NAME}.onnx", bench_spec())
    backend = BackendSettings(str(model), threads=1, batch_size=args.batch_size)
    with backend.open() as opened:
        settings = ScoreSettings(
            backend, model_file_identity(opened)[1], step_size=args.step_size, force=True
        )
    inputs = [str(path) for path in files]
    console.print(
        f"{args.files} files x {args.muons:,} muons; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rows: list[tuple[str, float, float, int, float, float]] = []
    out = data_dir / "dask_out"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    serial = run_serial(inputs, settings, out / "serial")
    rows.append(("serial, 1 thread", 0.0, serial.seconds, serial.objects, load, os.getloadavg()[0]))
    for workers in args.workers:
        load = os.getloadavg()[0]
        startup, summary = run_dask(inputs, settings, out / f"dask{workers}", workers)
        if summary.failed:
            raise SystemExit(f"{workers} workers: {summary.failed}")
        name = f"--dask local:{workers}"
        rows.append((name, startup, summary.seconds, summary.objects, load, os.getloadavg()[0]))
    table = Table(title=f"bsym score --dask: {args.files} files x {args.muons:,} muons")
    for column in ("run", "start-up s", "wall s", "muons/s", "speed-up", "load before/after"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, startup, seconds, objects, before, after in rows:
        table.add_row(
            name,
            f"{startup:.1f}",
            f"{seconds:.2f}",
            f"{objects / seconds:,.0f}",
            f"{serial.seconds / seconds:.2f}",
            f"{before:.2f} / {after:.2f}",
        )
    Console(width=120).print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=8, help="input files")
    parser.add_argument("--muons", type=int, default=100_000, help="muons per file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data", help="cache directory")
    parser.add_argument("--step-size", default="100 MB", help="uproot step size")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    return parser.parse_args()


if __name__ == "__main__":
    main()
