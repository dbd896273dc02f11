"""A running guest: memfd RAM, firmware, CPU tables, vCPU threads (the guest's own and aux vCPUs), the
MMIO devices, dirty log, encryption bitmap, and a watchdog. Set-up registers its tear-down; ``close``
runs it in reverse."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from confplan.errors import ConfplanError
from confplan.kvm import DEFAULT_KVM_PATH, Kvm
from confplan.kvm import structs as s
from confplan.vmm import abi, cpu_setup, tables
from confplan.vmm.aux_vcpu import AuxVcpu
from confplan.vmm.config import MachineConfig
from confplan.vmm.devices import MmioBus
from confplan.vmm.devices.console import Console
from confplan.vmm.devices.doorbell import Doorbell
from confplan.vmm.devices.encstatus import EncStatusDoorbell
from confplan.vmm.devices.fault import FaultReporter
from confplan.vmm.dirty_log import DirtyLog, Memslot
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
from confplan.vmm.layout import GuestLayout
from confplan.vmm.memory import GuestRam
from confplan.vmm.state import VcpuState
from confplan.vmm.vcpu_thread import RunState, VcpuRunner
from confplan.vmm.workload import WorkloadControl

TSS_ADDR = 0xFFFBD000  # three pages KVM may use on VMX hosts, above the MMIO window
KVM_ENOSYS = 1000


class Machine:
    """Build with ``Machine(config)``, then ``start()``; always ``close()`` (or use ``with``)."""

    def __init__(
        self,
        config: MachineConfig,
        *,
        kvm_path: str = DEFAULT_KVM_PATH,
        firmware: Firmware | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.layout = GuestLayout.for_config(config)
        self.firmware = firmware or Firmware.load()
        self.timings: dict[str, float] = {"created": time.perf_counter()}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._teardown: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self.events = EventLog(self.check)
        self.runners: list[VcpuRunner] = []
        self.aux: list[AuxVcpu] = []
        self._log: TextIO | None = None
        try:
            self._build(kvm_path, echo)
        except BaseException:
            self.close()
            raise

    # ---- set-up ----
    def _build(self, kvm_path: str, echo: Callable[[str], None] | None) -> None:
        cfg, lay = self.config, self.layout
        self.kvm = Kvm(kvm_path)
        self._teardown.append(self.kvm.close)
        self.vm = self.kvm.create_vm()
        self._teardown.append(self.vm.close)
        self.vm.set_tss_addr(TSS_ADDR)
        self.hypercall_exits = self._enable_hypercall_exit()
        self.ram = GuestRam(cfg.memory)
        self._teardown.append(self.ram.close)
        flags = s.KVM_MEM_LOG_DIRTY_PAGES if cfg.dirty_logging else 0
        self.vm.set_user_memory_region(0, 0, cfg.memory, self.ram.address, flags)
        self.dirty_log = DirtyLog(self.vm, [Memslot(0, 0, cfg.memory)])
        self.enc_bitmap = EncBitmap(lay.npages)
        self._cpuid = self.kvm.supported_cpuid()
        self.cpu = cpu_setup.cpu_info(self._cpuid)
        self._load_guest_memory()
        self._make_devices(echo)
        self.workload = WorkloadControl(
            self.ram, lay, self.events, self._kick_workload, lambda: self._all_running(self.vcpus)
        )
        self.workload.init_control_page()
        self._make_vcpus()
        self._write_boot_params(self.runners[0].vcpu.tsc_khz())

    def _enable_hypercall_exit(self) -> bool:
        """KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE where offered (on kvm_pvm it is offered but
        no hypercall reaches userspace; the MMIO channel is what works there)."""
        mask = self.kvm.check_extension(s.KVM_CAP_EXIT_HYPERCALL)
        if not mask >> s.KVM_HC_MAP_GPA_RANGE & 1:
            return False
        self.vm.enable_cap(s.KVM_CAP_EXIT_HYPERCALL, 1 << s.KVM_HC_MAP_GPA_RANGE)
        return True

    def _load_guest_memory(self) -> None:
        nr = self.config.vcpus + self.config.aux_vcpus
        self.ram.write(abi.FW_BASE, self.firmware.image)
        tables.write_gdt_and_tss(self.ram, nr)
        tables.write_idt(self.ram, self.firmware)
        tables.write_page_tables(self.ram, self.layout, self.firmware, nr)

    def _make_devices(self, echo: Callable[[str], None] | None) -> None:
        if echo is None and self.config.console_echo:
            echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
        if self.config.console_log:
            self._log = open(self.config.console_log, "a", encoding="utf-8")  # noqa: SIM115
            self._teardown.append(self._log.close)
        self.console = Console(self.ram, echo, self._log)
        self.bus = MmioBus()
        self.bus.register(abi.MMIO_CONSOLE, abi.PAGE, self.console)
        self.bus.register(abi.MMIO_DOORBELL, abi.PAGE, Doorbell(self.events))
        self.bus.register(abi.MMIO_ENCSTATUS, abi.PAGE, EncStatusDoorbell(self.enc_bitmap))
        self.bus.register(abi.MMIO_FAULT, abi.PAGE, FaultReporter())

    def _make_vcpus(self) -> None:
        cfg, lay = self.config, self.layout
        nr = cfg.vcpus + cfg.aux_vcpus
        for vcpu_id in range(nr):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._teardown.append(vcpu.close)
            aux = vcpu_id >= cfg.vcpus
            if aux:
                mh = vcpu_id - cfg.vcpus
                entry, stack, cr3, arg = (
                    self.firmware.sym("mh_entry"),
                    lay.mh_stack_top(mh),
                    abi.PT_MH_GPA,
                    mh,
                )
            else:
                entry, stack, cr3, arg = (
                    self.firmware.sym("wl_entry"),
                    lay.wl_stack_top(vcpu_id),
                    abi.PT_WL_GPA,
                    vcpu_id,
                )
            cpu_setup.configure(
                vcpu, self._cpuid, self.cpu, entry=entry, stack_top=stack, cr3=cr3, arg=arg, nr_vcpus=nr
            )
            runner = VcpuRunner(
                vcpu,
                aux=aux,
                dispatch=self._dispatch,
                on_error=self._fail,
                heartbeat=self._heartbeat_of(vcpu_id),
            )
            self.runners.append(runner)
            if aux:
                self.aux.append(AuxVcpu(runner, self.ram, lay, vcpu_id - cfg.vcpus))

    def _heartbeat_of(self, vcpu_id: int) -> Callable[[], int]:
        if vcpu_id < self.config.vcpus:
            status = self.workload.ctl.vcpu[vcpu_id]
            return lambda: int(status.heartbeat)
        header = self.ram.struct_at(abi.MailboxHeader, self.layout.mailbox_gpa(vcpu_id - self.config.vcpus))
        return lambda: int(header.heartbeat)

    def _write_boot_params(self, tsc_khz: int) -> None:
        cfg, lay = self.config, self.layout
        bp = self.ram.struct_at(abi.BootParams, abi.BOOT_PARAMS_GPA)
        bp.magic, bp.version = abi.BP_MAGIC, abi.ABI_VERSION
        bp.flags = (
            (abi.BP_FLAG_MH_ONLY if cfg.mh_only else 0)
            | (abi.BP_FLAG_ENC_HYPERCALL if cfg.enc_channel == "hypercall" else 0)
            | (abi.BP_FLAG_VENDOR_AMD if self.cpu.vendor_amd else 0)
        )
        bp.ram_bytes, bp.tsc_khz, bp.cpu_features = cfg.memory, tsc_khz, self.cpu.features
        bp.nr_vcpus = cfg.vcpus  # the guest's own vCPUs only: aux vCPUs stay invisible to it
        for i in range(cfg.vcpus):
            bp.cpu_table[i] = i
        bp.mmio_console, bp.mmio_doorbell, bp.mmio_encstatus = (
            abi.MMIO_CONSOLE,
            abi.MMIO_DOORBELL,
            abi.MMIO_ENCSTATUS,
        )
        bp.mmio_fault, bp.mmio_mailbox = abi.MMIO_FAULT, abi.MMIO_MAILBOX
        bp.mh_base, bp.mh_size, bp.secret_gpa = abi.MH_BASE, lay.mh_end - abi.MH_BASE, abi.SECRET_GPA
        bp.mailbox_gpa, bp.mailbox_stride = abi.MAILBOX_GPA, lay.mailbox_stride
        bp.mh_vcpus, bp.batch_pages = lay.mh_vcpus, cfg.batch_pages
        bp.wl_base, bp.wl_size = lay.wl_base, cfg.memory - lay.wl_base
        bp.wl_ctl_gpa, bp.wl_stack_gpa = lay.wl_ctl_gpa, lay.wl_stack_gpa
        bp.wl_stack_size = lay.wl_stack_top(0) - lay.wl_stack_gpa
        bp.wl_ledger_gpa, bp.wl_data_gpa, bp.wl_data_pages = (
            lay.wl_ledger_gpa,
            lay.wl_data_gpa,
            lay.wl_data_pages,
        )
        bp.wl_kind, bp.wl_shared_ppm = cfg.wl_kind, round(cfg.shared_fraction * 1_000_000)
        bp.wl_rate_bps = 0 if cfg.dirty_rate is None else max(1, int(cfg.dirty_rate))
        bp.wl_seed = cfg.seed & ((1 << 64) - 1)

    # ---- running ----
    @property
    def vcpus(self) -> list[VcpuRunner]:
        """The guest's own vCPUs (not aux)."""
        return [r for r in self.runners if not r.aux]

    def start(self) -> None:
        """Start every vCPU thread; on a migration target (mh_only) the guest's own vCPUs stay paused."""
        self.timings["start"] = time.perf_counter()
        for r in self.runners:
            r.start(paused=self.config.mh_only and not r.aux)
        if self.config.watchdog_s:
            threading.Thread(target=self._watchdog, name="vmm-watchdog", daemon=True).start()

    def wait_workload(self, event: int = abi.EV_WL_STARTED, timeout: float = 10.0) -> None:
        """Wait until every workload vCPU reported ``event`` (started, filled); raise on timeout/failure."""
        if not self.events.wait(event, range(self.config.vcpus), timeout):
            raise ConfplanError(f"the guest workload did not report event {event} within {timeout} s")

    def wait_helpers_ready(self, timeout: float = 10.0) -> None:
        if not self.events.wait(abi.EV_MH_READY, [a.runner.index for a in self.aux], timeout):
            raise ConfplanError(f"the aux vCPUs' migration helper did not start within {timeout} s")

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

    def save_vcpu_states(self) -> list[VcpuState]:
        """State of the guest's own vCPUs (they must be paused); aux vCPUs are not migrated."""
        self._require_paused()
        return [VcpuState.save(r.vcpu) for r in self.vcpus]

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
            f"vCPU {runner.index}: {what} at RIP {rip:#x}",
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

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Raise the error that stopped the guest, if any."""
        if self._error is not None:
            raise self._error

    def _watchdog(self) -> None:
        limit = float(self.config.watchdog_s or 0)
        seen: dict[int, int] = {}
        while not self._closed.wait(min(0.25, limit / 4)):
            now = time.monotonic()
            for r in self.runners:
                if r.state is not RunState.RUNNING:
                    continue
                beat = r.heartbeat() if r.heartbeat else 0
                if seen.get(r.index) != beat:
                    seen[r.index] = beat
                    r.last_progress = now
                elif now - r.last_progress > limit:
                    r.declare_stuck(now - r.last_progress)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every vCPU thread, then close fds and mappings in reverse order of creation."""
        self._closed.set()
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
