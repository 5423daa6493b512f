"""Observability end to end through real processes: one OpenTelemetry trace per
request across router, prefill worker and decode worker (exported over OTLP/gRPC
to a receiver on loopback), a caller's ``traceparent`` continued, every
process's ``/metrics`` agreeing with the traffic sent, and one JSON log line per
request without the prompt."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.v1 import generation_pb2
from tests.e2e.stack import Stack
from tests.helpers.checkpoints import make_tiny_llama
from tests.helpers.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

GenerateRequest = generation_pb2.GenerateRequest
SamplingParams = generation_pb2.SamplingParams
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
SECRET_PROMPT = "zebra quartz lantern"  # must never reach a log


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def stack(
    receiver: OtlpReceiver, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    model = make_tiny_llama(tmp_path_factory.mktemp("obs") / "model", seed=3)
    args = ["--otel-exporter-otlp-endpoint", receiver.endpoint, "--log-format", "json"]
    s = Stack(model, tmp_path_factory.mktemp("obs-stack"), redis_server.url, args)
    # Inherited by `tandem serve` and its children: export spans every 100 ms.
    with mock.patch.dict(os.environ, {"OTEL_BSP_SCHEDULE_DELAY": "100"}):
        s.start()
    yield s
    assert s.stop() == 0


def _trace(receiver: OtlpReceiver, trace_id: str | None = None, request_id: str = "") -> list[ReceivedSpan]:
    """The spans of one request's trace, once each process's last span of it arrived (spans
    are exported in the order they end)."""

    def pick(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        roots = [
            s
            for s in spans
            if s.attributes.get("gen_ai.response.id") == request_id and s.service == "tandem-router"
        ]
        tid = trace_id or (roots[0].trace_id if roots else None)
        return [s for s in spans if s.trace_id == tid]

    last_to_end = {
        ("tandem-router", "/tandem.v1.Generation/"),
        ("tandem-prefill", "/tandem.v1.PrefillWorker/Prefill"),
        ("tandem-decode", "/tandem.v1.DecodeWorker/Decode"),
    }

    def complete(spans: list[ReceivedSpan]) -> bool:
        got = {(s.service, s.name) for s in pick(spans) if s.kind == SERVER}
        return all(any(g[0] == svc and g[1].startswith(name) for g in got) for svc, name in last_to_end)

    spans = receiver.wait_for(complete, timeout_s=60.0)
    return pick(spans)


def _one(spans: list[ReceivedSpan], name: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, (name, service, [(s.name, s.service) for s in spans])
    return found[0]


def test_one_trace_spans_router_prefill_and_decode(stack: Stack, receiver: OtlpReceiver) -> None:
    req = GenerateRequest(
        request_id="obs-1",
        prompt_token_ids=list(range(10, 30)),  # 20 tokens: 2 blocks of 16
        sampling=SamplingParams(max_tokens=6, ignore_eos=True),
    )
    reply = stack.stub.Generate(req, timeout=60)
    assert len(reply.token_ids) == 6
    spans = _trace(receiver, request_id="obs-1")
    assert {s.service for s in spans} == {"tandem-router", "tandem-prefill", "tandem-decode"}
    assert not [s for s in spans if "Health" in s.name]

    root = _one(spans, "/tandem.v1.Generation/Generate", "tandem-router")
    assert (root.kind, root.parent_span_id) == (SERVER, "")
    assert {k: root.attributes[k] for k in ("rpc.system", "rpc.service", "rpc.method")} == {
        "rpc.system": "grpc", "rpc.service": "tandem.v1.Generation", "rpc.method": "Generate"}  # fmt: skip
    assert root.attributes["gen_ai.request.model"] == "model"
    assert root.attributes["gen_ai.usage.input_tokens"] == 20
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert root.resource["service.instance.id"] == "router"

    route = _one(spans, "tandem.route", "tandem-router")
    assert route.parent_span_id == root.span_id
    assert route.attributes["tandem.route.prefill_worker"] == "prefill-0"
    assert route.attributes["tandem.route.decode_worker"] == "decode-0"
    assert route.attributes["tandem.route.policy"]  # the router's --routing
    assert route.attributes["tandem.route.cached_prefix_tokens"] == 0  # a prompt never seen before

    # Each worker call: a router client span under the root, the worker's server span under it.
    for method, service in (("DecodeWorker/Reserve", "decode"), ("PrefillWorker/Prefill", "prefill"),
                            ("DecodeWorker/Decode", "decode")):  # fmt: skip
        client = _one(spans, f"/tandem.v1.{method}", "tandem-router")
        server = _one(spans, f"/tandem.v1.{method}", f"tandem-{service}")
        assert (client.kind, client.parent_span_id) == (CLIENT, root.span_id)
        assert (server.kind, server.parent_span_id) == (SERVER, client.span_id)
        assert server.resource["service.instance.id"] == f"{service}-0"

    prefill = _one(spans, "/tandem.v1.PrefillWorker/Prefill", "tandem-prefill")
    for name in ("prefill.queue", "prefill.compute", "kv.transfer"):
        assert _one(spans, name, "tandem-prefill").parent_span_id == prefill.span_id
    compute = _one(spans, "prefill.compute", "tandem-prefill")
    assert compute.attributes["gen_ai.usage.input_tokens"] == 20
    transfer = _one(spans, "kv.transfer", "tandem-prefill").attributes
    assert (transfer["tandem.kv.backend"], transfer["tandem.kv.blocks"]) == ("tcp", 2)
    assert transfer["tandem.kv.bytes"] > 0 and transfer["tandem.kv.gbps"] > 0

    decode = _one(spans, "/tandem.v1.DecodeWorker/Decode", "tandem-decode")
    admission = _one(spans, "decode.admission", "tandem-decode")
    lifetime = _one(spans, "decode.generate", "tandem-decode")
    assert admission.parent_span_id == lifetime.parent_span_id == decode.span_id
    assert admission.attributes["tandem.kv.bytes"] == transfer["tandem.kv.bytes"]
    assert lifetime.attributes["gen_ai.usage.output_tokens"] == 5  # the first token came from prefill
    assert lifetime.attributes["gen_ai.response.finish_reasons"] == ["length"]


def test_callers_traceparent_is_continued(stack: Stack, receiver: OtlpReceiver) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    req = GenerateRequest(
        request_id="obs-2", prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3, ignore_eos=True)
    )
    msgs = list(
        stack.stub.GenerateStream(
            req, timeout=60, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")]
        )
    )
    assert sum(len(m.token_ids) for m in msgs) == 3
    spans = _trace(receiver, trace_id=trace_id)
    root = _one(spans, "/tandem.v1.Generation/GenerateStream", "tandem-router")
    assert root.parent_span_id == parent_id
    assert {s.service for s in spans} == {"tandem-router", "tandem-prefill", "tandem-decode"}


def _scrape(address: str, openmetrics: bool = False) -> str:
    request = urllib.request.Request(f"http://{address}/metrics")
    if openmetrics:
        request.add_header("Accept", "application/openmetrics-text; version=1.0.0; charset=utf-8")
    with urllib.request.urlopen(request, timeout=5) as resp:
        return str(resp.read().decode())


def _samples(stack: Stack) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """``process id -> (sample name, labels) -> value`` for every process of the cluster file."""
    out = {}
    for p in stack.processes():
        text = _scrape(p["metrics_address"])
        out[p["id"]] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
    return out


def test_metrics_of_every_process_agree_with_the_workload(stack: Stack) -> None:
    before = _samples(stack)
    prompts = [list(range(3, 3 + n)) for n in (4, 17, 33)]
    max_tokens = [5, 3, 7]
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        req = GenerateRequest(
            request_id=f"load-{i}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=n, ignore_eos=True),
        )
        assert len(stack.stub.Generate(req, timeout=60).token_ids) == n
    stack.wait_blocks_free()
    after = _samples(stack)

    def delta(pid: str, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[pid].get(key, 0.0) - before[pid].get(key, 0.0)

    sent_prompt, sent_output = sum(map(len, prompts)), sum(max_tokens)
    assert delta("router", "tandem_requests_total", code="OK") == 3
    assert delta("router", "tandem_requests_finished_total", finish_reason="length") == 3
    assert delta("router", "tandem_prompt_tokens_total") == sent_prompt
    assert delta("router", "tandem_generation_tokens_total") == sent_output
    for hist in ("time_to_first_token", "e2e_request_latency", "time_per_output_token", "request_queue"):
        assert delta("router", f"tandem_{hist}_seconds_count") == 3, hist
        assert delta("router", f"tandem_{hist}_seconds_bucket", le="+Inf") == 3, hist
    # One inter-token gap per token after the first.
    assert delta("router", "tandem_inter_token_latency_seconds_count") == sent_output - 3
    assert delta("prefill-0", "tandem_prompt_tokens_total") == sent_prompt
    assert delta("prefill-0", "tandem_kv_transfer_seconds_count", backend="tcp") == 3
    sent_bytes = delta("prefill-0", "tandem_kv_transfer_bytes_total", backend="tcp")
    assert sent_bytes > 0
    assert delta("prefill-0", "tandem_kv_transfer_size_bytes_sum", backend="tcp") == sent_bytes
    assert delta("decode-0", "tandem_kv_transfer_bytes_total", backend="tcp") == sent_bytes
    assert delta("decode-0", "tandem_generation_tokens_total") == sent_output - 3  # token 0 is prefill's
    for pid in ("prefill-0", "decode-0"):
        for gauge in ("tandem_kv_blocks_total", "tandem_batch_size", "tandem_requests_waiting"):
            assert (gauge, ()) in after[pid], (pid, gauge)
    # OpenMetrics, when asked for, carries the requests' trace ids as exemplars.
    om = _scrape(stack.cluster["router"]["metrics_address"], openmetrics=True)
    assert 'tandem_time_to_first_token_seconds_bucket{le="' in om
    assert "# {trace_id=" in om


def test_json_log_line_per_request_without_the_prompt(stack: Stack) -> None:
    req = GenerateRequest(request_id="log-1", prompt=SECRET_PROMPT, sampling=SamplingParams(max_tokens=4))
    reply = stack.stub.Generate(req, timeout=60)
    log = Path(stack.cluster["router"]["log"])
    lines: list[dict[str, Any]] = []
    for _ in range(50):
        text = log.read_text()
        lines = [json.loads(line) for line in text.splitlines() if '"log-1"' in line]
        if lines:
            break
        __import__("time").sleep(0.1)
    assert len(lines) == 1
    line = lines[0]
    assert line["logger"] == "tandem.requests"
    assert line["request_id"] == "log-1" and line["status"] == "OK"
    assert len(line["trace_id"]) == 32
    assert line["prompt_tokens"] == reply.usage.prompt_tokens
    assert line["completion_tokens"] == len(reply.token_ids)
    assert 0 < line["ttft_s"] <= line["e2e_s"]
    assert "prompt" not in line
    for process in stack.processes():
        assert SECRET_PROMPT not in Path(process["log"]).read_text(), process["id"]
