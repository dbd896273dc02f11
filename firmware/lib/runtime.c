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
