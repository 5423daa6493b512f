"""The bundled model answers through the disaggregated path and `tandem generate`."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from engine.worker_config import BUNDLED_MODEL_DIR
from tests.e2e.stack import REPO, Stack

pytestmark = pytest.mark.e2e

COMMON_WORDS = {
    "the",
    "a",
    "is",
    "of",
    "to",
    "and",
    "in",
    "you",
    "it",
    "that",
    "be",
    "i",
    "not",
    "for",
    "are",
}


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(BUNDLED_MODEL_DIR, tmp_path_factory.mktemp("bundled"), redis_server.url).start()
    yield s
    assert s.stop() == 0


def generate(stack: Stack, *args: str) -> str:
    cmd = [sys.executable, "-m", "cli.main", "generate", "--target", f"127.0.0.1:{stack.port}", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bundled_model_answers_in_english(stack: Stack) -> None:
    text = generate(stack, "The meaning of life is", "--max-tokens", "24")
    words = re.findall(r"[a-z']+", text.lower())
    assert len(words) >= 5, text
    assert len(COMMON_WORDS.intersection(words)) >= 2, text


def test_streamed_text_equals_unary_text(stack: Stack) -> None:
    unary = generate(stack, "A friend in need", "--max-tokens", "16")
    streamed = generate(stack, "A friend in need", "--max-tokens", "16", "--stream")
    assert streamed.strip() == unary.strip() != ""


def test_bad_input_exits_with_the_status(stack: Stack) -> None:
    target = f"127.0.0.1:{stack.port}"
    cmd = [sys.executable, "-m", "cli.main", "generate", "--target", target, "hi", "--max-tokens", "100000"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "max_model_len" in done.stderr
