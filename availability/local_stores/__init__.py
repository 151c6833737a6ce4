"""Throwaway Postgres and Valkey servers as real processes, for `availability dev` and the tests.

Real servers rather than fakes, because what the service must survive (a crash, a restart, a
server that stops answering) only happens to real ones. Each server is a child process in a
session of its own, so a Ctrl-C at the terminal reaches only the Python parent, which then
stops what it started; if the parent dies without doing so, Linux's parent-death signal and
an exit hook stop the servers anyway. They listen on 127.0.0.1 only, on a free port unless told
otherwise, so they never collide with shared servers on 5432 and 6379.
"""

from .cluster import LocalValkeyCluster, start_valkey_cluster
from .postgres import LocalPostgres, start_postgres
from .process import LocalStoreError, free_port
from .process import _gone as _gone  # the tests wait on a killed server's processes
from .sentinel import LocalValkeySentinel, start_valkey_sentinel
from .valkey import LocalValkey, start_valkey

__all__ = [
    "LocalPostgres",
    "LocalStoreError",
    "LocalValkey",
    "LocalValkeyCluster",
    "LocalValkeySentinel",
    "free_port",
    "start_postgres",
    "start_valkey",
    "start_valkey_cluster",
    "start_valkey_sentinel",
]
