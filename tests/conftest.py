"""Shared fixtures: a real ``redis-server`` on loopback for the whole session.

Without CUDA, Triton kernels run under the CPU interpreter: ``TRITON_INTERPRET`` is read
once, when triton is first imported, so it is set here, before any test module loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.net import free_port


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 (no persistence, own temp dir).

    Attributes:
        port: TCP port it listens on (kept across :meth:`stop` / :meth:`start`).
        url: ``redis://127.0.0.1:{port}/0``.
        pid: process id of the running server (``None`` while stopped).
    """

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self._binary = binary
        self._workdir = workdir
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (empty: nothing persisted) and wait until it answers PING."""
        assert not self.running, "redis-server already running"
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self._workdir)]  # fmt: skip
        with open(self._workdir / "redis.log", "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self._workdir)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    log_text = (self._workdir / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}:\n{log_text}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not answer PING in {timeout_s} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL after 5 s); its data is lost."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A session-wide ``redis-server``; tests that stop it must start it again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (install the Debian/Ubuntu package `redis-server`)")
    with tempfile.TemporaryDirectory(prefix="tandem-redis-") as workdir:
        server = RedisServer(binary, free_port(), Path(workdir))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis, emptied (FLUSHALL) before the test; restarted if a test left it down."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
