"""Llama, Mistral, Qwen2 and Qwen3 against transformers on tiny random checkpoints (float32, CPU).

Each architecture goes through the ModelRunner (batched prefill then decode,
logits compared) and through ``engine.LLM`` (continuous batching, a KV pool
small enough to force preemption, and a token budget small enough to chunk
every prompt); greedy token ids must equal ``transformers`` ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine.batch import SequenceInput
from engine.config import ModelConfig
from engine.llm import LLM
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from tests.helpers.checkpoints import make_tiny_checkpoint

ARCHS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"head_dim": 24},
    "MistralForCausalLM": {"seed": 1},  # transformers' default sliding_window 4096 > max_position 256
    "Qwen2ForCausalLM": {"seed": 2, "tie_word_embeddings": True},
    "Qwen3ForCausalLM": {"seed": 3, "head_dim": 32},  # head_dim != hidden_size / heads (16)
}
PROMPTS: list[list[int]] = [
    [0, 423, 80, 338, 302, 15, 222, 343, 413, 278, 493],  # 11 tokens
    [0, 17, 250, 301, 99, 7],  # 6 tokens
    [0, *range(100, 118)],  # 19 tokens
    [0, 5, 6],  # 3 tokens
]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(arch), arch, randomize_norms_and_biases=True, **ARCHS[arch]
            )
        return made[arch]

    return get


@pytest.fixture(scope="module")
def hf_reference(checkpoint: Callable[[str], Path]) -> Callable[[str], tuple[Any, list[list[int]]]]:
    """``(transformers model, greedy completions of PROMPTS)`` per architecture, computed once."""
    made: dict[str, tuple[Any, list[list[int]]]] = {}

    def get(arch: str) -> tuple[Any, list[list[int]]]:
        if arch not in made:
            model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint(arch), dtype=torch.float32)
            model.eval()
            made[arch] = (model, [hf_greedy(model, p, MAX_TOKENS) for p in PROMPTS])
        return made[arch]

    return get


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_last_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def make_llm(path: Path, **kwargs: Any) -> LLM:
    options: dict[str, Any] = {"dtype": "float32", "device": "cpu", "block_size": 4, "num_kv_blocks": 64}
    return LLM(path, **(options | kwargs))


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


def record_schedules(llm: LLM) -> list[SchedulerOutput]:
    """Make ``llm``'s scheduler append every step's output to the returned list."""
    recorded: list[SchedulerOutput] = []
    scheduler = llm.engine_core.scheduler
    schedule = scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        recorded.append(out)
        return out

    scheduler.schedule = recording  # type: ignore[method-assign]
    return recorded


@pytest.mark.parametrize("arch", ARCHS)
def test_model_runner_tokens_and_logits_match_hf(
    checkpoint: Callable[[str], Path], hf_reference: Callable[[str], tuple[Any, list[list[int]]]], arch: str
) -> None:
    model, expected = hf_reference(arch)
    runner = ModelRunner(
        ModelConfig.from_pretrained(checkpoint(arch)),
        device="cpu",
        dtype="float32",
        block_size=4,
        num_kv_blocks=64,
        kv_cache_memory_bytes=0,
        max_model_len=256,
    )
    assert type(runner.model).__name__ == arch
    logits = record_logits(runner)
    tables = [list(range(i * 16, (i + 1) * 16))[::-1] for i in range(len(PROMPTS))]
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    for step in range(MAX_TOKENS):
        seqs = [
            SequenceInput(f"r{i}", p, 0, tables[i], True, GREEDY, 0)
            if step == 0
            else SequenceInput(f"r{i}", [outputs[i][-1]], len(p) + step - 1, tables[i], True, GREEDY, step)
            for i, p in enumerate(PROMPTS)
        ]
        for out, token in zip(outputs, runner.execute(seqs), strict=True):
            assert isinstance(token, int)
            out.append(token)

    eos = set(runner.model_config.eos_token_ids)
    for i, prompt in enumerate(PROMPTS):
        generated = outputs[i][: len(expected[i])]
        assert generated == expected[i]
        assert len(expected[i]) == MAX_TOKENS or expected[i][-1] in eos
        for step in (0, len(expected[i]) - 1):
            reference = hf_last_logits(model, prompt + outputs[i][:step])
            assert relative_error(logits[step][i], reference) < 1e-4
    assert all(len(set(e)) > 3 for e in expected)  # the tiny models do not degenerate into repeats


@pytest.mark.parametrize("arch", ARCHS)
def test_llm_continuous_batching_matches_hf(
    checkpoint: Callable[[str], Path], hf_reference: Callable[[str], tuple[Any, list[list[int]]]], arch: str
) -> None:
    _, expected = hf_reference(arch)
    llm = make_llm(checkpoint(arch), max_num_seqs=3)
    schedules = record_schedules(llm)
    # The second prompt stops after 4 tokens; the fourth then joins the two still decoding.
    params = [GREEDY, SamplingParams(max_tokens=4), GREEDY, GREEDY]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [expected[0], expected[1][:4], *expected[2:]]
    assert outs[1].outputs[0].finish_reason == "length"
    joined = next(s for s in schedules if any(seq.req_id == outs[3].request_id for seq in s.seqs))
    assert sorted((seq.req_id, seq.is_prefill) for seq in joined.seqs) == [
        (outs[0].request_id, False),
        (outs[2].request_id, False),
        (outs[3].request_id, True),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_gives_the_same_tokens(
    checkpoint: Callable[[str], Path], hf_reference: Callable[[str], tuple[Any, list[list[int]]]], arch: str
) -> None:
    _, expected = hf_reference(arch)
    # The longest request needs ceil((19 + 12 - 1) / 4) = 8 blocks; all four need 22.
    llm = make_llm(checkpoint(arch), num_kv_blocks=9)
    schedules = record_schedules(llm)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert sum(len(s.preempted_req_ids) for s in schedules) > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine_core.scheduler.kv_cache_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_gives_the_same_tokens(
    checkpoint: Callable[[str], Path], hf_reference: Callable[[str], tuple[Any, list[list[int]]]], arch: str
) -> None:
    _, expected = hf_reference(arch)
    llm = make_llm(checkpoint(arch), max_num_batched_tokens=5)
    schedules = record_schedules(llm)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert max(s.total_num_scheduled_tokens for s in schedules) == 5
    assert any(not seq.sample for s in schedules for seq in s.seqs)  # some prompt was split
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_stay_close_to_float32(
    checkpoint: Callable[[str], Path], arch: str, dtype: str
) -> None:
    config = ModelConfig.from_pretrained(checkpoint(arch))
    last_logits: dict[str, torch.Tensor] = {}
    for name in ("float32", dtype):
        runner = ModelRunner(
            config,
            device="cpu",
            dtype=name,
            block_size=4,
            num_kv_blocks=8,
            kv_cache_memory_bytes=0,
            max_model_len=256,
        )
        assert runner.kv_cache.dtype == getattr(torch, name)
        assert {p.dtype for p in runner.model.parameters()} == {getattr(torch, name)}  # type: ignore[attr-defined]
        logits = record_logits(runner)
        runner.execute([SequenceInput("x", PROMPTS[2], 0, list(range(8)), True, GREEDY)])
        last_logits[name] = logits[0][0]
    assert relative_error(last_logits[dtype], last_logits["float32"]) < 0.05
