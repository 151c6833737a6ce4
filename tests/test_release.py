"""What makes a build shippable: the lock alone decides what is installed, the generated code
matches the locked tools, and one version (pyproject.toml's) is what `--version`, `status`,
the start-up log, the build-info metric, the Node client, the manifests and the CHANGELOG say."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from availability.server import Server, running
from availability.settings import Settings
from availability.version import VERSION, commit

from .helpers import scrape_metrics
from .test_status import reported

ROOT = Path(__file__).resolve().parent.parent
LOCKED = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
RELEASES = tomllib.loads((ROOT / "releases.toml").read_text())["release"]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_the_lock_agrees_with_pyproject() -> None:
    """`make lock` after editing pyproject.toml; `make install` refuses a stale lock too."""
    checked = subprocess.run(
        [str(ROOT / ".tools/bin/uv"), "lock", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert LOCKED["availability"] == VERSION


def test_every_locked_package_is_pinned_by_hash() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    for package in lock["package"]:
        if package["name"] == "availability":
            continue
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files, package["name"]
        assert all(f["hash"].startswith("sha256:") for f in files), package["name"]


def test_the_generated_code_matches_the_locked_grpcio_tools() -> None:
    for module in (ROOT / "availability/v1").glob("*_pb2_grpc.py"):
        [generated] = re.findall(r"GRPC_GENERATED_VERSION = '([^']+)'", module.read_text())
        assert generated == LOCKED["grpcio-tools"], f"{module.name}: run make protos"
    assert _version_key(LOCKED["grpcio"]) >= _version_key(LOCKED["grpcio-tools"])


def test_the_version_has_one_home() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == VERSION
    node = (ROOT / "clients/node/package.json").read_text()
    assert f'"version": "{VERSION}"' in node, "the Node client's version follows the service's"
    assert not re.search(r"__version__\s*=", (ROOT / "availability/__init__.py").read_text())


def test_releases_are_recorded_in_order_and_main_is_newer() -> None:
    versions = [_version_key(r["version"]) for r in RELEASES]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert _version_key(VERSION) > versions[-1], "bump pyproject's version past the last release"
    for release in RELEASES:
        found = subprocess.run(
            ["git", "cat-file", "-e", f"{release['commit']}^{{commit}}"], cwd=ROOT, check=False
        )
        assert found.returncode == 0, f"release {release['version']}: no commit {release['commit']}"


def test_the_changelog_has_this_version_and_every_release() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(VERSION)}\]", changelog, re.MULTILINE), VERSION
    for release in RELEASES:
        assert re.search(
            rf"^## \[{re.escape(release['version'])}\] - {release['date']}$",
            changelog,
            re.MULTILINE,
        ), release["version"]


def test_version_prints_the_version_and_commit() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "availability", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    assert printed == f"availability {VERSION} (commit {commit()})"
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert commit().removesuffix("-dirty") == head


async def test_status_log_and_metric_agree_on_the_version(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="availability"):
        async with running(settings) as server:
            status = await reported(server)
            assert server.metrics is not None
            metrics = await scrape_metrics(server.metrics.port)
            announced = _instance(server, status)
    assert (announced["version"], announced["commit"]) == (VERSION, commit())
    build = [labels for (name, labels) in metrics if name == "availability_build_info"]
    assert build == [(("commit", commit()), ("version", VERSION))]
    assert any(
        f"version {VERSION} (commit {commit()})" in r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("serving on")
    )


def _instance(server: Server, status: dict[str, object]) -> dict[str, str]:
    instances = status["instances"]
    assert isinstance(instances, dict)
    [mine] = [
        i for i in instances.values() if i["pid"] and i["address"].endswith(f":{server.port}")
    ]
    return dict(mine)
