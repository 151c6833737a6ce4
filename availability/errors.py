"""The domain's exceptions. `interceptors` maps each to one gRPC status code."""

from __future__ import annotations


class AvailabilityError(Exception):
    """Base of every error a caller can cause or must be told about."""


class InvalidArgument(AvailabilityError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class MitraNotFound(AvailabilityError):
    def __init__(self, mitra_id: object) -> None:
        super().__init__(f"mitra {mitra_id} not found")


class MitraDeactivated(AvailabilityError):
    def __init__(self, mitra_id: object) -> None:
        super().__init__(f"mitra {mitra_id} is deactivated")


class HeartbeatRefused(MitraDeactivated):
    """A deactivated mitra's app is still sending heartbeats: its credentials are void."""


class SessionRefused(AvailabilityError):
    """A caller bound to mitras' sessions (bind_presence) acted for a mitra without one of
    that mitra's live auth sessions. Names the mitra, never the session sent."""

    def __init__(self, mitra_id: object) -> None:
        super().__init__(
            f"mitra {mitra_id}: this caller's presence calls must carry a live auth session "
            "of that mitra (metadata x-mitra-session; BatchHeartbeat: mitra_sessions)"
        )


class TruthUnavailable(AvailabilityError):
    """Postgres cannot be reached; no write can be acknowledged."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"database unavailable: {type(cause).__name__}: {cause}".rstrip(": "))


class AuditUnwritten(AvailabilityError):
    """The audit row of a change could not be written, so the change was not made either."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            "the change was not made: its audit row could not be written "
            f"({type(cause).__name__}: {cause})".rstrip(": ")
        )


class LimitReached(AvailabilityError):
    """A per-instance limit is reached (WATCH_MAX_STREAMS); the caller retries later or
    elsewhere."""


class WatchInterrupted(AvailabilityError):
    """A watch cannot go on here (the Valkey mirror is lost, or this server is stopping);
    the caller resumes by revision, here or on another instance."""
