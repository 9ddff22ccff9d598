"""An adopted weaver-style model in ``bsym score`` against the original in a plain loop.

    .venv/bin/python benchmarks/bench_adopt.py [--events 50000] [--threads 1]

One simulated isolation file (object layout; generated once under --data-dir). A weaver-style
PFN (``pf_features`` (N, F, P), ``pf_mask`` (N, 1, P), a ``preprocess.json``; built like the
tests' one) is adopted with ``bsym adopt``, then the same muons are scored
(a) by the original model in the loop a user writes: uproot reads the branches, numpy builds
    the padded cells and does weaver's standardisation, clipping and transpose, ONNX Runtime
    runs it;
(b) by ``bsym score`` (``score_files``, embedded backend) on the adopted model, friend trees
    written.
Both get the same ONNX Runtime thread count; muons/s, the ratio (b)/(a) and the load average
are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uproot

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from foreign_models import (  # noqa: E402
    WEAVER_CENTRE,
    WEAVER_SCALE,
    weaver_adoption,
    weaver_model,
)

from bsym.export.adopt import adopt  # noqa: E402
from bsym.features import build_features, detect_layout, required_branches  # noqa: E402
from bsym.serving.onnx_backend import OnnxRuntimeBackend  # noqa: E402
from bsym.serving.scorer import score_files  # noqa: E402
from bsym.simulate.isolation import write_isolation  # noqa: E402

STEP = 100_000
BATCH = 4096


def plain_loop(path: Path, model: Path, spec_source: OnnxRuntimeBackend, threads: int) -> int:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = spec_source.feature_spec
    muons = 0
    with uproot.open(path) as file:
        tree = file[spec.tree]
        layout = detect_layout(tree.keys(), spec)
        branches = required_branches(spec, layout, with_label=False)
        for arrays in tree.iterate(branches, step_size=STEP):
            inputs = build_features(arrays, spec, layout).inputs()
            mask = inputs["mask"]
            x = np.clip((inputs["constituents"] - WEAVER_CENTRE) * WEAVER_SCALE, -5, 5)
            features = (x * mask[..., None]).transpose(0, 2, 1).astype(np.float32)
            pf_mask = mask[:, None, :].astype(np.float32)
            for start in range(0, len(mask), BATCH):
                feed = {
                    "pf_features": np.ascontiguousarray(features[start : start + BATCH]),
                    "pf_mask": pf_mask[start : start + BATCH],
                }
                session.run(["softmax"], feed)
            muons += len(mask)
    return muons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=HERE / ".data" / "adopt")
    args = parser.parse_args()
    data = args.data_dir / f"events_{args.events}"
    path = data / "isolation_muons_000.root"
    if not path.is_file():
        shutil.rmtree(data, ignore_errors=True)
        write_isolation(data, args.events, seed=1, events_per_file=args.events)
    with tempfile.TemporaryDirectory(prefix="bench-adopt-") as tmp:
        work = Path(tmp)
        model, _, _ = weaver_model(work / "weaver")
        report = adopt(
            model, weaver_adoption(work / "weaver"), "weaver_pfn", [str(path)], work / "repo"
        )
        backend = OnnxRuntimeBackend(report.onnx_path, threads=args.threads)
        load_before = os.getloadavg()
        start = time.perf_counter()
        muons = plain_loop(path, model, backend, args.threads)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        summary = score_files([str(path)], backend, work / "out", progress=False)
        scored = time.perf_counter() - start
        load_after = os.getloadavg()
    assert summary.objects == muons and not summary.failed
    print(f"muons: {muons}, ONNX Runtime threads: {args.threads}, cpus: {os.cpu_count()}")
    print(f"(a) original model, plain loop: {muons / plain:,.0f} muons/s ({plain:.2f} s)")
    print(f"(b) adopted model, bsym score:  {muons / scored:,.0f} muons/s ({scored:.2f} s)")
    print(f"ratio (b)/(a): {plain / scored:.2f}")
    print(
        "load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}; parity max |Δ| "
        f"{max(report.max_abs_diff.values()):.2e}"
    )


if __name__ == "__main__":
    main()
