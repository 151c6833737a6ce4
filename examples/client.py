"""The pairing service in miniature: keep the available set live, offer each chat to the least
loaded, ask the service instead while the stream reconnects. Against a local `make run`:
`.venv/bin/python examples/client.py` (address from GRPC_ADDRESS, else 127.0.0.1:50051)."""

import asyncio
import os
from uuid import UUID

from availability.client import AvailabilityClient


async def main() -> None:
    address = os.environ.get("GRPC_ADDRESS", "127.0.0.1:50051")
    async with AvailabilityClient(address) as client:
        count = await client.count_available_mitras()
        print(f"{count.available} of {count.online} online mitras are available")
        async with client.watch_available() as live:  # snapshot, changes, resumes on its own
            await live.wait_in_sync()
            declined: set[UUID] = set()
            for chat in range(3):  # three chat requests, as they come
                picks = live.least_loaded(5, exclude=declined)
                if not live.in_sync:  # reconnecting: ask the service instead
                    picks = await client.find_available_mitras(5, exclude=declined)
                names = ", ".join(f"{m.display_name} (load {m.load})" for m in picks)
                print(f"chat {chat}: offered to {names}")
                declined.add(picks[0].mitra_id)  # the first one declined
                await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
