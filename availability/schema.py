"""The schema's migrations, in two kinds, so a release in service never loses what it relies on
(expand, then contract):

- expand steps (`migrations/NNNN_*.sql`) only add, or change what no release in service reads;
  `availability migrate` applies them at deploy, before the new release rolls out, and the
  release before keeps working beside it, or after a rollback to it;
- contract steps (`migrations/contract/NNNN_*.sql`) remove what an older release still relies
  on. `availability migrate --contract` applies them once that release can no longer run (the
  rollout is done, no rollback is wanted), and a plain `migrate` applies them by itself from the
  release each names on (by then its predecessor is the only other one that may run). A
  database with no schema yet gets them at once: no older release ever ran against it.

Every step says in its header which releases run correctly on the schema it leaves:
`-- compatible-with: >=0.1.0`; a contract step also says from which release a plain migrate
applies it: `-- automatic-from: 0.3.0`. tests/test_migrations.py holds them to it, and
tests/test_upgrade.py runs the previous release against the schema of this one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from .version import VERSION

_COMPATIBLE = re.compile(r"^-- compatible-with: >=(\d+\.\d+\.\d+)", re.MULTILINE)
_AUTOMATIC = re.compile(r"^-- automatic-from: (\d+\.\d+\.\d+)", re.MULTILINE)


def version_key(version: str) -> tuple[int, ...]:
    """`0.10.2` sorts after `0.9.0`."""
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    """As recorded in schema_migrations: `0010_x.sql`, `contract/0010_x.sql`."""
    sql: str
    compatible_with: str
    """The oldest release that runs correctly on the schema this step leaves."""
    automatic_from: str | None
    """A contract step: the first release whose plain `migrate` applies it."""

    @property
    def contract(self) -> bool:
        return self.automatic_from is not None

    def due(self, *, contract: bool, fresh: bool) -> bool:
        """Whether a migrate of this release applies it now."""
        if not self.contract:
            return True
        assert self.automatic_from is not None
        return contract or fresh or version_key(VERSION) >= version_key(self.automatic_from)


def steps() -> list[Step]:
    """Every step: the expand steps in order, then the contract steps in order."""
    folder = resources.files("availability") / "migrations"
    found = [
        *((f.name, f) for f in folder.iterdir() if f.name.endswith(".sql")),
        *(
            (f"contract/{f.name}", f)
            for f in (folder / "contract").iterdir()
            if f.name.endswith(".sql")
        ),
    ]
    return [_step(name, f.read_text(encoding="utf-8")) for name, f in sorted(found)]


def _step(name: str, sql: str) -> Step:
    compatible = _COMPATIBLE.search(sql)
    if compatible is None:
        raise ValueError(f"migration {name}: no `-- compatible-with: >=X.Y.Z` header")
    automatic = _AUTOMATIC.search(sql)
    if name.startswith("contract/") != (automatic is not None):
        raise ValueError(f"migration {name}: `-- automatic-from: X.Y.Z` marks contract steps only")
    return Step(name, sql, compatible[1], automatic[1] if automatic else None)
