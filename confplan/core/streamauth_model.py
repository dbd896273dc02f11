"""A model of the wire v2 handshake and frame protection (docs/stream-security.md), and an exhaustive check.

Pure and symbolic (Dolev-Yao): keys, MACs and ciphertexts are tuples, equal only when built from equal
parts, and the attacker builds a term only from parts it has seen or owns. The actors are the chosen
source, the target (one connection at a time; a refusal before AUTH returns it to listening), optionally
a second source that holds the same stream key for another migration, and the network, which delivers
any frame it knows or can build to either side, in any order, any number of times, and can reset the
connection. ``explore`` walks every state reachable within a bound on the network's actions and checks the
invariants in each. ``Design`` switches off one protection at a time, so a test can show that the check
finds the attack each protection stops.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

Term = Any  # nested tuples of str/int/bool
Outcome = TypeVar("Outcome", bound=Hashable)  # a model's Move

ID_THIS, ID_OTHER = "id-this", "id-other"
K_THIS, K_OTHER, K_OLD, K_ATTACKER = "K-this", "K-other", "K-old-attempt", "K-attacker"
DATA_TYPES = ("SHARED", "SEALED", "DONE")
MAX_CONNECTIONS = 3  # the target listens for this many connections, then its deadline ends the attempt
FIRST_DATA_SEQ = 2  # HELLO is seq 0, AUTH seq 1 (source to target)


@dataclass(frozen=True)
class Design:
    """The protocol's protections; the real design has all of them."""

    authenticate: bool = True  # False: wire v1 (no handshake MACs, no frame protection)
    check_migration_id: bool = True  # the target compares HELLO's id before the challenge
    target_nonce: bool = True  # the transcript (hence keys and proofs) includes the target's fresh nonce
    separate_proof_keys: bool = True  # m_t != m_s
    seq_bound: bool = True  # the frame's seq is in its GCM nonce and additional data
    sealed_mac_covers_records: bool = True  # the sealed frame's GMAC covers the 64-byte record headers


class Frame(NamedTuple):
    protected: bool
    type: str
    seq: int
    body: Term


@dataclass(frozen=True)
class Session:
    """The parameters of one source's run: who it is, what it sends."""

    label: str
    migration_id: str
    key: str
    nonce_s: str

    @property
    def hello(self) -> Term:
        return ("hello", 2, self.migration_id, self.nonce_s)

    def script(self) -> tuple[tuple[str, Term], ...]:
        """The data frames this source sends after AUTH: (type, content)."""

        def rec(page: int) -> Term:
            return (("rh", self.migration_id, self.label, page), ("ct", self.migration_id, self.label, page))

        return (
            ("SHARED", ("page", self.label, 1)),
            ("SEALED", (rec(2), rec(3))),
            ("SEALED", (rec(4), rec(5))),
            ("DONE", ("done", self.label)),
        )


# ---- the cryptography, symbolically ----


def transcript(design: Design, hello: Term, nonce_t: str) -> Term:
    return ("th", hello, nonce_t) if design.target_nonce else ("th", hello)


def derive(design: Design, key: str, th: Term, label: str) -> Term:
    if label in ("m_t", "m_s") and not design.separate_proof_keys:
        label = "m"
    return ("kdf", key, th, label)


def mac(key: Term, data: Term) -> Term:
    return ("mac", key, data)


def nonce(design: Design, seq: int) -> Term:
    return ("s2t", seq) if design.seq_bound else "s2t"


def aad(design: Design, ftype: str, seq: int) -> Term:
    return (ftype, seq if design.seq_bound else None, True)


def record_headers(design: Design, records: Term) -> Term:
    return tuple(rh for rh, _ in records) if design.sealed_mac_covers_records else None


def protect(design: Design, key: Term, ftype: str, seq: int, content: Term) -> Frame:
    """What a writer with ``key`` sends for a data frame."""
    if not design.authenticate:
        return Frame(False, ftype, seq, content)
    if ftype == "SEALED":
        tag = mac(key, (nonce(design, seq), aad(design, ftype, seq), record_headers(design, content)))
        return Frame(True, ftype, seq, (content, tag))
    return Frame(True, ftype, seq, ("enc", key, nonce(design, seq), aad(design, ftype, seq), content))


def open_frame(design: Design, key: Term, seq: int, frame: Frame) -> Term | None:
    """The reader's checks (flag, seq, tag) and the target helper's open of sealed records; the content,
    or None for a refusal."""
    if frame.protected != design.authenticate or frame.seq != seq or frame.type not in DATA_TYPES:
        return None
    if not design.authenticate:
        content = frame.body
    elif frame.type == "SEALED":
        if not (isinstance(frame.body, tuple) and len(frame.body) == 2):
            return None
        content, tag = frame.body
        if tag != mac(key, (nonce(design, seq), aad(design, "SEALED", seq), record_headers(design, content))):
            return None
    else:
        want = ("enc", key, nonce(design, seq), aad(design, frame.type, seq))
        if not (isinstance(frame.body, tuple) and len(frame.body) == 5 and frame.body[:4] == want):
            return None
        content = frame.body[4]
    if frame.type == "SEALED" and not helper_opens(content):
        return None
    return content


def helper_opens(records: Term) -> bool:
    """The target helper opens a record only if its ciphertext is the one its tag seals, for this
    migration id (the id is in the helper's AAD)."""
    if not isinstance(records, tuple):
        return False
    for record in records:
        if not (isinstance(record, tuple) and len(record) == 2):
            return False
        rh, ct = record
        if not (isinstance(rh, tuple) and rh[0] == "rh" and ct == ("ct", *rh[1:]) and rh[1] == ID_THIS):
            return False
    return True


def handshake_frames(design: Design, session: Session, nonce_t: str) -> list[Frame]:
    """A complete run of ``session`` against a target that drew ``nonce_t`` (for recordings)."""
    th = transcript(design, session.hello, nonce_t)
    frames = [
        Frame(False, "HELLO", 0, session.hello),
        Frame(False, "CHALLENGE", 0, (nonce_t, mac(derive(design, session.key, th, "m_t"), th))),
        Frame(False, "AUTH", 1, mac(derive(design, session.key, th, "m_s"), th)),
    ]
    return frames + send_script(design, derive(design, session.key, th, "k_s2t"), session)


def send_script(design: Design, key: Term, session: Session) -> list[Frame]:
    """The data frames ``session``'s writer sends under ``key``."""
    return [protect(design, key, t, FIRST_DATA_SEQ + i, c) for i, (t, c) in enumerate(session.script())]


# ---- the actors' states ----

LISTEN, WAIT_AUTH, OPEN, COMPLETE, FAILED = "listen", "wait-auth", "open", "complete", "failed"
WAIT_CHALLENGE = "wait-challenge"


class Target(NamedTuple):
    phase: str
    connection: int  # connections accepted so far - 1; the nonce_t of connection c is ("nt", c)
    hello: Term = None  # the HELLO of this connection (from WAIT_AUTH on)
    seq: int = FIRST_DATA_SEQ  # next data frame expected
    accepted: tuple[tuple[str, Term], ...] = ()

    @property
    def nonce_t(self) -> str:
        return f"nt{self.connection}"


class Source(NamedTuple):
    phase: str
    nonce_t: str | None = None  # the CHALLENGE nonce it accepted


class State(NamedTuple):
    target: Target
    sources: tuple[Source, ...]
    issued: frozenset[tuple[Term, str]]  # (HELLO, nonce_t) of every CHALLENGE the target sent
    emitted: frozenset[Frame]  # every frame an honest actor sent (the network saw them)


@dataclass
class World:
    """The fixed cast: the chosen source, the optional twin, the recordings the network holds."""

    design: Design
    twin: bool = True  # a second source, same stream key, another migration id
    sources: list[Session] = field(default_factory=list)
    recorded: frozenset[Frame] = frozenset()

    def __post_init__(self) -> None:
        self.sources = [Session("this", ID_THIS, K_THIS, "ns-this")]
        if self.twin:
            self.sources.append(Session("twin", ID_OTHER, K_THIS, "ns-twin"))
        recordings = [
            (Session("other", ID_OTHER, K_OTHER, "ns-rec-other"), "nt-rec-other"),  # another migration
            (Session("retry", ID_THIS, K_OLD, "ns-rec-retry"), "nt-rec-retry"),  # an earlier attempt
            (Session("reuse", ID_THIS, K_THIS, "ns-rec-reuse"), "nt-rec-reuse"),  # ... that had this key
        ]
        self.recorded = frozenset(f for s, nt in recordings for f in handshake_frames(self.design, s, nt))

    def initial(self) -> State:
        sent = {Frame(False, "HELLO", 0, s.hello) for s in self.sources}
        if self.design.authenticate:
            return State(Target(LISTEN, 0), tuple(Source(WAIT_CHALLENGE) for _ in self.sources), frozenset(),
                         frozenset(sent))  # fmt: skip
        # wire v1: no challenge; every source sends its whole stream straight away
        for s in self.sources:
            sent.update(send_script(self.design, None, s))
        sources = tuple(Source(OPEN) for _ in self.sources)
        return State(Target(LISTEN, 0), sources, frozenset(), frozenset(sent))


# ---- the network's repertoire ----


def network_parts(frames: Iterable[Frame]) -> tuple[set[Term], set[str], set[Term]]:
    """MACs, target nonces and HELLOs the network can lift out of frames it knows."""
    macs: set[Term] = set()
    nonces: set[str] = {"nt-attacker"}
    hellos: set[Term] = set()
    for f in frames:
        if f.type == "CHALLENGE":
            nonces.add(f.body[0])
            macs.add(f.body[1])
        elif f.type == "AUTH":
            macs.add(f.body)
        elif f.type == "HELLO":
            hellos.add(f.body)
    return macs, nonces, hellos


def _edits(design: Design, f: Frame, sealed: list[Frame]) -> Iterator[Frame]:
    """A known data frame with one field changed: seq, type, the PROTECTED flag, or (sealed) its records."""
    for seq in range(FIRST_DATA_SEQ + 4):
        if seq != f.seq:
            yield f._replace(seq=seq)
    for ftype in DATA_TYPES:
        if ftype != f.type:
            yield f._replace(type=ftype)
    yield f._replace(protected=not f.protected)
    if f.type != "SEALED":
        return
    records, tag = f.body if design.authenticate else (f.body, None)
    for other in sealed:
        theirs = other.body[0] if design.authenticate else other.body
        if theirs == records:
            continue
        spliced = theirs  # every record from another frame
        swapped_ct = ((records[0][0], theirs[0][1]), *records[1:])  # one ciphertext from another record
        for new in (spliced, swapped_ct):
            yield f._replace(body=(new, tag) if design.authenticate else new)


def network_frames(design: Design, known: frozenset[Frame]) -> list[Frame]:
    """Every frame the network can deliver, given the frames it knows."""
    out: set[Frame] = set(known)
    macs, nonces, hellos = network_parts(known)
    # its own handshake messages, with proofs under its own key for the transcripts it can name (a proof
    # under its key never verifies; a handful stand for all of them)
    out |= {Frame(False, "HELLO", 0, ("hello", 2, mid, "ns-attacker")) for mid in (ID_THIS, ID_OTHER)}
    hellos.add(("hello", 2, ID_THIS, "ns-attacker"))
    for nt in nonces:
        own = {h: {m: mac(derive(design, K_ATTACKER, transcript(design, h, nt), m), transcript(design, h, nt))
                   for m in ("m_t", "m_s")} for h in hellos}  # fmt: skip
        out |= {Frame(False, "CHALLENGE", 0, (nt, m)) for m in macs | {p["m_t"] for p in own.values()}}
        out |= {Frame(False, "AUTH", 1, p["m_s"]) for p in own.values()}
    out |= {Frame(False, "AUTH", 1, m) for m in macs}
    # data frames: edited copies of known ones, and its own (unprotected, or under a key of its own)
    data = [f for f in known if f.type in DATA_TYPES]
    sealed = [f for f in data if f.type == "SEALED"]
    for f in data:
        out.update(_edits(design, f, sealed))
    evil_record = (("rh", ID_THIS, "evil", 9), ("ct", ID_THIS, "evil", 9))
    evil = {"SHARED": ("page", "evil", 1), "SEALED": (evil_record,), "DONE": ("done", "evil")}
    forged_key = derive(design, K_ATTACKER, "th-attacker", "k_s2t")
    for ftype, seq in itertools.product(DATA_TYPES, range(FIRST_DATA_SEQ, FIRST_DATA_SEQ + 4)):
        out.add(Frame(False, ftype, seq, evil[ftype]))
        out.add(protect(Design(), forged_key, ftype, seq, evil[ftype]))
    return sorted(out, key=repr)  # a fixed order: the search is deterministic


# ---- the transitions ----


class Violation(Exception):
    """An invariant fails in a reachable state; ``trace`` is the actions that lead there."""

    def __init__(self, invariant: str, detail: str, trace: list[str]) -> None:
        super().__init__(f"{invariant}: {detail}\n  " + "\n  ".join(trace))
        self.invariant, self.detail, self.trace = invariant, detail, trace


def first_broken(broken: Iterable[tuple[str, str]], ignore: frozenset[str]) -> tuple[str, str] | None:
    """The first (invariant, detail) in ``broken`` whose invariant is not in ``ignore``, or None."""
    return next((b for b in broken if b[0] not in ignore), None)


class Move(NamedTuple):
    """What one delivery does: an actor's new state and the frames it sends in answer."""

    actor: Any  # the new Target or Source
    issued: frozenset[tuple[Term, str]] = frozenset()
    sent: frozenset[Frame] = frozenset()


def distinct_outcomes(
    frames: Iterable[Frame], move: Callable[[Frame], Outcome]
) -> tuple[list[tuple[Outcome, Frame]], int]:
    """One frame per distinct outcome of delivering each of ``frames``, and how many were delivered."""
    seen: dict[Outcome, Frame] = {}
    tried = 0
    for f in frames:
        tried += 1
        seen.setdefault(move(f), f)
    return list(seen.items()), tried


class Model:
    def __init__(self, design: Design = Design(), *, twin: bool = True) -> None:
        self.design = design
        self.world = World(design, twin)
        self._network: dict[frozenset[Frame], list[Frame]] = {}
        # (actor, its state, what the network knows) -> the distinct moves, each with one frame that makes it
        self._moves: dict[tuple[Any, ...], list[tuple[Move, Frame]]] = {}
        self.deliveries = 0  # frames handed to an actor, before moves that coincide are merged

    def frames(self, emitted: frozenset[Frame]) -> list[Frame]:
        if emitted not in self._network:
            self._network[emitted] = network_frames(self.design, emitted | self.world.recorded)
        return self._network[emitted]

    # -- target --
    @staticmethod
    def refuse_connection(t: Target) -> Target:
        """A refusal (or a reset): before AUTH the target listens again; after it, the migration fails."""
        if t.phase != OPEN and t.phase in (LISTEN, WAIT_AUTH) and t.connection + 1 < MAX_CONNECTIONS:
            return Target(LISTEN, t.connection + 1)
        return t._replace(phase=FAILED) if t.phase != COMPLETE else t

    def to_target(self, t: Target, f: Frame) -> Move:
        d = self.design
        if t.phase == LISTEN:
            if f.protected or f.type != "HELLO" or f.seq != 0:
                return Move(self.refuse_connection(t))
            if d.check_migration_id and f.body[2] != ID_THIS:
                return Move(self.refuse_connection(t))
            if not d.authenticate:
                return Move(t._replace(phase=OPEN, hello=f.body))
            th = transcript(d, f.body, t.nonce_t)
            challenge = Frame(False, "CHALLENGE", 0, (t.nonce_t, mac(derive(d, K_THIS, th, "m_t"), th)))
            return Move(t._replace(phase=WAIT_AUTH, hello=f.body), frozenset({(f.body, t.nonce_t)}),
                        frozenset({challenge}))  # fmt: skip
        if t.phase == WAIT_AUTH:
            th = transcript(d, t.hello, t.nonce_t)
            if f != Frame(False, "AUTH", 1, mac(derive(d, K_THIS, th, "m_s"), th)):
                return Move(self.refuse_connection(t))
            return Move(t._replace(phase=OPEN))
        if t.phase == OPEN:
            key = derive(d, K_THIS, transcript(d, t.hello, t.nonce_t), "k_s2t")
            content = open_frame(d, key, t.seq, f)
            if content is None:
                return Move(t._replace(phase=FAILED))
            phase = COMPLETE if f.type == "DONE" else OPEN
            return Move(t._replace(phase=phase, seq=t.seq + 1, accepted=(*t.accepted, (f.type, content))))
        return Move(t)  # COMPLETE / FAILED: the connection is gone

    # -- sources --
    def to_source(self, index: int, s: Source, f: Frame) -> Move:
        d, session = self.design, self.world.sources[index]
        if s.phase != WAIT_CHALLENGE:
            return Move(s)
        nonce_t, proof = f.body if f.type == "CHALLENGE" else ("", None)
        th = transcript(d, session.hello, nonce_t)
        if f.protected or f.type != "CHALLENGE" or f.seq != 0:
            return Move(Source(FAILED))
        if proof != mac(derive(d, session.key, th, "m_t"), th):
            return Move(Source(FAILED))
        sent = {Frame(False, "AUTH", 1, mac(derive(d, session.key, th, "m_s"), th))}
        sent.update(send_script(d, derive(d, session.key, th, "k_s2t"), session))
        return Move(Source(OPEN, nonce_t), sent=frozenset(sent))

    def _distinct(
        self, key: tuple[Any, ...], emitted: frozenset[Frame], move: Callable[[Frame], Move]
    ) -> list[tuple[Move, Frame]]:
        """Deliver every frame the network can build; keep one frame per distinct outcome."""
        if key not in self._moves:
            self._moves[key], tried = distinct_outcomes(self.frames(emitted), move)
            self.deliveries += tried
        return self._moves[key]

    def successors(self, state: State) -> Iterator[tuple[str, State]]:
        t, emitted = state.target, state.emitted
        if t.phase in (LISTEN, WAIT_AUTH, OPEN):
            for m, f in self._distinct(("target", t, emitted), emitted, functools.partial(self.to_target, t)):
                yield (
                    f"deliver {describe(f)} to the target",
                    state._replace(target=m.actor, issued=state.issued | m.issued, emitted=emitted | m.sent),
                )
            yield "reset the target's connection", state._replace(target=self.refuse_connection(t))
        for i, s in enumerate(state.sources):
            if s.phase != WAIT_CHALLENGE:
                continue
            label = self.world.sources[i].label
            deliver = functools.partial(self.to_source, i, s)
            for m, f in self._distinct(("source", i, s, emitted), emitted, deliver):
                sources = (*state.sources[:i], m.actor, *state.sources[i + 1 :])
                nxt = state._replace(sources=sources, emitted=emitted | m.sent)
                yield f"deliver {describe(f)} to {label}", nxt

    def initial(self) -> State:
        return self.world.initial()

    @staticmethod
    def complete(state: State) -> bool:
        return state.target.phase == COMPLETE

    # -- invariants --
    def check(self, state: State, ignore: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """The first invariant that ``state`` breaks (except those in ``ignore``): (name, detail), or None."""
        return first_broken(self._broken(state), ignore)

    def _broken(self, state: State) -> Iterator[tuple[str, str]]:
        d, t, this = self.design, state.target, self.world.sources[0]
        src = state.sources[0]
        script = this.script()
        sent = len(script) if src.phase == OPEN else 0
        if t.accepted != script[: len(t.accepted)] or len(t.accepted) > sent:
            yield "I1", f"the target accepted {t.accepted}, the source sent {script[:sent]}"
        if d.authenticate and t.phase in (OPEN, COMPLETE) and not (
            t.hello == this.hello and src.phase == OPEN and src.nonce_t == t.nonce_t
        ):  # fmt: skip
            yield "I2", f"the target authenticated {t.hello} on {t.nonce_t}, the source is {src}"
        if t.phase == COMPLETE and t.accepted != script:
            yield "I3", f"the target completed with {t.accepted}"
        for f in state.emitted:
            if f.type in ("SHARED", "DONE") and not (f.protected and f.body[0] == "enc"):
                yield "I4", f"{describe(f)} left a writer unencrypted"
        if d.authenticate and src.phase == OPEN and (this.hello, src.nonce_t) not in state.issued:
            yield "I5", f"the source accepted nonce {src.nonce_t}, which the target never issued to it"


def describe(f: Frame) -> str:
    flag = "protected " if f.protected else ""
    return f"{flag}{f.type}#{f.seq} {f.body!r:.90}"


@dataclass
class Result:
    states: int  # distinct states reached
    transitions: int  # distinct (state, outcome) pairs followed
    deliveries: int  # frames handed to an actor (outcomes that coincide are then merged)
    complete_reachable: bool  # the honest run completes (so the invariants are not vacuous)
    deepest: int


class Searchable(Protocol):
    """What ``explore`` needs of a model (this one, and channels_model's two-channel session)."""

    deliveries: int

    def initial(self) -> Any: ...
    def complete(self, state: Any) -> bool: ...
    def check(self, state: Any, ignore: frozenset[str] = frozenset()) -> tuple[str, str] | None: ...
    def successors(self, state: Any) -> Iterator[tuple[str, Any]]: ...


def explore(model: Searchable, max_actions: int, *, ignore: frozenset[str] = frozenset()) -> Result:
    """Breadth-first over every state reachable within ``max_actions`` network actions; raises Violation
    with the shortest trace to the first state that breaks an invariant (except those in ``ignore``)."""
    start = model.initial()
    parents: dict[Any, tuple[Any, str]] = {start: (None, "start")}
    queue = deque([(start, 0)])
    transitions, complete, deepest = 0, False, 0
    while queue:
        state, depth = queue.popleft()
        deepest = max(deepest, depth)
        broken = model.check(state, ignore)
        if broken is not None:
            raise Violation(*broken, _trace(parents, state))
        complete |= model.complete(state)
        if depth == max_actions:
            continue
        for action, nxt in model.successors(state):
            transitions += 1
            if nxt not in parents:
                parents[nxt] = (state, action)
                queue.append((nxt, depth + 1))
    return Result(len(parents), transitions, model.deliveries, complete, deepest)


def _trace(parents: dict[Any, tuple[Any, str]], state: Any) -> list[str]:
    steps: list[str] = []
    at: Any = state
    while at is not None:
        prev, action = parents[at]
        steps.append(action)
        at = prev
    return steps[::-1]
