"""Build a registered model and fill it from safetensors weights.

Weights come from ``model.safetensors`` or from the shards listed in
``model.safetensors.index.json``. The model is first built on the meta device
(no memory, no random init), given its dtype, materialised empty on the target
device and then filled tensor by tensor, so peak memory is one copy of the
weights plus one checkpoint tensor.

Checkpoint names follow Hugging Face; a model maps fused parameters through its
``stacked_params`` (checkpoint projection -> (our module, shard index)), e.g.
``...self_attn.k_proj.weight`` fills shard 1 of ``...self_attn.qkv_proj.weight``.

Load formats: ``"auto"`` and ``"safetensors"`` read the checkpoint as above;
``"dummy"`` reads nothing but config.json and fills every parameter with
seeded random values (:func:`init_dummy_weights`), for benchmarks of shapes
whose weights are not at hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
from safetensors import safe_open

from engine.attention import AttentionBackend, torch_dtype
from engine.config import ModelConfig
from engine.models.registry import CausalLM, get_model_class

#: Checkpoint tensors that are derived, not learned, and never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Target = tuple[str, int | None]  # (our parameter name, shard index or None)

#: Accepted ``load_format`` values.
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order.

    Raises:
        ValueError: neither ``model.safetensors.index.json`` nor
            ``model.safetensors`` exists, or a listed shard is missing.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists missing shards: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_model(
    model_config: ModelConfig,
    dtype: str,
    device: torch.device | str,
    attn_backend: AttentionBackend,
    *,
    load_format: str = "auto",
    seed: int = 0,
) -> CausalLM:
    """The registered model for ``model_config.architecture`` with its weights, in eval mode.

    Args:
        model_config: the checkpoint's configuration (``path`` holds the weights).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; weights are cast to it.
        device: where the weights live.
        attn_backend: attention implementation handed to the model.
        load_format: one of :data:`LOAD_FORMATS`; ``"dummy"`` opens no weight file.
        seed: seed of the ``"dummy"`` weights (ignored otherwise).

    Raises:
        ValueError: unsupported architecture, dtype or load format, missing
            weight files, missing, unexpected or mis-shaped tensors.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load_format {load_format!r}; supported: {', '.join(LOAD_FORMATS)}")
    model_cls = get_model_class(model_config.architecture)
    with torch.device("meta"):
        model = model_cls(model_config, attn_backend)
    model = model.to(dtype=torch_dtype(dtype)).to_empty(device=device)
    model.tie_weights()  # type: ignore[operator]  # to_empty unties shared parameters
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, model_config)
    return cast(CausalLM, model.eval())


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Fill every parameter of ``model`` with deterministic random values, in place.

    Matrices (embeddings, projections, LM head) are drawn from
    ``N(0, 1 / fan_in)`` with ``fan_in = shape[-1]`` (LeCun-normal scaling:
    LeCun et al., 1998, "Efficient BackProp"), which keeps activations and
    logits near unit scale at any width so sampling does not degenerate;
    1-D weights (RMSNorm scales) are 1 and biases 0. Each tensor is drawn on
    its own device by a generator seeded from ``sha256(f"{seed}:{name}")``, so
    the values depend on the seed, the parameter name, the device type and
    the dtype only: every worker with the same seed holds the same weights,
    whatever order or process loads them. Shared (tied) parameters are filled once.
    """
    for name, param in model.named_parameters():
        data = param.data
        if name.endswith(".bias"):
            data.zero_()
        elif data.dim() == 1:
            data.fill_(1.0)
        else:
            generator = torch.Generator(device=data.device)
            generator.manual_seed(_dummy_seed(seed, name))
            data.normal_(0.0, data.shape[-1] ** -0.5, generator=generator)


def _dummy_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def load_weights(model: nn.Module, model_config: ModelConfig) -> None:
    """Copy every checkpoint tensor into ``model`` (casting dtype, moving device).

    With ``tie_word_embeddings`` the LM head shares the embedding and a
    checkpoint ``lm_head.weight``, if present, is skipped.

    Raises:
        ValueError: a parameter has no checkpoint tensor, a checkpoint tensor
            has no parameter, or shapes differ; the message lists the names.
    """
    stacked: dict[str, tuple[str, int]] = getattr(model, "stacked_params", {})
    params = dict(model.named_parameters())
    loaded: set[Target] = set()
    unexpected: list[str] = []
    for hf_name, tensor in _checkpoint_tensors(checkpoint_files(model_config.path)):
        if hf_name.endswith(_IGNORED_SUFFIXES) or (
            model_config.tie_word_embeddings and hf_name == "lm_head.weight"
        ):
            continue
        name, shard = target = _map_name(hf_name, stacked)
        if name not in params:
            unexpected.append(hf_name)
            continue
        if shard is None:
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"{hf_name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            param.data.copy_(tensor)
        else:
            module_name, _, param_name = name.rpartition(".")
            try:
                model.get_submodule(module_name).load_shard(param_name, shard, tensor)  # type: ignore[operator]
            except ValueError as exc:
                raise ValueError(f"{hf_name}: {exc}") from exc
        loaded.add(target)
    missing = sorted(_hf_name(t, stacked) for t in _expected_targets(params, stacked) - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_config.path} does not match {type(model).__name__}: "
            f"missing tensors {missing}, unexpected tensors {sorted(unexpected)}"
        )


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _map_name(hf_name: str, stacked: dict[str, tuple[str, int]]) -> Target:
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part in stacked:
            fused, shard = stacked[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), shard
    return hf_name, None


def _hf_name(target: Target, stacked: dict[str, tuple[str, int]]) -> str:
    name, shard = target
    if shard is None:
        return name
    parts = name.split(".")
    for hf_part, (fused, index) in stacked.items():
        if index == shard and fused in parts:
            return ".".join(hf_part if p == fused else p for p in parts)
    raise AssertionError(f"no checkpoint name for {target}")


def _expected_targets(params: dict[str, nn.Parameter], stacked: dict[str, tuple[str, int]]) -> set[Target]:
    shards: dict[str, set[int]] = {}
    for fused, index in stacked.values():
        shards.setdefault(fused, set()).add(index)
    expected: set[Target] = set()
    for name in params:
        fused_parts = [p for p in name.split(".") if p in shards]
        if fused_parts:
            expected.update((name, index) for index in shards[fused_parts[0]])
        else:
            expected.add((name, None))
    return expected
