"""Fuzz the public API of a real stack with hypothesis: random and malformed
``GenerateRequest``s (odd unicode, huge and out-of-range numbers, NaN and
infinities) and random bytes sent as raw messages. Every call ends with a status
code within its deadline; no process dies; the stack still serves afterwards and
holds no KV block.

Examples are derandomized (the same ones on every run) and bounded: 80
structured requests and 40 raw messages, each with a 10 s deadline.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.v1 import generation_pb2
from tests.e2e.stack import REPO, Stack

pytestmark = pytest.mark.e2e

DEADLINE_S = 10.0


def fuzz(max_examples: int) -> settings:
    """Derandomized, no example database, no per-example deadline (each call has its own)."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


#: Codes a well-formed protobuf may get: served, refused as invalid, or out of capacity or time.
EXPECTED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "OUT_OF_RANGE"}

U32 = st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
F32 = st.floats(width=32)  # NaN, infinities, subnormals and huge values included
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=120)  # any valid UTF-8
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": U32, "temperature": F32, "top_p": F32, "top_k": U32,
        "seed": st.integers(0, 2**64 - 1), "ignore_eos": st.booleans(), "min_p": F32,
        "repetition_penalty": F32, "presence_penalty": F32, "frequency_penalty": F32,
        "stop": st.lists(TEXT, max_size=3), "stop_token_ids": st.lists(U32, max_size=3),
        "logprobs": U32, "n": U32,
    },
)  # fmt: skip
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "request_id": TEXT, "prompt": TEXT, "prompt_token_ids": st.lists(U32, max_size=40),
        "sampling": SAMPLING, "cache_salt": TEXT,
    },
)  # fmt: skip
# Requests that mostly pass validation, so that the workers see odd prompts, stops and sampling too.
NEAR_VALID = st.fixed_dictionaries(
    {
        "sampling": st.fixed_dictionaries(
            {"max_tokens": st.integers(1, 24)},
            optional={
                "temperature": st.floats(0, 3), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 5000),
                "seed": st.integers(0, 2**64 - 1), "ignore_eos": st.booleans(), "min_p": st.floats(0, 1),
                "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
                "frequency_penalty": st.floats(-2, 2), "stop": st.lists(TEXT, max_size=3),
                "stop_token_ids": st.lists(st.integers(0, 4095), max_size=3), "logprobs": st.integers(0, 8),
            },
        ),
    },
    optional={"request_id": TEXT, "cache_salt": TEXT},
).flatmap(
    lambda fields: st.one_of(
        st.builds(lambda p: {**fields, "prompt": p}, TEXT.filter(bool)),
        st.builds(lambda ids: {**fields, "prompt_token_ids": ids}, st.lists(st.integers(0, 4095), min_size=1, max_size=60)),
    )
)  # fmt: skip
METHODS = [
    "/tandem.v1.Generation/Generate",
    "/tandem.v1.Generation/GenerateStream",
    "/tandem.v1.Generation/GetModelInfo",
]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    args = ["--max-model-len", "96", "--num-kv-blocks", "64"]
    s = Stack(
        REPO / "models" / "tandem-tiny", tmp_path_factory.mktemp("fuzz"), redis_server.url, args
    ).start()
    yield s
    assert s.stop() == 0


def build(fields: dict[str, Any]) -> generation_pb2.GenerateRequest:
    sampling = fields.pop("sampling", None)
    request = generation_pb2.GenerateRequest(**fields)
    if sampling is not None:
        request.sampling.CopyFrom(generation_pb2.SamplingParams(**sampling))
    return request


def call_code(stack: Stack, request: generation_pb2.GenerateRequest, stream: bool) -> str:
    try:
        if stream:
            for _ in stack.stub.GenerateStream(request, timeout=DEADLINE_S):
                pass
        else:
            stack.stub.Generate(request, timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def assert_stack_intact(stack: Stack) -> None:
    for process in stack.cluster["processes"]:
        assert os.path.exists(f"/proc/{process['pid']}"), f"{process['id']} died"
    for process in stack.processes():
        assert stack.health(process) == health_pb2.HealthCheckResponse.SERVING, process["id"]
    hello = generation_pb2.GenerateRequest(
        prompt="Hello", sampling=generation_pb2.SamplingParams(max_tokens=2)
    )
    assert len(stack.stub.Generate(hello, timeout=30).token_ids) == 2
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_random_requests_always_get_a_status(stack: Stack) -> None:
    codes: Counter[str] = Counter()

    @fuzz(80)
    @given(fields=st.one_of(REQUEST, NEAR_VALID), stream=st.booleans())
    def one(fields: dict[str, Any], stream: bool) -> None:
        code = call_code(stack, build(fields), stream)
        codes[code] += 1
        assert code in EXPECTED, (code, fields)

    one()
    assert codes["OK"] > 10 and codes["INVALID_ARGUMENT"] > 10, codes
    assert_stack_intact(stack)


def test_random_bytes_always_get_a_status(stack: Stack) -> None:
    assert stack.channel is not None
    channel = stack.channel

    @fuzz(40)
    @given(payload=st.binary(max_size=300), method=st.sampled_from(METHODS))
    def one(payload: bytes, method: str) -> None:
        try:
            if method.endswith("Stream"):
                for _ in channel.unary_stream(method)(payload, timeout=DEADLINE_S):
                    pass
            else:
                channel.unary_unary(method)(payload, timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            assert isinstance(exc.code(), grpc.StatusCode)

    one()
    assert_stack_intact(stack)
