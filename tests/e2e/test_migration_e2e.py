"""``--migrate-on-failure``: a decode worker killed with SIGKILL mid-stream of a greedy
request; the router resumes the request on the other decode worker (prompt plus the
tokens already streamed, prefilled again) and the client's single stream carries
exactly the tokens and text of Hugging Face greedy ``generate``: none repeated, none
skipped. Afterwards no block stays used on the surviving workers.

One prefill and two decode workers of a tiny random Llama, the processes that ``tandem
serve`` would start, under a ``Supervisor`` directly (``tandem serve`` stops the cluster
when a child dies).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.supervisor import Child, Supervisor
from tandem.v1 import generation_pb2, generation_pb2_grpc
from tests.e2e.test_prefill_retry_e2e import metric, start_cluster, wait_idle
from tests.helpers.checkpoints import make_tiny_llama

pytestmark = pytest.mark.e2e

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
MAX_TOKENS = 600


@pytest.fixture
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("migrate-model"), max_position_embeddings=2048)


@pytest.fixture
def cluster(model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    supervisor = start_cluster(
        tmp_path_factory.mktemp("migrate"),
        redis_server.url,
        model,
        *("--prefill-workers", "1", "--decode-workers", "2"),
        *("--routing", "round-robin", "--num-kv-blocks", "256", "--migrate-on-failure"),
    )
    try:
        yield supervisor
    finally:
        supervisor.stop_all()


def hf_greedy(model: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return list(out[0, len(prompt) :].tolist())


def holder(decodes: list[Child]) -> Child:
    """The decode worker running the stream."""
    for child in decodes:
        if metric(child, "tandem_requests_running") == 1.0:
            return child
    raise AssertionError("no decode worker is running the stream")


def test_sigkill_of_a_decode_worker_mid_stream_migrates_the_greedy_stream(
    cluster: Supervisor, model: Path
) -> None:
    expected = hf_greedy(model, PROMPT, MAX_TOKENS)
    assert len(expected) > 100  # long enough to be cut mid-stream (no early EOS)
    router = next(c for c in cluster.children if c.spec.kind == "router")
    decodes = [c for c in cluster.children if c.spec.kind == "decode"]
    (prefill,) = [c for c in cluster.children if c.spec.kind == "prefill"]
    request = generation_pb2.GenerateRequest(
        prompt_token_ids=PROMPT, sampling=generation_pb2.SamplingParams(max_tokens=MAX_TOKENS)
    )
    with grpc.insecure_channel(router.spec.dial_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        undisturbed = list(stub.GenerateStream(request, timeout=60))
        assert [t for m in undisturbed for t in m.token_ids] == expected

        msgs: list[generation_pb2.GenerateStreamResponse] = []
        call = stub.GenerateStream(request, timeout=60)
        while sum(len(m.token_ids) for m in msgs) < 20:
            msgs.append(next(call))
        victim = holder(decodes)
        os.kill(victim.pid, signal.SIGKILL)
        n_before = sum(len(m.token_ids) for m in msgs)
        msgs += list(call)

    ids = [t for m in msgs for t in m.token_ids]
    assert n_before < len(expected)  # the kill came mid-stream
    assert ids == expected
    assert "".join(m.text for m in msgs) == "".join(m.text for m in undisturbed)
    usage = msgs[-1].usage  # the original prompt only
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), len(expected))
    assert msgs[-1].finish_reason == undisturbed[-1].finish_reason
    (survivor,) = [c for c in decodes if c is not victim]
    assert wait_idle([prefill, survivor]) == {prefill.spec.id: 0.0, survivor.spec.id: 0.0}
    assert f"migrating request {msgs[0].request_id} to another decode worker" in router.log.read_text()
