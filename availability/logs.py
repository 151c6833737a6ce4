"""Logging: one JSON object a line for machines, a readable line at a terminal, and the
request each line belongs to (request id, method, caller, mitra id, trace) wherever it was
logged."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc

from .settings import Settings

ANONYMOUS = "anonymous"
TOKEN_HOLDER = "token"
UNIDENTIFIED = "-"

REQUEST_ID_HEADER = "x-request-id"
"""Metadata a caller may send to name its request in our logs; we answer with it (or the id
we made) in trailing metadata whenever a call fails or was logged."""

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_CALLER_SENT = 128
"""Longest request id taken from a caller; anything longer is cut (it lands in every line)."""


class Request:
    """What the log lines of one RPC share. The id is made only when first needed, so a call
    that logs nothing and succeeds pays for no uuid. `caller` is who called
    (interceptors.Guard): a name from AUTH_CALLERS_FILE, ANONYMOUS without authentication,
    TOKEN_HOLDER for one of AUTH_TOKENS, UNIDENTIFIED while unknown; `admin` is whether that
    caller has the admin scope (its presence changes are audited); `bound` whether its presence
    calls are bound to mitras' auth sessions."""

    __slots__ = (
        "_id",
        "admin",
        "bound",
        "caller",
        "method",
        "mitra_id",
        "span_id",
        "trace_id",
    )

    def __init__(self, method: str, sent_id: str, traceparent: str, caller: str) -> None:
        self.method = method
        self.caller = caller
        self.admin = False
        self.bound = False
        """The caller's presence calls must carry the mitra's auth session (bind_presence)."""
        self._id = sent_id[:_CALLER_SENT]
        self.mitra_id = ""
        self.trace_id = self.span_id = ""
        if parent := _TRACEPARENT.fullmatch(traceparent.strip()):
            self.trace_id, self.span_id = parent.groups()

    @property
    def id(self) -> str:
        if not self._id:
            self._id = uuid.uuid4().hex
        return self._id

    @property
    def named(self) -> bool:
        return bool(self._id)


current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "availability_request", default=None
)


def answer_with_request_id(
    context: grpc.aio.ServicerContext[Any, Any], extra: tuple[tuple[str, str], ...] = ()
) -> None:
    """Tell the caller which request id our log lines carry (before an abort), with any other
    trailing metadata of the answer."""
    request = current.get()
    if request is not None:
        extra = ((REQUEST_ID_HEADER, request.id), *extra)
    if extra:
        context.set_trailing_metadata(extra)


_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class _PoolFloor(logging.Filter):
    """asyncpg (0.31 on) keeps its pool's minimum size by reconnecting in a task of its own and
    logs each failed attempt as a WARNING with the whole traceback, in the context of whichever
    call started that task: through a Postgres outage, a traceback every 1 to 60 s, each
    carrying an unrelated request's id. Here it is one line, the error's name and message,
    with no request."""

    _MESSAGE = "Failed to restore the pool connection floor"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.msg, str) and record.msg.startswith(self._MESSAGE):
            error = record.exc_info[1]
            record.msg = "Postgres pool: reconnecting to keep its minimum size failed (%s: %s)"
            record.args = (type(error).__name__, error)
            record.exc_info, record.exc_text = None, None
            record._background = True
        return True


_POOL_FLOOR = _PoolFloor()


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    request = None if getattr(record, "_background", False) else current.get()
    if request is not None:
        fields["request_id"] = request.id
        fields["method"] = request.method
        fields["caller"] = request.caller
        if request.mitra_id:
            fields["mitra_id"] = request.mitra_id
        if request.trace_id:
            fields["trace_id"] = request.trace_id
            fields["span_id"] = request.span_id
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, pid, the request's fields and
    any `extra=`; a traceback goes in `exception`, never split over lines."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update(_context_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The same facts for a person at a terminal: the request's fields after the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _context_fields(record)
        if not fields:
            return text
        head, newline, rest = text.partition("\n")
        tail = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{head}  {tail}{newline}{rest}"


_CREDENTIALS = (
    # `authorization: ...`, `'authorization', b'...'`, `authorization=...`: the value goes.
    re.compile(r"(?i)(authorization['\"]?\s*[:=,]?\s*(?:b?['\"])?(?:bearer\s+)?)[^\s'\",)\]}]+"),
    re.compile(r"(?i)(bearer\s+)\S+"),
    re.compile(r"(?i)((?:token|password|secret)\w*['\"]?\s*[:=]\s*['\"]?)[^\s'\",)\]}]+"),
    re.compile(r"(?i)(://[^:/@\s]+:)[^@/\s]+(?=@)"),  # a URL's password
)
REDACTED = "[redacted]"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Every credential-shaped part of a log line, and every configured token, replaced."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for pattern in _CREDENTIALS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class _Redacting(logging.Formatter):
    """Wraps the formatter of the one handler every logger reaches (ours, grpcio's, asyncio's):
    nothing that looks like a credential leaves the process, whoever logged it (grpcio logs a
    refused call's raw metadata, token included, with its traceback). The message and the
    traceback are redacted before the line is formatted, so a JSON line stays JSON."""

    def __init__(self, inner: logging.Formatter, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        clean = logging.makeLogRecord(record.__dict__)
        clean.msg, clean.args = redact(record.getMessage(), self._secrets), None
        if record.exc_info:
            clean.exc_text = redact(self.formatException(record.exc_info), self._secrets)
            clean.exc_info = None
        elif record.exc_text:
            clean.exc_text = redact(record.exc_text, self._secrets)
        clean.stack_info = record.stack_info and redact(record.stack_info, self._secrets)
        return self._inner.format(clean)


def configure_logging(settings: Settings) -> None:
    """LOG_FORMAT auto: JSON unless stderr is a terminal."""
    json_lines = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Redacting(JsonFormatter() if json_lines else TextFormatter(), settings.auth_tokens)
    )
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("asyncpg.pool").addFilter(_POOL_FLOOR)
