"""Stop strings (engine.stop) over real detokenized streams, and stop token ids."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.batch import TokenLogprobs
from engine.block_pool import BlockPool
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache_manager import KVCacheManager
from engine.request import EngineOutput, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.stop import StopStringMatcher
from engine.tokenizer import Tokenizer
from tests.helpers.checkpoints import _train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(512).save(str(path))
    return Tokenizer.from_pretrained(path.parent)


def run(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """Feed ``pieces``; return what was emitted after each (plus the flush) and whether it stopped."""
    matcher = StopStringMatcher(stop)
    emitted = [matcher.push(p) for p in pieces]
    emitted.append(matcher.flush())
    return emitted, matcher.stopped


def test_text_ends_just_before_the_stop_string() -> None:
    emitted, stopped = run(["Hello", " wor", "ld. Good", " morning"], ["world"])
    assert stopped
    assert emitted == ["Hello", " ", "", "", ""]  # "wor" is held back until "ld" completes the match
    assert "".join(emitted) == "Hello "


def test_stop_string_split_over_many_pieces_is_held_back_then_dropped() -> None:
    emitted, stopped = run(["a<", "|e", "n", "d|", ">tail"], ["<|end|>"])
    assert stopped
    assert emitted == ["a", "", "", "", "", ""]


def test_partial_match_that_fails_is_released() -> None:
    emitted, stopped = run(["x <|en", "try"], ["<|end|>"])
    assert not stopped
    assert emitted == ["x ", "<|entry", ""]


def test_earliest_of_several_stop_strings_wins() -> None:
    assert run(["one two three"], ["three", "two", "ne t"]) == (["o", ""], True)
    assert run(["abcabc"], ["cab", "bc"]) == (["a", ""], True)
    assert run(["no match here"], ["zzz"]) == (["no match here", ""], False)
    assert run(["text"], []) == (["text", ""], False)


def test_held_text_is_flushed_at_the_end_without_a_match() -> None:
    emitted, stopped = run(["the end is ne", "ar"], ["nearly"])
    assert not stopped
    assert emitted == ["the end is ", "", "near"]


def test_nothing_is_emitted_after_a_stop() -> None:
    matcher = StopStringMatcher(["!"])
    assert matcher.push("hi! there") == "hi"
    assert matcher.push("more") == ""
    assert matcher.flush() == ""


def test_random_splits_agree_with_the_reference() -> None:
    rng = random.Random(3)
    alphabet = "ab c"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stop = [
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
            for _ in range(rng.randrange(1, 3))
        ]
        hits = [text.find(s) for s in stop if s in text]
        expected = text[: min(hits)] if hits else text
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, stopped = run(pieces, stop)
        assert "".join(emitted) == expected, (text, stop, pieces)
        assert stopped == bool(hits)
        prefix = ""
        for piece in emitted:  # every emitted prefix is a prefix of the final text
            prefix += piece
            assert expected.startswith(prefix)


@pytest.mark.parametrize("stop", ["brown fox", "x jumps", "ver the laz", "og whi", "ick bro"])
def test_detokenized_stream_is_cut_exactly_also_across_tokens(tokenizer: Tokenizer, stop: str) -> None:
    text = "The quick brown fox jumps over the lazy dog while the farmer watches."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # the stop string spans tokens
    detok = IncrementalDetokenizer(tokenizer, [0])
    matcher = StopStringMatcher([stop])
    pieces = []
    for token in ids:
        pieces.append(matcher.push(detok.push([token])))
        if matcher.stopped:
            break
    else:
        pieces.append(matcher.push(detok.finish()) + matcher.flush())
    assert matcher.stopped
    assert "".join(pieces) == text[: text.index(stop)]
    assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))


def test_multibyte_stop_string_split_inside_a_character(tokenizer: Tokenizer) -> None:
    text = "ab中é cd"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [0])
    matcher = StopStringMatcher(["é c"])
    out = "".join(matcher.push(detok.push([t])) for t in ids)
    assert matcher.stopped
    assert out == "ab中"


# ---- stop token ids ----------------------------------------------------------

EOS = 0


def make_scheduler() -> Scheduler:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    return Scheduler(config, KVCacheManager(BlockPool(16, 4)))


def test_stop_token_ids_end_generation_like_eos() -> None:
    s = make_scheduler()
    s.add_request(Request("a", [5, 6], SamplingParams(max_tokens=10, stop_token_ids=[42, 43]), (EOS,)))
    s.add_request(
        Request("b", [7], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[43]), (EOS,))
    )
    assert s.update_from_output(s.schedule(), [9, EOS]) == [EngineOutput("a", [9]), EngineOutput("b", [EOS])]
    assert s.update_from_output(s.schedule(), [43, 43]) == [
        EngineOutput("a", [43], True, "stop"),
        EngineOutput("b", [43], True, "stop"),  # stop_token_ids apply even with ignore_eos
    ]
    assert not s.has_unfinished_requests()
    assert s.kv_cache_manager.num_free_blocks == 16


def test_stop_token_on_the_prefilled_first_token_finishes_at_once() -> None:
    s = make_scheduler()
    s.reserve("d", 3)
    request = Request("d", [1, 2, 3], SamplingParams(max_tokens=5, stop_token_ids=[77]), (EOS,))
    out = s.add_prefilled_request(request, 77)
    assert out == EngineOutput("d", [], True, "stop")
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [77]


def test_scheduler_passes_history_and_logprobs_through() -> None:
    s = make_scheduler()
    s.add_request(Request("a", [5, 6], SamplingParams(max_tokens=3, logprobs=1), (EOS,)))
    step = s.schedule()
    assert (list(step.seqs[0].prompt_token_ids), list(step.seqs[0].output_token_ids)) == ([5, 6], [])
    entry = TokenLogprobs(9, -0.5, ((9, -0.5),))
    assert s.update_from_output(step, [entry]) == [EngineOutput("a", [9], logprobs=[entry])]
    second = s.schedule().seqs[0]
    assert (second.token_ids, list(second.output_token_ids)) == ([9], [9])
