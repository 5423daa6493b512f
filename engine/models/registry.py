"""Registry of model implementations by Hugging Face architecture name.

Model modules register their class with :func:`register_model`;
:func:`get_model_class` imports them lazily on first use, so importing the
registry stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from engine.attention import AttentionMetadata

_ModelT = TypeVar("_ModelT", bound=type[nn.Module])

#: Modules whose import registers the built-in architectures.
_BUILTIN_MODULES = (
    "engine.models.llama",
    "engine.models.mistral",
    "engine.models.qwen2",
    "engine.models.qwen3",
)

_REGISTRY: dict[str, type[nn.Module]] = {}


class CausalLM(Protocol):
    """What the runner needs from a registered model (see ``engine.models.llama``)."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden_size]`` of a flattened batch of ``T`` tokens."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab_size]`` of hidden states ``[N, hidden_size]``."""
        ...


def register_model(arch: str) -> Callable[[_ModelT], _ModelT]:
    """Class decorator: serve checkpoints whose ``architectures[0]`` is ``arch``.

    The class is an ``nn.Module`` satisfying :class:`CausalLM`, constructed as
    ``cls(model_config: ModelConfig, attn_backend: AttentionBackend)``, with a
    ``stacked_params`` mapping and a ``tie_weights()`` method for the loader
    (see ``engine.models.loader``).

    Raises:
        ValueError: ``arch`` is already registered to another class.
    """

    def decorator(cls: _ModelT) -> _ModelT:
        existing = _REGISTRY.get(arch)
        if existing is not None and existing is not cls:
            raise ValueError(f"architecture {arch!r} is already registered to {existing.__qualname__}")
        _REGISTRY[arch] = cls
        return cls

    return decorator


def supported_architectures() -> list[str]:
    """Sorted names of every registered architecture."""
    _import_builtins()
    return sorted(_REGISTRY)


def get_model_class(arch: str) -> type[nn.Module]:
    """The class registered for ``arch``.

    Raises:
        ValueError: ``arch`` is not registered; the message lists the supported ones.
    """
    _import_builtins()
    try:
        return _REGISTRY[arch]
    except KeyError:
        supported = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unsupported model architecture {arch!r}; supported: {supported}") from None


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
