"""Guard: who is calling, and may they. Apart from the other interceptors because it alone
depends on who the callers are (callers.py: the roster, its scopes and limits) and on the
transport's credentials (a bearer token, a client certificate)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ..callers import ALL, OPEN_METHODS, Caller, Callers, Roster, hash_token, scope_of
from ..logs import TOKEN_HOLDER, current
from .codes import abort

if TYPE_CHECKING:
    from .codes import Context, Handler, Unary

log = logging.getLogger("availability.interceptors")  # the interceptors' one logger


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

    def __init__(
        self, callers: Callers, *, tls: bool, named: bool = True, peer_refusals: float = 0.0
    ) -> None:
        self._callers = callers
        self._tls = tls
        self._named = named
        self._refusals = _Throttled()
        self._strangers = _Strangers(peer_refusals)

    @classmethod
    def of_tokens(cls, tokens: tuple[str, ...], *, tls: bool, peer_refusals: float = 0.0) -> Guard:
        digests = tuple(bytes.fromhex(hash_token(token)) for token in tokens)
        holder = Caller(TOKEN_HOLDER, frozenset({ALL}), token_digests=digests)
        return cls(
            Callers("", Roster((holder,))), tls=tls, named=False, peer_refusals=peer_refusals
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        callers, tls, named, refusals = self._callers, self._tls, self._named, self._refusals
        strangers = self._strangers

        async def identify(context: Context) -> Caller:
            roster = callers.roster
            if token:
                caller = roster.by_token(token)
            elif tls:
                caller = roster.by_identity(_certificate_names(context))
            else:
                caller = None
            if caller is None:
                # One line a peer a second with the count, not one a call: a client sending
                # wrong credentials in a loop must not flood the log (metrics count each).
                peer = context.peer().rpartition(":")[0] or "unknown peer"
                refusals.warning(
                    peer, "calls from %s refused: missing or unknown credentials", peer
                )
                if wait_ms := strangers.refused(peer):
                    hint = str(wait_ms)
                    await abort(
                        context,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many calls with missing or unknown credentials from {peer}; "
                        f"retry in {hint} ms",
                        ((RETRY_AFTER_HEADER, hint), (_PUSHBACK_HEADER, hint)),
                    )
                await abort(context, grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            return caller

        if handler is None:
            # An unknown method answers as a known one would: a caller who is not known
            # learns nothing of which methods exist.
            async def unknown(requests: Any, context: Context) -> AsyncIterator[Any]:
                await identify(context)
                await abort(context, grpc.StatusCode.UNIMPLEMENTED, f"no method {method}")
                yield None

            return grpc.stream_stream_rpc_method_handler(unknown)

        async def admit(context: Context) -> Caller:
            caller = await identify(context)
            request = current.get()
            if request is not None:
                request.caller = caller.name
                request.admin = named and caller.admin
                request.bound = caller.bind_presence
            elif caller.bind_presence and scope_of(method) == "presence":
                # Nowhere to say the call is bound: refuse rather than let it act for anyone.
                await abort(context, grpc.StatusCode.PERMISSION_DENIED, "presence call unbound")
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

        async def revoked(context: Context) -> tuple[grpc.StatusCode, str]:
            """Once a reload takes this call's credentials away, or the method's scope."""
            names = [] if token or not tls else _certificate_names(context)
            while True:
                roster = await callers.next_reload()
                caller = roster.by_token(token) if token else roster.by_identity(names)
                if caller is None:
                    return grpc.StatusCode.UNAUTHENTICATED, (
                        "credentials no longer accepted: AUTH_CALLERS_FILE was reloaded"
                    )
                if not caller.allows(method):
                    return grpc.StatusCode.PERMISSION_DENIED, (
                        f"caller {caller.name} may no longer call {method}"
                    )

        return _guarded(handler, admit, callers.limiter.release, revoked if named else None)


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
        if len(self._last) > 10_000:  # keys are callers and peers: bound them all the same
            self._last.clear()
            self._held.clear()
        if now - self._last.get(key, -self._seconds) < self._seconds:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += " (and %d more since the last line)"
            args += (held,)
        log.warning(message, *args)


class _Strangers:
    """Each peer's budget of calls with missing or unknown credentials: `rate` a second, as
    many at once. Past it, such a call is answered RESOURCE_EXHAUSTED with a retry hint (which
    gRPC's retry policy honours) instead of UNAUTHENTICATED: a client guessing, or looping on
    a wrong token, is told to back off, and is logged once a second with its count. Callers
    whose credentials are known are never held back by another client on their host. A peer
    is an address. 0: no limit."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._budgets: dict[str, tuple[float, float]] = {}

    def refused(self, peer: str) -> int:
        """One more refused call from this peer: 0 within its budget, else the ms to wait."""
        if not self._rate:
            return 0
        now = time.monotonic()
        if len(self._budgets) > 10_000:  # peers come and go: bound them
            self._budgets.clear()
        tokens, stamp = self._budgets.get(peer, (self._rate, now))
        tokens = min(self._rate, tokens + (now - stamp) * self._rate)
        if tokens < 1.0:
            self._budgets[peer] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate * 1000))
        self._budgets[peer] = (tokens - 1.0, now)
        return 0


def _guarded(
    handler: Handler,
    admit: Callable[[Context], Awaitable[Caller]],
    release: Callable[[Caller], None],
    revoked: Callable[[Context], Awaitable[tuple[grpc.StatusCode, str]]] | None,
) -> Handler:
    """The same handler, admitting each call first and releasing its caller's slot at its end
    (a stream holds one while it is open). Every shape, reflection's stream-stream included.
    A stream ends as soon as a reload of the callers revokes it (`revoked`): a caller taken
    out of the file, or out of the scope, does not keep an open watch."""
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
                if revoked is None:
                    async for reply in behavior(request, context):
                        yield reply
                    return
                replies = behavior(request, context).__aiter__()
                ended = asyncio.ensure_future(revoked(context))
                try:
                    while True:
                        following = asyncio.ensure_future(replies.__anext__())
                        await asyncio.wait({following, ended}, return_when=FIRST_COMPLETED)
                        if ended.done() and not following.done():
                            following.cancel()
                            await abort(context, *ended.result())
                        try:
                            reply = following.result()
                        except StopAsyncIteration:
                            return
                        yield reply
                finally:
                    ended.cancel()
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
