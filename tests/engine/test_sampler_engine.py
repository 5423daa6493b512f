"""Penalties, log-probabilities and stop tokens through the real engine (scheduler,
model runner, sampler) on a tiny checkpoint, against transformers ``generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.block_pool import BlockPool
from engine.config import ModelConfig
from engine.engine_core import EngineCore
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.request import EngineOutput, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from tests.helpers.checkpoints import make_tiny_llama

PROMPTS = [[0, 5, 9, 5, 9, 5, 9, 5], [0, 33, 7, 7, 7, 7, 120, 7], [0, 300, 301, 302]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("pen") / "model", seed=3)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def run_engine(model_dir: Path, requests: list[Request]) -> dict[str, list[EngineOutput]]:
    config = ModelConfig.from_pretrained(model_dir)
    runner = ModelRunner(
        config, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64,
        kv_cache_memory_bytes=0, max_model_len=128,
    )  # fmt: skip
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_model_len=128), KVCacheManager(BlockPool(64, 4))
    )
    core = EngineCore(scheduler, runner)
    for r in requests:
        core.add_request(r)
    outputs: dict[str, list[EngineOutput]] = {r.req_id: [] for r in requests}
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.req_id].append(out)
    return outputs


def tokens_of(outputs: list[EngineOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def hf_generate(
    model: transformers.PreTrainedModel, prompt: list[int], **kwargs: object
) -> tuple[list[int], list]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [logits[0] for logits in out.logits]


def test_greedy_with_repetition_penalty_matches_transformers(model_dir: Path, hf_model) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, repetition_penalty=1.8, ignore_eos=True)
    plain = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    requests = [Request(f"p{i}", p, params) for i, p in enumerate(PROMPTS)]
    requests += [Request(f"g{i}", p, plain) for i, p in enumerate(PROMPTS)]
    outputs = run_engine(model_dir, requests)
    for i, prompt in enumerate(PROMPTS):
        expected, _ = hf_generate(hf_model, prompt, repetition_penalty=1.8, eos_token_id=None)
        assert tokens_of(outputs[f"p{i}"]) == expected
    assert any(tokens_of(outputs[f"p{i}"]) != tokens_of(outputs[f"g{i}"]) for i in range(len(PROMPTS)))


def test_logprobs_match_transformers_log_softmax(model_dir: Path, hf_model) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    outputs = run_engine(model_dir, [Request(f"r{i}", p, params) for i, p in enumerate(PROMPTS)])
    for i, prompt in enumerate(PROMPTS):
        expected, logits = hf_generate(hf_model, prompt, eos_token_id=None)
        entries = [lp for o in outputs[f"r{i}"] for lp in o.logprobs]
        assert [e.token_id for e in entries] == expected == tokens_of(outputs[f"r{i}"])
        for entry, step_logits in zip(entries, logits, strict=True):
            reference = torch.log_softmax(step_logits, dim=-1)
            assert entry.logprob == pytest.approx(reference[entry.token_id].item(), abs=1e-4)
            top = torch.topk(reference, 5)
            assert [t for t, _ in entry.top_logprobs] == top.indices.tolist()
            torch.testing.assert_close(
                torch.tensor([v for _, v in entry.top_logprobs]), top.values, rtol=0, atol=1e-4
            )


def test_seeded_penalized_sampling_is_independent_of_the_batch(model_dir: Path) -> None:
    target = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.9, seed=21, ignore_eos=True,
        repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, min_p=0.05,
    )  # fmt: skip
    alone = run_engine(model_dir, [Request("t", PROMPTS[0], target)])
    others = [
        Request("a", PROMPTS[1], SamplingParams(max_tokens=5, temperature=1.2, frequency_penalty=1.0)),
        Request("b", PROMPTS[2], SamplingParams(max_tokens=9)),
        Request("t", PROMPTS[0], target),
        Request("c", PROMPTS[0], SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=4)),
    ]
    batched = run_engine(model_dir, others)
    assert tokens_of(batched["t"]) == tokens_of(alone["t"])
    assert len(tokens_of(alone["t"])) == MAX_TOKENS


def test_stop_token_ids_end_generation_in_the_engine(model_dir: Path) -> None:
    greedy = run_engine(
        model_dir, [Request("g", PROMPTS[2], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    )
    tokens = tokens_of(greedy["g"])
    stop_at = 4
    assert tokens[stop_at] not in tokens[:stop_at]
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=[tokens[stop_at]])
    stopped = run_engine(model_dir, [Request("s", PROMPTS[2], params)])["s"]
    assert tokens_of(stopped) == tokens[: stop_at + 1]
    assert stopped[-1].finished and stopped[-1].finish_reason == "stop"
