"""The precopy convergence policy: a pure function of what the rounds so far measured.

After each round the orchestrator asks ``decide``: go on with another round, stop the guest and copy the
rest (converged, or out of rounds), or act on the completion timeout as the plan says (abort, or throttle
the guest and go on). Nothing here touches a VMM, so the rules are tested on literal numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAGE = 4096
# A sealed page travels as a 4160-byte record, a shared one as 4112 bytes: count the larger.
WIRE_BYTES_PER_PAGE = 4160
THROTTLE_STEP, THROTTLE_MAX = 0.2, 0.8  # QEMU's auto-converge also goes up in steps, capped below 100 %


class Action(enum.StrEnum):
    CONTINUE = "continue"  # another precopy round
    STOP_AND_COPY = "stop-and-copy"  # pause the guest, send what is left
    THROTTLE = "throttle"  # slow the guest down, then another round
    ABORT = "abort"  # give up; the source keeps running


@dataclass(frozen=True)
class RoundStats:
    """One precopy round as the source measured it. ``dirty_after``: pages dirtied while it ran;
    ``bytes_shared``/``bytes_sealed``: the frames of each kind it sent, as the stream counted them."""

    round: int
    shared_pages: int
    zero_pages: int
    sealed_pages: int
    bytes_sent: int
    seconds: float
    dirty_after: int
    bytes_shared: int = 0
    bytes_sealed: int = 0

    @property
    def pages(self) -> int:
        return self.shared_pages + self.sealed_pages

    @property
    def bandwidth(self) -> float:
        """Bytes per second this round achieved (0 when it sent nothing)."""
        return self.bytes_sent / self.seconds if self.seconds > 0 and self.bytes_sent else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {
            "round": self.round, "shared_pages": self.shared_pages, "zero_pages": self.zero_pages,
            "sealed_pages": self.sealed_pages, "bytes_sent": self.bytes_sent, "seconds": self.seconds,
            "dirty_after": self.dirty_after, "bytes_shared": self.bytes_shared,
            "bytes_sealed": self.bytes_sealed,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, float | int]) -> RoundStats:
        return cls(
            int(doc["round"]), int(doc["shared_pages"]), int(doc["zero_pages"]), int(doc["sealed_pages"]),
            int(doc["bytes_sent"]), float(doc["seconds"]), int(doc["dirty_after"]),
            int(doc.get("bytes_shared", 0)), int(doc.get("bytes_sealed", 0)),
        )  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """The plan's limits as the policy needs them (seconds, bytes/s; None = unlimited). ``max_rounds``
    counts every precopy round (the pause's final round is not one)."""

    max_downtime: float
    max_rounds: int
    completion_timeout: float
    on_timeout: str = "abort"  # abort | throttle | force-complete (limits.on_timeout)
    bandwidth_cap: float | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    bandwidth: float  # the bandwidth estimate used, bytes/s
    eta: float | None  # seconds to send what is left at that bandwidth
    throttle: float = 0.0  # the guest's throttle after this decision (0: none)
    limit: str | None = None  # the limit that decided: max_downtime, max_precopy_rounds, completion_timeout
    forced: bool = False  # stop-and-copy although the pause will not fit max_downtime (force-complete)


def estimate_bandwidth(rounds: list[RoundStats], cap: float | None) -> float:
    """The best recent rate: the last round that sent a meaningful amount (small rounds are noisy)."""
    rates = [r.bandwidth for r in rounds[-3:] if r.bytes_sent >= 1 << 20] or [r.bandwidth for r in rounds]
    best = max(rates, default=0.0)
    return min(best, cap) if cap is not None and best else best


def _steps_to_max(throttle: float) -> int:
    """Throttle steps (one per round) still possible before THROTTLE_MAX."""
    return max(0, round((THROTTLE_MAX - throttle) / THROTTLE_STEP))


def decide(rounds: list[RoundStats], limits: Limits, *, elapsed: float, throttle: float = 0.0) -> Decision:
    """What to do after ``rounds`` (at least one), ``elapsed`` seconds into precopy.

    Stop and copy only when what is left fits ``max_downtime``: the pause is a promise. When the rounds
    or the time run out first, ``on_timeout`` decides: abort (the source keeps running), force-complete
    (accept the longer pause; the decision says so), or throttle, which slows the guest a step per round
    early enough to reach its maximum before the rounds run out, and aborts if even that does not fit.
    ``max_rounds`` is never exceeded: at ``max_rounds`` rounds the answer is never CONTINUE or THROTTLE."""
    last = rounds[-1]
    bandwidth = estimate_bandwidth(rounds, limits.bandwidth_cap)
    left = last.dirty_after * WIRE_BYTES_PER_PAGE
    eta = left / bandwidth if bandwidth else None
    budget = f"{limits.max_downtime * 1e3:.0f} ms"
    if eta is not None and eta <= limits.max_downtime:
        why = f"converged: {last.dirty_after} dirty pages left fit in {budget}"
        return Decision(Action.STOP_AND_COPY, why, bandwidth, eta, throttle, "max_downtime")
    rounds_left = limits.max_rounds - len(rounds)
    if rounds_left <= 0:
        done = f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}"
        kept = "after any rounds kept for the MAC fill"
        why = f"{done} reached max_precopy_rounds (a limit of {limits.max_rounds} here, {kept})"
        limit = "max_precopy_rounds"
    elif elapsed > limits.completion_timeout:
        limit = "completion_timeout"
        why = f"precopy ran {elapsed:.1f} s, over the completion timeout of {limits.completion_timeout:.1f} s"
    elif limits.on_timeout == "throttle" and 0 < rounds_left <= _steps_to_max(throttle):
        more = _more(throttle)
        why = f"{last.dirty_after} dirty pages left, {rounds_left} rounds to go: throttling to {more:.0%}"
        return Decision(Action.THROTTLE, why, bandwidth, eta, more, "max_precopy_rounds")
    else:
        return Decision(Action.CONTINUE, f"{last.dirty_after} dirty pages left", bandwidth, eta, throttle)
    need = f"~{eta * 1e3:.0f} ms" if eta is not None else "an unknown time"
    over = f"{why}; the {last.dirty_after} dirty pages left need {need}, over max_downtime {budget}"
    if limits.on_timeout == "force-complete":
        return Decision(Action.STOP_AND_COPY, f"{over}: force-complete accepts the longer pause", bandwidth,
                        eta, throttle, limit, forced=True)  # fmt: skip
    if limits.on_timeout == "throttle" and throttle < THROTTLE_MAX and rounds_left > 0:
        more = _more(throttle)
        return Decision(Action.THROTTLE, f"{over}: throttling the guest to {more:.0%}", bandwidth, eta, more,
                        limit)  # fmt: skip
    tail = ""
    if limits.on_timeout == "throttle":
        most = " (its maximum)" if throttle >= THROTTLE_MAX else ""
        tail = f" with the guest throttled to {throttle:.0%}{most}"
    return Decision(Action.ABORT, f"{over}{tail} (on_timeout: {limits.on_timeout})", bandwidth, eta,
                    throttle, limit)  # fmt: skip


def _more(throttle: float) -> float:
    return min(THROTTLE_MAX, round(throttle + THROTTLE_STEP, 2))
