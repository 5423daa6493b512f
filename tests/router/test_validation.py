"""Router validation of the sampling surface: every bad field is named, defaults map
from zero values, and the wire form round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.codec import sampling_params_from_pb, sampling_params_to_pb
from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.validation import parse_generate_request
from tandem.v1 import generation_pb2
from tests.helpers.checkpoints import _train_tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(VOCAB).save(str(path))
    return Tokenizer.from_pretrained(path.parent)


def parse(tokenizer: Tokenizer, **sampling: Any):
    pb = generation_pb2.GenerateRequest(
        prompt_token_ids=[0, 5, 6], sampling=generation_pb2.SamplingParams(**sampling)
    )
    return parse_generate_request(pb, tokenizer, vocab_size=VOCAB, max_model_len=128)


#: (sampling fields, field named in the error, text in the message)
BAD = [
    ({"min_p": 1.5}, "sampling.min_p", "[0, 1]"),
    ({"min_p": -0.1}, "sampling.min_p", "[0, 1]"),
    ({"min_p": float("nan")}, "sampling.min_p", "[0, 1]"),
    ({"repetition_penalty": -1.0}, "sampling.repetition_penalty", "> 0"),
    ({"repetition_penalty": float("inf")}, "sampling.repetition_penalty", "> 0"),
    ({"presence_penalty": 2.5}, "sampling.presence_penalty", "[-2, 2]"),
    ({"presence_penalty": -2.01}, "sampling.presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": 3.0}, "sampling.frequency_penalty", "[-2, 2]"),
    ({"frequency_penalty": float("nan")}, "sampling.frequency_penalty", "[-2, 2]"),
    ({"stop": ["ok", ""]}, "sampling.stop", "must not be empty"),
    ({"stop": [f"s{i}" for i in range(17)]}, "sampling.stop", "at most 16"),
    ({"stop_token_ids": [1, VOCAB]}, "sampling.stop_token_ids", f"token id {VOCAB} at index 1"),
    ({"logprobs": 21}, "sampling.logprobs", "[0, 20]"),
    ({"n": 17}, "sampling.n", "[1, 16]"),
    ({"prompt_logprobs": 21}, "sampling.prompt_logprobs", "[0, 20]"),
]


@pytest.mark.parametrize(("fields", "name", "text"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_sampling_field_is_named(
    tokenizer: Tokenizer, fields: dict[str, Any], name: str, text: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(tokenizer, **fields)
    assert info.value.field == name
    assert str(info.value).startswith(f"{name}: ")
    assert text in str(info.value)


def test_zero_values_mean_the_defaults(tokenizer: Tokenizer) -> None:
    parsed = parse(tokenizer)
    assert parsed.sampling == SamplingParams()
    p = parsed.sampling
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (0.0, 1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids, p.logprobs, p.n) == ((), (), None, 1)
    assert not p.has_penalties


def test_accepted_limits(tokenizer: Tokenizer) -> None:
    p = parse(
        tokenizer,
        min_p=1.0,
        repetition_penalty=0.01,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        stop=[f"s{i}" for i in range(16)],
        stop_token_ids=[0, VOCAB - 1],
        logprobs=20,
        n=1,
    ).sampling
    assert p.stop == tuple(f"s{i}" for i in range(16))
    assert p.stop_token_ids == (0, VOCAB - 1)
    assert (p.logprobs, p.repetition_penalty) == (20, pytest.approx(0.01))
    assert p.has_penalties


def test_wire_form_round_trips() -> None:
    params = SamplingParams(
        max_tokens=7,
        temperature=0.5,
        top_p=0.75,
        top_k=3,
        seed=2**63,
        min_p=0.25,
        repetition_penalty=1.5,
        presence_penalty=-0.5,
        frequency_penalty=1.25,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        logprobs=4,
    )
    assert sampling_params_from_pb(sampling_params_to_pb(params)) == params


def test_python_api_accepts_lists_and_a_single_stop_string() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert (p.stop, p.stop_token_ids) == (("###",), (5, 6))
    assert hash(p) == hash(SamplingParams(stop=["###"], stop_token_ids=(5, 6)))
    with pytest.raises(InvalidRequest, match=r"^sampling.stop_token_ids: "):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(InvalidRequest, match=r"^sampling.logprobs: "):
        SamplingParams(logprobs=-1)
    assert SamplingParams(n=16).n == 16  # the engine type allows n up to 16; the router rejects n > 1
