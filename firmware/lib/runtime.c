/* CPL3 services over MMIO doorbells (one exit each) and the encryption-status channel. */
#include "cp_lib.h"

void cp_park_forever(void)
{
    for (;;)
        cp_idle();
}

/* KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs): the real hypercall (via the CPL0 service gate) where the
 * VMM says the host delivers it, else the MMIO doorbell with the same three arguments. */
void cp_map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs)
{
    if (CP_BP->flags & CP_BP_FLAG_ENC_HYPERCALL) {
        uint64_t rax = CP_SVC_MAP_GPA_RANGE;
        __asm__ volatile("int $0x80" : "+a"(rax) : "b"(gpa), "c"(npages), "d"(attrs) : "memory");
        return;
    }
    cp_mmio_store(CP_MMIO_ENCSTATUS + CP_ENC_GPA, gpa);
    cp_mmio_store(CP_MMIO_ENCSTATUS + CP_ENC_NPAGES, npages);
    cp_mmio_store(CP_MMIO_ENCSTATUS + CP_ENC_ATTRS, attrs);
}

/* kvm-clock and the LAPIC timer for this vCPU, set up at CPL0 (wrmsr and the xAPIC page are privileged).
 * The request is a `hlt` with rax = CP_SVC_TIME_INIT: its #GP is the one way into CPL0 that works on
 * kvm_pvm (an `int n` from CPL3 raises #UD there); the #GP handler serves it and returns past the hlt. */
void cp_time_init(uint64_t pvclock_gpa, uint64_t timer_count)
{
    uint64_t rax = CP_SVC_TIME_INIT;
    __asm__ volatile("hlt" : "+a"(rax) : "b"(pvclock_gpa | 1), "d"(timer_count) : "memory");
}

/* Nanoseconds of kvm-clock, read natively at CPL3 as Linux's pvclock_clocksource_read does: the struct's
 * system_time plus the TSC ticks since tsc_timestamp, scaled; retried while KVM updates it (odd or
 * changed version). */
uint64_t cp_clock_ns(const volatile struct cp_pvclock *pv)
{
    uint32_t version;
    uint64_t ns;
    do {
        version = pv->version;
        __asm__ volatile("" ::: "memory");
        uint64_t delta = cp_rdtsc() - pv->tsc_timestamp;
        int8_t shift = pv->tsc_shift;
        delta = shift >= 0 ? delta << shift : delta >> -shift;
        ns = pv->system_time + (uint64_t)(((unsigned __int128)delta * pv->tsc_to_system_mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != pv->version);
    return ns;
}

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}
