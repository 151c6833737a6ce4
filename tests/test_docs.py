"""The docs that are generated from the code match it: the API reference (from the protos'
comments) and the configuration (from the CLI parser and Settings). `make docs` rewrites
both."""

from __future__ import annotations

import re

import pytest

from tools import api_reference, configuration


@pytest.mark.parametrize("tool", [api_reference, configuration], ids=["api", "configuration"])
def test_generated_docs_match_the_code(tool: object) -> None:
    target = tool.TARGET  # type: ignore[attr-defined]
    assert target.exists(), f"{target.name} is missing: run make docs"
    assert target.read_text() == tool.render(), (  # type: ignore[attr-defined]
        f"{target.relative_to(tool.ROOT)} is out of date: run make docs"  # type: ignore[attr-defined]
    )


def test_every_setting_has_its_docstring() -> None:
    import dataclasses

    from availability.settings import Settings

    documented = configuration.setting_docs()
    assert [f.name for f in dataclasses.fields(Settings) if f.name not in documented] == []


RESULTS = ("bench/RESULTS.md", "bench/CHAOS.md", "bench/SOAK.md")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _table(path: str, header: str) -> list[list[str]]:
    """The rows of the table under `header` (its first row) in `path`, as lists of cells."""
    lines = (api_reference.ROOT / path).read_text().splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.parametrize(
    ("path", "header", "columns"),
    [
        # the figure and what it stands next to
        ("bench/README.md", "| case | figure | next to |", slice(1, 3)),
        # the figure only: the last column is arithmetic on it
        ("docs/deployment.md", "| what | figure | so |", slice(1, 2)),
        # the trust table: every column after the fault's name
        (
            "docs/deployment.md",
            "| fault | replaced marker gone after | reads served from the replaced data set"
            " | cache answers again after |",
            slice(1, 4),
        ),
    ],
    ids=["bench-readme", "sizing", "trust"],
)
def test_every_quoted_figure_is_a_row_of_the_results(
    path: str, header: str, columns: slice
) -> None:
    """The docs quote the figures of bench/RESULTS.md (and the chaos and soak files),
    never their own: each number of a quoting table's figure columns is in one of them."""
    results = "".join((api_reference.ROOT / name).read_text() for name in RESULTS)
    rows = _table(path, header)
    assert rows, f"{path}'s table {header}"
    missing = [
        f"{row[0]}: {number}"
        for row in rows
        for cell in row[columns]
        for number in NUMBER.findall(cell.replace("`", ""))
        if number not in results
    ]
    assert missing == [], missing
