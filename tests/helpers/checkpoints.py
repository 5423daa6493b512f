"""Tiny random-weight checkpoints for tests.

:func:`make_tiny_checkpoint` (Llama, Mistral, Qwen2, Qwen3; :func:`make_tiny_llama`
for Llama) writes a complete Hugging Face checkpoint directory
(``config.json``, ``generation_config.json``, safetensors weights, and a real
byte-level BPE ``tokenizer.json``) small enough to build in well under a second
once ``transformers`` is imported. Everything is deterministic: the weights come
from ``torch.manual_seed(seed)`` and the tokenizer is trained on the fixed text
:data:`TRAINING_TEXT`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Beginning-of-sequence token; id 0 in every tiny tokenizer.
BOS_TOKEN = "<s>"
#: End-of-sequence token; id 1 in every tiny tokenizer.
EOS_TOKEN = "</s>"

#: Fixed English text the tiny tokenizers are trained on (written for Tandem's tests).
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the porch.
A small model can still tell a story: once upon a time there was a little robot who
wanted to learn how to paint the sky. Every morning it rolled down to the river, looked
at the clouds, and mixed blue, white and a touch of gold on its tiny wooden palette.
Servers answer requests; workers compute prefill and decode steps; the router decides
where each prompt should go. Blocks of keys and values move between machines quickly.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and 65536 appear in logs and tables.
Questions? Answers! Commas, periods; colons: quotes "like this" and 'like that' too.
In the garden, tomatoes, beans, carrots and sunflowers grew taller than the fence.
Children laughed, dogs barked, and the old clock in the hall struck twelve at noon.
Mountains rise above valleys where rivers carve paths through stone over many years.
Scientists measure temperature, pressure, and humidity to forecast tomorrow's weather.
She opened the book, read the first chapter twice, and then wrote a letter to her friend.
Trains leave the station every hour; passengers carry bags, coffee, and newspapers.
Computers store information as bits, bytes, words, pages, files and whole databases.
The chef chopped onions, garlic, and peppers before adding them to the hot iron pan.
Music filled the theater as the orchestra played a gentle melody for the audience.
We walked along the beach, collecting shells, watching waves, and counting seagulls.
Hello world. Good morning. Thank you very much. Please wait here. See you later!
"""


def _train_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE with ``<s>`` = 0 and ``</s>`` = 1, exactly ``vocab_size`` tokens.

    When the training text yields fewer merges than needed, reserved special
    tokens ``<|reserved_N|>`` fill the vocabulary up to ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus specials")
    tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


#: Architectures :func:`make_tiny_checkpoint` builds, with their transformers ``model_type``.
MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def make_tiny_llama(out_dir: Path, **kwargs: Any) -> Path:
    """A tiny ``LlamaForCausalLM`` checkpoint (see :func:`make_tiny_checkpoint`)."""
    return make_tiny_checkpoint(out_dir, "LlamaForCausalLM", **kwargs)


def make_tiny_checkpoint(
    out_dir: Path,
    arch: str = "LlamaForCausalLM",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 256,
    max_shard_size: str | int | None = None,
    initializer_range: float = 0.2,
    randomize_norms_and_biases: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of ``arch`` (a :data:`MODEL_TYPES` key) with a real tokenizer.

    Args:
        out_dir: directory to create (parents too) and fill.
        arch: transformers architecture class name.
        seed: ``torch.manual_seed`` of the weight initialisation.
        vocab_size: tokens in both the model and the tokenizer (>= 258).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, tie_word_embeddings, rope_theta,
        max_position_embeddings: the config fields of the same name
            (``head_dim`` ``None`` keeps the architecture's default).
        rope_scaling: e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``.
        initializer_range: std of the random weights; larger than Llama's 0.02
            so greedy outputs vary and top logits sit far from ties.
        randomize_norms_and_biases: replace the initial RMSNorm scales (1) by
            ``1 + N(0, 0.2)`` and biases (0) by ``N(0, initializer_range)``, so
            a misplaced norm or bias changes the outputs.
        max_shard_size: shard the safetensors weights (e.g. ``"20KB"``) and
            write ``model.safetensors.index.json``; ``None`` writes one file.
        **overrides: further config fields.

    Returns:
        ``out_dir``. Weights are float32, ``<s>`` (id 0) is bos and ``</s>``
        (id 1) is eos in the config, the generation config and the tokenizer.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)

    config_kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        **overrides,
    )
    if head_dim is not None:
        config_kwargs["head_dim"] = head_dim
    config = transformers.AutoConfig.for_model(MODEL_TYPES[arch], **config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    if randomize_norms_and_biases:
        _randomize_norms_and_biases(model, initializer_range)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    fast.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    return out_dir


def _randomize_norms_and_biases(model: Any, bias_std: float) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, bias_std)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))


def _portable_tokenizer_class(path: Path) -> None:
    """Name the class every transformers release knows (5.x writes ``TokenizersBackend``)."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")
