"""The scorer's reader and ONNX Runtime share the cores: while the reader is at work, the
embedded backend runs on one thread fewer, and the scores do not change by a bit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import uproot

from bsym import contract
from bsym.configs import shipped_config
from bsym.export.onnx_export import to_onnx
from bsym.features import FeatureBatch, build_features, required_branches
from bsym.serving.backend import sharing_cores
from bsym.serving.onnx_backend import OnnxRuntimeBackend
from bsym.serving.prefetch import prefetched
from bsym.serving.scorer import score_files
from bsym.training.config import load_config
from bsym.training.models.sets import PFN


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_prefetched_says_when_the_producer_is_at_work() -> None:
    gate = threading.Event()

    def numbers() -> Iterator[int]:
        while not gate.is_set():  # computing: it needs a core
            sum(range(1000))
        yield from range(5)

    with prefetched(numbers, depth=2) as items:
        time.sleep(0.05)
        assert items.producing
        gate.set()
        # two items wait and the third cannot be put: the producer waits for room
        assert wait_for(lambda: not items.producing)
        assert list(items) == [0, 1, 2, 3, 4]
        assert not items.producing  # finished
        assert list(items) == []  # and stays exhausted


def test_a_producer_waiting_on_input_is_not_at_work() -> None:
    gate = threading.Event()

    def numbers() -> Iterator[int]:
        gate.wait(10)  # as a reader waiting on a remote file: no core needed
        yield 1

    with prefetched(numbers, depth=2) as items:
        time.sleep(0.05)
        assert wait_for(lambda: not items.producing)
        gate.set()
        assert list(items) == [1]


@pytest.fixture(scope="module")
def pfn_and_batch(
    isolation_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, FeatureBatch]:
    spec = load_config(shipped_config("isolation_pfn")).features
    with uproot.open(isolation_sample / "isolation_muons_000.root") as file:
        arrays = file["Muons"].arrays(required_branches(spec, "object", with_label=False))
    batch = build_features(arrays, spec, "object")
    torch.manual_seed(5)
    model = PFN(3, 1, [32, 32], [32]).eval()
    model.prepare(batch)
    proto = to_onnx(model, batch.inputs(), model.input_names, ("score",))
    props = {contract.FEATURE_SPEC_KEY: spec.to_json(), contract.MODEL_NAME_KEY: "share_pfn"}
    onnx.helper.set_model_props(proto, props)
    path = tmp_path_factory.mktemp("share") / "pfn.onnx"
    onnx.save(proto, str(path))
    return path, batch


def test_busy_batches_run_on_one_thread_fewer_with_the_same_scores(
    pfn_and_batch: tuple[Path, FeatureBatch],
) -> None:
    path, batch = pfn_and_batch
    backend = OnnxRuntimeBackend(path, threads=2, batch_size=64)
    inputs = batch.inputs()
    alone = backend.predict(inputs)["score"]
    asked: list[bool] = []

    def busy() -> bool:
        asked.append(True)
        return len(asked) % 2 == 1  # every other batch shares

    with sharing_cores(backend, busy):
        shared = backend.predict(inputs)["score"]
    batches = -(-batch.n_rows // 64)
    assert len(asked) == batches  # asked once per inference batch
    np.testing.assert_array_equal(shared, alone)
    narrow = backend._narrow_session.get_session_options()
    assert narrow.intra_op_num_threads == 1
    backend.predict(inputs)
    assert len(asked) == batches  # not asked outside the block


def test_a_one_thread_session_never_narrows(pfn_and_batch: tuple[Path, FeatureBatch]) -> None:
    path, batch = pfn_and_batch
    backend = OnnxRuntimeBackend(path, threads=1)
    asked: list[bool] = []

    def busy() -> bool:
        asked.append(True)
        return True

    with sharing_cores(backend, busy):
        backend.predict(batch.inputs())
    assert asked == [] and backend._narrow_session is None


def test_the_scorer_shares_the_cores_with_its_reader_and_scores_the_same(
    pfn_and_batch: tuple[Path, FeatureBatch], isolation_sample: Path, tmp_path: Path
) -> None:
    path, _ = pfn_and_batch
    source = str(isolation_sample / "isolation_muons_000.root")
    one = OnnxRuntimeBackend(path, threads=1)
    two = OnnxRuntimeBackend(path, threads=2)
    for backend, out in ((one, tmp_path / "one"), (two, tmp_path / "two")):
        summary = score_files([source], backend, out, progress=False, step_size=500)
        assert not summary.failed and len(summary.scored) == 1
    assert two._narrow_session is not None  # opened when the scorer's reader shared the cores
    found = [
        uproot.open(tmp_path / name / "isolation_muons_000.share_pfn.root")["Muons"][
            "share_pfn"
        ].array(library="np")
        for name in ("one", "two")
    ]
    np.testing.assert_array_equal(found[1], found[0])
