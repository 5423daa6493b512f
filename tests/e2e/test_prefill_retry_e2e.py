"""Prefill workers under faults and overload.

- A prefill worker killed with SIGKILL mid-prefill: the router retries the prefill on
  the other prefill worker (a fresh reservation on the decode worker), the client gets
  one answer equal to Hugging Face greedy ``generate``, and no block stays used anywhere.
- A burst past the workers' bounded queues (``--max-queue-len 1``): the requests over
  the bound get ``RESOURCE_EXHAUSTED`` at once, the others complete, nothing leaks.

Two prefill workers and one decode worker of the bundled model, the processes that
``tandem serve`` would start (``plan_cluster``) under a ``Supervisor`` directly
(``tandem serve`` stops the cluster when a child dies). ``--max-num-batched-tokens 4``
makes a 400-token prompt take ~100 chunked prefill steps (over a second on CPU), so the
test catches the prefill in progress by polling ``tandem_requests_running``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.main import build_parser
from cli.serve import plan_cluster
from cli.supervisor import Child, Supervisor
from engine.worker_config import BUNDLED_MODEL_DIR
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.metrics import scrape_metric
from tests.helpers.net import free_port

pytestmark = pytest.mark.e2e

PROMPT = [(37 * i + 11) % 3000 + 2 for i in range(400)]
MAX_TOKENS = 8


def start_cluster(run_dir: Path, redis_url: str, model: Path, *flags: str) -> Supervisor:
    """The processes of ``tandem serve --model <model> <flags>`` under a Supervisor, all SERVING."""
    port = free_port()
    argv = [
        *("serve", "--model", str(model), "--device", "cpu", "--dtype", "float32"),
        *("--port", str(port), "--redis-url", redis_url, "--redis-prefix", f"pr{port}", *flags),
    ]
    args = build_parser().parse_args(argv)
    supervisor = Supervisor(run_dir, grace_s=10)
    try:
        for spec in plan_cluster(args, redis_url):
            supervisor.spawn(spec)
        assert supervisor.wait_serving(120, threading.Event())
    except BaseException:
        supervisor.stop_all()
        raise
    return supervisor


def metric(child: Child, name: str) -> float:
    """An unlabelled sample of ``child``'s /metrics."""
    return scrape_metric(child.spec.metrics_address, name)


def wait_idle(children: list[Child], timeout_s: float = 15.0) -> dict[str, float]:
    """Wait until ``tandem_kv_blocks_used`` is 0 on every child; returns the last readings."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = {c.spec.id: metric(c, "tandem_kv_blocks_used") for c in children}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


def hf_greedy(prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return list(out[0, len(prompt) :].tolist())


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return hf_greedy(PROMPT, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = start_cluster(
        tmp_path_factory.mktemp("prefill-retry"),
        redis_server.url,
        BUNDLED_MODEL_DIR,
        *("--prefill-workers", "2", "--decode-workers", "1", "--routing", "round-robin"),
        *("--max-num-batched-tokens", "4", "--num-kv-blocks", "256", "--no-enable-prefix-caching"),
        *("--max-queue-len", "1"),
    )
    try:
        yield supervisor
    finally:
        supervisor.stop_all()


def test_a_burst_past_the_worker_queues_is_resource_exhausted_at_once(
    cluster: Supervisor, expected: list[int]
) -> None:
    router = next(c for c in cluster.children if c.spec.kind == "router")
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=MAX_TOKENS)
    )
    done_at: dict[int, float] = {}
    with grpc.insecure_channel(router.spec.dial_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        futures = [stub.Generate.future(request, timeout=60) for _ in range(6)]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _f, i=i: done_at.setdefault(i, time.monotonic()))
        ok, refused = [], []
        for i, future in enumerate(futures):
            try:
                assert list(future.result().token_ids) == expected
                ok.append(i)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                assert "waiting queue is full (1 requests)" in exc.details()
                refused.append(i)
    # Two workers, each 1 prefill running (a 4-token step budget) and 1 waiting: 6 cannot all fit.
    assert len(ok) >= 2 and len(refused) >= 1, (ok, refused)
    assert max(done_at[i] for i in refused) < min(done_at[i] for i in ok)  # refused at once
    workers = [c for c in cluster.children if c.spec.kind in ("prefill", "decode")]
    assert wait_idle(workers) == {c.spec.id: 0.0 for c in workers}


def test_sigkill_of_a_prefill_worker_mid_prefill_retries_on_the_other(
    cluster: Supervisor, expected: list[int]
) -> None:
    router = next(c for c in cluster.children if c.spec.kind == "router")
    prefills = [c for c in cluster.children if c.spec.kind == "prefill"]
    (decode,) = [c for c in cluster.children if c.spec.kind == "decode"]
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=MAX_TOKENS)
    )
    with grpc.insecure_channel(router.spec.dial_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert list(stub.Generate(request, timeout=60).token_ids) == expected  # undisturbed

        future = stub.Generate.future(request, timeout=60)
        deadline = time.monotonic() + 20
        victim = None
        while victim is None:  # the prefill worker computing the prompt
            assert time.monotonic() < deadline and not future.done(), "never saw the prefill running"
            victim = next((c for c in prefills if metric(c, "tandem_requests_running") >= 1), None)
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        reply = future.result(timeout=60)
        assert list(reply.token_ids) == expected
        assert reply.usage.prompt_tokens == len(PROMPT)
        assert reply.usage.completion_tokens == MAX_TOKENS

    (survivor,) = [c for c in prefills if c is not victim]
    assert wait_idle([survivor, decode]) == {survivor.spec.id: 0.0, decode.spec.id: 0.0}
    assert metric(survivor, "tandem_requests_running") == 0.0
    router_log = router.log.read_text()
    assert f"prefill worker {victim.spec.id} failed" in router_log
    assert f"retrying on {survivor.spec.id}" in router_log
