"""The source side of a migration: the running guest, its dirty log, the outgoing stream, precopy rounds,
the throttle (auto-converge) and stop-and-copy. The stream itself is ``source.Outgoing``.

One lock orders everything that pauses or resumes the guest's vCPUs (the throttle's cycles, stop-and-copy,
an undo), so the throttle can never resume a guest that stop-and-copy just paused.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from confplan.core.wire import ErrorReport, Handover, Manifest
from confplan.errors import ConfplanError
from confplan.migration.dirty import DirtyTracker
from confplan.migration.handover import Do, Input, Msg, Role, SourceHandover, SourceState
from confplan.migration.handover_io import RECEIVE_CODES, SEND_CODES, Driver
from confplan.migration.helper import require_helper
from confplan.migration.manifest import state_hash
from confplan.migration.side import Log, MigrationSide, PauseTables, StreamSide
from confplan.migration.source import Outgoing
from confplan.transport import sockets
from confplan.vmm import Machine

Progress = Callable[[dict[str, Any]], None]
THROTTLE_PERIOD = 0.02  # seconds per pause/run cycle while the guest is throttled
MANIFEST_FORMAT = 1  # a MANIFEST frame of the host's digests (JSON; docs/handover.md)
SEALED_MANIFEST_FORMAT = 2  # a MANIFEST frame holding the source helper's SEAL_MANIFEST record (mailbox v5)
_RAN_AGAIN = (SourceState.ABORTED, SourceState.RECLAIMED)  # the handover gave the guest back to the source


class _Sampler:
    """Calls ``report(read())`` every ``interval`` seconds from a thread until ``stop``; a report that
    fails (the orchestrator hung up) ends the reports, never the round."""

    def __init__(self, read: Callable[[], dict[str, Any]], report: Progress, interval: float) -> None:
        self._read, self._report, self._interval = read, report, max(interval, 0.05)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._report(self._read())
            except (OSError, ConfplanError):
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=1.0)


class OutgoingMigration(MigrationSide):
    """A source VMM's machine and its stream to the target."""

    role: ClassVar[str] = "source"

    def __init__(
        self, machine: Machine, *, psp_dir: Path, log: Log, state_dir: Path | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(machine, psp_dir=psp_dir, log=log, state_dir=state_dir, on_exit=on_exit)
        self.tracker: DirtyTracker | None = None
        self.migration_id = b""
        self.attempt = 0
        self.sealed_state = False  # SEV-ES/SNP: the vCPU state travels sealed by the helper
        self._paused_at = self._paused_wall = 0.0
        self._final: dict[str, Any] | None = None  # what the pause's copy sent (stop_and_copy's answer)
        self._final_error: BaseException | None = None
        # the pause's table work, posted once the bitmap is sent, and when the final round ended
        self._early_tables: tuple[PauseTables | None, float] = (None, 0.0)
        self._pause_in_cpl0 = 0  # stop_and_copy: pause until a vCPU is in a CPL0 service (a test), at most
        self.stream: Outgoing | None = None
        self.next_generation = 1  # the source MH refuses to seal a page twice under one generation
        self.throttle = 0.0
        self._vcpus = threading.Lock()  # pause/resume of the guest's vCPUs
        self._closed = threading.Event()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "outgoing": self.stream is not None, "throttle": self.throttle}

    # ---- the stream ----
    def connect(
        self, host: str, port: int, *, migration_id: bytes, stream_key: bytes, bandwidth: float | None,
        attempt: int = 0, progress_timeout: float | None = None, sealed_state: bool = False,
        channels: int = 1,
    ) -> None:  # fmt: skip
        """Dial the target's migration port and prove the stream key (the wire v2 handshake); a previous
        stream is replaced; ``channels`` > 1: that many connections (wire v4 parallel streams). ``attempt``
        numbers this try of the migration (the handover's records say
        which attempt their state belongs to). Refused while an earlier attempt's handover is undecided
        or handed the guest over."""
        machine = self.check_can_send()
        if self.handover is not None and self.handover.state not in _RAN_AGAIN:
            raise ConfplanError(
                f"the handover of attempt {self.attempt} is {self.handover.state.value}: no new attempt",
                hint="rerun `confplan apply`: it reconciles with what both sides hold",
            )
        self._close_stream("a new stream replaces it")
        self.handover, self.migration_id, self.attempt = None, migration_id, attempt
        self.sealed_state = sealed_state
        sock = sockets.dial_tcp(host, port, timeout=10.0, what="the target's migration port")
        if self.tracker is None:
            self.tracker = DirtyTracker(machine)
        mailboxes = self.helper()
        if mailboxes is not None and not machine.dirty_log.started:
            # while KVM still maps guest RAM 2 MiB at a time: once the log is on, each 4 KiB (docs/mailbox.md)
            mailboxes.warm(0, self.tracker.npages, huge=machine.ram.on_huge_pages())
        self.tracker.reset()  # the dirty log on from here
        self.shared_table = None
        self.stream = Outgoing(
            machine, sock, hello=self.hello(migration_id), stream_key=stream_key, mailboxes=mailboxes,
            tracker=self.tracker, next_generation=self.next_generation, bandwidth=bandwidth,
            peer=f"the target at {host}:{port}", progress_timeout=progress_timeout, channels=channels,
            dial=lambda: sockets.dial_tcp(host, port, timeout=10.0, what="the target's migration port"),
        )  # fmt: skip
        try:
            self.stream.start()
        except BaseException:
            self._close_stream("the handshake failed")
            raise
        self.log(f"source: stream to {host}:{port} open (authenticated)")

    def current_attempt(self) -> tuple[str | None, int]:
        return (self.migration_id.hex() or None), self.attempt

    def check_can_send(self) -> Machine:
        machine = self.need_machine()
        if not machine.config.dirty_logging:
            raise ConfplanError(
                f"this {self.role} machine keeps no dirty log, so it cannot send a live migration",
                hint="migrate from a source machine (launch-source); a target is built without one",
            )
        return machine

    def need_stream(self) -> Outgoing:
        self.need_machine()
        if self.stream is None:
            raise ConfplanError("no outgoing migration stream", hint="run start-incoming first")
        return self.stream

    def stream_side(self) -> StreamSide:
        return self.need_stream()

    def _close_stream(self, reason: str) -> None:
        if self.stream is not None:
            self.stream.abort(reason)
            self.stream = None

    # ---- precopy ----
    def precopy_round(self, progress: Progress | None = None, interval: float = 0.5) -> dict[str, Any]:
        """One precopy round; with ``progress``, that is told how far the round is every ``interval``
        seconds while it runs (from a thread of its own: the data path is not touched)."""
        stream = self.need_stream()
        sampler = _Sampler(stream.round_progress, progress, interval) if progress is not None else None
        try:
            stats = stream.send_round(final=False)
        except BaseException as err:
            self.log(f"source: round failed: {err}")
            self._close_stream("the round failed")
            raise
        finally:
            self.next_generation = stream.generation
            if sampler is not None:
                sampler.stop()
        return stats.to_json()

    def cancel_round(self) -> bool:
        """Cut the precopy round in flight short (Ctrl-C in the orchestrator): it fails at its next frame,
        the stream closes, the guest runs on. True when a round was in flight."""
        stream = self.stream
        cancelled = stream is not None and stream.cancel_round()
        if cancelled:
            self.log("source: the precopy round is cancelled")
        return cancelled

    def set_throttle(self, fraction: float) -> float:
        """Keep the guest's vCPUs paused ``fraction`` of the time (QEMU's auto-converge); 0 stops it."""
        if not 0.0 <= fraction < 1.0:
            raise ConfplanError(f"throttle {fraction} is outside [0, 1)")
        start = self.throttle == 0.0 and fraction > 0.0
        self.throttle = fraction
        if start:
            threading.Thread(target=self._throttle_loop, name="throttle", daemon=True).start()
        return fraction

    def _throttle_loop(self) -> None:
        machine = self.machine
        while self.throttle > 0.0 and not self._closed.is_set():
            with self._vcpus:
                if self.throttle == 0.0 or self.stream is None:
                    break
                machine.pause_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * self.throttle)
            with self._vcpus:
                if self.throttle > 0.0:
                    machine.resume_all_vcpus_except_aux()
            time.sleep(THROTTLE_PERIOD * (1.0 - self.throttle))

    # ---- the pause and the handover (docs/handover.md) ----
    def stop_and_copy(
        self, *, verdict_timeout: float, retry_interval: float = 0.2, pause_in_cpl0: int = 0
    ) -> dict[str, Any]:
        """START the handover: pause the guest's vCPUs (the helper serves on), send the last dirty pages,
        the vCPU states, the encryption bitmap, this side's MANIFEST and DONE. From here the two VMMs end
        the migration between themselves: the target checks and says VERIFIED, this side COMMITs, or it
        aborts (and runs the guest again) when no verdict comes within ``verdict_timeout`` of the pause.
        ``pause_in_cpl0`` > 0 (a test): pause up to that many times until a vCPU stops in a CPL0 service."""
        self.need_stream()
        self._pause_in_cpl0 = pause_in_cpl0
        if self.handover is not None:
            raise ConfplanError(
                f"the handover of attempt {self.attempt} already started ({self.handover.state.value})",
                hint="rerun `confplan apply`: it reconciles with what both sides hold",
            )
        self._final, self._final_error = None, None
        self.handover = Driver(
            SourceHandover(verdict_timeout, retry_interval), role=Role.SOURCE,
            guest_id=self.migration_id.hex(), attempt=self.attempt, files=self.files,
            send=self._handover_send, log=self.log,
            do={Do.PAUSE_GUEST: self._pause_for_handover, Do.RESUME_GUEST: self._resume_after_handover,
                Do.REDIAL: self._redial, Do.EXIT: self.on_exit},
        )  # fmt: skip
        self.handover.feed(Input.START)
        if self._final_error is not None or self._final is None:
            why = self._final_error or ConfplanError("the final copy was not sent")
            raise ConfplanError(
                f"stop-and-copy failed: {why}; the handover is {self.handover.state.value}",
                hint="the source guest runs again; rerun the apply to migrate again",
            ) from None
        threading.Thread(target=self._read_target, name="handover-reader", daemon=True).start()
        return self._final

    def _pause_for_handover(self) -> None:
        with self._vcpus:
            self.throttle = 0.0
            machine = self.need_machine()
            self._paused_at = time.monotonic()
            machine.pause_all_vcpus_except_aux()  # the seed's: the guest stops, the helper serves on
            if self._pause_in_cpl0:
                self._pause_again_until_cpl0(machine, self._pause_in_cpl0)
            self._paused_wall = time.time()

    def _pause_again_until_cpl0(self, machine: Machine, attempts: int) -> None:
        """A test of the CPL0 area's migration (stop-and-copy's ``pause_in_cpl0``): the pause counts from
        the last of these pauses."""
        self._paused_at = time.monotonic()
        found = machine.pause_in_cpl0(attempts)
        self._paused_at = time.monotonic()
        found_one = "a" if found else "no"
        self.log(f"source: {found_one} guest vCPU paused in a CPL0 service ({attempts} tries at most)")

    def _handover_send(self, msg: Msg) -> None:
        if msg is Msg.DONE:
            self._send_final()
        else:
            self.need_stream().send_handover(Handover(SEND_CODES[msg], self.attempt))

    def _send_final(self) -> None:
        """The pause's copy; a failure is remembered for stop_and_copy's answer and raised (LINK_DOWN)."""
        stream = self.need_stream()
        halted = time.monotonic()
        assert isinstance(self.handover, Driver) and isinstance(self.handover.machine, SourceHandover)
        # A stall in the pause must not outlast the source's deadline: the guest runs again by then.
        stream.bound_sends(self.handover.machine.verdict_timeout)
        try:
            stats = stream.send_round(final=True)
            sent = time.monotonic()
            seal = self._seal_state if self.sealed_state else None
            # Once the bitmap is on its way (the target's table work starts with it), the helpers' MACs and
            # PREPARE are posted, to run while the vCPU and device state is saved (sealed: SEV-ES/SNP) and
            # sent; the shared CRCs and the wait for the helper come with the manifest.
            self._early_tables = (None, sent)
            stream.send_state(
                self._paused_wall, seal=seal, manifest=self._manifest, bitmap_sent=self._start_tables_in_pause
            )
        except BaseException as err:
            self._final_error = err
            raise
        finally:
            self._drain_early_tables()
            self.next_generation = stream.generation
        done = time.monotonic()
        self.log(f"source: stop-and-copy sent {stats.pages} pages, the state and the manifest; guest paused")
        self._final = {
            "round": stats.to_json(), "paused_seconds": done - self._paused_at,
            "paused_wall": self._paused_wall, "held_back_pages": stream.totals.held_back,
            # the bitmap as sent (the guest is paused): resume-target compares the target's with it
            "enc_bitmap_sha256": self.need_machine().enc_bitmap.sha256(),
            "vcpus_at_cpl0": self.need_machine().vcpus_at_cpl0(),  # paused in a kernel service
            "conversions": self.need_machine().enc_bitmap.stats.conversions,
            "steps": {"pause_vcpus": halted - self._paused_at, "final_pages": sent - halted,
                      "vcpu_and_device_state": done - sent},
        }  # fmt: skip

    def _start_tables_in_pause(self) -> None:
        """The pause's table work posted to the helpers (``start_pause_tables`` with PREPARE), to run while
        the state is sent. A sealed state (SEV-ES/SNP) is sealed by the helpers other than the preparing
        one, so the PREPARE runs beside it; with one helper none is posted: the manifest does it all once
        the states are sealed (a SEAL_STATE on the preparing helper would drop a PREPARE made before, and
        the SEAL_MANIFEST would compute everything again)."""
        if not self.sealed_state:
            work = self.start_pause_tables(prepare=True)
        else:
            preparing, sealing = require_helper(self.helper(), "source", 0).apart()
            if sealing is preparing:
                return
            work = self.start_pause_tables(prepare=True, helpers=preparing)
        self._early_tables = (work, self._early_tables[1])

    def _drain_early_tables(self) -> None:
        """A pause that failed before its manifest: the table work it posted ends before anything else may
        post into those helpers' slots (its GPA list and request are there)."""
        early, since = self._early_tables
        self._early_tables = (None, since)
        if early is not None:
            with contextlib.suppress(ConfplanError):
                early.helper()

    def _seal_state(self, vcpu: int, blob: bytes) -> bytes:
        """SEV-ES/SNP: the vCPU's register state sealed by the source helper, so no host reads or edits it;
        by a helper other than the one that prepares the manifest meanwhile, where there is one."""
        _, sealing = require_helper(self.helper(), "source", 0).apart()
        return sealing.seal_state(vcpu, blob)

    def _manifest(self, state_parts: list[bytes]) -> list[Manifest]:
        """What the target checks before it may resume: the host's shared-page digest (format 1) and the
        source helper's sealed manifest of its own tables, the encryption bitmap, the state sent and the
        rounds (format 2, mailbox v5): only the two helpers can make or check it."""
        state_sent = time.monotonic()
        early, since = self._early_tables
        self._early_tables = (None, state_sent)
        tables = self.finish_pause_tables(early) if early is not None else self.pause_tables(prepare=True)
        tables_done = time.monotonic()
        stream = self.need_stream()
        mailboxes = require_helper(self.helper(), "source", 0)
        started = time.monotonic()
        sealed = mailboxes.seal_manifest(
            0, self.machine.layout.npages, enc_bitmap=bytes(self.machine.enc_bitmap.bitmap.view()),
            state_hash=state_hash(state_parts), rounds=stream.totals.rounds,
        )  # fmt: skip
        if self.handover is not None:
            self.handover.notes["digest_seconds"] = {
                **tables["seconds"], "seal": time.monotonic() - started, "state": state_sent - since,
                "tables_wait": tables_done - state_sent,
                # the helper's own time: ~2 ms a GiB computed, ~0.03 ms prepared (mailbox v7)
                "seal_helper": mailboxes.mailboxes[0].last_op_seconds(),
            }  # fmt: skip
        doc = {"format": MANIFEST_FORMAT, "table": tables["table"], "shared": tables["shared"],
               "pages_maced": tables["pages_maced"], "shared_pages_crcd": tables["shared_pages_crcd"],
               "sealed_state": self.sealed_state}  # fmt: skip
        return [Manifest(MANIFEST_FORMAT, json.dumps(doc, sort_keys=True).encode()),
                Manifest(SEALED_MANIFEST_FORMAT, sealed)]  # fmt: skip

    def _read_target(self) -> None:
        stream, handover = self.stream, self.handover
        if stream is None or handover is None:
            return

        def deliver(msg: Handover | ErrorReport) -> None:
            if isinstance(msg, ErrorReport):
                handover.notes["target_error"] = msg.message
                handover.feed(Msg.RELEASED)  # the target gave the stream up: it will never resume
            elif msg.attempt == self.attempt:
                if msg.text:
                    handover.notes["target_says"] = msg.text
                handover.feed(RECEIVE_CODES[msg.code])

        why = stream.read_handover(deliver)
        if not handover.settled:
            self.log(f"source: the handover's link is down: {why}")
        handover.feed(Input.LINK_DOWN)

    def _resume_after_handover(self) -> None:
        """ABORTED or RECLAIMED is on disk: this copy runs again (the target never will)."""
        with self._vcpus:
            self.machine.resume_all_vcpus_except_aux()
        state = self.handover.state.value if self.handover is not None else "none"
        self.log(f"source: guest vCPUs running again (handover {state})")

    def _redial(self) -> None:
        # Re-dialling the target's port is not built yet: the orchestrator relays the COMMIT instead
        # (docs/handover.md, in-doubt state B); the source stays paused meanwhile, which is safe.
        self.log("source: in doubt after COMMIT: waiting for the target's answer or the orchestrator")

    def resume_guest(self, reason: str) -> None:
        """Undo a migration attempt before its handover started: the stream closes, the guest's vCPUs run
        again. Once the handover started the two VMMs decide: refused, except after an abort (a no-op)."""
        machine = self.need_machine()
        if self.handover is not None:
            state = self.handover.state
            if state in _RAN_AGAIN:
                return  # the handover already gave the guest back to this side
            raise ConfplanError(
                f"the handover of attempt {self.attempt} is {state.value}: the source does not resume on "
                "request",
                hint="the two VMMs decide; rerun `confplan apply` to reconcile with what each holds",
            )
        with self._vcpus:
            self.throttle = 0.0
            self._close_stream(reason)
            machine.resume_all_vcpus_except_aux()
        self.log(f"source: guest vCPUs running ({reason})")

    def close(self) -> None:
        self._closed.set()
        self.throttle = 0.0
        self._close_stream("the source VMM is shutting down")
        super().close()
