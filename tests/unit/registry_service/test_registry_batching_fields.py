"""A deployment's preferred batch sizes and execution in the registry: validation (the field is
named), the stored JSON (old specs without them still read), the protobuf form and the live
form written to Redis."""

from __future__ import annotations

import json

import pytest

from modelyard.errors import InvalidArgument
from modelyard.v1 import registry_pb2
from registry_service.convert import deployment_spec_from_proto, deployment_to_proto
from registry_service.deployments import check_deployment, live_deployment
from registry_service.records import DeploymentSpec, RoutingState, VersionState


def check(spec: DeploymentSpec) -> None:
    check_deployment(spec, model="demo", aliases={"production": 1}, versions={1: VersionState.ACTIVE})


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (DeploymentSpec(preferred_batch_sizes=(0, 8)), "deployment.preferred_batch_sizes", "0"),
        (DeploymentSpec(preferred_batch_sizes=(-4,)), "deployment.preferred_batch_sizes", "-4"),
        (
            DeploymentSpec(max_batch_size=16, preferred_batch_sizes=(8, 32)),
            "deployment.preferred_batch_sizes",
            "32 is larger than max_batch_size (16)",
        ),
        (DeploymentSpec(execution="fast"), "deployment.execution", "'fast'"),
        (DeploymentSpec(execution="LOOP"), "deployment.execution", "'LOOP'"),
        (DeploymentSpec(execution="loop", instances=2), "deployment.execution", "instances must be 1"),
    ],
)
def test_bad_batching_settings_are_refused_with_the_field(
    spec: DeploymentSpec, field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check(spec)
    assert caught.value.field == field
    assert words in caught.value.message


@pytest.mark.parametrize(
    "spec",
    [
        DeploymentSpec(),
        # Without max_batch_size the registry cannot know the servers' default: the model
        # servers judge it.
        DeploymentSpec(preferred_batch_sizes=(8, 512)),
        DeploymentSpec(max_batch_size=32, preferred_batch_sizes=(1, 16, 32)),
        DeploymentSpec(execution="auto", instances=4),
        DeploymentSpec(execution="thread", instances=4),
        DeploymentSpec(execution="loop", instances=1),
        DeploymentSpec(execution="loop"),
    ],
)
def test_good_batching_settings_pass(spec: DeploymentSpec) -> None:
    check(spec)


def test_the_stored_json_round_trips_and_old_specs_read_with_defaults() -> None:
    spec = DeploymentSpec(max_batch_size=32, preferred_batch_sizes=(8, 16), execution="thread")
    assert DeploymentSpec.from_json(spec.to_json()) == spec

    old = json.loads(DeploymentSpec(max_batch_size=4).to_json())
    del old["preferred_batch_sizes"], old["execution"]
    assert DeploymentSpec.from_json(json.dumps(old)) == DeploymentSpec(max_batch_size=4)


def test_proto_sizes_are_sorted_and_unique_and_come_back_unchanged() -> None:
    spec = deployment_spec_from_proto(
        registry_pb2.Deployment(preferred_batch_sizes=[32, 8, 16, 8], execution="loop")
    )
    assert (spec.preferred_batch_sizes, spec.execution) == ((8, 16, 32), "loop")

    message = deployment_to_proto(
        RoutingState(model="demo", aliases={}, epoch=3, spec=spec, placed_versions=())
    )
    assert (list(message.preferred_batch_sizes), message.execution) == ([8, 16, 32], "loop")
    assert deployment_spec_from_proto(message) == spec


def test_the_live_form_carries_them_and_unset_stays_unset() -> None:
    spec = DeploymentSpec(preferred_batch_sizes=(4, 8), execution="thread")
    live = live_deployment(RoutingState(model="demo", aliases={}, epoch=1, spec=spec, placed_versions=(1,)))
    assert (live.preferred_batch_sizes, live.execution) == ([4, 8], "thread")

    unset = live_deployment(
        RoutingState(model="demo", aliases={}, epoch=1, spec=DeploymentSpec(), placed_versions=(1,))
    )
    assert (unset.preferred_batch_sizes, unset.execution) == ([], None)
