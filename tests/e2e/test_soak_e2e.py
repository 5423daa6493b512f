"""A bounded soak of a real stack with the bundled model: concurrent streams with
random cancellations and random short deadlines, for a fixed duration.

It passes when no request failed except those cancelled (``CANCELLED``) or past
their deadline (``DEADLINE_EXCEEDED``), every completed stream has exactly the
tokens asked for, no KV block is left used on any worker at the end, and each
worker's resident memory (``VmRSS``) grew by less than :data:`RSS_GROWTH_BOUND`
between the end of the warm-up and the end of the run.

``TANDEM_SOAK_SECONDS`` sets the duration of the load (default
:data:`DEFAULT_SECONDS`, sized for CI); set it higher for a longer soak.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tandem.v1 import generation_pb2
from tests.e2e.stack import REPO, Stack

pytestmark = pytest.mark.e2e

DEFAULT_SECONDS = 90.0
STREAMS = 8
WARMUP_S = 15.0
#: Largest growth of a worker's resident memory between warm-up and end (bytes).
RSS_GROWTH_BOUND = 64 << 20
SEED = 1234


def soak_seconds() -> float:
    return float(os.environ.get("TANDEM_SOAK_SECONDS", DEFAULT_SECONDS))


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of a process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("soak")
    args = ["--num-kv-blocks", "512", "--lease-ms", "5000"]
    s = Stack(REPO / "models" / "tandem-tiny", run_dir, redis_server.url, args).start()
    yield s
    assert s.stop() == 0


class Outcomes:
    """Thread-safe tally of request outcomes, by (action, result)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.failures: list[str] = []

    def add(self, action: str, result: str, detail: str = "") -> None:
        allowed = {"plain": {"OK"}, "cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"}}
        with self.lock:
            self.counts[(action, result)] += 1
            if result not in allowed[action]:
                self.failures.append(f"{action}: {result} {detail}")


def one_request(stack: Stack, rng: random.Random, outcomes: Outcomes) -> None:
    """A random request: plain, cancelled after a random number of messages, or with a short deadline."""
    max_tokens = rng.randint(1, 48)
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=[rng.randint(3, 300) for _ in range(rng.randint(1, 80))],
        sampling=generation_pb2.SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=rng.choice([0.0, 0.8]),
            seed=rng.randint(0, 99),
        ),
    )
    action = rng.choices(["plain", "cancel", "deadline"], weights=[6, 2, 2])[0]
    timeout = rng.uniform(0.05, 0.6) if action == "deadline" else 60.0
    cancel_after = rng.randint(0, 6)
    call = stack.stub.GenerateStream(request, timeout=timeout)
    tokens = 0
    try:
        if action == "cancel" and cancel_after == 0:
            time.sleep(rng.uniform(0.0, 0.1))
            call.cancel()
        for message in call:
            tokens += len(message.token_ids)
            if action == "cancel" and tokens >= cancel_after:
                call.cancel()
    except grpc.RpcError as exc:
        outcomes.add(action, exc.code().name, str(exc.details()))
        return
    if tokens != max_tokens:
        outcomes.add(action, "SHORT", f"{tokens} of {max_tokens} tokens")
    else:
        outcomes.add(action, "OK")


def test_soak_leaks_nothing_and_fails_nothing(stack: Stack) -> None:
    duration = soak_seconds()
    workers = stack.processes("prefill", "decode")
    outcomes = Outcomes()
    started = time.monotonic()
    end = started + duration

    def client(index: int) -> None:
        rng = random.Random(SEED + index)
        while time.monotonic() < end:
            one_request(stack, rng, outcomes)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    time.sleep(min(WARMUP_S, duration / 4))
    warm = {p["id"]: rss_bytes(p["pid"]) for p in workers}
    for thread in threads:
        thread.join(timeout=duration + 120)
    assert not any(thread.is_alive() for thread in threads)
    final = {p["id"]: rss_bytes(p["pid"]) for p in workers}

    counts = dict(outcomes.counts)
    print(f"soak {duration:g} s: {sum(counts.values())} requests {counts}")
    print("RSS MiB warm -> end:", {k: f"{warm[k] / 2**20:.0f} -> {final[k] / 2**20:.0f}" for k in warm})
    assert outcomes.failures == []
    assert counts.get(("plain", "OK"), 0) >= STREAMS
    assert counts.get(("cancel", "CANCELLED"), 0) >= 1
    assert counts.get(("deadline", "DEADLINE_EXCEEDED"), 0) >= 1
    assert stack.wait_blocks_free(timeout_s=10) == {p["id"]: 0.0 for p in workers}
    for p in workers:
        assert stack.metric(p, "tandem_requests_running") == stack.metric(p, "tandem_requests_waiting") == 0
    growth = {k: final[k] - warm[k] for k in warm}
    assert all(g < RSS_GROWTH_BOUND for g in growth.values()), growth
