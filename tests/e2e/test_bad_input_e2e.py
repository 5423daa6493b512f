"""Every field of the public ``GenerateRequest``, pushed to and past its limits, on one
real stack (bundled model, ``--max-model-len 96``): each case ends either with
``INVALID_ARGUMENT`` whose message starts with the field to fix, or with the success
that README.md ("Public API rules") documents; never another code, a hang or a dead
process. Then duplicate request ids in flight together, expired deadlines and
immediate cancels; at the end no worker holds a KV block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from engine.sampling_params import MAX_STOP_STRING_CHARS
from router.validation import MAX_CACHE_SALT_LEN, MAX_REQUEST_ID_LEN
from tandem.v1 import generation_pb2
from tests.e2e.stack import REPO, Stack, stream_tokens
from tests.e2e.test_fuzz_public_api import assert_stack_intact

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
MAX_MODEL_LEN = 96
VOCAB = 4096
NAN, INF = float("nan"), float("inf")
ODD = "a\n\t\x00é/#.:*💥 \u200b"
PROMPT = [5, 6, 7, 8]
TIMEOUT_S = 30.0


def ids(n: int) -> list[int]:
    return [(7 * i) % 4000 + 3 for i in range(n)]


def req(prompt: list[int] | None = None, /, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=PROMPT if prompt is None else prompt, sampling=SamplingParams(**sampling)
    )


@dataclass(frozen=True)
class Bad:
    """A request refused with INVALID_ARGUMENT whose message starts with ``field``."""

    name: str
    request: GenerateRequest
    field: str


@dataclass(frozen=True)
class Good:
    """A request served; ``check`` asserts on the unary response."""

    name: str
    request: GenerateRequest
    check: Callable[[generation_pb2.GenerateResponse], None] = field(default=lambda r: None)


LENGTH = generation_pb2.FINISH_REASON_LENGTH


def n_tokens(n: int, finish: int | None = LENGTH) -> Callable[[generation_pb2.GenerateResponse], None]:
    def check(r: generation_pb2.GenerateResponse) -> None:
        assert len(r.token_ids) == n, len(r.token_ids)
        if finish is not None:
            assert r.finish_reason == finish

    return check


BAD = [
    Bad("nothing", GenerateRequest(), "prompt"),
    Bad("empty prompt and ids", GenerateRequest(prompt="", sampling=SamplingParams(max_tokens=2)), "prompt"),
    Bad("prompt and ids", GenerateRequest(prompt="Hi", prompt_token_ids=[5]), "prompt"),
    Bad("id = vocab", req([5, VOCAB]), "prompt_token_ids"),
    Bad("id max uint32", req([2**32 - 1]), "prompt_token_ids"),
    Bad("prompt = max_model_len", req(ids(MAX_MODEL_LEN), max_tokens=1), "prompt"),
    Bad("prompt > max_model_len", req(ids(300)), "prompt"),
    Bad("prompt > max_model_len, max_tokens unset", req(ids(MAX_MODEL_LEN + 1)), "prompt"),
    Bad("prompt + max_tokens > max_model_len", req(ids(90), max_tokens=7), "sampling.max_tokens"),
    Bad("max_tokens max uint32", req(max_tokens=2**32 - 1), "sampling.max_tokens"),
    *(
        Bad(f"temperature {t}", req(temperature=t), "sampling.temperature")
        for t in (-1.0, -1e-30, NAN, INF, -INF)
    ),
    *(Bad(f"top_p {p}", req(top_p=p), "sampling.top_p") for p in (0.0, -0.5, 1.5, NAN, INF)),
    *(Bad(f"min_p {p}", req(min_p=p), "sampling.min_p") for p in (-0.1, 1.5, NAN, INF)),
    *(
        Bad(f"repetition_penalty {p}", req(repetition_penalty=p), "sampling.repetition_penalty")
        for p in (-1.0, NAN, INF)
    ),
    *(
        Bad(f"{name} {v}", req(**{name: v}), f"sampling.{name}")
        for name in ("presence_penalty", "frequency_penalty")
        for v in (2.5, -2.5, NAN, INF, -INF)
    ),
    Bad("stop empty string", req(stop=["ok", ""]), "sampling.stop"),
    Bad("stop 17 strings", req(stop=[f"s{i}" for i in range(17)]), "sampling.stop"),
    Bad("stop too long", req(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "sampling.stop"),
    Bad("stop_token_ids = vocab", req(stop_token_ids=[3, VOCAB]), "sampling.stop_token_ids"),
    Bad("stop_token_ids max uint32", req(stop_token_ids=[2**32 - 1]), "sampling.stop_token_ids"),
    Bad("logprobs 21", req(logprobs=21), "sampling.logprobs"),
    Bad("logprobs max uint32", req(logprobs=2**32 - 1), "sampling.logprobs"),
    Bad("prompt_logprobs 21", req(prompt_logprobs=21), "sampling.prompt_logprobs"),
    Bad("n 17", req(n=17), "sampling.n"),
    Bad("n max uint32", req(n=2**32 - 1), "sampling.n"),
    Bad(
        "request_id too long",
        GenerateRequest(request_id="r" * (MAX_REQUEST_ID_LEN + 1), prompt_token_ids=PROMPT),
        "request_id",
    ),
    Bad(
        "cache_salt too long",
        GenerateRequest(cache_salt="s" * (MAX_CACHE_SALT_LEN + 1), prompt_token_ids=PROMPT),
        "cache_salt",
    ),
]


def echoes_id(expected: str) -> Callable[[generation_pb2.GenerateResponse], None]:
    def check(r: generation_pb2.GenerateResponse) -> None:
        assert r.request_id == expected
        assert len(r.token_ids) == 2

    return check


def completions(n: int, each: int) -> Callable[[generation_pb2.GenerateResponse], None]:
    def check(r: generation_pb2.GenerateResponse) -> None:
        assert [len(c.token_ids) for c in r.choices] == [each] * n

    return check


GOOD = [
    Good("max_tokens 0 is 16", req(max_tokens=0, ignore_eos=True), n_tokens(16)),
    Good(
        "max_tokens unset near the end: clipped to the room left", req(ids(90), ignore_eos=True), n_tokens(6)
    ),
    Good("prompt + max_tokens = max_model_len", req(ids(95), max_tokens=1), n_tokens(1)),
    Good(
        "top_k max uint32 is off",
        req(max_tokens=3, ignore_eos=True, temperature=1.0, top_k=2**32 - 1),
        n_tokens(3),
    ),
    Good("top_p tiny", req(max_tokens=3, ignore_eos=True, temperature=1.0, top_p=1e-30), n_tokens(3)),
    Good("temperature tiny", req(max_tokens=3, ignore_eos=True, temperature=1e-30), n_tokens(3)),
    Good("temperature huge", req(max_tokens=3, ignore_eos=True, temperature=3e38), n_tokens(3)),
    Good(
        "penalties at the bounds",
        req(
            max_tokens=3,
            ignore_eos=True,
            presence_penalty=-2.0,
            frequency_penalty=2.0,
            repetition_penalty=1e-3,
        ),
        n_tokens(3),
    ),
    Good(
        "seed max uint64, n 2",
        req(max_tokens=3, ignore_eos=True, temperature=1.0, seed=2**64 - 1, n=2),
        completions(2, 3),
    ),
    Good("n 16", req(max_tokens=2, ignore_eos=True, temperature=1.0, n=16), completions(16, 2)),
    Good("logprobs 20", req(max_tokens=2, ignore_eos=True, logprobs=20, prompt_logprobs=20), n_tokens(2)),
    Good(
        "16 stop strings, long and odd",
        req(
            max_tokens=4,
            ignore_eos=True,
            stop=[ODD * 8, "x" * MAX_STOP_STRING_CHARS, *(f"\x00{i}" for i in range(14))],
        ),
        n_tokens(4),
    ),
    Good(
        "stop_token_ids last id",
        req(max_tokens=2, ignore_eos=True, stop_token_ids=[VOCAB - 1]),
        n_tokens(2, None),
    ),
    Good(
        "odd request_id",
        GenerateRequest(
            request_id=ODD, prompt_token_ids=PROMPT, sampling=SamplingParams(max_tokens=2, ignore_eos=True)
        ),
        echoes_id(ODD),
    ),
    Good(
        "longest request_id",
        GenerateRequest(
            request_id="é" * MAX_REQUEST_ID_LEN,
            prompt_token_ids=PROMPT,
            sampling=SamplingParams(max_tokens=2, ignore_eos=True),
        ),
        echoes_id("é" * MAX_REQUEST_ID_LEN),
    ),
    Good(
        "longest odd cache_salt",
        GenerateRequest(
            cache_salt=(ODD * 30)[:MAX_CACHE_SALT_LEN],
            prompt_token_ids=PROMPT,
            sampling=SamplingParams(max_tokens=2, ignore_eos=True),
        ),
        n_tokens(2),
    ),
    *(
        Good(
            f"priority {p}",
            GenerateRequest(
                priority=p, prompt_token_ids=PROMPT, sampling=SamplingParams(max_tokens=2, ignore_eos=True)
            ),
            n_tokens(2),
        )
        for p in (-(2**31), 2**31 - 1)
    ),
    Good(
        "odd text prompt",
        GenerateRequest(prompt=ODD * 3, sampling=SamplingParams(max_tokens=2, ignore_eos=True)),
        n_tokens(2),
    ),
]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--lease-ms", "3000"]
    s = Stack(
        REPO / "models" / "tandem-tiny", tmp_path_factory.mktemp("badinput"), redis_server.url, args
    ).start()
    yield s
    assert s.stop() == 0


def call(
    stack: Stack, request: GenerateRequest, stream: bool, **kw: object
) -> generation_pb2.GenerateResponse:
    if stream:
        for _ in stack.stub.GenerateStream(request, timeout=TIMEOUT_S, **kw):
            pass
        return generation_pb2.GenerateResponse()
    return stack.stub.Generate(request, timeout=TIMEOUT_S, **kw)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_each_bad_field_is_invalid_argument_naming_it(stack: Stack, stream: bool) -> None:
    wrong = []
    for case in BAD:
        try:
            call(stack, case.request, stream)
            wrong.append((case.name, "OK", ""))
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or not details.startswith(f"{case.field}: "):
                wrong.append((case.name, exc.code().name, details))
    assert not wrong, wrong


def test_each_documented_edge_is_served(stack: Stack) -> None:
    wrong = []
    for case in GOOD:
        try:
            case.check(call(stack, case.request, False, metadata=(("x-unknown", ODD.encode().hex()),)))
        except (grpc.RpcError, AssertionError) as exc:
            wrong.append((case.name, repr(exc)[:300]))
    assert not wrong, wrong


def test_unknown_and_binary_metadata_is_ignored(stack: Stack) -> None:
    metadata = (("x-tenant", "a"), ("x-blob-bin", b"\x00\xff" * 100), ("grpc-timeout-ish", "1"))
    r = stack.stub.Generate(req(max_tokens=2, ignore_eos=True), timeout=TIMEOUT_S, metadata=metadata)
    assert len(r.token_ids) == 2


def test_duplicate_request_ids_in_flight_get_their_own_outputs(stack: Stack) -> None:
    prompts = [ids(5 + 3 * k) for k in range(4)]
    alone = [
        stream_tokens(
            stack.stub,
            GenerateRequest(prompt_token_ids=p, sampling=SamplingParams(max_tokens=12, ignore_eos=True)),
        )[0]
        for p in prompts
    ]
    results: dict[int, list[int]] = {}

    def one(k: int) -> None:
        request = GenerateRequest(
            request_id="same",
            prompt_token_ids=prompts[k],
            sampling=SamplingParams(max_tokens=12, ignore_eos=True),
        )
        results[k] = list(stack.stub.Generate(request, timeout=TIMEOUT_S).token_ids)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 5)
    assert [results.get(k) for k in range(len(prompts))] == alone


@pytest.mark.parametrize("timeout", [0.0, 1e-6, 0.05])
def test_expired_deadline_is_deadline_exceeded(stack: Stack, timeout: float) -> None:
    long = req(ids(40), max_tokens=50, ignore_eos=True)
    for stream in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            if stream:
                list(stack.stub.GenerateStream(long, timeout=timeout))
            else:
                stack.stub.Generate(long, timeout=timeout)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_immediate_and_early_cancels(stack: Stack) -> None:
    long = req(ids(40), max_tokens=50, ignore_eos=True)
    for _ in range(3):
        stack.stub.GenerateStream(long, timeout=TIMEOUT_S).cancel()
        future = stack.stub.Generate.future(long, timeout=TIMEOUT_S)
        future.cancel()
        call_ = stack.stub.GenerateStream(long, timeout=TIMEOUT_S)
        next(call_)
        call_.cancel()


def test_nothing_leaked_and_still_serving(stack: Stack) -> None:
    assert_stack_intact(stack)
