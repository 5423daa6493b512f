"""Runs the processes of a local Tandem cluster and stops them in order.

Lifecycle of each child, as ``tandem serve`` drives it:

1. ``spawn``: start the command in its own session (so a terminal's Ctrl-C reaches only
   the supervisor, which then stops the children in order), stdout and stderr appended
   to ``<run_dir>/<id>.log``.
2. ``wait_serving``: poll ``grpc.health.v1.Health/Check`` (service ``""``) of every child
   until each answers SERVING; fail fast with the log's tail when a child exits or the
   timeout passes.
3. ``check_exits``: while serving, a child that exits is a failure, except a worker
   that exits 0 (it drained after its own SIGTERM) while another worker of its kind
   is still running: that one is logged and the cluster serves on.
4. ``stop_all``: SIGTERM the routers' process groups and wait up to the grace period,
   then the workers', SIGKILL whatever is left after each grace period, reap all.

This module is torch-free and knows nothing about what the children are.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.security import open_channel
from engine.security_config import SecurityConfig

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
LOG_TAIL_LINES = 30


class StartupError(RuntimeError):
    """A child exited or did not report SERVING in time; the message has its log's tail."""


@dataclass(frozen=True)
class ComponentSpec:
    """One process of the cluster.

    Attributes:
        kind: ``"router"``, ``"prefill"`` or ``"decode"``.
        id: unique name (``router``, ``prefill-0``, ``decode-1``, ...); also the log's name.
        argv: the command line.
        host: address its servers bind to.
        port: gRPC port (health-checked).
        metrics_port: Prometheus port.
        transfer_port: KV receiver port (decode workers only).
    """

    kind: str
    id: str
    argv: tuple[str, ...]
    host: str
    port: int
    metrics_port: int
    transfer_port: int | None = None

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC server as bound."""
        return format_address(self.host, self.port)

    @property
    def metrics_address(self) -> str:
        """``host:port`` of the Prometheus endpoint as bound."""
        return format_address(self.host, self.metrics_port)

    @property
    def transfer_address(self) -> str | None:
        """``host:port`` of the KV receiver, or ``None``."""
        return None if self.transfer_port is None else format_address(self.host, self.transfer_port)

    @property
    def dial_address(self) -> str:
        """Where this machine reaches the gRPC server (loopback for a wildcard bind)."""
        return format_address("127.0.0.1" if self.host in WILDCARD_HOSTS else self.host, self.port)


@dataclass
class Child:
    """A started component."""

    spec: ComponentSpec
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def describe_exit(self) -> str:
        """``"<id> (pid N) exited with code C; last lines of <log>:\\n..."``."""
        return (
            f"{self.spec.id} (pid {self.pid}) exited with code {self.popen.returncode}; "
            f"last lines of {self.log}:\n{log_tail(self.log)}"
        )


class Supervisor:
    """Starts children, waits for their health, and stops them routers-first.

    Args:
        run_dir: directory of the log files (must exist).
        grace_s: seconds each group of children gets between SIGTERM and SIGKILL.
        env: variables added to every child's environment (the secrets).
        security: TLS of the health checks.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        grace_s: float = 10.0,
        env: Mapping[str, str] | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.grace_s = grace_s
        self.children: list[Child] = []
        #: Workers whose clean exit :meth:`check_exits` let pass.
        self.exited: list[Child] = []
        self._env = {**os.environ, **env} if env else None
        self._security = security or SecurityConfig()

    def spawn(self, spec: ComponentSpec) -> Child:
        """Starts ``spec.argv`` in a new session with output appended to ``<run_dir>/<id>.log``."""
        log = self.run_dir / f"{spec.id}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self._env,
            )
        child = Child(spec=spec, popen=popen, log=log)
        self.children.append(child)
        return child

    def wait_serving(self, timeout_s: float, stop: threading.Event, poll_s: float = 0.2) -> bool:
        """Blocks until every child reports SERVING.

        Returns:
            ``True`` when all are serving, ``False`` when ``stop`` was set first.

        Raises:
            StartupError: a child exited, or ``timeout_s`` seconds passed.
        """
        deadline = time.monotonic() + timeout_s
        channels = {
            child.spec.id: open_channel(child.spec.dial_address, self._security) for child in self.children
        }
        pending = list(self.children)
        try:
            while pending:
                if stop.is_set():
                    return False
                for child in list(pending):
                    if child.popen.poll() is not None:
                        raise StartupError(child.describe_exit())
                    if _is_serving(channels[child.spec.id]):
                        pending.remove(child)
                if pending and time.monotonic() > deadline:
                    raise StartupError(_timeout_message(pending, timeout_s))
                if pending:
                    stop.wait(poll_s)
            return True
        finally:
            for channel in channels.values():
                channel.close()

    def check_exits(self) -> tuple[list[Child], Child | None]:
        """Children that exited since the last call, split by :func:`tolerated_exit`.

        Returns:
            ``(drained, failed)``: workers that exited 0 with another of their kind still
            running, in start order, and the first other exited child (a crash, a router,
            the last worker of a kind), or ``None``.
        """
        drained: list[Child] = []
        for child in self.children:
            if child in self.exited or child.popen.poll() is None:
                continue
            if not tolerated_exit(child, self.running(child.spec.kind)):
                return drained, child
            self.exited.append(child)
            drained.append(child)
        return drained, None

    def running(self, kind: str) -> list[Child]:
        """Children of ``kind`` that have not exited."""
        return [c for c in self.children if c.spec.kind == kind and c.popen.poll() is None]

    def stop_all(self) -> None:
        """SIGTERMs the routers, then the other children; each group gets ``grace_s`` before SIGKILL."""
        routers = [child for child in self.children if child.spec.kind == "router"]
        workers = [child for child in self.children if child.spec.kind != "router"]
        for group in (routers, workers):
            terminate(group, self.grace_s)


def tolerated_exit(child: Child, running_of_kind: Sequence[Child]) -> bool:
    """Whether the cluster can serve on after ``child`` exited: a worker (not the router)
    that exited with code 0, which a worker does only after draining on SIGTERM, while
    ``running_of_kind`` (the others of its kind still running) is not empty. A crash
    (non-zero code, a signal) stops the cluster, as does any router exit."""
    return child.spec.kind != "router" and child.popen.returncode == 0 and bool(running_of_kind)


def terminate(children: Sequence[Child], grace_s: float) -> None:
    """SIGTERMs each child's process group, SIGKILLs those alive after ``grace_s``, reaps all."""
    for child in children:
        if child.popen.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)
            child.popen.wait()


#: Lowest port :func:`free_port` hands out.
FIRST_PORT = 10000


def _ephemeral_port_floor() -> int:
    """The first port of the kernel's ephemeral range (``ip_local_port_range``; 32768 if unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now.

    Chosen at random in ``[FIRST_PORT, ephemeral floor)``, below the kernel's ephemeral
    range, so that the local port of an outgoing connection (which the kernel takes
    from that range) cannot claim it between this probe and the child's bind; another
    process picking ports may still take it. Falls back to a port the OS picks.
    """
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    floor = _ephemeral_port_floor()
    rng = random.SystemRandom()
    for _ in range(64 if floor > FIRST_PORT + 1000 else 0):
        port = rng.randrange(FIRST_PORT, floor)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or ``"(no log)"``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _timeout_message(pending: Sequence[Child], timeout_s: float) -> str:
    late = ", ".join(f"{c.spec.id} (pid {c.pid}) on {c.spec.dial_address}" for c in pending)
    first = pending[0]
    return f"not SERVING within {timeout_s:g} s: {late}; last lines of {first.log}:\n{log_tail(first.log)}"


def _is_serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
