"""Conversions between protobuf messages and engine domain objects (torch-free).

Protobufs stop at the servicers (STYLE.md): every service converts with these
functions and hands domain objects inward.
"""

from __future__ import annotations

from engine.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams
from tandem.v1 import generation_pb2

FINISH_REASONS: dict[str, generation_pb2.FinishReason] = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
}


def sampling_params_from_pb(pb: generation_pb2.SamplingParams) -> SamplingParams:
    """Build validated :class:`SamplingParams` from the wire form.

    Zero values mean defaults (``max_tokens`` 0 → 16, ``top_k`` 0 → off);
    ``top_p`` unset means 1.0 and, when set, must lie in (0, 1].

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
    )


def sampling_params_to_pb(params: SamplingParams) -> generation_pb2.SamplingParams:
    """The wire form of ``params`` (inverse of :func:`sampling_params_from_pb`)."""
    pb = generation_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def finish_reason_to_pb(reason: str | None) -> generation_pb2.FinishReason:
    """``"stop"``/``"length"``/``"abort"`` → ``FinishReason`` enum value (UNSPECIFIED for None)."""
    return FINISH_REASONS.get(reason or "", generation_pb2.FINISH_REASON_UNSPECIFIED)


def finish_reason_from_pb(value: int) -> str | None:
    """Inverse of :func:`finish_reason_to_pb`."""
    for name, number in FINISH_REASONS.items():
        if number == value:
            return name
    return None
