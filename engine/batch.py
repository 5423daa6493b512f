"""The seam between the scheduler and the model runner (torch-free).

Each step the scheduler hands the runner one :class:`SequenceInput` per scheduled
request; the runner computes them in one forward pass over the paged KV cache and
returns per input ``None`` (no sample), the sampled token id, or, when the
request asked for log-probabilities, a :class:`TokenLogprobs` that carries the
sampled id with them (see :func:`sampled_token_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position (natural log).

    Taken from ``log_softmax`` of the model's raw logits at that position (before
    penalties, temperature and filters; what transformers' ``output_logits``
    gives, not its processed ``output_scores``).

    Attributes:
        token_id: the sampled token.
        logprob: its log-probability.
        top_logprobs: ``(token_id, logprob)`` of the ``SamplingParams.logprobs``
            most likely tokens, most likely first, ties by lowest id.
    """

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


#: What sampling one row gives: the token id, or its :class:`TokenLogprobs`.
SampleResult = int | TokenLogprobs


#: Stands in ``SequenceInput.token_ids`` for a token not yet known on the host
#: (asynchronous scheduling); see ``SequenceInput.feed_row``.
PLACEHOLDER_TOKEN_ID = -1


def sampled_token_id(result: int | TokenLogprobs) -> int:
    """The token id of one sampled result (a plain id or a :class:`TokenLogprobs`)."""
    return result.token_id if isinstance(result, TokenLogprobs) else result


@dataclass
class SequenceInput:
    """One request's slice of a step.

    Attributes:
        req_id: the request's id.
        token_ids: tokens to compute this step: a prompt chunk (prefill) or the
            last sampled token (decode). Length >= 1.
        start_pos: position of ``token_ids[0]`` in the sequence, i.e. the
            request's ``num_computed_tokens`` before this step (tokens whose KV
            is already in the cache).
        block_table: block ids of the request, in order; covers at least
            ``start_pos + len(token_ids)`` tokens. Token at position ``p`` lives
            in slot ``block_table[p // block_size] * block_size + p % block_size``.
        sample: sample a token after this step (False for a prompt chunk that
            is not the last).
        sampling: the request's sampling parameters.
        output_index: index, among the request's generated tokens, of the token
            sampled this step (0 for the first token); seeds per-token generators.
        prompt_token_ids: the request's whole prompt (repetition penalty).
        output_token_ids: the tokens generated before this step (repetition,
            presence and frequency penalties). These two and ``block_table``
            may be the scheduler's own lists: read them during the step only,
            never modify them.
        prompt_logprobs: OUTPUT, filled by the runner when
            ``sampling.prompt_logprobs`` is set and the slice computes prompt
            tokens: the log-probabilities of prompt tokens ``start_pos + 1 ..
            min(end_pos, len(prompt_token_ids) - 1)`` (each predicted by the
            row before it), in order; ``None`` otherwise.
        samples: OUTPUT, filled by the sampler when ``sample`` is set and
            ``sampling.n`` > 1 (the prompt of a request with ``n``
            completions): completion ``i``'s first token at index ``i``,
            sampled with ``sampling.for_child(i)``; the runner's result for
            the input is ``samples[0]``. ``None`` otherwise.
    """

    req_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool
    sampling: SamplingParams
    output_index: int = 0
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    prompt_logprobs: list[TokenLogprobs] | None = None
    samples: list[SampleResult] | None = None
    feed_row: int | None = None

    @property
    def is_prefill(self) -> bool:
        """True when this slice computes prompt tokens (more than one token or none cached)."""
        return len(self.token_ids) > 1 or self.start_pos == 0

    @property
    def end_pos(self) -> int:
        """Sequence length after this step (tokens), ``start_pos + len(token_ids)``."""
        return self.start_pos + len(self.token_ids)
