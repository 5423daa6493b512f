"""Priority scheduling: ``(priority, arrival)`` admission order and the preemption victim."""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.kv_cache_manager import KVCacheManager
from engine.llm import LLM
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.worker_config import BUNDLED_MODEL_DIR


def make_scheduler(num_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=64
    )
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, 4)))


def req(req_id: str, priority: int, prompt_len: int = 4, max_tokens: int = 8) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(req_id, list(range(1, prompt_len + 1)), sp, priority=priority)


def test_later_high_priority_request_is_admitted_first() -> None:
    s = make_scheduler(num_blocks=16, max_num_seqs=1)
    for r in [req("low-a", 5), req("low-b", 5), req("mid", 2), req("high", -1), req("low-c", 5)]:
        s.add_request(r)
    order: list[str] = []
    while s.has_unfinished_requests():
        out = s.schedule()
        order.extend(q.req_id for q in out.seqs if q.start_pos == 0)
        s.update_from_output(out, [7] * len(out.seqs))
    assert order == ["high", "mid", "low-a", "low-b", "low-c"]


def test_token_budget_goes_to_priority_order() -> None:
    s = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    for r in [req("a", 1), req("b", 1), req("c", 0)]:
        s.add_request(r)
    out = s.schedule()
    assert [(q.req_id, len(q.token_ids)) for q in out.seqs] == [("c", 4), ("a", 4)]
    assert [r.req_id for r in s.waiting] == ["b"]


def test_preemption_victim_is_lowest_priority_then_newest() -> None:
    # 5 blocks of 4: four 4-token prompts take 4 blocks; their 5th tokens need 4 more.
    s = make_scheduler(num_blocks=5)
    for r in [req("p0-old", 0), req("p3-old", 3), req("p3-new", 3), req("p1", 1)]:
        s.add_request(r)
    out = s.schedule()
    assert [q.req_id for q in out.seqs] == ["p0-old", "p1", "p3-old", "p3-new"]
    s.update_from_output(out, [7] * 4)
    out = s.schedule()
    assert out.preempted_req_ids == ["p3-new", "p3-old"]
    assert [(q.req_id, q.block_table) for q in out.seqs] == [("p0-old", [0, 4]), ("p1", [1, 3])]
    assert [r.req_id for r in s.waiting] == ["p3-old", "p3-new"]  # back in (priority, arrival) order
    assert s.kv_cache_manager.num_used_blocks == 4


def test_llm_accepts_priorities_and_returns_outputs_in_prompt_order() -> None:
    llm = LLM(BUNDLED_MODEL_DIR, dtype="float32", device="cpu", max_num_seqs=1)
    prompts = [[0, 523, 99], [0, 17, 250], [0, 5, 6]]
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    plain = llm.generate(prompts, sp, use_tqdm=False)
    ranked = llm.generate(prompts, sp, use_tqdm=False, priority=[2, 1, 0])
    assert [o.prompt_token_ids for o in ranked] == prompts
    assert [o.outputs[0].token_ids for o in ranked] == [o.outputs[0].token_ids for o in plain]
