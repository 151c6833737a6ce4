"""Cross-cutting RPC behaviour: the one place domain errors become gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from .errors import (
    AvailabilityError,
    HeartbeatRefused,
    InvalidArgument,
    MitraDeactivated,
    MitraNotFound,
    TruthUnavailable,
)

log = logging.getLogger(__name__)

# Most specific first: HeartbeatRefused is a MitraDeactivated with its own code.
_CODES: tuple[tuple[type[AvailabilityError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (MitraNotFound, grpc.StatusCode.NOT_FOUND),
    (HeartbeatRefused, grpc.StatusCode.PERMISSION_DENIED),
    (MitraDeactivated, grpc.StatusCode.FAILED_PRECONDITION),
    (TruthUnavailable, grpc.StatusCode.UNAVAILABLE),
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


def _map_errors(method: str, behavior: Unary) -> Unary:
    async def mapped(request: Any, context: Context) -> Any:
        try:
            return await behavior(request, context)
        except AvailabilityError as exc:
            await context.abort(status_code(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")

    return mapped


class ErrorMapping(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns domain exceptions into status codes and keeps tracebacks in the log."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _map_errors(handler_call_details.method, handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
