"""A throwaway Sentinel group: a primary, its replica and three sentinels, each a local
server, so a test can kill or pause the master and watch the sentinels promote the replica."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .process import _HOST, LocalStoreError, _start_on_port
from .valkey import LocalValkey, _client, _valkey_binary, _wait_until


@dataclass(eq=False)
class _LocalSentinel(LocalValkey):
    """A Sentinel: the server in sentinel mode, on a config file of its own, which it rewrites
    as it learns the replicas, the other sentinels and each failover."""

    config: str = ""

    _name: ClassVar[str] = "sentinel"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "sentinel.conf"

    def _prepare(self) -> None:
        super()._prepare()
        if not self.config_path.exists():
            self.config_path.write_text(self.config)

    def _command(self) -> list[str]:
        return [
            _valkey_binary(),
            str(self.config_path),
            "--sentinel",
            *("--port", str(self.port), "--bind", _HOST, "--dir", str(self.data_dir)),
            *("--daemonize", "no", "--logfile", ""),
            *self.extra_args,
        ]


@dataclass(eq=False)
class LocalValkeySentinel:
    """A primary, its replica and three sentinels watching them (quorum 2), each a local
    server, so a test can kill or pause the master and watch the sentinels promote the replica.
    """

    master_name: str
    nodes: list[LocalValkey]
    sentinel_nodes: list[LocalValkey]

    @property
    def sentinels(self) -> list[str]:
        """Every sentinel's host:port, as VALKEY_SENTINELS lists them."""
        return [f"{_HOST}:{sentinel.port}" for sentinel in self.sentinel_nodes]

    def master(self) -> LocalValkey:
        """The data node a running sentinel names master now."""
        with _client(self._running_sentinels()[0]) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.master_name)
        for node in self.nodes:
            if node.port == int(port):
                return node
        raise LocalStoreError(f"the sentinels name port {port}, which is none of ours")

    def replicas(self) -> list[LocalValkey]:
        """The running data nodes replicating the master, by their own account."""
        master = self.master()
        replicas = []
        for node in self.nodes:
            if not node.running or node is master:
                continue
            with _client(node) as valkey:
                info = valkey.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                replicas.append(node)
        return replicas

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Waits until every running sentinel names the same running master, which says it is
        one, knows the other running sentinels and every running replica, and each running
        replica is linked to that master: only then can the sentinels fail it over."""
        self._wait_until(self._trouble, timeout)

    def wait_failover(self, old_master: LocalValkey, timeout: float = 10.0) -> None:
        """Waits until the sentinels name a master other than `old_master` and `wait_ok` holds."""

        def trouble() -> str | None:
            if (problem := self._trouble()) is not None:
                return problem
            if self.master() is old_master:
                return f"the sentinels still name port {old_master.port}"
            return None

        self._wait_until(trouble, timeout)

    def stop(self) -> None:
        """Stops the sentinels first, so none fails over a node while it stops, then the nodes."""
        for server in (*self.sentinel_nodes, *self.nodes):
            server.stop()

    def _running_sentinels(self) -> list[LocalValkey]:
        running = [sentinel for sentinel in self.sentinel_nodes if sentinel.running]
        if not running:
            raise LocalStoreError("no sentinel is running")
        return running

    def _trouble(self) -> str | None:
        """Why the sentinels could not fail the master over yet, or None once they could."""
        sentinels = self._running_sentinels()
        running = {node.port for node in self.nodes if node.running}
        named = set()
        for sentinel in sentinels:
            with _client(sentinel) as valkey:
                state = valkey.sentinel_master(self.master_name)
                known = valkey.sentinel_slaves(self.master_name)
            assert isinstance(state, dict)
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return f"sentinel {sentinel.port} sees the master as {state['flags']}"
            if state["num-other-sentinels"] < len(sentinels) - 1:
                return f"sentinel {sentinel.port} knows {state['num-other-sentinels']} others"
            up = {int(r["port"]) for r in known if not r["is_sdown"] and not r["is_odown"]}
            if missing := running - {int(state["port"])} - up:
                return f"sentinel {sentinel.port} does not know replicas {sorted(missing)}"
            named.add(int(state["port"]))
        if len(named) > 1:
            return f"the sentinels name different masters: {sorted(named)}"
        master = named.pop()
        if master not in running:
            return f"the sentinels name port {master}, which is not running"
        for node in self.nodes:
            if not node.running:
                continue
            with _client(node) as valkey:
                info = valkey.info("replication")
            if node.port == master and info["role"] != "master":
                return f"port {master} is named master but says it is a {info['role']}"
            if node.port != master and info.get("master_link_status") != "up":
                return f"replica on port {node.port} is not linked to the master"
        return None

    def _wait_until(self, trouble: Callable[[], str | None], timeout: float) -> None:
        _wait_until(trouble, timeout, "Sentinel", (*self.sentinel_nodes, *self.nodes))


def start_valkey_sentinel(
    data_dir: Path,
    master_name: str = "availability",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 2000,
) -> LocalValkeySentinel:
    """Runs a primary, a replica of it and three sentinels (quorum 2), each in a directory of
    its own under `data_dir`, and returns once `wait_ok` holds. The sentinels count the master
    down after `down_after_ms` without an answer, so a failover takes a few seconds; a failed
    attempt is retried after twice `failover_timeout_ms`."""
    replication = ("--repl-diskless-sync-delay", "0")

    def node(port: int, *extra: str) -> LocalValkey:
        return LocalValkey(Path(data_dir) / f"node-{port}", port, extra_args=(*replication, *extra))

    group = LocalValkeySentinel(master_name, [], [])
    try:
        primary = _start_on_port(node, None)
        group.nodes.append(primary)
        follow = ("--replicaof", _HOST, str(primary.port))
        group.nodes.append(_start_on_port(lambda port: node(port, *follow), None))
        config = (
            f"sentinel monitor {master_name} {_HOST} {primary.port} 2\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )
        for _ in range(3):
            group.sentinel_nodes.append(
                _start_on_port(
                    lambda port: _LocalSentinel(
                        Path(data_dir) / f"sentinel-{port}", port, config=config
                    ),
                    None,
                )
            )
        group.wait_ok(timeout=30.0)
    except BaseException:
        group.stop()
        raise
    return group
