"""What ``tandem bench`` sends, and when.

Every generator here is infinite and deterministic for a given seed; the runner takes
as many items as ``--num-requests`` / ``--duration`` allow. Arrival times and request
contents use separate random streams, so the same ``--seed`` gives the same requests at
every request rate of a sweep.

Workloads:

- **synthetic**: prompts of random token ids in ``[0, vocab_size)`` (the served
  vocabulary from ``GetModelInfo``), with fixed or uniform prompt and output lengths.
- **shared prefix**: ``G`` random "system prompts" of ``L`` tokens; each request is one
  group's prefix (group chosen uniformly at random) followed by a random suffix whose
  length is the prompt length, so its prompt has ``L + input_len`` tokens.
- **dataset**: ShareGPT-style conversations. The first human turn is the prompt, sent
  as text (the router tokenizes it with the served model's tokenizer); the length of
  the first gpt turn, in tokens, is the output length. Lengths are counted with a
  tokenizer when one is available, else approximated by whitespace-separated words.

Output lengths are exact: requests set ``max_tokens`` to the output length and
``ignore_eos``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

LengthKind = Literal["fixed", "uniform"]
#: Turn speakers of the ShareGPT format (the first human and first gpt turn are used).
HUMAN_SPEAKERS = ("human", "user")
GPT_SPEAKERS = ("gpt", "assistant", "chatgpt")


@dataclass(frozen=True)
class LengthDist:
    """A length distribution in tokens: ``fixed`` (always ``lo``) or ``uniform`` on ``[lo, hi]``.

    Raises:
        ValueError: ``lo < 1``, ``hi < lo``, or ``fixed`` with ``hi != lo``.
    """

    kind: LengthKind
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 1 or self.hi < self.lo:
            raise ValueError(f"length range must satisfy 1 <= lo <= hi, got [{self.lo}, {self.hi}]")
        if self.kind == "fixed" and self.hi != self.lo:
            raise ValueError("a fixed length has lo == hi")

    @classmethod
    def fixed(cls, n: int) -> LengthDist:
        return cls("fixed", n, n)

    def sample(self, rng: random.Random) -> int:
        """One length (tokens)."""
        return self.lo if self.kind == "fixed" else rng.randint(self.lo, self.hi)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send.

    Attributes:
        index: position in the workload (0, 1, ...).
        prompt_token_ids: the prompt as token ids, or ``None`` when ``prompt`` is text.
        prompt: prompt text (dataset workloads), or ``None``.
        prompt_len: prompt tokens (exact for token ids; for text, as counted by the
            workload's counter; the report uses the router's ``usage.prompt_tokens``).
        output_len: tokens to generate (``max_tokens`` with ``ignore_eos``).
        group: shared-prefix group, or ``None``.
    """

    index: int
    prompt_token_ids: tuple[int, ...] | None
    prompt: str | None
    prompt_len: int
    output_len: int
    group: int | None = None


@dataclass(frozen=True)
class Conversation:
    """A dataset entry: first human turn (``prompt``) and the token lengths used."""

    prompt: str
    prompt_len: int
    output_len: int


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Send offsets in seconds of a Poisson process of ``rate`` requests per second.

    The first request goes at 0; each next one follows an exponential gap of mean
    ``1 / rate``. ``rate == inf`` sends every request at 0 (a burst).

    Raises:
        ValueError: ``rate <= 0``.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"arrivals-{seed}")
    t = 0.0
    while True:
        yield t
        if not math.isinf(rate):
            t += rng.expovariate(rate)


def synthetic_requests(
    seed: int,
    vocab_size: int,
    input_len: LengthDist,
    output_len: LengthDist,
    *,
    prefix_groups: int = 0,
    prefix_len: int = 0,
) -> Iterator[BenchRequest]:
    """Requests of random token ids in ``[0, vocab_size)``.

    With ``prefix_groups > 0`` the generator first draws that many prefixes of
    ``prefix_len`` tokens; request ``i`` is then a random group's prefix plus
    ``input_len`` random tokens (so ``prompt_len = prefix_len + input_len``).

    Raises:
        ValueError: ``vocab_size < 1``, or only one of ``prefix_groups`` / ``prefix_len`` set.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if (prefix_groups > 0) != (prefix_len > 0):
        raise ValueError("prefix_groups and prefix_len go together")
    rng = random.Random(f"requests-{seed}")
    prefixes = [tuple(rng.randrange(vocab_size) for _ in range(prefix_len)) for _ in range(prefix_groups)]
    index = 0
    while True:
        group = rng.randrange(prefix_groups) if prefixes else None
        prefix = prefixes[group] if group is not None else ()
        suffix = tuple(rng.randrange(vocab_size) for _ in range(input_len.sample(rng)))
        ids = prefix + suffix
        yield BenchRequest(index, ids, None, len(ids), output_len.sample(rng), group)
        index += 1


def dataset_requests(
    conversations: list[Conversation], seed: int, max_model_len: int
) -> Iterator[BenchRequest]:
    """Requests from ``conversations`` that fit ``max_model_len`` (prompt + output tokens),
    in an order shuffled by ``seed``, cycling when the list is exhausted.

    Raises:
        ValueError: no conversation fits.
    """
    usable = [c for c in conversations if c.prompt_len + c.output_len <= max_model_len]
    if not usable:
        raise ValueError(f"no conversation fits max_model_len={max_model_len} (of {len(conversations)})")
    random.Random(f"dataset-{seed}").shuffle(usable)
    index = 0
    while True:
        c = usable[index % len(usable)]
        yield BenchRequest(index, None, c.prompt, c.prompt_len, c.output_len)
        index += 1


def load_sharegpt(
    path: Path, count_prompt: Callable[[str], int], count_output: Callable[[str], int]
) -> list[Conversation]:
    """Conversations of a ShareGPT-style file.

    The file is JSONL (one ``{"conversations": [{"from": ..., "value": ...}, ...]}`` per
    line; blank lines ignored) or one JSON array of such objects. Speakers ``human`` /
    ``user`` and ``gpt`` / ``assistant`` / ``chatgpt`` are recognised. Entries without a
    human turn followed by a gpt turn, with an empty prompt, or with an output of 0
    tokens are skipped.

    Args:
        count_prompt: tokens of a prompt (with the special tokens the router adds).
        count_output: tokens of a completion.

    Raises:
        ValueError: a line (or the array) is not valid JSON, or an entry is not an object.
    """
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[int, Any]]
    if text.lstrip().startswith("["):
        entries = list(enumerate(_json(text, path, 1), start=1))
    else:
        lines = enumerate(text.splitlines(), start=1)
        entries = [(n, _json(line, path, n)) for n, line in lines if line.strip()]
    conversations = []
    for n, entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(entry).__name__}")
        pair = _first_exchange(entry.get("conversations") or [])
        if pair is None:
            continue
        prompt, completion = pair
        output_len = count_output(completion)
        if prompt and output_len > 0:
            conversations.append(Conversation(prompt, count_prompt(prompt), output_len))
    return conversations


def whitespace_count(text: str) -> int:
    """Whitespace-separated words: the token count used when no tokenizer is available."""
    return len(text.split())


def _json(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line}: invalid JSON: {error.msg}") from None


def _first_exchange(turns: list[Any]) -> tuple[str, str] | None:
    """(first human turn, first gpt turn after it), or ``None``."""
    prompt = None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        speaker, value = str(turn.get("from", "")).lower(), str(turn.get("value", ""))
        if prompt is None and speaker in HUMAN_SPEAKERS:
            prompt = value
        elif prompt is not None and speaker in GPT_SPEAKERS:
            return prompt, value
    return None
