"""Postgres, the source of truth. Every SQL statement of the service lives in this package
and nowhere else, so whoever changes a table finds every query over it here. Each module is
one responsibility, a mixin over TruthBase (connection.py); Truth puts them together, so its
callers see one store."""

from __future__ import annotations

from .audit import Auditing
from .connection import timed
from .contract import _COUNT_AVAILABLE as _COUNT_AVAILABLE
from .contract import _FIND_AVAILABLE as _FIND_AVAILABLE
from .contract import _REVOKE_AUTH_SESSIONS as _REVOKE_AUTH_SESSIONS
from .contract import _STATES_BY_ID as _STATES_BY_ID
from .contract import Contract
from .dashboard import _SESSION_COUNTS as _SESSION_COUNTS
from .dashboard import Dashboard
from .following import CHANGES_TAKEN as CHANGES_TAKEN
from .following import HEARTBEATS_FLUSHED as HEARTBEATS_FLUSHED
from .following import Following
from .grants import Grants
from .sessions import AuthSessions
from .upkeep import Upkeep


@timed
class Truth(Contract, Following, Dashboard, Auditing, Upkeep, Grants, AuthSessions):
    """The Postgres store: contract tables, migrations, and the queries over them."""
