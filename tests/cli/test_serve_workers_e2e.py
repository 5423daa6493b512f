"""``tandem serve`` with real workers: workers bound on 127.0.0.1 register the
``--advertise-host`` name in Redis and are dialled by it (gRPC and the KV transfer);
SIGTERM to one of two decode workers drains it (exit 0) and the cluster serves on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from engine.worker_registry import WorkerDirectory
from tandem.v1 import generation_pb2, worker_pb2
from tests.e2e.stack import REPO, Stack

pytestmark = pytest.mark.e2e

ADVERTISED = "localhost"  # resolves to the loopback the workers bind; differs from --host


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--decode-workers", "2", "--num-kv-blocks", "64", "--advertise-host", ADVERTISED]
    s = Stack(
        REPO / "models" / "tandem-tiny", tmp_path_factory.mktemp("serve"), redis_server.url, args
    ).start()
    yield s
    assert s.stop() == 0


def registrations(stack: Stack, redis_url: str) -> list[worker_pb2.WorkerInfo]:
    async def read() -> list[worker_pb2.WorkerInfo]:
        directory = WorkerDirectory(redis_url, f"t{stack.port}")
        try:
            return await directory.list_workers()
        finally:
            await directory.close()

    return asyncio.run(read())


def generate(stack: Stack) -> list[int]:
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=list(range(3, 40)),
        sampling=generation_pb2.SamplingParams(max_tokens=8, ignore_eos=True),
    )
    return list(stack.stub.Generate(request, timeout=60).token_ids)


def test_workers_register_the_advertised_host(stack: Stack, redis_server) -> None:
    infos = {i.worker_id: i for i in registrations(stack, redis_server.url)}
    assert sorted(infos) == ["decode-0", "decode-1", "prefill-0"]
    bound = {p["id"]: p for p in stack.processes("prefill", "decode")}
    for worker_id, info in infos.items():
        port = bound[worker_id]["grpc_address"].rsplit(":", 1)[1]
        assert bound[worker_id]["grpc_address"] == f"127.0.0.1:{port}"  # bound on --host
        assert info.grpc_address == f"{ADVERTISED}:{port}"
        assert info.metrics_address == f"{ADVERTISED}:{bound[worker_id]['metrics_address'].rsplit(':', 1)[1]}"
        if worker_id.startswith("decode"):
            transfer_port = bound[worker_id]["transfer_address"].rsplit(":", 1)[1]
            assert info.transfer_address == f"{ADVERTISED}:{transfer_port}"
    assert len(generate(stack)) == 8  # the router and the prefill worker dial the advertised names


def test_sigterm_to_one_decode_worker_drains_it_and_the_cluster_serves_on(stack: Stack, redis_server) -> None:
    expected = generate(stack)
    victim = next(p for p in stack.processes("decode") if p["id"] == "decode-0")
    os.kill(victim["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "exited with code 0 (drained)" not in stack.log.read_text():
        assert time.monotonic() < deadline, stack.log.read_text()[-3000:]
        time.sleep(0.2)
    assert stack.proc is not None and stack.proc.poll() is None
    assert sorted(i.worker_id for i in registrations(stack, redis_server.url)) == ["decode-1", "prefill-0"]
    for _ in range(4):
        assert generate(stack) == expected
    assert not os.path.exists(f"/proc/{victim['pid']}")
    stack.cluster = json.loads(stack.cluster_file.read_text())  # rewritten without decode-0
    assert [p["id"] for p in stack.processes("prefill", "decode")] == ["prefill-0", "decode-1"]
    assert stack.wait_blocks_free() == {"prefill-0": 0.0, "decode-1": 0.0}
