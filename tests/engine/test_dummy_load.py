"""``load_format="dummy"``: seeded random weights from config.json alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

import engine.models.loader as loader
from engine.attention import get_attention_backend
from engine.config import ModelConfig
from engine.llm import LLM
from engine.models.loader import load_model
from engine.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_tiny_checkpoint

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2 checkpoint (biases, tied head) stripped to its config and tokenizer."""
    full = make_tiny_checkpoint(tmp_path_factory.mktemp("full"), "Qwen2ForCausalLM", tie_word_embeddings=True)
    stripped = tmp_path_factory.mktemp("config-only")
    for name in CONFIG_FILES:
        shutil.copy(full / name, stripped / name)
    return stripped


@pytest.fixture
def no_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a safetensors file was opened")

    monkeypatch.setattr(loader, "safe_open", refuse)


def dummy_state(path: Path, seed: int, dtype: str = "float32") -> dict[str, torch.Tensor]:
    model = load_model(
        ModelConfig.from_pretrained(path),
        dtype,
        "cpu",
        get_attention_backend(),
        load_format="dummy",
        seed=seed,
    )
    return {name: p.detach().clone() for name, p in model.named_parameters()}  # type: ignore[attr-defined]


def test_same_seed_same_weights_other_seed_other_weights(config_only: Path, no_safetensors: None) -> None:
    first, again, other = (
        dummy_state(config_only, 0),
        dummy_state(config_only, 0),
        dummy_state(config_only, 1),
    )
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    matrices = [name for name, t in first.items() if t.dim() == 2]
    assert len(matrices) == 1 + 2 * 4  # embedding (tied to the head); qkv, o, gate_up, down per layer
    assert not any(torch.equal(first[name], other[name]) for name in matrices)


def test_dummy_weights_are_scaled_per_tensor(config_only: Path, no_safetensors: None) -> None:
    state = dummy_state(config_only, 0)
    qkv = state["model.layers.0.self_attn.qkv_proj.weight"]
    down = state["model.layers.1.mlp.down_proj.weight"]
    assert abs(qkv.std().item() * 64**0.5 - 1) < 0.05  # N(0, 1 / fan_in), fan_in = hidden_size 64
    assert abs(down.std().item() * 128**0.5 - 1) < 0.05  # fan_in = intermediate_size 128
    assert torch.equal(state["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(state["model.layers.0.self_attn.qkv_proj.bias"], torch.zeros(128))
    # Every tensor draws from its own generator: equal shapes still get different values.
    assert not torch.equal(qkv, state["model.layers.1.self_attn.qkv_proj.weight"])
    bf16 = dummy_state(config_only, 0, "bfloat16")
    assert bf16["model.norm.weight"].dtype == torch.bfloat16


def test_llm_generates_from_a_config_only_directory(config_only: Path, no_safetensors: None) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = LLM(config_only, dtype="float32", device="cpu", load_format="dummy", seed=3)
    second = LLM(config_only, dtype="float32", device="cpu", load_format="dummy", seed=3)
    out_a = first.generate(["Once upon a time", [0, 7, 9]], params, use_tqdm=False)
    out_b = second.generate(["Once upon a time", [0, 7, 9]], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in out_a]
    assert tokens == [o.outputs[0].token_ids for o in out_b]
    assert all(len(set(t)) > 2 for t in tokens)  # not a degenerate repeat of one token


def test_load_format_errors(config_only: Path) -> None:
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        LLM(config_only, device="cpu", load_format="safetensors")
    with pytest.raises(ValueError, match="unsupported load_format 'pt'; supported: auto, safetensors, dummy"):
        LLM(config_only, device="cpu", load_format="pt")


def test_a_worker_holds_the_same_dummy_weights_as_llm(config_only: Path, no_safetensors: None) -> None:
    from engine.worker_config import WorkerConfig
    from engine.worker_runtime import build_runtime

    async def worker_state() -> dict[str, torch.Tensor]:
        config = WorkerConfig(role="prefill", model=config_only, device="cpu", load_format="dummy", seed=5)
        runtime = build_runtime(config)
        try:
            return {n: p.detach().clone() for n, p in runtime.runner.model.named_parameters()}  # type: ignore[attr-defined]
        finally:
            runtime.loop.stop()

    state = asyncio.run(worker_state())
    llm = LLM(config_only, device="cpu", load_format="dummy", seed=5)
    expected = dict(llm.runner.model.named_parameters())  # type: ignore[attr-defined]
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in state)
