"""The model registry."""

from __future__ import annotations

import pytest

from engine.models.llama import LlamaForCausalLM
from engine.models.registry import get_model_class, supported_architectures


def test_llama_is_registered() -> None:
    assert get_model_class("LlamaForCausalLM") is LlamaForCausalLM
    assert supported_architectures() == ["LlamaForCausalLM"]


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unsupported model architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"
    ):
        get_model_class("GPT2LMHeadModel")
