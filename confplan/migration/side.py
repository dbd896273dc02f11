"""One side of a migration as its VMM process holds it: the machine, its measured launch, its helper, and
what both sides compute for verify. ``OutgoingMigration`` (the source) and ``IncomingMigration`` (the
target) add their half of the stream; the agent's RPC service is a thin adapter over one of them, chosen
when the machine is created (Firecracker keeps a controller per phase the same way).
"""

from __future__ import annotations

import array
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol

from confplan.core.wire import Hello, HelperMode
from confplan.errors import ConfplanError
from confplan.migration.handover import Command, Order, Role
from confplan.migration.handover_io import Driver, HandoverFiles
from confplan.migration.helper import helper_mailboxes
from confplan.migration.mailbox import Mailbox
from confplan.migration.mailbox_set import MailboxSet
from confplan.migration.verify import SharedTable, shared_digest
from confplan.vmm import Machine, abi
from confplan.vmm.sev_launch import MeasuredLaunch, SnpLaunch

Log = Callable[[str], None]


class StreamSide(Protocol):
    """What verify asks of a side's stream (``source.Outgoing``, ``page_receiver.PageReceiver``): the pages
    it moved since the last call."""

    def take_changed_gpas(self) -> array.array[int]: ...
    def take_shared_gpas(self) -> array.array[int]: ...


class MigrationSide:
    """The machine of one VMM process and everything both roles do with it."""

    role: ClassVar[str] = ""

    def __init__(
        self, machine: Machine, *, psp_dir: Path, log: Log, state_dir: Path | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """``state_dir``: where this side keeps its handover record and holds its liveness lock (None: no
        durable record, for in-process tests and benchmarks); ``on_exit``: stop this VMM process."""
        self.machine, self.psp_dir, self.log = machine, psp_dir, log
        self.on_exit = on_exit or (lambda: None)
        self.files = HandoverFiles(state_dir, Role(self.role)) if state_dir is not None else None
        self._lock_fd = self.files.hold() if self.files is not None else None
        self.handover: Driver | None = None
        self.launch: MeasuredLaunch | SnpLaunch | None = None
        self.shared_table: SharedTable | None = None  # the stream's shared-page CRCs (mac_table fill)
        self._mailboxes: MailboxSet | None = None
        self._mh_ready = False

    # ---- the machine ----
    def need_machine(self) -> Machine:
        self.machine.check()  # a guest that stopped says why, rather than a confusing later error
        return self.machine

    def info(self) -> dict[str, Any]:
        m = self.machine
        return {
            "role": self.role, "machine": True, "running": m.started and m.error is None,
            "guest_error": None if m.error is None else str(m.error),
            "launch_state": None if self.launch is None else self.launch.state,
        }  # fmt: skip

    def created(self) -> dict[str, Any]:
        """What ``create`` answers: the host facts the owner's digest depends on."""
        host = self.machine.host
        return {
            "host": {"tsc_khz": host.tsc_khz, "features": host.features, "vendor_amd": host.vendor_amd},
            "firmware_sha256": self.machine.firmware.sha256,
            "prefault_seconds": self.machine.prefault_seconds,
        }

    def launch_measure(self, policy: int, godh: bytes, session: bytes) -> bytes:
        from confplan.sev import EmulatedSecureProcessor

        self.launch = MeasuredLaunch(self.need_machine(), EmulatedSecureProcessor.open(self.psp_dir))
        measurement = self.launch.measure(policy, godh, session)
        self.log(f"{self.role}: launch measured (LAUNCH_START, UPDATE_DATA, MEASURE)")
        return measurement

    def launch_secret(self, header: bytes, ciphertext: bytes) -> None:
        if not isinstance(self.launch, MeasuredLaunch):
            raise ConfplanError("no measured SEV launch in progress", hint="call 'launch_measure' first")
        self.launch.inject_secret(header, ciphertext)  # and LAUNCH_FINISH
        self.log(f"{self.role}: launch secret injected, LAUNCH_FINISH")

    # ---- SEV-SNP: launch now, the key later against a report (docs/key-release.md) ----
    def snp_launch(self, policy: int) -> bytes:
        """SNP_LAUNCH_START .. SNP_LAUNCH_FINISH: the launch digest."""
        from confplan.sev import EmulatedSecureProcessor

        launch = SnpLaunch(self.need_machine(), EmulatedSecureProcessor.open(self.psp_dir))
        self.launch = launch
        digest = launch.launch(policy)
        self.log(f"{self.role}: SNP launch measured (SNP_LAUNCH_START, UPDATE, FINISH)")
        return digest

    def _snp(self) -> tuple[SnpLaunch, Mailbox]:
        if not isinstance(self.launch, SnpLaunch) or not self.launch.finished:
            raise ConfplanError("no finished SEV-SNP launch on this VMM", hint="call 'snp_launch' first")
        mailboxes = self._opened_helper()
        if mailboxes is None:
            raise ConfplanError("this SNP guest has no migration helper to release the key to",
                                hint="give the guest helper vCPUs")  # fmt: skip
        return self.launch, mailboxes.mailboxes[0]

    def snp_chain(self) -> tuple[bytes, bytes, bytes]:
        return self._snp()[0].cert_chain()

    def key_request(self, nonce: bytes) -> bytes:
        """The helper's sealed report request, relayed to the secure processor and its answer back: the
        report the helper opened (REPORT_DATA = nonce || its ephemeral key)."""
        launch, helper = self._snp()
        report = helper.key_report(launch.guest_request(helper.key_request(nonce)))
        self.log(f"{self.role}: SNP report for the owner's nonce (helper 0, via SNP_GUEST_REQUEST)")
        return report

    def key_release(self, wrapped: bytes) -> None:
        _, helper = self._snp()
        helper.key_release(wrapped)
        self.log(f"{self.role}: the owner's key opened in helper 0 (KEY_RELEASE)")

    def start(self) -> dict[str, Any]:
        machine = self.need_machine()
        machine.start()
        if machine.helpers:
            machine.wait_helpers_ready()
        if machine.config.mh_only:
            self._warm_for_loads(machine)
        else:  # running = filled (its shared pages are reported after the fill)
            # The guest writes every data page once: ~3-9 s a GiB here (its page faults under kvm_pvm).
            gib = machine.config.memory / (1 << 30)
            machine.wait_workload(abi.EV_WL_FILLED, timeout=60.0 + 30.0 * gib)
        return {"vcpus": len(machine.vcpus), "helpers": len(machine.helpers)}

    def _warm_for_loads(self, machine: Machine) -> None:
        """A target, before any stream: its helpers map their view of guest RAM for writing (WARM with
        WRITE, mailbox v9), so round 0's LOADs do not fault once per 2 MiB page each on a shadow MMU
        (~1,000 faults a GiB on the bottleneck side). No key needed; the guest does not run here yet."""
        mailboxes = self._opened_helper()
        if mailboxes is not None:
            started, huge = time.monotonic(), machine.ram.on_huge_pages()
            pages = mailboxes.warm(0, machine.layout.npages, huge=huge, write=True)
            self.log(f"{self.role}: helpers mapped guest RAM for writing ({pages} pages touched, "
                     f"{(time.monotonic() - started) * 1e3:.1f} ms)")  # fmt: skip

    def workload_check(self) -> dict[str, Any]:
        workload = self.need_machine().workload
        result = workload.check()
        workload.wait_clock_read()  # a reading after the resume: the pause is in the largest gap now
        clock = workload.clock()
        return {"ok": result.ok, "first_bad_page": result.first_bad_page,
                "checked_pages": result.checked_pages, "vector": result.vector,
                "guest_max_gap_seconds": clock.max_gap_seconds, "clock_monotonic": clock.monotonic,
                "timer_ticks": clock.ticks}  # fmt: skip

    # ---- the helper ----
    def _opened_helper(self) -> MailboxSet | None:
        """The MH's mailboxes, opened once, without INIT (the SNP key release and WARM need no key)."""
        if self._mailboxes is None:
            self._mailboxes = helper_mailboxes(self.need_machine())
        return self._mailboxes

    def helper(self) -> MailboxSet | None:
        """The MH's mailboxes, INIT done once (it reads the transport key from the secret page)."""
        mailboxes = self._opened_helper()
        if mailboxes is not None and not self._mh_ready:
            mailboxes.init()
            self._mh_ready = True
        return mailboxes

    def hello(self, migration_id: bytes) -> Hello:
        cfg = self.need_machine().config
        mode = HelperMode.MIRROR_VM if cfg.helper_mode == "mirror-vm" else HelperMode.AUX_VCPU
        return Hello(cfg.memory, migration_id, mode, cfg.vcpus)

    # ---- verify ----
    def stream_side(self) -> StreamSide:
        """The stream whose writes the MAC and CRC tables follow (each role has its own)."""
        raise ConfplanError("no migration stream: the MAC table follows a stream's writes",
                            hint="run start-incoming first")  # fmt: skip

    def shared_for_fill(self) -> array.array[int] | None:
        """The pages the shared CRC table fills: None = every page shared now (the source)."""
        return None

    def _changed_gpas(self) -> array.array[int]:
        """Pages written since the last call: on the source what the stream sent (the dirty log's pages),
        on the target what the stream wrote. The shared CRC table drops their entries."""
        gpas = self.stream_side().take_changed_gpas()
        if self.shared_table is not None:
            self.shared_table.forget(gpas)  # their CRCs are stale: the next digest computes them again
        return gpas

    def mac_table_fill(self) -> dict[str, Any]:
        """Fill the MHs' per-page MAC tables while the guest still runs. SAVE and LOAD keep the entries of
        the private pages they move (mailbox v4); what is left is the pages the stream moved as shared: the
        MHs MAC those sent so far, and the shared CRC table starts. Verify, in the pause, MACs the shared
        pages moved after this."""
        machine = self.need_machine()
        mailboxes = self.helper()
        if mailboxes is None:
            return {"pages": None}
        started = time.monotonic()
        self._changed_gpas()  # the shared CRC table forgets these pages (the fill starts it afresh)
        moved = self.stream_side().take_shared_gpas()
        self.shared_table = SharedTable(machine)
        macs = mailboxes.post_mac_list(moved)
        shared_pages = self.shared_table.fill(self.shared_for_fill())  # host CRCs while the MHs MAC
        pages = macs()
        return {"pages": pages, "shared_pages": shared_pages, "seconds": time.monotonic() - started}

    def start_pause_tables(
        self, enc_bitmap: bytes | None = None, *, prepare: bool = False, helpers: MailboxSet | None = None
    ) -> PauseTables:
        """In the pause, before a manifest is sealed or checked, the first half of the table work: the
        helpers are given the MACs of the pages moved as shared since their tables were last brought up to
        date (SAVE and LOAD keep the private pages' entries), so every page has its MAC, and with
        ``prepare`` the helper's own manifest fields (mailbox v7 PREPARE_MANIFEST) for that bitmap, queued
        behind the MACs, so the SEAL_MANIFEST or CHECK_MANIFEST that follows is short: nothing may change
        the tables after it. Posted, not waited for: ``finish_pause_tables`` then computes the host's
        shared CRCs in the caller's thread while the helper works (from its table where precopy filled one;
        by ``enc_bitmap``, a target's received one, if given: the table's only). No thread of its own: a
        second Python thread here only competed for the GIL with the state being sent. ``helpers``: the
        only helpers it may use (default: all; another thread uses the rest)."""
        machine = self.need_machine()
        mailboxes = self.helper() if helpers is None else helpers
        started = time.monotonic()
        crc_table = self.shared_table
        self._changed_gpas()  # before the shared digest, which must not use these pages' old CRCs
        gpas = self.stream_side().take_shared_gpas()
        crc: Callable[[], dict[str, int]] = partial(shared_digest, machine)
        if crc_table is not None:
            crc = partial(crc_table.digest, enc_bitmap)
        if mailboxes is not None and prepare:
            bitmap = bytes(machine.enc_bitmap.bitmap.view()) if enc_bitmap is None else enc_bitmap
            helper = mailboxes.post_mac_and_prepare(gpas, 0, machine.layout.npages, enc_bitmap=bitmap)
            return PauseTables(started, crc, helper, crc_table)
        maced = mailboxes.mac_list(gpas) if mailboxes is not None and len(gpas) else 0
        return PauseTables(started, crc, lambda: (maced, None), crc_table)

    def finish_pause_tables(self, work: PauseTables) -> dict[str, Any]:
        """The second half: the host's shared CRCs, then the helper's answer. Returns the shared digest and
        what it cost."""
        shared, crc_seconds = _timed(work.crc)
        maced, prepared = work.helper()
        seconds = {"shared": crc_seconds, "tables": time.monotonic() - work.started}
        return {"table": work.crc_table is not None, "shared": shared, "pages_maced": maced,
                "prepared": prepared,
                "shared_pages_crcd": work.crc_table.computed if work.crc_table is not None else None,
                "seconds": seconds}  # fmt: skip

    def pause_tables(
        self, enc_bitmap: bytes | None = None, *, prepare: bool = False, helpers: MailboxSet | None = None
    ) -> dict[str, Any]:
        """Both halves of the pause's table work (``start_pause_tables``), in this thread."""
        return self.finish_pause_tables(self.start_pause_tables(enc_bitmap, prepare=prepare, helpers=helpers))

    def prepared_tables(self, enc_bitmap: bytes | None = None) -> dict[str, Any]:
        """``pause_tables`` with PREPARE_MANIFEST: run it while the rest of the pause goes on."""
        return self.pause_tables(enc_bitmap, prepare=True)

    # ---- the handover ----
    def handover_view(self) -> dict[str, Any]:
        """The handover as this side holds it (docs/handover.md): for the orchestrator's ``reconcile``."""
        if self.handover is None:  # before the handover: the attempt the stream belongs to, if any
            guest_id, attempt = self.current_attempt()
            return {"reach": "alive", "role": self.role, "guest_id": guest_id, "attempt": attempt,
                    "state": None, "running": self.guest_running()}  # fmt: skip
        return {**self.handover.view(), "running": self.guest_running()}

    def current_attempt(self) -> tuple[str | None, int]:
        """(guest id, attempt) of the stream this side has, before its handover starts."""
        return None, 0

    def guest_running(self) -> bool:
        """The guest's own vCPUs run here now (started and not paused)."""
        m = self.machine
        return m.started and m.error is None and all(r.active for r in m.vcpus)

    def handover_order(self, order: str, expect: str) -> dict[str, Any]:
        """Apply the orchestrator's order if this side is still in ``expect`` (compare and set)."""
        if self.handover is None:
            raise ConfplanError("no handover under way on this VMM", hint="reconcile again")
        state_type = type(self.handover.state)
        try:
            command = Command(Order(order), state_type(expect))
        except ValueError as err:
            raise ConfplanError(f"not a handover order for this side: {err}") from None
        self.handover.feed(command)
        return self.handover_view()

    # ---- the end ----
    def close(self) -> None:
        if self.handover is not None:
            self.handover.close()
        self.machine.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@dataclass(frozen=True)
class PauseTables:
    """The pause's table work, posted to the helpers (``MigrationSide.start_pause_tables``): when it
    started, the host's shared CRCs still to compute, the call that waits for the helper's (pages MAC'd,
    prepared or None), the shared CRC table it reads (None: every shared page is computed)."""

    started: float
    crc: Callable[[], dict[str, int]]
    helper: Callable[[], tuple[int, bool | None]]
    crc_table: SharedTable | None


def _timed(fn: Callable[[], dict[str, int]]) -> tuple[dict[str, int], float]:
    started = time.monotonic()
    return fn(), time.monotonic() - started
