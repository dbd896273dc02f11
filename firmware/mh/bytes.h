/*
 * Byte helpers of the migration helper: little/big-endian loads and stores of unaligned bytes, and copies
 * and wipes. Freestanding (no libc): copies and wipes are `rep movsb/stosb` with a memory clobber, so the
 * compiler can neither turn them into memcpy/memset calls nor drop a wipe of a buffer it considers dead.
 */
#ifndef CP_MH_BYTES_H
#define CP_MH_BYTES_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t cp_mh_load_le(const uint8_t *p, unsigned bytes)
{
    uint64_t v = 0;
    for (unsigned i = bytes; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

static inline void cp_mh_store_le(uint8_t *p, uint64_t v, unsigned bytes)
{
    for (unsigned i = 0; i < bytes; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static inline uint32_t cp_mh_load_le32(const uint8_t *p)
{
    return (uint32_t)cp_mh_load_le(p, 4);
}

static inline uint64_t cp_mh_load_le64(const uint8_t *p)
{
    return cp_mh_load_le(p, 8);
}

static inline void cp_mh_store_le32(uint8_t *p, uint32_t v)
{
    cp_mh_store_le(p, v, 4);
}

static inline void cp_mh_store_le64(uint8_t *p, uint64_t v)
{
    cp_mh_store_le(p, v, 8);
}

/* 16 bytes (a MAC-table entry) as two 64-bit words, unaligned and aliasing anything: per-page table work
 * without a `rep movsb` start-up (~25 cycles) per entry. Returns whether any byte was non-zero. */
typedef uint64_t __attribute__((may_alias, aligned(1))) cp_mh_u64u;

static inline int cp_mh_copy16(uint8_t *dst, const uint8_t *src)
{
    uint64_t a = ((const cp_mh_u64u *)src)[0], b = ((const cp_mh_u64u *)src)[1];
    ((cp_mh_u64u *)dst)[0] = a;
    ((cp_mh_u64u *)dst)[1] = b;
    return (a | b) != 0;
}

static inline void cp_mh_store_be64(uint8_t *p, uint64_t v)
{
    for (unsigned i = 8; i-- > 0; v >>= 8)
        p[i] = (uint8_t)v;
}

static inline void cp_mh_copy(void *dst, const void *src, size_t n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static inline void cp_mh_wipe(void *dst, size_t n)
{
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(0) : "memory");
}

#endif /* CP_MH_BYTES_H */
