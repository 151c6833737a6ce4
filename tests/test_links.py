"""Every link in the project's Markdown resolves: a relative path to a file or folder that
exists, and an #anchor to a heading (or an explicit <a id>) of that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"node_modules", ".venv", ".tools", "build", ".git", ".data", ".hypothesis"}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
ID = re.compile(r'<a id="([^"]+)"></a>')


def documents() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md") if not SKIP & set(p.relative_to(ROOT).parts))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation but - and _ dropped, spaces to -."""
    found, fenced = set(ID.findall(path.read_text())), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#+ (.*)", line)):
            text = re.sub(r"[^\w\- ]", "", heading[1].strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def _text_outside_code(path: Path) -> str:
    kept, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def test_every_markdown_link_resolves() -> None:
    broken = []
    for doc in documents():
        for target in LINK.findall(_text_outside_code(doc)):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not checked here
            file, _, anchor = target.partition("#")
            resolved = (doc.parent / file).resolve() if file else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.is_file() and anchor not in anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such anchor)")
    assert broken == [], "\n".join(broken)
