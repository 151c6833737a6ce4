"""The core RPC suite again, its servers on the runtime database role that `availability
grants` gives (only what `serve` needs): every RPC's path works with least privilege, not only
as the schema's owner. The tests are test_rpcs.py's, collected a second time here with
`settings` served as that role, on the single Valkey (tests/test_roles.py covers the
dashboard, sweeps and following as that role; TEST_SERVE_AS=runtime runs any other suite
the same way)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from availability.settings import Settings

from .test_rpcs import *  # noqa: F403

pytestmark: list[pytest.MarkDecorator] = []  # not test_rpcs's single_and_cluster: once


@pytest.fixture
def settings(settings: Settings, runtime_database_url: str) -> Settings:
    return replace(settings, database_url=runtime_database_url)
