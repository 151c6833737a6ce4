"""deploy/prometheus and deploy/grafana: the alerting rules pass promtool's checks and unit tests,
link their runbook entries, and are the PrometheusRule's; a real Prometheus, scraping a real
`availability serve` with the real rules.yml, fires the Valkey-lost alert when Valkey stops and
resolves it when Valkey returns; every panel of the dashboard has data in that Prometheus.

promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it). Without
them these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from availability.local_stores import LocalValkey, free_port
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, required_tool, stop_process, store_env

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "availability.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
ALERTS_TABLE = ROOT / "deploy" / "kubernetes" / "README.md"

SCRAPE_SECONDS = 2
"""The live Prometheus's scrape and evaluation interval."""
SLACK_SECONDS = 30
"""On top of what Prometheus itself needs: this 2-core machine is shared with other suites."""
DASHBOARD_VARIABLES = {"$job": "availability", "$instance": ".*", "$__rate_interval": "5m"}


FOR_SCALE = 10
"""The live Prometheus evaluates rules.yml with every `for` this many times shorter (1m: 6 s),
so the suite does not wait out a minute of pending; the expressions are the file's own, and
promtool's unit tests (rules.test.yml) hold the real `for` durations."""


def rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def quick_rules() -> dict[str, Any]:
    """rules.yml with every `for` FOR_SCALE times shorter."""
    spec: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in spec["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{_seconds(rule['for']) / FOR_SCALE:g}s"
    return spec


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, variables made concrete."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def prometheus_rule() -> str:
    """deploy/kubernetes/monitoring/prometheusrule.yaml as generated from rules.yml."""

    def block_strings(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, block_strings)
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "availability", "labels": {"app.kubernetes.io/name": "availability"}},
        "spec": yaml.safe_load(RULES.read_text()),
    }
    header = (
        "# Generated from deploy/prometheus/rules.yml: edit that file, then run\n"
        "#   .venv/bin/python -m tests.test_deploy_prometheus\n"
    )
    return header + yaml.dump(rule, Dumper=Dumper, sort_keys=False, width=100)


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = required_tool("promtool")
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run(
            [promtool, *command], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a unit test"


def test_the_issue_s_alerts_exist_and_each_links_its_runbook_entry() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert {
        "AvailabilityValkeyLost",
        "AvailabilityFallbacksRising",
        "AvailabilityValkeyBreakerOpen",
        "AvailabilityMirrorUntrusted",
        "AvailabilityDriftHealed",
        "AvailabilityMassStaleGuardTripped",
        "AvailabilitySweepNotRunning",
        "AvailabilityInstanceSilent",
        "AvailabilityRpcErrors",
        "AvailabilityRpcLatencyHigh",
        "AvailabilityWatchOverflows",
        "AvailabilityValkeySlow",
        "AvailabilityPostgresSlow",
        "AvailabilityPostgresPoolExhausted",
    } <= set(alerts)
    runbook = RUNBOOK.read_text()
    runbook = runbook[runbook.index("## Runbook") :]
    alerting = ALERTS_TABLE.read_text()
    for name, rule in alerts.items():
        url = rule["annotations"]["runbook_url"]
        anchor = url.removeprefix("docs/runbook.md#")
        assert url == f"docs/runbook.md#{anchor}", (name, url)
        assert f'<a id="{anchor}"></a>' in runbook, f"{name}: no runbook entry {anchor}"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        # The Kubernetes guide's table of alerts names each one, with its runbook link.
        assert f"`{name}`" in alerting, name
        assert f"(../../docs/runbook.md#{anchor})" in alerting, name


def test_the_prometheus_rule_object_carries_rules_yml() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheus_rule(), (
        "deploy/kubernetes/monitoring/prometheusrule.yaml differs from rules.yml: run "
        ".venv/bin/python -m tests.test_deploy_prometheus"
    )
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    text = DASHBOARD.read_text()
    assert not re.search(r'"uid": "(?!\$\{datasource\}|availability-service|-- Grafana --)', text)
    titles = " ".join(p["title"] for p in panels).lower()
    for shown in ("rpc rate", "errors", "latency", "fallbacks", "breaker", "sweep runs"):
        assert shown in titles
    for shown in ("sweep duration", "affected", "drift", "watchers", "online and available"):
        assert shown in titles
    for shown in ("valkey operation time", "postgres operation time", "postgres pool", "rss"):
        assert shown in titles


# The live test: a real Prometheus scrapes a real `availability serve`.


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def alert_state(self, name: str) -> str | None:
        """pending, firing, or None (inactive or resolved) for this alert."""
        states = {a["state"] for a in self.get("/api/v1/alerts")["alerts"] if _named(a, name)}
        return "firing" if "firing" in states else next(iter(states), None)


def _named(alert: dict[str, Any], name: str) -> bool:
    return bool(alert["labels"].get("alertname") == name)


def _wait_health(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise AssertionError(f"availability serve not SERVING within 60 s:\n{log.read_text()[-3000:]}")


@dataclass
class Served:
    address: str
    metrics_address: str


@pytest.fixture
def served(
    settings: Settings, own_valkey: LocalValkey, db: asyncpg.Connection, tmp_path: Path
) -> Iterator[Served]:
    """`availability serve` on the run's database (its tables emptied first) and the test's own
    Valkey, with sweeps every few seconds so the dashboard's sweep panels fill in the test."""
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = store_env(
        replace(settings, valkey_url=own_valkey.url),
        address,
        METRICS_ADDRESS=metrics,
        MIGRATE_ON_START="false",
        MITRA_AUTO_OFFLINE_SWEEP_SECONDS="2",
        HEARTBEAT_MIRROR_INTERVAL_SECONDS="2",
        VALKEY_ONLINE_MIRROR_SWEEP_SECONDS="3",
        LOG_FORMAT="text",
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        _wait_health(address, process, log)
        yield Served(address, metrics)
    finally:
        stop_process(process)


@pytest.fixture
def prometheus(served: Served, tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus of the test's own (its folder, a free port), scraping the server and
    evaluating the repository's rules.yml, its `for` durations shortened (FOR_SCALE)."""
    binary = required_tool("prometheus")
    folder = tmp_path / "prometheus"
    folder.mkdir()
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_SECONDS}s",
            "scrape_timeout": f"{SCRAPE_SECONDS}s",
            "evaluation_interval": f"{SCRAPE_SECONDS}s",
        },
        "rule_files": [str(folder / "rules.yml")],
        "scrape_configs": [
            {"job_name": "availability", "static_configs": [{"targets": [served.metrics_address]}]}
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    (folder / "rules.yml").write_text(yaml.safe_dump(quick_rules()))
    address = f"127.0.0.1:{free_port()}"
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=out,
        )
    try:
        url = f"http://{address}"
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        stop_process(process)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def _traffic(address: str, mitras: list[str], calls: list[int]) -> None:
    """What callers do, five times a second, whatever the stores' state: heartbeats, reads,
    a write, the beacon, and a lookup of an unknown id (NOT_FOUND)."""
    unknown = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        while True:
            for call in (
                *(stub.Heartbeat(pb.HeartbeatRequest(mitra_id=m), timeout=5) for m in mitras),
                stub.SetOnline(pb.SetOnlineRequest(mitra_id=mitras[0]), timeout=5),
                stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitras[1]), timeout=5),
                stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=unknown), timeout=5),
                stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=5), timeout=5),
                stub.CountAvailableMitras(pb.CountAvailableMitrasRequest(), timeout=5),
            ):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call
                calls[0] += 1
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _running(task: asyncio.Task[None]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(check: Any, timeout: float, what: str) -> float:
    """Poll check (a blocking function) twice a second until true; the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        await asyncio.sleep(0.5)
    return time.monotonic() - started


@pytest.mark.slow(seconds=25)
@pytest.mark.timeout(600)
async def test_valkey_lost_alert_fires_and_resolves_in_a_real_prometheus_and_panels_have_data(
    served: Served, prometheus: Prometheus, own_valkey: LocalValkey, fleet: Fleet
) -> None:
    lost = next(r for r in rules() if r["alert"] == "AvailabilityValkeyLost")
    for_seconds = _seconds(lost["for"]) / FOR_SCALE
    mitras = [str(await fleet.mitra(f"Mitra {i}", online=True)) for i in range(4)]
    calls = [0]
    traffic = asyncio.create_task(_traffic(served.address, mitras, calls))
    async with _running(traffic):

        def every_sweep_scraped() -> bool:
            ran = prometheus.get("/api/v1/query", query="availability_sweep_runs_total > 0")
            return len(ran["result"]) == 3

        await _until(every_sweep_scraped, 90, "the three sweeps ran and were scraped")
        assert prometheus.alert_state("AvailabilityValkeyLost") is None

        await asyncio.to_thread(own_valkey.stop)
        fired_after = await _until(
            lambda: prometheus.alert_state("AvailabilityValkeyLost") == "firing",
            for_seconds + 2 * SCRAPE_SECONDS + SLACK_SECONDS,
            "AvailabilityValkeyLost firing after Valkey stopped",
        )
        await asyncio.to_thread(own_valkey.start)
        resolved_after = await _until(
            lambda: prometheus.alert_state("AvailabilityValkeyLost") is None,
            2 * SCRAPE_SECONDS + SLACK_SECONDS,
            "AvailabilityValkeyLost resolved after Valkey returned",
        )
        print(
            f"\nAvailabilityValkeyLost (for: {for_seconds:g} s, scrape and evaluation every "
            f"{SCRAPE_SECONDS} s): fired {fired_after:.1f} s after Valkey stopped, resolved "
            f"{resolved_after:.1f} s after it was back"
        )
        # Prometheus holds it pending for `for` first: the real rules.yml was evaluated.
        assert fired_after >= for_seconds

        def sweeps_ran_again() -> bool:
            query = "sum(increase(availability_sweep_runs_total[10s])) > 0"
            return bool(prometheus.get("/api/v1/query", query=query)["result"])

        await _until(sweeps_ran_again, 60, "the sweeps ran again on the new Valkey")
    assert calls[0] > 100

    empty = [
        (title, expr)
        for title, expr in dashboard_queries()
        if not prometheus.get("/api/v1/query", query=expr)["result"]
    ]
    assert not empty, f"dashboard queries without data: {empty}"
    for group in prometheus.get("/api/v1/rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    names = set(prometheus.get("/api/v1/label/__name__/values"))
    used = re.findall(r"\b(?:availability|grpc_server)_\w+", RULES.read_text())
    used += [n for _, expr in dashboard_queries() for n in re.findall(r"\b[a-z_]+(?={)", expr)]
    assert set(used) - {"up"} <= names, set(used) - names


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(int(duration[:-1]) * units[duration[-1]])


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
