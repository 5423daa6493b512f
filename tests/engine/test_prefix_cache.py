"""Prefix caching in the KV cache manager and scheduler: exact block ids, hits, evictions, outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.batch import SequenceInput, TokenLogprobs
from engine.block_pool import BlockPool
from engine.engine_core import EngineCore
from engine.hashing import hash_prompt_blocks
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import REMOVED, STORED, KvEventRecorder
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig


def manager(
    num_blocks: int = 8, block_size: int = 4, recorder: KvEventRecorder | None = None
) -> KVCacheManager:
    pool = BlockPool(num_blocks, block_size, event_sink=recorder)
    return KVCacheManager(pool, enable_prefix_caching=True, model_id="m")


def computed(req_id: str, tokens: list[int], salt: str = "") -> Request:
    req = Request(req_id, tokens, cache_salt=salt)
    req.num_computed_tokens = len(tokens)
    return req


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_full_blocks_are_registered_and_reused_with_exact_ids() -> None:
    kv = manager()
    a = computed("a", list(range(10)))
    assert kv.find_cached_prefix(a.prompt_token_ids) == []
    assert kv.allocate("a", 10) == [0, 1, 2]
    kv.cache_full_blocks(a)
    hashes = hash_prompt_blocks(list(range(10)), 4, model_id="m")
    assert [kv.block_pool.get_cached_block(h).block_id for h in hashes] == [0, 1]  # type: ignore[union-attr]
    assert kv.block_pool.num_cached_blocks == 2  # block 2 is partial
    kv.free("a")
    assert kv.block_pool.free_queue.block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]

    hits = kv.find_cached_prefix([*range(8), 99, 98])
    assert ids(hits) == [0, 1]
    assert kv.can_allocate(10, None, hits)
    assert kv.allocate("b", 10, hits) == [3]
    assert kv.get_block_table("b") == [0, 1, 3]
    assert [b.ref_cnt for b in kv.block_pool.blocks[:2]] == [1, 1]
    assert kv.block_pool.free_queue.block_ids() == [4, 5, 6, 7, 2]
    # A second sharer takes another reference; freeing both returns the blocks once.
    hits_c = kv.find_cached_prefix([*range(8), 7])
    kv.allocate("c", 9, hits_c)
    assert [b.ref_cnt for b in kv.block_pool.blocks[:2]] == [2, 2]
    kv.free("b")
    kv.free("c")
    assert kv.block_pool.num_free_blocks == 8


def test_last_token_is_never_cached_and_salt_and_model_isolate() -> None:
    kv = manager()
    kv.allocate("a", 8)
    kv.cache_full_blocks(computed("a", list(range(8))))
    assert ids(kv.find_cached_prefix(list(range(8)))) == [0]  # 8 tokens: one left to compute
    assert ids(kv.find_cached_prefix(list(range(9)))) == [0, 1]
    assert kv.find_cached_prefix(list(range(9)), cache_salt="tenant-b") == []
    other_model = KVCacheManager(kv.block_pool, enable_prefix_caching=True, model_id="other")
    assert other_model.find_cached_prefix(list(range(9))) == []
    off = KVCacheManager(BlockPool(4, 4))
    off.allocate("a", 8)
    off.cache_full_blocks(computed("a", list(range(8))))
    assert off.block_pool.num_cached_blocks == 0


def test_lru_eviction_order_and_kv_events() -> None:
    recorder = KvEventRecorder()
    kv = manager(num_blocks=4, recorder=recorder)
    kv.allocate("a", 8)
    kv.cache_full_blocks(computed("a", list(range(8))))
    kv.allocate("b", 8)
    kv.cache_full_blocks(computed("b", list(range(100, 108))))
    kv.free("a")  # frees 1 then 0
    kv.free("b")  # frees 3 then 2
    assert kv.block_pool.free_queue.block_ids() == [1, 0, 3, 2]
    ha = hash_prompt_blocks(list(range(8)), 4, model_id="m")
    hb = hash_prompt_blocks(list(range(100, 108)), 4, model_id="m")
    # A new request takes the two least recently freed blocks: a's, tail first.
    assert kv.allocate("c", 8) == [1, 0]
    assert kv.block_pool.num_evictions == 2
    assert ids(kv.find_cached_prefix(list(range(9)))) == []
    assert ids(kv.find_cached_prefix(list(range(100, 109)))) == [2, 3]
    events = recorder.drain(100)
    assert [(e.seq, e.op, e.block_hash) for e in events] == [
        (1, STORED, ha[0]),
        (2, STORED, ha[1]),
        (3, STORED, hb[0]),
        (4, STORED, hb[1]),
        (5, REMOVED, ha[1]),
        (6, REMOVED, ha[0]),
    ]


def test_duplicate_blocks_stay_uncached() -> None:
    kv = manager()
    kv.allocate("a", 5)
    kv.allocate("b", 5)  # same prompt admitted before a's blocks were registered
    kv.cache_full_blocks(computed("a", list(range(5))))
    kv.cache_full_blocks(computed("b", list(range(5))))
    assert kv.block_pool.num_cached_blocks == 1
    assert ids(kv.find_cached_prefix(list(range(5)))) == [0]


class EchoRunner:
    """Samples token 7 for every sampling input; records the inputs."""

    def __init__(self) -> None:
        self.seen: list[SequenceInput] = []

    def execute(self, seqs: list[SequenceInput]) -> list[int | TokenLogprobs | None]:
        self.seen.extend(seqs)
        return [7 if s.sample else None for s in seqs]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        raise AssertionError("no request here forks, so no block is copied")


def test_scheduler_starts_after_the_cached_prefix() -> None:
    runner = EchoRunner()
    kv = KVCacheManager(BlockPool(16, 4), enable_prefix_caching=True)
    core = EngineCore(Scheduler(SchedulerConfig(max_model_len=64), kv), runner)
    sampling = SamplingParams(max_tokens=1)
    core.add_request(Request("a", list(range(10)), sampling))
    (out_a,) = core.step()
    assert out_a.num_cached_tokens == 0
    core.add_request(Request("b", [*range(8), 50, 51, 52], sampling))
    (out_b,) = core.step()
    assert out_b.num_cached_tokens == 8
    last = runner.seen[-1]
    assert (last.req_id, last.start_pos, last.token_ids, last.block_table) == (
        "b",
        8,
        [50, 51, 52],
        [0, 1, 3],
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.checkpoints import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=128)


def test_greedy_outputs_match_transformers_with_and_without_caching(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner

    system = [0, *range(5, 25)]
    prompts = [[*system, 40 + i, 41, 42 + i] for i in range(3)] + [[*system, 40, 41, 42]]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist()
            for p in prompts
        ]
    config = ModelConfig.from_pretrained(tiny_model)
    runner = ModelRunner(
        config, device="cpu", dtype="float32", block_size=4, num_kv_blocks=32,
        kv_cache_memory_bytes=0, max_model_len=128,
    )  # fmt: skip
    for caching in (False, True):
        kv = KVCacheManager(BlockPool(32, 4), enable_prefix_caching=caching, model_id=config.model_id)
        core = EngineCore(Scheduler(SchedulerConfig(max_model_len=128), kv), runner)
        tokens, cached = [], []
        for i, prompt in enumerate(prompts):  # one at a time, so later prompts hit the cache
            core.add_request(
                Request(f"r{i}", prompt, SamplingParams(max_tokens=8), eos_token_ids=config.eos_token_ids)
            )
            outs = []
            while core.has_unfinished_requests():
                outs += core.step()
            tokens.append([t for o in outs for t in o.new_token_ids])
            cached.append(outs[0].num_cached_tokens)
        assert tokens == expected
        assert cached == ([0, 0, 0, 0] if not caching else [0, 20, 20, 20])
