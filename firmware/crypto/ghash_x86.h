/*
 * GHASH in the reflected domain with PCLMULQDQ (Gueron and Kounavis, "Intel Carry-Less Multiplication
 * Instruction and its Usage for Computing the GCM Mode"), shared by the x86 implementations (gcm_aesni.c,
 * gcm_vaes.c, gcm_vaes512.c): blocks byte-reversed, products summed unreduced, one reduction per group.
 * Include only from files compiled with SSE4.1 + PCLMULQDQ (CRYPTO_CFLAGS).
 */
#ifndef CP_GHASH_X86_H
#define CP_GHASH_X86_H

#include <emmintrin.h>
#include <immintrin.h>
#include <smmintrin.h>
#include <tmmintrin.h>
#include <wmmintrin.h>

#include "cp_gcm_internal.h"

static inline __m128i load16(const uint8_t *p)
{
    return _mm_loadu_si128((const __m128i *)(const void *)p);
}

static inline void store16(uint8_t *p, __m128i v)
{
    _mm_storeu_si128((__m128i *)(void *)p, v);
}

/* Reverses byte order: GCM's bit order becomes a bit-reflected 128-bit integer. */
static inline __m128i byte_reverse(__m128i v)
{
    const __m128i rev = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm_shuffle_epi8(v, rev);
}

/* An unreduced 256-bit carry-less product, kept as low, high and middle (cross) terms. */
typedef struct {
    __m128i lo, hi, mid;
} clmul_acc;

static inline void clmul_add(clmul_acc *acc, __m128i a, __m128i b)
{
    acc->lo = _mm_xor_si128(acc->lo, _mm_clmulepi64_si128(a, b, 0x00));
    acc->hi = _mm_xor_si128(acc->hi, _mm_clmulepi64_si128(a, b, 0x11));
    acc->mid = _mm_xor_si128(acc->mid, _mm_clmulepi64_si128(a, b, 0x01));
    acc->mid = _mm_xor_si128(acc->mid, _mm_clmulepi64_si128(a, b, 0x10));
}

/* v << 63 ^ v << 62 ^ v << 57 per 64-bit lane (x^127, x^126, x^121 terms); callers move lanes across. */
static inline __m128i lanes_shl_63_62_57(__m128i v)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_slli_epi64(v, 63), _mm_slli_epi64(v, 62)), _mm_slli_epi64(v, 57));
}

/*
 * Folds the product back into GF(2^128) modulo x^128 + x^7 + x^2 + x + 1 (reflected domain). The product
 * of two reflected operands is off by one bit, hence the shift left by one first.
 */
static inline __m128i reduce(clmul_acc acc)
{
    __m128i lo = _mm_xor_si128(acc.lo, _mm_slli_si128(acc.mid, 8));
    __m128i hi = _mm_xor_si128(acc.hi, _mm_srli_si128(acc.mid, 8));

    __m128i carry_lo = _mm_srli_epi64(lo, 63);
    __m128i carry_hi = _mm_srli_epi64(hi, 63);
    lo = _mm_or_si128(_mm_slli_epi64(lo, 1), _mm_slli_si128(carry_lo, 8));
    hi = _mm_or_si128(_mm_or_si128(_mm_slli_epi64(hi, 1), _mm_slli_si128(carry_hi, 8)),
                      _mm_srli_si128(carry_lo, 8));

    /* First phase: fold the lowest 64 bits into the next 64. */
    lo = _mm_xor_si128(lo, _mm_slli_si128(lanes_shl_63_62_57(lo), 8));
    /* Second phase: [D:X0] >> 1, >> 2, >> 7 as 128-bit shifts, xored with [D:X0], then into hi. */
    __m128i shifted = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(lo, 1), _mm_srli_epi64(lo, 2)),
                                    _mm_srli_epi64(lo, 7));
    shifted = _mm_xor_si128(shifted, _mm_srli_si128(lanes_shl_63_62_57(lo), 8));
    return _mm_xor_si128(hi, _mm_xor_si128(lo, shifted));
}

static inline __m128i gf_mul(__m128i a, __m128i b)
{
    clmul_acc acc = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    clmul_add(&acc, a, b);
    return reduce(acc);
}

#endif /* CP_GHASH_X86_H */
