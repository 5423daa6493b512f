"""Fault injection through real processes: every fault ends in a clean state.

One cluster (a router, one prefill and one decode worker, the session's
``redis-server``) serves every case in order; the prefill worker is restarted
with ``TANDEM_FAULT_INJECT`` (see :mod:`kvtransfer.tcp`) for the transfer faults.
The cases: cancel and deadline expiry at each stage of a request (queued on the
prefill worker, during prefill, mid-transfer, during decode); a corrupted and a
dropped KV transfer (``DATA_LOSS`` or ``UNAVAILABLE``, or a retry with the right
text, never wrong text); Redis stopped (requests keep succeeding); the router
killed with SIGKILL mid-stream (the decode worker sees the stream cancelled and
frees the request). After each case every surviving worker's
``tandem_kv_blocks_used`` is back to 0 within the lease, and a new request
returns the reference tokens.

Stages are made observable with the workers' gauges: prefill runs in chunks of
:data:`CHUNK_TOKENS` tokens, so a :data:`LONG_PROMPT` keeps the prefill worker
busy (``tandem_requests_running``) for a while and a second one waits behind it
(``tandem_requests_waiting``); ``stall_kv_once`` holds a transfer open
:data:`kvtransfer.tcp.FAULT_STALL_S` seconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cli.main import build_parser
from cli.serve import plan_cluster
from cli.supervisor import Child, ComponentSpec, Supervisor, terminate
from kvtransfer.tcp import FAULT_INJECT_ENV, FAULT_STALL_S
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.checkpoints import make_tiny_llama
from tests.helpers.metrics import scrape_metric
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e

LEASE_MS = 3000
#: Tokens per prefill step: a long prompt takes many engine steps.
CHUNK_TOKENS = 16
LONG_PROMPT = [3 + i % 400 for i in range(1800)]
SHORT = generation_pb2.GenerateRequest(
    prompt_token_ids=[5, 6, 7, 8], sampling=generation_pb2.SamplingParams(max_tokens=8, ignore_eos=True)
)
LONG_DECODE = generation_pb2.GenerateRequest(
    prompt_token_ids=[9, 10, 11], sampling=generation_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)
)
LONG_PREFILL = generation_pb2.GenerateRequest(
    prompt_token_ids=LONG_PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
)


def metric(spec: ComponentSpec, name: str) -> float:
    """An unlabelled sample of one process's ``/metrics``."""
    return scrape_metric(spec.metrics_address, name)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


class Cluster:
    """The processes ``tandem serve`` would start, under supervisors the test controls."""

    def __init__(self, specs: list[ComponentSpec], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.specs = {s.kind: s for s in specs}
        self.main = Supervisor(run_dir, grace_s=10)
        self.faulty = Supervisor(run_dir, grace_s=10)
        self.routers = Supervisor(run_dir, grace_s=10)
        self.prefill: Child | None = None
        self.router: Child | None = None
        self.reference: list[int] = []

    def start(self) -> None:
        self.main.spawn(self.specs["decode"])
        self.prefill = self.main.spawn(self.specs["prefill"])
        self.router = self.main.spawn(self.specs["router"])
        assert self.main.wait_serving(120, threading.Event())
        self.channel = grpc.insecure_channel(self.specs["router"].dial_address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.reference = list(self.stub.Generate(SHORT, timeout=60).token_ids)
        assert len(self.reference) == 8

    def restart_prefill(self, faults: str) -> None:
        """Replace the prefill worker by one whose sender applies ``faults`` to its first messages."""
        assert self.prefill is not None
        terminate([self.prefill], grace_s=10)
        self.faulty = Supervisor(self.run_dir, grace_s=10, env={FAULT_INJECT_ENV: faults})
        self.prefill = self.faulty.spawn(self.specs["prefill"])
        assert self.faulty.wait_serving(120, threading.Event())
        time.sleep(1.5)  # routers re-read the registry every 0.5 s

    def restart_router(self) -> None:
        self.channel.close()
        self.routers = Supervisor(self.run_dir, grace_s=10)
        self.router = self.routers.spawn(self.specs["router"])
        assert self.routers.wait_serving(60, threading.Event())
        self.channel = grpc.insecure_channel(self.specs["router"].dial_address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def workers(self) -> list[ComponentSpec]:
        return [self.specs["prefill"], self.specs["decode"]]

    def blocks_used(self) -> dict[str, float]:
        return {w.id: metric(w, "tandem_kv_blocks_used") for w in self.workers()}

    def assert_recovered(self, *, probe: bool = True) -> None:
        """Every worker's blocks return to 0 within the lease, and (``probe``) a new request
        gets the reference tokens."""
        idle = {w.id: 0.0 for w in self.workers()}
        wait_until(lambda: self.blocks_used() == idle, LEASE_MS / 1000 + 2, poll_s=0.1)
        assert self.blocks_used() == idle
        for w in self.workers():
            assert metric(w, "tandem_requests_running") == metric(w, "tandem_requests_waiting") == 0
        if probe:
            assert list(self.stub.Generate(SHORT, timeout=30).token_ids) == self.reference

    def stop(self) -> None:
        self.channel.close()
        self.routers.stop_all()
        self.main.stop_all()
        self.faulty.stop_all()


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("faults")
    model = make_tiny_llama(run_dir / "model", max_position_embeddings=2048)
    port = free_port()
    flags = [
        *("serve", "--model", str(model), "--device", "cpu", "--dtype", "float32", "--port", str(port)),
        *("--num-kv-blocks", "256", "--lease-ms", str(LEASE_MS)),
        *("--max-num-batched-tokens", str(CHUNK_TOKENS), "--no-enable-prefix-caching"),
        *("--redis-url", redis_server.url, "--redis-prefix", f"faults{port}"),
    ]
    specs = plan_cluster(build_parser().parse_args(flags), redis_server.url)
    c = Cluster(specs, run_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def expect_status(call: grpc.Future, code: grpc.StatusCode) -> None:  # type: ignore[type-arg]
    """Drain a stream that must end with ``code``."""
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == code, info.value.details()


def prefill_busy(cluster: Cluster) -> bool:
    return metric(cluster.specs["prefill"], "tandem_requests_running") >= 1


def prefill_queued(cluster: Cluster) -> bool:
    return metric(cluster.specs["prefill"], "tandem_requests_waiting") >= 1


def background(call: grpc.Future) -> threading.Thread:  # type: ignore[type-arg]
    """Consume a stream in a thread (its outcome is not the point of the case)."""

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stage", ["queued", "prefill", "decode"])
def test_cancel_at_a_stage_frees_every_block(cluster: Cluster, stage: str) -> None:
    ahead = None
    if stage == "queued":  # a long prefill occupies the worker; ours waits behind it
        ahead = cluster.stub.GenerateStream(LONG_PREFILL, timeout=60)
        runner = background(ahead)
        assert wait_until(lambda: prefill_busy(cluster), 10)
    call = cluster.stub.GenerateStream(LONG_PREFILL if stage != "decode" else LONG_DECODE, timeout=60)
    if stage == "queued":
        assert wait_until(lambda: prefill_queued(cluster), 10)
    elif stage == "prefill":
        assert wait_until(lambda: prefill_busy(cluster), 10)
    else:
        assert next(call).token_ids
        assert wait_until(lambda: metric(cluster.specs["decode"], "tandem_requests_running") == 1, 5)
    call.cancel()
    expect_status(call, grpc.StatusCode.CANCELLED)
    if ahead is not None:
        runner.join(timeout=60)
    cluster.assert_recovered()


@pytest.mark.parametrize("stage", ["queued", "prefill", "decode"])
def test_deadline_at_a_stage_frees_every_block(cluster: Cluster, stage: str) -> None:
    ahead = None
    if stage == "queued":
        ahead = cluster.stub.GenerateStream(LONG_PREFILL, timeout=60)
        runner = background(ahead)
        assert wait_until(lambda: prefill_busy(cluster), 10)
    request = LONG_DECODE if stage == "decode" else LONG_PREFILL
    timeout = {"queued": 0.4, "prefill": 0.25, "decode": 1.5}[stage]  # a long prefill takes ~0.5 s
    started = time.monotonic()
    call = cluster.stub.GenerateStream(request, timeout=timeout)
    if stage == "queued":
        assert wait_until(lambda: prefill_queued(cluster), timeout)
    elif stage == "prefill":
        assert wait_until(lambda: prefill_busy(cluster), timeout)
    expect_status(call, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < timeout + 1.0
    if ahead is not None:
        runner.join(timeout=60)
    cluster.assert_recovered()


def test_cancel_and_deadline_mid_transfer(cluster: Cluster) -> None:
    cluster.restart_prefill("stall_kv_once,stall_kv_once")
    decode = cluster.specs["decode"]
    call = cluster.stub.GenerateStream(SHORT, timeout=60)
    time.sleep(FAULT_STALL_S / 3)  # the first message is stalled halfway through its payload
    assert metric(decode, "tandem_kv_blocks_used") == 1  # reserved, not yet filled
    call.cancel()
    expect_status(call, grpc.StatusCode.CANCELLED)
    cluster.assert_recovered(probe=False)  # a probe request would take the second stall

    started = time.monotonic()
    call = cluster.stub.GenerateStream(SHORT, timeout=FAULT_STALL_S / 2)
    time.sleep(FAULT_STALL_S / 3)
    assert metric(decode, "tandem_kv_blocks_used") == 1
    expect_status(call, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < FAULT_STALL_S
    cluster.assert_recovered()
    assert cluster.prefill is not None
    assert cluster.prefill.log.read_text().count("fault injection: stalling a KV payload") == 2


@pytest.mark.parametrize(
    ("fault", "code", "prefill_says", "decode_says"),
    [
        ("corrupt_kv_once", grpc.StatusCode.DATA_LOSS, "flipped one bit", "crc32 mismatch"),
        ("drop_kv_once", grpc.StatusCode.UNAVAILABLE, "cut the KV connection", ""),
    ],
)
def test_a_bad_transfer_fails_or_retries_never_wrong_text(
    cluster: Cluster, fault: str, code: grpc.StatusCode, prefill_says: str, decode_says: str
) -> None:
    cluster.restart_prefill(fault)
    decode_log = cluster.run_dir / f"{cluster.specs['decode'].id}.log"
    before = decode_log.read_text()
    try:
        ids = list(cluster.stub.Generate(SHORT, timeout=30).token_ids)
    except grpc.RpcError as exc:
        assert exc.code() == code, exc.details()
    else:  # the router retried the prefill: the text must be the reference
        assert ids == cluster.reference
    assert cluster.prefill is not None and prefill_says in cluster.prefill.log.read_text()
    assert decode_says in decode_log.read_text()[len(before) :]
    cluster.assert_recovered()


def test_requests_succeed_while_redis_is_down(cluster: Cluster, redis_server) -> None:
    redis_server.stop()
    try:
        for _ in range(3):
            assert list(cluster.stub.Generate(SHORT, timeout=30).token_ids) == cluster.reference
            time.sleep(0.5)
        cluster.assert_recovered()
    finally:
        redis_server.start()


def test_router_sigkill_mid_stream_frees_the_orphaned_request(cluster: Cluster) -> None:
    decode = cluster.specs["decode"]
    call = cluster.stub.GenerateStream(LONG_DECODE, timeout=60)
    assert next(call).token_ids
    assert wait_until(lambda: metric(decode, "tandem_requests_running") == 1, 5)
    assert metric(decode, "tandem_kv_blocks_used") >= 1
    assert cluster.router is not None
    os.kill(cluster.router.pid, signal.SIGKILL)
    # The decode worker sees its Decode stream cancelled and aborts the request at once,
    # long before the 1500 tokens would have finished.
    assert wait_until(lambda: metric(decode, "tandem_requests_running") == 0, LEASE_MS / 1000)
    expect_status(call, grpc.StatusCode.UNAVAILABLE)
    cluster.router.popen.wait(timeout=10)
    cluster.restart_router()
    cluster.assert_recovered()
