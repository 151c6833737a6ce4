"""docs/configuration.md from the code: every command and option (the CLI parser,
availability/cli.py) and every setting (the Settings dataclass, availability/settings.py:
its name, type, default and the docstring under it). `make docs` writes it;
tests/test_docs.py fails when the file and the code disagree, or a setting has no docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
from collections.abc import Iterator

from availability import cli
from availability.settings import Settings
from tools import ROOT, write

TARGET = ROOT / "docs" / "configuration.md"
SETTINGS_SOURCE = ROOT / "availability" / "settings.py"


def setting_docs() -> dict[str, str]:
    """Each Settings field's docstring (the string literal right under it)."""
    tree = ast.parse(SETTINGS_SOURCE.read_text())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            body = node.body
            for at, statement in enumerate(body):
                if not (
                    isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                ):
                    continue
                following = body[at + 1] if at + 1 < len(body) else None
                if (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                ):
                    found[statement.target.id] = " ".join(following.value.value.split())
    return found


def _default(field: dataclasses.Field[object]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{','.join(map(str, value))}`" if value else "(empty)"
    if value == "":
        return "(empty)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _settings() -> Iterator[str]:
    docs = setting_docs()
    missing = [f.name for f in dataclasses.fields(Settings) if f.name not in docs]
    if missing:
        raise SystemExit(f"settings without a docstring in {SETTINGS_SOURCE.name}: {missing}")
    yield "| setting | default | meaning |"
    yield "| --- | --- | --- |"
    for field in dataclasses.fields(Settings):
        meaning = docs[field.name].replace("|", "\\|")
        yield f"| `{field.name.upper()}` | {_default(field)} | {meaning} |"


def _option(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest}`" + (" (optional)" if action.nargs == "?" else "")
    default = ""
    if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        default = f" (default `{action.default}`)"
    return f"{name}{default}"


def _commands() -> Iterator[str]:
    top = cli.parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for name, command in subparsers.choices.items():
        yield f"### `availability {name}`"
        yield ""
        yield f"{helps.get(name) or command.description or ''}".strip()
        yield ""
        options = [a for a in command._actions if not isinstance(a, argparse._HelpAction)]
        if not options:
            yield "No options."
            yield ""
            continue
        yield "| option | meaning |"
        yield "| --- | --- |"
        for action in options:
            meaning = (action.help or "").replace("|", "\\|")
            yield f"| {_option(action)} | {meaning} |"
        yield ""


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from the code by `make docs` (the CLI parser in `availability/cli.py`, the",
        "`Settings` dataclass in `availability/settings.py`); edit those, not this file.",
        "`tests/test_docs.py` fails when the two disagree.",
        "",
        "## Commands",
        "",
        "`availability --version` prints the version and commit.",
        "",
        *_commands(),
        "## Settings",
        "",
        "All from the environment, read once and validated at start-up: a bad value stops the",
        "process with one line naming the setting (exit code 2). Booleans take `true`/`false`",
        "(also `1`/`0`, `yes`/`no`); lists are comma-separated.",
        "",
        *_settings(),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    write(TARGET, render())


if __name__ == "__main__":
    main()
