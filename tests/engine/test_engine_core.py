from pathlib import Path

import pytest

from engine.batch import SequenceInput, TokenLogprobs
from engine.block_pool import BlockPool
from engine.engine_core import EngineCore, EngineOutput
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

VOCAB = 97
EOS = 0


def next_token(context: list[int]) -> int:
    """The fake model: a position-sensitive function of the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) + len(context) ** 2) % VOCAB


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(next_token(prompt + out))
        if out[-1] == EOS:
            break
    return out


class PagedFakeRunner:
    """Stores each token in its KV slot and reads the context back through the block table.

    A wrong block table, a block shared by two live requests, or a missed
    recompute after preemption changes the context it reads, hence its output.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, int] = {}
        self.steps: list[list[SequenceInput]] = []

    def slot(self, seq: SequenceInput, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, seqs: list[SequenceInput]) -> list[int | None]:
        self.steps.append(seqs)
        for seq in seqs:
            for offset, token in enumerate(seq.token_ids):
                self.slots[self.slot(seq, seq.start_pos + offset)] = token
        return [
            next_token([self.slots[self.slot(s, p)] for p in range(s.end_pos)]) if s.sample else None
            for s in seqs
        ]


PROMPTS = [[5, 17, 3, 9, 44, 2, 8], [61, 62], [7] * 13, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [88]]


def make_core(runner, num_blocks, block_size, max_num_batched_tokens, max_num_seqs=8):
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=256
    )
    return EngineCore(Scheduler(config, KVCacheManager(BlockPool(num_blocks, block_size))), runner)


def run_to_completion(core, requests) -> dict[str, list[int]]:
    for r in requests:
        core.add_request(r)
    results: dict[str, list[int]] = {r.req_id: [] for r in requests}
    finished = set()
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            assert out.req_id not in finished
            results[out.req_id] += out.new_token_ids
            if out.finished:
                finished.add(out.req_id)
    assert finished == set(results)
    return results


def fake_requests(max_tokens=12, ignore_eos=False):
    return [
        Request(
            f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos), eos_token_ids=(EOS,)
        )
        for i, p in enumerate(PROMPTS)
    ]


def test_reference_is_not_trivial():
    # 5 + 34 + 9 + 36 + 220 + 12 + 56 + 7**2 = 421 = 33 (mod 97)
    assert reference(PROMPTS[0], 12) == [33, 21, 33, 91, 46, 39, 86, 56, 52, 42, 13, 88]
    assert reference(PROMPTS[4], 12) == [89, 76, 18, EOS]  # one request stops early


def test_matches_reference_with_ample_resources():
    runner = PagedFakeRunner(block_size=4)
    core = make_core(runner, num_blocks=64, block_size=4, max_num_batched_tokens=256)
    results = run_to_completion(core, fake_requests())
    assert results == {f"r{i}": reference(p, 12) for i, p in enumerate(PROMPTS)}
    assert len(runner.steps) == 12  # one prefill step, then 11 decode steps for everyone
    assert core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_matches_reference_with_preemption_and_chunked_prefill():
    runner = PagedFakeRunner(block_size=2)
    core = make_core(runner, num_blocks=12, block_size=2, max_num_batched_tokens=5)
    results = run_to_completion(core, fake_requests(max_tokens=10))
    assert results == {f"r{i}": reference(p, 10) for i, p in enumerate(PROMPTS)}
    seqs = [s for step in runner.steps for s in step]
    assert any(not s.sample for s in seqs), "no chunked prefill happened"
    assert any(s.start_pos == 0 and s.output_index > 0 for s in seqs), "no recompute after preemption"
    assert all(sum(len(s.token_ids) for s in step) <= 5 for step in runner.steps)
    assert core.scheduler.kv_cache_manager.num_used_blocks == 0


def test_abort_mid_flight_and_idle_step():
    runner = PagedFakeRunner(block_size=4)
    core = make_core(runner, num_blocks=16, block_size=4, max_num_batched_tokens=64)
    for r in fake_requests(ignore_eos=True)[:2]:
        core.add_request(r)
    assert core.step() == [EngineOutput("r0", [33]), EngineOutput("r1", [92])]
    assert core.abort_request("r0")
    assert core.step() == [EngineOutput("r1", [82])]
    assert core.abort_request("r1") and not core.abort_request("r1")
    assert not core.has_unfinished_requests()
    assert core.step() == []
    assert core.scheduler.kv_cache_manager.num_used_blocks == 0


# ---- end to end with the real model runner ----------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tests.helpers.checkpoints import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=128)


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for prompt in prompts:  # one at a time: no padding, generation stops at EOS
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize(
    ("num_kv_blocks", "max_num_batched_tokens"),
    [(64, 512), (10, 7)],  # ample resources; a tiny pool (preemption) and budget (chunked prefill)
)
def test_model_runner_matches_transformers_generate(tiny_model, num_kv_blocks, max_num_batched_tokens):
    from engine.config import ModelConfig
    from engine.model_runner import ModelRunner

    prompts = [[0, *range(5, 5 + n)] for n in (11, 3, 8, 16)]
    max_tokens = 12
    expected = hf_greedy(tiny_model, prompts, max_tokens)

    model_config = ModelConfig.from_pretrained(tiny_model)
    runner = ModelRunner(
        model_config,
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=num_kv_blocks,
        kv_cache_memory_bytes=0,
        max_model_len=128,
    )
    seen: list[SequenceInput] = []

    class Recording:
        def execute(self, seqs: list[SequenceInput]) -> list[int | TokenLogprobs | None]:
            seen.extend(seqs)
            return runner.execute(seqs)

    core = make_core(Recording(), num_kv_blocks, 4, max_num_batched_tokens)
    requests = [
        Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens), eos_token_ids=model_config.eos_token_ids)
        for i, p in enumerate(prompts)
    ]
    results = run_to_completion(core, requests)
    assert [results[f"r{i}"] for i in range(len(prompts))] == expected
    if num_kv_blocks == 10:
        assert any(not s.sample for s in seen), "no chunked prefill happened"
        assert any(s.start_pos == 0 and s.output_index > 0 for s in seen), "no preemption happened"
