"""Conversions between protobuf messages and engine domain objects (torch-free).

Protobufs stop at the servicers (STYLE.md): every service converts with these
functions and hands domain objects inward.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.batch import TokenLogprobs
from engine.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from tandem.v1 import generation_pb2

FINISH_REASONS: dict[str, generation_pb2.FinishReason] = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
}


def sampling_params_from_pb(pb: generation_pb2.SamplingParams) -> SamplingParams:
    """Build validated :class:`SamplingParams` from the wire form.

    Zero values mean defaults: ``max_tokens`` 0 → 16, ``top_k`` and ``min_p`` 0
    → off, ``repetition_penalty`` 0 → 1.0 (off), ``logprobs`` 0 → ``None`` (no
    log-probabilities), ``n`` 0 → 1, ``prompt_logprobs`` 0 → ``None``. ``top_p`` unset means 1.0 and, when set,
    must lie in (0, 1].

    Raises:
        InvalidRequest: naming the bad field, e.g. ``sampling.top_p``.
    """
    return SamplingParams(
        max_tokens=pb.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=pb.temperature,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k,
        seed=pb.seed if pb.HasField("seed") else None,
        ignore_eos=pb.ignore_eos,
        min_p=pb.min_p,
        repetition_penalty=pb.repetition_penalty or 1.0,
        presence_penalty=pb.presence_penalty,
        frequency_penalty=pb.frequency_penalty,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        logprobs=pb.logprobs or None,
        n=pb.n or 1,
        prompt_logprobs=pb.prompt_logprobs or None,
    )


def sampling_params_to_pb(params: SamplingParams) -> generation_pb2.SamplingParams:
    """The wire form of ``params`` (inverse of :func:`sampling_params_from_pb`).

    ``logprobs=0`` and ``prompt_logprobs=0`` (the actual token's
    log-probability only) have no wire form and travel as 0, i.e. none.
    """
    pb = generation_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        ignore_eos=params.ignore_eos,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        logprobs=params.logprobs or 0,
        n=params.n,
        prompt_logprobs=params.prompt_logprobs or 0,
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def token_logprobs_to_pb(logprobs: TokenLogprobs) -> generation_pb2.TokenLogprobs:
    """The wire form of one position's log-probabilities."""
    return generation_pb2.TokenLogprobs(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        top_logprobs=[generation_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprobs.top_logprobs],
    )


def token_logprobs_from_pb(pb: generation_pb2.TokenLogprobs) -> TokenLogprobs:
    """Inverse of :func:`token_logprobs_to_pb` (log-probabilities rounded to float32 on the wire)."""
    return TokenLogprobs(
        token_id=pb.token_id,
        logprob=pb.logprob,
        top_logprobs=tuple((t.token_id, t.logprob) for t in pb.top_logprobs),
    )


def logprobs_list_to_pb(logprobs: Sequence[TokenLogprobs]) -> list[generation_pb2.TokenLogprobs]:
    """:func:`token_logprobs_to_pb` over a list (for repeated fields)."""
    return [token_logprobs_to_pb(lp) for lp in logprobs]


def finish_reason_to_pb(reason: str | None) -> generation_pb2.FinishReason:
    """``"stop"``/``"length"``/``"abort"`` → ``FinishReason`` enum value (UNSPECIFIED for None)."""
    return FINISH_REASONS.get(reason or "", generation_pb2.FINISH_REASON_UNSPECIFIED)


def finish_reason_from_pb(value: int) -> str | None:
    """Inverse of :func:`finish_reason_to_pb`."""
    for name, number in FINISH_REASONS.items():
        if number == value:
            return name
    return None
