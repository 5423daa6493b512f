"""The model registry."""

from __future__ import annotations

import pytest

from engine.models.llama import LlamaForCausalLM
from engine.models.mistral import MistralForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3Attention, Qwen3ForCausalLM
from engine.models.registry import get_model_class, register_model, supported_architectures

SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"


def test_builtin_architectures_are_registered() -> None:
    assert get_model_class("LlamaForCausalLM") is LlamaForCausalLM
    assert get_model_class("MistralForCausalLM") is MistralForCausalLM
    assert get_model_class("Qwen2ForCausalLM") is Qwen2ForCausalLM
    assert get_model_class("Qwen3ForCausalLM") is Qwen3ForCausalLM
    assert Qwen3ForCausalLM.attention_cls is Qwen3Attention
    assert ", ".join(supported_architectures()) == SUPPORTED


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(
        ValueError, match=rf"unsupported model architecture 'GPT2LMHeadModel'; supported: {SUPPORTED}$"
    ):
        get_model_class("GPT2LMHeadModel")


def test_an_architecture_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="'Qwen2ForCausalLM' is already registered to Qwen2ForCausalLM"):
        register_model("Qwen2ForCausalLM")(MistralForCausalLM)
