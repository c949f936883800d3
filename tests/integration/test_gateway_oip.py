"""The Open Inference Protocol on the gateway's port, on real model servers: our generated OIP
stubs for every RPC, and the real `tritonclient` gRPC client, as a Triton user would run it.

tritonclient needs protobuf < 7 and its generated stubs clash with ours in one process, so it
runs in a subprocess from its own virtual environment, created once under
`.cache/tritonclient-venv` and reused (skipped, with the reason, only if it cannot be
installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from gateway.app import GatewayApp
from modelyard.coordination import CoordinationStore, Deployment
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip import grpc_service_pb2_grpc as oip_grpc
from tests.integration import test_gateway_routing as routing
from tests.integration.conftest import ClusterSource
from tests.integration.test_gateway_routing import MODEL, StartModelServer, serving

pytestmark = pytest.mark.integration

# The real cluster's fixtures (model servers on an in-memory artifact source, a gateway).
source = routing.source
start_model_server = routing.start_model_server
gateway = routing.gateway

REPO = Path(__file__).resolve().parents[2]
TRITON_VENV = REPO / ".cache" / "tritonclient-venv"
TRITON_REQUIREMENTS = [
    "tritonclient[grpc]==2.73.0",
    "protobuf==6.33.6",
    "grpcio==1.85.3",
    "numpy==2.4.6",
]

# Run by the tritonclient venv's python: metadata, config and one inference, as JSON.
TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

address, model, version, data = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
client = grpcclient.InferenceServerClient(url=address)
try:
    out = {"live": client.is_server_live(), "ready": client.is_model_ready(model, version)}
    meta = client.get_model_metadata(model, version, as_json=True)
    out["metadata"] = meta
    out["config"] = client.get_model_config(model, version, as_json=True)
    x = np.asarray(data, dtype=np.float32)
    inp = grpcclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version,
                          outputs=[grpcclient.InferRequestedOutput(meta["outputs"][0]["name"])])
    out["output"] = result.as_numpy(meta["outputs"][0]["name"]).tolist()
    out["served_version"] = result.get_response(as_json=True)["model_version"]
    out["statistics"] = client.get_inference_statistics(model, as_json=True)
    print(json.dumps(out))
finally:
    client.close()
"""


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The python of a venv with tritonclient, created once and cached in the repo."""
    python = TRITON_VENV / "bin" / "python"
    probe = [str(python), "-c", "import tritonclient.grpc"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(TRITON_VENV)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *TRITON_REQUIREMENTS],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", b"") or b""
        pytest.skip(
            f"cannot install {' '.join(TRITON_REQUIREMENTS)}: {exc}: {output.decode(errors='replace')[-500:]}"
        )
    return python


@pytest.fixture
async def oip_stub(gateway: GatewayApp) -> AsyncIterator[oip_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def cluster(
    gateway: GatewayApp, start_model_server: StartModelServer, store: CoordinationStore
) -> GatewayApp:
    await store.apply_aliases(
        MODEL, {"production": 1, "canary": 2}, 1, deployment=Deployment(placed_versions=[1, 2])
    )
    await start_model_server()
    await serving(gateway, {1: 1, 2: 1})
    return gateway


def _input(x: torch.Tensor, *, raw: bool) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))
    request = oip.ModelInferRequest(model_name=MODEL, id="call-1")
    if raw:
        request.raw_input_contents.append(x.numpy().tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.flatten().tolist())
    request.inputs.append(tensor)
    return request


def _output(response: oip.ModelInferResponse) -> torch.Tensor:
    shape = list(response.outputs[0].shape)
    return torch.from_numpy(
        np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(shape).copy()
    )


async def test_oip_rpcs_on_the_gateway_port(
    cluster: GatewayApp, oip_stub: oip_grpc.GRPCInferenceServiceStub, source: ClusterSource
) -> None:
    assert (await oip_stub.ServerLive(oip.ServerLiveRequest())).live
    assert (await oip_stub.ServerReady(oip.ServerReadyRequest())).ready
    assert (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL))).ready
    assert (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL, version="canary"))).ready
    assert not (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL, version="9"))).ready
    assert not (await oip_stub.ModelReady(oip.ModelReadyRequest(name="nope"))).ready
    server = await oip_stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "modelyard" and "model_configuration" in server.extensions

    meta = await oip_stub.ModelMetadata(oip.ModelMetadataRequest(name=MODEL))
    assert list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 3])]

    x = torch.randn(3, 8)
    for raw in (True, False):
        for version, expected in (("", 1), ("1", 1), ("2", 2), ("canary", 2), ("production", 1)):
            request = _input(x, raw=raw)
            request.model_version = version
            answer = await oip_stub.ModelInfer(request)
            assert (answer.model_name, answer.model_version, answer.id) == (MODEL, str(expected), "call-1")
            torch.testing.assert_close(_output(answer), source.run(MODEL, expected, x))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        bad = _input(x, raw=True)
        bad.raw_input_contents[0] = b"\x00" * 5
        await oip_stub.ModelInfer(bad)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    config = (await oip_stub.ModelConfig(oip.ModelConfigRequest(name=MODEL, version="canary"))).config
    assert config.name == MODEL and config.max_batch_size > 0
    assert [list(i.dims) for i in config.input] == [[8]]

    stats = await oip_stub.ModelStatistics(oip.ModelStatisticsRequest(name=MODEL))
    by_version = {s.version: s for s in stats.model_stats}
    assert set(by_version) == {"1", "2"}
    assert by_version["1"].inference_stats.success.count >= 6

    async def stream() -> AsyncIterator[oip.ModelInferRequest]:
        for i in range(10):
            request = _input(x, raw=True)
            request.id = f"s{i}"
            yield request
        failing = _input(x, raw=True)
        failing.id, failing.model_version = "bad", "nope"
        yield failing

    answers = {}
    async for message in oip_stub.ModelStreamInfer(stream()):
        answers[message.infer_response.id] = message
    assert set(answers) == {f"s{i}" for i in range(10)} | {"bad"}
    assert answers["bad"].error_message.startswith("NOT_FOUND")
    for i in range(10):
        assert not answers[f"s{i}"].error_message
        torch.testing.assert_close(_output(answers[f"s{i}"].infer_response), source.run(MODEL, 1, x))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await oip_stub.RepositoryIndex(oip.RepositoryIndexRequest())
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_tritonclient_gets_the_numbers_of_in_process_torch(
    cluster: GatewayApp, triton_python: Path, source: ClusterSource
) -> None:
    x = torch.randn(4, 8)
    for version, expected in (("", 1), ("canary", 2)):
        done = await asyncio.to_thread(
            subprocess.run,
            [
                str(triton_python),
                "-c",
                TRITON_SCRIPT,
                cluster.address,
                MODEL,
                version,
                json.dumps(x.tolist()),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert result["live"] and result["ready"]
        meta = result["metadata"]
        assert meta["name"] == MODEL and meta["platform"] == "pytorch_torchscript"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "8"]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "3"]}]
        assert int(result["config"]["config"]["max_batch_size"]) > 0
        assert result["served_version"] == str(expected)
        output = torch.tensor(result["output"], dtype=torch.float32)
        torch.testing.assert_close(output, source.run(MODEL, expected, x))
        names = {s["name"] for s in result["statistics"]["model_stats"]}
        assert names == {MODEL}
