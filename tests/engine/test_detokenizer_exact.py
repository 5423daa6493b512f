"""Exactness of :class:`engine.detokenizer.IncrementalDetokenizer` across tokenizer families.

Every stream's pieces must concatenate to ``tokenizer.decode(ids, skip_special_tokens)``,
on each path (the one chosen for the tokenizer, the Rust ``tokenizers.decoders.DecodeStream``
and the Python window), for:
the bundled ``models/tandem-tiny`` (byte-level BPE), the tiny test checkpoints'
byte-level BPE (the same ``tokenizer.json`` for Llama, Mistral, Qwen2 and Qwen3),
a byte-level BPE with added non-special tokens, a Llama-2-style SentencePiece BPE
(``byte_fallback`` byte tokens, ``Replace``/``ByteFallback``/``Fuse``/``Strip``
decoder) and Metaspace pre-tokenizer/decoder pairs (``prepend_scheme`` ``first``
and ``always``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from engine import detokenizer as detokenizer_module
from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from engine.worker_config import BUNDLED_MODEL_DIR
from tests.helpers.checkpoints import TRAINING_TEXT, _train_tokenizer

#: Multi-byte text the tokenizers never saw in training: CJK, accents, emoji (4-byte, ZWJ, flags), RTL.
TEXTS = [
    "naïve café",
    "日本語のテキスト",
    "emoji 🙂🚀 mixed",
    "The quick brown fox",
    "Ωμέγα",
    "👩\u200d👩\u200d👧 family 🇫🇷",
    "  leading spaces and\ttabs\n\nnewlines ",
    "עברית العربية",
    "don't stop , really ?",
    "\ufffd literal replacement",
]
SPECIALS = ["<s>", "</s>", "<pad>"]


def _sentencepiece_bpe() -> HFTokenizer:
    """Llama-2 style: ``▁`` for spaces, ``<0xNN>`` byte tokens in the model's vocabulary for
    characters it lacks (``byte_fallback``), a decoder that strips one leading space."""
    trained = HFTokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(
        [TRAINING_TEXT], trainer=trainers.BpeTrainer(vocab_size=500, show_progress=False)
    )
    model = json.loads(trained.to_str())["model"]
    tokens = ["<unk>", *SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *model["vocab"]]
    merges = [(a, b) for a, b in (m.split(" ") if isinstance(m, str) else m for m in model["merges"])]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", *SPECIALS])
    return tok


def _metaspace(prepend_scheme: str) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    alphabet = sorted(set(TRAINING_TEXT + "".join(TEXTS)))
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", *SPECIALS], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    return tok


def _byte_level_with_added_tokens() -> HFTokenizer:
    tok = _train_tokenizer(400)
    tok.add_tokens(["<think>", "</think>", " spaced", "émoji"])
    tok.add_special_tokens(["<|im_end|>"])
    return tok


BUILDERS: dict[str, Callable[[], HFTokenizer]] = {
    "tiny_checkpoint_byte_level": lambda: _train_tokenizer(512),
    "byte_level_added_tokens": _byte_level_with_added_tokens,
    "sentencepiece_byte_fallback": _sentencepiece_bpe,
    "metaspace_first": lambda: _metaspace("first"),
    "metaspace_always": lambda: _metaspace("always"),
}


@pytest.fixture(scope="module", params=["bundled", *BUILDERS])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    if request.param == "bundled":
        return Tokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    path: Path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    BUILDERS[request.param]().save(str(path))
    return Tokenizer.from_pretrained(path.parent)


@pytest.fixture(params=["chosen", "decode_stream", "window"])
def implementation(request, monkeypatch) -> str:
    """``chosen``: the path the module picks for the tokenizer; ``decode_stream``: Rust
    ``DecodeStream`` (unless ``ByteFallback``); ``window``: the Python window."""
    if request.param != "chosen":
        decoding = detokenizer_module._decoding
        monkeypatch.setattr(
            detokenizer_module, "_decoding", lambda tok: dataclasses.replace(decoding(tok), byte_level=False)
        )
    if request.param == "window":
        monkeypatch.setattr(detokenizer_module, "_DecodeStream", None)
    return request.param


def stream(
    tokenizer: Tokenizer, ids: Sequence[int], sizes: Sequence[int], skip_special_tokens: bool
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, [0, 1], skip_special_tokens)
    pieces, i = [], 0
    for size in sizes:
        pieces.append(detok.push(ids[i : i + size]))
        i += size
    assert i == len(ids)
    pieces.append(detok.finish())
    return pieces


def random_stream(tokenizer: Tokenizer, rng: random.Random) -> list[int]:
    """Real text (multi-byte characters) with special and random ids sprinkled in, or random ids."""
    vocab = tokenizer.vocab_size
    if rng.random() < 0.3:
        return [rng.randrange(vocab + 3) for _ in range(rng.randrange(0, 40))]  # ids past the vocab: dropped
    ids = tokenizer.encode(rng.choice(TEXTS) + rng.choice(["", " ", "\n"]) + rng.choice(TEXTS), False)
    specials = [
        i for i in (tokenizer.backend.token_to_id(t) for t in [*SPECIALS, "<|im_end|>"]) if i is not None
    ]
    for _ in range(rng.randrange(4)):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice([*specials, rng.randrange(vocab)]))
    if rng.random() < 0.3:  # end inside a character
        ids = ids[: rng.randrange(len(ids) + 1)]
    return ids


def random_sizes(rng: random.Random, n: int) -> list[int]:
    """Chunk sizes summing to ``n``, with empty pushes and pushes of several ids."""
    sizes = []
    while n:
        size = min(n, rng.choice([0, 1, 1, 1, 2, 3, 5]))
        sizes.append(size)
        n -= size
    return sizes


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_streams_concatenate_to_full_decode(tokenizer, implementation, skip_special_tokens):
    rng = random.Random(f"{implementation}-{skip_special_tokens}")
    for _ in range(250):
        ids = random_stream(tokenizer, rng)
        pieces = stream(tokenizer, ids, random_sizes(rng, len(ids)), skip_special_tokens)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens), ids


def test_multibyte_characters_are_held_until_complete(tokenizer, implementation):
    for text in TEXTS[:-1]:  # the last one holds a literal U+FFFD
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, [], True)
        emitted = ""
        for i in range(len(ids)):
            emitted += detok.push(ids[i : i + 1])
            assert "\ufffd" not in emitted  # never half a character
        assert emitted + detok.finish() == tokenizer.decode(ids)


def test_finish_flushes_incomplete_character(tokenizer, implementation):
    ids = tokenizer.encode("ab 🚀", add_special_tokens=False)
    cut = next((n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd")), None)
    if cut is None:
        pytest.skip("no byte tokens: every token decodes to whole characters")
    pieces = stream(tokenizer, ids[:cut], [1] * cut, True)
    assert "".join(pieces) == tokenizer.decode(ids[:cut])
    assert pieces[-1].endswith("\ufffd") and "\ufffd" not in "".join(pieces[:-1])


def test_paths_give_the_same_pieces(tokenizer, monkeypatch):
    """One id per push, every path moves the window identically: the same pieces, not only
    the same text. (With several ids per push the Python window holds text until the
    push's last id completes a character; the other paths step id by id.)"""
    rng = random.Random(7)
    streams = [random_stream(tokenizer, rng) for _ in range(100)]
    chosen = [stream(tokenizer, ids, [1] * len(ids), True) for ids in streams]
    decoding = detokenizer_module._decoding
    monkeypatch.setattr(
        detokenizer_module, "_decoding", lambda tok: dataclasses.replace(decoding(tok), byte_level=False)
    )
    assert [stream(tokenizer, ids, [1] * len(ids), True) for ids in streams] == chosen
    monkeypatch.setattr(detokenizer_module, "_DecodeStream", None)
    assert [stream(tokenizer, ids, [1] * len(ids), True) for ids in streams] == chosen


def test_path_choice(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    if isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        assert detok._pieces is not None and detok._stream is None
    elif tokenizer.backend.token_to_id("<0xE6>") is not None:  # ByteFallback: the Python window
        assert detok._pieces is None and detok._stream is None
    else:
        assert detok._pieces is None and detok._stream is not None


def test_stray_byte_after_a_complete_character(tokenizer, implementation):
    """A byte that cannot start or continue a character after a completed one: a
    ``ByteFallback`` decoder turns the whole byte run into U+FFFDs, byte-level keeps the
    character. Held text must follow either rule."""
    han = tokenizer.encode("x日", add_special_tokens=False)
    byte = tokenizer.backend.token_to_id("<0x97>")
    if byte is None:  # byte-level: the token of the lone byte 0x97
        byte = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd")
    word = tokenizer.encode(" ok", add_special_tokens=False)
    # a special token inside a run: skip_special_tokens drops it and the run goes on across it
    for ids in (
        [*han, byte, *word],
        [*han, byte],
        [*han, byte, 1, *han],
        [*han[:-1], 1, han[-1], byte, *word],
    ):
        for skip in (True, False):
            pieces = stream(tokenizer, ids, [1] * len(ids), skip)
            assert "".join(pieces) == tokenizer.decode(ids, skip), (ids, skip)


def test_tokenizer_without_tokenizers_backend():
    """Any object with ``decode`` works (the Python window)."""

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(0x61 + i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), [])  # type: ignore[arg-type]
    assert detok._stream is None
    assert [detok.push([0]), detok.push([1, 2]), detok.push([]), detok.finish()] == ["a", "bc", "", ""]


def test_falls_back_to_python_when_decode_stream_refuses(tokenizer, implementation):
    """A DecodeStream error mid-push switches to the Python window with no text lost."""

    class Refusing:
        def step(self, backend, token_id):
            raise Exception("InvalidPrefix")

    ids = tokenizer.encode("Hello 日本 world", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    if detok._stream is None:
        pytest.skip(f"DecodeStream is not used for this tokenizer on the {implementation} path")
    text = detok.push(ids[:3])
    detok._stream = Refusing()
    text += detok.push(ids[3:6]) + detok.push(ids[6:]) + detok.finish()
    assert detok._stream is None and text == tokenizer.decode(ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_arbitrary_ids_and_chunks(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size + 1), max_size=24))
    sizes = data.draw(st.lists(st.integers(0, 4), max_size=30))
    skip = data.draw(st.booleans())
    chunks, i = [], 0
    for size in sizes:
        chunks.append(min(size, len(ids) - i))
        i += chunks[-1]
    chunks.append(len(ids) - i)
    assert "".join(stream(tokenizer, ids, chunks, skip)) == tokenizer.decode(ids, skip)
