"""OpenTelemetry server spans, with the caller's trace context from the incoming metadata
(W3C traceparent). Only with the `otel` extra installed and a tracer provider configured
(by `opentelemetry-instrument` or the embedding program): otherwise nothing is traced and
the log lines still carry the caller's trace id."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from .logs import Request

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the `otel` extra is not installed
    _INSTALLED = False
else:
    _INSTALLED = True

SERVER_ERRORS = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"})
_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


def server_tracer(provider: Any = None) -> Any:
    """A tracer when traces would go somewhere, else None (spans would cost and say nothing)."""
    if not _INSTALLED:
        return None
    provider = provider if provider is not None else trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer("availability")


@contextmanager
def server_span(
    tracer: Any, method: str, metadata: Sequence[tuple[str, str | bytes]], request: Request
) -> Iterator[Any]:
    """The RPC's span, child of the caller's; the request's log lines then carry its ids."""
    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    name = method.lstrip("/")
    service, _, rpc = name.rpartition("/")
    with tracer.start_as_current_span(
        name,
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        ids = span.get_span_context()
        request.trace_id = format(ids.trace_id, "032x")
        request.span_id = format(ids.span_id, "016x")
        yield span


CALLER_ATTRIBUTE = "availability.caller"
"""The span attribute naming who called (logs.Request.caller)."""


def finish(span: Any, code: str, caller: str) -> None:
    span.set_attribute("rpc.grpc.status_code", _CODES.get(code, 2))
    span.set_attribute(CALLER_ATTRIBUTE, caller)
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code))
