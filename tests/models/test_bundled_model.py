"""The bundled default model ``models/tandem-tiny`` loads with transformers and speaks English.

Trained by ``scripts/train_bundled_model.py`` on the Debian fortune files; these
tests pin its layout (sizes, config, tokenizer ids) and check loosely that greedy
decoding produces English words, which random weights would not.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.worker_config import BUNDLED_MODEL_DIR

PROMPT = "The meaning of life is"
#: Token ids of ``PROMPT``: ``<s>`` (0) first, then byte-level BPE pieces.
PROMPT_IDS = [0, 318, 3111, 290, 676, 302]
MAX_BUNDLE_BYTES = 25_000_000
#: Frequent English words; random weights rarely emit three of them in 20 tokens.
_COMMON_TEXT = """a an the of to in is are was be it that this for on with as by at from or and but not no
you your he she his her we they them our i me my all one what who which when there if so do does can
will would man men woman life love world time way thing things people good best bad mind form work day
never always more most than then only just like make made know"""
COMMON_WORDS = frozenset(_COMMON_TEXT.split())


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    return AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).float().eval()


def test_bundle_files_fit_size_limit() -> None:
    names = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"]
    sizes = {name: (BUNDLED_MODEL_DIR / name).stat().st_size for name in names}
    assert sum(sizes.values()) <= MAX_BUNDLE_BYTES, sizes
    assert (BUNDLED_MODEL_DIR / "generation_config.json").is_file()
    assert (BUNDLED_MODEL_DIR / "README.md").is_file()


def test_config_is_small_gqa_llama(model: Any) -> None:
    cfg = model.config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (4096, 256, 6)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (8, 4, 704)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.max_position_embeddings) == (0, 1, 512)
    assert cfg.tie_word_embeddings is True
    assert sum(p.numel() for p in model.parameters()) == 5_475_584
    assert model.generation_config.eos_token_id == 1


def test_tokenizer_prepends_bos_and_round_trips(tokenizer: Any) -> None:
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    ids = tokenizer(PROMPT)["input_ids"]
    assert ids == PROMPT_IDS
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == PROMPT_IDS[1:]


def test_english_scores_better_than_scrambled_words(tokenizer: Any, model: Any) -> None:
    text = "Love is the best way to be happy, and the world is a good place."
    scrambled = " ".join(reversed(text.split()))

    def loss(s: str) -> float:
        ids = torch.tensor([tokenizer(s)["input_ids"]])
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    assert loss(text) < 5.0  # uniform over the vocabulary would be ln(4096) = 8.3
    assert loss(text) + 1.0 < loss(scrambled)


def test_greedy_completion_is_english(tokenizer: Any, model: Any) -> None:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    completion = tokenizer.decode(out[0, len(PROMPT_IDS) :], skip_special_tokens=True)
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in completion)
    assert letters >= 0.75 * len(completion), completion
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", completion)}
    assert len(words & COMMON_WORDS) >= 3, completion
