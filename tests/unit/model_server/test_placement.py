"""Placement: placed versions (or aliased ones), rendezvous hashing over live model servers,
and deployment settings over the server's defaults."""

from __future__ import annotations

from model_server.batching import BatchConfig
from model_server.devices import ServingConfig
from model_server.placement import desired_versions, owners, serving_config
from modelyard.coordination import Deployment

DEFAULTS = ServingConfig(device="cpu", precision="fp32", batch=BatchConfig(max_batch_size=64))
SERVERS = [f"ms-{i}" for i in range(6)]


def test_replicas_zero_means_every_server_and_too_many_means_all() -> None:
    assert owners("m", 1, SERVERS, 0) == sorted(SERVERS)
    assert owners("m", 1, SERVERS, 10) == sorted(SERVERS)


def test_owners_are_deterministic_and_spread() -> None:
    picked = [tuple(owners("m", v, SERVERS, 2)) for v in range(1, 41)]
    assert picked == [tuple(owners("m", v, list(reversed(SERVERS)), 2)) for v in range(1, 41)]
    assert all(len(set(p)) == 2 for p in picked)
    # 40 versions over 6 servers: every server wins some.
    assert {s for p in picked for s in p} == set(SERVERS)


def test_a_leaving_server_moves_only_what_it_held() -> None:
    before = {v: set(owners("m", v, SERVERS, 2)) for v in range(1, 61)}
    after = {v: set(owners("m", v, SERVERS[:-1], 2)) for v in range(1, 61)}
    for v in before:
        if "ms-5" not in before[v]:
            assert after[v] == before[v]
        else:
            assert before[v] - {"ms-5"} <= after[v]


def test_placed_versions_win_and_aliases_are_the_fallback() -> None:
    aliases = {"a": ({"production": 3, "canary": 4}, 1), "b": ({"production": 7}, 1)}
    deployments = {"a": Deployment(placed_versions=[2, 3]), "b": Deployment()}
    desired = desired_versions(
        aliases, deployments, server_id="ms-0", live_servers=SERVERS, defaults=DEFAULTS
    )
    assert sorted(desired) == [("a", 2), ("a", 3), ("b", 7)]


def test_only_this_servers_share_is_desired_and_it_counts_itself_live() -> None:
    aliases = {"a": ({"production": 1}, 1)}
    deployments = {"a": Deployment(placed_versions=list(range(1, 31)), replicas=1)}
    shares = {
        server: desired_versions(
            aliases, deployments, server_id=server, live_servers=SERVERS[:3], defaults=DEFAULTS
        )
        for server in SERVERS[:3]
    }
    keys = [k for share in shares.values() for k in share]
    assert sorted(keys) == [("a", v) for v in range(1, 31)]  # each version exactly once
    # A server not yet in the membership still takes its share.
    alone = desired_versions(aliases, deployments, server_id="new", live_servers=[], defaults=DEFAULTS)
    assert len(alone) == 30


def test_deployment_settings_override_the_defaults_field_by_field() -> None:
    config = serving_config(
        Deployment(device="auto", precision="bf16", max_batch_size=8, max_queue_delay_ms=0.0), DEFAULTS
    )
    assert config.device == "auto" and config.precision == "bf16"
    assert config.batch == BatchConfig(
        max_batch_size=8,
        max_queue_delay_s=0.0,
        max_queue_size=DEFAULTS.batch.max_queue_size,
        instances=DEFAULTS.batch.instances,
    )
    assert serving_config(Deployment(), DEFAULTS) == DEFAULTS
    assert serving_config(None, DEFAULTS) == DEFAULTS
