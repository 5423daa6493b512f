"""A real Tandem deployment for end-to-end tests: ``tandem serve`` in a
subprocess (router, prefill and decode worker processes) on loopback, driven
through the public gRPC API and read through every process's ``/metrics``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.options import redis_url_flags
from engine.security import bearer_metadata, open_channel
from engine.security_config import INTERNAL_TOKEN_ENV, SecurityConfig, redis_url_env
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.metrics import scrape_metric
from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]


class Stack:
    """``tandem serve`` with ``--cluster-file``; stopped by SIGTERM like a user's Ctrl-C.

    Args:
        model_dir: checkpoint to serve.
        run_dir: where logs and the cluster file go.
        redis_url: an existing Redis (the test session's), with its own key prefix.
        args: extra ``tandem serve`` flags.
        client: TLS of the test's own channels (router, workers, health checks).
        auth_token: bearer token that :attr:`stub` sends to the router.

    ``tandem serve`` gets :attr:`internal_token` in its environment (as an operator
    would), so that :meth:`worker_channel` can call workers directly.
    """

    def __init__(
        self,
        model_dir: Path,
        run_dir: Path,
        redis_url: str,
        args: Sequence[str] = (),
        *,
        device: str = "cpu",
        client: SecurityConfig | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.port = free_port()
        self.client = client or SecurityConfig()
        self.auth_token = auth_token
        self.internal_token = secrets.token_urlsafe(16)
        self.cluster_file = run_dir / "cluster.json"
        self.log = run_dir / "serve.log"
        self.cmd = [
            sys.executable, "-m", "cli.main", "serve",
            "--model", str(model_dir), "--device", device, "--dtype", "float32",
            "--port", str(self.port), "--cluster-file", str(self.cluster_file),
            *redis_url_flags(redis_url), "--redis-prefix", f"t{self.port}",
            "--run-dir", str(run_dir / "logs"), *args,
        ]  # fmt: skip
        self.redis_env = redis_url_env(redis_url)  # a password stays off command lines
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster: dict[str, Any] = {}
        self.channel: grpc.Channel | None = None

    def start(self, timeout_s: float = 180.0) -> Stack:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            INTERNAL_TOKEN_ENV: self.internal_token,
            **self.redis_env,
        }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while not self.cluster_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tandem serve did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        self.cluster = json.loads(self.cluster_file.read_text())
        self.channel = self.open_channel(f"127.0.0.1:{self.port}", self.auth_token)
        return self

    def open_channel(self, address: str, token: str | None = None) -> grpc.Channel:
        """A channel to ``address`` with the client's TLS that sends ``token`` as a bearer token."""
        channel = open_channel(address, self.client)
        return grpc.intercept_channel(channel, _Metadata(bearer_metadata(token))) if token else channel

    def worker_channel(self, process: dict[str, Any]) -> grpc.Channel:
        """A channel to a worker that sends the cluster's internal token."""
        return self.open_channel(process["grpc_address"], self.internal_token)

    def stop(self) -> int | None:
        """SIGTERM ``tandem serve`` and wait for it; returns its exit code."""
        if self.channel is not None:
            self.channel.close()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    @property
    def stub(self) -> generation_pb2_grpc.GenerationStub:
        assert self.channel is not None
        return generation_pb2_grpc.GenerationStub(self.channel)

    def processes(self, *kinds: str) -> list[dict[str, Any]]:
        """Cluster-file entries of the given kinds (all with a gRPC address when none given)."""
        return [
            p for p in self.cluster["processes"] if (p["kind"] in kinds if kinds else p.get("grpc_address"))
        ]

    def metric(self, process: dict[str, Any], name: str) -> float:
        """Current value of an unlabelled gauge/counter sample ``name`` of one process."""
        return scrape_metric(process["metrics_address"], name)

    def wait_blocks_free(self, timeout_s: float = 15.0) -> dict[str, float]:
        """Wait until ``tandem_kv_blocks_used`` is 0 on every worker; returns the last readings."""
        deadline = time.monotonic() + timeout_s
        while True:
            used = {
                p["id"]: self.metric(p, "tandem_kv_blocks_used")
                for p in self.processes("prefill", "decode", "colocated")
            }
            if not any(used.values()) or time.monotonic() > deadline:
                return used
            time.sleep(0.2)

    def health(self, process: dict[str, Any]) -> int:
        with self.open_channel(process["grpc_address"]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        return int(reply.status)


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Appends fixed metadata to every unary and server-streaming call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


def stream_tokens(
    stub: generation_pb2_grpc.GenerationStub, request: generation_pb2.GenerateRequest, timeout: float = 120.0
) -> tuple[list[int], str, list[generation_pb2.GenerateStreamResponse]]:
    """Run ``GenerateStream``; returns (token ids, concatenated text, messages)."""
    msgs = list(stub.GenerateStream(request, timeout=timeout))
    ids = [t for m in msgs for t in m.token_ids]
    return ids, "".join(m.text for m in msgs), msgs
