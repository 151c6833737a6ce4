"""Cross-cutting RPC behaviour: the one place domain errors become gRPC status codes."""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from .callers import ALL, OPEN_METHODS, Caller, Callers, Roster, hash_token, scope_of
from .errors import (
    AuditUnwritten,
    AvailabilityError,
    HeartbeatRefused,
    InvalidArgument,
    LimitReached,
    MitraDeactivated,
    MitraNotFound,
    TruthUnavailable,
    WatchInterrupted,
)
from .logs import (
    ANONYMOUS,
    REQUEST_ID_HEADER,
    TOKEN_HOLDER,
    Request,
    answer_with_request_id,
    current,
)
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


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Who is calling, and may they. Each call names its caller (logs.Request.caller: its log
    lines, metrics and span carry it): a bearer token (`authorization: Bearer <token>`) is
    hashed and looked up among the callers' digests; without one, the client certificate's
    SAN URIs and DNS names and its subject CN are looked up among their tls_identities.
    Unknown credentials: UNAUTHENTICATED; an RPC outside the caller's scopes:
    PERMISSION_DENIED; past its limits: RESOURCE_EXHAUSTED at once, with a retry hint, before
    the call does any work. Health stays open; reflection needs a known caller.

    AUTH_TOKENS is the same with one caller, `token`, of every scope, whose presence changes
    are not audited (it names nobody; a deployment on AUTH_TOKENS would otherwise audit every
    app going online)."""

    def __init__(self, callers: Callers, *, tls: bool, named: bool = True) -> None:
        self._callers = callers
        self._tls = tls
        self._named = named
        self._refusals = _Throttled()

    @classmethod
    def of_tokens(cls, tokens: tuple[str, ...], *, tls: bool) -> Guard:
        digests = tuple(bytes.fromhex(hash_token(token)) for token in tokens)
        holder = Caller(TOKEN_HOLDER, frozenset({ALL}), token_digests=digests)
        return cls(Callers("", Roster((holder,))), tls=tls, named=False)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        callers, tls, named, refusals = self._callers, self._tls, self._named, self._refusals

        async def admit(context: Context) -> Caller:
            roster = callers.roster
            if token:
                caller = roster.by_token(token)
            elif tls:
                caller = roster.by_identity(_certificate_names(context))
            else:
                caller = None
            request = current.get()
            if caller is None:
                await abort(context, grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            if request is not None:
                request.caller = caller.name
                request.admin = named and caller.admin
            if not caller.allows(method):
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller {caller.name} may not call {method}: it needs scope "
                    f"{scope_of(method)!r}; its scopes are {sorted(caller.scopes)}",
                )
            retry_ms = callers.limiter.admit(caller)
            if retry_ms:
                refusals.warning(
                    caller.name,
                    "caller %s is past its limits (max_in_flight %s, max_calls_per_second %s): "
                    "calls refused with RESOURCE_EXHAUSTED",
                    caller.name,
                    caller.limits.max_in_flight,
                    caller.limits.max_calls_per_second,
                )
                hint = str(retry_ms)
                await abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"caller {caller.name} is past its limits in AUTH_CALLERS_FILE; "
                    f"retry in {hint} ms",
                    ((RETRY_AFTER_HEADER, hint), (_PUSHBACK_HEADER, hint)),
                )
            return caller

        return _guarded(handler, admit, callers.limiter.release)


RETRY_AFTER_HEADER = "retry-after-ms"
"""Trailing metadata of a call refused past its caller's limits: when to try again."""
_PUSHBACK_HEADER = "grpc-retry-pushback-ms"
"""The same hint under the name gRPC's own retry policy honours."""
_UNAUTHENTICATED = (
    "missing or unknown credentials: send metadata authorization: Bearer <token> of a known "
    "caller (or, with mutual TLS, a client certificate naming one)"
)


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer":
                return credential.strip().encode()
    return b""


_CERTIFICATE_NAMES = ("x509_subject_alternative_name", "x509_common_name")


def _certificate_names(context: Context) -> list[str]:
    """The client certificate's SAN URIs and DNS names and its subject CN, as grpc verified
    them against TLS_CLIENT_CA_FILE."""
    properties = context.auth_context()
    return [
        value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        for key in _CERTIFICATE_NAMES
        for value in properties.get(key, ())
    ]


class _Throttled:
    """At most one warning a second per key: a caller flooding past its limit must not
    flood the log too (the metrics count every refusal)."""

    def __init__(self, seconds: float = 1.0) -> None:
        self._seconds = seconds
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._seconds) < self._seconds:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += " (and %d more since the last line)"
            args += (held,)
        log.warning(message, *args)


def _guarded(
    handler: Handler,
    admit: Callable[[Context], Awaitable[Caller]],
    release: Callable[[Caller], None],
) -> Handler:
    """The same handler, admitting each call first and releasing its caller's slot at its end
    (a stream holds one while it is open). Every shape, reflection's stream-stream included."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def unary(behavior: Any) -> Unary:
        async def guarded(request: Any, context: Context) -> Any:
            caller = await admit(context)
            try:
                return await behavior(request, context)
            finally:
                release(caller)

        return guarded

    def stream(behavior: Any) -> Callable[[Any, Context], Any]:
        if not inspect.isasyncgenfunction(behavior):
            return unary(behavior)

        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            caller = await admit(context)
            try:
                async for reply in behavior(request, context):
                    yield reply
            finally:
                release(caller)

        return guarded

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)


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
            elif code == "RESOURCE_EXHAUSTED":
                # Refusals past a limit come in floods; Guard logs them once a second.
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
