"""The short version of `python -m bench.chaos`: mixed load while Valkey (a single node, the
master of the mirror's slot in a Valkey Cluster, or the primary behind Sentinel) is killed and
restarted, restored from an older snapshot, flushed, shared with a newer layout and rolled
back, and Postgres restarts; nothing acknowledged is lost, everything heals, and no read that
started after a deactivation was acknowledged serves that mitra."""

from __future__ import annotations

import pytest

from bench import chaos

NEW_FAULTS = ("valkey restored", "flushall", "layout bump", "layout rollback")


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("mode", chaos.MODES)
async def test_nothing_acknowledged_is_lost_and_nothing_deactivated_is_served(mode: str) -> None:
    outcome = await chaos.run(seconds_per_phase=2.0, mitras=60, report=None, mode=mode)

    assert outcome.problems == []
    counts = outcome.tally.counts
    assert not {code for (_, _, code) in counts} & {"INTERNAL", "UNKNOWN"}
    valkey_down = {
        (rpc, code): n for (phase, rpc, code), n in counts.items() if phase == "valkey killed"
    }
    assert valkey_down.get(("FindAvailableMitras", "OK"), 0) > 0
    assert not any(code != "OK" for (rpc, code) in valkey_down if rpc == "FindAvailableMitras"), (
        "reads answer from Postgres while Valkey is down"
    )
    checked = outcome.invariant.reads
    for phase in NEW_FAULTS if mode == "single" else ():
        for rpc in ("FindAvailableMitras", "IsMitraReachable"):
            assert counts.get((phase, rpc, "OK"), 0) > 0, f"{phase}: no {rpc} answered"
        assert checked[phase] > 0, f"{phase}: no read checked against the invariant"
    assert sum(checked.values()) > 0
    assert checked["valkey killed"] > 0
    assert any(code == "OK" for (phase, _, code) in counts if phase == "recovery")
