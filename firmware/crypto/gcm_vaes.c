/*
 * AES-256-GCM on 256-bit registers: VAES + VPCLMULQDQ with AVX2 (CP_GCM_IMPL_VAES).
 *
 * The bulk works in chunks of 16 blocks (256 bytes, 8 ymm registers of two blocks each). Seal is fused and
 * stitched: each chunk's 16 counter blocks go through the 14 rounds side by side, with the GHASH of the
 * previous chunk's ciphertext (still in registers) between the rounds, so `out` is only written. The
 * helper's open hashes each input block as it copies it into private memory (every input byte read once),
 * checks the tag, and only then runs CTR from the private copy (cp_vaes_ghash_copy, cp_vaes_ctr). GHASH
 * aggregates the 16 blocks of a chunk as 8 ymm pairs times (H^16,H^15)..(H^2,H^1), the powers carrying
 * x^-1 so that each chunk reduces with two carry-less multiplies (session 12; gcm_vaes512.c's vreduce has
 * the argument). Tails shorter than a chunk go through the AES-NI code via a private stack buffer.
 *
 * Compiled for those extensions per function, so the file builds with the base firmware flags. Needs XCR0
 * to enable YMM state (the VMM sets it) and CPL3 or a native CPL0. Designs consulted, not copied: OpenSSL's
 * aesni-gcm-x86_64 (stitched CTR+GHASH) and the VAES/AVX2 GCM of Linux's aes-gcm-avx10/vaes-avx2 (16-block
 * aggregation with precomputed powers).
 */
#include "ghash_x86.h"

#define CP_VAES_TARGET __attribute__((target("avx2,vaes,vpclmulqdq")))
#define VAES_FN(name) cp_vaes_##name
#define CHUNK 256u /* bytes per fused step: 16 blocks */
#define VREGS 8    /* ymm registers per chunk */

/* Per-call expanded state: round keys broadcast to both lanes, and the H-power pair for each ymm of a chunk. */
struct vkeys {
    __m256i rk[15];
    __m256i hp[VREGS]; /* hp[j] lanes = H^(16-2j), H^(15-2j): block 2j of a chunk is 16-2j from the end */
    __m256i hk[VREGS]; /* Karatsuba: each lane's high and low halves of hp[j] xored (in both halves) */
    __m256i ctrs;      /* the next two counter blocks, counter little-endian in dword 3 of each lane */
};

CP_VAES_TARGET static inline __m256i load32(const uint8_t *p)
{
    return _mm256_loadu_si256((const __m256i *)(const void *)p);
}

CP_VAES_TARGET static inline void store32(uint8_t *p, __m256i v)
{
    _mm256_storeu_si256((__m256i *)(void *)p, v);
}

CP_VAES_TARGET static inline __m256i rev32(__m256i v)
{
    const __m256i rev =
        _mm256_broadcastsi128_si256(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm256_shuffle_epi8(v, rev);
}

/* Each lane times x^-1 (GHASH's bit order), as gcm_vaes512.c's mul_x_inv: the form vreduce's powers take. */
CP_VAES_TARGET static inline __m256i mul_x_inv(__m256i h)
{
    const __m256i poly_hi = _mm256_broadcastsi128_si256(_mm_set_epi64x((long long)0xc200000000000000ull, 0));
    __m256i top = _mm256_srli_epi64(h, 63);
    __m256i out = _mm256_and_si256(_mm256_sub_epi64(_mm256_setzero_si256(), top), poly_hi);
    return _mm256_xor_si256(_mm256_xor_si256(_mm256_add_epi64(h, h), _mm256_shuffle_epi32(top, 0x4e)), out);
}

CP_VAES_TARGET static void vkeys_init(struct vkeys *k, const cp_gcm_ctx *ctx)
{
    for (int i = 0; i < 15; i++)
        k->rk[i] = _mm256_broadcastsi128_si256(load16(ctx->round_keys[i]));
    for (int j = 0; j < VREGS; j++) /* memory order is H^(15-2j), H^(16-2j): swap the lanes */
        k->hp[j] = mul_x_inv(_mm256_permute4x64_epi64(load32(ctx->h_powers[14 - 2 * j]), 0x4e));
    for (int j = 0; j < VREGS; j++)
        k->hk[j] = _mm256_xor_si256(k->hp[j], _mm256_shuffle_epi32(k->hp[j], 0x4e));
    k->ctrs = _mm256_setzero_si256();
}

/* Counters are kept little-endian in dword 3 so a plain add steps them (inc32 wraps mod 2^32 like the add);
 * one shuffle per block makes them GCM's big-endian counter blocks. first_ctr is the counter of block 0. */
CP_VAES_TARGET static void vkeys_counters(struct vkeys *k, const uint8_t j0[16], uint32_t first_ctr)
{
    const __m128i swap_ctr = _mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m128i c = _mm_insert_epi32(_mm_shuffle_epi8(load16(j0), swap_ctr), (int)first_ctr, 3);
    k->ctrs = _mm256_add_epi32(_mm256_broadcastsi128_si256(c), _mm256_set_epi32(1, 0, 0, 0, 0, 0, 0, 0));
}

/* The chunk's 16 counter blocks, after round 0 (gcm_vaes_rounds.h runs the rest). */
CP_VAES_TARGET static inline void aes_begin(struct vkeys *k, __m256i b[VREGS])
{
    const __m256i swap = _mm256_broadcastsi128_si256(
        _mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const __m256i step = _mm256_set_epi32(2, 0, 0, 0, 2, 0, 0, 0);
#pragma GCC unroll 8
    for (int i = 0; i < VREGS; i++) {
        b[i] = _mm256_xor_si256(_mm256_shuffle_epi8(k->ctrs, swap), k->rk[0]);
        k->ctrs = _mm256_add_epi32(k->ctrs, step);
    }
}

typedef __m256i vec;
#define vec_aesenc _mm256_aesenc_epi128
#include "gcm_vaes_rounds.h"

/* Unreduced sum of products (Karatsuba terms), two blocks per register. */
struct vacc {
    __m256i lo, hi, mid;
};

/* Karatsuba: lo = a0 b0, hi = a1 b1, and (a0 ^ a1)(b0 ^ b1) summed as is; the true middle term is that
 * sum xor lo xor hi, which vreduce takes once per chunk (all three are sums, and xor is linear). Three
 * carry-less multiplies per block instead of four: VPCLMULQDQ throughput bounds GHASH here. */
CP_VAES_TARGET static inline void vmul_add(struct vacc *a, __m256i x, __m256i h, __m256i hk)
{
    a->lo = _mm256_xor_si256(a->lo, _mm256_clmulepi64_epi128(x, h, 0x00));
    a->hi = _mm256_xor_si256(a->hi, _mm256_clmulepi64_epi128(x, h, 0x11));
    __m256i halves = _mm256_xor_si256(x, _mm256_shuffle_epi32(x, 0x4e));
    a->mid = _mm256_xor_si256(a->mid, _mm256_clmulepi64_epi128(halves, hk, 0x00));
}

/* The Montgomery-style reduction of each lane (gcm_vaes512.c's vreduce has the argument), then the lanes
 * summed. */
CP_VAES_TARGET static inline __m128i vreduce(struct vacc a)
{
    const __m256i poly = _mm256_broadcastsi128_si256(_mm_set_epi64x((long long)0xc200000000000000ull, 1));
    __m256i mid = _mm256_xor_si256(a.mid, _mm256_xor_si256(a.lo, a.hi));
    __m256i lo_fold = _mm256_clmulepi64_epi128(poly, a.lo, 0x01);
    mid = _mm256_xor_si256(mid, _mm256_xor_si256(_mm256_shuffle_epi32(a.lo, 0x4e), lo_fold));
    __m256i mid_fold = _mm256_clmulepi64_epi128(poly, mid, 0x01);
    __m256i hi = _mm256_xor_si256(a.hi, _mm256_xor_si256(_mm256_shuffle_epi32(mid, 0x4e), mid_fold));
    return _mm_xor_si128(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
}

/* Block pair j of a chunk (GCM byte order) into the accumulator; pair 0 carries the running Y. */
CP_VAES_TARGET static inline void absorb_pair(struct vacc *a, const struct vkeys *k, int j, __m256i c,
                                              __m128i y)
{
    __m256i x = rev32(c);
    if (j == 0)
        x = _mm256_xor_si256(x, _mm256_zextsi128_si256(y));
    vmul_add(a, x, k->hp[j], k->hk[j]);
}

/* GHASH over whole chunks in memory (AAD, or ciphertext already authenticated-to-be). */
CP_VAES_TARGET static __m128i ghash_chunks(const struct vkeys *k, __m128i y, const uint8_t *p, size_t n)
{
    for (; n > 0; n--, p += CHUNK) {
        struct vacc a = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int j = 0; j < VREGS; j++)
            absorb_pair(&a, k, j, load32(p + 32 * j), y);
        y = vreduce(a);
    }
    return y;
}

/* The last round and the xor with the input, read once: the chunk's ciphertext into c and out. */
CP_VAES_TARGET static inline void aes_finish(const struct vkeys *k, __m256i b[VREGS], const uint8_t *in,
                                             uint8_t *out, __m256i c[VREGS])
{
#pragma GCC unroll 8
    for (int j = 0; j < VREGS; j++) {
        c[j] = _mm256_xor_si256(_mm256_aesenclast_epi128(b[j], k->rk[14]), load32(in + 32 * j));
        store32(out + 32 * j, c[j]);
    }
}

/* Stitched as in gcm_vaes512.c: chunk i's rounds with the GHASH of chunk i-1's ciphertext (registers)
 * between them, one pair per round 1..8 and the reduction after round 10. */
CP_VAES_TARGET static __m128i seal_chunks(struct vkeys *k, __m128i y, const uint8_t *in, uint8_t *out, size_t n)
{
    __m256i b[VREGS], c[VREGS];
    struct vacc a = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    if (n == 0)
        return y;
    aes_rounds(k, b);
    aes_finish(k, b, in, out, c);
    for (n--; n > 0; n--) {
        in += CHUNK;
        out += CHUNK;
        a.lo = a.hi = a.mid = _mm256_setzero_si256();
        aes_begin(k, b);
#pragma GCC unroll 13
        for (int r = 1; r < 14; r++) {
            aes_round(k, b, r);
            if (r <= VREGS)
                absorb_pair(&a, k, r - 1, c[r - 1], y);
            if (r == 10)
                y = vreduce(a);
        }
        aes_finish(k, b, in, out, c);
    }
    a.lo = a.hi = a.mid = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < VREGS; j++)
        absorb_pair(&a, k, j, c[j], y);
    return vreduce(a);
}

#include "gcm_vaes_glue.h"

/* CTR alone (cp_gcm_open's second pass, after the tag matched). */
CP_VAES_TARGET void cp_vaes_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out,
                                size_t len)
{
    struct vkeys k;
    uint8_t rest_j0[16];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    size_t n = len / CHUNK;
    vkeys_init(&k, ctx);
    vkeys_counters(&k, j0, ctr);
    for (size_t c = 0; c < n; c++, in += CHUNK, out += CHUNK) {
        __m256i b[VREGS], x[VREGS];
        aes_rounds(&k, b);
        aes_finish(&k, b, in, out, x);
    }
    if (len > n * CHUNK) {
        tail_j0(rest_j0, j0, ctr + (uint32_t)(16 * n));
        cp_aesni_ctr(ctx, rest_j0, in, out, len - n * CHUNK);
    }
}

/*
 * GHASH over `in` while copying it to `out`, each block loaded once: the first half of the helper's open
 * on this path. On AMD Zen 3 the AES and carry-less-multiply work do not overlap (fused open = CTR + GHASH
 * in time), so open as "hash while copying into private memory, check the tag, then CTR from the private
 * copy" costs the same crypto, saves the plaintext's extra copy, and no plaintext exists before the tag
 * matched.
 */
CP_VAES_TARGET void cp_vaes_ghash_copy(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len,
                                       const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16])
{
    struct vkeys k;
    uint8_t yb[16];
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    vkeys_init(&k, ctx);
    __m128i y = absorb(ctx, &k, _mm_setzero_si128(), aad, aad_len);
    for (size_t c = 0; c < n; c++, in += CHUNK, out += CHUNK) {
        struct vacc a = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int j = 0; j < VREGS; j++) {
            __m256i x = load32(in + 32 * j); /* the one read of these input bytes */
            store32(out + 32 * j, x);
            absorb_pair(&a, &k, j, x, y);
        }
        y = vreduce(a);
    }
    store16(yb, y);
    if (rest > 0) {
        cp_copy_bytes(out, in, rest);
        cp_aesni_ghash_update(ctx, yb, out, rest); /* hashed from the private copy */
    }
    cp_aesni_ghash_finish(ctx, yb, aad_len, len, s);
}
