"""The mirror's key schema. Nobody else spells a key.

Every key is `{<prefix>}:<name>`: the prefix is the hash tag, so one deployment's keys
share a cluster slot (multi-key scripts work on Valkey Cluster) and several deployments
or test runs can share one Valkey under different prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    online: str
    deactivated: str
    capacity: str
    names: str
    loads: str
    heartbeats: str
    ready: str
    versions: str
    dirty: str
    beacon: str
    synced: str
    seeded: str
    busy: str
    beacon_computed: str
    flushing: str
    published: str
    revision: str
    events: str
    checked: str
    instances: str
    reports: str
    sweeps: str
    seeding: str
    layouts: str
    resync: str
    session_epochs: str
    prefix: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Keys:
        tag = "{" + prefix + "}"
        return cls(
            online=f"{tag}:online",
            deactivated=f"{tag}:deactivated",
            capacity=f"{tag}:capacity",
            names=f"{tag}:names",
            loads=f"{tag}:loads",
            heartbeats=f"{tag}:heartbeats",
            ready=f"{tag}:ready",
            versions=f"{tag}:versions",
            dirty=f"{tag}:heartbeats:dirty",
            beacon=f"{tag}:beacon",
            synced=f"{tag}:synced",
            seeded=f"{tag}:seeded",
            busy=f"{tag}:busy",
            beacon_computed=f"{tag}:beacon:computed",
            flushing=f"{tag}:heartbeats:flushing",
            published=f"{tag}:watch:available",
            revision=f"{tag}:watch:revision",
            events=f"{tag}:watch:events",
            checked=f"{tag}:watch:checked",
            instances=f"{tag}:instances",
            reports=f"{tag}:instances:reports",
            sweeps=f"{tag}:sweeps",
            seeding=f"{tag}:seeding",
            layouts=f"{tag}:layouts",
            resync=f"{tag}:resync",
            session_epochs=f"{tag}:sessions:epochs",
            prefix=tag,
        )

    def session(self, session_id: str) -> str:
        """A mitra's auth session as presence binding last found it live (sessions.py)."""
        return f"{self.prefix}:session:{session_id}"

    def lease(self, name: str) -> list[str]:
        return [f"{self.prefix}:lease:{name}", f"{self.prefix}:lease:{name}:epoch"]

    def all(self) -> list[str]:
        """Every key, in the order the scripts' prelude names them."""
        return [
            self.online,
            self.deactivated,
            self.capacity,
            self.names,
            self.loads,
            self.heartbeats,
            self.ready,
            self.versions,
            self.dirty,
            self.beacon,
            self.synced,
            self.seeded,
            self.busy,
            self.beacon_computed,
            self.flushing,
            self.published,
            self.revision,
            self.events,
            self.checked,
            self.seeding,
            self.layouts,
            self.resync,
        ]
