"""The exhaustive check of wire v4's extra channels (docs/stream-security.md, "Parallel streams").

The real design keeps every invariant in every reachable state of a two-channel session (the search ends
before its bound: the whole state space), and its honest run completes; each channel protection, switched
off, lets the check find the attack it stops.
"""

from __future__ import annotations

import pytest

from confplan.core.channels_model import (
    CHAN_LISTEN,
    CHAN_WAIT_AUTH,
    CHANNEL,
    CHOSEN,
    COMPLETE,
    FAILED,
    MAIN,
    OPEN,
    STALE,
    ChannelDesign,
    ChannelModel,
    State,
)
from confplan.core.streamauth_model import Frame, Violation, explore

# The honest run is 14 network actions (two handshakes of 3, four frames per channel); every path of the
# model ends within 18 (the target's connections are bounded), so 30 is no bound at all.
BOUND = 30


def test_the_design_keeps_every_invariant_in_every_reachable_state() -> None:
    result = explore(ChannelModel(), BOUND)
    assert result.complete_reachable  # the invariants are not vacuous: the two channels do complete
    assert result.deepest < BOUND  # the search ran out of states, not of depth
    assert result.states > 5_000 and result.deliveries > 100_000


WEAKENED = {
    "every channel proves K (a stale attempt's channel spliced)": (ChannelDesign(channel_keys=False), "I2"),
    "seq not in the channel's nonces (frames reordered)": (ChannelDesign(seq_bound=False), "I1"),
    "no round barrier (a channel runs into the next round)": (ChannelDesign(round_barrier=False), "I6"),
}


@pytest.mark.parametrize("name", WEAKENED)
def test_each_weakened_design_is_caught(name: str) -> None:
    design, invariant = WEAKENED[name]
    with pytest.raises(Violation) as found:
        explore(ChannelModel(design), BOUND)
    assert found.value.invariant == invariant, str(found.value)
    assert found.value.trace[0] == "start"


def test_done_counting_every_channel_is_what_catches_a_truncated_channel_without_the_barrier() -> None:
    """Without the barrier (its round violation set aside) DONE's totals still refuse a channel cut short;
    counting only the main channel's pages, the target completes without the channel's."""
    no_barrier = ChannelDesign(round_barrier=False)
    assert explore(ChannelModel(no_barrier), BOUND, ignore=frozenset({"I6"})).complete_reachable
    main_only = ChannelDesign(round_barrier=False, done_counts_channels=False)
    with pytest.raises(Violation) as found:
        explore(ChannelModel(main_only), BOUND, ignore=frozenset({"I6"}))
    assert found.value.invariant == "I3" and "[]]" in found.value.detail  # nothing of channel 1


@pytest.mark.parametrize("design", [
    ChannelDesign(done_counts_channels=False), ChannelDesign(round_end_checked=False),
    ChannelDesign(refuse_unawaited=False),
], ids=["DONE counts the main channel", "ROUND_END unchecked", "any HELLO awaited"])  # fmt: skip
def test_checks_the_model_shows_to_be_defence_in_depth(design: ChannelDesign) -> None:
    """With per-session channel keys, seq in the nonces and the barrier, these find nothing more (the
    channel's k-th ROUND_END is the source's k-th; a HELLO the target does not wait for can only be
    proven by a key holder that does not send it): docs/stream-security.md says why they stay."""
    assert explore(ChannelModel(design), BOUND).complete_reachable


def _run(model: ChannelModel, state: State, *steps: tuple[str, int, Frame]) -> State:
    """Deliveries by hand: ("target", lane, frame) or ("source", index, frame); every state checked."""
    for who, where, frame in steps:
        if who == "target":
            move = model.to_target(state.target, where, frame)
            state = state._replace(target=move.actor, issued=state.issued | move.issued,
                                   emitted=state.emitted | move.sent)  # fmt: skip
        else:
            move = model.to_source(where, state.sources[where], frame)
            sources = (move.actor, state.sources[1]) if where == 0 else (state.sources[0], move.actor)
            state = state._replace(sources=sources, emitted=state.emitted | move.sent)
        assert model.check(state) is None
    return state


def _sent(state: State, ftype: str, hello: object = None, seq: int | None = None) -> Frame:
    frames = [f for f in state.emitted if f.type == ftype and (seq is None or f.seq == seq)]
    (frame,) = [f for f in frames if hello is None or repr(hello) in repr(f.body)]
    return frame


def _data(state: State) -> tuple[list[Frame], list[Frame]]:
    """The chosen source's data frames, per lane in seq order (the channel's are under a K_c)."""
    sent = sorted((f for f in state.emitted if f.protected), key=lambda f: f.seq)
    return [f for f in sent if "chkey" not in repr(f.body)], [f for f in sent if "chkey" in repr(f.body)]


def _open_main(model: ChannelModel) -> State:
    hello = CHOSEN.hello(MAIN)
    state = _run(model, model.initial(), ("target", MAIN, Frame(False, "HELLO", 0, hello)))
    state = _run(model, state, ("source", 0, _sent(state, "CHALLENGE", hello)))
    state = _run(model, state, ("target", MAIN, _sent(state, "AUTH", hello)))
    assert state.target.phase == CHAN_LISTEN
    return state


def test_a_stale_attempts_channel_and_a_channel_0_are_refused_then_the_real_channel_completes() -> None:
    model = ChannelModel()
    state = _open_main(model)
    stale = Frame(False, "HELLO", 0, STALE.hello(CHANNEL))
    state = _run(model, state, ("target", CHANNEL, stale))
    assert state.target.phase == CHAN_WAIT_AUTH  # its key is only proven in AUTH
    proof = _sent(state, "CHALLENGE", STALE.hello(CHANNEL))
    assert model.to_source(1, state.sources[1], proof).actor.phase == FAILED  # another session's K_1
    state = _run(model, state, ("target", CHANNEL, Frame(False, "AUTH", 1, proof.body[1])))  # reflected
    assert state.target.phase == CHAN_LISTEN and state.target.connections == 2  # refused, listening
    state = _run(model, state, ("target", CHANNEL, Frame(False, "HELLO", 0, CHOSEN.hello(MAIN))))
    assert state.target.phase == CHAN_LISTEN and state.target.connections == 3  # channel 0: before any key
    hello = CHOSEN.hello(CHANNEL)
    state = _run(model, state, ("target", CHANNEL, Frame(False, "HELLO", 0, hello)))
    state = _run(model, state, ("source", 0, _sent(state, "CHALLENGE", hello)))
    state = _run(model, state, ("target", CHANNEL, _sent(state, "AUTH", hello)))
    assert state.target.phase == OPEN
    main, channel = _data(state)
    for lane, frame in [(CHANNEL, channel[0]), (CHANNEL, channel[1]), (MAIN, main[0]), (MAIN, main[1]),
                        (CHANNEL, channel[2]), (MAIN, main[2]), (CHANNEL, channel[3]), (MAIN, main[3])]:
        state = _run(model, state, ("target", lane, frame))
    assert state.target.phase == COMPLETE


def test_a_frame_moved_between_channels_or_a_truncated_channel_never_completes() -> None:
    model = ChannelModel()
    state = _open_main(model)
    hello = CHOSEN.hello(CHANNEL)
    state = _run(model, state, ("target", CHANNEL, Frame(False, "HELLO", 0, hello)))
    state = _run(model, state, ("source", 0, _sent(state, "CHALLENGE", hello)))
    state = _run(model, state, ("target", CHANNEL, _sent(state, "AUTH", hello)))
    sealed = _sent(state, "SEALED", seq=2)
    assert model.to_target(state.target, MAIN, sealed).actor.phase == FAILED  # the main channel's keys
    main, channel = _data(state)
    assert model.to_target(state.target, CHANNEL, main[0]).actor.phase == FAILED  # the channel's keys
    # channel 1 is cut after its first round: the main channel's FINAL ROUND_END waits at the barrier
    for lane, frame in [(CHANNEL, channel[0]), (CHANNEL, channel[1]), *((MAIN, f) for f in main[:3])]:
        state = _run(model, state, ("target", lane, frame))
    assert state.target.main_wait == (1, True) and state.target.phase == OPEN
    assert model._lanes(state.target) == [CHANNEL]  # DONE is never read: the target cannot complete
