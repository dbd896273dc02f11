/*
 * AES-256-GCM on 512-bit registers: VAES + VPCLMULQDQ with AVX-512F/BW/VL (CP_GCM_IMPL_VAES512).
 *
 * The same design as gcm_vaes.c (read that first) with four blocks per register: a chunk of 16 blocks is 4
 * zmm registers, hashed as 4 quads times (H^16..H^13)..(H^4..H^1) with one reduction per chunk. Picked only
 * when the VMM's feature word says the CPU has AVX-512F/BW/VL, VAES and VPCLMULQDQ and XCR0 enables the
 * opmask, ZMM_Hi256 and Hi16_ZMM states (cp_gcm_pick_impl). Its instructions never ran on the machines this
 * was written on (AMD EPYC without AVX-512); its logic does, in the tests, with the intrinsics from SIMDe
 * (CP_EMULATE_AVX512, emul512.h): docs/crypto.md, "Tests".
 */
#include "ghash_x86.h"

#ifdef CP_EMULATE_AVX512 /* test builds only: the intrinsics from SIMDe on any AVX2 CPU (emul512.h) */
#include "emul512.h"
#define CP_VAES_TARGET
#else
#define CP_VAES_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))
#endif
#define VAES_FN(name) cp_vaes512_##name
#define CHUNK 256u /* bytes per fused step: 16 blocks */
#define VREGS 4    /* zmm registers per chunk */

/* Per-call expanded state: round keys broadcast to all lanes, and the H-power quad for each zmm of a chunk. */
struct vkeys {
    __m512i rk[15];
    __m512i hp[VREGS]; /* hp[j] lanes = H^(16-4j)..H^(13-4j): block 4j of a chunk is 16-4j from the end */
    __m512i hk[VREGS]; /* Karatsuba: each lane's high and low halves of hp[j] xored (in both halves) */
    __m512i ctrs;      /* the next four counter blocks, counter little-endian in dword 3 of each lane */
};

CP_VAES_TARGET static inline __m512i load64(const uint8_t *p)
{
    return _mm512_loadu_si512((const void *)p);
}

CP_VAES_TARGET static inline void store64(uint8_t *p, __m512i v)
{
    _mm512_storeu_si512((void *)p, v);
}

CP_VAES_TARGET static inline __m512i rev64(__m512i v)
{
    const __m512i rev =
        _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_shuffle_epi8(v, rev);
}

CP_VAES_TARGET static void vkeys_init(struct vkeys *k, const cp_gcm_ctx *ctx)
{
    for (int i = 0; i < 15; i++)
        k->rk[i] = _mm512_broadcast_i32x4(load16(ctx->round_keys[i]));
    for (int j = 0; j < VREGS; j++) { /* memory order is H^(13-4j)..H^(16-4j): reverse the four lanes */
        __m512i q = load64(ctx->h_powers[12 - 4 * j]);
        k->hp[j] = _mm512_shuffle_i64x2(q, q, 0x1b);
    }
    for (int j = 0; j < VREGS; j++)
        k->hk[j] = _mm512_xor_si512(k->hp[j], _mm512_shuffle_epi32(k->hp[j], 0x4e));
    k->ctrs = _mm512_setzero_si512();
}

/* Counters are kept little-endian in dword 3 so a plain add steps them (inc32 wraps mod 2^32 like the add);
 * one shuffle per block makes them GCM's big-endian counter blocks. first_ctr is the counter of block 0. */
CP_VAES_TARGET static void vkeys_counters(struct vkeys *k, const uint8_t j0[16], uint32_t first_ctr)
{
    const __m128i swap_ctr = _mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m128i c = _mm_insert_epi32(_mm_shuffle_epi8(load16(j0), swap_ctr), (int)first_ctr, 3);
    k->ctrs = _mm512_add_epi32(_mm512_broadcast_i32x4(c),
                               _mm512_set_epi32(3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0));
}

/* 16 counter blocks through rounds 0..13 (the last round is the caller's, fused with its xor). */
CP_VAES_TARGET static inline void aes_rounds(struct vkeys *k, __m512i b[VREGS])
{
    const __m512i swap = _mm512_broadcast_i32x4(_mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const __m512i step = _mm512_set_epi32(4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0);
#pragma GCC unroll 4
    for (int i = 0; i < VREGS; i++) {
        b[i] = _mm512_xor_si512(_mm512_shuffle_epi8(k->ctrs, swap), k->rk[0]);
        k->ctrs = _mm512_add_epi32(k->ctrs, step);
    }
    for (int r = 1; r < 14; r++) {
#pragma GCC unroll 4
        for (int i = 0; i < VREGS; i++)
            b[i] = _mm512_aesenc_epi128(b[i], k->rk[r]);
    }
}

/* Unreduced sum of products (Karatsuba terms), four blocks per register. */
struct vacc {
    __m512i lo, hi, mid;
};

/* Karatsuba: lo = a0 b0, hi = a1 b1, and (a0 ^ a1)(b0 ^ b1) summed as is; the true middle term is that
 * sum xor lo xor hi, which vreduce takes once per chunk (all three are sums, and xor is linear). Three
 * carry-less multiplies per block instead of four: VPCLMULQDQ throughput bounds GHASH here. */
CP_VAES_TARGET static inline void vmul_add(struct vacc *a, __m512i x, __m512i h, __m512i hk)
{
    a->lo = _mm512_xor_si512(a->lo, _mm512_clmulepi64_epi128(x, h, 0x00));
    a->hi = _mm512_xor_si512(a->hi, _mm512_clmulepi64_epi128(x, h, 0x11));
    a->mid = _mm512_xor_si512(a->mid, _mm512_clmulepi64_epi128(_mm512_xor_si512(x, _mm512_shuffle_epi32(x, 0x4e)), hk, 0x00));
}

/* The four 128-bit lanes xored into one. */
CP_VAES_TARGET static inline __m128i fold4(__m512i v)
{
    __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

CP_VAES_TARGET static inline __m128i vreduce(struct vacc a)
{
    a.mid = _mm512_xor_si512(a.mid, _mm512_xor_si512(a.lo, a.hi));
    clmul_acc c = {fold4(a.lo), fold4(a.hi), fold4(a.mid)};
    return reduce(c);
}

/* Block quad j of a chunk (GCM byte order) into the accumulator; pair 0 carries the running Y. */
CP_VAES_TARGET static inline void absorb_pair(struct vacc *a, const struct vkeys *k, int j, __m512i c,
                                              __m128i y)
{
    __m512i x = rev64(c);
    if (j == 0)
        x = _mm512_xor_si512(x, _mm512_zextsi128_si512(y));
    vmul_add(a, x, k->hp[j], k->hk[j]);
}

/* GHASH over whole chunks in memory (AAD, or ciphertext already authenticated-to-be). */
CP_VAES_TARGET static __m128i ghash_chunks(const struct vkeys *k, __m128i y, const uint8_t *p, size_t n)
{
    for (; n > 0; n--, p += CHUNK) {
        struct vacc a = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++)
            absorb_pair(&a, k, j, load64(p + 64 * j), y);
        y = vreduce(a);
    }
    return y;
}

CP_VAES_TARGET static __m128i seal_chunks(struct vkeys *k, __m128i y, const uint8_t *in, uint8_t *out, size_t n)
{
    for (; n > 0; n--, in += CHUNK, out += CHUNK) {
        __m512i b[VREGS];
        struct vacc a = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        aes_rounds(k, b);
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++) {
            __m512i c = _mm512_xor_si512(_mm512_aesenclast_epi128(b[j], k->rk[14]), load64(in + 64 * j));
            store64(out + 64 * j, c);
            absorb_pair(&a, k, j, c, y);
        }
        y = vreduce(a);
    }
    return y;
}

CP_VAES_TARGET static __m128i open_chunks(struct vkeys *k, __m128i y, const uint8_t *in, uint8_t *out, size_t n)
{
    for (; n > 0; n--, in += CHUNK, out += CHUNK) {
        __m512i b[VREGS];
        struct vacc a = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        aes_rounds(k, b);
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++) {
            __m512i c = load64(in + 64 * j); /* the one read of these input bytes */
            store64(out + 64 * j, _mm512_xor_si512(_mm512_aesenclast_epi128(b[j], k->rk[14]), c));
            absorb_pair(&a, k, j, c, y);
        }
        y = vreduce(a);
    }
    return y;
}

#include "gcm_vaes_glue.h"

CP_VAES_TARGET void cp_vaes512_open(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                                 const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16])
{
    struct vkeys k;
    uint8_t yb[16], rest_j0[16], tail[CHUNK];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    vkeys_init(&k, ctx);
    vkeys_counters(&k, j0, ctr);
    __m128i y = absorb(ctx, &k, _mm_setzero_si128(), aad, aad_len);
    y = open_chunks(&k, y, in, out, n);
    store16(yb, y);
    if (rest > 0) { /* the input tail read once into private memory; hashed and decrypted from there */
        cp_copy_bytes(tail, in + n * CHUNK, rest);
        tail_j0(rest_j0, j0, ctr + (uint32_t)(16 * n));
        cp_aesni_ghash_update(ctx, yb, tail, rest);
        cp_aesni_ctr(ctx, rest_j0, tail, out + n * CHUNK, rest);
    }
    cp_aesni_ghash_finish(ctx, yb, aad_len, len, s);
}

/* CTR alone (cp_gcm_open's second pass, after the tag matched). */
CP_VAES_TARGET void cp_vaes512_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out,
                                size_t len)
{
    struct vkeys k;
    uint8_t rest_j0[16];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    size_t n = len / CHUNK;
    vkeys_init(&k, ctx);
    vkeys_counters(&k, j0, ctr);
    for (size_t c = 0; c < n; c++, in += CHUNK, out += CHUNK) {
        __m512i b[VREGS];
        aes_rounds(&k, b);
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++)
            store64(out + 64 * j,
                    _mm512_xor_si512(_mm512_aesenclast_epi128(b[j], k.rk[14]), load64(in + 64 * j)));
    }
    if (len > n * CHUNK) {
        tail_j0(rest_j0, j0, ctr + (uint32_t)(16 * n));
        cp_aesni_ctr(ctx, rest_j0, in, out, len - n * CHUNK);
    }
}
