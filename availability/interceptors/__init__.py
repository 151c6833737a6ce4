"""Cross-cutting RPC behaviour, as three interceptors the server stacks outermost first:
Observed (metrics, a log line and a span a call), Guard (who is calling, and may they) and
ErrorMapping (the one place domain errors become gRPC status codes)."""

from .codes import ErrorMapping, abort, rewrap, status_code
from .guard import RETRY_AFTER_HEADER, Guard
from .observed import Observed, Record, code_of

__all__ = [
    "RETRY_AFTER_HEADER",
    "ErrorMapping",
    "Guard",
    "Observed",
    "Record",
    "abort",
    "code_of",
    "rewrap",
    "status_code",
]
