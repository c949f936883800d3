"""What the load-test runner calls a cluster with: the key and cluster secret it takes from a
cluster file only when the file is that cluster's, and the access mode its server_lost model
server runs with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from load_tests import cli
from load_tests.joined_server import JoinedModelServer
from modelyard.settings import RedisSettings
from modelyard_cli.local_cluster import ClusterFile

PREFIX = "MODELYARD_MODEL_SERVER_"


def _write_default_cluster_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterFile:
    monkeypatch.chdir(tmp_path)
    info = ClusterFile(
        pid=os.getpid(),
        redis_url="redis://127.0.0.1:1/0",
        key_prefix="my",
        services={"gateway": "127.0.0.1:2", "registry": "127.0.0.1:3"},
        api_key_file=tmp_path / "var" / "admin.key",
        secret_file=tmp_path / "var" / "cluster.secret",
    )
    cli.DEFAULT_CLUSTER_FILE.parent.mkdir(parents=True)
    cli.DEFAULT_CLUSTER_FILE.write_text(json.dumps(info.to_json()))
    return info


def test_the_default_cluster_file_is_used_for_the_gateway_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = _write_default_cluster_file(tmp_path, monkeypatch)
    assert cli._cluster_file(None, host=None) == info
    assert cli._cluster_file(None, host="127.0.0.1:2") == info
    assert cli._cluster_file(None, host="localhost:2") == info


def test_the_default_cluster_file_of_another_cluster_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_default_cluster_file(tmp_path, monkeypatch)
    # Its admin key and secret must not be sent to another cluster's gateway.
    assert cli._cluster_file(None, host="127.0.0.1:9") is None


def _server(token: str | None, secret_file: Path | None) -> JoinedModelServer:
    return JoinedModelServer(
        redis=RedisSettings(url="redis://127.0.0.1:1/0"),
        registry="127.0.0.1:3",
        gateway="127.0.0.1:2",
        model="demo",
        log_path=Path("unused.log"),
        note=lambda _: None,
        token=token,
        secret_file=secret_file,
    )


def test_the_joined_server_runs_with_the_clusters_access_mode(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    assert _server("key", secret)._access_env(PREFIX) == {
        f"{PREFIX}ACCESS__MODE": "enforce",
        f"{PREFIX}ACCESS__SERVICE_SECRET_FILE": str(secret),
    }
    # A TLS cluster without the secret at hand: its certificate identifies it.
    assert _server("key", None)._access_env(PREFIX) == {f"{PREFIX}ACCESS__MODE": "enforce"}
    # The gateway answered without a key: the cluster has access control off.
    assert _server(None, None)._access_env(PREFIX) == {f"{PREFIX}ACCESS__MODE": "off"}
