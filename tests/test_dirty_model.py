"""The dirty log's re-arm, checked exhaustively on its model (confplan/migration/dirty_model.py,
docs/dirty-log.md): with the real rules no reachable interleaving of the guest's writes, the lanes'
re-arms and reads, the rounds, a failed round and the pause leaves the target a stale page; each weakened
rule is caught, by the clear-only-unread rule and by the stale page alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from confplan.migration.dirty_model import Design, State, designs, explore, initial, steps

SAFE = ("real", "real, without initially-set", "legacy (fetch re-arms)")
WEAKENED = ("re-arm after the read", "re-arm of a neighbour")


@pytest.mark.parametrize("name", SAFE)
def test_the_rules_never_leave_the_target_a_stale_page(name: str) -> None:
    result = explore(designs()[name])
    assert result.violation is None, result.trace
    assert result.states > 1000  # rounds, lanes, writes and a failed round all interleaved


def test_the_real_rules_hold_with_more_pages_writes_rounds_and_failures() -> None:
    for bounds in ({"pages": 4, "writes": 4}, {"rounds": 3, "writes": 4, "aborts": 2}):
        result = explore(replace(Design(), **bounds))  # type: ignore[arg-type]
        assert result.violation is None, (bounds, result.trace)


@pytest.mark.parametrize("name", WEAKENED)
def test_each_weakened_rule_is_caught(name: str) -> None:
    result = explore(designs()[name])
    assert result.violation is not None and "does not read after it" in result.violation
    assert result.trace[0] == "precopy round starts"


@pytest.mark.parametrize("name", WEAKENED)
def test_the_stale_page_alone_catches_each_weakened_rule(name: str) -> None:
    """Without the rule the tables need, the end state shows why it matters: a write is lost."""
    result = explore(designs()[name], rule=False)
    assert result.violation is not None and "stale page" in result.violation
    assert "guest writes page" in " ".join(result.trace)
    assert result.trace[-1] == "final round ends"


def walk(d: Design, moves: list[str]) -> State:
    s = initial(d)
    for move in moves:
        s = next(t for what, t, _ in steps(d, s) if what == move)
    return s


def test_a_write_before_the_rearm_goes_with_the_round_and_one_after_it_next_round() -> None:
    """The two cases the design turns on: a page written after the log went on but before its re-arm is
    read with that round and not logged again; one written after its re-arm is logged for the next."""
    d = Design(pages=1, lanes=1, rounds=2, writes=1, aborts=0)
    start = ["precopy round starts"]
    rearm, end = "lane 0 re-arms page 0", "round ends"
    before = walk(d, [*start, "guest writes page 0", rearm, "lane 0 reads page 0 (version 1)", end])
    assert before.target == (1,) and before.pending == frozenset()
    after = walk(d, [*start, rearm, "lane 0 reads page 0 (version 0)", "guest writes page 0", end])
    assert after.target == (0,) and after.pending == frozenset({0})
    legacy = replace(d, rearm=False)  # the log went on protected: the same early write is logged too
    early = walk(legacy, ["guest writes page 0", *start, "lane 0 reads page 0 (version 1)", "round ends"])
    assert early.pending == frozenset()
    late = walk(legacy, [*start, "guest writes page 0", "lane 0 reads page 0 (version 1)", "round ends"])
    assert late.pending == frozenset({0})  # sent twice: the cost the re-arm saves
