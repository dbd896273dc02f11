"""The guest ABI: a mirror of firmware/include/confplan_abi.h (``confplan.vmm.abi`` re-exports it).

tests/test_firmware_abi.py checks every value and struct offset here against the ``ABI_*`` symbols the
built firmware exports, so the two sides cannot drift apart silently.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar, Final

u32, u64 = ctypes.c_uint32, ctypes.c_uint64

PAGE: Final = 0x1000
MIB: Final = 1 << 20
HUGE: Final = 2 * MIB

# Values exported by the firmware as ABI_<lowercase name>.
ABI: Final[dict[str, int]] = {
    "version": 9,
    "gdt_gpa": 0x1000,
    "idt_gpa": 0x2000,
    "tss_gpa": 0x8000,
    "tss_stride": 0x80,
    "boot_params_gpa": 0x4000,
    "pt_wl_gpa": 0x10000,
    "pt_mh_gpa": 0x54000,
    "pt_set_size": 0x44000,
    "kstack_gpa": 0xA0000,
    "kstack_size": 0x1000,
    "max_vcpus": 128,
    "fw_base": 0x180000,
    "mh_base": 0x200000,
    "mh_image_size": 0x40000,
    "mh_stacks_gpa": 0x240000,
    "mh_stack_size": 0x4000,
    "max_mh_vcpus": 16,
    "secret_gpa": 0x280000,
    "mailbox_gpa": 0x281000,
    "mailbox_slot_tag": 64,
    "mh_ctx_stride": 0xC000,
    "mh_gen_entry": 4,
    "mh_mac_entry": 16,
    "vmsa_slot_size": 0x2000,
    "vmsa_slot_header": 64,
    "vmsa_magic": 0x41534D56,
    "vmsa_empty": 0,
    "vmsa_sealed": 1,
    "vmsa_opened": 2,
    "vmsa_verified": 3,
    "mmio_base": 0xE0000000,
    "mmio_size": 0x200000,
    "ram_hole_start": 0xE0000000,
    "ram_hole_end": 0x100000000,
    "max_ram_top": 0x1000000000,
    "e820_max": 8,
    "e820_ram": 1,
    "e820_reserved": 2,
    "mmio_console": 0xE0000000,
    "mmio_doorbell": 0xE0001000,
    "mmio_encstatus": 0xE0002000,
    "mmio_fault": 0xE0003000,
    "mmio_mailbox": 0xE0010000,
    "db_idle": 0x00,
    "db_sleep_ns": 0x08,
    "db_event": 0x10,
    "ev_wl_started": 1,
    "ev_wl_filled": 2,
    "ev_wl_cmd_done": 3,
    "ev_mh_ready": 4,
    "enc_gpa": 0x00,
    "enc_npages": 0x08,
    "enc_attrs": 0x10,
    "map_gpa_range_encrypted": 0x10,
    "fault_vector": 0x00,
    "fault_error": 0x08,
    "fault_rip": 0x10,
    "fault_cs": 0x18,
    "fault_rsp": 0x20,
    "fault_cr2": 0x28,
    "fault_commit": 0x30,
    "svc_vector": 0x80,
    "flag_mh_only": 0x1,
    "flag_enc_hypercall": 0x2,
    "flag_vendor_amd": 0x4,
    "flag_snp": 0x8,
    "wl_ctl_magic": 0x4C544357,
    "wl_cmd_check": 1,
    "wl_cmd_write_list": 2,
    "wl_list_max": 1024,
    "mailbox_magic": 0x58424D43,
    "svc_time_init": 2,
    "lapic_gpa": 0xFEE00000,
    "timer_vector": 0xEC,
    "spurious_vector": 0xFF,
    "msr_kvm_system_time_new": 0x4B564D01,
    "pvclock_size": 32,
}

ABI_VERSION: Final = ABI["version"]
GDT_GPA: Final = ABI["gdt_gpa"]
IDT_GPA: Final = ABI["idt_gpa"]
TSS_GPA: Final = ABI["tss_gpa"]
TSS_STRIDE: Final = ABI["tss_stride"]
BOOT_PARAMS_GPA: Final = ABI["boot_params_gpa"]
PT_WL_GPA: Final = ABI["pt_wl_gpa"]
PT_MH_GPA: Final = ABI["pt_mh_gpa"]
PT_SET_SIZE: Final = ABI["pt_set_size"]
KSTACK_GPA: Final = ABI["kstack_gpa"]
KSTACK_SIZE: Final = ABI["kstack_size"]
MAX_VCPUS: Final = ABI["max_vcpus"]
FW_BASE: Final = ABI["fw_base"]
MH_BASE: Final = ABI["mh_base"]
MH_IMAGE_SIZE: Final = ABI["mh_image_size"]
MH_STACKS_GPA: Final = ABI["mh_stacks_gpa"]
MH_STACK_SIZE: Final = ABI["mh_stack_size"]
MAX_MH_VCPUS: Final = ABI["max_mh_vcpus"]
SECRET_GPA: Final = ABI["secret_gpa"]
MAILBOX_GPA: Final = ABI["mailbox_gpa"]
MAILBOX_SLOT_TAG: Final = ABI["mailbox_slot_tag"]
MH_CTX_STRIDE: Final = ABI["mh_ctx_stride"]
MH_GEN_ENTRY: Final = ABI["mh_gen_entry"]
MH_MAC_ENTRY: Final = ABI["mh_mac_entry"]
VMSA_SLOT_SIZE: Final = ABI["vmsa_slot_size"]
VMSA_SLOT_HEADER: Final = ABI["vmsa_slot_header"]
VMSA_DATA_BYTES: Final = VMSA_SLOT_SIZE - VMSA_SLOT_HEADER
VMSA_MAGIC: Final = ABI["vmsa_magic"]
VMSA_EMPTY, VMSA_SEALED, VMSA_OPENED, VMSA_VERIFIED = (
    ABI["vmsa_empty"], ABI["vmsa_sealed"], ABI["vmsa_opened"], ABI["vmsa_verified"]
)
MMIO_BASE: Final = ABI["mmio_base"]
MMIO_SIZE: Final = ABI["mmio_size"]
MMIO_CONSOLE: Final = ABI["mmio_console"]
MMIO_DOORBELL: Final = ABI["mmio_doorbell"]
MMIO_ENCSTATUS: Final = ABI["mmio_encstatus"]
MMIO_FAULT: Final = ABI["mmio_fault"]
MMIO_MAILBOX: Final = ABI["mmio_mailbox"]
RAM_HOLE_START: Final = ABI["ram_hole_start"]  # v8: guest RAM skips [start, end): MMIO, xAPIC
RAM_HOLE_END: Final = ABI["ram_hole_end"]
MAX_RAM_TOP: Final = ABI["max_ram_top"]  # the guest-physical space the page tables map
MAX_RAM: Final = MAX_RAM_TOP - (RAM_HOLE_END - RAM_HOLE_START)  # RAM that fits below MAX_RAM_TOP
E820_MAX: Final = ABI["e820_max"]
E820_RAM: Final = ABI["e820_ram"]
E820_RESERVED: Final = ABI["e820_reserved"]

DB_IDLE: Final = ABI["db_idle"]
DB_SLEEP_NS: Final = ABI["db_sleep_ns"]
DB_EVENT: Final = ABI["db_event"]
EV_WL_STARTED: Final = ABI["ev_wl_started"]
EV_WL_FILLED: Final = ABI["ev_wl_filled"]
EV_WL_CMD_DONE: Final = ABI["ev_wl_cmd_done"]
EV_MH_READY: Final = ABI["ev_mh_ready"]
ENC_GPA: Final = ABI["enc_gpa"]
ENC_NPAGES: Final = ABI["enc_npages"]
ENC_ATTRS: Final = ABI["enc_attrs"]
MAP_GPA_RANGE_ENCRYPTED: Final = ABI["map_gpa_range_encrypted"]
FAULT_VECTOR: Final = ABI["fault_vector"]
FAULT_ERROR: Final = ABI["fault_error"]
FAULT_RIP: Final = ABI["fault_rip"]
FAULT_CS: Final = ABI["fault_cs"]
FAULT_RSP: Final = ABI["fault_rsp"]
FAULT_CR2: Final = ABI["fault_cr2"]
FAULT_COMMIT: Final = ABI["fault_commit"]
SVC_VECTOR: Final = ABI["svc_vector"]
BP_FLAG_MH_ONLY: Final = ABI["flag_mh_only"]
BP_FLAG_ENC_HYPERCALL: Final = ABI["flag_enc_hypercall"]
BP_FLAG_VENDOR_AMD: Final = ABI["flag_vendor_amd"]
BP_FLAG_SNP: Final = ABI["flag_snp"]  # an SEV-SNP guest: its helper gets the key by the key release
WL_CTL_MAGIC: Final = ABI["wl_ctl_magic"]
WL_CMD_CHECK: Final = ABI["wl_cmd_check"]
WL_CMD_WRITE_LIST: Final = ABI["wl_cmd_write_list"]
WL_LIST_MAX: Final = ABI["wl_list_max"]
MB_MAGIC: Final = ABI["mailbox_magic"]
LAPIC_GPA: Final = ABI["lapic_gpa"]
TIMER_VECTOR: Final = ABI["timer_vector"]
MSR_KVM_SYSTEM_TIME_NEW: Final = ABI["msr_kvm_system_time_new"]
PVCLOCK_SIZE: Final = ABI["pvclock_size"]

BP_MAGIC: Final = 0x31304F4F424E4643  # "CFNBOO01"
NO_PAGE: Final = 0xFFFFFFFFFFFFFFFF
CHECK_OK, CHECK_BAD = 1, 2
LEDGER_SHARED = 0x8000_0000  # a ledger entry's seq bit 31: the workload's record that the page is shared
VEC_UNCHECKED, VEC_INTACT, VEC_LOST = 0, 1, 2
WL_STATE_NAMES: Final = {0: "off", 1: "starting", 2: "filling", 3: "running", 4: "parked"}

# workload kinds (CP_WL_*)
WL_NONE, WL_DIRTY_WRITER, WL_QUIET, WL_PROBE_MH, WL_SPIN = 0, 1, 2, 3, 4
WORKLOAD_KINDS: Final = {
    "none": WL_NONE,
    "dirty-writer": WL_DIRTY_WRITER,
    "quiet": WL_QUIET,
    "idle": WL_QUIET,  # the plan's name: fill once, then only serve the VMM's commands
    "probe-mh": WL_PROBE_MH,
    "spin": WL_SPIN,
}

# CPU feature bits in boot params (CP_FEAT_*)
FEATURE_BITS: Final = {
    "ssse3": 1 << 0,
    "sse4.1": 1 << 1,
    "aes-ni": 1 << 2,
    "pclmulqdq": 1 << 3,
    "avx": 1 << 4,
    "avx2": 1 << 5,
    "vaes": 1 << 6,
    "vpclmulqdq": 1 << 7,
    # Passed only together, and only when the VMM enabled the AVX-512 states in XCR0 (cpu_setup.py).
    "avx512f": 1 << 8,
    "avx512bw": 1 << 9,
    "avx512vl": 1 << 10,
    # User mode (CPL3 runs it natively): the helper's entropy for the SNP key release (docs/key-release.md).
    "rdrand": 1 << 11,
}


class E820Entry(ctypes.Structure):
    """``struct cp_e820_entry``: one range of the guest-physical map."""

    _fields_: ClassVar = [("addr", u64), ("size", u64), ("type", u32), ("pad", u32)]


class BootParams(ctypes.Structure):
    """``struct cp_boot_params``."""

    _fields_: ClassVar = [
        ("magic", u64),
        ("version", u32),
        ("flags", u32),
        ("ram_bytes", u64),
        ("tsc_khz", u64),
        ("cpu_features", u32),
        ("nr_vcpus", u32),
        ("mmio_console", u64),
        ("mmio_doorbell", u64),
        ("mmio_encstatus", u64),
        ("mmio_fault", u64),
        ("mmio_mailbox", u64),
        ("mh_base", u64),
        ("mh_size", u64),
        ("secret_gpa", u64),
        ("mailbox_gpa", u64),
        ("mailbox_stride", u64),
        ("mh_vcpus", u32),
        ("batch_pages", u32),
        ("wl_base", u64),
        ("wl_size", u64),
        ("wl_ctl_gpa", u64),
        ("wl_stack_gpa", u64),
        ("wl_stack_size", u64),
        ("wl_ledger_gpa", u64),
        ("wl_data_gpa", u64),
        ("wl_data_pages", u64),
        ("wl_kind", u32),
        ("wl_shared_ppm", u32),
        ("wl_rate_bps", u64),
        ("wl_seed", u64),
        ("cpu_table", u32 * MAX_VCPUS),
        # ABI v2: the migration helper's private state (docs/memory-map.md)
        ("mh_shared_gpa", u64),
        ("mh_ctx_gpa", u64),
        ("mh_ctx_stride", u64),
        ("mh_gen_gpa", u64),
        ("mh_gen_entries", u64),
        # ABI v3: the per-page MAC table verify folds (docs/mailbox.md)
        ("mh_mac_gpa", u64),
        ("mh_mac_entries", u64),
        # ABI v4: the VMSA slots where the target MH opens SEV-ES/SNP register state (docs/mailbox.md)
        ("mh_vmsa_gpa", u64),
        ("mh_vmsa_slots", u64),
        # ABI v5: the workload's private <-> shared conversions per second
        ("wl_conv_rate", u64),
        # ABI v6: kvm-clock (one pvclock struct per workload vCPU in this page) and the LAPIC timer
        ("wl_pvclock_gpa", u64),
        ("timer_count", u64),
        # ABI v8: RAM above 4 GiB (the map around the hole, as an e820 table)
        ("ram_top", u64),
        ("wl_data_low_pages", u64),
        ("e820_count", u32),
        ("e820_pad", u32),
        ("e820", E820Entry * E820_MAX),
        # ABI v9: SEV-SNP: the owner's static X25519 public key (docs/key-release.md)
        ("owner_key", ctypes.c_uint8 * 32),
    ]


class WlVcpuStatus(ctypes.Structure):
    """``struct cp_wl_vcpu_status``: one workload vCPU's progress and last command result."""

    _fields_: ClassVar = [
        ("heartbeat", u64),
        ("state", u32),
        ("ack_seq", u32),
        ("result", u32),
        ("vector", u32),
        ("first_bad", u64),
        ("pages_written", u64),
        ("checked", u64),
        ("conversions", u64),
        ("ticks", u64),  # v6: LAPIC timer interrupts taken (the CPL0 handler counts them)
        ("clock_ns", u64),  # v6: the workload loop's last kvm-clock reading
        ("max_gap_ns", u64),  # v6: largest gap between two readings, less the sleep asked for between
        ("clock_back", u64),  # v6: readings earlier than the one before
        ("clock_reads", u64),  # v6: readings taken
    ]


class WlControl(ctypes.Structure):
    """``struct cp_wl_control``: the workload's command page (the VMM writes, the workload polls)."""

    _fields_: ClassVar = [
        ("magic", u32),
        ("cmd_seq", u32),
        ("cmd", u32),
        ("list_count", u32),
        ("reserved", u64 * 6),
        ("vcpu", WlVcpuStatus * MAX_VCPUS),
        ("list", u64 * 1024),
    ]


class LedgerEntry(ctypes.Structure):
    """``struct cp_ledger_entry``."""

    _fields_: ClassVar = [("seq", u32), ("csum", u32)]


class MailboxHeader(ctypes.Structure):
    """``struct cp_mailbox_header``: the first bytes of each MH vCPU's control page."""

    _fields_: ClassVar = [
        ("magic", u32),
        ("state", u32),
        ("mh_index", u32),
        ("pad", u32),
        ("heartbeat", u64),
        ("ping", u64),
        ("pong", u64),
    ]


class VmsaSlot(ctypes.Structure):
    """``struct cp_vmsa_slot``: a VMSA slot in MH memory, its 64-byte header, then the state. Only the
    emulated hardware loader (``vmm.vmsa_slot``) reads one."""

    _fields_: ClassVar = [
        ("magic", u32),
        ("state", u32),
        ("vcpu", u32),
        ("length", u32),
        ("tag", ctypes.c_uint8 * 16),
        ("migration_id", ctypes.c_uint8 * 16),
        ("reserved", ctypes.c_uint8 * 16),
        ("data", ctypes.c_uint8 * VMSA_DATA_BYTES),
    ]


# Struct prefix used by the firmware's ABI_<prefix>_<field> symbols.
ABI_STRUCTS: Final[dict[str, type[ctypes.Structure]]] = {
    "bp": BootParams,
    "wlst": WlVcpuStatus,
    "wlctl": WlControl,
    "mb": MailboxHeader,
    "vslot": VmsaSlot,
}


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
