"""Sampler: greedy ties, filters, and batch-independent seeded draws."""

from __future__ import annotations

import torch

from engine.batch import SequenceInput
from engine.sampler import Sampler, mix_seed, splitmix64
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams()


def draw(
    sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], indices: list[int]
) -> list[int]:
    """Sample one token per row (rows with no history and no logprobs: plain ids)."""
    seqs = [
        SequenceInput(f"r{i}", [0], 0, [0], True, p, idx)
        for i, (p, idx) in enumerate(zip(params, indices, strict=True))
    ]
    tokens = sampler.sample(logits, seqs)
    assert all(isinstance(t, int) for t in tokens)
    return tokens  # type: ignore[return-value]


def random_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [2.0, -1.0, 2.0, 0.0], [-3.0, -2.0, -1.0, -1.5]])
    assert draw(Sampler(), logits, [GREEDY] * 3, [0, 0, 0]) == [1, 0, 2]


def test_all_greedy_fast_path_matches_the_general_path_on_bfloat16() -> None:
    """The all-greedy fast path (argmax without the float32 copy) picks the ids the
    general path picks for the same rows when a sampled row forces it."""
    logits = random_logits(8, vocab=300, seed=4).bfloat16()
    logits[2, [11, 250]] = 40.0  # an exact tie in bfloat16: the lower id
    fast = draw(Sampler(), logits, [GREEDY] * 8, [0] * 8)
    mixed = draw(Sampler(), logits, [GREEDY] * 7 + [SamplingParams(temperature=1.0, seed=1)], [0] * 8)
    assert fast[2] == 11
    assert fast[:7] == mixed[:7] == logits.float().argmax(dim=-1).tolist()[:7]


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(6)
    logits[0, [7, 9]] = 100.0  # a tie: the lower id wins, as in argmax
    params = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(6)]
    expected = logits.argmax(dim=-1).tolist()
    assert expected[0] == 7
    assert draw(Sampler(seed=1), logits, params, [3] * 6) == expected


def test_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = random_logits(4, seed=1)
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 4
    assert draw(Sampler(), logits, params, [0] * 4) == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_smallest_set_reaching_the_mass() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05 (ids 2, 0, 3, 1); top_p 0.8 keeps ids 2 and 0 only
    logits = torch.tensor([[0.3, 0.05, 0.5, 0.15]]).log().expand(400, 4).contiguous()
    params = [SamplingParams(temperature=1.0, top_p=0.8)] * 400
    tokens = draw(Sampler(seed=5), logits, params, [0] * 400)
    assert set(tokens) == {0, 2}
    assert 200 < tokens.count(2) < 300  # 0.5 / 0.8 = 62.5 % expected


def test_top_k_restricts_to_the_k_most_likely() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]]).expand(200, 5).contiguous()
    tokens = draw(Sampler(seed=2), logits, [SamplingParams(temperature=5.0, top_k=2)] * 200, [0] * 200)
    assert set(tokens) == {1, 2}


def test_seeded_token_does_not_depend_on_batch_neighbours() -> None:
    logits = random_logits(8, seed=3)
    target = SamplingParams(temperature=1.0, seed=1234)
    alone = draw(Sampler(seed=0), logits[5:6], [target], [17])
    others = [SamplingParams(temperature=0.7, seed=s) for s in range(4)] + [
        GREEDY,
        SamplingParams(temperature=2.0),
    ]
    batch = [*others[:5], target, others[5], GREEDY]
    in_batch = draw(Sampler(seed=99), logits, batch, [0, 1, 2, 3, 4, 17, 5, 6])
    assert in_batch[5] == alone[0]
    again = [draw(Sampler(seed=s), logits[5:6], [target], [17])[0] for s in range(5)]
    assert again == [alone[0]] * 5


def test_seeded_tokens_vary_with_index_and_are_reproducible() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every draw is a fresh uniform id
    params = [SamplingParams(temperature=1.0, seed=7)]
    first = [draw(Sampler(), logits, params, [i])[0] for i in range(10)]
    second = [draw(Sampler(seed=3), logits, params, [i])[0] for i in range(10)]
    assert first == second
    assert len(set(first)) == 10


def test_unseeded_draws_follow_the_worker_seed() -> None:
    logits = torch.zeros(16, 1000)
    params = [SamplingParams(temperature=1.0)] * 16
    a = draw(Sampler(seed=11), logits, params, [0] * 16)
    b = draw(Sampler(seed=11), logits, params, [0] * 16)
    c = draw(Sampler(seed=12), logits, params, [0] * 16)
    assert a == b
    assert a != c


def test_mix_seed_is_a_fixed_function() -> None:
    assert mix_seed(0, 0) == mix_seed(0, 0)
    assert len({mix_seed(s, i) for s in range(20) for i in range(20)}) == 400
    assert all(0 <= mix_seed(2**64 - 1, i) < 2**64 for i in range(5))
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output from state 0
    assert mix_seed(0, 0) == splitmix64(0xE220A8397B1DCDAF)
    assert mix_seed(5, 3) == splitmix64(splitmix64(5) + 3)
