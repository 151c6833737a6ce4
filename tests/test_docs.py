"""The docs that are generated from the code match it: the API reference (from the protos'
comments) and the configuration (from the CLI parser and Settings). `make docs` rewrites
both."""

from __future__ import annotations

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
