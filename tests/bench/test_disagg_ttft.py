"""``bench/disagg_ttft.py`` on CPU: real stacks, a stage breakdown, tokens equal to the colocated run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import disagg_ttft


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_breakdown_and_tokens_match_colocated(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    argv = ["--prompt-lens", "16", "40", "--repeats", "1", "--max-tokens", "4", "--compare-whole"]
    assert disagg_ttft.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(row["variant"], row["prompt_tokens"]) for row in report["rows"]] == [
        ("default", 16),
        ("default", 40),
        ("whole-prompt", 16),
        ("whole-prompt", 40),
    ]
    for row in report["rows"]:
        assert row["tokens_equal_colocated"] is True
        assert 0 < row["prefill_s"] < row["ttft_s"]
        assert row["engine_queue_s"] >= 0 and row["engine_queue_s"] + row["prefill_s"] < row["ttft_s"]
        assert row["reserve_s"] > 0 and row["first_decode_step_s"] > 0
    # 40 tokens in 16-token blocks: 3 blocks of the bundled model's KV
    assert report["rows"][1]["kv_bytes"] == 3 * report["rows"][0]["kv_bytes"]
