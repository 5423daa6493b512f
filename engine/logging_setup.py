"""Process logging (torch-free): text or JSON lines, and the one line per request.

:func:`setup_logging` configures the root logger once per process (the CLI
calls it before a server starts). :func:`log_request` writes the line that
ends a request, on the ``tandem.requests`` logger, with its fields as
structured data: request id, trace id, status, finish reason, prompt, cached
and completion tokens, TTFT and end-to-end seconds. The prompt's text is
handed to the record but written only when ``--log-prompts`` asked for it.

A JSON line holds ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
the current ``trace_id``/``span_id`` when a span is recording, and the
request fields.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from opentelemetry import trace

LOG_FORMATS = ("text", "json")
REQUEST_LOGGER = "tandem.requests"
TEXT_FORMAT = "%(asctime)s {role} %(levelname)s %(name)s: %(message)s"
#: Record attribute carrying a request line's fields.
FIELDS_ATTR = "tandem_fields"
#: Record attribute carrying the prompt (written only with ``log_prompts``).
PROMPT_ATTR = "tandem_prompt"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def __init__(self, *, log_prompts: bool = False) -> None:
        super().__init__()
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = trace.format_trace_id(ctx.trace_id)
            entry["span_id"] = trace.format_span_id(ctx.span_id)
        entry.update(getattr(record, FIELDS_ATTR, {}))
        prompt = getattr(record, PROMPT_ATTR, None)
        if self.log_prompts and prompt is not None:
            entry["prompt"] = prompt
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic text line; a request line's fields follow as ``key=value``."""

    def __init__(self, role: str, *, log_prompts: bool = False) -> None:
        super().__init__(TEXT_FORMAT.format(role=role))
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = dict(getattr(record, FIELDS_ATTR, {}))
        prompt = getattr(record, PROMPT_ATTR, None)
        if self.log_prompts and prompt is not None:
            fields["prompt"] = prompt
        if fields:
            line += " " + " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in fields.items())
        return line


def setup_logging(role: str, *, log_format: str = "text", log_prompts: bool = False) -> None:
    """Send INFO and above to stderr in ``log_format`` (``text`` or ``json``), replacing root handlers.

    Raises:
        ValueError: an unknown ``log_format``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (one of {', '.join(LOG_FORMATS)})")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter(log_prompts=log_prompts)
        if log_format == "json"
        else TextFormatter(role, log_prompts=log_prompts)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def log_request(
    *,
    request_id: str,
    status: str,
    finish_reason: str | None,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    ttft_s: float | None,
    e2e_s: float,
    prompt: str | list[int] | None = None,
) -> None:
    """Write the request's closing line on ``tandem.requests`` (INFO; WARNING unless status is OK).

    Args:
        status: gRPC status code name (``OK``, ``CANCELLED``, ...).
        ttft_s: seconds to the first token (``None``: no token was produced).
        e2e_s: seconds from arrival to the end.
        prompt: the prompt's text or token ids; written only with ``log_prompts``.
    """
    ctx = trace.get_current_span().get_span_context()
    fields: dict[str, Any] = {
        "request_id": request_id,
        "trace_id": trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None,
        "status": status,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "completion_tokens": completion_tokens,
        "ttft_s": None if ttft_s is None else round(ttft_s, 6),
        "e2e_s": round(e2e_s, 6),
    }
    logging.getLogger(REQUEST_LOGGER).log(
        logging.INFO if status == "OK" else logging.WARNING,
        "request finished",
        extra={FIELDS_ATTR: fields, PROMPT_ATTR: prompt},
    )
