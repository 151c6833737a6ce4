"""The Node.js client's own suite (clients/node, `node --test`), built from the lock and run
against a real `availability serve` from this venv: a test of this suite, so that a parallel
`make test` runs it on one worker while the others go on (`make test-node` runs it alone)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .helpers import required_tool

NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"


def _tail(result: subprocess.CompletedProcess[str], lines: int = 80) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


@pytest.mark.servers
@pytest.mark.slow(seconds=100)
@pytest.mark.timeout(1800)
def test_the_node_client_builds_and_passes_its_suite() -> None:
    npm = required_tool("npm")
    if not (NODE_CLIENT / "node_modules" / ".installed").exists():
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert installed.returncode == 0, _tail(installed)
        (NODE_CLIENT / "node_modules" / ".installed").touch()
    built = subprocess.run(
        [npm, "run", "--silent", "build"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, _tail(built)
    tested = subprocess.run(
        [npm, "test"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=1800, check=False
    )
    print(_tail(tested, 12))
    assert tested.returncode == 0, _tail(tested)
    assert "\N{INFORMATION SOURCE} fail 0" in tested.stdout, _tail(tested)
