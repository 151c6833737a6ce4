"""Observed: everything measured about a call, in one wrapper outside the others, so that
a call Guard refuses is counted, logged and traced like any other."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ..logs import ANONYMOUS, REQUEST_ID_HEADER, Request, answer_with_request_id, current
from ..tracing import SERVER_ERRORS, finish, server_span
from .codes import rewrap

if TYPE_CHECKING:
    from .codes import Context, Handler, Streaming, Unary

rpc_log = logging.getLogger("availability.rpc")


Record = Callable[[str, str, float, str, str], None]
"""(service, method, seconds, code, caller) of every RPC that ended: metrics.Metrics.record."""


class Observed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The outermost interceptor, one wrapper for everything measured about a call (refusals
    by authentication included). Each RPC gets its request context (logs.Request) and, as it
    ends, is recorded (the metrics) and logged in one line: at DEBUG for every call, at INFO
    for a caller's error (bad input, unknown mitra) and for a stream's end, at WARNING for
    the server's errors (unavailable, internal, deadline) and for unary calls slower than
    LOG_SLOW_RPC_SECONDS. Below DEBUG, a call that goes well costs a context, two clock reads
    and the metrics. With a tracer (tracing.server_tracer), each call is a span, child of the
    caller's trace context."""

    def __init__(
        self, slow_seconds: float, record: Record, tracer: Any = None, caller: str = ANONYMOUS
    ) -> None:
        """caller: the name calls carry until a Guard names their caller."""
        self._slow = slow_seconds
        self._record = record
        self._tracer = tracer
        self._caller = caller

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata or ()
        sent_id = traceparent = ""
        for key, value in metadata:
            if key == REQUEST_ID_HEADER:
                sent_id = value if isinstance(value, str) else value.decode(errors="replace")
            elif key == "traceparent":
                traceparent = value if isinstance(value, str) else value.decode(errors="replace")
        slow, tracer, record, caller = self._slow, self._tracer, self._record, self._caller
        service, _, name = method.lstrip("/").rpartition("/")

        def traced(context: Request) -> contextlib.AbstractContextManager[Any]:
            if tracer is None:
                return contextlib.nullcontext()
            return server_span(tracer, method, metadata, context)

        def begin(request: Any) -> Request:
            context = Request(method, sent_id, traceparent, caller)
            mitra_id = getattr(request, "mitra_id", None)
            if isinstance(mitra_id, str):
                context.mitra_id = mitra_id[:64]
            current.set(context)
            return context

        def end(
            context: Request, started: float, code: str, rpc: Context, streamed: bool, span: Any
        ) -> None:
            seconds = time.perf_counter() - started
            record(service, name, seconds, code, context.caller)
            if span is not None:
                finish(span, code, context.caller)
            if code in SERVER_ERRORS or (seconds >= slow and not streamed):
                level = logging.WARNING
            elif code in ("RESOURCE_EXHAUSTED", "UNAUTHENTICATED"):
                # Refusals come in floods; Guard logs them once a second, with their count.
                level = logging.DEBUG
            elif code != "OK" or streamed:
                level = logging.INFO
            else:
                level = logging.DEBUG
            if not rpc_log.isEnabledFor(level):
                return
            if code == "OK":
                answer_with_request_id(rpc)
            rpc_log.log(
                level,
                "%s %s in %.1f ms",
                method,
                code,
                seconds * 1000,
                extra={"code": code, "duration_ms": round(seconds * 1000, 3)},
            )

        def unary(behavior: Unary) -> Unary:
            async def observed(request: Any, rpc: Context) -> Any:
                context, started, code = begin(request), time.perf_counter(), "OK"
                with traced(context) as span:
                    try:
                        return await behavior(request, rpc)
                    except BaseException:
                        code = code_of(rpc)
                        raise
                    finally:
                        end(context, started, code, rpc, False, span)

            return observed

        def stream(behavior: Streaming) -> Streaming | Unary:
            if not inspect.isasyncgenfunction(behavior):
                return unary(behavior)  # type: ignore[arg-type]

            async def observed(request: Any, rpc: Context) -> AsyncIterator[Any]:
                context, started, code = begin(request), time.perf_counter(), "OK"
                with traced(context) as span:
                    try:
                        async for reply in behavior(request, rpc):
                            yield reply
                    except BaseException:
                        code = code_of(rpc)
                        raise
                    finally:
                        end(context, started, code, rpc, True, span)

            return observed

        return rewrap(handler, unary, stream)


def code_of(context: Context) -> str:
    """The status an aborted call ends with; a call that raised without one is CANCELLED
    (the client went away) as grpc reports it."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "CANCELLED"
