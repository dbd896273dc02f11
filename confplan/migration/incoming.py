"""The target side of a migration: a machine booted helper-only, the incoming stream, and the target's part
of the handover (docs/handover.md): once the copy is whole it checks it against the source's MANIFEST by
itself, says VERIFIED (or REFUSED), and resumes only on COMMIT, with RESUMED on disk first. The stream
itself is ``target.Incoming``; the guest's vCPUs stay paused until then.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from confplan.core.wire import Handover
from confplan.errors import ConfplanError
from confplan.migration.handover import Do, Input, Msg, Role, TargetHandover, TargetState
from confplan.migration.handover_io import RECEIVE_CODES, SEND_CODES, Driver
from confplan.migration.mailbox_layout import MailboxError
from confplan.migration.manifest import state_hash
from confplan.migration.session import resynced_tsc
from confplan.migration.side import Log, MigrationSide, StreamSide
from confplan.migration.target import HandoverHooks, Incoming, IncomingState, apply_clock
from confplan.transport import sockets
from confplan.vmm import Machine, vmsa_slot

MANIFEST_FORMAT = 1  # outgoing.OutgoingMigration's MANIFEST frames: the host's digests (JSON)
SEALED_MANIFEST_FORMAT = 2  # and the source helper's sealed manifest (mailbox v5)
STATES_WAIT = 60.0  # s: verify's early work waits this long at most for the sealed vCPU states (a safety net)


class IncomingMigration(MigrationSide, HandoverHooks):
    """A target VMM's machine, the stream it receives, and its side of the handover."""

    role: ClassVar[str] = "target"

    def __init__(
        self, machine: Machine, *, psp_dir: Path, log: Log, state_dir: Path | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(machine, psp_dir=psp_dir, log=log, state_dir=state_dir, on_exit=on_exit)
        self.stream: Incoming | None = None
        self.resumed = False
        self.attempt = 0
        self.sealed_state = False  # SEV-ES/SNP: the vCPU state must arrive sealed by the source helper
        # verify's table work, started when the pages were complete (before DONE), for that bitmap
        self._early_tables: tuple[bytes, Future[dict[str, Any]]] | None = None
        # SEV-ES/SNP: the sealed vCPU states once all came (set also when none will: DONE, link down, close)
        self._states_ready = threading.Event()
        self._sealed_states: dict[int, bytes] | None = None
        self._opened: dict[int, bytes] | None = None  # the records the helpers opened before DONE
        self._marks: dict[str, float] = {}  # the handover's moments (wall time): the pause's timeline

    def info(self) -> dict[str, Any]:
        stream = None if self.stream is None else self.stream.status.to_json()
        return {**super().info(), "resumed": self.resumed, "incoming": stream}

    # ---- the stream ----
    def listen(
        self, host: str, port: int, *, migration_id: bytes, stream_key: bytes, accept_timeout: float,
        attempt: int = 0, sealed_state: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """Listen for the source's stream (a previous attempt's, settled, is dropped) and take the first
        connection that proves ``stream_key``; answers the port."""
        machine = self.need_machine()
        if not machine.config.mh_only or self.resumed:
            raise ConfplanError("only a target VMM whose guest has not resumed accepts a migration stream")
        if self.handover is not None and not self.handover.settled:
            raise ConfplanError(
                f"the handover of attempt {self.attempt} is {self.handover.state.value}: no new attempt now",
                hint="rerun `confplan apply`: it reconciles with what both sides hold",
            )
        self.abort()
        self._marks = {}
        self._states_ready, self._sealed_states, self._opened = threading.Event(), None, None
        listener = sockets.listen_tcp(host, port, what="the target's migration port")
        self.shared_table, self.attempt, self.sealed_state = None, attempt, sealed_state
        self.handover = Driver(
            TargetHandover(), role=Role.TARGET, guest_id=migration_id.hex(), attempt=attempt,
            files=self.files, send=self._send, log=self.log,
            do={Do.VERIFY: self._verify, Do.RESUME_GUEST: self._resume_now, Do.DISCARD_GUEST: self._discard},
        )  # fmt: skip
        self.stream = Incoming(
            machine, listener, hello=self.hello(migration_id), stream_key=stream_key, mailboxes=self.helper(),
            accept_timeout=accept_timeout, log=self.log, hooks=self,
        )  # fmt: skip
        return {"host": host, "port": listener.getsockname()[1]}

    def need_stream(self) -> Incoming:
        self.need_machine()
        if self.stream is None:
            raise ConfplanError("no incoming migration stream", hint="run start-incoming first")
        return self.stream

    def stream_side(self) -> StreamSide:
        return self.need_stream().pages

    def shared_for_fill(self) -> array.array[int] | None:
        # The encryption bitmap only arrives at DONE: fill the pages the stream sent as shared so far.
        return self.need_stream().pages.shared_written()

    def status(self, wait: float) -> dict[str, Any]:
        return self.need_stream().wait(wait).to_json()

    def abort(self) -> None:
        """Drop the stream (before the handover: the orchestrator's undo). Refused once this side holds a
        whole copy: from there the handover decides."""
        if self.handover is not None and self.handover.state in (TargetState.VERIFYING, TargetState.VERIFIED):
            raise ConfplanError(
                f"the handover of attempt {self.attempt} is {self.handover.state.value}: not dropped",
                hint="the two VMMs decide; rerun `confplan apply` to reconcile",
            )
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self._drop_early_tables()

    def _drop_early_tables(self) -> None:
        """Let verify's early table work finish (it uses the helpers) before anything else may."""
        self._states_ready.set()  # it waits for no state that will not come
        early, self._early_tables = self._early_tables, None
        if early is not None:
            with contextlib.suppress(Exception):
                early[1].result(timeout=30.0)

    # ---- HandoverHooks: what the stream tells the handover ----
    def done(self) -> None:
        self._states_ready.set()  # (they came before DONE, or never will)
        if self.handover is not None:
            self.handover.feed(Msg.DONE)

    def pages_complete(self, enc_bitmap: bytes) -> None:
        """Start verify's table work (the helpers MAC the pages moved as shared since the fill, the host
        its shared CRCs by the bitmap that came) while the state, manifests and DONE arrive: the source
        seals its manifest meanwhile. The stream refuses any page after this, so the tables stay true."""
        if self.shared_table is None or self._early_tables is not None:
            return  # no tables filled in precopy: verify digests everything after DONE, as before
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-tables")
        self._early_tables = (enc_bitmap, pool.submit(self._timed_tables, enc_bitmap))
        pool.shutdown(wait=False)
        # and the RESUMED record's fsync, which waits on the disk while the helpers work
        threading.Thread(target=self._stage_resumed, name="stage-resumed", daemon=True).start()

    def _timed_tables(self, enc_bitmap: bytes) -> dict[str, Any]:
        tables = self.prepared_tables(enc_bitmap)
        self._marks["tables"] = time.time()
        if self.sealed_state:  # SEV-ES/SNP: then the sealed states, once they came (in the helpers' turn)
            waited = time.monotonic()
            self._open_states_early()
            tables["seconds"]["states_wait"] = time.monotonic() - waited
        return tables

    def states_complete(self, sealed: dict[int, bytes]) -> None:
        self._sealed_states = sealed
        self._states_ready.set()

    def _open_states_early(self) -> bool:
        """Open the sealed vCPU states into the helpers' VMSA slots once they all came (before DONE); True
        when they were. Anything else (none came, one does not open) leaves the opening to the check after
        DONE, which then says why. An OPEN_STATE changes no table a PREPARE covers (it bumps the helpers'
        state counter, not the tables' one: docs/mailbox.md), so the PREPARE made before still holds, and
        CHECK reads the slots' tags itself."""
        self._states_ready.wait(STATES_WAIT)
        sealed, mailboxes = self._sealed_states, self.helper()
        if not sealed or mailboxes is None:
            return False
        try:
            for vcpu, record in sorted(sealed.items()):
                mailboxes.open_state(vcpu, record)
        except MailboxError:
            return False
        self._opened = sealed
        self._marks["opened"] = time.time()
        return True

    def message(self, msg: Handover) -> None:
        if self.handover is not None and msg.attempt == self.attempt:
            self._marks.setdefault(f"got_{msg.code.name.lower()}", time.time())
            self.handover.feed(RECEIVE_CODES[msg.code])

    def link_down(self, why: str) -> None:
        self._states_ready.set()
        if self.handover is not None:
            if not self.handover.settled:
                self.log(f"target: the handover's link is down: {why}")
            self.handover.feed(Input.LINK_DOWN)

    # ---- the handover's actions ----
    def _send(self, msg: Msg) -> None:
        text = str(self.handover.notes.get("refused", "")) if self.handover is not None else ""
        self.need_stream().send_handover(Handover(SEND_CODES[msg], self.attempt, text))
        if msg is Msg.VERIFIED:  # if not written ahead (or being written) yet: while COMMIT comes back
            self._stage_resumed()

    def _stage_resumed(self) -> None:
        """Write the RESUMED record ahead (the record only once the COMMIT step's WriteRecord renames it into
        place; a REFUSED or RELEASED one drops it), so one fsync of the two leaves the pause."""
        waiting = (TargetState.RECEIVING, TargetState.VERIFYING, TargetState.VERIFIED)
        if self.handover is not None and self.handover.stage(TargetState.RESUMED, while_in=waiting):
            self._marks["staged"] = time.time()

    def _verify(self) -> None:
        """The target's own check of the whole copy against the source's MANIFEST; VERIFY_OK or _FAIL."""
        assert self.handover is not None
        started = time.monotonic()
        try:
            problem, details = self._compare()
        except ConfplanError as err:
            problem, details = err.message, {}
        details["check_seconds"] = time.monotonic() - started
        self._marks["checked"] = time.time()
        self.handover.notes["verify"] = details
        if problem is not None:
            self.handover.notes["refused"] = problem
            self.log(f"target: the copy does not check out: {problem}")
        self.handover.feed(Input.VERIFY_FAIL if problem else Input.VERIFY_OK)

    def _compare(self) -> tuple[str | None, dict[str, Any]]:
        """The copy against the source's manifests: the shared pages' digest (host CRCs), then the
        helpers: the sealed vCPU states opened into their VMSA slots (SEV-ES/SNP) and CHECK_MANIFEST,
        which recomputes the source helper's statement from this helper's own tables."""
        status = self.need_stream().status
        plain, sealed = status.manifests.get(MANIFEST_FORMAT), status.manifests.get(SEALED_MANIFEST_FORMAT)
        if status.state is not IncomingState.COMPLETE or plain is None or sealed is None:
            return f"the stream is {status.state.value} and brought no complete manifest", {}
        theirs = json.loads(plain.blob)
        problem = self._state_kind(status.vcpus.keys(), status.sealed_vcpus.keys(), theirs)
        if problem:
            return problem, {}
        tables = self._tables(status.enc_bitmap)
        details = {"shared": tables["shared"], "from_mac_tables": bool(tables["table"]),
                   "pages_hashed_in_pause": [theirs.get("pages_maced"), tables["pages_maced"]],
                   "shared_pages_crcd_in_pause": [theirs.get("shared_pages_crcd"),
                                                  tables["shared_pages_crcd"]],
                   "seconds": tables["seconds"], "sealed_state": self.sealed_state}  # fmt: skip
        if theirs.get("shared") != tables["shared"]:
            return f"shared pages differ: source {theirs.get('shared')}, target {tables['shared']}", details
        mailboxes = self.helper()
        if mailboxes is None or status.enc_bitmap is None:
            return "the copy cannot be checked: this side has no migration helper", details
        early = self._opened is not None and self._opened == status.sealed_vcpus
        details.update({"prepared": tables["prepared"], "states_opened_early": early})
        try:
            # Not opened before DONE, or other records came since: opened now (a PREPARE is then stale,
            # and the helper does not use it: the CHECK computes everything)
            for vcpu, record in sorted(status.sealed_vcpus.items()) if not early else ():
                mailboxes.open_state(vcpu, record)
            checked = mailboxes.check_manifest(
                sealed.blob, 0, self.machine.layout.npages, enc_bitmap=status.enc_bitmap,
                state_hash=state_hash(status.state_parts), rounds=status.rounds,
            )  # fmt: skip
        except MailboxError as err:
            return f"the helper refused the copy: {err.message}", details
        details["chunks"] = checked.chunks
        details["seconds"] = {**details["seconds"], "check_helper": mailboxes.mailboxes[0].last_op_seconds()}
        return None, details

    def _tables(self, enc_bitmap: bytes | None) -> dict[str, Any]:
        """Verify's table work: as started when the pages were complete, or now (once that is done: both
        use the helpers and the stream's lists)."""
        early = self._early_tables
        if early is not None:
            tables = early[1].result()
            if early[0] is enc_bitmap:
                return tables
        return self.pause_tables()

    def _state_kind(self, clear: Iterable[int], sealed: Iterable[int], theirs: dict[str, Any]) -> str | None:
        """SEV-ES/SNP register state must arrive sealed by the source helper; plain SEV's in clear."""
        if self.sealed_state and (list(clear) or not theirs.get("sealed_state")):
            return "this guest's register state must arrive sealed by the source's helper (SEV-ES/SNP)"
        if not self.sealed_state and list(sealed):
            return "sealed register state for a guest whose plan says plain SEV"
        return None

    def _resume_now(self) -> None:
        """RESUMED is on disk: run the guest here."""
        assert self.handover is not None
        self._marks["recorded"] = time.time()
        resumed = self.resume()
        self.handover.notes.update(resumed)
        timeline = self._timeline(resumed["paused_wall"], resumed["resumed_wall"])
        self.handover.notes["pause_timeline"] = timeline

    def _timeline(self, paused_wall: float, resumed_wall: float) -> dict[str, float]:
        """Seconds from the source's pause to each moment of this side's pause, in order (by the two
        hosts' wall clocks: one clock for a local target, their skew across hosts)."""
        marks = {**(self.stream.marks if self.stream is not None else {}), **self._marks,
                 "running": resumed_wall}  # fmt: skip
        return {k: round(t - paused_wall, 6) for k, t in sorted(marks.items(), key=lambda kv: kv[1])}

    def _discard(self) -> None:
        """This attempt's copy will never run: the stream goes (the machine stays for a new attempt)."""
        if self.stream is not None:
            self.stream.close()
        self.log(f"target: attempt {self.attempt} released; its copy will never run")

    # ---- the resume ----
    def resume(self) -> dict[str, Any]:
        """Run the guest here: the vCPU states (the encryption bitmap is already in place) with the TSC
        and the VM's kvm-clock moved on by the pause (clock re-sync), then the guest's vCPUs. Only the
        handover calls this."""
        status = self.need_stream().status
        if status.state is not IncomingState.COMPLETE or status.enc_bitmap is None:
            raise ConfplanError(
                f"the incoming stream is {status.state.value}, not complete: nothing to resume"
                + (f" ({status.error})" if status.error else ""),
            )
        machine = self.need_machine()
        now = time.time()
        if status.sealed_vcpus:  # SEV-ES/SNP: the (emulated) CPU loads each vCPU from its verified slot
            gap = vmsa_slot.load_vcpus(machine, now_wall=now)
        else:
            tsc_khz = machine.host.tsc_khz
            states = [
                dataclasses.replace(saved.state, tsc=resynced_tsc(saved, now, tsc_khz))
                for _, saved in sorted(status.vcpus.items())
            ]
            machine.restore_vcpu_states(states)
            gap = max(now - saved.paused_wall for saved in status.vcpus.values())
        apply_clock(machine, status, now)
        bitmap = machine.enc_bitmap.sha256()  # what the guest starts from here, before it converts more
        machine.resume_all_vcpus_except_aux()
        self.resumed = True
        self.log("target: guest resumed")
        return {"clock_gap_seconds": gap, "paused_wall": now - gap, "resumed_wall": time.time(),
                "enc_bitmap_sha256": bitmap}  # fmt: skip

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self._drop_early_tables()
        super().close()
