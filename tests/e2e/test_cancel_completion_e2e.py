"""A completion of an ``n`` > 1 request cut by a stop string at the router stops on its
worker too (``DecodeWorker.CancelCompletion``), disaggregated and colocated, with real
processes: the worker generates far fewer tokens than ``n × max_tokens``, the other
completions are untouched, and every block comes back. Plus the RPC itself, called
directly on a worker: authentication, validation, idempotence, the stream's end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.stack import Stack
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
PROMPT = [0, 17, 230, 45, 45, 98, 301, 17, 5, 77, 45]
MAX_TOKENS = 150
N = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cancel") / "model", seed=3)


@pytest.fixture(scope="module")
def disaggregated(model_dir: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(model_dir, tmp_path_factory.mktemp("dstack"), redis_server.url).start()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def colocated(model_dir: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(model_dir, tmp_path_factory.mktemp("cstack"), redis_server.url, ["--colocated"]).start()
    yield s
    assert s.stop() == 0


def sampling(**kwargs: Any) -> SamplingParams:
    """``N`` seeded completions of ``MAX_TOKENS`` tokens each (EOS ignored), unless overridden."""
    fields: dict[str, Any] = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "n": N, "temperature": 1.0}
    return SamplingParams(**{**fields, "seed": 7, **kwargs})


def stop_string(
    tokenizer: Tokenizer, ids: list[int], others: list[str], tokens: range
) -> tuple[str, int] | None:
    """A stop string that first ends at the end of token ``k`` (in ``tokens``) of ``ids`` and
    that none of ``others`` contains, and that ``k``; ``None`` when there is none."""
    text = tokenizer.decode(ids)
    for k in tokens:
        prefix = tokenizer.decode(ids[:k])
        for length in (2, 3, 4, 5, 6):
            stop = prefix[-length:]
            if (
                len(stop.strip()) >= 2
                and "\ufffd" not in stop
                and text.find(stop) == len(prefix) - length
                and not any(stop in other for other in others)
            ):
                return stop, k
    return None


def generated_tokens(stack: Stack, kind: str) -> float:
    return sum(stack.metric(p, "tandem_generation_tokens_total") for p in stack.processes(kind))


def check_stopped_completion_stops_on_worker(stack: Stack, model_dir: Path, kind: str, tokens: range) -> None:
    """Completion ``j`` of a seeded request hits a stop string after ``k`` tokens (``k`` in
    ``tokens``): the others are untouched, and the worker's generated-token counter grows by
    about ``(N - 1) × MAX_TOKENS + k``, not ``N × MAX_TOKENS``."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    for seed in range(7, 37):  # the first seed whose completions give such a stop string
        free = stack.stub.Generate(
            GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling(seed=seed)), timeout=120
        )
        ids = [list(c.token_ids) for c in free.choices]
        texts = [c.text for c in free.choices]
        assert [len(i) for i in ids] == [MAX_TOKENS] * N and len(set(map(tuple, ids))) == N
        found = [(j, stop_string(tokenizer, ids[j], texts[:j] + texts[j + 1 :], tokens)) for j in range(N)]
        picks = [(j, f) for j, f in found if f is not None]
        if picks:
            break
    else:
        raise AssertionError(f"no seed gives a stop string ending within tokens {tokens}")
    j, (stop, k) = picks[0]
    assert not any(stack.wait_blocks_free().values())

    before = generated_tokens(stack, kind)
    request = GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling(seed=seed, stop=[stop]))
    reply = stack.stub.Generate(request, timeout=120)
    # the worker counts the tokens its engine produced (disaggregated: token 0 is the prefill worker's)
    worker_tokens = generated_tokens(stack, kind) - before
    first = 1 if kind == "decode" else 0

    for i, choice in enumerate(reply.choices):
        if i == j:
            assert choice.finish_reason == generation_pb2.FINISH_REASON_STOP
            assert choice.text == texts[j][: texts[j].index(stop)]
            assert list(choice.token_ids) == ids[j][:k]
        else:
            assert choice.finish_reason == generation_pb2.FINISH_REASON_LENGTH
            assert (list(choice.token_ids), choice.text) == (ids[i], texts[i])
    assert reply.usage.completion_tokens == k + (N - 1) * MAX_TOKENS
    # Without the cancel the worker runs completion j on with the others: N × (MAX_TOKENS - first).
    floor = (N - 1) * (MAX_TOKENS - first) + k - first
    assert floor <= worker_tokens < floor + MAX_TOKENS // 2, (worker_tokens, floor)
    assert not any(stack.wait_blocks_free().values())


def test_disaggregated_stop_string_stops_the_completion_on_the_decode_worker(
    disaggregated: Stack, model_dir: Path
) -> None:
    check_stopped_completion_stops_on_worker(disaggregated, model_dir, "decode", range(3, 20))


def test_disaggregated_stop_string_in_the_first_token(disaggregated: Stack, model_dir: Path) -> None:
    """The stop string is in a completion's first token, sampled by the prefill worker: the
    router cuts it before the decode stream exists; the cancel goes with its first message."""
    check_stopped_completion_stops_on_worker(disaggregated, model_dir, "decode", range(1, 2))


def test_colocated_stop_string_stops_the_completion_on_the_worker(colocated: Stack, model_dir: Path) -> None:
    check_stopped_completion_stops_on_worker(colocated, model_dir, "colocated", range(3, 20))


def test_cancel_completion_rpc_on_a_worker(colocated: Stack) -> None:
    """Called directly: the token is required, input is checked, the cancelled completion
    ends with ``FINISH_REASON_ABORT`` while the other runs to its end, a second cancel is
    a no-op, and an ended or unknown request is ``known`` false."""
    (worker,) = colocated.processes("colocated")
    cancel = worker_pb2.CancelCompletionRequest
    for token in (None, "wrong"):
        with colocated.open_channel(worker["grpc_address"], token) as channel:
            with pytest.raises(grpc.RpcError) as info:
                worker_pb2_grpc.DecodeWorkerStub(channel).CancelCompletion(
                    cancel(request_id="x", index=0), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with colocated.worker_channel(worker) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        assert not stub.CancelCompletion(cancel(request_id="nobody", index=0), timeout=10).known
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelCompletion(cancel(request_id="", index=0), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("request_id: ")

        call = stub.Generate(
            worker_pb2.LocalGenerateRequest(
                request_id="direct-1",
                prompt_token_ids=PROMPT,
                sampling=sampling(n=2),
            ),
            timeout=120,
        )
        msgs = [next(call)]  # the request has forked into its 2 completions
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelCompletion(cancel(request_id="direct-1", index=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("index: ")
        assert stub.CancelCompletion(cancel(request_id="direct-1", index=1), timeout=10).known
        assert stub.CancelCompletion(cancel(request_id="direct-1", index=1), timeout=10).known
        msgs.extend(call)
        assert not stub.CancelCompletion(cancel(request_id="direct-1", index=0), timeout=10).known

    by_index = {i: [m for m in msgs if m.index == i] for i in (0, 1)}
    assert [m.finish_reason for m in by_index[1] if m.finish_reason] == [generation_pb2.FINISH_REASON_ABORT]
    assert by_index[1][-1].finish_reason == generation_pb2.FINISH_REASON_ABORT
    assert sum(len(m.token_ids) for m in by_index[1]) < MAX_TOKENS // 2
    assert [m.finish_reason for m in by_index[0] if m.finish_reason] == [generation_pb2.FINISH_REASON_LENGTH]
    assert sum(len(m.token_ids) for m in by_index[0]) == MAX_TOKENS
    assert colocated.wait_blocks_free() == {worker["id"]: 0.0}
