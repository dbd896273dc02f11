"""A model of the SNP key release (docs/key-release.md), and an exhaustive check against an active host.

Symbolic (Dolev-Yao): keys, reports, sealed messages and wraps are tuples, equal only when built from equal
parts; the host builds a term only from parts it has seen or owns. The actors: the guest's helper (one
measured guest, ``M_GOOD``), its secure processor (signs reports; opens and seals the guest's messages
under VMPCK0, which the host never has), the owner's broker (opens up to two release sessions, each with
a fresh nonce; wraps the secret to a report that passes), and the host, which relays, drops, replays and
reorders anything it has seen, runs guests of its own (``M_EVIL``: the PSP signs any REPORT_DATA for them),
and wraps secrets of its own with keys of its own. ``explore`` walks every state reachable within a bound
on the host's actions and checks the invariants in each. ``Design`` switches off one protection at a
time, so a test shows the check finds the attack each protection stops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

Term = Any  # nested tuples of str/int

M_GOOD, M_EVIL = "M-good", "M-evil"
SECRET, HOST_SECRET = "S-owner", "S-host"
HOST_KEY, HOST_NONCE = "a-host", "n-host"
OWNER_STATIC = "s-owner"
MAX_REQUESTS = 2  # KEY_REQUESTs the helper serves (each a fresh key pair g1, g2)
MAX_SESSIONS = 2  # release sessions the broker opens (nonces n1, n2)


@dataclass(frozen=True)
class Design:
    """The protections whose loss the check shows as an attack; the real design has both. (The nonce,
    the helper's REPORT_DATA check and the report as AAD are kept in the model but not switchable: with
    keys that never leak, their loss is no attack here. They give freshness and defence in depth.)"""

    check_measurement: bool = True  # the broker wraps only to a report with the expected measurement
    owner_static: bool = True  # the KEK also needs X25519(s, G), s the owner's key measured into the guest


def pub(key: str) -> Term:
    return ("pub", key)


@dataclass(frozen=True)
class State:
    helper: str = "NONE"  # NONE, REQUESTED, REPORTED, RELEASED
    requests: int = 0  # key pairs drawn so far: the current one is g<requests>
    nonce: Term = None
    report: Term = None  # the report the helper holds (REPORTED, RELEASED)
    seq: int = 0  # the helper's next request number is seq + 1
    psp_seq: int = 0  # the last number the PSP has seen
    installed: Term = None  # the secret the helper took
    sessions: int = 0
    known: frozenset[Term] = frozenset()  # what the host has seen (sealed messages, reports, wraps)


def _current_key(state: State) -> str:
    return f"g{state.requests}"


def _wrap(ephemeral: str, static: str, guest_pub: Term, nonce: Term, report: Term, secret: str) -> Term:
    return ("wrap", pub(ephemeral), ephemeral, static, guest_pub, nonce, report, secret)


def _opens(design: Design, state: State, wrap: Term) -> bool:
    """KEY_RELEASE: the helper's own KEK (its key, the wrap's public ephemeral key, the owner's static key
    it was launched with, its nonce and report) must be the one the wrap was made under."""
    _, e_pub, ephemeral, static, guest_pub, nonce, report, _ = wrap
    if e_pub != pub(ephemeral) or guest_pub != pub(_current_key(state)) or nonce != state.nonce:
        return False
    if design.owner_static and static != OWNER_STATIC:
        return False
    return bool(report == state.report)


def _host_can_open(design: Design, wrap: Term) -> bool:
    """The host learns a wrap's secret if it holds the guest-side key (its own guests' keys only) or the
    owner-side keys (its own ephemeral key, and the owner's static key, which it never has)."""
    _, _, ephemeral, static, guest_pub, _, _, _ = wrap
    if guest_pub == pub(HOST_KEY):
        return True
    return ephemeral == HOST_KEY and (not design.owner_static or static == HOST_KEY)


def _nonces(state: State) -> list[Term]:
    return [HOST_NONCE, *[f"n{i}" for i in range(1, state.sessions + 1)]]


def _reports(state: State) -> list[Term]:
    return [t for t in state.known if t[0] == "report"]


def _host_wraps(state: State) -> Iterator[Term]:
    """Wraps the host can build: its own ephemeral key, any guest key it has seen in a report."""
    for report in _reports(state):
        _, _, (nonce, guest_pub) = report
        yield _wrap(HOST_KEY, HOST_KEY, guest_pub, nonce, report, HOST_SECRET)


def steps(design: Design, state: State) -> Iterator[tuple[str, State]]:
    """Every move the host can make from ``state`` (each also runs the honest party's answer)."""
    learn = state.known
    # KEY_REQUEST with any nonce the host knows: the helper draws a new key and seals a request.
    if state.requests < MAX_REQUESTS:
        for nonce in _nonces(state):
            n = state.requests + 1
            req = ("sealed-req", state.seq + 1, (nonce, pub(f"g{n}")))
            yield f"KEY_REQUEST({nonce})", replace(
                state, helper="REQUESTED", requests=n, nonce=nonce, report=None, seq=state.seq + 1,
                known=learn | {req},
            )  # fmt: skip
    # SNP_GUEST_REQUEST: any sealed request the host has seen, to the PSP (the next number only).
    for req in [t for t in learn if t[0] == "sealed-req"]:
        _, seq, report_data = req
        if seq == state.psp_seq + 1:
            rsp = ("sealed-rsp", seq + 1, ("report", M_GOOD, report_data))
            yield f"PSP({seq})", replace(state, psp_seq=seq + 1, known=learn | {rsp, rsp[2]})
    # The host's own guest: the PSP signs any REPORT_DATA it can build, with the host's key in it.
    for nonce in _nonces(state):
        report = ("report", M_EVIL, (nonce, pub(HOST_KEY)))
        if report not in learn:
            yield f"EVIL_REPORT({nonce})", replace(state, known=learn | {report})
    # KEY_REPORT: any sealed response the host has seen.
    if state.helper == "REQUESTED":
        for rsp in [t for t in learn if t[0] == "sealed-rsp"]:
            _, seq, report = rsp
            bound = report[2] == (state.nonce, pub(_current_key(state)))
            if seq == state.seq + 1 and bound:
                yield f"KEY_REPORT({seq})", replace(state, helper="REPORTED", report=report, seq=seq + 1)
            else:
                yield f"KEY_REPORT-refused({seq})", replace(state, helper="NONE", seq=state.seq + 2)
    # The broker: a new session (nonce), or a release against any report the host shows it.
    if state.sessions < MAX_SESSIONS:
        yield "SESSION", replace(state, sessions=state.sessions + 1)
    for report in _reports(state):
        _, measurement, (nonce, guest_pub) = report
        if design.check_measurement and measurement != M_GOOD:
            continue
        for session in range(1, state.sessions + 1):
            if nonce != f"n{session}":
                continue
            wrap = _wrap(f"e{session}", OWNER_STATIC, guest_pub, nonce, report, SECRET)
            if wrap not in learn:
                yield f"RELEASE(n{session})", replace(state, known=learn | {wrap})
    # KEY_RELEASE: any wrap the host has seen or can build.
    if state.helper == "REPORTED":
        for wrap in [*[t for t in learn if t[0] == "wrap"], *_host_wraps(state)]:
            if _opens(design, state, wrap):
                yield "KEY_RELEASE", replace(state, helper="RELEASED", installed=wrap[7])


def violations(design: Design, state: State) -> list[str]:
    """The invariants: the helper takes only the owner's secret, and the host never learns it."""
    found = []
    if state.installed not in (None, SECRET):
        found.append(f"the helper took {state.installed}, a secret the owner never released")
    for wrap in [t for t in state.known if t[0] == "wrap"]:
        if wrap[7] == SECRET and _host_can_open(design, wrap):
            found.append("the host can open a wrap of the owner's secret")
    return found


@dataclass(frozen=True)
class Result:
    states: int
    violation: str | None
    trace: tuple[str, ...]


def explore(design: Design = Design(), *, max_depth: int = 40) -> Result:
    """Breadth-first over every host schedule up to ``max_depth`` moves; the first violation and its trace.
    The default bound is past the fixpoint (two requests and two sessions close the space at depth 12):
    the walk visits every reachable state."""
    start = State()
    seen = {start}
    queue: deque[tuple[State, tuple[str, ...]]] = deque([(start, ())])
    while queue:
        state, trace = queue.popleft()
        bad = violations(design, state)
        if bad:
            return Result(len(seen), bad[0], trace)
        if len(trace) == max_depth:
            continue
        for label, nxt in steps(design, state):
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, (*trace, label)))
    return Result(len(seen), None, ())
