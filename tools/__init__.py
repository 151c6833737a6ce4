"""Tools for working on the project (not shipped in the package)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write(target: Path, text: str) -> None:
    """Write a generated file, saying which."""
    import sys

    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target.relative_to(ROOT)}", file=sys.stderr)
