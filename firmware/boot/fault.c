/* CPL0 fault reporting: runs emulated, compiled with -mgeneral-regs-only. */
#include "confplan_abi.h"

/* The stack isr_common leaves: saved registers (last pushed first), then stub and CPU words. */
struct cp_fault_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

void cp_fault_report(const struct cp_fault_frame *f);

static inline void mmio_store(uint64_t off, uint64_t value)
{
    *(volatile uint64_t *)(uintptr_t)(CP_MMIO_FAULT + off) = value;
}

void cp_fault_report(const struct cp_fault_frame *f)
{
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    mmio_store(CP_FAULT_VECTOR, f->vector);
    mmio_store(CP_FAULT_ERROR, f->error);
    mmio_store(CP_FAULT_RIP, f->rip);
    mmio_store(CP_FAULT_CS, f->cs);
    mmio_store(CP_FAULT_RSP, f->rsp);
    mmio_store(CP_FAULT_CR2, cr2);
    mmio_store(CP_FAULT_COMMIT, 1); /* the VMM stops the machine here */
}
