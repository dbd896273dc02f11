/*
 * RDRAND for the firmware: the helper's only entropy source (its ephemeral X25519 key). Intel's guidance
 * (DRNG software implementation guide, 5.2.1): a failure (CF = 0) is transient, so retry up to 10 times per
 * word; ten failures in a row mean the DRNG is broken, and the caller must refuse rather than go on with a
 * guessable key. Inline asm (no -mrdrnd), so only this file needs the instruction; RDRAND runs at CPL3.
 */
#include "cp_kx.h"

#define RDRAND_RETRIES 10

static int rdrand64(uint64_t *v)
{
    for (int i = 0; i < RDRAND_RETRIES; i++) {
        uint8_t ok;
        __asm__ volatile("rdrand %0; setc %1" : "=r"(*v), "=qm"(ok) : : "cc");
        if (ok)
            return 1;
    }
    return 0;
}

int cp_rdrand_bytes(uint8_t *out, size_t n)
{
    volatile uint8_t *dst = out;
    uint64_t v = 0;
    for (size_t at = 0; at < n; at += 8) {
        if (!rdrand64(&v)) {
            for (size_t i = 0; i < n; i++)
                dst[i] = 0;
            return 0;
        }
        for (size_t i = 0; i < 8 && at + i < n; i++, v >>= 8)
            dst[at + i] = (uint8_t)v;
    }
    v = 0;
    __asm__ volatile("" : : "r"(v) : "memory"); /* the last word is not left in a dead local */
    return 1;
}
