"""The VMM's side of the guest workload: its command page (self-check, write a page list), its
progress, and a Python twin of the firmware's page fill/checksum (lib/page.c) for tests."""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from confplan.errors import ConfplanError
from confplan.vmm import abi
from confplan.vmm.events import EventLog
from confplan.vmm.layout import GuestLayout
from confplan.vmm.memory import GuestRam

M64 = (1 << 64) - 1
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


@dataclass(frozen=True)
class CheckResult:
    ok: bool  # every page matches its ledger entry and no kept vector register changed
    first_bad_page: int | None  # data page index
    checked_pages: int
    vector: str = "unchecked"  # the vector state each vCPU keeps: intact, lost, or unchecked (no AVX)


@dataclass(frozen=True)
class GuestClock:
    """What the workload saw of time (kvm-clock, read once a loop) and of its LAPIC timer, over its vCPUs."""

    ticks: int  # timer interrupts taken
    reads: int  # kvm-clock readings
    monotonic: bool  # no reading was ever earlier than the one before it
    max_gap_seconds: float | None  # the longest stop it did not ask for (None: nothing measured yet)


@dataclass(frozen=True)
class WorkloadProgress:
    pages_written: int
    states: list[str]
    conversions: int = 0  # pages converted private <-> shared since the fill


class WorkloadControl:
    def __init__(
        self,
        ram: GuestRam,
        layout: GuestLayout,
        events: EventLog,
        kick: Callable[[], None],
        running: Callable[[], bool],
    ) -> None:
        self._ram, self._layout, self._events = ram, layout, events
        self._kick, self._running = kick, running
        self.ctl = ram.struct_at(abi.WlControl, layout.wl_ctl_gpa)

    def init_control_page(self) -> None:
        self.ctl.magic = abi.WL_CTL_MAGIC

    def status(self, wl_index: int) -> abi.WlVcpuStatus:
        return abi.WlVcpuStatus.from_buffer_copy(self.ctl.vcpu[wl_index])

    def progress(self) -> WorkloadProgress:
        statuses = [self.status(i) for i in range(self._layout.wl_vcpus)]
        return WorkloadProgress(
            pages_written=sum(st.pages_written for st in statuses),
            conversions=sum(st.conversions for st in statuses),
            states=[abi.WL_STATE_NAMES.get(st.state, str(st.state)) for st in statuses],
        )

    def clock(self) -> GuestClock:
        statuses = [self.status(i) for i in range(self._layout.wl_vcpus)]
        gap = max(int(st.max_gap_ns) for st in statuses)
        return GuestClock(
            ticks=sum(int(st.ticks) for st in statuses), reads=sum(int(st.clock_reads) for st in statuses),
            monotonic=all(st.clock_back == 0 for st in statuses), max_gap_seconds=gap / 1e9 if gap else None,
        )  # fmt: skip

    def wait_clock_read(self, timeout: float = 2.0) -> bool:
        """Wait until every workload vCPU read its clock again (kicked out of an idle park first); False on
        timeout. After it, any pause before this call is in ``clock()``."""
        before = [int(self.ctl.vcpu[i].clock_reads) for i in range(self._layout.wl_vcpus)]
        self._kick()
        deadline = time.monotonic() + timeout
        while any(int(self.ctl.vcpu[i].clock_reads) == n for i, n in enumerate(before)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def reset_gap(self) -> None:
        """Forget the largest gap each vCPU saw (the guest paused), so the next one measured is the pause:
        a migration target does this just before it resumes the guest."""
        for i in range(self._layout.wl_vcpus):
            self.ctl.vcpu[i].max_gap_ns = 0

    def check(self, timeout: float = 30.0) -> CheckResult:
        """Ask every workload vCPU to verify its pages against the ledger; OK or the first bad page."""
        self._post(abi.WL_CMD_CHECK, (), timeout)
        bad = [self.ctl.vcpu[i].first_bad for i in range(self._layout.wl_vcpus)]
        bad_pages = sorted(p for p in bad if p != abi.NO_PAGE)
        checked = sum(int(self.ctl.vcpu[i].checked) for i in range(self._layout.wl_vcpus))
        vectors = {int(self.ctl.vcpu[i].vector) for i in range(self._layout.wl_vcpus)}
        vector = "intact" if vectors == {abi.VEC_INTACT} else "unchecked"
        vector = "lost" if abi.VEC_LOST in vectors else vector
        return CheckResult(
            ok=not bad_pages and vector != "lost", first_bad_page=bad_pages[0] if bad_pages else None,
            checked_pages=checked, vector=vector,
        )  # fmt: skip

    def write_pages(self, pages: Sequence[int], timeout: float = 10.0) -> None:
        """Have the workload rewrite exactly these data pages (each vCPU those in its partition)."""
        if len(pages) > abi.WL_LIST_MAX:
            raise ConfplanError(f"write_pages: {len(pages)} pages, at most {abi.WL_LIST_MAX} per command")
        if any(not 0 <= p < self._layout.wl_data_pages for p in pages):
            raise ConfplanError(f"write_pages: page index outside 0..{self._layout.wl_data_pages - 1}")
        self._post(abi.WL_CMD_WRITE_LIST, pages, timeout)

    def _post(self, cmd: int, pages: Iterable[int], timeout: float) -> None:
        if not self._running():
            raise ConfplanError(
                "the workload's vCPUs are paused or stopped, so they cannot serve a command",
                hint="resume the guest's vCPUs first",
            )
        plist = list(pages)
        ctypes.memmove(
            ctypes.addressof(self.ctl.list), struct.pack(f"<{len(plist)}Q", *plist), 8 * len(plist)
        )
        self.ctl.list_count = len(plist)
        self.ctl.cmd = cmd
        seq = self.ctl.cmd_seq + 1
        self.ctl.cmd_seq = seq  # written last: the guest reads cmd and args after seeing it change
        counts = [self._events.count(i, abi.EV_WL_CMD_DONE) for i in range(self._layout.wl_vcpus)]
        self._kick()
        deadline = time.monotonic() + timeout
        for i in range(self._layout.wl_vcpus):
            while self.ctl.vcpu[i].ack_seq != seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConfplanError(f"workload vCPU {i} did not answer command {cmd} within {timeout} s")
                self._events.wait(abi.EV_WL_CMD_DONE, [i], min(left, 0.5), at_least=counts[i] + 1)


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def page_csum(page: bytes) -> int:
    """The firmware's ``cp_page_csum``: FNV-1a over 64-bit words, folded to 32 bits."""
    h = FNV_OFFSET
    for (word,) in struct.iter_unpack("<Q", page):
        h = ((h ^ word) * FNV_PRIME) & M64
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def page_fill(seed: int, index: int, seq: int) -> bytes:
    """The firmware's ``cp_page_fill`` content for (seed, page index, sequence number)."""
    s = _mix64(seed ^ _mix64((index * 0x9E3779B97F4A7C15 + seq) & M64)) | 1
    words = []
    for _ in range(abi.PAGE // 8):
        s ^= (s << 13) & M64
        s ^= s >> 7
        s ^= (s << 17) & M64
        words.append(s)
    return struct.pack(f"<{len(words)}Q", *words)
