"""Cross-cutting RPC behaviour: the one place domain errors become gRPC status codes."""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from .errors import (
    AvailabilityError,
    HeartbeatRefused,
    InvalidArgument,
    LimitReached,
    MitraDeactivated,
    MitraNotFound,
    TruthUnavailable,
    WatchInterrupted,
)
from .logs import REQUEST_ID_HEADER, Request, answer_with_request_id, current
from .tracing import SERVER_ERRORS, finish, server_span

log = logging.getLogger(__name__)
rpc_log = logging.getLogger("availability.rpc")

# Most specific first: HeartbeatRefused is a MitraDeactivated with its own code.
_CODES: tuple[tuple[type[AvailabilityError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (MitraNotFound, grpc.StatusCode.NOT_FOUND),
    (HeartbeatRefused, grpc.StatusCode.PERMISSION_DENIED),
    (MitraDeactivated, grpc.StatusCode.FAILED_PRECONDITION),
    (TruthUnavailable, grpc.StatusCode.UNAVAILABLE),
    (WatchInterrupted, grpc.StatusCode.UNAVAILABLE),
    (LimitReached, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_code(error: AvailabilityError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Unary = Callable[[Any, Context], Awaitable[Any]]
    Streaming = Callable[[Any, Context], AsyncIterator[Any]]


async def abort(context: Context, code: grpc.StatusCode, details: str) -> None:
    """End the call with a status and the request id its log lines carry."""
    answer_with_request_id(context)
    await context.abort(code, details)


async def _abort(method: str, context: Context, exc: Exception) -> None:
    if isinstance(exc, AvailabilityError):
        await abort(context, status_code(exc), str(exc))
    log.error("%s failed", method, exc_info=exc)
    await abort(context, grpc.StatusCode.INTERNAL, "internal error (logged by the server)")


class _Malformed:
    """What a request that is not a valid message of its type parses to: grpc would answer
    INTERNAL for a deserializer that raises, and the caller sent it, so it is theirs."""

    __slots__ = ("problem",)

    def __init__(self, problem: Exception) -> None:
        self.problem = problem


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _Malformed(exc)

    return parse


async def _refuse_malformed(request: Any, context: Context) -> None:
    if isinstance(request, _Malformed):
        await abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: not a valid message of this method's type ({request.problem})"[:300],
        )


def _map_errors(method: str, behavior: Unary) -> Unary:
    async def mapped(request: Any, context: Context) -> Any:
        await _refuse_malformed(request, context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc)

    return mapped


def _map_stream_errors(method: str, behavior: Streaming) -> Streaming | Unary:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that streams with context.write (grpc's own health Watch) is a coroutine.
        return _map_errors(method, behavior)  # type: ignore[arg-type]

    async def mapped(request: Any, context: Context) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        try:
            async for reply in behavior(request, context):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(method, context, exc)

    return mapped


def rewrap(
    handler: Handler,
    unary: Callable[[Unary], Unary],
    stream: Callable[[Streaming], Streaming | Unary],
    deserializer: Callable[[Callable[[bytes], Any] | None], Callable[[bytes], Any] | None] = (
        lambda d: d
    ),
) -> Handler:
    """The same handler with its behaviour wrapped (unary-request RPCs: all this service has)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),  # type: ignore[arg-type]
            request_deserializer=deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return handler


class ErrorMapping(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns domain exceptions into status codes and keeps tracebacks in the log."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        return rewrap(
            handler,
            lambda behavior: _map_errors(method, behavior),
            lambda behavior: _map_stream_errors(method, behavior),
            _lenient,
        )


_OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Load balancers and orchestrators probe health without credentials."""


class Authentication(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Bearer tokens (AUTH_TOKENS): `authorization: Bearer <token>` must match one of them.
    Every token is compared, in constant time, so timing tells nothing about which failed."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, credential = text.partition(" ")
                if scheme.lower() == "bearer":
                    presented = credential.strip().encode()
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(presented, accepted)
        return matched and bool(presented)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        if method.startswith(_OPEN_SERVICES) or self._allowed(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _refusal(handler)


async def _refuse(request: Any, context: Context) -> None:
    await abort(
        context,
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid credentials: send metadata authorization: Bearer <token>",
    )


def _refusal(handler: Handler) -> Handler:
    """A handler of the same shape as the one refused, that answers UNAUTHENTICATED."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(_refuse, **kwargs)


Record = Callable[[str, str, float, str], None]
"""(service, method, seconds, code) of every RPC that ended: metrics.Metrics.record."""


class Observed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The outermost interceptor, one wrapper for everything measured about a call (refusals
    by authentication included). Each RPC gets its request context (logs.Request) and, as it
    ends, is recorded (the metrics) and logged in one line: at DEBUG for every call, at INFO
    for a caller's error (bad input, unknown mitra) and for a stream's end, at WARNING for
    the server's errors (unavailable, internal, deadline) and for unary calls slower than
    LOG_SLOW_RPC_SECONDS. Below DEBUG, a call that goes well costs a context, two clock reads
    and the metrics. With a tracer (tracing.server_tracer), each call is a span, child of the
    caller's trace context."""

    def __init__(self, slow_seconds: float, record: Record, tracer: Any = None) -> None:
        self._slow = slow_seconds
        self._record = record
        self._tracer = tracer

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
        slow, tracer, record = self._slow, self._tracer, self._record
        service, _, name = method.lstrip("/").rpartition("/")

        def traced(context: Request) -> contextlib.AbstractContextManager[Any]:
            if tracer is None:
                return contextlib.nullcontext()
            return server_span(tracer, method, metadata, context)

        def begin(request: Any) -> Request:
            context = Request(method, sent_id, traceparent)
            mitra_id = getattr(request, "mitra_id", None)
            if isinstance(mitra_id, str):
                context.mitra_id = mitra_id[:64]
            current.set(context)
            return context

        def end(
            context: Request, started: float, code: str, rpc: Context, streamed: bool, span: Any
        ) -> None:
            seconds = time.perf_counter() - started
            record(service, name, seconds, code)
            if span is not None:
                finish(span, code)
            if code in SERVER_ERRORS or (seconds >= slow and not streamed):
                level = logging.WARNING
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
