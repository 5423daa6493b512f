"""engine.tracing: configuration from flags and OTEL_* variables, tracing off by
default (no-op tracer, no interceptor), the client span interceptor on a loopback
gRPC server, and a whole process's setup exporting to the console and to OTLP/HTTP."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.tracing import (
    ClientSpanInterceptor,
    TracingConfig,
    current_trace_id,
    server_interceptors,
    setup_tracing,
    span,
    tracer,
    tracing_enabled,
    transfer_attributes,
)

REPO = Path(__file__).resolve().parents[2]


def test_tracing_is_off_without_an_endpoint_or_exporter() -> None:
    config = TracingConfig.resolve(env={})
    assert config == TracingConfig("none", None, "grpc", None, None)
    assert not config.enabled
    assert setup_tracing(config, role="router", instance_id="router") is False
    assert not tracing_enabled()
    assert server_interceptors() == []
    with span("x") as current:
        assert current is trace.INVALID_SPAN
    with tracer().start_as_current_span("x") as current:
        assert not current.is_recording()
        assert current_trace_id() is None


def test_environment_turns_tracing_on_and_flags_win() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    }
    assert TracingConfig.resolve(env=env) == TracingConfig(
        "otlp", "http://127.0.0.1:4317", "http/protobuf", "from-env", "parentbased_traceidratio"
    )
    flags = TracingConfig.resolve(
        exporter="console",
        endpoint="http://127.0.0.1:9999",
        protocol="grpc",
        service_name="from-flag",
        sampler="always_on",
        env=env,
    )
    assert flags == TracingConfig("console", "http://127.0.0.1:9999", "grpc", "from-flag", "always_on")
    assert not TracingConfig.resolve(env={**env, "OTEL_TRACES_EXPORTER": "none"}).enabled
    assert TracingConfig.resolve(exporter="otlp", env={}).endpoint is None  # exporter's default


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_TRACES_SAMPLER": "sometimes"},
    ],
)
def test_unknown_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="unknown"):
        TracingConfig.resolve(env=env)


def test_transfer_attributes_give_gigabytes_per_second() -> None:
    assert transfer_attributes("tcp", 2_000_000, 4, 0.001) == {
        "tandem.kv.backend": "tcp",
        "tandem.kv.bytes": 2_000_000,
        "tandem.kv.blocks": 4,
        "tandem.kv.seconds": 0.001,
        "tandem.kv.gbps": 2.0,
    }


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def _echo_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return dict(context.invocation_metadata()).get("traceparent", "-").encode()


async def _three(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(3):
        yield str(i).encode()
        await asyncio.sleep(0.01)


async def _with_server(body: object) -> None:
    handlers = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo_unary),
            "Three": grpc.unary_stream_rpc_method_handler(_three),
        },
    )
    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(_echo_unary)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers, health))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await body(f"127.0.0.1:{port}")  # type: ignore[operator]
    finally:
        await server.stop(0)


def test_client_spans_carry_rpc_attributes_and_propagate_traceparent(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tp, exporter = provider
    interceptors = ClientSpanInterceptor.for_every_kind(tp.get_tracer("test"))

    async def body(target: str) -> None:
        async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
            with tp.get_tracer("test").start_as_current_span("parent"):
                echoed = await channel.unary_unary("/t.S/Echo")(b"")
                call = channel.unary_stream("/t.S/Three")(b"")
                first = await call.read()  # stop reading after one message, like a stop string
                call.cancel()
                assert await channel.unary_unary("/grpc.health.v1.Health/Check")(b"") == b"-"
            assert first == b"0"
            spans = {s.name: s for s in exporter.get_finished_spans()}
            for _ in range(100):  # the stream's span ends once the call reports its end
                if "/t.S/Three" in spans:
                    break
                await asyncio.sleep(0.01)
                spans = {s.name: s for s in exporter.get_finished_spans()}
            echo, three, parent = spans["/t.S/Echo"], spans["/t.S/Three"], spans["parent"]
            ids = (
                f"{trace.format_trace_id(echo.context.trace_id)}-{trace.format_span_id(echo.context.span_id)}"
            )
            assert echoed.decode()[: -len("01")] == f"00-{ids}-"  # W3C traceparent of the client span
            assert echo.parent is not None and echo.parent.span_id == parent.context.span_id
            assert echo.kind == trace.SpanKind.CLIENT
            assert dict(echo.attributes or {}) == {
                "rpc.system": "grpc", "rpc.service": "t.S", "rpc.method": "Echo", "rpc.grpc.status_code": 0}  # fmt: skip
            assert (three.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
            assert three.status.is_ok  # the caller's own cancel is no error
            assert sorted(spans) == ["/t.S/Echo", "/t.S/Three", "parent"]  # health checks untraced

    asyncio.run(_with_server(body))


def _run_traced_process(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "from engine.tracing import TracingConfig, setup_tracing, tracer\n"
        "assert setup_tracing(TracingConfig.resolve(), role='prefill', instance_id='prefill-7')\n"
        "with tracer().start_as_current_span('unit.span', attributes={'k': 1}):\n"
        "    pass\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_exporter_with_resource_from_the_environment() -> None:
    done = _run_traced_process(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci"}
    )
    assert done.returncode == 0, done.stderr
    span = json.loads(done.stdout)
    assert span["name"] == "unit.span" and span["attributes"] == {"k": 1}
    assert span["resource"]["attributes"]["service.name"] == "tandem-prefill"  # the default
    assert span["resource"]["attributes"]["service.instance.id"] == "prefill-7"
    assert span["resource"]["attributes"]["tandem.role"] == "prefill"
    assert span["resource"]["attributes"]["deployment.environment"] == "ci"


def test_otlp_over_http_reaches_a_collector() -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            received[-1].resource_spans[0].resource.attributes.add(key="path").value.string_value = self.path
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = _run_traced_process(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "svc-http",
            }
        )
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert len(received) == 1
    resource = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
    assert (resource["service.name"], resource["path"]) == ("svc-http", "/v1/traces")
    assert [s.name for s in received[0].resource_spans[0].scope_spans[0].spans] == ["unit.span"]
