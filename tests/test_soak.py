"""The short version of `make soak`: the same load, faults, sampling and checks for two
minutes, with a fault every 25 s (Valkey restarted, Valkey slow, Postgres slow, Postgres
restarted). The invariant holds, no caller sees a code it should not, `availability status`
names each slow store, the stores agree afterwards, nothing grows and p99 comes back."""

from __future__ import annotations

import pytest

from bench import soak


@pytest.mark.slow(seconds=125)
async def test_two_minutes_of_load_and_faults_leak_nothing_and_break_nothing() -> None:
    # Two minutes are a warm-up and four faults 22 s apart: a minute's trend moves more than
    # an hour's, and a p99 of 10 s (a few dozen calls: about their slowest) begins 2 s after
    # a fault; so it allows a fifth of growth where `make soak` allows 5 % (over its last 30
    # minutes), and 10x the baseline plus half a second where `make soak` allows 2x plus
    # 10 ms: enough to catch calls that wait out a store's timeout (seconds), not a slow call
    # on a machine that runs the rest of the suite beside it (432 ms against a 42 ms baseline
    # once, in a clean-clone run of six workers).
    outcome = await soak.run(
        2.0,
        fault_every=22.0,
        sample_seconds=10.0,
        mitras=200,
        fault_seconds=10.0,
        recovered_seconds=10.0,
        max_growth=0.2,
        back_factor=10.0,
        back_slack=0.5,
    )

    assert outcome.problems == []
    assert [f.kind for f in outcome.faults] == list(soak.FAULTS)
    assert [f.named for f in outcome.faults if "slow" in f.kind] == [True, True]
    assert len(outcome.samples) >= 10
    for sample in outcome.samples:
        assert set(sample.resources) == set(soak.RESOURCES)
        assert sample.resources["rss_mb"] > 0 and sample.resources["fds"] > 0
        assert sample.resources["tasks"] > 0
    assert sum(outcome.invariant.reads.values()) > 0
    assert outcome.baseline.get("FindAvailableMitras", 0) > 0
