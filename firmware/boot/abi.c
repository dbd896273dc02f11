/* Exports the ABI header as absolute ELF symbols (ABI_*), so the VMM's mirror of it is checked against
 * the firmware that was actually built (tests/test_firmware_abi.py reads them from confplan-fw.sym).
 * The function is never called; only its asm directives matter. */
#include <stddef.h>

#include "confplan_abi.h"

/* In three pieces: the asm operand printer only takes immediates that fit a signed 32-bit field. */
#define SYM(name, value)                                                                        \
    __asm__ volatile(".globl ABI_" #name "\n\t.set ABI_" #name ", (%c0 << 32) | (%c1 << 16) | %c2" \
                     ::"i"((unsigned long)(value) >> 32), "i"(((unsigned long)(value) >> 16) & 0xffff), \
                     "i"((unsigned long)(value) & 0xffff))
#define OFF(prefix, type, field) SYM(prefix##_##field, offsetof(struct type, field))

void cp_abi_export(void);

/* The CPL0 timer handler (isr.S) addresses these fields by the header's numbers. */
_Static_assert(offsetof(struct cp_boot_params, wl_ctl_gpa) == CP_BP_WL_CTL_OFF, "CP_BP_WL_CTL_OFF");
_Static_assert(offsetof(struct cp_wl_control, vcpu) == CP_WLCTL_VCPU_OFF, "CP_WLCTL_VCPU_OFF");
_Static_assert(offsetof(struct cp_wl_vcpu_status, ticks) == CP_WLST_TICKS_OFF, "CP_WLST_TICKS_OFF");
_Static_assert(sizeof(struct cp_wl_vcpu_status) == CP_WLST_SIZE, "CP_WLST_SIZE");
_Static_assert(sizeof(struct cp_pvclock) == CP_PVCLOCK_SIZE, "CP_PVCLOCK_SIZE");

void cp_abi_export(void)
{
    SYM(version, CP_ABI_VERSION);
    SYM(gdt_gpa, CP_GDT_GPA);
    SYM(idt_gpa, CP_IDT_GPA);
    SYM(tss_gpa, CP_TSS_GPA);
    SYM(tss_stride, CP_TSS_STRIDE);
    SYM(boot_params_gpa, CP_BOOT_PARAMS_GPA);
    SYM(pt_wl_gpa, CP_PT_WL_GPA);
    SYM(pt_mh_gpa, CP_PT_MH_GPA);
    SYM(pt_set_size, CP_PT_SET_SIZE);
    SYM(kstack_gpa, CP_KSTACK_GPA);
    SYM(kstack_size, CP_KSTACK_SIZE);
    SYM(max_vcpus, CP_MAX_VCPUS);
    SYM(fw_base, CP_FW_BASE);
    SYM(mh_base, CP_MH_BASE);
    SYM(mh_image_size, CP_MH_IMAGE_SIZE);
    SYM(mh_stacks_gpa, CP_MH_STACKS_GPA);
    SYM(mh_stack_size, CP_MH_STACK_SIZE);
    SYM(max_mh_vcpus, CP_MAX_MH_VCPUS);
    SYM(secret_gpa, CP_SECRET_GPA);
    SYM(mailbox_gpa, CP_MAILBOX_GPA);
    SYM(mailbox_slot_tag, CP_MAILBOX_SLOT_TAG);
    SYM(mh_ctx_stride, CP_MH_CTX_STRIDE);
    SYM(mh_gen_entry, CP_MH_GEN_ENTRY);
    SYM(mh_mac_entry, CP_MH_MAC_ENTRY);
    SYM(vmsa_slot_size, CP_VMSA_SLOT_SIZE);
    SYM(vmsa_slot_header, CP_VMSA_SLOT_HEADER);
    SYM(vmsa_magic, CP_VMSA_MAGIC);
    SYM(vmsa_empty, CP_VMSA_EMPTY);
    SYM(vmsa_sealed, CP_VMSA_SEALED);
    SYM(vmsa_opened, CP_VMSA_OPENED);
    SYM(vmsa_verified, CP_VMSA_VERIFIED);
    SYM(mmio_base, CP_MMIO_BASE);
    SYM(mmio_size, CP_MMIO_SIZE);
    SYM(ram_hole_start, CP_RAM_HOLE_START);
    SYM(ram_hole_end, CP_RAM_HOLE_END);
    SYM(max_ram_top, CP_MAX_RAM_TOP);
    SYM(e820_max, CP_E820_MAX);
    SYM(e820_ram, CP_E820_RAM);
    SYM(e820_reserved, CP_E820_RESERVED);
    SYM(mmio_console, CP_MMIO_CONSOLE);
    SYM(mmio_doorbell, CP_MMIO_DOORBELL);
    SYM(mmio_encstatus, CP_MMIO_ENCSTATUS);
    SYM(mmio_fault, CP_MMIO_FAULT);
    SYM(mmio_mailbox, CP_MMIO_MAILBOX);
    SYM(db_idle, CP_DB_IDLE);
    SYM(db_sleep_ns, CP_DB_SLEEP_NS);
    SYM(db_event, CP_DB_EVENT);
    SYM(ev_wl_started, CP_EV_WL_STARTED);
    SYM(ev_wl_filled, CP_EV_WL_FILLED);
    SYM(ev_wl_cmd_done, CP_EV_WL_CMD_DONE);
    SYM(ev_mh_ready, CP_EV_MH_READY);
    SYM(enc_gpa, CP_ENC_GPA);
    SYM(enc_npages, CP_ENC_NPAGES);
    SYM(enc_attrs, CP_ENC_ATTRS);
    SYM(map_gpa_range_encrypted, CP_MAP_GPA_RANGE_ENCRYPTED);
    SYM(fault_vector, CP_FAULT_VECTOR);
    SYM(fault_error, CP_FAULT_ERROR);
    SYM(fault_rip, CP_FAULT_RIP);
    SYM(fault_cs, CP_FAULT_CS);
    SYM(fault_rsp, CP_FAULT_RSP);
    SYM(fault_cr2, CP_FAULT_CR2);
    SYM(fault_commit, CP_FAULT_COMMIT);
    SYM(svc_vector, CP_SVC_VECTOR);
    SYM(flag_mh_only, CP_BP_FLAG_MH_ONLY);
    SYM(flag_enc_hypercall, CP_BP_FLAG_ENC_HYPERCALL);
    SYM(flag_vendor_amd, CP_BP_FLAG_VENDOR_AMD);
    SYM(flag_snp, CP_BP_FLAG_SNP);
    SYM(feat_ssse3, CP_FEAT_SSSE3);
    SYM(feat_sse41, CP_FEAT_SSE41);
    SYM(feat_aesni, CP_FEAT_AESNI);
    SYM(feat_pclmulqdq, CP_FEAT_PCLMULQDQ);
    SYM(feat_avx, CP_FEAT_AVX);
    SYM(feat_avx2, CP_FEAT_AVX2);
    SYM(feat_vaes, CP_FEAT_VAES);
    SYM(feat_vpclmulqdq, CP_FEAT_VPCLMULQDQ);
    SYM(feat_avx512f, CP_FEAT_AVX512F);
    SYM(feat_avx512bw, CP_FEAT_AVX512BW);
    SYM(feat_avx512vl, CP_FEAT_AVX512VL);
    SYM(feat_rdrand, CP_FEAT_RDRAND);
    SYM(wl_ctl_magic, CP_WL_CTL_MAGIC);
    SYM(wl_cmd_check, CP_WL_CMD_CHECK);
    SYM(wl_cmd_write_list, CP_WL_CMD_WRITE_LIST);
    SYM(wl_list_max, CP_WL_LIST_MAX);
    SYM(mailbox_magic, CP_MB_MAGIC);
    SYM(svc_time_init, CP_SVC_TIME_INIT);
    SYM(lapic_gpa, CP_LAPIC_GPA);
    SYM(timer_vector, CP_TIMER_VECTOR);
    SYM(spurious_vector, CP_SPURIOUS_VECTOR);
    SYM(msr_kvm_system_time_new, CP_MSR_KVM_SYSTEM_TIME_NEW);
    SYM(pvclock_size, CP_PVCLOCK_SIZE);

    SYM(bp_size, sizeof(struct cp_boot_params));
    OFF(bp, cp_boot_params, magic);
    OFF(bp, cp_boot_params, version);
    OFF(bp, cp_boot_params, flags);
    OFF(bp, cp_boot_params, ram_bytes);
    OFF(bp, cp_boot_params, tsc_khz);
    OFF(bp, cp_boot_params, cpu_features);
    OFF(bp, cp_boot_params, nr_vcpus);
    OFF(bp, cp_boot_params, mmio_console);
    OFF(bp, cp_boot_params, mmio_doorbell);
    OFF(bp, cp_boot_params, mmio_encstatus);
    OFF(bp, cp_boot_params, mmio_fault);
    OFF(bp, cp_boot_params, mmio_mailbox);
    OFF(bp, cp_boot_params, mh_base);
    OFF(bp, cp_boot_params, mh_size);
    OFF(bp, cp_boot_params, secret_gpa);
    OFF(bp, cp_boot_params, mailbox_gpa);
    OFF(bp, cp_boot_params, mailbox_stride);
    OFF(bp, cp_boot_params, mh_vcpus);
    OFF(bp, cp_boot_params, batch_pages);
    OFF(bp, cp_boot_params, wl_base);
    OFF(bp, cp_boot_params, wl_size);
    OFF(bp, cp_boot_params, wl_ctl_gpa);
    OFF(bp, cp_boot_params, wl_stack_gpa);
    OFF(bp, cp_boot_params, wl_stack_size);
    OFF(bp, cp_boot_params, wl_ledger_gpa);
    OFF(bp, cp_boot_params, wl_data_gpa);
    OFF(bp, cp_boot_params, wl_data_pages);
    OFF(bp, cp_boot_params, wl_kind);
    OFF(bp, cp_boot_params, wl_shared_ppm);
    OFF(bp, cp_boot_params, wl_rate_bps);
    OFF(bp, cp_boot_params, wl_seed);
    OFF(bp, cp_boot_params, cpu_table);
    OFF(bp, cp_boot_params, mh_shared_gpa);
    OFF(bp, cp_boot_params, mh_ctx_gpa);
    OFF(bp, cp_boot_params, mh_ctx_stride);
    OFF(bp, cp_boot_params, mh_gen_gpa);
    OFF(bp, cp_boot_params, mh_gen_entries);
    OFF(bp, cp_boot_params, mh_mac_gpa);
    OFF(bp, cp_boot_params, mh_mac_entries);
    OFF(bp, cp_boot_params, mh_vmsa_gpa);
    OFF(bp, cp_boot_params, mh_vmsa_slots);
    OFF(bp, cp_boot_params, wl_conv_rate);
    OFF(bp, cp_boot_params, wl_pvclock_gpa);
    OFF(bp, cp_boot_params, ram_top);
    OFF(bp, cp_boot_params, wl_data_low_pages);
    OFF(bp, cp_boot_params, e820_count);
    OFF(bp, cp_boot_params, e820);
    OFF(bp, cp_boot_params, timer_count);

    SYM(wlst_size, sizeof(struct cp_wl_vcpu_status));
    OFF(wlst, cp_wl_vcpu_status, heartbeat);
    OFF(wlst, cp_wl_vcpu_status, state);
    OFF(wlst, cp_wl_vcpu_status, ack_seq);
    OFF(wlst, cp_wl_vcpu_status, result);
    OFF(wlst, cp_wl_vcpu_status, first_bad);
    OFF(wlst, cp_wl_vcpu_status, pages_written);
    OFF(wlst, cp_wl_vcpu_status, checked);
    OFF(wlst, cp_wl_vcpu_status, conversions);
    OFF(wlst, cp_wl_vcpu_status, ticks);
    OFF(wlst, cp_wl_vcpu_status, clock_ns);
    OFF(wlst, cp_wl_vcpu_status, max_gap_ns);
    OFF(wlst, cp_wl_vcpu_status, clock_back);
    OFF(wlst, cp_wl_vcpu_status, clock_reads);

    SYM(wlctl_size, sizeof(struct cp_wl_control));
    OFF(wlctl, cp_wl_control, magic);
    OFF(wlctl, cp_wl_control, cmd_seq);
    OFF(wlctl, cp_wl_control, cmd);
    OFF(wlctl, cp_wl_control, list_count);
    OFF(wlctl, cp_wl_control, vcpu);
    OFF(wlctl, cp_wl_control, list);

    SYM(vslot_size, sizeof(struct cp_vmsa_slot));
    OFF(vslot, cp_vmsa_slot, magic);
    OFF(vslot, cp_vmsa_slot, state);
    OFF(vslot, cp_vmsa_slot, vcpu);
    OFF(vslot, cp_vmsa_slot, length);
    OFF(vslot, cp_vmsa_slot, tag);
    OFF(vslot, cp_vmsa_slot, migration_id);
    OFF(vslot, cp_vmsa_slot, reserved);
    OFF(vslot, cp_vmsa_slot, data);

    SYM(mb_size, sizeof(struct cp_mailbox_header));
    OFF(mb, cp_mailbox_header, magic);
    OFF(mb, cp_mailbox_header, state);
    OFF(mb, cp_mailbox_header, mh_index);
    OFF(mb, cp_mailbox_header, heartbeat);
    OFF(mb, cp_mailbox_header, ping);
    OFF(mb, cp_mailbox_header, pong);
}
