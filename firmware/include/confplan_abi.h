/*
 * confplan guest ABI: the one header shared by the firmware and the VMM.
 *
 * The VMM (confplan/vmm/layout.py, confplan/vmm/bootparams.py) mirrors these values; abi.c exports every
 * one of them as an absolute ELF symbol (ABI_*), and tests/test_firmware_abi.py checks the Python side
 * against those symbols. Change both sides together and bump CP_ABI_VERSION.
 * Guest virtual == guest physical (identity mapping), so every GPA below is also a pointer.
 */
#ifndef CONFPLAN_ABI_H
#define CONFPLAN_ABI_H

#define CP_ABI_VERSION 9
#define CP_PAGE_SIZE 0x1000

/* ---- low area (first 2 MiB, mapped with 4 KiB pages) ---- */
#define CP_GDT_GPA 0x1000
#define CP_IDT_GPA 0x2000
#define CP_BOOT_PARAMS_GPA 0x4000  /* read-only for CPL3 */
#define CP_TSS_GPA 0x8000          /* (v8) one TSS per vCPU, CP_TSS_STRIDE apart */
#define CP_TSS_STRIDE 0x80
/* (v8) Page tables, one set each for the workload and the helper: PML4, PDPT, the PT of the low 2 MiB,
 * then one PD per GiB of guest-physical space up to CP_MAX_RAM_TOP (2 MiB pages), the hole included. */
#define CP_PT_WL_GPA 0x10000
#define CP_PT_SET_SIZE 0x44000     /* 68 pages: PML4, PDPT, PT, 64 PDs, one spare */
#define CP_PT_MH_GPA (CP_PT_WL_GPA + CP_PT_SET_SIZE)
#define CP_KSTACK_GPA 0xA0000      /* CPL0 stacks, CP_KSTACK_SIZE each, one per vCPU */
#define CP_KSTACK_SIZE 0x1000
#define CP_MAX_VCPUS 128           /* workload + helper vCPUs together (v8; was 32) */
#define CP_FW_BASE 0x180000        /* where confplan-fw.bin is loaded */

/* ---- migration-helper (MH) area: never mapped in the workload's page tables ---- */
#define CP_MH_BASE 0x200000
#define CP_MH_IMAGE_SIZE 0x40000   /* MH code and data (incl. crypto) */
#define CP_MH_STACKS_GPA 0x240000  /* CPL3 stacks of MH vCPUs */
#define CP_MH_STACK_SIZE 0x4000
#define CP_MAX_MH_VCPUS 16
#define CP_SECRET_GPA 0x280000     /* launch secret / transport key page */
#define CP_MAILBOX_GPA 0x281000    /* per MH vCPU: control page + data slots, bp.mailbox_stride apart */
#define CP_MAILBOX_SLOT_TAG 64     /* bytes after each 4 KiB page in a data slot (tag, header) */
/* After the mailboxes (GPAs in the boot parameters, laid out by the VMM): the MH's shared block (one page),
 * one context per MH vCPU (CP_MH_CTX_STRIDE apart), the anti-replay generation table (4 bytes per guest
 * page) and (v3) the per-page MAC table (16 bytes per guest page, docs/mailbox.md). Private to the MH: only its page tables map them. */
#define CP_MH_CTX_STRIDE 0xC000    /* >= sizeof(struct cp_mh_ctx) (firmware/mh/context.h), checked in mh.c */
#define CP_MH_GEN_ENTRY 4
#define CP_MH_MAC_ENTRY 16
/* (v4) After the MAC table: one VMSA slot per guest vCPU (bp.mh_vmsa_gpa, bp.mh_vmsa_slots), where the target
 * MH opens a vCPU's sealed register state (OPEN_STATE, docs/mailbox.md) and the source MH keeps the tag of
 * the state it sealed last. MH-private like the rest: the workload never maps it, the VMM's read API refuses
 * it; only the emulated "hardware" loader (confplan/vmm/vmsa_slot.py) reads it. */
#define CP_VMSA_SLOT_SIZE 0x2000
#define CP_VMSA_SLOT_HEADER 64
#define CP_VMSA_DATA_BYTES (CP_VMSA_SLOT_SIZE - CP_VMSA_SLOT_HEADER)
#define CP_VMSA_MAGIC 0x41534d56u /* "VMSA" */
#define CP_VMSA_EMPTY 0u
#define CP_VMSA_SEALED 1u   /* source: `tag` is that of the state it sealed last (no data) */
#define CP_VMSA_OPENED 2u   /* target: the state is in `data`, not (or no longer) verified */
#define CP_VMSA_VERIFIED 3u /* target: opened, and a CHECK_MANIFEST since vouched for it */

/* ---- MMIO (no memslot behind it: every access exits to the VMM) ---- */
#define CP_MMIO_BASE 0xE0000000
#define CP_MMIO_SIZE 0x200000
/* (v8) Guest RAM is [0, min(ram_bytes, CP_RAM_HOLE_START)) and, for RAM beyond that, [4 GiB, ...): the
 * hole [CP_RAM_HOLE_START, CP_RAM_HOLE_END) holds the MMIO window and the xAPIC page, never RAM (the map
 * x86 VMMs use; bp.e820 lists it). */
#define CP_RAM_HOLE_START CP_MMIO_BASE
#define CP_RAM_HOLE_END 0x100000000ULL
#define CP_MAX_RAM_TOP 0x1000000000ULL  /* 64 GiB of guest-physical space: one PD per GiB (CP_PT_SET_SIZE) */
#define CP_E820_MAX 8
#define CP_E820_RAM 1u
#define CP_E820_RESERVED 2u
#define CP_MMIO_CONSOLE (CP_MMIO_BASE + 0x0000)   /* +0: store gpa | len << 48 */
#define CP_MMIO_DOORBELL (CP_MMIO_BASE + 0x1000)  /* vCPU services, CP_DB_* offsets */
#define CP_MMIO_ENCSTATUS (CP_MMIO_BASE + 0x2000) /* KVM_HC_MAP_GPA_RANGE over MMIO, CP_ENC_* offsets */
#define CP_MMIO_FAULT (CP_MMIO_BASE + 0x3000)     /* CPL0 fault report, CP_FAULT_* offsets */
#define CP_MMIO_MAILBOX (CP_MMIO_BASE + 0x10000)  /* MH mailbox doorbells: +8*i, the MH stores its done seq */

#define CP_DB_IDLE 0x00     /* park this vCPU until the VMM kicks it */
#define CP_DB_SLEEP_NS 0x08 /* park for at most the stored number of ns (or until kicked) */
#define CP_DB_EVENT 0x10    /* store a CP_EV_* code: tells the VMM about progress */

#define CP_EV_WL_STARTED 1
#define CP_EV_WL_FILLED 2
#define CP_EV_WL_CMD_DONE 3
#define CP_EV_MH_READY 4

#define CP_ENC_GPA 0x00
#define CP_ENC_NPAGES 0x08
#define CP_ENC_ATTRS 0x10 /* the store that commits the three values */
#define CP_MAP_GPA_RANGE_ENCRYPTED 0x10 /* KVM_MAP_GPA_RANGE_ENCRYPTED; 0 = decrypted (shared) */

#define CP_FAULT_VECTOR 0x00
#define CP_FAULT_ERROR 0x08
#define CP_FAULT_RIP 0x10
#define CP_FAULT_CS 0x18
#define CP_FAULT_RSP 0x20
#define CP_FAULT_CR2 0x28
#define CP_FAULT_COMMIT 0x30

/* ---- CPL0 services (int 0x80, DPL 3): rax = service, args rbx, rcx, rdx like a KVM hypercall ---- */
#define CP_SVC_VECTOR 0x80
#define CP_SVC_MAP_GPA_RANGE 1
/* (v6) a CPL3 `hlt` with rax = 2 (its #GP handler serves it): rbx = this vCPU's pvclock GPA | 1,
 * rdx = LAPIC timer initial count (0: none) */
#define CP_SVC_TIME_INIT 2
#define CP_KVM_HC_MAP_GPA_RANGE 12

/* ---- (v6) interrupts and time: the in-kernel LAPIC (xAPIC page, supervisor-only) and kvm-clock ---- */
#define CP_LAPIC_GPA 0xFEE00000
#define CP_LAPIC_EOI 0xB0
#define CP_LAPIC_SVR 0xF0
#define CP_LAPIC_LVT_TIMER 0x320
#define CP_LAPIC_TIMER_ICR 0x380     /* initial count: writing it starts the timer */
#define CP_LAPIC_TIMER_DCR 0x3E0     /* divide configuration: 0xB = divide by 1 */
#define CP_LAPIC_TIMER_PERIODIC 0x20000
#define CP_TIMER_VECTOR 0xEC         /* Linux's LOCAL_TIMER_VECTOR */
#define CP_SPURIOUS_VECTOR 0xFF
#define CP_MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define CP_PVCLOCK_SIZE 32           /* struct cp_pvclock: one per workload vCPU in the pvclock page */
/* Offsets the CPL0 timer handler (isr.S) uses; abi.c checks them against the structs below. */
#define CP_BP_WL_CTL_OFF 0x90        /* offsetof(struct cp_boot_params, wl_ctl_gpa) */
#define CP_WLCTL_VCPU_OFF 0x40       /* offsetof(struct cp_wl_control, vcpu) */
#define CP_WLST_TICKS_OFF 0x38       /* offsetof(struct cp_wl_vcpu_status, ticks) */
#define CP_WLST_SIZE 0x60            /* sizeof(struct cp_wl_vcpu_status) */

/* ---- boot parameters ---- */
#define CP_BP_MAGIC 0x31304f4f424e4643ULL /* "CFNBOO01" little-endian */
#define CP_BP_FLAG_MH_ONLY 0x1            /* migration target: only MH vCPUs run */
#define CP_BP_FLAG_ENC_HYPERCALL 0x2      /* report page encryption changes by hypercall, not MMIO */
#define CP_BP_FLAG_VENDOR_AMD 0x4         /* use vmmcall (else vmcall) */
/* An SEV-SNP guest: the secret page is the PSP's SNP secrets page (VMPCK0 at 0x20), the transport key comes
 * by the key release (docs/key-release.md), not in the secret page. Measured like every boot parameter. */
#define CP_BP_FLAG_SNP 0x8

#define CP_FEAT_SSSE3 (1u << 0)
#define CP_FEAT_SSE41 (1u << 1)
#define CP_FEAT_AESNI (1u << 2)
#define CP_FEAT_PCLMULQDQ (1u << 3)
#define CP_FEAT_AVX (1u << 4)
#define CP_FEAT_AVX2 (1u << 5)
#define CP_FEAT_VAES (1u << 6)
#define CP_FEAT_VPCLMULQDQ (1u << 7)
/* Passed only together, and only when the VMM enabled opmask, ZMM_Hi256 and Hi16_ZMM in XCR0. */
#define CP_FEAT_AVX512F (1u << 8)
#define CP_FEAT_AVX512BW (1u << 9)
#define CP_FEAT_AVX512VL (1u << 10)
/* CPUID.1:ECX[30]; user mode, so CPL3 runs it natively. The helper's only entropy (SNP key release). */
#define CP_FEAT_RDRAND (1u << 11)

#define CP_WL_NONE 0
#define CP_WL_DIRTY_WRITER 1 /* fill, then rewrite pages at the rate */
#define CP_WL_QUIET 2        /* fill, then only serve commands */
#define CP_WL_PROBE_MH 3     /* test: read the secret page (must fault: not mapped for the workload) */
#define CP_WL_SPIN 4         /* test: loop forever with no exit and no heartbeat */

/* ---- workload control page (at bp.wl_ctl_gpa) ---- */
#define CP_WL_CTL_MAGIC 0x4c544357u /* "WCTL" */
#define CP_WL_CMD_CHECK 1           /* verify own pages against the ledger */
#define CP_WL_CMD_WRITE_LIST 2      /* rewrite the listed data pages (those in own partition) */
#define CP_WL_LIST_MAX 1024
#define CP_WL_ST_STARTING 1
#define CP_WL_ST_FILLING 2
#define CP_WL_ST_RUNNING 3
#define CP_WL_ST_PARKED 4
#define CP_CHECK_OK 1
#define CP_CHECK_BAD 2
/* cp_wl_vcpu_status.vector: ymm15 holds a per-vCPU pattern from the start (where the CPU has AVX) */
#define CP_VEC_UNCHECKED 0 /* no AVX here (or no CHECK yet): nothing kept */
#define CP_VEC_INTACT 1
#define CP_VEC_LOST 2
#define CP_NO_PAGE 0xffffffffffffffffULL

/* ---- MH mailbox control page header (the rest of the page belongs to the helper protocol) ---- */
#define CP_MB_MAGIC 0x58424d43u /* "CMBX" */
#define CP_MH_ST_READY 1

#ifndef __ASSEMBLER__
#include <stdint.h>

/* (v8) One range of the guest-physical map, as a BIOS's e820 table gives it to an OS. */
struct cp_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type; /* CP_E820_RAM or CP_E820_RESERVED */
    uint32_t pad;
};

struct cp_boot_params {
    uint64_t magic;
    uint32_t version;
    uint32_t flags;
    uint64_t ram_bytes;
    uint64_t tsc_khz;
    uint32_t cpu_features;
    uint32_t nr_vcpus; /* the workload's vCPUs only: aux vCPUs are left out */
    uint64_t mmio_console;
    uint64_t mmio_doorbell;
    uint64_t mmio_encstatus;
    uint64_t mmio_fault;
    uint64_t mmio_mailbox;
    uint64_t mh_base;
    uint64_t mh_size;
    uint64_t secret_gpa;
    uint64_t mailbox_gpa;
    uint64_t mailbox_stride;
    uint32_t mh_vcpus;
    uint32_t batch_pages;
    uint64_t wl_base;
    uint64_t wl_size;
    uint64_t wl_ctl_gpa;
    uint64_t wl_stack_gpa;
    uint64_t wl_stack_size;
    uint64_t wl_ledger_gpa;
    uint64_t wl_data_gpa;
    uint64_t wl_data_pages;
    uint32_t wl_kind;
    uint32_t wl_shared_ppm;   /* fraction of pages reported shared, parts per million */
    uint64_t wl_rate_bps;     /* bytes/s; 0 = unlimited */
    uint64_t wl_seed;
    uint32_t cpu_table[CP_MAX_VCPUS]; /* ids of the workload's vCPUs, nr_vcpus of them */
    /* ABI v2: the MH's private state (see CP_MH_CTX_STRIDE) */
    uint64_t mh_shared_gpa;  /* struct cp_mh_shared, zero at boot */
    uint64_t mh_ctx_gpa;     /* MH vCPU i's struct cp_mh_ctx at mh_ctx_gpa + i * mh_ctx_stride */
    uint64_t mh_ctx_stride;
    uint64_t mh_gen_gpa;     /* u32 generation per guest page */
    uint64_t mh_gen_entries; /* = ram_top / CP_PAGE_SIZE (v8) */
    /* ABI v3 */
    uint64_t mh_mac_gpa;     /* CP_MH_MAC_ENTRY bytes (a keyed MAC) per guest page, zero at boot */
    uint64_t mh_mac_entries; /* = ram_top / CP_PAGE_SIZE (v8) */
    /* ABI v4 */
    uint64_t mh_vmsa_gpa;    /* CP_VMSA_SLOT_SIZE bytes per guest vCPU (struct cp_vmsa_slot), zero at boot */
    uint64_t mh_vmsa_slots;  /* = nr_vcpus */
    /* ABI v5 */
    uint64_t wl_conv_rate;   /* pages the workload converts private <-> shared per second; 0 = none */
    /* ABI v6 */
    uint64_t wl_pvclock_gpa; /* one page: struct cp_pvclock per workload vCPU, filled by KVM (kvm-clock) */
    uint64_t timer_count;    /* LAPIC timer initial count (divide by 1, periodic); 0 = no timer */
    /* ABI v8: RAM above 4 GiB */
    uint64_t ram_top;           /* end of the highest RAM range (= ram_bytes without RAM above 4 GiB) */
    uint64_t wl_data_low_pages; /* data pages from wl_data_gpa up to the hole; the rest start at 4 GiB */
    uint32_t e820_count;
    uint32_t e820_pad;
    struct cp_e820_entry e820[CP_E820_MAX]; /* RAM and the reserved hole, by address */
    /* ABI v9: SEV-SNP (CP_BP_FLAG_SNP): the owner's static X25519 public key; the helper opens only a key
     * release its holder wrapped (docs/key-release.md). Zero otherwise. */
    uint8_t owner_key[32];
};

struct cp_wl_vcpu_status {
    uint64_t heartbeat;
    uint32_t state;
    uint32_t ack_seq;
    uint32_t result;
    uint32_t vector;       /* CP_VEC_*: the last CHECK's look at the vector register the workload keeps */
    uint64_t first_bad;    /* data page index, CP_NO_PAGE when none */
    uint64_t pages_written;
    uint64_t checked;      /* pages verified by the last CHECK */
    uint64_t conversions;  /* pages converted private <-> shared since the fill */
    uint64_t ticks;        /* (v6) LAPIC timer interrupts this vCPU took (the CPL0 handler counts) */
    uint64_t clock_ns;     /* (v6) the workload loop's last kvm-clock reading */
    uint64_t max_gap_ns;   /* (v6) largest gap between two readings, less the sleep asked for between */
    uint64_t clock_back;   /* (v6) readings that were earlier than the one before (never, if time is right) */
    uint64_t clock_reads;  /* (v6) readings taken */
};

struct cp_wl_control {
    uint32_t magic;
    uint32_t cmd_seq; /* the VMM writes cmd and args first, then bumps cmd_seq */
    uint32_t cmd;
    uint32_t list_count;
    uint64_t reserved[6];
    struct cp_wl_vcpu_status vcpu[CP_MAX_VCPUS];
    uint64_t list[CP_WL_LIST_MAX]; /* data page indices for CP_WL_CMD_WRITE_LIST */
};

/* Bit 31 of a ledger entry's seq: the workload's own record that the page is shared now (the count of
 * writes is the other 31 bits). */
#define CP_LEDGER_SHARED 0x80000000u

/* (v6) struct pvclock_vcpu_time_info: KVM writes it (MSR_KVM_SYSTEM_TIME_NEW); the guest reads it. */
struct cp_pvclock {
    uint32_t version; /* odd while KVM updates it */
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags;
    uint8_t pad[2];
};

struct cp_ledger_entry {
    uint32_t seq;  /* 0 = never written */
    uint32_t csum; /* cp_page_csum of the page content */
};

/* The head of a VMSA slot (at bp.mh_vmsa_gpa + i * CP_VMSA_SLOT_SIZE); CP_VMSA_DATA_BYTES of state follow. */
struct cp_vmsa_slot {
    uint32_t magic;           /* CP_VMSA_MAGIC once written */
    uint32_t state;           /* CP_VMSA_* */
    uint32_t vcpu;            /* the slot's own index, as sealed */
    uint32_t length;          /* bytes of state in data */
    uint8_t tag[16];          /* GCM tag of the sealed record it came from (or, on the source, went into) */
    uint8_t migration_id[16];
    uint8_t reserved[16];
    uint8_t data[CP_VMSA_DATA_BYTES];
};

struct cp_mailbox_header {
    uint32_t magic;
    uint32_t state;
    uint32_t mh_index;
    uint32_t pad;
    uint64_t heartbeat;
    uint64_t ping; /* the VMM bumps ping and kicks; the helper copies it to pong */
    uint64_t pong;
};
#endif /* __ASSEMBLER__ */
#endif /* CONFPLAN_ABI_H */
