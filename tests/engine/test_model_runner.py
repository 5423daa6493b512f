"""ModelRunner against Hugging Face transformers on tiny random checkpoints (float32, CPU)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine.batch import SequenceInput, sampled_token_id
from engine.config import ModelConfig
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_tiny_llama

GREEDY = SamplingParams(max_tokens=64)
NUM_BLOCKS = 64
PROMPTS = [
    [0, 423, 80, 338, 302, 15, 222, 343, 413, 278, 493],  # 11 tokens
    [0, 17, 250, 301, 99, 7],  # 6 tokens
    [0, *range(100, 118)],  # 19 tokens
]

CHECKPOINTS: dict[str, dict[str, Any]] = {
    "separate": {},
    "tied": {"tie_word_embeddings": True},
    "head_dim": {"head_dim": 24},
    "llama3_rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "sharded": {"max_shard_size": "40KB", "seed": 3},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_llama(tmp_path_factory.mktemp(kind), **CHECKPOINTS[kind])
        return made[kind]

    return get


def make_runner(path: Path, block_size: int) -> ModelRunner:
    return ModelRunner(
        ModelConfig.from_pretrained(path),
        device="cpu",
        dtype="float32",
        block_size=block_size,
        num_kv_blocks=NUM_BLOCKS,
        kv_cache_memory_bytes=0,
        max_model_len=256,
    )


def record_logits(runner: ModelRunner) -> list[torch.Tensor]:
    """Make ``runner`` append the logits of every step to the returned list."""
    recorded: list[torch.Tensor] = []
    compute_logits = runner.model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute_logits(hidden)
        recorded.append(logits.clone())
        return logits

    runner.model.compute_logits = recording  # type: ignore[method-assign]
    return recorded


def shuffled_block_tables(num_seqs: int, blocks_each: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, non-contiguous block tables drawn from a shuffled pool."""
    pool = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(pool)
    return [pool[i * blocks_each : (i + 1) * blocks_each] for i in range(num_seqs)]


def hf_model(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_last_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    rel = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-4, f"relative error {rel}"


def truncate_at_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize(
    ("kind", "block_size"),
    [("separate", 4), ("tied", 16), ("head_dim", 4), ("llama3_rope", 16), ("sharded", 4)],
)
def test_batched_prefill_then_decode_matches_hf_generate(
    checkpoint: Callable[[str], Path], kind: str, block_size: int
) -> None:
    path = checkpoint(kind)
    runner = make_runner(path, block_size)
    logits = record_logits(runner)
    num_new = 10
    tables = shuffled_block_tables(len(PROMPTS), blocks_each=-(-40 // block_size))
    outputs: list[list[int]] = [[] for _ in PROMPTS]

    first = runner.execute(
        [SequenceInput(f"r{i}", p, 0, tables[i], True, GREEDY, 0) for i, p in enumerate(PROMPTS)]
    )
    for out, token in zip(outputs, first, strict=True):
        assert token is not None
        out.append(sampled_token_id(token))
    for step in range(1, num_new):
        seqs = [
            SequenceInput(f"r{i}", [outputs[i][-1]], len(p) + step - 1, tables[i], True, GREEDY, step)
            for i, p in enumerate(PROMPTS)
        ]
        for out, token in zip(outputs, runner.execute(seqs), strict=True):
            assert token is not None
            out.append(sampled_token_id(token))

    model = hf_model(path)
    eos_ids = runner.model_config.eos_token_ids
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(model, prompt, num_new)
        assert truncate_at_eos(outputs[i], eos_ids) == expected
        assert len(set(expected)) > 3  # the tiny model does not degenerate into repeats
        for step in (0, num_new - 1):
            assert_close(logits[step][i], hf_last_logits(model, prompt + outputs[i][:step]))


def test_mixed_batch_with_chunked_prefill_matches_hf(checkpoint: Callable[[str], Path]) -> None:
    """Decodes share steps with a prompt computed in two chunks (prefix 7, then the rest)."""
    path = checkpoint("separate")
    runner = make_runner(path, block_size=4)
    tables = shuffled_block_tables(3, blocks_each=10, seed=1)
    a, b, c = PROMPTS
    out_a = runner.execute(
        [
            SequenceInput("a", a, 0, tables[0], True, GREEDY, 0),
            SequenceInput("b", b, 0, tables[1], True, GREEDY, 0),
        ]
    )
    assert None not in out_a
    gen: dict[str, list[int]] = {"a": [out_a[0]], "b": [out_a[1]], "c": []}  # type: ignore[list-item]

    def decode(req: str, prompt: list[int], table: list[int]) -> SequenceInput:
        n = len(gen[req])
        return SequenceInput(req, [gen[req][-1]], len(prompt) + n - 1, table, True, GREEDY, n)

    step2 = runner.execute(
        [
            decode("a", a, tables[0]),
            SequenceInput("c", c[:7], 0, tables[2], False, GREEDY),
            decode("b", b, tables[1]),
        ]
    )
    assert step2[1] is None
    gen["a"].append(step2[0])  # type: ignore[arg-type]
    gen["b"].append(step2[2])  # type: ignore[arg-type]
    step3 = runner.execute(
        [
            SequenceInput("c", c[7:], 7, tables[2], True, GREEDY, 0),
            decode("a", a, tables[0]),
            decode("b", b, tables[1]),
        ]
    )
    for req, token in zip("cab", step3, strict=True):
        gen[req].append(token)  # type: ignore[arg-type]
    for _ in range(3):
        step = runner.execute([decode(r, p, t) for r, p, t in zip("abc", PROMPTS, tables, strict=True)])
        for req, token in zip("abc", step, strict=True):
            gen[req].append(token)  # type: ignore[arg-type]

    model = hf_model(path)
    for req, prompt in zip("abc", PROMPTS, strict=True):
        assert gen[req] == hf_greedy(model, prompt, len(gen[req]))


@pytest.mark.parametrize(("block_size", "prefix_len"), [(4, 5), (4, 8), (16, 3)])
def test_prefill_after_cached_prefix_equals_one_shot(
    checkpoint: Callable[[str], Path], block_size: int, prefix_len: int
) -> None:
    path = checkpoint("head_dim")
    prompt = PROMPTS[2]
    table = shuffled_block_tables(1, blocks_each=-(-len(prompt) // block_size), seed=2)[0][::-1]

    one_shot = make_runner(path, block_size)
    one_shot_logits = record_logits(one_shot)
    one_shot.execute([SequenceInput("x", prompt, 0, table, True, GREEDY)])

    chunked = make_runner(path, block_size)
    chunked_logits = record_logits(chunked)
    assert chunked.execute([SequenceInput("x", prompt[:prefix_len], 0, table, False, GREEDY)]) == [None]
    assert chunked_logits == []
    chunked.execute([SequenceInput("x", prompt[prefix_len:], prefix_len, table, True, GREEDY)])

    torch.testing.assert_close(chunked_logits[0], one_shot_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.kv_cache, one_shot.kv_cache, rtol=1e-5, atol=1e-5)


def test_kv_cache_geometry_and_budget(checkpoint: Callable[[str], Path]) -> None:
    config = ModelConfig.from_pretrained(checkpoint("head_dim"))
    runner = ModelRunner(
        config,
        device="cpu",
        dtype="float32",
        block_size=16,
        num_kv_blocks=None,
        kv_cache_memory_bytes=10 * 2 * 2 * 16 * 2 * 24 * 4 + 5,
        max_model_len=128,
    )
    # bytes per block: 2 layers * (K, V) * 16 tokens * 2 kv heads * 24 head_dim * 4 bytes
    assert runner.kv_cache_bytes_per_block == 2 * 2 * 16 * 2 * 24 * 4
    assert runner.num_kv_blocks == 10
    assert runner.kv_cache.shape == (2, 2, 10, 16, 2, 24)
    assert runner.kv_cache.dtype == torch.float32
    assert (runner.num_layers, runner.num_kv_heads, runner.head_dim, runner.cache_layout) == (
        2,
        2,
        24,
        "LKBTHD",
    )
    with pytest.raises(ValueError, match="below one block"):
        ModelRunner(
            config,
            device="cpu",
            dtype="float32",
            block_size=16,
            num_kv_blocks=None,
            kv_cache_memory_bytes=100,
            max_model_len=128,
        )


def test_execute_rejects_bad_inputs(checkpoint: Callable[[str], Path]) -> None:
    runner = make_runner(checkpoint("separate"), block_size=4)
    with pytest.raises(ValueError, match="outside the cache"):
        runner.execute([SequenceInput("x", [0, 1, 2], 0, [NUM_BLOCKS], True, GREEDY)])
    with pytest.raises(ValueError, match="needs 2 blocks"):
        runner.execute([SequenceInput("x", [0, 1, 2, 3, 4], 0, [3], True, GREEDY)])
    with pytest.raises(ValueError, match="max_model_len"):
        runner.execute([SequenceInput("x", [5], 256, list(range(NUM_BLOCKS)), True, GREEDY)])
    assert runner.execute([]) == []
