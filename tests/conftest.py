"""Shared fixtures: a real redis-server per test session (never the machine's 6379), a clean
database per test, and an opened CoordinationStore.

`--redis-url` points the suite at an existing Redis instead (it is flushed per test).

Services started in-process by the tests of other features run with access control `off`
(allowed: they listen on 127.0.0.1 only); the access tests set `access` explicitly, and every
cluster `LocalCluster` starts (the e2e tests, the load tests) enforces it, as `modelyard up` does.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from model_server.stats import INPUT_BINS, INPUT_MOMENTS
from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings
from modelyard_cli.embedded_redis import RedisServer

for _prefix in ("GATEWAY", "MODEL_SERVER", "REGISTRY", "MONITOR"):
    os.environ.setdefault(f"MODELYARD_{_prefix}_ACCESS__MODE", "off")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting one (its database is flushed per test)",
    )


@pytest.fixture(autouse=True)
def _fresh_process_metrics() -> Iterator[None]:
    """Each test leaves the process's Prometheus series empty, as the next test's fresh
    services would find them in a process of their own.

    The services a test starts in-process all export the one global registry, so without this
    every scrape carried the series of every earlier test's models: by the end of the monitor
    tests a monitor round took 0.7 s instead of 0.2 s, traffic fell to 7 items a second, and
    the drift tests' windows never filled. Autouse, so it is torn down after the test's own
    fixtures (its services) are.
    """
    yield
    for collector in list(REGISTRY._collector_to_names):  # no public listing of the collectors
        if isinstance(collector, MetricWrapperBase):
            collector.clear()
    INPUT_BINS.clear()
    INPUT_MOMENTS.clear()


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the session's Redis: an embedded redis-server on a free port in a temp dir."""
    url = request.config.getoption("--redis-url")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_settings(redis_url: str) -> Iterator[RedisSettings]:
    """Settings for a freshly flushed database."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    yield RedisSettings(url=redis_url, socket_timeout_s=2.0)


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[CoordinationStore]:
    async with CoordinationStore(redis_settings) as opened:
        yield opened
