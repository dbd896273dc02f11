"""The SNP key release model (confplan/sev/key_release_model.py, docs/key-release.md): every host schedule
within the bound keeps the invariants, and taking away each protection lets the check find the attack."""

from __future__ import annotations

import pytest

from confplan.sev.key_release_model import Design, explore


def test_the_design_keeps_the_key_from_the_host_and_the_host_key_from_the_guest() -> None:
    result = explore(Design())
    assert result.violation is None
    assert result.states > 900  # the walk really branched (every order of relays, replays, releases)
    assert explore(Design(), max_depth=60).states == result.states  # a fixpoint: every reachable state


@pytest.mark.parametrize(
    ("design", "finds"),
    [
        # Without the owner's static key in the KEK, the host wraps a key of its own choosing to the
        # helper's public key (it is in the report) and the helper takes it.
        (Design(owner_static=False), "a secret the owner never released"),
        # A broker that does not check the measurement wraps the owner's secret to the host's own guest.
        (Design(check_measurement=False), "the host can open a wrap of the owner's secret"),
    ],
)
def test_each_protection_stops_an_attack(design: Design, finds: str) -> None:
    result = explore(design)
    assert result.violation is not None and finds in result.violation, result
    assert result.trace  # a concrete schedule the host can play
