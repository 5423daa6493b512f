"""Sampling parameters of one request (torch-free).

Defaults follow the public proto: ``temperature`` 0 is greedy, ``top_p`` 1.0,
``top_k`` 0 and ``min_p`` 0 are off, penalties are off (``repetition_penalty``
1.0, ``presence_penalty`` and ``frequency_penalty`` 0), ``max_tokens`` defaults
to 16 (as in vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 16
#: Most top log-probabilities per token (OpenAI's limit).
MAX_LOGPROBS = 20
#: Most stop strings per request.
MAX_STOP_STRINGS = 16
#: Longest stop string (characters).
MAX_STOP_STRING_CHARS = 1024
#: Most completions per prompt.
MAX_N = 16
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each generated token.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature; 0 means greedy (>= 0 and finite).
        top_p: nucleus mass in (0, 1]; 1.0 is off.
        top_k: keep the k most likely tokens; 0 is off.
        seed: seed of the request's random stream; ``None`` draws from the
            worker's global generator. Token ``i`` of a seeded request is drawn
            from a generator seeded by ``(seed, i)``, so the output does not
            depend on the rest of the batch or on which worker samples it.
        ignore_eos: keep generating past end-of-sequence tokens.
        min_p: drop tokens whose probability is below ``min_p`` times the most
            likely token's (Nguyen et al., 2024, arXiv:2407.01082); in [0, 1],
            0 is off.
        repetition_penalty: divide positive logits (multiply negative ones) of
            tokens seen in the prompt or output by this (> 0; 1.0 is off).
        presence_penalty: subtracted once from the logit of each token present
            in the output; in [-2, 2].
        frequency_penalty: subtracted from the logit of each token once per
            occurrence in the output; in [-2, 2].
        stop: strings that end generation when the text contains them (the text
            is cut before the match); at most 16, none empty, each at most 1024
            characters. Stored as a tuple
            (a single ``str`` is one stop string).
        stop_token_ids: token ids that end generation like EOS, also with
            ``ignore_eos``; the stop token is kept. Stored as a tuple.
        logprobs: ``None`` for no log-probabilities; ``k`` in [0, 20] returns
            each generated token's log-probability and the ``k`` most likely
            tokens' (log-softmax of the raw logits).
        n: completions per prompt, in [1, 16]. The prompt is computed once;
            the completions share its KV blocks (copy-on-write at the first
            block they write to differently). Completion ``i`` samples with
            :meth:`for_child` ``(i)``.
        prompt_logprobs: ``None`` for none; ``k`` in [0, 20] returns, for every
            prompt token after the first, its log-probability given the tokens
            before it and the ``k`` most likely tokens'. A request asking for
            them computes every prompt position: it never reuses prefix-cache
            blocks for its prompt.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    n: int = 1
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Lists passed by callers become tuples, so the params stay immutable and
        # hashable; a single string is one stop string (as in vLLM).
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when a repetition, presence or frequency penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Check every field.

        Raises:
            InvalidRequest: naming the first bad field (``sampling.<name>``).
        """
        if self.max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature < float("inf"):  # also rejects NaN
            raise InvalidRequest("sampling.temperature", f"must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest("sampling.seed", f"must be in [0, 2**64), got {self.seed}")
        self._validate_new_fields()

    def _validate_new_fields(self) -> None:
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise InvalidRequest(
                "sampling.repetition_penalty", f"must be > 0 and finite, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"sampling.{name}", f"must be in [-2, 2], got {value}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise InvalidRequest("sampling.stop", "stop strings must not be empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequest(
                "sampling.stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters"
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("sampling.stop_token_ids", "token ids must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest("sampling.n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(
                "sampling.prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"
            )

    def for_child(self, index: int) -> SamplingParams:
        """The parameters of completion ``index`` of an ``n`` > 1 request: ``n`` 1 and its own seed.

        Completion 0 keeps ``seed`` (so it equals the ``n`` = 1 output); completion
        ``i`` > 0 uses ``(seed + i * 0x9E3779B97F4A7C15) mod 2**64`` (the golden-ratio
        increment of SplitMix64), so each completion's tokens depend only on
        ``(seed, i)``, never on the batch. Unseeded requests stay unseeded.
        ``prompt_logprobs`` is dropped: the prompt's belong to the parent request.
        """
        seed = self.seed
        if seed is not None and index > 0:
            seed = (seed + index * _GOLDEN_GAMMA) & _MASK64
        return replace(self, n=1, seed=seed, prompt_logprobs=None)
