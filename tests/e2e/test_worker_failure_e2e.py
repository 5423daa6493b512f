"""A decode worker killed with SIGKILL mid-stream: the client's stream ends with
``UNAVAILABLE`` naming the worker, and new requests succeed on the other decode
worker once the router has dropped the dead one.

The processes are those ``tandem serve`` would start (``plan_cluster``), run under
a ``Supervisor`` directly: ``tandem serve`` itself stops the cluster when a child dies.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from cli.main import build_parser
from cli.serve import plan_cluster
from cli.supervisor import Child, Supervisor
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.checkpoints import make_tiny_llama
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    run_dir = tmp_path_factory.mktemp("kill")
    model = make_tiny_llama(run_dir / "model", max_position_embeddings=2048)
    port = free_port()
    flags = [
        *("serve", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--port", str(port)),
        *("--decode-workers", "2", "--num-kv-blocks", "256", "--routing", "round-robin"),
        *("--redis-url", redis_server.url, "--redis-prefix", f"kill{port}"),
    ]
    args = build_parser().parse_args(flags)
    supervisor = Supervisor(run_dir, grace_s=10)
    try:
        for spec in plan_cluster(args, redis_server.url):
            supervisor.spawn(spec)
        assert supervisor.wait_serving(120, threading.Event())
        yield supervisor
    finally:
        supervisor.stop_all()


def router_of(supervisor: Supervisor) -> Child:
    return next(c for c in supervisor.children if c.spec.kind == "router")


def test_sigkill_of_a_decode_worker_mid_stream(cluster: Supervisor) -> None:
    with grpc.insecure_channel(router_of(cluster).spec.dial_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        long = generation_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7, 8],
            sampling=generation_pb2.SamplingParams(max_tokens=1500, ignore_eos=True),
        )
        call = stub.GenerateStream(long, timeout=60)
        first = next(call)
        assert first.token_ids
        time.sleep(0.3)  # decode is running on one of the two workers
        decodes = [c for c in cluster.children if c.spec.kind == "decode"]
        victim = _holder(decodes)
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details().startswith(f"decode worker {victim.spec.id} failed mid-stream: ")
        short = generation_pb2.GenerateRequest(
            prompt="Hi", sampling=generation_pb2.SamplingParams(max_tokens=2)
        )
        deadline = time.monotonic() + 10
        while True:  # the router drops the dead worker at its next health check (0.5 s)
            try:
                stub.Generate(short, timeout=10)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)
        assert [len(stub.Generate(short, timeout=10).token_ids) for _ in range(4)] == [2, 2, 2, 2]


def _holder(decodes: list[Child]) -> Child:
    """The decode worker whose ``tandem_requests_running`` is 1."""
    for child in decodes:
        with urllib.request.urlopen(f"http://{child.spec.metrics_address}/metrics", timeout=5) as resp:
            if "tandem_requests_running 1.0" in resp.read().decode():
                return child
    raise AssertionError("no decode worker is running the stream")
