"""The sampling surface end to end (router → prefill → decode, real processes):
validation errors name their field, stop strings and stop token ids end the text
where they should, log-probabilities and penalties match transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import transformers

from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
PROMPT = [0, 17, 230, 45, 45, 98, 301, 17, 5, 77, 45]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sampling") / "model", seed=1)


@pytest.fixture(scope="module")
def stack(model_dir: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(model_dir, tmp_path_factory.mktemp("stack"), redis_server.url).start()
    yield s
    assert s.stop() == 0


def hf_generate(
    model_dir: Path, prompt: list[int], max_new_tokens: int, **kwargs: Any
) -> tuple[list[int], list]:
    """transformers ``generate`` (greedy, float32, no EOS stop): tokens and raw logits per step."""
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=None, return_dict_in_generate=True, output_logits=True, **kwargs,
        )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [step[0] for step in out.logits]


BAD = [
    (SamplingParams(min_p=1.5), "sampling.min_p"),
    (SamplingParams(repetition_penalty=-1.0), "sampling.repetition_penalty"),
    (SamplingParams(presence_penalty=2.5), "sampling.presence_penalty"),
    (SamplingParams(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    (SamplingParams(stop=["x", ""]), "sampling.stop"),
    (SamplingParams(stop=[str(i) for i in range(17)]), "sampling.stop"),
    (SamplingParams(stop_token_ids=[512]), "sampling.stop_token_ids"),
    (SamplingParams(logprobs=21), "sampling.logprobs"),
    (SamplingParams(n=17), "sampling.n"),
    (SamplingParams(prompt_logprobs=21), "sampling.prompt_logprobs"),
]


def test_every_new_validation_error_names_its_field(stack: Stack) -> None:
    for sampling, field in BAD:
        request = GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling)
        for call in (
            stack.stub.Generate,
            lambda r, timeout: list(stack.stub.GenerateStream(r, timeout=timeout)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_two_completions_prompt_logprobs_and_priority(stack: Stack, model_dir: Path) -> None:
    """n=2 through router -> prefill (once) -> decode (forks): both greedy choices equal
    transformers; stream indexes; prompt log-probabilities on the first message."""
    expected, _ = hf_generate(model_dir, PROMPT, 9)
    sampling = SamplingParams(max_tokens=9, ignore_eos=True, n=2, prompt_logprobs=2)
    request = GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling, priority=-3)
    unary = stack.stub.Generate(request, timeout=60)
    assert [c.index for c in unary.choices] == [0, 1]
    assert [list(c.token_ids) for c in unary.choices] == [expected, expected]
    assert list(unary.token_ids) == expected and unary.text == unary.choices[0].text
    assert unary.usage.completion_tokens == 18
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    assert [e.token_id for e in unary.prompt_logprobs] == PROMPT[1:]
    for p, entry in enumerate(unary.prompt_logprobs, start=1):
        assert entry.logprob == pytest.approx(reference[p - 1, PROMPT[p]].item(), abs=1e-4)
        assert len(entry.top_logprobs) == 2
    msgs = list(stack.stub.GenerateStream(request, timeout=60))
    assert len(msgs[0].prompt_logprobs) == len(PROMPT) - 1
    assert all(not m.prompt_logprobs for m in msgs[1:])
    for index in (0, 1):
        mine = [m for m in msgs if m.index == index]
        assert [t for m in mine for t in m.token_ids] == expected
        assert mine[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert msgs[-1].usage.completion_tokens == 18
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_seeded_completions_differ_and_repeat(stack: Stack) -> None:
    sampling = SamplingParams(max_tokens=8, ignore_eos=True, n=3, temperature=1.0, seed=42)
    request = GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling)
    first = stack.stub.Generate(request, timeout=60)
    again = stack.stub.Generate(request, timeout=60)
    choices = [list(c.token_ids) for c in first.choices]
    assert choices == [list(c.token_ids) for c in again.choices]
    assert len({tuple(c) for c in choices}) == 3


def test_stop_string_split_across_tokens_ends_the_text(stack: Stack, model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    plain = SamplingParams(max_tokens=40, ignore_eos=True)
    full = stack.stub.Generate(GenerateRequest(prompt_token_ids=PROMPT, sampling=plain), timeout=60)
    ids, text = list(full.token_ids), full.text
    assert tokenizer.decode(ids) == text
    # a stop string made of the end of token 6 and the start of token 7 (a token boundary inside it)
    boundary = len(tokenizer.decode(ids[:7]))
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and "\ufffd" not in stop and not any(stop in tokenizer.decode([t]) for t in ids)
    cut = text.index(stop)
    request = GenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=SamplingParams(max_tokens=40, ignore_eos=True, stop=["never-there", stop]),
    )
    streamed_ids, streamed_text, msgs = stream_tokens(stack.stub, request)
    assert streamed_text == text[:cut]
    assert all(stop not in "".join(m.text for m in msgs[: i + 1]) for i in range(len(msgs)))
    assert msgs[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    # tokens run up to the one that completed the stop string; generation stopped there
    assert streamed_ids == ids[: len(streamed_ids)]
    assert stop in tokenizer.decode(streamed_ids) and stop not in tokenizer.decode(streamed_ids[:-1])
    assert msgs[-1].usage.completion_tokens == len(streamed_ids) < 40
    unary = stack.stub.Generate(request, timeout=60)
    assert (unary.text, list(unary.token_ids), unary.finish_reason) == (
        text[:cut], streamed_ids, generation_pb2.FINISH_REASON_STOP)  # fmt: skip
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


def test_stop_token_ids_end_generation(stack: Stack) -> None:
    plain = SamplingParams(max_tokens=30, ignore_eos=True)
    ids = list(
        stack.stub.Generate(GenerateRequest(prompt_token_ids=PROMPT, sampling=plain), timeout=60).token_ids
    )
    for k in (0, 9):  # the first token comes from the prefill worker, later ones from the decode worker
        k = ids.index(ids[k])  # first occurrence
        sampling = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[ids[k]])
        reply = stack.stub.Generate(GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling), timeout=60)
        assert list(reply.token_ids) == ids[: k + 1]
        assert reply.finish_reason == generation_pb2.FINISH_REASON_STOP


def test_logprobs_travel_through_both_workers(stack: Stack, model_dir: Path) -> None:
    sampling = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3)
    expected, logits = hf_generate(model_dir, PROMPT, 8)
    ids, _, msgs = stream_tokens(stack.stub, GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling))
    entries = [lp for m in msgs for lp in m.logprobs]
    assert ids == expected == [e.token_id for e in entries]
    assert all(len(m.logprobs) == len(m.token_ids) for m in msgs)
    for entry, step_logits in zip(entries, logits, strict=True):
        reference = torch.log_softmax(step_logits, dim=-1)
        assert entry.logprob == pytest.approx(reference[entry.token_id].item(), abs=1e-4)
        top = torch.topk(reference, 3)
        assert [t.token_id for t in entry.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    unary = stack.stub.Generate(GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling), timeout=60)
    assert list(unary.logprobs) == entries
    plain = stack.stub.Generate(
        GenerateRequest(prompt_token_ids=PROMPT, sampling=SamplingParams(max_tokens=4)), timeout=60
    )
    assert len(plain.logprobs) == 0


def test_repetition_penalty_matches_transformers_through_the_stack(stack: Stack, model_dir: Path) -> None:
    sampling = SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    expected, _ = hf_generate(model_dir, PROMPT, 16, repetition_penalty=1.8)
    got = list(
        stack.stub.Generate(GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling), timeout=60).token_ids
    )
    assert got == expected
    greedy, _ = hf_generate(model_dir, PROMPT, 16)
    assert got != greedy
