"""The PFN isolation model on CPU and GPU: training time per epoch and forward throughput.

    .venv/bin/python benchmarks/bench_gpu.py                       # about 2-4 minutes
    .venv/bin/python benchmarks/bench_gpu.py --events 5000 --epochs 2 --seconds 0.5

On simulated muons (the isolation simulator, cached in ``--data-dir``) and the shipped
``isolation_pfn`` config (Φ 64-64-64, F 64-64, 32 cells × 3 features and log pT), it measures:

- training: seconds per epoch of :func:`bsym.training.fit.fit` (the loop ``bsym train`` runs),
  on each device, in float32 and with ``optimizer.autocast: bf16``; the first epoch (CUDA
  start-up, allocator warm-up) is reported apart from the median of the others;
- forward: rows per second of the PFN's forward pass in eval mode, with torch, in float32
  and under bf16 autocast, against the batch size: the reference for what a GPU Triton server
  running the same network can reach (Triton adds the transfer and batching on top).

Needs only torch, numpy and bsym (no onnxruntime-gpu). Without a CUDA device it says so and
measures the CPU column only. ``--json`` writes the numbers to a file as well.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bsym.configs import shipped_config
from bsym.devices import torch_device
from bsym.simulate.isolation import write_isolation
from bsym.training.config import TrainConfig, load_config
from bsym.training.dataset import load_training_data
from bsym.training.fit import Rows, autocast, fit
from bsym.training.models import NetworkModel, build_model, model_inputs
from bsym.training.train import with_input_ranges

HERE = Path(__file__).resolve().parent
console = Console(stderr=True)
BATCHES = (1, 64, 1024, 8192, 65536)
PRECISIONS = ("none", "bf16")


@dataclass(frozen=True)
class EpochTimes:
    device: str
    autocast: str
    rows: int
    batch_size: int
    first_s: float
    median_s: float
    epochs: int
    best_val_auc: float


@dataclass(frozen=True)
class Throughput:
    device: str
    autocast: str
    batch: int
    rows_per_second: float
    calls: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="simulated dimuon events")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training run (>= 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="training batch (rows)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--seconds", type=float, default=1.0, help="per forward measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data" / "gpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args()


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch_device("cuda:0"))
        console.print(f"CUDA device: {torch.cuda.get_device_name(0)}", highlight=False)
    else:
        console.print(
            f"no CUDA device is available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}): measuring the CPU column only",
            highlight=False,
        )
    return found


def config_for(data_dir: Path, args: argparse.Namespace, autocast_mode: str) -> TrainConfig:
    return load_config(
        shipped_config("isolation_pfn"),
        [
            f"data.train=['{data_dir}/isolation_muons_*.root']",
            f"output_dir={data_dir / 'runs'}",
            f"optimizer.epochs={args.epochs}",
            f"optimizer.patience={args.epochs}",
            f"optimizer.batch_size={args.batch_size}",
            f"optimizer.autocast={autocast_mode}",
        ],
    )


def simulate(data_dir: Path, events: int) -> None:
    marker = data_dir / f"events_{events}"
    if marker.exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("isolation_*.root"):
        old.unlink()
    console.print(f"simulating {events:,} events into {data_dir}", highlight=False)
    write_isolation(data_dir, events, seed=11)
    marker.touch()


def time_training(
    config: TrainConfig, device: torch.device, data: tuple[Rows, Rows, NetworkModel]
) -> EpochTimes:
    train_rows, validation_rows, template = data
    model = copy.deepcopy(template)
    stamps = [time.perf_counter()]

    def on_epoch(_: object) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    state = fit(
        model,
        train_rows,
        validation_rows,
        config.optimizer,
        seed=config.seed,
        on_epoch=on_epoch,
        device=device,
    )
    seconds = [b - a for a, b in itertools.pairwise(stamps)]
    return EpochTimes(
        device=str(device),
        autocast=config.optimizer.autocast,
        rows=train_rows.n_rows,
        batch_size=config.optimizer.batch_size,
        first_s=seconds[0],
        median_s=statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        epochs=len(seconds),
        best_val_auc=state.best_auc,
    )


def time_forward(
    model: NetworkModel,
    inputs: tuple[torch.Tensor, ...],
    device: torch.device,
    mode: str,
    batch: int,
    seconds: float,
) -> Throughput:
    rows = inputs[0].shape[0]
    repeat = -(-batch // rows)
    feed = tuple(torch.cat([t] * repeat)[:batch].to(device) for t in inputs)
    model = model.to(device).eval()

    def call() -> None:
        with torch.inference_mode(), autocast(device, mode):
            model(*feed)

    calls = _timed_calls(call, device, seconds)
    return Throughput(str(device), mode, batch, calls[0] * batch / calls[1], calls[0])


def _timed_calls(
    call: Callable[[], None], device: torch.device, seconds: float
) -> tuple[int, float]:
    """(calls, seconds) of ``call`` repeated for ``seconds`` after one warm-up call; each
    call waits for the device, as a server answering one request at a time would."""
    call()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        call()
        _sync(device)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first epoch is reported apart)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    found = devices()
    simulate(args.data_dir, args.events)
    base = config_for(args.data_dir, args, "none")
    loaded = load_training_data(base)
    train_batch, validation_batch = loaded.subset("train"), loaded.subset("validation")
    base = with_input_ranges(base, train_batch)
    torch.manual_seed(base.seed)
    template = build_model(base.model, base.features, train_batch)
    assert isinstance(template, NetworkModel)
    data = (Rows.of(template, train_batch), Rows.of(template, validation_batch), template)

    epochs: list[EpochTimes] = []
    for device in found:
        for mode in PRECISIONS:
            config = base.model_copy(
                update={"optimizer": base.optimizer.model_copy(update={"autocast": mode})}
            )
            console.print(f"training on {device}, autocast {mode}", highlight=False)
            epochs.append(time_training(config, device, data))

    inputs = model_inputs(template, validation_batch)
    forward: list[Throughput] = []
    for device in found:
        for mode in PRECISIONS:
            for batch in args.batches:
                forward.append(time_forward(template, inputs, device, mode, batch, args.seconds))
        template.to("cpu")
    show(epochs, forward, cuda=len(found) > 1)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(),
                    "cuda_device": torch.cuda.get_device_name(0) if len(found) > 1 else None,
                    "training": [asdict(e) for e in epochs],
                    "forward": [asdict(f) for f in forward],
                },
                indent=2,
            )
        )


def show(epochs: list[EpochTimes], forward: list[Throughput], *, cuda: bool) -> None:
    out = Console()
    table = Table(title="training: seconds per epoch (PFN isolation, bsym's fit loop)")
    for name in ("device", "autocast", "train rows", "batch", "first epoch s", "median epoch s"):
        table.add_column(name, justify="left" if name in {"device", "autocast"} else "right")
    table.add_column("best val AUC", justify="right")
    cpu = {e.autocast: e.median_s for e in epochs if e.device == "cpu"}
    for e in epochs:
        table.add_row(
            e.device,
            e.autocast,
            f"{e.rows:,}",
            str(e.batch_size),
            f"{e.first_s:.2f}",
            f"{e.median_s:.2f}",
            f"{e.best_val_auc:.4f}",
        )
    out.print(table)
    if cuda:
        for e in epochs:
            if e.device != "cpu":
                out.print(
                    f"GPU speed-up per epoch (autocast {e.autocast}): "
                    f"{cpu[e.autocast] / e.median_s:.1f}x",
                    highlight=False,
                )
    table = Table(title="forward pass: rows/s with torch (eval, inference_mode)")
    table.add_column("batch", justify="right")
    columns = list(dict.fromkeys((f.device, f.autocast) for f in forward))
    for device, mode in columns:
        table.add_column(f"{device} {'fp32' if mode == 'none' else mode}", justify="right")
    cells = {(f.device, f.autocast, f.batch): f.rows_per_second for f in forward}
    for batch in sorted({f.batch for f in forward}):
        table.add_row(
            f"{batch:,}",
            *(f"{cells[(device, mode, batch)]:,.0f}" for device, mode in columns),
        )
    out.print(table)
    if not cuda:
        out.print("no CUDA device was available: CPU figures only", highlight=False)


if __name__ == "__main__":
    main()
