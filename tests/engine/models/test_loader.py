"""Safetensors loading: single file, shards, tied heads and clear mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.attention import get_attention_backend
from engine.config import ModelConfig
from engine.models.loader import checkpoint_files, load_model
from tests.helpers.checkpoints import make_tiny_llama


def load(path: Path, dtype: str = "float32") -> torch.nn.Module:
    return load_model(ModelConfig.from_pretrained(path), dtype, "cpu", get_attention_backend())  # type: ignore[return-value]


def test_fused_projections_hold_checkpoint_slices(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    model = load(path)
    qkv = model.get_parameter("model.layers.1.self_attn.qkv_proj.weight")
    prefix = "model.layers.1.self_attn."
    expected = torch.cat([tensors[prefix + n] for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")])
    assert torch.equal(qkv, expected)
    gate_up = model.get_parameter("model.layers.0.mlp.gate_up_proj.weight")
    mlp = "model.layers.0.mlp."
    assert torch.equal(
        gate_up, torch.cat([tensors[mlp + "gate_proj.weight"], tensors[mlp + "up_proj.weight"]])
    )
    assert torch.equal(model.get_parameter("lm_head.weight"), tensors["lm_head.weight"])


def test_sharded_checkpoint_and_tied_head(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", tie_word_embeddings=True, max_shard_size="40KB")
    files = checkpoint_files(path)
    assert len(files) > 2
    assert [f.name for f in files] == sorted(f.name for f in files)
    model = load(path, dtype="bfloat16")
    embed = model.get_parameter("model.embed_tokens.weight")
    assert model.get_submodule("lm_head").weight is embed
    assert embed.dtype == torch.bfloat16


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    del tensors["lm_head.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as excinfo:
        load(path)
    message = str(excinfo.value)
    assert "missing tensors ['lm_head.weight', 'model.layers.0.self_attn.k_proj.weight']" in message
    assert "unexpected tensors ['model.layers.0.extra.weight']" in message


def test_shape_mismatch_and_missing_files_are_clear(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.mlp.up_proj.weight: shard 1 of weight: expected \(128, 64\), got \(3, 64\)",
    ):
        load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        load(path)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors"}})
    )
    with pytest.raises(ValueError, match=r"missing shards: model-1\.safetensors"):
        checkpoint_files(path)
