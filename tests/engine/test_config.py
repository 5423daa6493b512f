"""ModelConfig parsing and the max_model_len / dtype resolution rules."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ModelConfig, resolve_dtype, resolve_max_model_len
from tests.helpers.checkpoints import make_tiny_llama

# A transformers-4.x style config: rope_theta + rope_scaling with "type", torch_dtype, eos list.
V4_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "torch_dtype": "bfloat16",
    "eos_token_id": [7, 9],
    "bos_token_id": 5,
}


def write_config(path: Path, config: dict, generation: dict | None = None) -> bytes:
    path.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(config).encode()
    (path / "config.json").write_bytes(raw)
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return raw


def test_reads_transformers_4_config(tmp_path: Path) -> None:
    raw = write_config(tmp_path / "llama-v4", V4_CONFIG, {"eos_token_id": 11})
    config = ModelConfig.from_pretrained(tmp_path / "llama-v4")
    assert config.name == "llama-v4"
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 8, 16)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    assert config.eos_token_ids == (7, 9, 11)
    assert config.bos_token_id == 5
    assert config.torch_dtype == "bfloat16"
    assert (config.tie_word_embeddings, config.attention_bias, config.mlp_bias) == (False, False, False)
    assert config.model_id == "llama-v4-" + hashlib.sha256(raw).hexdigest()[:12]


def test_reads_transformers_5_checkpoint(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tiny", head_dim=24, tie_word_embeddings=True, rope_theta=20000.0)
    config = ModelConfig.from_pretrained(path)
    assert "rope_parameters" in json.loads((path / "config.json").read_text())
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (512, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 24)
    assert config.rope_theta == 20000.0
    assert config.rope_scaling is None
    assert config.tie_word_embeddings is True
    assert config.eos_token_ids == (1,)
    assert config.bos_token_id == 0
    assert config.torch_dtype == "float32"
    assert config.max_position_embeddings == 256


def test_model_id_changes_with_config_bytes(tmp_path: Path) -> None:
    write_config(tmp_path / "a" / "m", V4_CONFIG)
    write_config(tmp_path / "b" / "m", {**V4_CONFIG, "rms_norm_eps": 1e-6})
    first = ModelConfig.from_pretrained(tmp_path / "a" / "m").model_id
    second = ModelConfig.from_pretrained(tmp_path / "b" / "m").model_id
    assert first.startswith("m-") and second.startswith("m-") and first != second


def test_missing_config_and_field_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        ModelConfig.from_pretrained(tmp_path)
    bad = {k: v for k, v in V4_CONFIG.items() if k != "hidden_size"}
    write_config(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="'hidden_size'"):
        ModelConfig.from_pretrained(tmp_path / "bad")


def test_resolve_max_model_len(tmp_path: Path) -> None:
    write_config(tmp_path / "m", V4_CONFIG)
    config = ModelConfig.from_pretrained(tmp_path / "m")
    assert resolve_max_model_len(config, None) == 4096
    assert resolve_max_model_len(config, 1024) == 1024
    with pytest.raises(ValueError, match="max_position_embeddings"):
        resolve_max_model_len(config, 4097)


@pytest.mark.parametrize(
    ("fields", "window", "limit"),
    [
        ({"sliding_window": 1024}, 1024, 1024),  # Mistral v0.1: always on
        ({"sliding_window": 8192}, 8192, 4096),  # wider than max_position_embeddings
        ({"sliding_window": None}, None, 4096),
        ({"sliding_window": 1024, "use_sliding_window": False}, None, 4096),  # Qwen2/Qwen3 default
        (
            {"sliding_window": 1024, "use_sliding_window": True, "layer_types": ["full_attention"] * 3},
            None,
            4096,
        ),
        ({"sliding_window": 1024, "layer_types": ["full_attention", "sliding_attention"]}, 1024, 1024),
    ],
)
def test_sliding_window_caps_max_model_len(
    tmp_path: Path, fields: dict, window: int | None, limit: int
) -> None:
    write_config(tmp_path / "m", {**V4_CONFIG, **fields})
    config = ModelConfig.from_pretrained(tmp_path / "m")
    assert config.sliding_window == window
    assert resolve_max_model_len(config, None) == limit
    if limit < 4096:
        with pytest.raises(ValueError, match=r"sliding_window of m; .* does not implement"):
            resolve_max_model_len(config, limit + 1)


def test_resolve_dtype(tmp_path: Path) -> None:
    write_config(tmp_path / "bf16", V4_CONFIG)
    write_config(tmp_path / "none", {k: v for k, v in V4_CONFIG.items() if k != "torch_dtype"})
    bf16 = ModelConfig.from_pretrained(tmp_path / "bf16")
    no_dtype = ModelConfig.from_pretrained(tmp_path / "none")
    assert resolve_dtype("auto", bf16, "cpu") == "float32"
    assert resolve_dtype("auto", bf16, "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", no_dtype, "cuda") == "bfloat16"
    assert resolve_dtype("float16", bf16, "cpu") == "float16"
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", bf16, "cpu")


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, engine.config; print('torch' in sys.modules, 'transformers' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert out.stdout.strip() == "False False"
