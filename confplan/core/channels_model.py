"""A model of wire v4's extra channels (docs/stream-security.md, "Parallel streams"), checked exhaustively.

The single-channel model (``streamauth_model``) checks one session's handshake and frames; this one checks
a session of **two** channels: the main channel under the stream key K, and extra channel 1, which runs the
same three-frame handshake under ``K_1 = HMAC(channel_seed, "confplan stream v4 channel" || 1)``, where
``channel_seed`` is the main session's fifth HKDF output. Same symbolic cryptography (Dolev-Yao), same
search (``streamauth_model.explore``). The cast:

- the chosen source: the main handshake, then the channel's, then its data on both channels (a shared page
  and two precopy rounds on the main channel, a sealed page per round on the channel, each lane ending
  its rounds with ROUND_END, DONE on the main channel with the totals of both);
- a **stale source**: another attempt of this migration, handed the same K (an orchestrator mistake), whose
  main session ran with another target and which now dials its channel 1: the network can bring that
  channel to this target;
- a recording of a complete earlier attempt under the same K (both channels);
- the target, with the real rules: the main handshake first (a HELLO for another channel refused); then
  it listens for channel 1, refusing (and listening on) a HELLO for channel 0, for another channel count,
  or for a channel already open, and a channel that does not prove its key; each channel's frames under
  its own keys with its own sequence numbers; the round barrier (the main channel's ROUND_END r waits for
  the channel's ROUND_END r, which must name the same round and FINAL flag and count exactly the pages that
  channel loaded); no page after the FINAL round; DONE's totals over both channels; any refusal in the
  stream fails the attempt;
- the network: delivers any frame it knows or builds to any connection of any actor (so it moves frames
  between channels, replays, reorders, drops, truncates one channel by never delivering its tail), edits
  a data frame's seq or a HELLO's channel fields, sends its own HELLOs, CHALLENGEs, AUTHs and data frames.

``ChannelDesign`` switches off one protection at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from confplan.core.streamauth_model import (
    FIRST_DATA_SEQ,
    ID_OTHER,
    ID_THIS,
    K_ATTACKER,
    K_THIS,
    Frame,
    Term,
    describe,
    distinct_outcomes,
    first_broken,
    helper_opens,
    mac,
    network_parts,
)

TYPES = ("SHARED", "SEALED", "ROUND_END", "DONE")
Script = tuple[tuple[str, Term], ...]  # a lane's data frames: (type, content)
MAIN, CHANNEL = 0, 1  # the lanes: the main channel and extra channel 1
CHANNELS = 2  # the stream's channel count (the target has 2 helper vCPUs: at most 2 channels)
MAIN_CONNECTIONS = 2  # connections the target accepts for the main channel (a stranger's, then the source's)
ALL_CONNECTIONS = 4  # ... and in all (the same for the channel)


@dataclass(frozen=True)
class ChannelDesign:
    """The extra channels' protections; the real design has all of them."""

    channel_keys: bool = True  # K_c from this main session's channel_seed (False: every channel proves K)
    seq_bound: bool = True  # each channel's seq is in its frames' GCM nonce and additional data
    round_barrier: bool = True  # the main channel's ROUND_END waits for the channel's ROUND_END of that round
    round_end_checked: bool = True  # ... which must name the same round and FINAL, count the channel's pages
    done_counts_channels: bool = True  # DONE's sealed total counts every channel's pages (False: main only)
    refuse_unawaited: bool = True  # a HELLO for channel 0 or another channel count is refused before any key


class Sender(NamedTuple):
    """One source's parameters: its label (in its pages), its HELLOs' nonces."""

    label: str
    ns_main: str
    ns_channel: str

    def hello(self, channel: int) -> Term:
        return ("hello", 4, ID_THIS, self.ns_main if channel == MAIN else self.ns_channel, CHANNELS, channel)

    def pages(self, design: ChannelDesign) -> tuple[Script, Script]:
        """The data frames of each lane: (type, content)."""

        def rec(page: int) -> Term:
            return ((("rh", ID_THIS, self.label, page), ("ct", ID_THIS, self.label, page)),)

        sealed_total = 2 if design.done_counts_channels else 0
        main = (("SHARED", ("page", self.label, 1)), ("ROUND_END", (0, False)), ("ROUND_END", (1, True)),
                ("DONE", (2, 1, sealed_total)))  # fmt: skip
        channel = (("SEALED", rec(2)), ("ROUND_END", (0, False, 0, 1)), ("SEALED", rec(3)),
                   ("ROUND_END", (1, True, 0, 1)))  # fmt: skip
        return main, channel


SENT_IN_ROUND = {1: 0, 2: 0, 3: 1}  # page -> the round its source sends it in (both senders' scripts)
CHOSEN = Sender("this", "ns-main", "ns-chan")
STALE = Sender("stale", "ns-stale-main", "ns-stale-chan")  # main session with another target: nonce below
STALE_NT = "nt-stale-target"
RECORDED = Sender("rec", "ns-rec-main", "ns-rec-chan")  # an earlier attempt under the same K, recorded


# ---- the cryptography, symbolically ----


def th(hello: Term, nonce_t: str) -> Term:
    return ("th", hello, nonce_t)


def kdf(key: Term, transcript: Term, label: str) -> Term:
    return ("kdf", key, transcript, label)


def channel_key(design: ChannelDesign, main: Term, channel: int) -> Term:
    """The stream key channel ``channel`` proves, for main session ``main`` = (HELLO, nonce_t)."""
    if not design.channel_keys or channel == MAIN:  # (channel 0 is the main key: a design that takes it)
        return K_THIS
    return ("chkey", kdf(K_THIS, th(*main), "seed"), channel)


def lane_key(design: ChannelDesign, main: Term, lane: int, hello: Term, nonce_t: str) -> Term:
    key = K_THIS if lane == MAIN else channel_key(design, main, hello[5])
    return kdf(key, th(hello, nonce_t), "k_s2t")


def _nonce_aad(design: ChannelDesign, ftype: str, seq: int) -> Term:
    return (("s2t", seq), (ftype, seq)) if design.seq_bound else ("s2t", (ftype, None))


def protect(design: ChannelDesign, key: Term, ftype: str, seq: int, content: Term) -> Frame:
    if ftype == "SEALED":
        headers = tuple(rh for rh, _ in content)
        return Frame(True, ftype, seq, (content, mac(key, (_nonce_aad(design, ftype, seq), headers))))
    return Frame(True, ftype, seq, ("enc", key, _nonce_aad(design, ftype, seq), content))


def open_frame(design: ChannelDesign, key: Term, seq: int, f: Frame) -> Term | None:
    """The reader's checks (flag, seq, tag) and the helper's open; the content, or None (refused)."""
    if not f.protected or f.seq != seq or f.type not in TYPES or not isinstance(f.body, tuple):
        return None
    if f.type == "SEALED":
        if len(f.body) != 2 or not isinstance(f.body[0], tuple):
            return None
        content, tag = f.body
        headers = tuple(r[0] if isinstance(r, tuple) and r else None for r in content)
        ok = tag == mac(key, (_nonce_aad(design, f.type, seq), headers)) and helper_opens(content)
        return content if ok else None
    if len(f.body) != 4 or f.body[:3] != ("enc", key, _nonce_aad(design, f.type, seq)):
        return None
    return f.body[3]


def challenge(key: Term, hello: Term, nonce_t: str) -> Frame:
    transcript = th(hello, nonce_t)
    return Frame(False, "CHALLENGE", 0, (nonce_t, mac(kdf(key, transcript, "m_t"), transcript)))


def auth(key: Term, hello: Term, nonce_t: str) -> Frame:
    return Frame(False, "AUTH", 1, mac(kdf(key, th(hello, nonce_t), "m_s"), th(hello, nonce_t)))


def data_frames(design: ChannelDesign, sender: Sender, main_nt: str, channel_nt: str) -> list[Frame]:
    """Both lanes' data frames of ``sender``, whose main and channel handshakes drew these target nonces."""
    main = (sender.hello(MAIN), main_nt)
    frames = []
    for lane, script in enumerate(sender.pages(design)):
        key = lane_key(design, main, lane, sender.hello(lane), main_nt if lane == MAIN else channel_nt)
        frames += [protect(design, key, t, FIRST_DATA_SEQ + i, c) for i, (t, c) in enumerate(script)]
    return frames


def recording(design: ChannelDesign, sender: Sender, main_nt: str, channel_nt: str) -> list[Frame]:
    """A complete two-channel run of ``sender`` against a target that drew these nonces."""
    chan_key = channel_key(design, (sender.hello(MAIN), main_nt), CHANNEL)
    return [
        Frame(False, "HELLO", 0, sender.hello(MAIN)), challenge(K_THIS, sender.hello(MAIN), main_nt),
        auth(K_THIS, sender.hello(MAIN), main_nt), Frame(False, "HELLO", 0, sender.hello(CHANNEL)),
        challenge(chan_key, sender.hello(CHANNEL), channel_nt),
        auth(chan_key, sender.hello(CHANNEL), channel_nt),
        *data_frames(design, sender, main_nt, channel_nt),
    ]  # fmt: skip


# ---- the actors' states ----

LISTEN, WAIT_AUTH, CHAN_LISTEN, CHAN_WAIT_AUTH = "listen", "wait-auth", "channel-listen", "channel-wait-auth"
OPEN, COMPLETE, FAILED = "open", "complete", "failed"
WAIT_MAIN, WAIT_CHANNEL = "wait-main-challenge", "wait-channel-challenge"


class Target(NamedTuple):
    phase: str
    connections: int = 0  # accepted so far - 1; connection c draws nonce_t "nt{c}"
    hello: Term = None  # the HELLO of the connection in its handshake
    main: Term = None  # (HELLO, nonce_t) of the main channel, once it proved K
    channel: Term = None  # (HELLO, nonce_t) of the extra channel, once it proved its key
    seq: tuple[int, int] = (FIRST_DATA_SEQ, FIRST_DATA_SEQ)  # next data frame expected on each lane
    accepted: tuple[tuple[tuple[str, Term], ...], ...] = ((), ())  # per lane: (type, content)
    landed: tuple[tuple[int, int], ...] = ()  # (page, the round the target was in when it loaded it)
    rounds: int = 0  # rounds applied (past the barrier)
    final: bool = False  # the FINAL round was applied: no page may come after it
    main_wait: Term = None  # the main channel's ROUND_END, waiting at the barrier for the channel's
    channel_wait: Term = None  # the channel's ROUND_END, waiting for the main channel's
    channel_pages: int = 0  # pages the channel loaded in its current round
    channel_done: bool = False  # the channel's FINAL round is over: it reads nothing more
    totals: tuple[int, int, int] = (0, 0, 0)  # shared pages, sealed on the main channel, sealed on channel 1

    @property
    def nonce_t(self) -> str:
        return f"nt{self.connections}"


class Source(NamedTuple):
    phase: str
    main_nt: str | None = None  # the CHALLENGE nonce its main channel accepted
    channel_nt: str | None = None  # ... and its extra channel


class State(NamedTuple):
    target: Target
    sources: tuple[Source, Source]  # the chosen source, the stale one
    issued: frozenset[tuple[Term, str]]  # (HELLO, nonce_t) of every CHALLENGE the target sent
    emitted: frozenset[Frame]  # every frame an honest actor sent


class Move(NamedTuple):
    actor: Any
    issued: frozenset[tuple[Term, str]] = frozenset()
    sent: frozenset[Frame] = frozenset()


# ---- the network's repertoire ----


def network_frames(known: Iterable[Frame]) -> list[Frame]:
    """Every frame the network can deliver, given the frames it knows."""
    known = set(known)
    out = set(known)
    macs, nonces, hellos = network_parts(known)
    for _, version, mid, ns, count, channel in hellos:  # a known HELLO with its channel fields edited
        out |= {Frame(False, "HELLO", 0, ("hello", version, mid, ns, n, c)) for n, c in
                ((count, 1 - channel), (3, channel), (3, 2))}  # fmt: skip
    for f in known:
        if f.protected:  # a known data frame at another position
            out |= {f._replace(seq=s) for s in range(FIRST_DATA_SEQ, FIRST_DATA_SEQ + 4) if s != f.seq}
    # its own HELLOs (a stranger's main channel and channels), CHALLENGEs and AUTHs: every known MAC in
    # either role, and a proof under its own key (which never verifies; one stands for all)
    out |= {Frame(False, "HELLO", 0, ("hello", 4, mid, "ns-attacker", CHANNELS, c))
            for mid in (ID_THIS, ID_OTHER) for c in (MAIN, CHANNEL)}  # fmt: skip
    own = mac(kdf(K_ATTACKER, "th-attacker", "m"), "th-attacker")
    out |= {Frame(False, "CHALLENGE", 0, (nt, m)) for nt in nonces for m in macs | {own}}
    out |= {Frame(False, "AUTH", 1, m) for m in macs | {own}}
    # data frames of its own: unprotected, and under a key of its own
    record = (("rh", ID_THIS, "evil", 9), ("ct", ID_THIS, "evil", 9))
    evil = {"SHARED": ("page", "evil", 9), "SEALED": (record,), "ROUND_END": (0, False, 0, 0),
            "DONE": (2, 1, 2)}  # fmt: skip
    forged = kdf(K_ATTACKER, "th-attacker", "k_s2t")
    for ftype, content in evil.items():
        out.add(Frame(False, ftype, FIRST_DATA_SEQ, content))
        out.add(protect(ChannelDesign(), forged, ftype, FIRST_DATA_SEQ, content))
    return sorted(out, key=repr)  # a fixed order: the search is deterministic


def exposed(term: Term) -> Iterator[Term]:
    """The parts of a frame body the network reads: everything not under a MAC or a ciphertext."""
    yield term
    if isinstance(term, tuple) and term:
        if term[0] == "mac":
            return
        parts = term[2:3] if term[0] == "enc" else term  # a ciphertext shows its nonce and its AAD
        for part in parts:
            yield from exposed(part)


# ---- the transitions ----


class ChannelModel:
    def __init__(self, design: ChannelDesign = ChannelDesign()) -> None:
        self.design = design
        self.senders = (CHOSEN, STALE)
        hello = STALE.hello(MAIN)
        stale_main = [Frame(False, "HELLO", 0, hello), challenge(K_THIS, hello, STALE_NT),
                      auth(K_THIS, hello, STALE_NT)]  # fmt: skip
        self.recorded = frozenset(recording(design, RECORDED, "nt-rec-main", "nt-rec-chan") + stale_main)
        self.scripts = CHOSEN.pages(design)
        self.live_hellos = {CHOSEN.hello(MAIN), CHOSEN.hello(CHANNEL), STALE.hello(CHANNEL)}
        self._network: dict[frozenset[Frame], list[Frame]] = {}
        self._moves: dict[tuple[Any, ...], list[tuple[Move, Frame]]] = {}
        self._leaks: dict[Frame, bool] = {}
        self.deliveries = 0

    def initial(self) -> State:
        sent = {Frame(False, "HELLO", 0, CHOSEN.hello(MAIN)), Frame(False, "HELLO", 0, STALE.hello(CHANNEL))}
        sources = (Source(WAIT_MAIN), Source(WAIT_CHANNEL, STALE_NT))
        return State(Target(LISTEN), sources, frozenset(), frozenset(sent))

    @staticmethod
    def complete(state: State) -> bool:
        return state.target.phase == COMPLETE

    def frames(self, emitted: frozenset[Frame]) -> list[Frame]:
        if emitted not in self._network:
            self._network[emitted] = network_frames(emitted | self.recorded)
        return self._network[emitted]

    # -- target: the handshakes --
    @staticmethod
    def refuse(t: Target) -> Target:
        """A refused connection: the target listens on, for as many connections as its deadline allows."""
        if t.phase in (LISTEN, WAIT_AUTH) and t.connections + 1 < MAIN_CONNECTIONS:
            return t._replace(phase=LISTEN, connections=t.connections + 1, hello=None)
        if t.phase in (CHAN_LISTEN, CHAN_WAIT_AUTH) and t.connections + 1 < ALL_CONNECTIONS:
            return t._replace(phase=CHAN_LISTEN, connections=t.connections + 1, hello=None)
        return t._replace(phase=FAILED) if t.phase != COMPLETE else t

    def _hello(self, t: Target, f: Frame, key: Callable[[Term], Term | None]) -> Move:
        """A HELLO on a new connection: the migration id, ``key`` (None: not awaited), then CHALLENGE."""
        if f.protected or f.type != "HELLO" or f.seq != 0 or f.body[2] != ID_THIS:
            return Move(self.refuse(t))
        proven = key(f.body)
        if proven is None:
            return Move(self.refuse(t))
        waiting = WAIT_AUTH if t.phase == LISTEN else CHAN_WAIT_AUTH
        # The answer to a HELLO no live source sent is left out of what the network knows: its MAC only ever
        # verifies as the target's proof for that HELLO, which no source waits on (the single-channel model
        # keeps them all and checks reflection); keeping them multiplies the states by the nonces drawn.
        live = f.body in self.live_hellos
        sent = frozenset({challenge(proven, f.body, t.nonce_t)} if live else ())
        return Move(t._replace(phase=waiting, hello=f.body), frozenset({(f.body, t.nonce_t)}), sent)

    def _awaited(self, t: Target, hello: Term) -> Term | None:
        """The key an extra channel's HELLO must prove, or None for a channel the target does not wait for."""
        if self.design.refuse_unawaited and (hello[5] != CHANNEL or hello[4] != CHANNELS):
            return None
        return channel_key(self.design, t.main, hello[5])

    def to_target(self, t: Target, lane: int, f: Frame) -> Move:
        if t.phase == LISTEN:
            return self._hello(t, f, lambda hello: K_THIS if hello[5] == MAIN else None)
        if t.phase == CHAN_LISTEN:
            return self._hello(t, f, functools.partial(self._awaited, t))
        if t.phase in (WAIT_AUTH, CHAN_WAIT_AUTH):
            key = K_THIS if t.phase == WAIT_AUTH else self._awaited(t, t.hello)
            if f != auth(key, t.hello, t.nonce_t):
                return Move(self.refuse(t))
            if t.phase == WAIT_AUTH:  # the HELLO said 2 channels (only a K holder's passes AUTH)
                main = (t.hello, t.nonce_t)
                return Move(t._replace(phase=CHAN_LISTEN, main=main, connections=t.connections + 1))
            return Move(t._replace(phase=OPEN, channel=(t.hello, t.nonce_t)))
        if t.phase == OPEN:
            return Move(self._data(t, lane, f))
        return Move(t)

    # -- target: the stream --
    def _data(self, t: Target, lane: int, f: Frame) -> Target:
        hello, nonce_t = t.main if lane == MAIN else t.channel
        key = lane_key(self.design, t.main, lane, hello, nonce_t)
        content = open_frame(self.design, key, t.seq[lane], f)
        if content is None:
            return t._replace(phase=FAILED)
        seq = (t.seq[MAIN] + 1, t.seq[CHANNEL]) if lane == MAIN else (t.seq[MAIN], t.seq[CHANNEL] + 1)
        accepted = tuple((*got, (f.type, content)) if i == lane else got for i, got in enumerate(t.accepted))
        t = t._replace(seq=seq, accepted=accepted)
        if f.type in ("SHARED", "SEALED"):
            return self._load(t, lane, f.type, content)
        if f.type == "ROUND_END":
            return self._round_end(t, lane, content)
        return self._done(t, lane, content)

    def _load(self, t: Target, lane: int, ftype: str, content: Term) -> Target:
        if t.final or (lane == CHANNEL and ftype != "SEALED"):  # nothing after FINAL; a channel: sealed only
            return t._replace(phase=FAILED)
        pages = [content[2]] if ftype == "SHARED" else [rh[3] for rh, _ in content]
        shared, main_sealed, chan_sealed = t.totals
        if ftype == "SHARED":
            shared += 1
        elif lane == MAIN:
            main_sealed += len(pages)
        else:
            chan_sealed += len(pages)
        landed = t.landed + tuple((page, t.rounds) for page in pages)
        chan_pages = t.channel_pages + (len(pages) if lane == CHANNEL else 0)
        return t._replace(landed=landed, totals=(shared, main_sealed, chan_sealed), channel_pages=chan_pages)

    def _round_end(self, t: Target, lane: int, content: Term) -> Target:
        d = self.design
        if lane == CHANNEL:
            if d.round_end_checked and (len(content) != 4 or content[2:] != (0, t.channel_pages)):
                return t._replace(phase=FAILED)
            if not d.round_barrier:  # the channel goes on with its next round at once
                return t._replace(channel_pages=0, channel_done=bool(content[1]))
            t = t._replace(channel_wait=content)
        elif not d.round_barrier:
            return t._replace(rounds=t.rounds + 1, final=bool(content[1]))
        else:
            t = t._replace(main_wait=content)
        if t.main_wait is None or t.channel_wait is None:
            return t
        # the barrier: both ROUND_ENDs of the round are in
        if d.round_end_checked and t.main_wait[:2] != t.channel_wait[:2]:
            return t._replace(phase=FAILED)
        final = bool(t.main_wait[1])
        return t._replace(rounds=t.rounds + 1, final=final, main_wait=None, channel_wait=None,
                          channel_pages=0, channel_done=bool(t.channel_wait[1]))  # fmt: skip

    def _done(self, t: Target, lane: int, content: Term) -> Target:
        shared, main_sealed, chan_sealed = t.totals
        sealed = main_sealed + (chan_sealed if self.design.done_counts_channels else 0)
        if lane != MAIN or content != (t.rounds, shared, sealed):
            return t._replace(phase=FAILED)
        return t._replace(phase=COMPLETE)

    # -- sources --
    def to_source(self, index: int, s: Source, f: Frame) -> Move:
        d, sender = self.design, self.senders[index]
        if f.protected or f.type != "CHALLENGE" or f.seq != 0:
            return Move(s._replace(phase=FAILED))
        nonce_t = f.body[0]
        if s.phase == WAIT_MAIN:
            if f != challenge(K_THIS, sender.hello(MAIN), nonce_t):
                return Move(s._replace(phase=FAILED))
            dial = Frame(False, "HELLO", 0, sender.hello(CHANNEL))  # the source dials its channel
            sent = {auth(K_THIS, sender.hello(MAIN), nonce_t), dial}
            return Move(Source(WAIT_CHANNEL, nonce_t), sent=frozenset(sent))
        key = channel_key(d, (sender.hello(MAIN), s.main_nt), CHANNEL)
        if f != challenge(key, sender.hello(CHANNEL), nonce_t):
            return Move(s._replace(phase=FAILED))
        assert s.main_nt is not None
        sent = {auth(key, sender.hello(CHANNEL), nonce_t), *data_frames(d, sender, s.main_nt, nonce_t)}
        return Move(Source(OPEN, s.main_nt, nonce_t), sent=frozenset(sent))

    def _distinct(self, key: tuple[Any, ...], emitted: frozenset[Frame],
                  move: Callable[[Frame], Move]) -> list[tuple[Move, Frame]]:  # fmt: skip
        """Deliver every frame the network can build; keep one frame per distinct outcome."""
        if key not in self._moves:
            self._moves[key], tried = distinct_outcomes(self.frames(emitted), move)
            self.deliveries += tried
        return self._moves[key]

    def _lanes(self, t: Target) -> list[int]:
        """The target's connections that read now (a lane waiting at the barrier, or done, reads nothing)."""
        if t.phase != OPEN:
            return [MAIN] if t.phase in (LISTEN, WAIT_AUTH, CHAN_LISTEN, CHAN_WAIT_AUTH) else []
        lanes = [MAIN] if t.main_wait is None else []
        return lanes + ([CHANNEL] if t.channel_wait is None and not t.channel_done else [])

    def successors(self, state: State) -> Iterator[tuple[str, State]]:
        """The network's next actions. Two kinds are left out, as they only take power from the network:
        anything after the target failed or completed (a source's later moves are open to it just as well
        before), and a delivery that fails a source (a failed source sends nothing more)."""
        t, emitted = state.target, state.emitted
        if t.phase in (FAILED, COMPLETE):
            return
        for lane in self._lanes(t):
            where = "the target" if t.phase != OPEN else f"the target's {('main channel', 'channel 1')[lane]}"
            deliver = functools.partial(self.to_target, t, lane)
            for m, f in self._distinct(("target", t, lane, emitted), emitted, deliver):
                nxt = state._replace(target=m.actor, issued=state.issued | m.issued, emitted=emitted | m.sent)
                yield f"deliver {describe(f)} to {where}", nxt
        if t.phase in (WAIT_AUTH, CHAN_WAIT_AUTH):
            yield "reset the target's connection", state._replace(target=self.refuse(t))
        for i, s in enumerate(state.sources):
            if s.phase not in (WAIT_MAIN, WAIT_CHANNEL):
                continue
            deliver_s = functools.partial(self.to_source, i, s)
            for m, f in self._distinct(("source", i, s, emitted), emitted, deliver_s):
                if m.actor.phase == FAILED:
                    continue
                sources = (m.actor, state.sources[1]) if i == 0 else (state.sources[0], m.actor)
                yield (f"deliver {describe(f)} to {self.senders[i].label}'s {s.phase[5:]}",
                       state._replace(sources=sources, emitted=emitted | m.sent))  # fmt: skip

    # -- invariants --
    def check(self, state: State, ignore: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """The first invariant that ``state`` breaks (except those in ``ignore``): (name, detail), or None."""
        return first_broken(self._broken(state), ignore)

    def _broken(self, state: State) -> Iterator[tuple[str, str]]:
        t, src = state.target, state.sources[0]
        opened = src.phase == OPEN
        for lane, script in enumerate(self.scripts):
            got = t.accepted[lane]
            if got != script[: len(got)] or (got and not opened):
                yield "I1", f"lane {lane}: the target accepted {got}, the chosen source sent {script}"
        if t.main is not None and t.main != (CHOSEN.hello(MAIN), src.main_nt):
            yield "I2", f"the target's main channel is {t.main}, the chosen source's {src}"
        if t.channel is not None and t.channel != (CHOSEN.hello(CHANNEL), src.channel_nt):
            yield "I2", f"the target's channel 1 is {t.channel}, the chosen source's {src}"
        if t.phase == COMPLETE and t.accepted != self.scripts:
            pages = [[c for c in got if c[0] in ("SHARED", "SEALED")] for got in t.accepted]
            if pages != [[c for c in lane if c[0] in ("SHARED", "SEALED")] for lane in self.scripts]:
                yield "I3", f"the target completed with pages {pages}"
        for page, landed_in in t.landed:
            if SENT_IN_ROUND.get(page) != landed_in:
                yield "I6", f"page {page} landed in round {landed_in}: {t.landed}"
        for f in state.emitted:
            if self._leaks.setdefault(f, self._leak(f)):
                yield "I4", f"{describe(f)} shows a key or a secret payload"
        for i, s in enumerate(state.sources):
            sender = self.senders[i]
            for lane, nonce_t in ((MAIN, s.main_nt if i == 0 else None), (CHANNEL, s.channel_nt)):
                if nonce_t is not None and (sender.hello(lane), nonce_t) not in state.issued:
                    yield "I5", f"{sender.label} accepted {nonce_t} on lane {lane}; the target never sent it"

    @staticmethod
    def _leak(f: Frame) -> bool:
        if f.type in ("SHARED", "ROUND_END", "DONE") and not (f.protected and f.body[0] == "enc"):
            return True
        secret = ("kdf", "chkey")  # a key, derived or not
        return any(p == K_THIS or (isinstance(p, tuple) and p and p[0] in secret) for p in exposed(f.body))
