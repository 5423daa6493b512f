import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer
from tests.helpers.checkpoints import make_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello world.",
    "",
    "  leading spaces and trailing  ",
    "The quick brown fox jumps over the lazy dog 2024!",
    "unicode: café, 中文, emoji 🙂",
    "<s> inside </s> text",
    "line\nbreaks\tand tabs",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def variant(model_dir: Path, dest: Path, **config_updates) -> Path:
    """Copy of the tokenizer files with ``tokenizer_config.json`` fields changed."""
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copy(model_dir / name, dest / name)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.update(config_updates)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def assert_matches_transformers(path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"], text
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_metadata(model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (512, 0, (1,))


def test_encode_matches_transformers(model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.encode("Hello world.")[0] == 0  # BOS from tokenizer.json's post-processor
    assert_matches_transformers(model_dir)


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}])
def test_config_flags_are_ignored_like_transformers(model_dir, tmp_path, flags):
    path = variant(model_dir, tmp_path / "v", **flags)
    assert_matches_transformers(path)
    assert Tokenizer.from_pretrained(path).encode("Hello") == [0, 423, 80]


def test_decode_matches_transformers(model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = [*tok.encode(text), 1]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if "<s>" not in text:
            assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_eos_ids_merge_generation_config(model_dir, tmp_path):
    path = variant(model_dir, tmp_path / "v")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == (7, 1)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path)


def test_import_is_torch_free():
    code = "import sys, engine.tokenizer, engine.detokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
