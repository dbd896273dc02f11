"""The precopy convergence policy on literal numbers (no VMM involved)."""

from __future__ import annotations

import pytest

from confplan.migration.precopy import (
    THROTTLE_MAX,
    Action,
    Limits,
    RoundStats,
    decide,
    estimate_bandwidth,
)

MIB = 1 << 20


def rnd(n: int, *, sent: int = 100 * MIB, seconds: float = 0.5, dirty_after: int = 0) -> RoundStats:
    return RoundStats(n, shared_pages=10, zero_pages=0, sealed_pages=sent // 4160, bytes_sent=sent,
                      seconds=seconds, dirty_after=dirty_after)  # fmt: skip


LIMITS = Limits(max_downtime=0.05, max_rounds=5, completion_timeout=10.0)


def test_converges_when_the_rest_fits_in_the_downtime() -> None:
    # 200 MiB/s, 0.05 s -> 10 MiB fit; 2000 pages * 4160 B = 7.9 MiB do
    decision = decide([rnd(1, dirty_after=2000)], LIMITS, elapsed=1.0)
    assert decision.action is Action.STOP_AND_COPY
    assert decision.bandwidth == pytest.approx(200 * MIB)
    assert decision.eta is not None and decision.eta < 0.05


def test_continues_while_too_much_is_dirty() -> None:
    decision = decide([rnd(1, dirty_after=10_000)], LIMITS, elapsed=1.0)
    assert decision.action is Action.CONTINUE
    assert "10000 dirty pages left" in decision.reason


def test_out_of_rounds_aborts_when_the_rest_does_not_fit() -> None:
    # max_downtime is a promise: the last round does not turn into a long pause (issue 11)
    rounds = [rnd(i, dirty_after=50_000) for i in range(1, 6)]
    decision = decide(rounds, LIMITS, elapsed=1.0)
    assert decision.action is Action.ABORT and decision.limit == "max_precopy_rounds"
    assert "5 rounds reached max_precopy_rounds (a limit of 5 here" in decision.reason
    assert "over max_downtime 50 ms" in decision.reason


def test_force_complete_accepts_the_longer_pause_and_says_so() -> None:
    limits = Limits(max_downtime=0.05, max_rounds=5, completion_timeout=10.0, on_timeout="force-complete")
    decision = decide([rnd(i, dirty_after=50_000) for i in range(1, 6)], limits, elapsed=1.0)
    assert decision.action is Action.STOP_AND_COPY and decision.forced
    assert "force-complete accepts the longer pause" in decision.reason


def test_max_rounds_is_never_exceeded() -> None:
    for policy in ("abort", "throttle", "force-complete"):
        limits = Limits(max_downtime=0.05, max_rounds=5, completion_timeout=10.0, on_timeout=policy)
        throttle = 0.0
        for n in range(1, 6):
            decision = decide([rnd(i, dirty_after=50_000) for i in range(1, n + 1)], limits, elapsed=1.0,
                              throttle=throttle)  # fmt: skip
            throttle = decision.throttle
        assert decision.action in (Action.ABORT, Action.STOP_AND_COPY), policy


def test_throttle_starts_early_enough_to_reach_its_maximum_within_the_rounds() -> None:
    limits = Limits(max_downtime=0.05, max_rounds=6, completion_timeout=100.0, on_timeout="throttle")
    throttle, actions = 0.0, []
    for n in range(1, 7):
        decision = decide([rnd(i, dirty_after=50_000) for i in range(1, n + 1)], limits, elapsed=1.0,
                          throttle=throttle)  # fmt: skip
        actions.append(decision.action)
        throttle = decision.throttle
    assert actions == [Action.CONTINUE, Action.THROTTLE, Action.THROTTLE, Action.THROTTLE, Action.THROTTLE,
                       Action.ABORT]  # fmt: skip
    assert throttle == THROTTLE_MAX and "with the guest throttled to 80% (its maximum)" in decision.reason


def test_timeout_aborts_by_default() -> None:
    decision = decide([rnd(1, dirty_after=50_000)], LIMITS, elapsed=11.0)
    assert decision.action is Action.ABORT
    assert "completion timeout" in decision.reason


def test_timeout_throttles_in_steps_up_to_a_cap() -> None:
    limits = Limits(max_downtime=0.05, max_rounds=50, completion_timeout=10.0, on_timeout="throttle")
    throttle, actions = 0.0, []
    for _ in range(6):
        decision = decide([rnd(1, dirty_after=50_000)], limits, elapsed=11.0, throttle=throttle)
        actions.append(decision.action)
        throttle = decision.throttle
    assert actions[:4] == [Action.THROTTLE] * 4
    assert throttle == THROTTLE_MAX
    assert actions[-1] is Action.ABORT  # throttled to the maximum and still over max_downtime


def test_bandwidth_ignores_tiny_rounds_and_honours_the_cap() -> None:
    rounds = [rnd(1), rnd(2, sent=4096, seconds=1.0)]  # the second is too small to measure anything
    assert estimate_bandwidth(rounds, None) == pytest.approx(200 * MIB)
    assert estimate_bandwidth(rounds, 50.0 * MIB) == pytest.approx(50 * MIB)
    assert estimate_bandwidth([rnd(1, sent=0)], None) == 0.0


def test_nothing_measured_means_no_eta() -> None:
    decision = decide([rnd(1, sent=0, dirty_after=10)], LIMITS, elapsed=0.1)
    assert decision.eta is None and decision.action is Action.CONTINUE


def test_round_stats_json_round_trip() -> None:
    stats = rnd(3, dirty_after=7)
    assert RoundStats.from_json(stats.to_json()) == stats
