"""deploy/kubernetes: the base and the example overlay, rendered by kustomize (the one built
into kubectl), are valid objects of a pinned Kubernetes release's schemas, and hold what the
deploy/kubernetes/README.md promises: probes on the health service, a drain that fits the
server's, settings the service accepts, migrations in a Job and not at start-up.

kubectl is required: without it these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import functools
import inspect
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from availability import server
from availability.settings import Settings
from availability.version import VERSION

from .helpers import required_tool
from .test_deploy_prometheus import RULES

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "production"
SECRETS_EXAMPLE = OVERLAY / "secrets.example.yaml"
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
"""Pinned: a recent release, and the newest whose schemas kubernetes-validate ships."""
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}
"""The prometheus-operator's kinds: kubernetes-validate has no schema of custom resources."""


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` makes of the folder, as `kubectl apply -k` applies them."""
    return [doc for doc in yaml.safe_load_all(_kustomize(required_tool("kubectl"), folder)) if doc]


@functools.cache
def _kustomize(kubectl: str, folder: Path) -> str:
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def one(objects: list[dict[str, Any]], kind: str, name: str = "availability") -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def settings_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("availability-settings")
    ]
    return found


@pytest.mark.parametrize("folder", [KUBERNETES / "base", OVERLAY], ids=["base", "overlay"])
def test_rendered_manifests_are_valid_kubernetes_objects(folder: Path) -> None:
    objects = render(folder)
    if folder == OVERLAY:
        objects += list(yaml.safe_load_all(SECRETS_EXAMPLE.read_text()))
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"NetworkPolicy", "ConfigMap", "Job", "ServiceAccount"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for manifest in objects:
            if manifest["kind"] in OPERATOR_KINDS:
                continue
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{manifest['kind']}/{manifest['metadata']['name']} on {version}: "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}"
                ) from None


def test_the_overlay_sets_namespace_image_and_its_own_settings() -> None:
    objects = render(OVERLAY)
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"availability"}
    pods = [one(objects, "Deployment"), one(objects, "Job", "availability-migrate")]
    images = {c["image"] for p in pods for c in p["spec"]["template"]["spec"]["containers"]}
    assert images == {f"registry.example.com/platform/availability:{VERSION}"}
    data = settings_map(objects)["data"]
    assert data["VALKEY_KEY_PREFIX"] == "availability-jakarta"
    assert float(data["GRPC_MAX_CONNECTION_AGE_SECONDS"]) > 0, "clients re-resolve"
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 20
    egress = one(objects, "NetworkPolicy")["spec"]["egress"]
    assert all("ipBlock" in rule["to"][0] for rule in egress[1:])
    rule = one(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_the_base_names_the_image_make_image_builds_at_this_version() -> None:
    objects = render(KUBERNETES / "base")
    pods = [one(objects, "Deployment"), one(objects, "Job", "availability-migrate")]
    images = {c["image"] for p in pods for c in p["spec"]["template"]["spec"]["containers"]}
    assert images == {f"availability:{VERSION}"}


def test_the_deployment_probes_health_drains_like_the_server_and_runs_locked_down() -> None:
    objects = render(OVERLAY)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 3
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    assert container["command"] == ["availability", "serve"]

    spread = pod["topologySpreadConstraints"]
    zones = [c for c in spread if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert zones and zones[0]["labelSelector"]["matchLabels"].items() <= labels.items()

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = server.SERVICE_NAMES[0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == service
    assert container["startupProbe"]["grpc"]["service"] == service
    startup = container["startupProbe"]
    assert (
        startup["periodSeconds"] * startup["failureThreshold"]
        >= Settings(database_url="postgresql://x", valkey_url="redis://x").startup_timeout_seconds
        + 5
    ), "the start-up probe outlasts serve's wait for Postgres"

    # The drain: preStop, then Server.stop's grace for in-flight calls, and its bounded steps
    # (watches, sweeps, the rest) before the SIGKILL.
    grace = inspect.signature(server.Server.stop).parameters["grace"].default
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + grace + 3 * server._STEP_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= needed

    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    for workload in (pod, one(objects, "Job", "availability-migrate")["spec"]["template"]["spec"]):
        assert workload["automountServiceAccountToken"] is False
        assert workload["securityContext"]["runAsNonRoot"] is True
        for each in workload["containers"]:
            assert each["securityContext"]["readOnlyRootFilesystem"] is True
            assert each["securityContext"]["allowPrivilegeEscalation"] is False
    account = one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_migrations_run_in_a_job_and_not_when_the_deployment_starts() -> None:
    objects = render(OVERLAY)
    [container] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"name": "MIGRATE_ON_START", "value": "false"} in container["env"]
    job = one(objects, "Job", "availability-migrate")
    [migrate] = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"] == ["availability", "migrate"]
    # The same settings, and last the owner's DATABASE_URL (two database roles).
    owner = {"secretRef": {"name": "availability-migrate"}}
    assert migrate["envFrom"] == [*container["envFrom"], owner]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_service_is_headless_and_the_budgets_select_the_servers() -> None:
    objects = render(OVERLAY)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "metrics"}
    monitor = one(objects, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    assert labels[monitor["jobLabel"]] == "availability", "the rules' job label"


def test_the_settings_and_the_example_secrets_are_settings_the_service_accepts() -> None:
    objects = render(OVERLAY)
    [container] = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(SECRETS_EXAMPLE.read_text())}
    env = {
        **settings_map(objects)["data"],
        **secrets["availability-secrets"]["stringData"],
        **{e["name"]: e["value"] for e in container["env"]},
    }
    known = {name.upper() for name in Settings.__dataclass_fields__}
    assert set(env) - known == {"PYTHONDONTWRITEBYTECODE"}
    settings = Settings.from_env(env)
    assert not settings.migrate_on_start
    assert settings.auth_tokens, "beyond loopback: tokens"
    assert settings.metrics_address.startswith("0.0.0.0:")
    assert settings.metrics_address.endswith(":9464")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/availability/tls/ca.crt" in env["DATABASE_URL"]
    assert env["DATABASE_URL"].count(mounts["tls"]) == 1
    assert "ca.crt" in secrets["availability-tls"]["stringData"]


def test_the_readme_s_first_apply_holds_what_the_job_needs_and_no_server() -> None:
    """deploy/kubernetes/README.md, apply order: `kubectl apply -k ... -l
    'app.kubernetes.io/component!=server'` before the Job is waited for, then everything."""
    objects = render(OVERLAY)
    first = [
        o
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "server"
    ]
    kinds = {o["kind"] for o in first}
    assert "Job" in kinds
    assert not kinds & {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    job = one(first, "Job", "availability-migrate")["spec"]["template"]["spec"]
    assert one(first, "ServiceAccount", job["serviceAccountName"])
    [migrate] = job["containers"]
    config = [e["configMapRef"]["name"] for e in migrate["envFrom"] if "configMapRef" in e]
    assert config == [settings_map(first)["metadata"]["name"]]
    assert one(first, "NetworkPolicy"), "the Job's egress to Postgres"


def test_the_migration_job_connects_as_the_owner_and_the_servers_as_the_runtime_role() -> None:
    """Two database roles: only the Job gets the owner's DATABASE_URL (its Secret comes last,
    so it wins); the serving pods never reference it."""
    objects = render(OVERLAY)
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(SECRETS_EXAMPLE.read_text())}

    def sources(kind: str, name: str) -> list[str]:
        [container] = one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
        return [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]

    assert sources("Job", "availability-migrate")[-1] == "availability-migrate"
    assert "availability-migrate" not in sources("Deployment", "availability")
    owner = secrets["availability-migrate"]["stringData"]["DATABASE_URL"]
    runtime = secrets["availability-secrets"]["stringData"]["DATABASE_URL"]
    assert owner.split("@")[0].rpartition(":")[0] != runtime.split("@")[0].rpartition(":")[0]
