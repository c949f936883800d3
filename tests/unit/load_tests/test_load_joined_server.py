"""Which service id the server_lost scenario's own model server joins with: never one that
rendezvous placement would hand a version of another, fixed-replica model to."""

from __future__ import annotations

import pytest

from load_tests.joined_server import JoinError, pick_service_id
from model_server.placement import owners
from modelyard.coordination import Deployment

LIVE = ["model-server-1-aaaaaa"]


def test_any_id_when_no_other_model_has_a_fixed_replica_count() -> None:
    deployments = {
        "demo": Deployment(replicas=1, placed_versions=[1]),
        "other": Deployment(replicas=0, placed_versions=[1, 2]),
    }
    chosen = pick_service_id("demo", {}, deployments, LIVE)
    assert chosen.startswith("model-server-load-test-")


def test_the_id_takes_no_version_of_a_fixed_replica_model() -> None:
    # Four live servers, one replica each: a random id wins a given version about 1 time in 5.
    live = [f"model-server-{i}-aaaaaa" for i in range(4)]
    deployments = {
        "other": Deployment(replicas=1, placed_versions=[1, 2]),
        "aliased": Deployment(replicas=1),
    }  # places its aliased versions
    aliases = {"aliased": ({"production": 7}, 1)}
    for _ in range(20):
        chosen = pick_service_id("demo", aliases, deployments, live)
        for model, version in [("other", 1), ("other", 2), ("aliased", 7)]:
            assert chosen not in owners(model, version, [*live, chosen], 1)


def test_no_such_id_is_refused() -> None:
    # One live server, 60 versions on one replica: no id loses all 60 draws.
    deployments = {"other": Deployment(replicas=1, placed_versions=list(range(1, 61)))}
    with pytest.raises(JoinError, match="would move versions of other models"):
        pick_service_id("demo", {}, deployments, LIVE, attempts=20)
