"""``cli.bench.workload``: seeded lengths and prompts, Poisson arrivals, ShareGPT parsing."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from cli.bench import workload
from cli.bench.workload import Conversation, LengthDist

T = TypeVar("T")


def take(items: Iterator[T], n: int) -> list[T]:
    return list(itertools.islice(items, n))


def test_length_dist_validates_and_samples() -> None:
    rng = random.Random(0)
    assert {LengthDist.fixed(7).sample(rng) for _ in range(20)} == {7}
    assert {LengthDist("uniform", 2, 4).sample(rng) for _ in range(200)} == {2, 3, 4}
    for bad in (("fixed", 3, 4), ("uniform", 0, 4), ("uniform", 5, 4)):
        with pytest.raises(ValueError):
            LengthDist(*bad)  # type: ignore[arg-type]


def test_fixed_lengths_are_exact_and_ids_in_vocab() -> None:
    reqs = take(workload.synthetic_requests(3, 17, LengthDist.fixed(32), LengthDist.fixed(8)), 50)
    assert [r.index for r in reqs] == list(range(50))
    assert all(r.prompt_len == len(r.prompt_token_ids or ()) == 32 and r.output_len == 8 for r in reqs)
    ids = {t for r in reqs for t in r.prompt_token_ids or ()}
    assert ids == set(range(17))  # 1600 draws cover a 17-token vocabulary
    assert all(r.prompt is None and r.group is None for r in reqs)


def test_uniform_lengths_are_seeded() -> None:
    def lengths(seed: int) -> list[tuple[int, int]]:
        reqs = workload.synthetic_requests(
            seed, 100, LengthDist("uniform", 3, 9), LengthDist("uniform", 1, 4)
        )
        return [(r.prompt_len, r.output_len) for r in take(reqs, 6)]

    assert lengths(0) == [(5, 1), (9, 2), (4, 4), (9, 2), (7, 4), (8, 4)]
    assert lengths(1) == [(5, 3), (5, 2), (3, 2), (4, 2), (5, 4), (9, 1)]
    first = take(workload.synthetic_requests(0, 100, LengthDist("uniform", 3, 9), LengthDist.fixed(1)), 1)[0]
    assert first.prompt_token_ids == (45, 17, 31, 16, 50)


def test_shared_prefix_groups() -> None:
    reqs = take(
        workload.synthetic_requests(
            0, 50, LengthDist.fixed(4), LengthDist.fixed(2), prefix_groups=3, prefix_len=5
        ),
        300,
    )
    assert [r.group for r in reqs[:8]] == [0, 0, 1, 1, 2, 2, 1, 2]
    assert all(r.prompt_len == len(r.prompt_token_ids or ()) == 9 for r in reqs)
    prefixes: dict[int | None, set[tuple[int, ...]]] = {}
    for r in reqs:
        prefixes.setdefault(r.group, set()).add((r.prompt_token_ids or ())[:5])
    assert sorted(prefixes) == [0, 1, 2]  # type: ignore[type-var]
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # distinct across groups
    assert len({r.prompt_token_ids for r in reqs}) == 300  # suffixes differ
    with pytest.raises(ValueError, match="go together"):
        next(workload.synthetic_requests(0, 50, LengthDist.fixed(4), LengthDist.fixed(2), prefix_groups=3))


def test_poisson_arrivals_mean_rate() -> None:
    n, rate = 20000, 4.0
    times = take(workload.poisson_arrivals(rate, seed=5), n)
    assert times[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(times))
    mean_gap = times[-1] / (n - 1)
    assert mean_gap == pytest.approx(1 / rate, rel=0.03)  # std error of the mean is 0.7%
    gaps = [b - a for a, b in itertools.pairwise(times)]
    variance = sum((g - mean_gap) ** 2 for g in gaps) / len(gaps)
    assert math.sqrt(variance) == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    # The same seed at another rate is the same process, rescaled.
    doubled = take(workload.poisson_arrivals(2 * rate, seed=5), 50)
    assert doubled == pytest.approx([t / 2 for t in times[:50]], rel=1e-12)
    assert take(workload.poisson_arrivals(rate, seed=6), 5) != times[:5]
    assert take(workload.poisson_arrivals(math.inf, seed=5), 4) == [0.0] * 4
    with pytest.raises(ValueError):
        next(workload.poisson_arrivals(0.0, seed=0))


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "tell me a story"}, {"from": "gpt", "value": "once upon a time"}]},
    {"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "gpt", "value": "ignored: before any human turn"},
        {"from": "human", "value": "hi there"}, {"from": "human", "value": "second human turn"},
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}, {"from": "gpt", "value": "a b c d e"},
    ]},
    {"conversations": [{"from": "gpt", "value": "no prompt"}]},
    {"conversations": [{"from": "human", "value": "no answer"}]},
    {"conversations": [{"from": "human", "value": "empty answer"}, {"from": "gpt", "value": "   "}]},
    {"id": "no conversations"},
    {"conversations": [{"from": "user", "value": "x y"}, {"from": "assistant", "value": "z"}]},
]  # fmt: skip
EXPECTED = [
    Conversation("tell me a story", 4, 4),
    Conversation("hi there", 2, 1),
    Conversation("x y", 2, 1),
]


def test_load_sharegpt_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in SHAREGPT[:3]) + "\n\n" +
                    "\n".join(json.dumps(row) for row in SHAREGPT[3:]) + "\n")  # fmt: skip
    count = workload.whitespace_count
    assert workload.load_sharegpt(path, count, count) == EXPECTED
    # Prompt and output counters are applied to the right turns.
    got = workload.load_sharegpt(path, lambda text: 100 + len(text), lambda text: len(text))
    assert got[0] == Conversation("tell me a story", 115, 16)


def test_load_sharegpt_json_array_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SHAREGPT, indent=2))
    count = workload.whitespace_count
    assert workload.load_sharegpt(path, count, count) == EXPECTED
    path.write_text(json.dumps(SHAREGPT[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"data.json:2: invalid JSON"):
        workload.load_sharegpt(path, count, count)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        workload.load_sharegpt(path, count, count)


def test_dataset_requests_filter_shuffle_and_cycle() -> None:
    conversations = [Conversation(f"p{i}", 10 * i, 5) for i in range(1, 6)]  # lengths 15, 25, ..., 55
    reqs = take(workload.dataset_requests(conversations, seed=0, max_model_len=40), 7)
    assert [r.index for r in reqs] == list(range(7))
    prompts = [r.prompt or "" for r in reqs]
    assert sorted(prompts[:3]) == ["p1", "p2", "p3"]  # p4 (45) and p5 (55) do not fit
    assert prompts[3:6] == prompts[:3] and prompts[6] == prompts[0]  # cycles in one shuffled order
    assert all(r.prompt_token_ids is None and r.output_len == 5 for r in reqs)
    assert reqs[0].prompt_len == 10 * int(prompts[0][1:])
    again = take(workload.dataset_requests(conversations, seed=0, max_model_len=40), 3)
    assert [r.prompt for r in again] == prompts[:3]
    with pytest.raises(ValueError, match="no conversation fits"):
        next(workload.dataset_requests(conversations, seed=0, max_model_len=10))
