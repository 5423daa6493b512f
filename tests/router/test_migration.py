"""``--migrate-on-failure`` for ``n`` > 1 requests (``router.migration``), against fake decode
workers: each completion that had not finished resumes as its own ``n`` = 1 stream with its
own seed, the streams run side by side under the completions' indexes, the migration budget
counts per request, and cancelling (a stop string, the caller) ends the resumed streams.

The fake "model" is deterministic in (prefix, seed), so a resumed stream given the right
prompt and seed continues with exactly the tokens the lost worker would have produced.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from engine.sampling_params import SamplingParams
from router.completion_cancel import CompletionCanceller
from router.migration import resumed
from router.orchestrator import MAX_MIGRATIONS, DecodeWorkerLost, Orchestrator, TokenChunk
from router.validation import ParsedRequest
from tandem.v1 import worker_pb2

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def next_token(prefix: list[int], seed: int | None) -> int:
    return hash((tuple(prefix), seed)) % 997 + 3  # ints and tuples hash the same in every process


def reference(req: ParsedRequest, index: int) -> tuple[list[int], str]:
    """Completion ``index`` of ``req`` on a worker that never dies, with its finish reason."""
    sampling, out = req.sampling.for_child(index), list[int]()
    while len(out) < sampling.max_tokens:
        out.append(next_token([*req.prompt_token_ids, *out], sampling.seed))
        if out[-1] in sampling.stop_token_ids:
            return out, "stop"
    return out, "length"


class FakeCluster:
    """Decode workers ``d0`` .. standing in for ``Orchestrator._generate_disaggregated``: a stream
    runs on the first live worker not avoided; worker ``w`` dies after yielding
    ``kill_after[w]`` chunks (all its streams then fail with ``DecodeWorkerLost``)."""

    def __init__(self, num_workers: int, kill_after: dict[str, int]) -> None:
        self.workers = [f"d{i}" for i in range(num_workers)]
        self.kill_after = kill_after
        self.dead: set[str] = set()
        self.yielded: Counter[str] = Counter()
        self.calls: list[tuple[str, ParsedRequest]] = []
        self.open = 0

    def healthy(self, role: int) -> list[Any]:
        if role != worker_pb2.WORKER_ROLE_DECODE:
            return []
        return [SimpleNamespace(worker_id=w) for w in self.workers if w not in self.dead]

    async def stream(
        self,
        req: ParsedRequest,
        remaining: Callable[[], float | None],
        started: float,
        avoid: frozenset[str],
        canceller: CompletionCanceller | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        worker = next(w for w in self.workers if w not in avoid)
        self.calls.append((worker, req))
        n = req.sampling.n
        outs: list[list[int]] = [[] for _ in range(n)]
        live = set(range(n))
        self.open += 1
        try:
            while live:
                for i in sorted(live):
                    await asyncio.sleep(0)
                    if worker in self.dead:
                        raise DecodeWorkerLost(worker, f"decode worker {worker} failed mid-stream")
                    sampling = req.sampling.for_child(i) if n > 1 else req.sampling
                    outs[i].append(next_token([*req.prompt_token_ids, *outs[i]], sampling.seed))
                    finish = "stop" if outs[i][-1] in sampling.stop_token_ids else None
                    if len(outs[i]) == sampling.max_tokens:
                        finish = finish or "length"
                    if finish:
                        live.discard(i)
                    first = len(outs[i]) == 1
                    yield TokenChunk(
                        [outs[i][-1]],
                        finish,
                        num_cached_tokens=4 if first else 0,
                        index=i,
                        prompt_logprobs=[] if first and i == 0 else None,
                    )
                    self.yielded[worker] += 1
                    if self.yielded[worker] == self.kill_after.get(worker):
                        self.dead.add(worker)
        finally:
            self.open -= 1


def orchestrator(cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> Orchestrator:
    orch = Orchestrator(
        cluster,  # type: ignore[arg-type]
        SimpleNamespace(uses_prefix_index=False),  # type: ignore[arg-type]
        eos_token_ids=(0,),
        max_model_len=1024,
        lease_ms=1000,
        migrate_on_failure=True,
    )
    monkeypatch.setattr(orch, "_generate_disaggregated", cluster.stream)
    return orch


def request(**sampling: Any) -> ParsedRequest:
    return ParsedRequest("req", list(PROMPT), SamplingParams(**sampling))


async def collect(
    orch: Orchestrator, req: ParsedRequest, canceller: CompletionCanceller | None = None
) -> list[TokenChunk]:
    return [chunk async for chunk in orch.generate(req, None, canceller)]


def by_index(chunks: list[TokenChunk], n: int) -> list[list[int]]:
    return [[t for c in chunks if c.index == i for t in c.token_ids] for i in range(n)]


def test_resumed_is_the_completion_alone_after_its_tokens() -> None:
    req = request(n=3, seed=77, max_tokens=10, prompt_logprobs=2, stop_token_ids=[5])
    child = resumed(req, 2, [40, 41, 42])
    assert child.prompt_token_ids == [*PROMPT, 40, 41, 42]
    assert child.sampling == SamplingParams(
        n=1, seed=req.sampling.for_child(2).seed, max_tokens=7, stop_token_ids=[5]
    )
    assert child.sampling.seed != 77 and resumed(req, 0, []).sampling.seed == 77
    assert (child.request_id, req.prompt_token_ids) == ("req", PROMPT)


def test_every_unfinished_completion_resumes_as_its_own_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    req = request(n=3, seed=1234, max_tokens=12)
    refs = [reference(req, i) for i in range(3)]
    # Completion 1 ends early at a stop token that the others never produce.
    stop = refs[1][0][2]
    req = request(n=3, seed=1234, max_tokens=12, stop_token_ids=[stop])
    refs = [reference(req, i) for i in range(3)]
    assert [len(r[0]) for r in refs] == [12, 3, 12] and [r[1] for r in refs] == ["length", "stop", "length"]
    cluster = FakeCluster(3, kill_after={"d0": 13})  # completion 1 has finished, 0 and 2 are mid-stream
    chunks = asyncio.run(collect(orchestrator(cluster, monkeypatch), req))

    assert by_index(chunks, 3) == [r[0] for r in refs]
    assert [[c.finish_reason for c in chunks if c.index == i][-1] for i in range(3)] == [
        "length",
        "stop",
        "length",
    ]
    assert sum(c.finish_reason is not None for c in chunks) == 3
    # The original prompt's cached tokens and log-probabilities come once per completion / once.
    assert [(c.index, c.num_cached_tokens) for c in chunks if c.num_cached_tokens] == [(0, 4), (1, 4), (2, 4)]
    assert sum(c.prompt_logprobs is not None for c in chunks) == 1
    (_, original), *moved = cluster.calls
    assert original is req and [w for w, _ in moved] == ["d1", "d1"]
    for (_, child), index in zip(moved, (0, 2), strict=True):
        sent = refs[index][0][: len(child.prompt_token_ids) - len(PROMPT)]
        assert 3 <= len(sent) < 12
        assert child.prompt_token_ids == [*PROMPT, *sent]
        assert child.sampling == replace(req.sampling.for_child(index), max_tokens=12 - len(sent))
    assert cluster.open == 0


def test_the_migration_budget_counts_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every worker dies after 4 chunks: the resumed streams keep losing theirs.
    cluster = FakeCluster(8, kill_after={f"d{i}": 4 for i in range(8)})
    with pytest.raises(DecodeWorkerLost):
        asyncio.run(collect(orchestrator(cluster, monkeypatch), request(n=3, seed=5, max_tokens=40)))
    used = {w for w, _ in cluster.calls}
    assert used == {f"d{i}" for i in range(MAX_MIGRATIONS + 1)}
    assert cluster.dead == used and cluster.open == 0


def test_without_the_flag_an_n3_request_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster(2, kill_after={"d0": 5})
    orch = orchestrator(cluster, monkeypatch)
    monkeypatch.setattr(orch, "_migrate_on_failure", False)
    with pytest.raises(DecodeWorkerLost, match="decode worker d0"):
        asyncio.run(collect(orch, request(n=3, max_tokens=10)))
    assert len(cluster.calls) == 1


def test_a_stop_string_cancel_ends_that_resumed_stream_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel completion 1 while on d0 (the fake d0 ignores it; it dies first) and completion 0
    after it resumed: 1 never resumes, 0's stream ends early, 2 reaches ``max_tokens``."""
    req = request(n=3, seed=9, max_tokens=30)
    cluster = FakeCluster(2, kill_after={"d0": 9})

    async def main() -> list[TokenChunk]:
        canceller, chunks = CompletionCanceller(), []
        async for chunk in orchestrator(cluster, monkeypatch).generate(req, None, canceller):
            chunks.append(chunk)
            if len(chunks) == 2:
                canceller.cancel(1)
            if len(cluster.calls) > 1 and chunk.index == 0:
                canceller.cancel(0)
        return chunks

    chunks = asyncio.run(main())
    tokens = by_index(chunks, 3)
    assert [c.index for c in chunks if c.finish_reason] == [2]
    assert tokens[2] == reference(req, 2)[0] and len(tokens[2]) == 30
    assert 3 < len(tokens[0]) < 10  # one chunk after the resume (it was in flight), then nothing
    assert [child.sampling.seed for _, child in cluster.calls[1:]] == [9, req.sampling.for_child(2).seed]
    assert cluster.open == 0


def test_closing_the_stream_cancels_every_resumed_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster(2, kill_after={"d0": 6})

    async def main() -> tuple[int, int]:
        gen = orchestrator(cluster, monkeypatch).generate(request(n=3, max_tokens=50), None)
        async for _ in gen:
            if len(cluster.calls) == 4:
                break
        running = cluster.open  # the three resumed streams
        await gen.aclose()
        return running, cluster.open

    assert asyncio.run(main()) == (3, 0)
    assert len(cluster.calls) == 4


class CancelStub:
    def __init__(self) -> None:
        self.sent: list[int] = []

    async def CancelCompletion(self, request: worker_pb2.CancelCompletionRequest, timeout: float) -> Any:
        self.sent.append(request.index)
        return worker_pb2.CancelCompletionResponse(known=True)


def test_a_redirected_completion_is_cancelled_by_ending_its_stream() -> None:
    async def main() -> tuple[list[str], list[int]]:
        canceller, stub, ended = CompletionCanceller(), CancelStub(), []
        canceller.attach(stub, "req.dead")  # type: ignore[arg-type]
        canceller.cancel(1)  # sent to the worker that then dies
        canceller.redirect(1, lambda: ended.append("1"))  # already cancelled: ends at once
        canceller.redirect(2, lambda: ended.append("2"))
        canceller.cancel(2)
        canceller.cancel(0)  # not redirected: goes to the worker stream
        for _ in range(5):
            await asyncio.sleep(0)
        return ended, stub.sent

    assert asyncio.run(main()) == (["1", "2"], [1, 0])
