"""``n`` > 1 completions: one prefill, shared prompt blocks, copy-on-write, exact block ids, no leaks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine.batch import TokenLogprobs
from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.llm import LLM
from engine.request import EngineOutput, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from tests.helpers.checkpoints import make_tiny_checkpoint

ARCHS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"head_dim": 24},
    "MistralForCausalLM": {"seed": 1},
    "Qwen2ForCausalLM": {"seed": 2, "tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"seed": 3, "head_dim": 32},
}
PROMPT = [0, 423, 80, 338, 302, 15, 222, 343, 413, 278, 493]  # 11 tokens: block 2 of 4 is partial


def make_scheduler(num_blocks: int = 8) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, 4)))


def fork_step(s: Scheduler, samples: list[int]) -> list[EngineOutput]:
    """Schedule the parent's prompt and sample ``samples`` (one per completion)."""
    out = s.schedule()
    (seq,) = out.seqs
    seq.samples = list(samples)
    return s.update_from_output(out, [samples[0]])


def refs(s: Scheduler) -> dict[int, int]:
    return {b.block_id: b.ref_cnt for b in s.kv_cache_manager.block_pool.blocks if b.ref_cnt}


def test_fork_shares_prompt_blocks_and_copies_the_partial_one_on_first_write() -> None:
    s = make_scheduler()
    sp = SamplingParams(max_tokens=3, n=3, ignore_eos=True)
    s.add_request(Request("p", [11, 12, 13, 14, 15, 16], sp))  # blocks 0 (full) and 1 (2 of 4 slots)
    outs = fork_step(s, [7, 8, 9])
    assert [(o.req_id, o.index, o.new_token_ids, o.finished) for o in outs] == [
        ("p", 0, [7], False),
        ("p", 1, [8], False),
        ("p", 2, [9], False),
    ]
    assert [s.get_block_table(f"p/{i}") for i in range(3)] == [[0, 1]] * 3
    assert refs(s) == {0: 3, 1: 3}
    assert not s.kv_cache_manager.has_blocks("p")
    out = s.schedule()  # each completion writes position 6, inside shared block 1
    assert [(q.req_id, q.token_ids, q.start_pos, q.block_table) for q in out.seqs] == [
        ("p/0", [7], 6, [0, 2]),
        ("p/1", [8], 6, [0, 3]),
        ("p/2", [9], 6, [0, 1]),  # the last holder writes in place
    ]
    assert out.blocks_to_copy == [(1, 2), (1, 3)]
    assert refs(s) == {0: 3, 1: 1, 2: 1, 3: 1}
    s.update_from_output(out, [1, 2, 3])
    s.abort_request("p", index=1)  # one completion alone
    assert refs(s) == {0: 2, 1: 1, 2: 1}
    out = s.schedule()
    assert out.blocks_to_copy == []
    final = s.update_from_output(out, [4, 5])
    assert [(o.index, o.finished, o.finish_reason) for o in final] == [
        (0, True, "length"),
        (2, True, "length"),
    ]
    assert s.kv_cache_manager.num_used_blocks == 0
    assert sorted(s.kv_cache_manager.block_pool.free_queue.block_ids()) == list(range(8))
    assert not s.forks and not s.requests and not s.has_unfinished_requests()


def test_block_aligned_prompt_needs_no_copy_and_abort_frees_every_block_once() -> None:
    s = make_scheduler()
    s.add_request(Request("p", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=5, n=2, ignore_eos=True)))
    fork_step(s, [9, 10])
    out = s.schedule()
    assert [(q.req_id, q.block_table) for q in out.seqs] == [("p/0", [0, 1, 2]), ("p/1", [0, 1, 3])]
    assert out.blocks_to_copy == []
    assert refs(s) == {0: 2, 1: 2, 2: 1, 3: 1}
    s.update_from_output(out, [1, 1])
    assert s.abort_request("p")
    assert s.kv_cache_manager.num_used_blocks == 0 and not s.forks
    assert not s.abort_request("p")  # nothing left to free twice


def test_completions_that_finish_at_fork_free_their_references() -> None:
    s = make_scheduler()
    sp = SamplingParams(max_tokens=4, n=3, stop_token_ids=[99])
    s.add_request(Request("p", [1, 2, 3, 4, 5], sp))
    outs = fork_step(s, [99, 6, 99])
    assert [(o.index, o.finished, o.finish_reason) for o in outs] == [
        (0, True, "stop"),
        (1, False, None),
        (2, True, "stop"),
    ]
    assert refs(s) == {0: 1, 1: 1}
    assert [r.req_id for r in s.running] == ["p/1"]
    s.abort_request("p")
    assert s.kv_cache_manager.num_used_blocks == 0


def test_decode_worker_forks_a_filled_reservation() -> None:
    s = make_scheduler()
    assert s.reserve("r", 6) == [0, 1]
    sp = SamplingParams(max_tokens=4, n=2, ignore_eos=True)
    outs = s.add_prefilled_completions(Request("r", [1, 2, 3, 4, 5, 6], sp), [7, 8])
    assert [(o.req_id, o.index, o.new_token_ids, o.finished) for o in outs] == [
        ("r", 0, [], False),
        ("r", 1, [], False),
    ]
    out = s.schedule()
    assert [(q.req_id, q.token_ids, q.block_table) for q in out.seqs] == [
        ("r/0", [7], [0, 2]),
        ("r/1", [8], [0, 1]),
    ]
    assert out.blocks_to_copy == [(1, 2)]
    s.abort_request("r")
    assert s.kv_cache_manager.num_used_blocks == 0


def test_prefill_worker_request_samples_n_first_tokens_and_holds_its_blocks() -> None:
    s = make_scheduler()
    sp = SamplingParams(max_tokens=1, n=3)
    s.add_request(Request("p", [1, 2, 3, 4, 5], sp, hold_blocks_on_finish=True))
    outs = fork_step(s, [4, 5, 6])
    assert [(o.index, o.new_token_ids, o.finished) for o in outs] == [
        (0, [4], True),
        (1, [5], True),
        (2, [6], True),
    ]
    assert s.get_block_table("p") == [0, 1] and refs(s) == {0: 1, 1: 1}
    assert s.release_held("p") and s.kv_cache_manager.num_used_blocks == 0


def test_child_seeds_depend_only_on_seed_and_index() -> None:
    sp = SamplingParams(temperature=1.0, seed=5, n=3, prompt_logprobs=2)
    children = [sp.for_child(i) for i in range(3)]
    assert children[0].seed == 5 and len({c.seed for c in children}) == 3
    assert all(c.n == 1 and c.prompt_logprobs is None for c in children)
    assert SamplingParams(n=2).for_child(1).seed is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, **ARCHS[arch])
        return made[arch]

    return get


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_completions_equal_transformers_with_preemption(
    arch: str, checkpoint: Callable[[str], Path]
) -> None:
    # 12 blocks of 4: three completions of 11 + 12 tokens cannot all fit, so some are preempted.
    llm = LLM(
        checkpoint(arch), dtype="float32", device="cpu", block_size=4, num_kv_blocks=12, max_model_len=64
    )
    outs = llm.generate(
        [PROMPT, [0, 5, 6]], SamplingParams(max_tokens=12, n=3, ignore_eos=True), use_tqdm=False
    )
    for prompt, out in zip([PROMPT, [0, 5, 6]], outs, strict=True):
        expected = hf_greedy(checkpoint(arch), prompt, 12)
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert [c.token_ids for c in out.outputs] == [expected] * 3
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_seeded_completions_are_reproducible_independent_and_batch_free(
    checkpoint: Callable[[str], Path],
) -> None:
    llm = LLM(checkpoint("LlamaForCausalLM"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    sp = SamplingParams(max_tokens=10, n=3, temperature=1.0, seed=1234, ignore_eos=True, logprobs=1)
    alone = llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs
    other = SamplingParams(max_tokens=7, temperature=1.0, ignore_eos=True)
    batched = llm.generate([[0, 9, 9], PROMPT, [0, 7]], [other, sp, other], use_tqdm=False)[1].outputs
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) == 3  # the completions differ
    single = llm.generate([PROMPT], dataclasses.replace(sp, n=1), use_tqdm=False)[0].outputs[0]
    assert single.token_ids == alone[0].token_ids  # completion 0 is the n=1 stream
    for c in alone:
        assert c.logprobs is not None and [lp.token_id for lp in c.logprobs] == c.token_ids
        assert all(isinstance(lp, TokenLogprobs) and lp.logprob <= 0 for lp in c.logprobs)
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_stop_string_ends_one_completion_only(checkpoint: Callable[[str], Path]) -> None:
    llm = LLM(checkpoint("LlamaForCausalLM"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    sp = SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=3, ignore_eos=True)
    full = llm.generate([PROMPT], sp, use_tqdm=False)[0].outputs
    stop = full[1].text[2:4]
    assert stop and stop not in full[0].text[:4]
    cut = llm.generate([PROMPT], dataclasses.replace(sp, stop=[stop]), use_tqdm=False)[0].outputs
    assert cut[1].text == full[1].text[: full[1].text.index(stop)] and cut[1].finish_reason == "stop"
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_runner_copy_blocks_copies_every_layer(checkpoint: Callable[[str], Path]) -> None:
    llm = LLM(checkpoint("LlamaForCausalLM"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=8)
    cache = llm.runner.kv_cache
    cache.copy_(torch.randn_like(cache))
    before = cache.clone()
    llm.runner.copy_blocks([(1, 5), (1, 6), (3, 2)])
    for src, dst in [(1, 5), (1, 6), (3, 2)]:
        assert torch.equal(cache[:, :, dst], before[:, :, src])
    for untouched in (0, 1, 3, 4, 7):
        assert torch.equal(cache[:, :, untouched], before[:, :, untouched])
