"""What this build is: its version (pyproject.toml's, read from the installed package's
metadata, so it has one home) and the commit it was built from."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata, resources
from pathlib import Path

VERSION = metadata.version("availability")

COMMIT_FILE = "COMMIT"
"""Written into the package by `make image` (and any wheel build that stamps it): an installed
wheel has no git history to ask."""


@functools.cache
def commit() -> str:
    """The commit this code was built from: the stamped file, else the checkout's HEAD (a
    `-dirty` suffix when the work tree differs from it), else `unknown`."""
    stamped = resources.files("availability").joinpath(COMMIT_FILE)
    if stamped.is_file():
        return stamped.read_text().strip() or "unknown"
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return "unknown"
    try:
        head = _git(checkout, "rev-parse", "--short=12", "HEAD")
        dirty = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def describe() -> str:
    """`0.2.0 (commit 1a2b3c4d5e6f)`: the line `--version` prints and the logs carry."""
    return f"{VERSION} (commit {commit()})"


def _git(checkout: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()
