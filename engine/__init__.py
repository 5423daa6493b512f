"""Tandem's engine: everything a worker shares, and the offline API.

``from engine import LLM, SamplingParams`` works, but the names are resolved on
first access (PEP 562 module ``__getattr__``), so ``import engine`` and the
torch-free submodules the router uses never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm import LLM, CompletionOutput, RequestOutput
    from engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]

_LAZY_EXPORTS = {
    "LLM": "engine.llm",
    "CompletionOutput": "engine.llm",
    "RequestOutput": "engine.llm",
    "SamplingParams": "engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
