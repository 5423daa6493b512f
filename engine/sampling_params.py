"""Sampling parameters of one request (torch-free).

Defaults follow the public proto: ``temperature`` 0 is greedy, ``top_p`` 1.0 and
``top_k`` 0 are off, ``max_tokens`` defaults to 16 (as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each generated token.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature; 0 means greedy (>= 0).
        top_p: nucleus mass in (0, 1]; 1.0 is off.
        top_k: keep the k most likely tokens; 0 is off.
        seed: seed of the request's random stream; ``None`` draws from the
            worker's global generator. Token ``i`` of a seeded request is drawn
            from a generator seeded by ``(seed, i)``, so the output does not
            depend on the rest of the batch or on which worker samples it.
        ignore_eos: keep generating past end-of-sequence tokens.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0

    def validate(self) -> None:
        """Check every field.

        Raises:
            InvalidRequest: naming the first bad field (``sampling.<name>``).
        """
        if self.max_tokens < 1:
            raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequest("sampling.temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest("sampling.seed", f"must be in [0, 2**64), got {self.seed}")
