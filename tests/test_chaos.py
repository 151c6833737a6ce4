"""The short version of `python -m bench.chaos`: mixed load while Valkey (a single node, or
the master of the mirror's slot in a Valkey Cluster) is killed and restarted and Postgres
restarts; nothing acknowledged is lost and everything heals."""

from __future__ import annotations

import pytest

from bench import chaos


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
async def test_nothing_acknowledged_is_lost_under_store_faults(cluster: bool) -> None:
    tally, problems = await chaos.run(
        seconds_per_phase=2.0, mitras=60, report=None, cluster=cluster
    )

    assert problems == []
    codes = {code for (_, _, code) in tally.counts}
    assert not codes & {"INTERNAL", "UNKNOWN"}
    valkey_down = {
        (rpc, code): n for (phase, rpc, code), n in tally.counts.items() if phase == "valkey killed"
    }
    assert valkey_down.get(("FindAvailableMitras", "OK"), 0) > 0
    assert not any(code != "OK" for (rpc, code) in valkey_down if rpc == "FindAvailableMitras"), (
        "reads answer from Postgres while Valkey is down"
    )
    assert any(code == "OK" for (phase, _, code) in tally.counts if phase == "recovery")
