"""OpenTelemetry tracing of one Tandem process (torch-free).

Lifecycle:
  1. the CLI builds a :class:`TracingConfig` from its flags and the standard
     ``OTEL_*`` environment variables (a flag wins over its variable) and calls
     :func:`setup_tracing` once, before any server or channel exists;
  2. when tracing is on, that installs an SDK ``TracerProvider`` (resource:
     ``service.name``, ``service.instance.id``, ``tandem.role`` and
     ``OTEL_RESOURCE_ATTRIBUTES``; sampler; batch exporter: OTLP over gRPC or
     HTTP, or the console), adds :class:`ClientSpanInterceptor`s to every
     ``grpc.aio`` channel created afterwards (a CLIENT span per call, W3C
     ``traceparent`` injected into the call metadata) and makes
     :func:`server_interceptors` return OpenTelemetry's aio server interceptor
     (``traceparent`` extracted, so a caller's trace continues); health checks
     and reflection are never traced;
  3. services open child spans with :func:`span` and set attributes on them
     (``rpc.*`` by the interceptors, ``gen_ai.*`` and ``tandem.*`` by Tandem);
  4. at exit the provider flushes its queue (``shutdown_on_exit``).

Tracing off (no exporter; the default unless an OTLP endpoint or an exporter is
named) installs nothing: :func:`span` does nothing, :func:`tracer` is the API's
no-op tracer and no interceptor runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: Attribute names (OpenTelemetry semantic conventions, gen_ai.* and rpc.*).
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"

#: Methods never traced (health checks every half second would drown the traces).
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_state: dict[str, bool] = {"enabled": False}


@dataclass(frozen=True)
class TracingConfig:
    """Resolved tracing settings.

    Attributes:
        exporter: ``otlp``, ``console`` or ``none`` (tracing off).
        endpoint: OTLP endpoint, e.g. ``http://127.0.0.1:4317`` (gRPC) or
            ``http://127.0.0.1:4318`` (HTTP; ``/v1/traces`` is appended);
            ``None`` lets the exporter use its default.
        protocol: ``grpc`` or ``http/protobuf``.
        service_name: ``service.name``; ``None`` keeps ``OTEL_SERVICE_NAME`` /
            ``OTEL_RESOURCE_ATTRIBUTES``, else ``tandem-<role>``.
        sampler: an ``OTEL_TRACES_SAMPLER`` name (ratio from
            ``OTEL_TRACES_SAMPLER_ARG``); ``None``: parent-based always-on.
    """

    exporter: str = "none"
    endpoint: str | None = None
    protocol: str = "grpc"
    service_name: str | None = None
    sampler: str | None = None

    @property
    def enabled(self) -> bool:
        return self.exporter != "none"

    @classmethod
    def resolve(
        cls,
        *,
        exporter: str | None = None,
        endpoint: str | None = None,
        protocol: str | None = None,
        service_name: str | None = None,
        sampler: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TracingConfig:
        """Flags (arguments that are not ``None``) over ``OTEL_*`` variables of ``env``.

        The exporter defaults to ``otlp`` when an endpoint is known, else ``none``.

        Raises:
            ValueError: an unknown exporter, protocol or sampler.
        """
        env = os.environ if env is None else env
        endpoint = (
            endpoint
            or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        )
        exporter = (exporter or env.get("OTEL_TRACES_EXPORTER") or ("otlp" if endpoint else "none")).lower()
        protocol = (
            protocol
            or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        ).lower()
        sampler = (sampler or env.get("OTEL_TRACES_SAMPLER") or "").lower() or None
        for value, allowed, what in (
            (exporter, EXPORTERS, "traces exporter"),
            (protocol, PROTOCOLS, "OTLP protocol"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r} (one of {', '.join(allowed)})")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"unknown traces sampler {sampler!r} (one of {', '.join(SAMPLERS)})")
        return cls(exporter, endpoint, protocol, service_name or env.get("OTEL_SERVICE_NAME"), sampler)


def setup_tracing(config: TracingConfig, *, role: str, instance_id: str) -> bool:
    """Install tracing for this process as described in the module docstring.

    Args:
        role: ``router``, ``prefill`` or ``decode`` (``tandem.role``; default
            service name ``tandem-<role>``).
        instance_id: ``service.instance.id`` (the worker id).

    Returns:
        Whether tracing is on.
    """
    if not config.enabled:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"service.instance.id": instance_id, "tandem.role": role}
    if config.service_name:
        attributes[SERVICE_NAME] = config.service_name
    resource = Resource.create(attributes)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"tandem-{role}"}))
    provider = TracerProvider(resource=resource, sampler=_sampler(config.sampler))
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    trace.set_tracer_provider(provider)
    _add_channel_interceptors(ClientSpanInterceptor.for_every_kind(trace.get_tracer("tandem.grpc")))
    _state["enabled"] = True
    logger.info(
        "tracing on: %s exporter%s, service %s",
        config.exporter,
        f" {config.protocol} to {config.endpoint}" if config.exporter == "otlp" else "",
        resource.attributes[SERVICE_NAME],
    )
    return True


def tracing_enabled() -> bool:
    """Whether :func:`setup_tracing` turned tracing on in this process."""
    return _state["enabled"]


def server_interceptors() -> list[Any]:
    """Interceptors for a ``grpc.aio`` server: the OpenTelemetry one when tracing is on, else none."""
    if not _state["enabled"]:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=lambda details: not details.method.startswith(UNTRACED_PREFIXES))]


class _NoSpan:
    """What :func:`span` gives while tracing is off: a block under the invalid (no-op) span."""

    def __enter__(self) -> trace.Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str) -> AbstractContextManager[trace.Span]:
    """A child of the current span, current while the block runs; the block gets the span
    (exceptions are recorded on it). While tracing is off: nothing at all."""
    if not _state["enabled"]:
        return _NO_SPAN
    return tracer().start_as_current_span(name)


@functools.cache
def tracer() -> trace.Tracer:
    """Tandem's tracer: the API's proxy, a no-op until :func:`setup_tracing` installs a provider."""
    return trace.get_tracer("tandem")


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or ``None`` outside a sampled trace."""
    ctx = trace.get_current_span().get_span_context()
    return trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None


def annotate_request(*, model: str, request_id: str, max_tokens: int, input_tokens: int) -> None:
    """Set the ``gen_ai.*`` request attributes on the current span (the RPC's server span)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                GEN_AI_SYSTEM: "tandem",
                GEN_AI_OPERATION_NAME: "text_completion",
                GEN_AI_REQUEST_MODEL: model,
                GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
                GEN_AI_RESPONSE_ID: request_id,
                GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
            }
        )


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set ``tandem.<key>`` attributes on the current span (nothing while it does not record)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"tandem.{k}": v for k, v in attributes.items()})


def annotate_result(*, output_tokens: int, finish_reason: str | None, **extra: Any) -> None:
    """Set the ``gen_ai.*`` result attributes (and ``extra`` ``tandem.*`` ones) on the current span."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute(GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
    if finish_reason is not None:
        span.set_attribute(GEN_AI_RESPONSE_FINISH_REASONS, [finish_reason])
    annotate(extra)


def annotate_phases(event: str, seconds: Mapping[str, float]) -> None:
    """Record a request's phase durations on the current span: a ``tandem.phase.<name>_s``
    attribute per entry of ``seconds`` (seconds) and one event ``event`` carrying the same
    attributes, stamped now (nothing while the span does not record).

    The router calls it when the first token is known (``tandem.first_token``: queue,
    prefill, KV transfer) and when the decode worker's first message arrives
    (``tandem.first_decode``).
    """
    span = trace.get_current_span()
    if not span.is_recording():
        return
    attributes = {f"tandem.phase.{name}_s": value for name, value in seconds.items()}
    span.set_attributes(attributes)
    span.add_event(event, attributes)


def transfer_attributes(backend: str, num_bytes: int, num_blocks: int, seconds: float) -> dict[str, Any]:
    """Attributes of a KV transfer span: bytes, blocks, backend, seconds and GB/s (10^9 bytes/s)."""
    return {
        "tandem.kv.backend": backend,
        "tandem.kv.bytes": num_bytes,
        "tandem.kv.blocks": num_blocks,
        "tandem.kv.seconds": seconds,
        "tandem.kv.gbps": num_bytes / seconds / 1e9 if seconds > 0 else 0.0,
    }


def _sampler(name: str | None) -> Any:
    from opentelemetry.sdk.trace import sampling

    if name is None:
        return sampling.ParentBased(sampling.ALWAYS_ON)
    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    base = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return sampling.ParentBased(base) if name.startswith("parentbased_") else base


def _exporter(config: TracingConfig) -> Any:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    endpoint = config.endpoint
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    """Writes propagation headers into ``grpc.aio.Metadata``."""

    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier[key] = value


class ClientSpanInterceptor:
    """A CLIENT span per ``grpc.aio`` call (``rpc.system``, ``rpc.service``, ``rpc.method``,
    ``rpc.grpc.status_code``), its context injected into the call's metadata.

    The span ends when the call ends, whoever ends it (completion, cancellation,
    deadline), so a stream the caller stops reading early still closes its span.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    def for_every_kind(cls, tracer: trace.Tracer) -> list[grpc.aio.ClientInterceptor]:
        """One interceptor per call kind Tandem uses (unary-unary, unary-stream), sharing ``tracer``."""
        return [_UnaryUnarySpan(tracer), _UnaryStreamSpan(tracer)]

    async def _intercept(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        if method.startswith(UNTRACED_PREFIXES):
            return await continuation(details, request)
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_MetadataSetter())
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        task = asyncio.get_running_loop().create_task(self._end_with(span, call))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return call

    @staticmethod
    async def _end_with(span: trace.Span, call: Any) -> None:
        try:
            code = await call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):  # the caller's cancel is no error
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        span.end()


class _UnaryUnarySpan(ClientSpanInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStreamSpan(ClientSpanInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


def _add_channel_interceptors(interceptors: list[grpc.aio.ClientInterceptor]) -> None:
    """Put ``interceptors`` first on every ``grpc.aio`` channel created from now on."""

    def wrap(factory: Callable[..., grpc.aio.Channel]) -> Callable[..., grpc.aio.Channel]:
        @functools.wraps(factory)
        def channel(*args: Any, **kwargs: Any) -> grpc.aio.Channel:
            kwargs["interceptors"] = [*interceptors, *(kwargs.get("interceptors") or ())]
            return factory(*args, **kwargs)

        return channel

    grpc.aio.insecure_channel = wrap(grpc.aio.insecure_channel)  # type: ignore[assignment]
    grpc.aio.secure_channel = wrap(grpc.aio.secure_channel)  # type: ignore[assignment]
