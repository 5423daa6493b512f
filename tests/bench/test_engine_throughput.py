"""A fast smoke run of ``bench/engine_throughput.py`` on a tiny checkpoint (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.engine_throughput import main, write_config_only_checkpoint
from engine.config import ModelConfig
from tests.helpers.checkpoints import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_checkpoint_run_writes_json_and_table(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    argv = ["--model", str(tiny), "--device", "cpu", "--batch-sizes", "2", "1", "--prompt-len", "6"]
    report = main([*argv, "--output-len", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert (report["model"], report["dtype"], report["device"]) == (tiny.name, "float32", "cpu")
    assert report["command"].startswith("python -m bench.engine_throughput --model")
    assert {"torch", "transformers", "platform", "cpu_count"} <= report["environment"].keys()
    assert [row["batch_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        for name in ("tandem", "transformers"):
            assert row[name]["output_tokens"] == 3 * row["batch_size"]
            assert row[name]["output_tokens_per_s"] == row[name]["output_tokens"] / row[name]["seconds"]
        ratio = row["tandem"]["output_tokens_per_s"] / row["transformers"]["output_tokens_per_s"]
        assert row["ratio"] == ratio
        assert row["identical_outputs"] == 1.0  # same weights, float32, greedy
    table = capsys.readouterr().out
    assert "ratio" in table and "identical" in table and f"wrote {out}" in table.replace("\n", "")


def test_dummy_load_from_a_config_only_directory(tiny: Path, tmp_path: Path) -> None:
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, config_only / name)
    argv = ["--model", str(config_only), "--load-format", "dummy", "--device", "cpu", "--batch-sizes", "1"]
    report = main([*argv, "--prompt-len", "4", "--output-len", "2", "--out", str(tmp_path / "r.json")])
    (row,) = report["results"]
    assert row["tandem"]["output_tokens"] == row["transformers"]["output_tokens"] == 2
    assert row["identical_outputs"] is None  # independent random weights


def test_llama3_8b_shape(tmp_path: Path) -> None:
    path = write_config_only_checkpoint("llama3-8b", tmp_path / "shape")
    config = ModelConfig.from_pretrained(path)
    assert (config.architecture, config.vocab_size, config.hidden_size) == ("LlamaForCausalLM", 128256, 4096)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 8)
    assert (config.intermediate_size, config.head_dim, config.rope_theta) == (14336, 128, 500000.0)
    assert (path / "tokenizer.json").is_file() and not list(path.glob("*.safetensors"))
