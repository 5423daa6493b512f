"""Model configuration read from a checkpoint directory (torch-free).

The router imports this module, so it reads ``config.json`` and
``generation_config.json`` with plain :mod:`json` and never imports torch or
transformers. Both the transformers 4.x (``rope_theta`` + ``rope_scaling``,
``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``) spellings are accepted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Dtype names a worker accepts besides ``"auto"``.
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a decoder-only checkpoint that Tandem uses.

    Attributes:
        path: checkpoint directory.
        name: the directory's name.
        architecture: ``architectures[0]`` of config.json, e.g. ``"LlamaForCausalLM"``.
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
        intermediate_size, max_position_embeddings: as in config.json.
        num_key_value_heads: KV heads (grouped-query attention); defaults to
            ``num_attention_heads``.
        head_dim: per-head size; config's or ``hidden_size // num_attention_heads``.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: rotary base.
        rope_scaling: rotary scaling parameters without ``rope_theta`` (e.g.
            ``{"rope_type": "llama3", "factor": 8.0, ...}``), or ``None``.
        tie_word_embeddings: the LM head shares the embedding matrix.
        attention_bias, mlp_bias: projections carry a bias.
        eos_token_ids: union of config and generation-config end-of-sequence ids.
        bos_token_id: beginning-of-sequence id or ``None``.
        torch_dtype: the checkpoint's dtype name (``"float32"``, ``"bfloat16"``...) or ``None``.
        config_sha256: SHA-256 hex digest of config.json's bytes.
        sliding_window: attention window (tokens) of sliding-window layers
            (Mistral v0.1; Qwen2/Qwen3 with ``use_sliding_window``), or ``None``.
            Sliding-window attention is not implemented: within the window it
            equals full attention, so :func:`resolve_max_model_len` caps the
            sequence length at the window instead.
    """

    path: Path
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None
    config_sha256: str
    sliding_window: int | None = None

    @property
    def model_id(self) -> str:
        """``<name>-<first 12 hex digits of sha256(config.json)>``: names the exact model."""
        return f"{self.name}-{self.config_sha256[:12]}"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``path/config.json`` (and ``path/generation_config.json`` if present).

        Raises:
            ValueError: config.json is missing, is not valid JSON, or lacks a
                required field (the message names the file and the field).
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in model directory {path}")
        raw = config_file.read_bytes()
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        try:
            return cls._from_dicts(path, cfg, gen, hashlib.sha256(raw).hexdigest())
        except KeyError as exc:
            raise ValueError(f"{config_file} lacks required field {exc.args[0]!r}") from exc

    @classmethod
    def _from_dicts(cls, path: Path, cfg: dict[str, Any], gen: dict[str, Any], digest: str) -> ModelConfig:
        architectures = cfg.get("architectures") or []
        if not architectures:
            raise KeyError("architectures")
        heads = int(cfg["num_attention_heads"])
        rope_theta, rope_scaling = _rope_fields(cfg)
        _check_supported(cfg)
        return cls(
            path=path,
            name=path.resolve().name,
            architecture=str(architectures[0]),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id"), gen.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id", gen.get("bos_token_id")),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            config_sha256=digest,
            sliding_window=_sliding_window(cfg),
        )


def _rope_fields(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either config spelling.

    ``rope_scaling`` is ``None`` for plain RoPE (type ``"default"``); its
    ``"type"`` key (older checkpoints) is renamed ``"rope_type"``. As in
    transformers, ``original_max_position_embeddings`` of the scaled types that
    need it defaults to the config's top-level field or ``max_position_embeddings``.
    """
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or _DEFAULT_ROPE_THETA)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    partial = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (only 1.0: rotary over the whole head)"
        )
    if params.get("rope_type", "default") == "default":
        return theta, None
    if params["rope_type"] in ("llama3", "yarn"):
        original = cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", original)
    return theta, params


def _check_supported(cfg: dict[str, Any]) -> None:
    """Reject config fields whose values Tandem's models do not implement (the message names the field)."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu', alias 'swish': SwiGLU)")


#: Architectures whose ``sliding_window`` applies only with ``use_sliding_window``
#: (default false), and then only to layers from ``max_window_layers`` on (as transformers).
_OPT_IN_WINDOW_ARCHS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The active sliding window (tokens), or ``None``.

    Mistral's ``sliding_window`` always applies (``null`` turns it off).
    Qwen2/Qwen3 configs carry a ``sliding_window`` that only applies with
    ``use_sliding_window`` (default false) to layers ``>= max_window_layers``
    (default 28); transformers 5 configs also list ``layer_types``.
    """
    window = cfg.get("sliding_window")
    opt_in = (cfg.get("architectures") or [None])[0] in _OPT_IN_WINDOW_ARCHS
    if window is None or cfg.get("use_sliding_window", not opt_in) is False:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if opt_in and int(cfg["num_hidden_layers"]) <= int(cfg.get("max_window_layers", 28)):
        return None
    return int(window)


def _eos_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    """Sorted union of eos ids given as ints, lists of ints or ``None``."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def resolve_max_model_len(model_config: ModelConfig, requested: int | None) -> int:
    """Longest sequence (prompt plus completion, tokens) a worker accepts.

    Returns ``requested``, or the limit when ``None``. The limit is
    ``max_position_embeddings``, or the ``sliding_window`` when that is smaller
    (sliding-window attention is not implemented; sequences no longer than the
    window attend exactly as the model does).

    Raises:
        ValueError: ``requested`` is < 1 or exceeds the limit.
    """
    limit = model_config.max_position_embeddings
    reason = f"max_position_embeddings of {model_config.name}"
    window = model_config.sliding_window
    if window is not None and window < limit:
        limit = window
        reason = (
            f"sliding_window of {model_config.name}; longer sequences need sliding-window "
            "attention, which Tandem does not implement"
        )
    if requested is None:
        return limit
    if not 1 <= requested <= limit:
        raise ValueError(f"max_model_len {requested} must be in [1, {limit}] ({reason})")
    return requested


def resolve_dtype(requested: str, model_config: ModelConfig, device: str) -> str:
    """Dtype name the model and KV cache use.

    ``"auto"`` is float32 on CPU (half-precision matmuls are slow or missing
    there) and the checkpoint's dtype on CUDA (bfloat16 when the checkpoint
    does not name a supported one). Explicit names pass through.

    Raises:
        ValueError: ``requested`` is not ``"auto"`` or one of :data:`SUPPORTED_DTYPES`.
    """
    if requested != "auto":
        if requested not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(SUPPORTED_DTYPES)}")
        return requested
    if not device.startswith("cuda"):
        return "float32"
    checkpoint = model_config.torch_dtype
    return checkpoint if checkpoint in SUPPORTED_DTYPES else "bfloat16"
