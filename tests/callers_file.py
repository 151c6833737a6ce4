"""Writing AUTH_CALLERS_FILE as an operator would: digests of tokens, never tokens, and a
new file renamed over the old one (so the server never reads half of it)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from availability.callers import hash_token


def token(name: str) -> str:
    return f"{name}-{secrets.token_urlsafe(24)}"


def callers_toml(callers: Mapping[str, Mapping[str, object]]) -> str:
    """[callers.NAME] tables; a `tokens` entry is written as token_sha256 of those tokens."""
    lines = []
    for name, spec in callers.items():
        lines.append(f'[callers."{name}"]')
        for key, value in spec.items():
            if key == "tokens":
                key, value = "token_sha256", [hash_token(t) for t in value]  # type: ignore[union-attr]
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def write_callers(path: Path, callers: Mapping[str, Mapping[str, object]] | str) -> None:
    text = callers if isinstance(callers, str) else callers_toml(callers)
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(text)
    fresh.chmod(0o600)  # whatever the umask: a file others may write is refused
    os.replace(fresh, path)
