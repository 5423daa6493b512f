"""The Triton attention backend and fused ops give the torch path's greedy tokens.

On a machine without CUDA the kernels run under Triton's CPU interpreter;
``TRITON_INTERPRET`` is set before any kernel module is imported (kernels are
imported lazily, when the backend is built). On CUDA the same test compiles
them and also exercises the CUDA-graph decode path.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the Triton backend needs triton")

import kernels.interpreter_compat
from engine.attention import (
    AttentionMetadata,
    KvCacheSpec,
    get_attention_backend,
    resolve_attention_backend,
)
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.worker_config import BUNDLED_MODEL_DIR

if os.environ.get("TRITON_INTERPRET") == "1":
    kernels.interpreter_compat.enable()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_auto_picks_triton_only_on_cuda() -> None:
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_attention_backend("torch", torch.device("cuda")) == "torch"


def test_triton_backend_matches_torch_on_mixed_batch() -> None:
    """Prefill chunks after a cached prefix, a fresh prompt and a decode row in one step."""
    spec = KvCacheSpec(1, 16, 4, 2, 16, "float32")
    torch_cache, triton_cache = spec.allocate(DEVICE)[0], spec.allocate(DEVICE)[0]
    prefix = torch.randn(2, 16, 4, 2, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch_cache.copy_(prefix)
    triton_cache.copy_(prefix)
    meta = AttentionMetadata.build([6, 0, 9], [5, 3, 1], [[3, 7, 1, 12], [5], [0, 2, 9]], 4, DEVICE)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, h, 16, generator=gen).to(DEVICE) for h in (4, 2, 2))
    outs = []
    for name, cache in (("torch", torch_cache), ("triton", triton_cache)):
        backend = get_attention_backend(name)
        backend.write_kv(cache, k, v, meta)
        outs.append(backend.forward(q, cache, meta, 0.25))
    assert torch.equal(torch_cache, triton_cache)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)


def greedy_tokens(monkeypatch: pytest.MonkeyPatch, ops: str) -> list[list[int]]:
    monkeypatch.setenv("TANDEM_ATTENTION_BACKEND", ops)
    monkeypatch.setenv("TANDEM_FUSED_OPS", ops)
    llm = LLM(model=str(BUNDLED_MODEL_DIR), dtype="float32", device=DEVICE, block_size=4, num_kv_blocks=64)
    assert llm.runner.attention_backend == ops
    assert llm.runner.fused_ops == (ops == "triton")
    prompts = [list(range(5, 24)), [*range(5, 15), 99, 98], [7]]  # shared prefix, one-token prompt
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_triton_engine_gives_torch_greedy_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = greedy_tokens(monkeypatch, "torch")
    assert greedy_tokens(monkeypatch, "triton") == expected
