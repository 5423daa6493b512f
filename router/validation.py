"""Validation of public requests at the router (torch-free).

Turns a ``GenerateRequest`` into a :class:`ParsedRequest` (token ids and
:class:`SamplingParams`) or raises :class:`InvalidRequest` naming the field to
fix, which the servicer maps to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from engine.codec import sampling_params_from_pb
from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from tandem.v1 import generation_pb2

#: Longest accepted request id (characters).
MAX_REQUEST_ID_LEN = 256
#: Longest accepted cache salt (characters).
MAX_CACHE_SALT_LEN = 256


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request.

    Attributes:
        request_id: the caller's id, or a generated one.
        prompt_token_ids: the prompt as token ids (length >= 1).
        sampling: validated sampling parameters.
        cache_salt: prefix-cache namespace of the request (``""``: the shared one).
        priority: scheduling priority (lower first), carried to every worker.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str = ""
    priority: int = 0


def parse_generate_request(
    pb: generation_pb2.GenerateRequest, tokenizer: Tokenizer, *, vocab_size: int, max_model_len: int
) -> ParsedRequest:
    """Validate ``pb`` and tokenize its prompt.

    Length rule (as vLLM's): the prompt must leave room for one token (fewer than
    ``max_model_len`` tokens), and prompt plus an explicit ``max_tokens`` must fit in
    ``max_model_len``; ``max_tokens`` unset (0) means 16 or, when fewer fit, as many
    as fit (the completion then ends with ``length``).

    Raises:
        InvalidRequest: empty prompt; both or neither of ``prompt`` and
            ``prompt_token_ids``; a token id outside ``[0, vocab_size)``;
            a prompt of ``max_model_len`` tokens or more; prompt plus
            ``max_tokens`` over ``max_model_len``; bad sampling parameters (a stop
            token id outside the vocabulary included; each error names its field,
            e.g. ``sampling.n``); an over-long ``request_id`` or ``cache_salt``.
    """
    if len(pb.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest("request_id", f"must be at most {MAX_REQUEST_ID_LEN} characters")
    if len(pb.cache_salt) > MAX_CACHE_SALT_LEN:
        raise InvalidRequest("cache_salt", f"must be at most {MAX_CACHE_SALT_LEN} characters")
    if pb.prompt and pb.prompt_token_ids:
        raise InvalidRequest("prompt", "set exactly one of prompt and prompt_token_ids, not both")
    if pb.prompt_token_ids:
        token_ids = list(pb.prompt_token_ids)
        for i, tid in enumerate(token_ids):
            if tid >= vocab_size:
                raise InvalidRequest(
                    "prompt_token_ids",
                    f"token id {tid} at index {i} is outside the vocabulary [0, {vocab_size})",
                )
    elif pb.prompt:
        token_ids = tokenizer.encode(pb.prompt)
        if not token_ids:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
    else:
        raise InvalidRequest("prompt", "is empty: set prompt (text) or prompt_token_ids")
    sampling = sampling_params_from_pb(pb.sampling)
    _check_sampling_for_model(sampling, vocab_size)
    if len(token_ids) >= max_model_len:
        raise InvalidRequest(
            "prompt",
            f"{len(token_ids)} tokens, but max_model_len ({max_model_len}) leaves room for at most "
            f"{max_model_len - 1} prompt tokens; shorten the prompt",
        )
    if not pb.sampling.max_tokens:  # the default shrinks to the room left
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, max_model_len - len(token_ids)))
    if len(token_ids) + sampling.max_tokens > max_model_len:
        raise InvalidRequest(
            "sampling.max_tokens",
            f"prompt ({len(token_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
            f"max_model_len ({max_model_len}); shorten the prompt or lower max_tokens",
        )
    return ParsedRequest(pb.request_id or uuid.uuid4().hex, token_ids, sampling, pb.cache_salt, pb.priority)


def _check_sampling_for_model(sampling: SamplingParams, vocab_size: int) -> None:
    """What :class:`SamplingParams` cannot check alone: the vocabulary.

    Raises:
        InvalidRequest: a stop token id outside ``[0, vocab_size)``.
    """
    for i, tid in enumerate(sampling.stop_token_ids):
        if tid >= vocab_size:
            raise InvalidRequest(
                "sampling.stop_token_ids",
                f"token id {tid} at index {i} is outside the vocabulary [0, {vocab_size})",
            )
