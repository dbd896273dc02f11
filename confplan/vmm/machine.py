"""A running guest: its RAM, firmware, CPU tables, vCPU threads (the guest's own and the migration
helper's: aux vCPUs or a mirror VM), the MMIO devices, dirty log, encryption bitmap, and a watchdog.
Set-up registers its tear-down; ``close`` runs it in reverse."""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from confplan.core.helper_run import HelperRun
from confplan.errors import ConfplanError, EnvironmentProblem
from confplan.kvm import Kvm, Vcpu
from confplan.kvm import structs as s
from confplan.vmm import abi, cpu_setup
from confplan.vmm.aux_vcpu import HelperHost, HelperVcpu
from confplan.vmm.bootparams import HostCpu
from confplan.vmm.clock import VmClock
from confplan.vmm.config import MachineConfig
from confplan.vmm.devices import MmioBus
from confplan.vmm.devices.console import Console
from confplan.vmm.devices.doorbell import Doorbell
from confplan.vmm.devices.encstatus import EncStatusDoorbell
from confplan.vmm.devices.fault import FaultReporter
from confplan.vmm.devices.mailbox_doorbell import DOORBELL_STRIDE, MailboxDoorbells
from confplan.vmm.dirty_log import DirtyLog
from confplan.vmm.enc_bitmap import EncBitmap, EncStatusError
from confplan.vmm.events import EventLog
from confplan.vmm.exits import (
    FailEntry,
    GuestError,
    Hlt,
    Hypercall,
    InternalError,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    Unsupported,
    VcpuExit,
)  # fmt: skip
from confplan.vmm.firmware import Firmware
from confplan.vmm.launch_blobs import LaunchBlob, launch_blobs
from confplan.vmm.layout import GuestLayout
from confplan.vmm.memory import GuestRam
from confplan.vmm.mirror_vm import MirrorVm
from confplan.vmm.state import VcpuState
from confplan.vmm.vcpu_thread import RunState, VcpuRunner
from confplan.vmm.workload import WorkloadControl


class AttachedLaunch(Protocol):
    """What a machine needs of its measured launch (``vmm.sev_launch.MeasuredLaunch``), which drives the
    machine and so is built on top of it: the machine only asks it these."""

    @property
    def finished(self) -> bool: ...
    @property
    def state(self) -> str: ...
    def debug_read(self, gpa: int, n: int) -> bytes: ...

TSS_ADDR = 0xFFFBD000  # three pages KVM may use on VMX hosts, above the MMIO window
KVM_ENOSYS = 1000


class Machine:
    """Build with ``Machine(config)``, then ``start()``; always ``close()`` (or use ``with``)."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        kvm_path: str | None = None,
        firmware: Firmware | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.layout = GuestLayout.for_config(config)
        self.firmware = firmware or Firmware.load()
        self.timings: dict[str, float] = {"created": time.perf_counter()}
        self.prefault_seconds: float | None = None  # how long allocating all guest RAM up front took
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._teardown: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self.events = EventLog(self.check)
        self.runners: list[VcpuRunner] = []
        self.helpers: list[HelperVcpu] = []
        self.mirror: MirrorVm | None = None
        self.launch: AttachedLaunch | None = None
        self._log: TextIO | None = None
        self.mailbox_doorbells = MailboxDoorbells(config.mh_vcpus)
        try:
            self._build(kvm_path, echo)
        except BaseException:
            self.close()
            raise

    # ---- set-up ----
    def _build(self, kvm_path: str | None, echo: Callable[[str], None] | None) -> None:
        cfg, lay = self.config, self.layout
        self.kvm = Kvm(kvm_path)
        self._teardown.append(self.kvm.close)
        self._check_vcpu_limit()
        self.vm = self.kvm.create_vm()
        self._teardown.append(self.vm.close)
        self.vm.set_tss_addr(TSS_ADDR)
        # In-kernel LAPIC (and IOAPIC/PIC, unused) before any vCPU: the guest's timer and kvm-clock.
        self.vm.create_irqchip()
        self.hypercall_exits = self._enable_hypercall_exit()
        self.ram = GuestRam(cfg.memory)
        self._teardown.append(self.ram.close)
        if cfg.prefault:
            began = time.perf_counter()
            self.ram.prefault()
            self.prefault_seconds = time.perf_counter() - began
        self.ram.map_into(self.vm)  # no dirty log yet: DirtyLog.start turns it on when a migration begins
        # the helper's area is never write-protected again (vmm/dirty_log.py: a fault per slot page a round)
        helper_pages = range(abi.MH_BASE // abi.PAGE, lay.mh_end // abi.PAGE) if cfg.dirty_logging else None
        self.dirty_log = DirtyLog(self.vm, self.ram, keep_writable=helper_pages)
        self.enc_bitmap = EncBitmap(lay.npages)
        self._cpuid = self.kvm.supported_cpuid()
        self.cpu = cpu_setup.cpu_info(self._cpuid)
        self._make_devices(echo)
        self.workload = WorkloadControl(
            self.ram, lay, self.events, self._kick_workload, lambda: self._all_running(self.vcpus)
        )
        self.workload.init_control_page()
        self._make_vcpus()
        if cfg.helper_mode == "mirror-vm":
            self._make_mirror_vm()
        tsc = self.runners[0].vcpu.tsc_khz()
        self.host = HostCpu(tsc_khz=tsc, features=self.cpu.features, vendor_amd=self.cpu.vendor_amd)
        if not cfg.measured_launch:  # else the secure processor places them (sev_launch.MeasuredLaunch)
            for blob in self.launch_blobs():
                self.ram.write(blob.gpa, blob.data)

    def _enable_hypercall_exit(self) -> bool:
        """KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE where offered (on kvm_pvm it is offered but
        no hypercall reaches userspace; the MMIO channel is what works there)."""
        mask = self.kvm.check_extension(s.KVM_CAP_EXIT_HYPERCALL)
        if not mask >> s.KVM_HC_MAP_GPA_RANGE & 1:
            return False
        self.vm.enable_cap(s.KVM_CAP_EXIT_HYPERCALL, 1 << s.KVM_HC_MAP_GPA_RANGE)
        return True

    @property
    def _cpu_slots(self) -> int:
        """GDT/TSS/CPL0-stack slots: the guest's vCPUs, then one per helper vCPU (aux or mirror VM)."""
        return self.config.vcpus + self.config.mh_vcpus

    def _make_devices(self, echo: Callable[[str], None] | None) -> None:
        if echo is None and self.config.console_echo:
            echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
        if self.config.console_log:
            self._log = open(self.config.console_log, "a", encoding="utf-8")  # noqa: SIM115
            self._teardown.append(self._log.close)
        self.console = Console(self, echo, self._log)
        self.bus = MmioBus()
        self.bus.register(abi.MMIO_CONSOLE, abi.PAGE, self.console)
        self.bus.register(abi.MMIO_DOORBELL, abi.PAGE, Doorbell(self.events))
        self.bus.register(abi.MMIO_ENCSTATUS, abi.PAGE, EncStatusDoorbell(self.enc_bitmap))
        self.bus.register(abi.MMIO_FAULT, abi.PAGE, FaultReporter())
        if self.config.mh_vcpus:
            self.bus.register(abi.MMIO_MAILBOX, self.mailbox_doorbells.size, self.mailbox_doorbells)

    def _check_vcpu_limit(self) -> None:
        """The guest's vCPUs and the helper's (aux vCPUs share its VM) within this KVM's own limit; the
        firmware's (abi.MAX_VCPUS) was checked with the config."""
        total = self.config.vcpus + self.config.aux_vcpus
        limit = self.kvm.max_vcpus()
        if total > limit:
            raise EnvironmentProblem(
                f"this host's KVM allows at most {limit} vCPUs per VM; the guest needs {total} "
                f"({self.config.vcpus} + {self.config.aux_vcpus} helper vCPUs)",
                hint="lower guest.vcpus or helper.aux_vcpus in the plan, or run it on a host whose KVM "
                "allows more (KVM_CAP_MAX_VCPUS)",
            )

    def _make_vcpus(self) -> None:
        """The primary VM's vCPUs: the guest's own, then aux vCPUs (helper mode aux-vcpu only)."""
        cfg = self.config
        for vcpu_id in range(cfg.vcpus + cfg.aux_vcpus):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._teardown.append(vcpu.close)
            if vcpu_id >= cfg.vcpus:
                self._configure_helper(vcpu, vcpu_id - cfg.vcpus, irqchip=True)
                self._add_helper(vcpu, vcpu_id - cfg.vcpus, "aux-vcpu")
                continue
            cpu_setup.configure(
                vcpu, self._cpuid, self.cpu, entry=self.firmware.sym("wl_entry"),
                stack_top=self.layout.wl_stack_top(vcpu_id), cr3=abi.PT_WL_GPA, arg=vcpu_id,
                nr_vcpus=self._cpu_slots, irqchip=True,
            )  # fmt: skip
            self.runners.append(self._runner(vcpu, aux=False))

    def _make_mirror_vm(self) -> None:
        """A second VM on the same RAM whose vCPUs take the aux slots (ids after the guest's)."""
        cfg = self.config
        self.mirror = MirrorVm(
            self.kvm, self.vm, self.ram, first_id=cfg.vcpus, count=cfg.mirror_vcpus,
            configure=lambda vcpu, i: self._configure_helper(vcpu, i, irqchip=False),
        )  # fmt: skip
        self._teardown.append(self.mirror.close)
        for i, vcpu in enumerate(self.mirror.vcpus):
            self._add_helper(vcpu, i, "mirror-vm")

    def _configure_helper(self, vcpu: Vcpu, mh_index: int, *, irqchip: bool) -> None:
        """Both helper modes: start at mh_entry(mh_index), helper page tables, own MH stack, interrupts
        masked (it programs no timer; nothing may interrupt its mailbox protocol)."""
        cpu_setup.configure(
            vcpu, self._cpuid, self.cpu, entry=self.firmware.sym("mh_entry"),
            stack_top=self.layout.mh_stack_top(mh_index), cr3=abi.PT_MH_GPA, arg=mh_index,
            nr_vcpus=self._cpu_slots, interrupts=False, irqchip=irqchip,
        )  # fmt: skip

    def _add_helper(self, vcpu: Vcpu, mh_index: int, mode: HelperHost) -> None:
        label = f"mirror VM vCPU {vcpu.id}" if mode == "mirror-vm" else f"aux vCPU {vcpu.id}"
        runner = self._runner(vcpu, aux=True, label=label)
        runner.use_c_loop(self._helper_loop(vcpu, runner, mh_index))
        self.runners.append(runner)
        self.helpers.append(HelperVcpu(runner, self.ram, self.layout, mh_index, mode))

    def _helper_loop(self, vcpu: Vcpu, runner: VcpuRunner, mh_index: int) -> HelperRun:
        """The helper's doorbell stores and parks in C (core/helper_run.py): the same words and eventfds
        the Python devices use, so a waiter cannot tell which one rang."""
        cell = self.mailbox_doorbells.cell(mh_index)
        return HelperRun(
            vcpu_fd=vcpu.fd, run_addr=ctypes.addressof(vcpu.run), wake_fd=runner.waker.fd,
            bell_gpa=abi.MMIO_MAILBOX + DOORBELL_STRIDE * mh_index, idle_gpa=abi.MMIO_DOORBELL + abi.DB_IDLE,
            rung_addr=cell.rung_addr, rings_addr=cell.rings_addr, rung_fd=cell.fd,
        )  # fmt: skip

    def _runner(self, vcpu: Vcpu, *, aux: bool, label: str | None = None) -> VcpuRunner:
        return VcpuRunner(
            vcpu, aux=aux, dispatch=self._dispatch, on_error=self._fail,
            heartbeat=self._heartbeat_of(vcpu.id), label=label,
        )  # fmt: skip

    def _heartbeat_of(self, vcpu_id: int) -> Callable[[], int]:
        if vcpu_id < self.config.vcpus:
            status = self.workload.ctl.vcpu[vcpu_id]
            return lambda: int(status.heartbeat)
        header = self.ram.struct_at(abi.MailboxHeader, self.layout.mailbox_gpa(vcpu_id - self.config.vcpus))
        return lambda: int(header.heartbeat)

    def launch_blobs(self) -> list[LaunchBlob]:
        """The firmware image, the boot-parameters page and the CPU tables, exactly as (to be) written and
        measured."""
        return launch_blobs(self.config, self.firmware, self.host)

    # ---- guest memory, as the VMM (and the secure processor) may touch it ----
    def _refuse_private(self, gpa: int, n: int, what: str) -> None:
        """The secret page and the VMSA slots are the MH's alone: refuse any range that touches them."""
        if gpa < abi.SECRET_GPA + abi.PAGE and gpa + n > abi.SECRET_GPA:
            raise ConfplanError(
                f"{what} of guest range [{gpa:#x}, {gpa + n:#x}) refused: it overlaps the secret page at "
                f"{abi.SECRET_GPA:#x}, which holds the launch secret (the transport key)",
                hint="only the migration helper reads the secret page; leave it out of the range",
            )
        vmsa, size = self.layout.mh_vmsa_gpa, self.layout.vmsa_bytes
        if gpa < vmsa + size and gpa + n > vmsa:
            raise ConfplanError(
                f"{what} of guest range [{gpa:#x}, {gpa + n:#x}) refused: it overlaps the VMSA slots at "
                f"[{vmsa:#x}, {vmsa + size:#x}), which hold the guest's vCPU register state",
                hint="only the migration helper writes the VMSA slots and only the (emulated) CPU loads "
                "them; leave them out of the range",
            )

    def read(self, gpa: int, n: int) -> bytes:
        """Guest bytes [gpa, gpa+n) (``confplan.sev.GuestMemory``); the secret page and the VMSA slots are
        refused."""
        self._refuse_private(gpa, n, "read")
        return self.ram.read(gpa, n)

    def view(self, gpa: int, n: int) -> memoryview:
        """A zero-copy view of guest bytes; the secret page and the VMSA slots are refused, as by ``read``."""
        self._refuse_private(gpa, n, "view")
        return self.ram.view(gpa, n)

    def hardware_vmsa_view(self, vcpu: int) -> memoryview:
        """EMULATED HARDWARE ONLY: VMSA slot ``vcpu`` (``abi.VmsaSlot``), for ``vmm.vmsa_slot``, which stands
        in for the CPU loading an SEV-ES vCPU's encrypted VMSA. No VMM code may call this (a test checks
        that only vmsa_slot.py does); the VMM's own API refuses the slots."""
        if not 0 <= vcpu < self.config.vcpus:
            raise ConfplanError(f"no VMSA slot {vcpu}: this guest has {self.config.vcpus} vCPUs")
        return self.ram.view(self.layout.vmsa_slot_gpa(vcpu), abi.VMSA_SLOT_SIZE)

    def write(self, gpa: int, data: bytes) -> None:
        """Store guest bytes (``confplan.sev.GuestMemory``: LAUNCH_UPDATE_DATA and LAUNCH_SECRET land here).
        A host can always overwrite guest memory; it is reading the secret that SEV denies it."""
        self.ram.write(gpa, data)

    def debug_read(self, gpa: int, n: int) -> bytes:
        """A debug read of guest memory: through the secure processor (DBG_DECRYPT) after a measured
        launch, so a NODBG policy refuses it; a plain read for an unmeasured guest."""
        if self.launch is not None:
            return self.launch.debug_read(gpa, n)
        return self.read(gpa, n)

    def attach_launch(self, launch: AttachedLaunch) -> None:
        """Called by ``MeasuredLaunch``: one launch per machine, before it starts."""
        if self.launch is not None or "start" in self.timings:
            raise ConfplanError("a machine has one measured launch, before it starts")
        self.launch = launch

    # ---- running ----
    @property
    def vcpus(self) -> list[VcpuRunner]:
        """The guest's own vCPUs (not aux)."""
        return [r for r in self.runners if not r.aux]

    @property
    def aux(self) -> list[HelperVcpu]:
        """The helper vCPUs that are aux vCPUs of this VM (none in helper mode mirror-vm)."""
        return [h for h in self.helpers if h.mode == "aux-vcpu"]

    def start(self) -> None:
        """Start every vCPU thread; on a migration target (mh_only) the guest's own vCPUs stay paused.
        A measured launch must have reached LAUNCH_FINISH first."""
        if self.config.measured_launch and (self.launch is None or not self.launch.finished):
            state = "not begun" if self.launch is None else f"in state {self.launch.state}"
            raise ConfplanError(
                f"measured launch {state}: no vCPU may run before LAUNCH_FINISH",
                hint="run the launch first: sev_launch.MeasuredLaunch measure, then inject_secret",
            )
        self.timings["start"] = time.perf_counter()
        for r in self.runners:
            r.start(paused=self.config.mh_only and not r.aux)
        if self.config.watchdog_s:
            threading.Thread(target=self._watchdog, name="vmm-watchdog", daemon=True).start()

    def wait_workload(self, event: int = abi.EV_WL_STARTED, timeout: float = 10.0) -> None:
        """Wait until every workload vCPU reported ``event`` (started, filled); raise on timeout/failure."""
        if not self.events.wait(event, range(self.config.vcpus), timeout):
            raise ConfplanError(f"the guest workload did not report event {event} within {timeout} s")

    @property
    def started(self) -> bool:
        """``start`` has run: the vCPU threads (the helper's among them) are up."""
        return "start" in self.timings

    def wait_helpers_ready(self, timeout: float = 10.0) -> None:
        """Wait until every helper vCPU announced its serve loop (EV_MH_READY); raise on timeout/failure."""
        if not self.events.wait(abi.EV_MH_READY, [h.runner.index for h in self.helpers], timeout):
            where = "mirror VM's" if self.mirror is not None else "aux vCPUs'"
            raise ConfplanError(f"the {where} migration helper did not start within {timeout} s")

    def pause(self, runners: list[VcpuRunner]) -> None:
        for r in runners:
            r.pause()
        self.check()

    def resume(self, runners: list[VcpuRunner]) -> None:
        for r in runners:
            r.resume()

    def pause_all_vcpus_except_aux(self) -> None:
        """The seed's pause_all_vcpus_except_aux: stop the guest, keep the helper running."""
        self.pause(self.vcpus)

    def resume_all_vcpus_except_aux(self) -> None:
        self.resume(self.vcpus)

    def vcpus_at_cpl0(self) -> list[int]:
        """Ids of the guest's paused vCPUs that stopped in a CPL0 service (an interrupt handler, the time
        service): their state continues from the CPL0 area, which migrates with the guest's pages."""
        self._require_paused()
        return [r.vcpu.id for r in self.vcpus if r.vcpu.get_sregs().cs.selector & 3 == 0]

    def pause_in_cpl0(self, attempts: int) -> bool:
        """A test of the CPL0 area's migration: with the guest paused, hold it until its timer's next tick
        falls due, let it run and pause it again as soon as its vCPUs enter KVM_RUN (on kvm_pvm KVM delivers
        the due tick on entry: the interrupt frame pushed, RIP at the handler), until a vCPU stops in a CPL0
        service; at most ``attempts`` times. True when one did (the guest is left paused either way)."""
        self._require_paused()
        hold = 1.5 / self.config.timer_hz if self.config.timer_hz else 0.0
        for _ in range(attempts if hold else 0):
            if self.vcpus_at_cpl0():
                return True
            time.sleep(hold)
            self.resume_all_vcpus_except_aux()
            deadline = time.monotonic() + 0.01
            while any(r.state is not RunState.RUNNING for r in self.vcpus) and time.monotonic() < deadline:
                time.sleep(0)  # let the vCPU threads through to KVM_RUN
            self.pause_all_vcpus_except_aux()
        return bool(self.vcpus_at_cpl0())

    def save_vcpu_states(self) -> list[VcpuState]:
        """State of the guest's own vCPUs (they must be paused); aux vCPUs are not migrated."""
        self._require_paused()
        return [VcpuState.save(r.vcpu, irqchip=True) for r in self.vcpus]

    def save_clock(self) -> VmClock:
        """The VM's kvm-clock (read with the host wall clock of the reading), for a migration."""
        return VmClock.save(self.vm)

    def restore_clock(self, clock: VmClock, now_wall: float, *, offset_ns: int = 0) -> int:
        """Set the VM's kvm-clock moved on by the wall time since ``clock`` was read (the guest must be
        paused); ``offset_ns`` is for tests only. Returns the value set."""
        self._require_paused()
        return clock.restore(self.vm, now_wall, offset_ns=offset_ns)

    def restore_vcpu_states(self, states: list[VcpuState]) -> None:
        self._require_paused()
        by_id = {r.index: r for r in self.vcpus}
        for st in states:
            if st.vcpu_id not in by_id:
                raise ConfplanError(
                    f"vCPU state for vCPU {st.vcpu_id}, but this guest has {len(by_id)} vCPUs"
                )
            st.restore(by_id[st.vcpu_id].vcpu)

    def _require_paused(self) -> None:
        if any(r.state not in (RunState.PAUSED, RunState.CREATED) for r in self.vcpus):
            raise ConfplanError("vCPU state can be saved or restored only while the guest's vCPUs are paused")

    def _all_running(self, runners: list[VcpuRunner]) -> bool:
        return all(r.active for r in runners)

    def _kick_workload(self) -> None:
        for r in self.vcpus:
            r.kick()

    # ---- exits ----
    def _dispatch(self, runner: VcpuRunner, ex: VcpuExit) -> None:
        if isinstance(ex, MmioWrite):
            dev = self.bus.find(ex.addr)
            if dev is None:
                raise self._guest_error(runner, f"MMIO write of {ex.value:#x} to unclaimed GPA {ex.addr:#x}")
            dev[0].mmio_write(runner, dev[1], ex.size, ex.value)
        elif isinstance(ex, MmioRead):
            dev = self.bus.find(ex.addr)
            if dev is None:
                raise self._guest_error(runner, f"MMIO read from unclaimed GPA {ex.addr:#x}")
            value = dev[0].mmio_read(runner, dev[1], ex.size)
            data = runner.vcpu.run.exit.mmio.data
            for i, byte in enumerate(value.to_bytes(8, "little")[: ex.size]):
                data[i] = byte
        elif isinstance(ex, Hypercall):
            runner.vcpu.run.exit.hypercall.ret = self._hypercall(runner, ex)
        elif isinstance(ex, Hlt):
            raise self._guest_error(runner, "halted (HLT) with nothing to wake it")
        elif isinstance(ex, Shutdown):
            raise self._guest_error(runner, "triple fault (KVM_EXIT_SHUTDOWN)")
        elif isinstance(ex, InternalError):
            kind = "emulation failure" if ex.suberror == 1 else f"suberror {ex.suberror}"
            data = " ".join(f"{d:#x}" for d in ex.data)
            raise self._guest_error(runner, f"KVM internal error ({kind}), data [{data}]")
        elif isinstance(ex, FailEntry):
            raise self._guest_error(runner, f"KVM could not enter the guest (reason {ex.reason:#x})")
        elif isinstance(ex, IoOut | IoIn):
            raise self._guest_error(
                runner, f"port I/O to port {ex.port:#x}: this machine has no port devices"
            )
        elif isinstance(ex, Unsupported):
            name = s.EXIT_REASON_NAMES.get(ex.reason, "unknown")
            raise self._guest_error(runner, f"unhandled exit {ex.reason} ({name})")

    def _hypercall(self, runner: VcpuRunner, ex: Hypercall) -> int:
        if ex.nr != s.KVM_HC_MAP_GPA_RANGE:
            return -KVM_ENOSYS & ((1 << 64) - 1)
        try:
            self.enc_bitmap.map_gpa_range(ex.args[0], ex.args[1], ex.args[2])
        except EncStatusError as err:
            raise self._guest_error(runner, str(err)) from None
        return 0

    def _guest_error(self, runner: VcpuRunner, what: str) -> GuestError:
        rip = int(runner.vcpu.get_regs().rip)
        return GuestError(
            f"{runner.label}: {what} at RIP {rip:#x}",
            vcpu=runner.index,
            rip=rip,
            hint="the guest stopped; look up the RIP in confplan-fw.sym",
        )

    # ---- failure, watchdog, shutdown ----
    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        for r in self.runners:
            r.stop()
        self.events.poke()
        self.mailbox_doorbells.stop()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Raise the error that stopped the guest, if any."""
        if self._error is not None:
            raise self._error

    def _watchdog(self) -> None:
        limit = float(self.config.watchdog_s or 0)
        seen: dict[int, tuple[int, int]] = {}
        while not self._closed.wait(min(0.25, limit / 4)):
            now = time.monotonic()
            for r in self.runners:
                if r.state is not RunState.RUNNING:
                    continue
                if r.parked:  # in the C loop's park: no progress is due; none is owed on waking either
                    r.last_progress = now
                    continue
                beat = (r.heartbeat() if r.heartbeat else 0, r.exits)
                if seen.get(r.index) != beat:
                    seen[r.index] = beat
                    r.last_progress = now
                elif now - r.last_progress > limit:
                    r.declare_stuck(now - r.last_progress)

    def on_close(self, drop: Callable[[], None]) -> None:
        """Have ``close`` call ``drop`` once the vCPU threads stopped, before the RAM goes: a user of the
        machine lets go of what it holds on it (views of guest RAM) there."""
        self._teardown.append(drop)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every vCPU thread, then close fds and mappings in reverse order of creation."""
        self._closed.set()
        self.mailbox_doorbells.stop()
        for r in self.runners:
            r.stop()
        stuck = [r.index for r in self.runners if not r.join(timeout)]
        if stuck:  # never close the fds under a thread still inside KVM_RUN
            raise ConfplanError(f"vCPU threads {stuck} did not stop within {timeout} s")
        while self._teardown:
            self._teardown.pop()()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
