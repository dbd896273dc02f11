"""The exhaustive check of the wire v2 protocol model (docs/stream-security.md, "The model").

The real design must keep every invariant in every state the network can reach within the bound, and its
honest run must complete; each weakened design must be caught, which shows the check can fail.
"""

from __future__ import annotations

import pytest

from confplan.core.streamauth_model import (
    COMPLETE,
    FIRST_DATA_SEQ,
    K_THIS,
    LISTEN,
    WAIT_AUTH,
    Design,
    Frame,
    Model,
    Session,
    State,
    Violation,
    derive,
    explore,
    handshake_frames,
    mac,
    open_frame,
    protect,
)

# The honest run is 7 network actions (HELLO, CHALLENGE, AUTH, four data frames); 10 leaves the network
# three more anywhere: a stranger's whole failed handshake before the source, a replay, an edit...
BOUND = 10


def test_the_design_keeps_every_invariant_within_the_bound() -> None:
    result = explore(Model(), BOUND)
    assert result.complete_reachable  # the invariants are not vacuous: the source's stream does complete
    assert result.deepest == BOUND
    assert result.deliveries > 100_000  # every frame the network can build, to every actor, was tried


WEAKENED = {
    "wire v1 (no authentication)": (Design(authenticate=False, check_migration_id=False), "I1"),
    "no migration-id check (a twin source holds the same key)": (Design(check_migration_id=False), "I2"),
    "no target nonce (a recorded attempt with this key)": (Design(target_nonce=False), "I2"),
    "one key for both proofs (the challenge reflected)": (Design(separate_proof_keys=False), "I2"),
    "seq not authenticated (frames reordered)": (Design(seq_bound=False), "I1"),
    "sealed GMAC without record headers (records spliced)": (Design(sealed_mac_covers_records=False), "I1"),
}


@pytest.mark.parametrize("name", WEAKENED)
def test_each_weakened_design_is_caught(name: str) -> None:
    design, invariant = WEAKENED[name]
    # v1 sends its data in clear by design (I4); what matters there is the stranger's stream being taken
    ignore = frozenset({"I4"}) if not design.authenticate else frozenset()
    with pytest.raises(Violation) as found:
        explore(Model(design), BOUND, ignore=ignore)
    assert found.value.invariant == invariant, str(found.value)
    assert found.value.trace[0] == "start" and len(found.value.trace) <= BOUND + 1


def test_v1_is_also_caught_sending_in_clear() -> None:
    with pytest.raises(Violation) as found:
        explore(Model(Design(authenticate=False)), BOUND)
    assert found.value.invariant == "I4"


def _run(model: Model, state: State, *steps: tuple[str, Frame]) -> State:
    """Apply deliveries by hand: ("target" | source index, frame)."""
    for who, frame in steps:
        if who == "target":
            move = model.to_target(state.target, frame)
            state = state._replace(target=move.actor, issued=state.issued | move.issued,
                                   emitted=state.emitted | move.sent)  # fmt: skip
        else:
            i = int(who)
            move = model.to_source(i, state.sources[i], frame)
            sources = (*state.sources[:i], move.actor, *state.sources[i + 1 :])
            state = state._replace(sources=sources, emitted=state.emitted | move.sent)
        assert model.check(state) is None
    return state


def _sent(state: State, ftype: str, seq: int | None = None) -> Frame:
    (frame,) = [f for f in state.emitted if f.type == ftype and (seq is None or f.seq == seq)]
    return frame


def test_a_stranger_fails_then_the_source_completes() -> None:
    model = Model(twin=False)
    state = model.world.initial()
    stranger = Frame(False, "HELLO", 0, ("hello", 2, "id-this", "ns-attacker"))
    state = _run(model, state, ("target", stranger))
    assert state.target.phase == WAIT_AUTH
    forged = Frame(False, "AUTH", 1, mac("K-attacker", "anything"))
    state = _run(model, state, ("target", forged))
    assert state.target.phase == LISTEN and state.target.connection == 1  # still listening
    hello = model.world.sources[0].hello
    state = _run(model, state, ("target", Frame(False, "HELLO", 0, hello)))
    challenge = next(f for f in state.emitted if f.type == "CHALLENGE" and f.body[0] == "nt1")
    state = _run(model, state, ("0", challenge))
    state = _run(model, state, ("target", _sent(state, "AUTH")))
    for seq in range(FIRST_DATA_SEQ, FIRST_DATA_SEQ + 4):
        frame = next(f for f in state.emitted if f.protected and f.seq == seq)
        state = _run(model, state, ("target", frame))
    assert state.target.phase == COMPLETE


def test_a_changed_sealed_ciphertext_passes_the_frame_tag_and_is_refused_by_the_helper() -> None:
    design = Design()
    key = derive(design, K_THIS, "th", "k_s2t")
    session = Session("this", "id-this", K_THIS, "ns")
    records = session.script()[1][1]
    frame = protect(design, key, "SEALED", 3, records)
    assert open_frame(design, key, 3, frame) == records
    (rh0, _), (_, ct1) = records
    changed = frame._replace(body=(((rh0, ct1), records[1]), frame.body[1]))
    assert open_frame(design, key, 3, changed) is None
    assert open_frame(design, key, 4, frame) is None  # in another position
    assert open_frame(design, derive(design, K_THIS, "th2", "k_s2t"), 3, frame) is None  # another session


def test_a_recorded_session_with_this_key_is_refused_at_auth() -> None:
    model = Model(twin=False)
    recorded = handshake_frames(model.design, Session("old", "id-this", K_THIS, "ns-old"), "nt-old")
    state = _run(model, model.world.initial(), ("target", recorded[0]))
    assert state.target.phase == WAIT_AUTH
    state = _run(model, state, ("target", recorded[2]))  # the recorded AUTH: for another nonce_t
    assert state.target.phase == LISTEN and state.target.connection == 1
