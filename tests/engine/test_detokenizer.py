import random
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from tests.helpers.checkpoints import _train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    # The byte-level BPE of the tiny test checkpoints, without writing model weights.
    path: Path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _train_tokenizer(512).save(str(path))
    return Tokenizer.from_pretrained(path.parent)


def stream(tokenizer, token_ids, chunk_sizes, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, [0, 5, 6], skip_special_tokens)
    pieces, i = [], 0
    for size in chunk_sizes:
        pieces.append(detok.push(token_ids[i : i + size]))
        i += size
    pieces.append(detok.finish())
    return pieces


def test_multibyte_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("中é", add_special_tokens=False)
    assert len(ids) == 5  # one token per UTF-8 byte: the tiny vocab never saw these characters
    assert stream(tokenizer, ids, [1] * 5) == ["", "", "中", "", "é", ""]


def test_words_stream_as_they_arrive(tokenizer):
    text = "Hello world. Good morning!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert pieces[-1] == "" and all(pieces[:-1])  # every ASCII token yields text at once


def test_special_tokens(tokenizer):
    ids = [*tokenizer.encode("Hi", add_special_tokens=False), 1, 300]
    assert "".join(stream(tokenizer, ids, [1] * len(ids))) == "Hi" + tokenizer.decode([300])
    assert "".join(stream(tokenizer, ids, [1] * len(ids), skip_special_tokens=False)) == tokenizer.decode(
        ids, skip_special_tokens=False
    )


def test_truncated_character_is_flushed_by_finish(tokenizer):
    ids = tokenizer.encode("a中", add_special_tokens=False)[:-1]
    assert stream(tokenizer, ids, [1, 1, 1]) == ["a", "", "", "\ufffd"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_pieces_concatenate_to_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    vocab = tokenizer.vocab_size
    texts = ["naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed", "The quick brown fox", "Ωμέγα"]
    for trial in range(300):
        if trial % 2:
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        else:  # real text with multi-byte characters, specials sprinkled in
            ids = tokenizer.encode(rng.choice(texts) + rng.choice(texts), add_special_tokens=False)
            for _ in range(rng.randrange(3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice([0, 1, 511]))
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, rng.randrange(1, 4)))
            left -= sizes[-1]
        pieces = stream(tokenizer, ids, sizes, skip_special_tokens)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens), ids
