/*
 * TEST BUILDS ONLY (never the firmware): the AVX-512 intrinsics gcm_vaes512.c uses, from SIMDe
 * (SIMD Everywhere, Debian libsimde-dev: portable C, https://github.com/simd-everywhere/simde), so the
 * 512-bit path's logic runs on a CPU without AVX-512 (make -C firmware/crypto lib-emu512 / test_gcm_emu512).
 * What this proves: the path's algorithm (lanes, H powers, counters, tails, reductions) against NIST and
 * OpenSSL. What it cannot: that the CPU's own AVX-512 instructions, as gcc emits them, behave the same
 * (they are specified to; only a CPU with AVX-512 runs them, where the native tests do).
 *
 * SIMDe 0.7.4 lacks five of them (and the alias of a sixth); they are built here from its 128-bit lanes or
 * bytes: the AES rounds on each lane with the host's AES-NI, the dword shuffle on each lane, the
 * zero-extension, the zero-masked byte load.
 */
#ifndef CP_EMUL512_H
#define CP_EMUL512_H

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/clmul.h>

static inline simde__m512i cp_emu_aes_lanes(simde__m512i a, simde__m512i k, int last)
{
    simde__m512i_private r = simde__m512i_to_private(a), rk = simde__m512i_to_private(k);
    for (int i = 0; i < 4; i++)
        r.m128i[i] = last ? _mm_aesenclast_si128(r.m128i[i], rk.m128i[i])
                          : _mm_aesenc_si128(r.m128i[i], rk.m128i[i]);
    return simde__m512i_from_private(r);
}

static inline simde__m512i cp_emu_shuffle_lanes(simde__m512i a, int imm)
{
    simde__m512i_private r = simde__m512i_to_private(a), in = r;
    for (int i = 0; i < 4; i++)
        for (int d = 0; d < 4; d++)
            r.m128i_private[i].i32[d] = in.m128i_private[i].i32[(imm >> (2 * d)) & 3];
    return simde__m512i_from_private(r);
}

static inline simde__m512i cp_emu_zext128(simde__m128i a)
{
    simde__m512i_private r = simde__m512i_to_private(simde_mm512_setzero_si512());
    r.m128i[0] = a;
    return simde__m512i_from_private(r);
}

/* Bytes whose mask bit is clear are not read (as the instruction guarantees), and read as zero. */
static inline simde__m512i cp_emu_maskz_loadu_epi8(uint64_t mask, const void *p)
{
    uint8_t bytes[64];
    for (int i = 0; i < 64; i++)
        bytes[i] = (mask >> i & 1u) ? ((const uint8_t *)p)[i] : 0;
    return simde_mm512_loadu_si512(bytes);
}

#define _mm512_aesenc_epi128(a, k) cp_emu_aes_lanes((a), (k), 0)
#define _mm512_aesenclast_epi128(a, k) cp_emu_aes_lanes((a), (k), 1)
#define _mm512_shuffle_epi32(a, imm) cp_emu_shuffle_lanes((a), (int)(imm))
#define _mm512_zextsi128_si512(a) cp_emu_zext128(a)
#define _mm512_maskz_loadu_epi8(k, p) cp_emu_maskz_loadu_epi8((k), (p))
#define _mm512_shuffle_i64x2(a, b, imm) simde_mm512_shuffle_i64x2((a), (b), (imm)) /* SIMDe has no alias */

#endif
