"""The pure rules of the proof of a deployment change: which changes need one, which model
server can run a device, when a report is beyond the tolerance, which inputs lack a baseline."""

from __future__ import annotations

import pytest

from modelyard.coordination import ServiceRecord, VersionRecord
from modelyard.errors import FailedPrecondition
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service.proof import beyond_tolerance, can_run, choose_server, missing_baselines, needs_proof
from registry_service.records import ArtifactFormat, DeploymentSpec, VersionState
from registry_service.records import VersionRecord as RegistryVersion


def server(
    name: str, devices: list[str], *, draining: bool = False, held: int = 0, kind: str = "model_server"
) -> ServiceRecord:
    versions = [VersionRecord(model="m", version=i, state="ready") for i in range(held)]
    return ServiceRecord(
        id=name, kind=kind, address=f"{name}:1", devices=devices, draining=draining, versions=versions
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (DeploymentSpec(), DeploymentSpec(precision="bf16", max_abs_error=0.1), True),
        (DeploymentSpec(), DeploymentSpec(device="cuda", min_top1_agreement=0.99), True),
        (DeploymentSpec(), DeploymentSpec(optimization="int8_dynamic", max_abs_error=0.1), True),
        # No tolerance: nothing to judge by (the change goes through as before).
        (DeploymentSpec(), DeploymentSpec(precision="bf16"), False),
        # The defaults spelled out are no change.
        (DeploymentSpec(), DeploymentSpec(precision="fp32", optimization="none", max_abs_error=0.1), False),
        # Only the tolerance or the batching changes: the setting is the same.
        (DeploymentSpec(precision="bf16"), DeploymentSpec(precision="bf16", max_abs_error=0.1), False),
        (DeploymentSpec(max_abs_error=0.1), DeploymentSpec(max_abs_error=0.1, max_batch_size=64), False),
        # Going back to fp32 is a change too (against fp32 eager on the CPU it shows ~0).
        (DeploymentSpec(precision="bf16"), DeploymentSpec(max_abs_error=0.1), True),
    ],
)
def test_a_change_of_device_precision_or_optimization_under_a_tolerance_needs_proof(
    old: DeploymentSpec, new: DeploymentSpec, expected: bool
) -> None:
    assert needs_proof(old, new) is expected


def test_a_device_is_run_only_by_a_model_server_that_has_it() -> None:
    cpu, gpu, old = server("a", ["cpu"]), server("b", ["cpu", "cuda:0", "cuda:1"]), server("c", [])
    for device in ("", "auto", "cpu", "CPU"):
        assert can_run(cpu, device) and can_run(old, device)
    assert not can_run(cpu, "cuda") and not can_run(old, "cuda:0")  # no field: the CPU only
    assert can_run(gpu, "cuda") and can_run(gpu, "cuda:1") and not can_run(gpu, "cuda:2")


def test_the_proof_runs_on_a_live_able_model_server_and_says_what_the_cluster_has() -> None:
    services = [
        server("registry", [], kind="registry"),
        server("gpu-draining", ["cpu", "cuda:0"], draining=True),
        server("busy", ["cpu"], held=3),
        server("idle", ["cpu"]),
    ]
    assert choose_server(services, "cpu").id == "idle"  # the fewest versions held
    with pytest.raises(FailedPrecondition, match=r"no model server can run device 'cuda:0'.*have cpu\)"):
        choose_server(services, "cuda:0")
    with pytest.raises(FailedPrecondition, match="no model server is up"):
        choose_server(services[:2], "cpu")


def test_a_report_is_judged_by_each_tolerance_set() -> None:
    report = registry_pb2.OptimizationReport(max_abs_error=0.5, max_rel_error=0.01, top1_agreement=0.97)
    assert beyond_tolerance(report, None, None) is None
    assert beyond_tolerance(report, 1.0, 0.95) is None
    assert beyond_tolerance(report, 0.1, None) == "max abs error 0.5 > max_abs_error 0.1"
    assert beyond_tolerance(report, None, 0.99) == "top-1 agreement 0.9700 < min_top1_agreement 0.9900"
    # No classifier-shaped output: the top-1 tolerance has nothing to judge.
    assert beyond_tolerance(registry_pb2.OptimizationReport(max_abs_error=0.5), None, 0.99) is None


def test_floating_inputs_without_a_baseline_are_named() -> None:
    signature = tensor_pb2.Signature(
        inputs=[
            tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2]),
            tensor_pb2.TensorSpec(name="ids", data_type=tensor_pb2.DATA_TYPE_INT64, shape=[-1, 2]),
            tensor_pb2.TensorSpec(name="z", data_type=tensor_pb2.DATA_TYPE_BF16, shape=[-1, 2]),
        ]
    )
    feature = registry_pb2.FeatureBaseline(mean=0.0, std=1.0)
    version = RegistryVersion(
        model="m", version=1, format=ArtifactFormat.TORCHSCRIPT, sha256="0" * 64, size_bytes=1,
        signature=signature, description="", labels={}, metrics={}, created_by="", create_time=0.0,
        state=VersionState.ACTIVE,
        input_baselines=(registry_pb2.InputBaseline(input="x", features=[feature]),),
    )  # fmt: skip
    assert missing_baselines(version) == ["z"]  # integer inputs are zeros in any sample
