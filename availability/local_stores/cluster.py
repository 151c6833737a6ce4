"""A throwaway Valkey Cluster: masters and replicas, each a `LocalValkey`, joined with
`valkey-cli --cluster create`, so a test can kill a master and watch a replica take its slots."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .process import _HOST, LocalStoreError, _start_on_port, free_port
from .valkey import LocalValkey, _client, _wait_until


def _cli_binary() -> str:
    for name in ("valkey-cli", "redis-cli"):
        if found := shutil.which(name):
            return found
    raise LocalStoreError("no valkey-cli or redis-cli on PATH, which a cluster is created with")


def _slot_masters(node: LocalValkey) -> frozenset[tuple[int, int, int]]:
    """(first slot, last slot, master port) for each range, as `node` sees it."""
    with _client(node) as valkey:
        ranges = valkey.execute_command("CLUSTER", "SLOTS")
    return frozenset((int(first), int(last), int(master[1])) for first, last, master, *_ in ranges)


@dataclass(eq=False)
class LocalValkeyCluster:
    """Valkey in cluster mode, one `LocalValkey` per node, so a test can kill, pause or restart
    any node and watch a replica take over its slots.

    Full coverage is not required, so the surviving masters keep serving while a dead one's
    slots wait for failover; that also means cluster_state stays ok meanwhile, which is why
    the waits below check who serves each slot as well.
    """

    nodes: list[LocalValkey]

    @property
    def url(self) -> str:
        """A running master's, as the seed for a cluster client: it changes after a failover,
        so a client made later is never seeded with a node the test has killed."""
        masters = {port for *_, port in _slot_masters(self._running()[0])}
        for node in self._running():
            if node.port in masters:
                return node.url
        raise LocalStoreError("no running master in the Valkey cluster")

    def master_of(self, key: str) -> LocalValkey:
        """The master serving `key`'s slot, as a running node sees it now."""
        asked = self._running()[0]
        with _client(asked) as valkey:
            slot = int(valkey.execute_command("CLUSTER", "KEYSLOT", key))
        for first, last, port in _slot_masters(asked):
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == port)
        raise LocalStoreError(f"no master serves slot {slot} of {key!r}")

    def replicas_of(self, node: LocalValkey) -> list[LocalValkey]:
        """The running nodes replicating `node`, by their own account."""
        replicas = []
        for other in self._running():
            with _client(other) as valkey:
                info = valkey.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == node.port:
                replicas.append(other)
        return replicas

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Waits until every running node says cluster_state:ok, they agree on who serves each
        slot, those masters are all running, and every running replica is linked to its master."""
        self._wait_until(self._trouble, timeout)

    def wait_failover(self, key: str, old_master: LocalValkey, timeout: float = 10.0) -> None:
        """Waits until another running node serves `key`'s slot and the cluster is ok again."""

        def trouble() -> str | None:
            if (problem := self._trouble()) is not None:
                return problem
            if self.master_of(key) is old_master:
                return f"port {old_master.port} still serves {key!r}"
            return None

        self._wait_until(trouble, timeout)

    def stop(self) -> None:
        """Stops every node; a no-op for those already stopped."""
        for node in self.nodes:
            node.stop()

    def _running(self) -> list[LocalValkey]:
        running = [node for node in self.nodes if node.running]
        if not running:
            raise LocalStoreError("no node of the Valkey cluster is running")
        return running

    def _trouble(self) -> str | None:
        """Why the cluster is not yet fit to serve every slot, or None once it is."""
        running = self._running()
        views = set()
        for node in running:
            with _client(node) as valkey:
                if "cluster_state:ok" not in valkey.execute_command("CLUSTER", "INFO").split():
                    return f"port {node.port} says cluster_state is not ok"
                info = valkey.info("replication")
                if info["role"] == "slave" and info["master_link_status"] != "up":
                    return f"replica on port {node.port} is not linked to its master"
            views.add(_slot_masters(node))
        if len(views) > 1:
            return "nodes disagree on which master serves which slots"
        stopped = {port for *_, port in views.pop()} - {node.port for node in running}
        if stopped:
            return f"slots are still served by stopped masters on ports {sorted(stopped)}"
        return None

    def _wait_until(self, trouble: Callable[[], str | None], timeout: float) -> None:
        _wait_until(trouble, timeout, "Valkey cluster")


def start_valkey_cluster(
    data_dir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
) -> LocalValkeyCluster:
    """Runs masters * (1 + replicas) nodes, each in a directory of its own under `data_dir`,
    joins them with `--cluster create`, and returns once `wait_ok` holds. A node counts as
    failed after `node_timeout_ms`, so a short one makes failover quick.

    Each node's cluster bus gets a free port of its own: the default, port + 10000, is out of
    range for most ephemeral ports. Masters send their first sync to replicas at once, not
    after the default 5 s wait for more replicas to share it.
    """
    settings = (
        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no"),
        *("--repl-diskless-sync-delay", "0"),
    )

    def node(port: int) -> LocalValkey:
        bus = ("--cluster-port", str(free_port()))
        return LocalValkey(Path(data_dir) / f"node-{port}", port, extra_args=(*settings, *bus))

    cluster = LocalValkeyCluster([])
    try:
        for _ in range(masters * (1 + replicas)):
            cluster.nodes.append(_start_on_port(node, None))
        command = [
            _cli_binary(),
            "--cluster",
            "create",
            *(f"{_HOST}:{node.port}" for node in cluster.nodes),
            *("--cluster-replicas", str(replicas), "--cluster-yes"),
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TERM": "dumb"},
                timeout=60.0,
            )
        except subprocess.TimeoutExpired as expired:
            output = (expired.output or b"").decode(errors="replace")
            raise LocalStoreError(f"cluster create timed out after 60s:\n{output}") from None
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace")
            raise LocalStoreError(f"cluster create exited with {done.returncode}:\n{output}")
        cluster.wait_ok(timeout=30.0)
    except BaseException:
        cluster.stop()
        raise
    return cluster
