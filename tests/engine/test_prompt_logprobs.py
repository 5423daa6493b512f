"""Prompt log-probabilities against transformers' log-softmax of the full-prompt forward (float32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.block_pool import BlockPool
from engine.errors import InvalidRequest
from engine.kv_cache_manager import KVCacheManager
from engine.llm import LLM
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.worker_config import BUNDLED_MODEL_DIR

PROMPT = [0, 523, 99, 17, 250, 301, 7, 1024, 88, 5, 6, 4000, 12]  # 13 tokens


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """float32 ``[len(PROMPT), vocab]`` log-softmax of transformers' logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 5])  # whole prompt, then chunks of 5
def test_prompt_logprobs_match_transformers(reference: torch.Tensor, max_num_batched_tokens: int) -> None:
    llm = LLM(
        BUNDLED_MODEL_DIR,
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=32,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    sp = SamplingParams(max_tokens=2, prompt_logprobs=3, n=2)
    out = llm.generate([PROMPT, [0, 5]], [sp, SamplingParams(max_tokens=2)], use_tqdm=False)
    entries = out[0].prompt_logprobs
    assert entries is not None and len(entries) == len(PROMPT) and entries[0] is None
    for p, entry in enumerate(entries[1:], start=1):
        assert entry is not None and entry.token_id == PROMPT[p]
        expected = reference[p - 1, PROMPT[p]].item()
        assert entry.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        top_values, top_ids = torch.topk(reference[p - 1], 3)
        assert [t for t, _ in entry.top_logprobs] == top_ids.tolist()
        assert [lp for _, lp in entry.top_logprobs] == pytest.approx(top_values.tolist(), rel=1e-4, abs=1e-4)
    assert out[1].prompt_logprobs is None
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_prompt_logprobs_bypass_the_prefix_cache() -> None:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    s = Scheduler(config, KVCacheManager(BlockPool(16, 4), enable_prefix_caching=True))
    prompt = list(range(1, 11))
    s.add_request(Request("warm", prompt, SamplingParams(max_tokens=1)))
    out = s.schedule()
    s.update_from_output(out, [3])
    s.add_request(Request("plain", prompt, SamplingParams(max_tokens=1)))
    s.add_request(Request("logprobs", prompt, SamplingParams(max_tokens=1, prompt_logprobs=0)))
    out = s.schedule()
    assert [(q.req_id, q.start_pos) for q in out.seqs] == [("plain", 8), ("logprobs", 0)]


def test_bounds_name_the_field() -> None:
    with pytest.raises(InvalidRequest, match=r"sampling\.prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(InvalidRequest, match=r"sampling\.n"):
        SamplingParams(n=17)
