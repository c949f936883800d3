"""Child processes that never outlive their parent: own session (a terminal's Ctrl-C reaches
only the parent, which stops children in order) and PR_SET_PDEATHSIG on Linux (a SIGKILLed
parent takes its children with it)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

__all__ = ["spawn_child"]

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn making the child get SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: the child should run as little Python as possible.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    sigterm = int(signal.SIGTERM)
    parent_pid = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork() and prctl(): no signal would come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


_spawner_lock = threading.Lock()
_spawner: ThreadPoolExecutor | None = None


def _spawner_executor() -> ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelyard-spawner")
        return _spawner


def _popen(
    argv: list[str], out: IO[bytes], cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop it after
        # whatever depends on it; kill() can also reach its background forks.
        start_new_session=True,
        preexec_fn=_pdeathsig_preexec(),
    )


def spawn_child(
    argv: list[str], out: IO[bytes], cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child in its own session that gets SIGTERM if this process dies."""
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so a server
    # started from a short-lived thread (asyncio.to_thread, a fixture's worker) would be
    # SIGTERMed with it; fork from a thread that lives as long as the process instead.
    if threading.current_thread() is threading.main_thread() or not sys.platform.startswith("linux"):
        return _popen(argv, out, cwd, env)
    return _spawner_executor().submit(_popen, argv, out, cwd, env).result()
