"""The disaggregated path with both workers on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack, stream_tokens
from tests.e2e.test_disaggregated import hf_greedy
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gpu") / "model", seed=2)


@pytest.fixture(scope="module")
def stack(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(model, tmp_path_factory.mktemp("gstack"), redis_server.url, device="cuda").start()
    yield s
    assert s.stop() == 0


def test_gpu_workers_match_transformers(stack: Stack, model: Path) -> None:
    for n in (7, 33, 64):
        prompt = [(13 * i + n) % 500 + 2 for i in range(n)]
        req = generation_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=32)
        )
        assert stream_tokens(stack.stub, req)[0] == hf_greedy(model, prompt, 32), n
    assert stack.wait_blocks_free() == {p["id"]: 0.0 for p in stack.processes("prefill", "decode")}


@pytest.fixture(scope="module", params=["cuda_ipc", "auto"])
def ipc_stack(
    request: pytest.FixtureRequest, model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Workers on the GPU(s) with the KV moved over CUDA IPC (``auto`` picks it on one host),
    streamed one layer per message (``auto``) or two (``cuda_ipc``)."""
    run_dir = tmp_path_factory.mktemp(f"ipc-{request.param}")
    per_message = "1" if request.param == "auto" else "2"
    flags = ["--kv-transport", request.param, "--kv-transfer-layers-per-message", per_message]
    s = Stack(model, run_dir, redis_server.url, flags, device="cuda").start()
    yield s
    assert s.stop() == 0
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*.log"))
    assert "KV transport cuda_ipc to" in logs  # the prefill worker's handshake chose cuda_ipc


def test_cuda_ipc_workers_match_transformers(ipc_stack: Stack, model: Path) -> None:
    for n in (7, 33, 64):
        prompt = [(11 * i + n) % 500 + 2 for i in range(n)]
        req = generation_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=32)
        )
        assert stream_tokens(ipc_stack.stub, req)[0] == hf_greedy(model, prompt, 32), n
    assert ipc_stack.wait_blocks_free() == {p["id"]: 0.0 for p in ipc_stack.processes("prefill", "decode")}


def test_cuda_ipc_cancels_mid_transfer_free_every_block(ipc_stack: Stack, model: Path) -> None:
    """Cancels at moments from queueing to decoding: every write grant closes (the prefill side
    abandons its stream) and every block on both workers comes back; the stack still matches."""
    sampling = generation_pb2.SamplingParams(max_tokens=64, ignore_eos=True)
    calls = []
    for i, delay in enumerate((0.0, 0.002, 0.005, 0.01, 0.02, 0.05)):
        prompt = [(7 * j + i) % 500 + 2 for j in range(150)]
        call = ipc_stack.stub.GenerateStream(
            generation_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=60
        )
        threading.Timer(delay, call.cancel).start()
        calls.append(call)
    for call in calls:
        try:
            list(call)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED
    used = ipc_stack.wait_blocks_free(timeout_s=20)
    assert used == {p["id"]: 0.0 for p in ipc_stack.processes("prefill", "decode")}
    prompt = [(5 * j) % 500 + 2 for j in range(40)]
    req = generation_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=generation_pb2.SamplingParams(max_tokens=16)
    )
    assert stream_tokens(ipc_stack.stub, req)[0] == hf_greedy(model, prompt, 16)
