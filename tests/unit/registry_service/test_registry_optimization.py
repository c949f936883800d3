"""Optimisation settings and reports in the registry: the deployment's profile and tolerance
(validated, stored, live form), and the reports stored per version (one per profile,
precision and device, the latest kept)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.errors import InvalidArgument, VersionNotFound
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service import store_models
from registry_service.convert import deployment_spec_from_proto, deployment_to_proto, version_to_proto
from registry_service.db import Database
from registry_service.deployments import check_deployment, live_deployment
from registry_service.records import (
    ArtifactFormat,
    DeploymentSpec,
    RoutingState,
    UploadMetadata,
    VersionState,
)


def check(spec: DeploymentSpec) -> None:
    check_deployment(spec, model="demo", aliases={"production": 1}, versions={1: VersionState.ACTIVE})


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (DeploymentSpec(optimization="fast"), "deployment.optimization"),
        (DeploymentSpec(max_abs_error=-1.0), "deployment.max_abs_error"),
        (DeploymentSpec(max_abs_error=math.nan), "deployment.max_abs_error"),
        (DeploymentSpec(min_top1_agreement=1.5), "deployment.min_top1_agreement"),
    ],
)
def test_bad_optimisation_settings_are_refused_with_the_field(spec: DeploymentSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check(spec)
    assert caught.value.field == field


def test_the_profile_and_tolerance_round_trip_and_go_live() -> None:
    spec = DeploymentSpec(optimization="int8_dynamic", max_abs_error=0.01, min_top1_agreement=0.99)
    check(spec)
    assert DeploymentSpec.from_json(spec.to_json()) == spec
    state = RoutingState(model="demo", aliases={"production": 1}, epoch=3, spec=spec, placed_versions=(1,))
    message = deployment_to_proto(state)
    assert message.HasField("max_abs_error") and message.min_top1_agreement == 0.99
    assert deployment_spec_from_proto(message) == spec
    live = live_deployment(state)
    assert (live.optimization, live.max_abs_error, live.min_top1_agreement) == ("int8_dynamic", 0.01, 0.99)
    # Unset stays unset (no limit), and a spec stored before these fields still reads.
    assert not deployment_to_proto(RoutingState("demo", {}, 1, DeploymentSpec(), ())).HasField(
        "max_abs_error"
    )
    old = json.loads(DeploymentSpec().to_json())
    for name in ("optimization", "max_abs_error", "min_top1_agreement"):
        del old[name]
    assert DeploymentSpec.from_json(json.dumps(old)) == DeploymentSpec()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    opened = await Database(tmp_path / "registry.sqlite3").open()
    yield opened
    await opened.aclose()


def report(profile: str, max_abs: float, device: str = "cpu") -> registry_pb2.OptimizationReport:
    return registry_pb2.OptimizationReport(
        optimization=profile,
        precision="fp32",
        device=device,
        max_abs_error=max_abs,
        items_per_s_max_batch=9.0,
    )


async def test_reports_are_stored_per_profile_precision_and_device(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    signature = tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
        outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
    )
    await store.run(
        store_models.insert_version,
        UploadMetadata(
            model="demo", format=ArtifactFormat.TORCHSCRIPT, sha256="ab" * 32, signature=signature
        ),
        sha256="ab" * 32,
        size_bytes=1,
        created_by="",
    )
    assert (await store.read(store_models.get_version, "demo", 1)).optimization_reports == ()
    await store.run(
        store_models.record_optimization_reports,
        "demo",
        1,
        (report("int8_dynamic", 0.5), report("freeze", 0.0)),
    )
    await store.run(
        store_models.record_optimization_reports,
        "demo",
        1,
        (report("int8_dynamic", 0.1), report("freeze", 0.0, "cuda:0")),
    )
    got = await store.read(store_models.get_version, "demo", 1)
    assert [(r.optimization, r.device, r.max_abs_error) for r in got.optimization_reports] == [
        ("freeze", "cpu", 0.0),
        ("freeze", "cuda:0", 0.0),
        ("int8_dynamic", "cpu", 0.1),  # the latest measurement replaced the first
    ]
    assert len(version_to_proto(got).optimization_reports) == 3
    with pytest.raises(VersionNotFound):
        await store.run(store_models.record_optimization_reports, "demo", 2, (report("freeze", 0.0),))
