"""The CLI's own service token on the operator's local cluster: made from the secret the
cluster file names, for the cluster's addresses only, and never for a stopped cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

from modelyard.access.keys import ServiceTokens
from modelyard_cli.local_cluster import ClusterFile, tool_token_for

SECRET = b"0123456789abcdef0123456789abcdef"


def cluster_file(tmp_path: Path, pid: int) -> Path:
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(SECRET)
    info = ClusterFile(
        pid=pid,
        redis_url="redis://127.0.0.1:1",
        key_prefix="my",
        services={
            "gateway": "127.0.0.1:50051",
            "model-server-1": "127.0.0.1:50081",
            "registry": "127.0.0.1:50061",
        },
        secret_file=secret,
    )
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(info.to_json()))
    return path


def test_the_token_is_the_clusters_for_its_own_addresses_only(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, os.getpid())
    token = tool_token_for("127.0.0.1:50081", "optimize", path)
    assert token == ServiceTokens(SECRET).token("optimize")
    assert tool_token_for("localhost:50081", "optimize", path) == token
    assert tool_token_for("10.0.0.9:50081", "optimize", path) is None


def test_no_token_for_a_stopped_cluster_or_without_a_secret(tmp_path: Path) -> None:
    path = cluster_file(tmp_path, 2**22 + 12345)  # no such process
    assert tool_token_for("127.0.0.1:50081", "optimize", path) is None
    path = cluster_file(tmp_path, os.getpid())
    (tmp_path / "cluster.secret").unlink()
    assert tool_token_for("127.0.0.1:50081", "optimize", path) is None
