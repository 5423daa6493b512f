"""``--migrate-on-failure`` for ``n`` = 3 requests: the decode worker holding the stream is
killed with SIGKILL mid-stream and every completion that had not finished resumes as its
own ``n`` = 1 request on the surviving decode workers (``router.migration``). The client's
single stream carries, per completion index:

- greedy: exactly Hugging Face greedy ``generate``, none repeated, none skipped;
- seeded sampling: the tokens sent before the kill unchanged, then new draws up to
  ``max_tokens``;
- a stop string met after the kill: the text cut there, as without the kill.

Usage counts the original prompt once and every completion token once; afterwards no
block stays used on the surviving workers.

Cancelling the call after the kill cancels every resumed stream, which frees their blocks.

One prefill and five decode workers of a tiny random Llama, shared by the tests: each
kills one decode worker, so any order leaves at least two when a test starts.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.supervisor import Child, Supervisor
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.e2e.test_migration_e2e import hf_greedy
from tests.e2e.test_prefill_retry_e2e import metric, start_cluster, wait_idle
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
N = 3
Stream = list[generation_pb2.GenerateStreamResponse]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("migrate-n-model"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def cluster(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = start_cluster(
        tmp_path_factory.mktemp("migrate-n"),
        redis_server.url,
        model,
        *("--prefill-workers", "1", "--decode-workers", "5"),
        *("--routing", "round-robin", "--num-kv-blocks", "256", "--migrate-on-failure"),
    )
    try:
        yield supervisor
    finally:
        supervisor.stop_all()


def children(cluster: Supervisor, kind: str) -> list[Child]:
    """The live children of ``kind``."""
    return [c for c in cluster.children if c.spec.kind == kind and c.popen.poll() is None]


def by_index(msgs: Stream) -> list[list[int]]:
    return [[t for m in msgs if m.index == i for t in m.token_ids] for i in range(N)]


def text_of(msgs: Stream, index: int) -> str:
    return "".join(m.text for m in msgs if m.index == index)


def finish_reasons(msgs: Stream) -> list[int]:
    return [next(m.finish_reason for m in msgs if m.index == i and m.finish_reason) for i in range(N)]


def stream_with_kill(
    cluster: Supervisor, request: generation_pb2.GenerateRequest, before: int, cancel_at: int | None = None
) -> tuple[Stream, Stream]:
    """Stream ``request``; once every completion has ``before`` tokens, SIGKILL the decode
    worker holding it; with ``cancel_at``, cancel the call once every completion has that
    many tokens. Returns (messages before the kill, all messages)."""
    router = children(cluster, "router")[0]
    with grpc.insecure_channel(router.spec.dial_address) as channel:
        call = generation_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=120)
        msgs: Stream = []
        while min(map(len, by_index(msgs))) < before:
            msgs.append(next(call))
        (victim,) = [d for d in children(cluster, "decode") if metric(d, "tandem_requests_running") > 0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.popen.wait(10)
        killed_at = list(msgs)
        while cancel_at is not None and min(map(len, by_index(msgs))) < cancel_at:
            msgs.append(next(call))
        if cancel_at is not None:
            call.cancel()
        else:
            msgs += list(call)
    assert f"migrating request {msgs[0].request_id} to another decode worker" in router.log.read_text()
    return killed_at, msgs


def undisturbed(cluster: Supervisor, request: generation_pb2.GenerateRequest) -> Stream:
    router = children(cluster, "router")[0]
    with grpc.insecure_channel(router.spec.dial_address) as channel:
        return list(generation_pb2_grpc.GenerationStub(channel).GenerateStream(request, timeout=120))


def assert_idle(cluster: Supervisor) -> None:
    survivors = children(cluster, "prefill") + children(cluster, "decode")
    assert wait_idle(survivors) == {c.spec.id: 0.0 for c in survivors}


def test_greedy_n3_stream_resumes_every_completion_exactly(cluster: Supervisor, model: Path) -> None:
    max_tokens = 400
    expected = hf_greedy(model, PROMPT, max_tokens)
    assert len(expected) > 100  # long enough to be cut mid-stream (no early EOS)
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, n=N)
    )
    killed_at, msgs = stream_with_kill(cluster, request, before=20)

    assert max(map(len, by_index(killed_at))) < len(expected)  # the kill came mid-stream
    assert by_index(msgs) == [expected] * N
    finish = (
        generation_pb2.FINISH_REASON_LENGTH
        if len(expected) == max_tokens
        else generation_pb2.FINISH_REASON_STOP
    )
    assert finish_reasons(msgs) == [finish] * N
    assert len({text_of(msgs, i) for i in range(N)}) == 1
    usage = msgs[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), N * len(expected))
    assert usage.cached_prompt_tokens <= len(PROMPT)  # not the resumed prompts' (longer) cached prefixes
    assert_idle(cluster)


def test_seeded_n3_stream_keeps_the_tokens_sent_and_reaches_max_tokens(cluster: Supervisor) -> None:
    max_tokens = 200
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=generation_pb2.SamplingParams(
            max_tokens=max_tokens, n=N, temperature=1.0, seed=1234, ignore_eos=True
        ),
    )
    reference = by_index(undisturbed(cluster, request))
    assert len({tuple(r) for r in reference}) == N  # each completion has its own seed
    killed_at, msgs = stream_with_kill(cluster, request, before=15)

    sent, final = by_index(killed_at), by_index(msgs)
    for i in range(N):
        assert 15 <= len(sent[i]) < max_tokens
        assert final[i][: len(sent[i])] == sent[i] == reference[i][: len(sent[i])]
        assert len(final[i]) == max_tokens
    assert finish_reasons(msgs) == [generation_pb2.FINISH_REASON_LENGTH] * N
    usage = msgs[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), N * max_tokens)
    assert usage.cached_prompt_tokens <= len(PROMPT)
    assert_idle(cluster)


def test_a_stop_string_after_the_kill_cuts_each_resumed_completion(cluster: Supervisor, model: Path) -> None:
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=400, n=N)
    )
    full = undisturbed(cluster, request)
    text = text_of(full, 0)
    # A stop string whose first match starts after the completion's 150th token.
    offset, n_tokens = 0, 0
    for m in (m for m in full if m.index == 0 and n_tokens < 150):
        offset, n_tokens = offset + len(m.text), n_tokens + len(m.token_ids)
    start = next(o for o in range(offset, len(text) - 6) if text.find(text[o : o + 6]) == o)
    request.sampling.stop.append(text[start : start + 6])
    killed_at, msgs = stream_with_kill(cluster, request, before=20)

    assert max(map(len, by_index(killed_at))) < 150  # the kill came before the stop
    for i in range(N):
        assert text_of(msgs, i) == text[:start]
        ids = by_index(msgs)[i]
        assert ids == by_index(full)[i][: len(ids)]
    assert finish_reasons(msgs) == [generation_pb2.FINISH_REASON_STOP] * N
    assert_idle(cluster)


def test_cancelling_the_call_after_a_migration_cancels_every_resumed_stream(cluster: Supervisor) -> None:
    max_tokens = 600
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, n=N, ignore_eos=True),
    )
    generated = {d.spec.id: metric(d, "tandem_generation_tokens_total") for d in children(cluster, "decode")}
    killed_at, msgs = stream_with_kill(cluster, request, before=20, cancel_at=60)

    assert max(map(len, by_index(killed_at))) < 60 <= min(map(len, by_index(msgs)))
    assert_idle(cluster)
    survivors = children(cluster, "decode")
    assert [metric(d, "tandem_requests_running") for d in survivors] == [0.0] * len(survivors)
    # The resumed streams stopped soon after the cancel, far short of max_tokens.
    resumed = sum(metric(d, "tandem_generation_tokens_total") - generated[d.spec.id] for d in survivors)
    assert 0 < resumed < N * max_tokens // 3
