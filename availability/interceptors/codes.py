"""Domain errors to gRPC status codes, in one place, with what the other interceptors use
of it: abort (a status that carries the request id) and rewrap. Innermost of the three, so
whatever a servicer raises is a status before Guard and Observed see the call end."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from ..errors import (
    AuditUnwritten,
    AvailabilityError,
    HeartbeatRefused,
    InvalidArgument,
    LimitReached,
    MitraDeactivated,
    MitraNotFound,
    SessionRefused,
    TruthUnavailable,
    WatchInterrupted,
)
from ..logs import answer_with_request_id

log = logging.getLogger("availability.interceptors")  # the interceptors' one logger

# Most specific first: HeartbeatRefused is a MitraDeactivated with its own code.
_CODES: tuple[tuple[type[AvailabilityError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (MitraNotFound, grpc.StatusCode.NOT_FOUND),
    (HeartbeatRefused, grpc.StatusCode.PERMISSION_DENIED),
    (SessionRefused, grpc.StatusCode.PERMISSION_DENIED),
    (MitraDeactivated, grpc.StatusCode.FAILED_PRECONDITION),
    (TruthUnavailable, grpc.StatusCode.UNAVAILABLE),
    (AuditUnwritten, grpc.StatusCode.UNAVAILABLE),
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


async def abort(
    context: Context,
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """End the call with a status and the request id its log lines carry."""
    answer_with_request_id(context, trailing)
    await context.abort(code, details)
    raise AssertionError("context.abort raises")


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
