"""``engine.LLM`` exactly as issue 3 writes it, over a matrix of checkpoint configurations.

Each configuration is a tiny random-weight checkpoint written by transformers;
``LLM(model=path, dtype="float32", device="cpu")`` must give the greedy token
ids of transformers ``generate`` (float32) for a text prompt and a token-id
prompt in one batch, and the log-probabilities of every prompt position
(``prompt_logprobs``) must equal transformers' log-softmax, which checks the
rotary scaling, biases, norms and head layout position by position.
Further tests cover checkpoint formats (sharded, half-precision, generation
config), the length limit, sampling options and argument errors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.errors import InvalidRequest
from engine.tokenizer import Tokenizer
from tests.helpers.checkpoints import make_tiny_checkpoint

SMALL: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "randomize_norms_and_biases": True}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

#: name -> (architecture, make_tiny_checkpoint arguments)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha-tied": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-theta5e5": ("LlamaForCausalLM", {"num_key_value_heads": 1, "rope_theta": 500000.0}),
    "llama-gqa4-bias": (
        "LlamaForCausalLM",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    ),
    "llama-llama3-rope": (
        "LlamaForCausalLM",
        {"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 8}},
    ),
    "llama-linear-rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 3.0}}),
    "llama-dynamic-rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama-yarn-rope": (
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "mistral-head-dim-mqa-no-window": (
        "MistralForCausalLM",
        {"head_dim": 24, "num_key_value_heads": 1, "sliding_window": None, "vocab_size": 301},
    ),
    "qwen2-window-off-tied": (
        "Qwen2ForCausalLM",
        {"use_sliding_window": False, "sliding_window": 8, "tie_word_embeddings": True, "vocab_size": 333},
    ),
    "qwen2-yarn-rope": (
        "Qwen2ForCausalLM",
        {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}},
    ),
    "qwen3-head-dim-mha": ("Qwen3ForCausalLM", {"head_dim": 16, "num_key_value_heads": 4}),
    "qwen3-gqa4-bias-theta1e6": (
        "Qwen3ForCausalLM",
        {"num_attention_heads": 8, "num_key_value_heads": 2, "attention_bias": True, "rope_theta": 1e6},
    ),
}
TEXT = "Once upon a time there was a little robot"
TOKENS = [0, 7, 120, 33, 250, 8, 99, 41, 17, 3, 200, 150, 5, 60]
MAX_TOKENS = 12


def hf_model(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def hf_log_softmax(model: Any, token_ids: list[int]) -> torch.Tensor:
    """``[len(token_ids), vocab]`` float32 log-probabilities of the next token at each position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, kwargs = CONFIGS[name]
            seed = sorted(CONFIGS).index(name)
            made[name] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(name), arch, seed=seed, **(SMALL | kwargs)
            )
        return made[name]

    return get


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_and_prompt_logprobs_match_hf(checkpoint: Callable[[str], Path], name: str) -> None:
    path = checkpoint(name)
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, prompt_logprobs=2)
    outs = llm.generate([TEXT, TOKENS], params, use_tqdm=False)
    model = hf_model(path)
    tokenizer = Tokenizer.from_pretrained(path)
    assert outs[0].prompt_token_ids == tokenizer.encode(TEXT)
    assert outs[1].prompt_token_ids == TOKENS
    for out in outs:
        completion = out.outputs[0]
        assert completion.token_ids == hf_greedy(model, out.prompt_token_ids, MAX_TOKENS)
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert completion.finish_reason == ("stop" if completion.token_ids[-1] == 1 else "length")
        expected = hf_log_softmax(model, out.prompt_token_ids)
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry is not None
            assert entry.token_id == out.prompt_token_ids[pos]
            assert entry.logprob == pytest.approx(expected[pos - 1, entry.token_id].item(), abs=1e-4)
            assert [t for t, _ in entry.top_logprobs] == expected[pos - 1].topk(2).indices.tolist()


def test_max_position_limit_ends_with_length(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, "Qwen3ForCausalLM", max_position_embeddings=24, **SMALL)
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    near = [0, *range(40, 61)]  # 22 tokens: room for 2 more
    outs = llm.generate([near, near[:20]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    model = hf_model(path)
    assert outs[0].outputs[0].token_ids == hf_greedy(model, near, 2)
    assert outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].token_ids == hf_greedy(model, near[:20], 4)
    assert outs[1].outputs[0].finish_reason == "length"
    with pytest.raises(InvalidRequest, match="prompt"):
        llm.generate([[0, *range(40, 64)]], SamplingParams(max_tokens=1), use_tqdm=False)


def _resave(src: Path, dst: Path, dtype: torch.dtype, **save_kwargs: Any) -> Any:
    """Save ``src``'s model in ``dtype`` (and its tokenizer files) to ``dst``; return the HF model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    model.save_pretrained(dst, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    src = make_tiny_checkpoint(tmp_path / "src", "LlamaForCausalLM", **SMALL)
    dst = tmp_path / "half"
    _resave(src, dst, dtype)
    assert json.loads((dst / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    reference = hf_model(dst)  # float32 upcast of the half-precision weights
    expected = [hf_greedy(reference, p, MAX_TOKENS) for p in (TOKENS, TOKENS[:5])]
    for requested in ("float32", "auto"):
        llm = LLM(model=str(dst), dtype=requested, device="cpu")
        outs = llm.generate([TOKENS, TOKENS[:5]], SamplingParams(max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, requested


def test_sharded_checkpoint(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, "MistralForCausalLM", max_shard_size="40KB", **SMALL)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    out = llm.generate([TOKENS], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model(path), TOKENS, MAX_TOKENS)


def test_eos_lists_and_generation_config(tmp_path: Path) -> None:
    """A generated token listed only in generation_config.json's eos list ends generation, as in HF."""
    path = make_tiny_checkpoint(tmp_path, "Qwen2ForCausalLM", **SMALL)
    model = hf_model(path)
    free_run = hf_greedy(model, TOKENS, MAX_TOKENS)
    stop_id = free_run[4]
    cut = free_run.index(stop_id) + 1
    config = json.loads((path / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=[1])
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": [1, stop_id]})
    )
    model = hf_model(path)
    assert hf_greedy(model, TOKENS, MAX_TOKENS) == free_run[:cut]
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    out = llm.generate(TOKENS, SamplingParams(max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free_run[:cut]
    assert out.finish_reason == "stop"


@pytest.fixture(scope="module")
def llama(checkpoint: Callable[[str], Path]) -> tuple[LLM, Any, Path]:
    path = checkpoint("llama-gqa4-bias")
    return LLM(model=str(path), dtype="float32", device="cpu"), hf_model(path), path


def test_mixed_batch_with_per_prompt_params(llama: tuple[LLM, Any, Path]) -> None:
    llm, model, path = llama
    tokenizer = Tokenizer.from_pretrained(path)
    prompts: list[str | list[int]] = [TEXT, TOKENS, "Hello world.", TOKENS[:3], "The quick brown fox"]
    lengths = [3, 9, 1, 16, 5]
    params = [SamplingParams(max_tokens=n) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out, n in zip(prompts, outs, lengths, strict=True):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(model, ids, n)


def test_generated_logprobs_match_hf(llama: tuple[LLM, Any, Path]) -> None:
    llm, model, _ = llama
    out = llm.generate(TOKENS, SamplingParams(max_tokens=6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    expected = hf_log_softmax(model, TOKENS + out.token_ids)[len(TOKENS) - 1 : -1]
    for entry, token, row in zip(out.logprobs, out.token_ids, expected, strict=True):
        assert entry.token_id == token == row.argmax().item()
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top_ids, top_lps = zip(*entry.top_logprobs, strict=True)
        assert list(top_ids) == row.topk(3).indices.tolist()
        assert torch.allclose(torch.tensor(top_lps), row.topk(3).values, atol=1e-4)


def test_stop_string_and_stop_token(llama: tuple[LLM, Any, Path]) -> None:
    llm, model, path = llama
    tokenizer = Tokenizer.from_pretrained(path)
    free = llm.generate(TOKENS, SamplingParams(max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    text = free.text
    stop = next(
        text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2].strip() and text[i] != "\ufffd"
    )
    cut = llm.generate(TOKENS, SamplingParams(max_tokens=MAX_TOKENS, stop=[stop]), use_tqdm=False)[0].outputs[
        0
    ]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids)
    stop_id = free.token_ids[5]
    by_id = llm.generate(
        TOKENS, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=[stop_id]), use_tqdm=False
    )
    assert by_id[0].outputs[0].token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert by_id[0].outputs[0].finish_reason == "stop"
    assert free.token_ids == hf_greedy(model, TOKENS, MAX_TOKENS)


def test_seeded_n3_reproducible_with_min_p_and_penalties(llama: tuple[LLM, Any, Path]) -> None:
    llm, _, _ = llama
    params = SamplingParams(
        max_tokens=8, temperature=1.0, n=3, seed=7, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3
    )
    alone = llm.generate(TOKENS, params, use_tqdm=False)[0]
    crowded = llm.generate([TEXT, TOKENS, TOKENS[:4]], [SamplingParams(max_tokens=5), params, params])
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    assert [c.token_ids for c in crowded[1].outputs] == [c.token_ids for c in alone.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1
    assert all(
        len(c.token_ids) == 8 and c.finish_reason == "length" for c in alone.outputs if 1 not in c.token_ids
    )


def test_repetition_penalty_matches_hf(llama: tuple[LLM, Any, Path]) -> None:
    llm, model, _ = llama
    out = llm.generate(TOKENS, SamplingParams(max_tokens=10, repetition_penalty=1.8), use_tqdm=False)[0]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([TOKENS]), do_sample=False, max_new_tokens=10, repetition_penalty=1.8
        )
    assert out.outputs[0].token_ids == ref[0, len(TOKENS) :].tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "dtype 'float64'"),
        ({"dtype": "fp32"}, "dtype 'fp32'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"device": "cuda:abc"}, "device 'cuda:abc'"),
        ({"load_format": "pt"}, "load_format 'pt'"),
        ({"max_model_len": 10_000}, "max_model_len 10000"),
    ],
)
def test_bad_arguments_are_value_errors(
    checkpoint: Callable[[str], Path], kwargs: dict[str, Any], match: str
) -> None:
    options: dict[str, Any] = {"dtype": "float32", "device": "cpu"} | kwargs
    with pytest.raises(ValueError, match=match):
        LLM(model=str(checkpoint("llama-mha-tied")), **options)


def test_missing_checkpoint_pieces_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no config\.json"):
        LLM(model=str(tmp_path / "nowhere"), dtype="float32", device="cpu")
    path = make_tiny_checkpoint(tmp_path / "ckpt", "LlamaForCausalLM", **SMALL)
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        LLM(model=str(path), dtype="float32", device="cpu")
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(model=str(path), dtype="float32", device="cpu")


def test_device_cuda_without_cuda_is_a_value_error(checkpoint: Callable[[str], Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
        LLM(model=str(checkpoint("llama-mha-tied")), dtype="float32", device="cuda")


def _edit_config(path: Path, **fields: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_qwen2_window_without_use_sliding_window_is_off(tmp_path: Path) -> None:
    """A hand-written Qwen2 config.json without ``use_sliding_window`` means no window (transformers'
    default); 26 tokens run past the 8-token window and match transformers."""
    path = make_tiny_checkpoint(tmp_path, "Qwen2ForCausalLM", max_position_embeddings=64, **SMALL)
    _edit_config(path, use_sliding_window=None, layer_types=None, max_window_layers=None, sliding_window=8)
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    assert llm.max_model_len == 64
    out = llm.generate(TOKENS, SamplingParams(max_tokens=MAX_TOKENS), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(hf_model(path), TOKENS, MAX_TOKENS)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0]}},
            r"rope_scaling rope_type 'longrope'.*supported: default, dynamic, linear, llama3, yarn",
        ),
    ],
)
def test_unsupported_config_names_the_field(tmp_path: Path, fields: dict[str, Any], match: str) -> None:
    path = make_tiny_checkpoint(tmp_path, "LlamaForCausalLM", **SMALL)
    _edit_config(path, **fields)
    with pytest.raises(ValueError, match=match):
        LLM(model=str(path), dtype="float32", device="cpu")


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "truncate": False},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 16.0},
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 128,
            "attention_factor": 1.3,
        },
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "linear", "factor": 2.5},
        {**LLAMA3, "original_max_position_embeddings": 256},
    ],
)
def test_rope_frequencies_match_transformers(rope_parameters: dict[str, Any]) -> None:
    """Inverse frequencies and cos/sin scale equal transformers' at init (head_dim 64, theta 1e6)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.models.rope import rope_attention_factor, rope_inv_freq

    config = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        max_position_embeddings=2048,
        rope_parameters={**rope_parameters, "rope_theta": 1e6},
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu")
    scaling = {k: v for k, v in dict(config.rope_parameters or {}).items() if k != "rope_theta"}
    torch.testing.assert_close(rope_inv_freq(64, 1e6, scaling), inv_freq.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(factor)
