"""The typed async client other backends import.

    async with AvailabilityClient("availability:50051") as client:
        status = await client.get_mitra_status(mitra_id)
        async for event in (live := client.watch_available()):
            pick = live.least_loaded(10)

Every unary call has a deadline and is retried on UNAVAILABLE by gRPC itself (the channel's
service config: service_config): each is idempotent, a state set or a read. A retried
deactivation that had committed reports 0 revoked sessions the second time. Errors are
grpc.aio.AioRpcError with the codes of docs/api.md (Errors).
"""

from .calls import AvailabilityClient, service_config
from .live import LiveAvailability

__all__ = ["AvailabilityClient", "LiveAvailability", "service_config"]
