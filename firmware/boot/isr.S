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

/* int 0x80 from CPL3: rax = service, rbx/rcx/rdx = arguments (the KVM hypercall registers). A KVM
 * hypercall must come from CPL0, so this is where the guest's KVM_HC_MAP_GPA_RANGE is issued. */
svc_entry:
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
