"""Sampler: penalties against transformers' logits processors and the OpenAI formula,
log-probabilities against ``torch.log_softmax``, and sampled frequencies of
top-k / top-p / min-p against transformers' warpers (chi-square, fixed seeds)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.batch import SequenceInput, TokenLogprobs
from engine.sampler import Sampler, apply_penalties, compute_logprobs
from engine.sampling_params import SamplingParams

VOCAB = 40
#: Chi-square critical values at p = 0.001 by degrees of freedom.
CHI2_CRITICAL_0_001 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
}


def seq(
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    index: int = 0,
    name: str = "r",
) -> SequenceInput:
    return SequenceInput(name, [0], 0, [0], True, params, index, list(prompt), list(output))


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def random_history(n: int, seed: int, vocab: int = VOCAB) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def openai_penalties(
    logits: torch.Tensor, output: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's definition, token by token: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""
    out = logits.clone()
    for token, count in Counter(output).items():
        out[token] -= count * frequency + presence
    return out


def test_repetition_penalty_matches_transformers_processor() -> None:
    logits = random_logits(4)
    cases = [(1.3, 5, 7), (0.7, 9, 0), (2.0, 0, 12), (1.0, 6, 6)]  # (penalty, prompt len, output len)
    seqs = [
        seq(SamplingParams(repetition_penalty=p), random_history(n_p, 2 * i), random_history(n_o, 2 * i + 1))
        for i, (p, n_p, n_o) in enumerate(cases)
    ]
    got = apply_penalties(logits, seqs)
    for row, (s, (penalty, _, _)) in enumerate(zip(seqs, cases, strict=True)):
        input_ids = torch.tensor([[*s.prompt_token_ids, *s.output_token_ids]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[row : row + 1].clone())
        torch.testing.assert_close(got[row : row + 1], expected, rtol=0, atol=1e-6)
    assert not torch.equal(got[0], logits[0])  # the penalty did change something
    torch.testing.assert_close(got[3], logits[3], rtol=0, atol=0)  # 1.0 is off


def test_presence_and_frequency_penalties_follow_the_openai_formula() -> None:
    logits = random_logits(3, seed=1)
    cases = [(0.5, 0.0), (0.0, 1.2), (-1.5, 2.0)]  # (presence, frequency)
    prompts = [random_history(8, 10 + i) for i in range(3)]
    outputs = [[3, 3, 3, 7, 7, 11], [0, 5, 5], [39, 1, 39, 39, 2]]
    seqs = [
        seq(SamplingParams(presence_penalty=pr, frequency_penalty=fr), prompts[i], outputs[i])
        for i, (pr, fr) in enumerate(cases)
    ]
    got = apply_penalties(logits, seqs)
    for row, (presence, frequency) in enumerate(cases):
        expected = openai_penalties(logits[row], outputs[row], presence, frequency)
        torch.testing.assert_close(got[row], expected, rtol=0, atol=1e-6)
    # prompt tokens that never appear in the output are not penalized
    untouched = sorted(set(prompts[1]) - set(outputs[1]))
    assert untouched
    torch.testing.assert_close(got[1, untouched], logits[1, untouched], rtol=0, atol=0)


def test_penalties_apply_repetition_first_then_presence_and_frequency() -> None:
    logits = random_logits(2, seed=2)
    prompt, output = random_history(10, 20), random_history(10, 21)
    params = SamplingParams(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.6)
    got = apply_penalties(logits, [seq(params, prompt, output), seq(SamplingParams(), prompt, output)])
    input_ids = torch.tensor([prompt + output])
    repeated = RepetitionPenaltyLogitsProcessor(1.4)(input_ids, logits[:1].clone())[0]
    torch.testing.assert_close(got[0], openai_penalties(repeated, output, 0.3, 0.6), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)  # the row without penalties is untouched


def test_greedy_rows_take_the_argmax_of_the_penalized_logits() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, -2.0], [1.0, 4.0, 3.0, -2.0]])
    penalized = SamplingParams(repetition_penalty=2.0)  # token 1: 4 / 2 = 2 < 3
    tokens = Sampler().sample(logits, [seq(penalized, [1], []), seq(SamplingParams(), [1], [])])
    assert tokens == [2, 1]
    frequency = SamplingParams(frequency_penalty=0.8)  # token 1: 4 - 2 * 0.8 = 2.4 < 3
    assert Sampler().sample(logits[:1], [seq(frequency, [2], [1, 1])]) == [2]


def test_seeded_draw_with_penalties_does_not_depend_on_batch_neighbours() -> None:
    logits = random_logits(4, seed=3)
    target = seq(
        SamplingParams(temperature=1.0, seed=99, repetition_penalty=1.3, presence_penalty=0.5),
        random_history(6, 30),
        random_history(4, 31),
        index=4,
    )
    alone = Sampler(seed=0).sample(logits[2:3], [target])
    others = [
        seq(SamplingParams(temperature=0.8, frequency_penalty=1.0), [1], [2, 2]),
        seq(SamplingParams(), [5], []),
        seq(SamplingParams(temperature=1.5, min_p=0.1), [], []),
    ]
    batch = Sampler(seed=7).sample(logits, [others[0], others[1], target, others[2]])
    assert batch[2] == alone[0]


def test_logprobs_match_log_softmax_of_the_raw_logits() -> None:
    logits = random_logits(3, seed=4)
    logits[1, [4, 9]] = 10.0  # a tie at the top: the lower id is listed first
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0.9, seed=1, logprobs=3, repetition_penalty=1.5),
        SamplingParams(logprobs=0),
    ]
    results = Sampler().sample(logits, [seq(p, [4], [9]) for p in params])
    reference = torch.log_softmax(logits, dim=-1)
    for row, (result, p) in enumerate(zip(results, params, strict=True)):
        assert isinstance(result, TokenLogprobs)
        assert result.logprob == pytest.approx(reference[row, result.token_id].item(), abs=1e-6)
        order = sorted(range(VOCAB), key=lambda t: (-reference[row, t].item(), t))[: p.logprobs]
        assert [t for t, _ in result.top_logprobs] == order
        for token, value in result.top_logprobs:
            assert value == pytest.approx(reference[row, token].item(), abs=1e-6)
    assert results[0].token_id == int(logits[0].argmax())  # type: ignore[union-attr]
    assert [t for t, _ in results[1].top_logprobs[:2]] == [4, 9]  # type: ignore[union-attr]
    assert results[2].top_logprobs == ()  # type: ignore[union-attr]


def test_compute_logprobs_caps_top_entries_at_the_vocabulary() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    (entry,) = compute_logprobs(logits, [0], [20])
    assert [t for t, _ in entry.top_logprobs] == [2, 1, 0]
    assert entry.logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item(), abs=1e-6)


def test_rows_without_logprobs_return_plain_ids() -> None:
    results = Sampler().sample(random_logits(2), [seq(SamplingParams()), seq(SamplingParams(logprobs=2))])
    assert isinstance(results[0], int)
    assert isinstance(results[1], TokenLogprobs)


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate's order (temperature, top-k, top-p, min-p), then softmax."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    if params.min_p:
        scores = MinPLogitsWarper(params.min_p)(ids, scores)  # type: ignore[arg-type]
    return torch.softmax(scores, dim=-1)[0]


def chi_square(observed: Counter[Any], expected: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens of nonzero expected probability, and its degrees of freedom."""
    support = [t for t in range(len(expected)) if expected[t] > 0]
    stat = sum((observed[t] - n * expected[t].item()) ** 2 / (n * expected[t].item()) for t in support)
    return stat, len(support) - 1


#: logits over 10 tokens with well separated probabilities.
DIST_LOGITS = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -2.0])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.8, top_p=0.7),
        SamplingParams(temperature=1.2, min_p=0.3),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.2),
    ],
    ids=["top_k", "top_p", "min_p", "combined"],
)
def test_sampled_frequencies_match_the_reference_distribution(params: SamplingParams) -> None:
    n = 20000
    logits = DIST_LOGITS.expand(n, -1).contiguous()
    tokens = Sampler(seed=1234).sample(logits, [seq(params)] * n)
    observed = Counter(tokens)  # type: ignore[arg-type]
    expected = reference_probs(DIST_LOGITS, params)
    assert {t for t in observed} == {t for t in range(10) if expected[t] > 0}  # nothing outside the support
    stat, dof = chi_square(observed, expected, n)
    assert 2 <= dof <= 8
    assert stat < CHI2_CRITICAL_0_001[dof], (stat, dof)
    # power check: the same draws reject the distribution without temperature
    untempered = torch.softmax(DIST_LOGITS, -1) * (expected > 0)
    uniform = (expected > 0).float()
    wrong = untempered if params.temperature != 1.0 else uniform
    assert chi_square(observed, wrong / wrong.sum(), n)[0] > 3 * CHI2_CRITICAL_0_001[dof]


def test_min_p_keeps_the_tokens_transformers_keeps() -> None:
    logits = random_logits(1, vocab=200, seed=5)[0]
    for min_p in (0.05, 0.2, 0.5, 0.9, 1.0):
        params = SamplingParams(temperature=0.7, min_p=min_p)
        kept = set(Sampler(seed=0).sample(logits.expand(3000, -1).contiguous(), [seq(params)] * 3000))
        support = {t for t, p in enumerate(reference_probs(logits, params).tolist()) if p > 0}
        assert kept <= support
        if len(support) <= 5:
            assert kept == support
