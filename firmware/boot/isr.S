/* CPL0 entry points: 256 exception stubs (16 bytes apart, so the VMM computes each IDT gate as
 * isr_stubs + 16 * vector) and the int 0x80 service gate. This code runs emulated on kvm_pvm and must
 * not touch SSE registers. */
#include "confplan_abi.h"

#define BP_FLAGS (CP_BOOT_PARAMS_GPA + 12)

        .section .boot.text, "ax"
        .code64
        .globl isr_stubs
        .globl isr_stubs_end
        .balign 16
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if vec == CP_SVC_VECTOR
        jmp svc_entry
        .elseif vec == 13
        jmp gp_entry
        .elseif vec == CP_TIMER_VECTOR
        jmp timer_entry
        .elseif vec == CP_SPURIOUS_VECTOR
        iretq /* a spurious interrupt: nothing to acknowledge */
        .else
        /* vectors where the CPU pushes an error code */
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .endif
        .set vec, vec + 1
        .endr
        .balign 16
isr_stubs_end:

/* Every exception is fatal: report it to the VMM, then stop this vCPU. */
isr_common:
        pushq %rax
        pushq %rbx
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %rbp
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        movq %rsp, %rdi
        call cp_fault_report
1:      cli
        hlt
        jmp 1b

/* The LAPIC timer (periodic, CP_TIMER_VECTOR): count the tick in this vCPU's workload status, EOI,
 * return. Ten instructions, emulated on kvm_pvm: at 100 Hz that is ~1000 emulated instructions a second.
 * Only workload vCPUs program a timer, and their CPL0 stack slot is their index (TSS RSP0). */
timer_entry:
        pushq %rax
        pushq %rdx
        movq %rsp, %rax
        subq $CP_KSTACK_GPA, %rax
        shrq $12, %rax                  /* CP_KSTACK_SIZE = 4 KiB: the vCPU index */
        imulq $CP_WLST_SIZE, %rax
        addq CP_BOOT_PARAMS_GPA + CP_BP_WL_CTL_OFF, %rax
        incq CP_WLCTL_VCPU_OFF + CP_WLST_TICKS_OFF(%rax)
        movl $CP_LAPIC_GPA + CP_LAPIC_EOI, %edx
        movl $0, (%rdx)
        popq %rdx
        popq %rax
        iretq

/* #GP. kvm_pvm raises #UD for `int n` from CPL3 (measured), so the time service is asked for the way
 * port I/O and HLT reach CPL0 here: a CPL3 `hlt` (#GP) with rax = CP_SVC_TIME_INIT. Anything else is a
 * fault like every other. Frame: error code, RIP, CS, RFLAGS, RSP, SS. */
gp_entry:
        cmpq $CP_SVC_TIME_INIT, %rax
        jne 1f
        testb $3, 16(%rsp)              /* from CPL3 */
        jz 1f
        pushq %rdx
        movq 16(%rsp), %rdx             /* the faulting RIP */
        cmpb $0xF4, (%rdx)              /* hlt */
        popq %rdx
        jne 1f
        addq $1, 8(%rsp)                /* resume after the hlt */
        addq $8, %rsp                   /* drop the error code */
        jmp svc_time_init
1:      pushq $13
        jmp isr_common

/* CP_SVC_TIME_INIT: what a Linux guest does at boot, per vCPU: kvm-clock on (MSR_KVM_SYSTEM_TIME_NEW =
 * rbx, the pvclock GPA | 1: KVM keeps the struct there up to date), then, if rdx (the initial count) is
 * not 0, the xAPIC on and its timer periodic at CP_TIMER_VECTOR. */
svc_time_init:
        pushq %rcx
        pushq %rsi
        movq %rdx, %rsi
        movl $CP_MSR_KVM_SYSTEM_TIME_NEW, %ecx
        movq %rbx, %rax
        movq %rbx, %rdx
        shrq $32, %rdx
        wrmsr
        testq %rsi, %rsi
        jz 1f
        movl $CP_LAPIC_GPA, %ecx
        movl $(0x100 | CP_SPURIOUS_VECTOR), CP_LAPIC_SVR(%rcx)
        movl $0xB, CP_LAPIC_TIMER_DCR(%rcx)
        movl $(CP_LAPIC_TIMER_PERIODIC | CP_TIMER_VECTOR), CP_LAPIC_LVT_TIMER(%rcx)
        movl %esi, CP_LAPIC_TIMER_ICR(%rcx)
1:      popq %rsi
        popq %rcx
        xorl %eax, %eax
        iretq

/* int 0x80 from CPL3: rax = service, rbx/rcx/rdx = arguments (the KVM hypercall registers). A KVM
 * hypercall must come from CPL0, so this is where the guest's KVM_HC_MAP_GPA_RANGE is issued. */
svc_entry:
        cmpq $CP_SVC_TIME_INIT, %rax
        je svc_time_init
        cmpq $CP_SVC_MAP_GPA_RANGE, %rax
        jne 3f
        movl $CP_KVM_HC_MAP_GPA_RANGE, %eax
        testl $CP_BP_FLAG_VENDOR_AMD, BP_FLAGS
        jz 2f
        vmmcall
        iretq
2:      vmcall
        iretq
3:      movq $-1, %rax
        iretq

        .section .note.GNU-stack, "", @progbits
