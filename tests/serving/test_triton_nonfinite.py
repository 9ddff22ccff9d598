"""The served Python backend refuses NaN and inf inputs per request, for any gRPC client."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from conftest import PFN

from bsym.export.triton.common import Flavour
from bsym.export.triton.parse import model_from_config, parse_config
from bsym.export.triton.render import render_config
from bsym.serving.serve import ServedRepository
from bsym.serving.triton_backend import model as backend

pytestmark = pytest.mark.triton

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
aio = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] not installed")

Array = npt.NDArray[Any]
ROWS = 6
SLOTS = 5
"""Constituent slots sent to the PFN, whose constituent axis is dynamic (-1)."""


def pfn_inputs(url: str, seed: int) -> dict[str, Array]:
    """Finite random inputs of the served PFN's shapes and types, ``ROWS`` rows."""
    rng = np.random.default_rng(seed)
    with grpcclient.InferenceServerClient(url) as client:
        metadata = client.get_model_metadata(PFN, as_json=True)
    inputs = {}
    for tensor in metadata["inputs"]:
        shape = [ROWS, *(SLOTS if int(dim) < 0 else int(dim) for dim in tensor["shape"][1:])]
        if tensor["datatype"] == "BOOL":
            inputs[tensor["name"]] = rng.random(shape) < 0.5
        else:
            inputs[tensor["name"]] = rng.normal(size=shape).astype(np.float32)
    return inputs


def request(inputs: dict[str, Array], module: Any) -> list[Any]:
    tensors = []
    for name, array in inputs.items():
        tensor = module.InferInput(
            name, list(array.shape), "BOOL" if array.dtype == bool else "FP32"
        )
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def score(url: str, inputs: dict[str, Array]) -> Array:
    with grpcclient.InferenceServerClient(url) as client:
        return np.asarray(client.infer(PFN, request(inputs, grpcclient)).as_numpy("score"))


def test_nan_and_inf_are_refused_naming_the_tensor(served_repository: ServedRepository) -> None:
    url = served_repository.grpc_url
    finite = pfn_inputs(url, seed=1)
    assert np.all(np.isfinite(score(url, finite)))
    bad = {name: array.copy() for name, array in finite.items()}
    bad["constituents"][0, 0, 0] = np.nan
    bad["constituents"][1, 0, :2] = np.inf
    with pytest.raises(grpcclient.InferenceServerException) as caught:
        score(url, bad)
    message = caught.value.message()
    assert f"model '{PFN}': input tensor 'constituents' has 3 non-finite values" in message
    assert "(1 NaN, 2 inf)" in message and "reject_nonfinite" in message


def test_other_requests_of_a_batch_still_score(served_repository: ServedRepository) -> None:
    url = served_repository.grpc_url
    batches = [pfn_inputs(url, seed=10 + k) for k in range(8)]
    expected = [score(url, inputs) for inputs in batches]
    batches[3]["constituents"][2, 1, 0] = -np.inf

    async def send_all() -> list[Any]:
        async with aio.InferenceServerClient(url) as client:
            calls = [client.infer(PFN, request(inputs, aio)) for inputs in batches]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(send_all())
    assert isinstance(results[3], aio.InferenceServerException)
    assert "input tensor 'constituents' has 1 non-finite values" in results[3].message()
    for index, result in enumerate(results):
        if index != 3:
            np.testing.assert_array_equal(result.as_numpy("score"), expected[index])


def test_the_backend_check_and_its_switch() -> None:
    finite = {"constituents": np.zeros((2, 3), np.float32), "mask": np.ones((2, 3), bool)}
    assert backend.nonfinite_problem(finite) is None
    finite["globals"] = np.array([[np.nan, 1.0], [np.inf, -np.inf]], np.float32)
    problem = backend.nonfinite_problem(finite)
    assert problem is not None
    assert problem.startswith("input tensor 'globals' has 3 non-finite values of 4 (1 NaN, 2 inf)")
    parameters = {"parameters": {"reject_nonfinite": {"string_value": "false"}}}
    assert backend.rejects_nonfinite(parameters, PFN) is False
    assert backend.rejects_nonfinite({"parameters": {}}, PFN) is True
    with pytest.raises(ValueError, match='must be "true" or "false", found "no"'):
        backend.rejects_nonfinite({"parameters": {"reject_nonfinite": {"string_value": "no"}}}, PFN)


def test_the_switch_survives_parse_and_render(served_repository: ServedRepository) -> None:
    config_path = served_repository.repository / PFN / "config.pbtxt"
    text = config_path.read_text(encoding="utf-8")
    assert 'key: "reject_nonfinite"\n    value: { string_value: "true" }' in text
    off = text.replace('string_value: "true"', 'string_value: "false"')
    model = model_from_config(parse_config(off), ["prompt"])
    assert model.reject_nonfinite is False
    assert 'string_value: "false"' in render_config(model, Flavour.cpu)
