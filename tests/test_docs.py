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


RESULTS = ("bench/RESULTS.md", "bench/CHAOS.md", "bench/TRUST.md", "bench/SOAK.md")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def test_every_headline_figure_is_a_row_of_the_results() -> None:
    """bench/README.md quotes the figures of bench/RESULTS.md (and the chaos, trust and soak
    files), never its own: each number of its table's figure columns is in one of them."""
    root = api_reference.ROOT
    results = "".join((root / name).read_text() for name in RESULTS)
    table = [
        line
        for line in (root / "bench" / "README.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| case", "| ---"))
    ]
    assert table, "bench/README.md's headline table"
    missing = []
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for cell in cells[1:3]:  # the figure and what it stands next to
            for number in NUMBER.findall(cell.replace("`", "")):
                if number not in results:
                    missing.append(f"{cells[0]}: {number}")
    assert missing == [], missing
