"""engine.logging_setup: JSON and text lines, the per-request line's fields, and
prompts written only when asked for."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from engine.logging_setup import JsonFormatter, TextFormatter, log_request, setup_logging


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("tandem.requests")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out, handler
    logger.removeHandler(handler)


def _log_one(prompt: str | list[int]) -> None:
    log_request(
        request_id="r-1",
        status="OK",
        finish_reason="stop",
        prompt_tokens=5,
        cached_tokens=0,
        completion_tokens=3,
        ttft_s=0.0123456789,
        e2e_s=0.5,
        prompt=prompt,
    )


def test_json_request_line_has_the_fields_and_no_prompt(capture: tuple[io.StringIO, logging.Handler]) -> None:
    out, handler = capture
    handler.setFormatter(JsonFormatter())
    with TracerProvider().get_tracer("t").start_as_current_span("req") as span:
        _log_one("a secret prompt")
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    line = json.loads(out.getvalue())
    assert {k: line[k] for k in line if k not in ("ts", "span_id")} == {
        "level": "INFO",
        "logger": "tandem.requests",
        "message": "request finished",
        "trace_id": trace_id,
        "request_id": "r-1",
        "status": "OK",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "cached_tokens": 0,
        "completion_tokens": 3,
        "ttft_s": 0.012346,
        "e2e_s": 0.5,
    }
    assert "secret" not in out.getvalue()


def test_prompts_are_written_only_with_log_prompts(capture: tuple[io.StringIO, logging.Handler]) -> None:
    out, handler = capture
    handler.setFormatter(JsonFormatter(log_prompts=True))
    _log_one("a secret prompt")
    line = json.loads(out.getvalue())
    assert (line["prompt"], line["trace_id"]) == ("a secret prompt", None)  # no span: no trace id


def test_text_lines_append_the_fields(capture: tuple[io.StringIO, logging.Handler]) -> None:
    out, handler = capture
    handler.setFormatter(TextFormatter("router"))
    _log_one([7, 8, 9])
    text = out.getvalue()
    assert ' router INFO tandem.requests: request finished request_id="r-1" trace_id=null' in text
    assert "completion_tokens=3 ttft_s=0.012346 e2e_s=0.5\n" in text
    assert "prompt" not in text.replace("prompt_tokens", "")


def test_setup_logging_replaces_root_handlers_and_refuses_unknown_formats() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("decode", log_format="json")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        with pytest.raises(ValueError, match="unknown log format"):
            setup_logging("decode", log_format="xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
