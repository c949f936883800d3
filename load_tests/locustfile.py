"""The Modelyard locust users and load shape: `Predict` on `modelyard.v1.InferenceService`,
`ModelInfer` on the Open Inference Protocol endpoint, and a staged shape for spikes.

Run it through the scenario runner (`python -m load_tests run steady`), or by hand::

    locust -f load_tests/locustfile.py --headless --host 127.0.0.1:50051 \
        -u 8 -r 8 -t 30s --model demo PredictUser
"""

from __future__ import annotations

import array
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from locust import LoadTestShape, constant, events, task
from locust.env import Environment

# Locust puts this file's own directory on sys.path, not the repository root that holds the
# `load_tests` package (and `modelyard`, when it is not installed).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from load_tests.grpc_user import GrpcUser  # noqa: E402 - switches grpcio to gevent on import
from load_tests.stages import Stage, parse_stages  # noqa: E402
from modelyard.oip import grpc_service_pb2 as oip  # noqa: E402
from modelyard.oip import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from modelyard.v1 import inference_service_pb2 as inf  # noqa: E402
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc  # noqa: E402
from modelyard.v1 import tensor_pb2  # noqa: E402

__all__ = ["PredictUser", "OipInferUser", "StagesShape"]

# The versions that answered, per process; written at the end for scenarios that check them.
served_versions: Counter[int] = Counter()


# locust leaves EventHook.add_listener unannotated.
@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("modelyard")
    group.add_argument("--model", default="demo", help="Model to call.")
    group.add_argument("--alias", default="", help="Alias to select; empty means production.")
    group.add_argument("--input-name", default="input", help="Name of the model's input tensor.")
    group.add_argument("--features", type=int, default=64, help="Input width: float32 [rows, features].")
    group.add_argument("--rows", type=int, default=1, help="Rows per request (the batch dimension).")
    group.add_argument("--deadline-s", type=float, default=10.0, help="Deadline of each call.")
    group.add_argument("--stages", default="", help="Load stages, e.g. '10s:8@8,5s:32@32,10s:8@8'.")
    group.add_argument("--served-versions-file", default="", help="Write the versions that answered here.")
    group.add_argument("--started-file", default="", help="Create this file when the test starts.")


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _mark_started(environment: Environment, **_: Any) -> None:
    # The runner times its actions (promote, kill) from this moment, not from process start:
    # importing locust and the stubs takes a second or two on a busy machine.
    path = environment.parsed_options.started_file if environment.parsed_options else ""
    if path:
        with open(path, "w") as out:
            out.write("started\n")


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _write_served_versions(environment: Environment, **_: Any) -> None:
    path = environment.parsed_options.served_versions_file if environment.parsed_options else ""
    if path:
        with open(path, "w") as out:
            json.dump({str(v): n for v, n in sorted(served_versions.items())}, out)


def _input_bytes(rows: int, features: int, seed: int) -> bytes:
    generator = random.Random(seed)
    values = array.array("f", (generator.uniform(-1.0, 1.0) for _ in range(rows * features)))
    # The wire format is little-endian; array uses the machine's order.
    if array.array("H", [1]).tobytes() != b"\x01\x00":
        values.byteswap()
    return values.tobytes()


class PredictUser(GrpcUser):
    """Calls `modelyard.v1.InferenceService/Predict` back to back (a closed loop)."""

    stub_class = inf_grpc.InferenceServiceStub
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.deadline_s = options.deadline_s
        self.request = inf.PredictRequest(
            model=options.model,
            alias=options.alias,
            inputs=[
                tensor_pb2.Tensor(
                    name=options.input_name,
                    data_type=tensor_pb2.DATA_TYPE_FP32,
                    shape=[options.rows, options.features],
                    raw=_input_bytes(options.rows, options.features, seed=id(self)),
                )
            ],
        )

    @task
    def predict(self) -> None:
        reply = self.call(self.stub.Predict, self.request, timeout=self.deadline_s)
        if reply is not None:
            served_versions[reply.version] += 1


class OipInferUser(GrpcUser):
    """Calls `inference.GRPCInferenceService/ModelInfer` (KServe v2) with `raw_input_contents`,
    the way `tritonclient` and `perf_analyzer` do."""

    stub_class = oip_grpc.GRPCInferenceServiceStub
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.deadline_s = options.deadline_s
        self.request = oip.ModelInferRequest(
            model_name=options.model,
            model_version=options.alias,
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name=options.input_name,
                    datatype="FP32",
                    shape=[options.rows, options.features],
                )
            ],
            raw_input_contents=[_input_bytes(options.rows, options.features, seed=id(self))],
        )

    @task
    def model_infer(self) -> None:
        reply = self.call(self.stub.ModelInfer, self.request, timeout=self.deadline_s)
        if reply is not None and reply.model_version.isdigit():
            served_versions[int(reply.model_version)] += 1


class StagesShape(LoadTestShape):
    """Users over time from `--stages` (`DURATION:USERS@SPAWN_RATE,...`); without it, the
    usual `-u`/`-r`/`-t` options apply."""

    use_common_options = True

    def _stages(self) -> list[Stage]:
        if not hasattr(self, "_parsed"):
            options = self.runner.environment.parsed_options if self.runner else None
            self._parsed = parse_stages(options.stages if options else "")
        return self._parsed

    def tick(self) -> tuple[int, float] | None:
        stages = self._stages()
        run_time = self.get_run_time()  # type: ignore[no-untyped-call]  # unannotated in locust
        if not stages:
            options = self.runner.environment.parsed_options if self.runner else None
            if options is None or (options.run_time and run_time >= options.run_time):
                return None
            return options.num_users or 1, options.spawn_rate or 1
        elapsed = 0.0
        for stage in stages:
            elapsed += stage.duration_s
            if run_time < elapsed:
                return stage.users, stage.spawn_rate
        return None
