/*
 * AES-256-GCM with AES-NI and PCLMULQDQ.
 *
 * CTR runs 8 independent blocks through the rounds together so the AES unit's latency is hidden.
 * GHASH follows Gueron and Kounavis, "Intel Carry-Less Multiplication Instruction and its Usage for
 * Computing the GCM Mode": blocks are byte-reflected, 8 blocks are multiplied by H^8..H^1 (precomputed at
 * key setup) and summed unreduced, then one shift-by-one and one reduction serve the whole group.
 * Needs SSE at CPL3 (or a native CPL0): never call at emulated CPL0.
 */
#include <emmintrin.h>
#include <immintrin.h>
#include <smmintrin.h>
#include <tmmintrin.h>
#include <wmmintrin.h>

#include "cp_gcm_internal.h"

#define CP_LANES 8

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

/* ---- AES-256 ---- */

static void load_round_keys(const cp_gcm_ctx *ctx, __m128i rk[15])
{
    for (int i = 0; i < 15; i++)
        rk[i] = load16(ctx->round_keys[i]);
}

/* w[i..i+3] xor-prefix: each word gets the xor of itself and all words before it in the key. */
static inline __m128i prefix_xor(__m128i k)
{
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, _mm_slli_si128(k, 4));
}

/* Even round key: RotWord(SubWord(last word)) ^ rcon, from aeskeygenassist's dword 3. */
#define CP_KEY_EVEN(prev2, prev1, rcon) \
    _mm_xor_si128(prefix_xor(prev2), _mm_shuffle_epi32(_mm_aeskeygenassist_si128((prev1), (rcon)), 0xff))
/* Odd round key: SubWord(last word) without rotation or rcon, from dword 2. */
#define CP_KEY_ODD(prev2, prev1) \
    _mm_xor_si128(prefix_xor(prev2), _mm_shuffle_epi32(_mm_aeskeygenassist_si128((prev1), 0x00), 0xaa))

static void expand_key(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES])
{
    __m128i k[15];
    k[0] = load16(key);
    k[1] = load16(key + 16);
    k[2] = CP_KEY_EVEN(k[0], k[1], 0x01);
    k[3] = CP_KEY_ODD(k[1], k[2]);
    k[4] = CP_KEY_EVEN(k[2], k[3], 0x02);
    k[5] = CP_KEY_ODD(k[3], k[4]);
    k[6] = CP_KEY_EVEN(k[4], k[5], 0x04);
    k[7] = CP_KEY_ODD(k[5], k[6]);
    k[8] = CP_KEY_EVEN(k[6], k[7], 0x08);
    k[9] = CP_KEY_ODD(k[7], k[8]);
    k[10] = CP_KEY_EVEN(k[8], k[9], 0x10);
    k[11] = CP_KEY_ODD(k[9], k[10]);
    k[12] = CP_KEY_EVEN(k[10], k[11], 0x20);
    k[13] = CP_KEY_ODD(k[11], k[12]);
    k[14] = CP_KEY_EVEN(k[12], k[13], 0x40);
    for (int i = 0; i < 15; i++)
        store16(ctx->round_keys[i], k[i]);
}

static inline __m128i encrypt1(const __m128i rk[15], __m128i b)
{
    b = _mm_xor_si128(b, rk[0]);
    for (int r = 1; r < 14; r++)
        b = _mm_aesenc_si128(b, rk[r]);
    return _mm_aesenclast_si128(b, rk[14]);
}

void cp_aesni_encrypt_block(const cp_gcm_ctx *ctx, const uint8_t in[16], uint8_t out[16])
{
    __m128i rk[15];
    load_round_keys(ctx, rk);
    store16(out, encrypt1(rk, load16(in)));
}

static inline __m128i counter_block(__m128i base, uint32_t ctr)
{
    return _mm_insert_epi32(base, (int)__builtin_bswap32(ctr), 3);
}

/* 8 counter blocks through all 14 rounds side by side, xored into 128 bytes of input. */
static inline void ctr8(const __m128i rk[15], __m128i base, uint32_t ctr, const uint8_t *in, uint8_t *out)
{
    __m128i b[CP_LANES];
#pragma GCC unroll 8
    for (int i = 0; i < CP_LANES; i++)
        b[i] = _mm_xor_si128(counter_block(base, ctr + (uint32_t)i), rk[0]);
    for (int r = 1; r < 14; r++) {
#pragma GCC unroll 8
        for (int i = 0; i < CP_LANES; i++)
            b[i] = _mm_aesenc_si128(b[i], rk[r]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < CP_LANES; i++) {
        b[i] = _mm_aesenclast_si128(b[i], rk[14]);
        store16(out + 16 * i, _mm_xor_si128(b[i], load16(in + 16 * i)));
    }
}

void cp_aesni_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len)
{
    __m128i rk[15];
    load_round_keys(ctx, rk);
    __m128i base = load16(j0);
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u; /* inc32 wraps mod 2^32 */
    for (; len >= 16 * CP_LANES; len -= 16 * CP_LANES) {
        ctr8(rk, base, ctr, in, out);
        ctr += CP_LANES;
        in += 16 * CP_LANES;
        out += 16 * CP_LANES;
    }
    for (; len >= 16; len -= 16) {
        store16(out, _mm_xor_si128(encrypt1(rk, counter_block(base, ctr++)), load16(in)));
        in += 16;
        out += 16;
    }
    if (len > 0) {
        uint8_t ks[16];
        store16(ks, encrypt1(rk, counter_block(base, ctr)));
        for (size_t i = 0; i < len; i++)
            out[i] = (uint8_t)(in[i] ^ ks[i]);
        cp_wipe_bytes(ks, sizeof(ks));
    }
}

/* ---- GHASH ---- */

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

/* Y = (Y + X1)H^n + X2 H^(n-1) + ... + Xn H for n (1..8) full blocks, one reduction. */
static inline __m128i absorb_group(__m128i y, const __m128i h[CP_LANES], const uint8_t *p, int n)
{
    clmul_acc acc = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    __m128i x = _mm_xor_si128(byte_reverse(load16(p)), y);
    clmul_add(&acc, x, h[n - 1]);
    for (int i = 1; i < n; i++)
        clmul_add(&acc, byte_reverse(load16(p + 16 * i)), h[n - 1 - i]);
    return reduce(acc);
}

static inline __m128i absorb_group8(__m128i y, const __m128i h[CP_LANES], const uint8_t *p)
{
    clmul_acc acc = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    clmul_add(&acc, _mm_xor_si128(byte_reverse(load16(p)), y), h[7]);
#pragma GCC unroll 7
    for (int i = 1; i < CP_LANES; i++)
        clmul_add(&acc, byte_reverse(load16(p + 16 * i)), h[7 - i]);
    return reduce(acc);
}

/* Absorbs data, zero-padding a final partial block. */
static __m128i ghash_absorb(__m128i y, const __m128i h[CP_LANES], const uint8_t *p, size_t len)
{
    for (; len >= 16 * CP_LANES; len -= 16 * CP_LANES, p += 16 * CP_LANES)
        y = absorb_group8(y, h, p);
    if (len >= 16) {
        int n = (int)(len / 16);
        y = absorb_group(y, h, p, n);
        p += 16 * (size_t)n;
        len -= 16 * (size_t)n;
    }
    if (len > 0) {
        uint8_t last[16];
        cp_zero_bytes(last, sizeof(last));
        cp_copy_bytes(last, p, len);
        y = absorb_group(y, h, last, 1);
    }
    return y;
}

void cp_aesni_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                    size_t c_len, uint8_t s[16])
{
    __m128i h[CP_LANES];
    uint8_t lens[16];
    for (int i = 0; i < CP_LANES; i++)
        h[i] = load16(ctx->h_powers[i]);
    __m128i y = _mm_setzero_si128();
    y = ghash_absorb(y, h, aad, aad_len);
    y = ghash_absorb(y, h, c, c_len);
    cp_gcm_length_block(lens, aad_len, c_len);
    y = absorb_group(y, h, lens, 1);
    store16(s, byte_reverse(y));
}

/* Round keys, then H^1..H^8 in the reflected domain GHASH works in. */
void cp_aesni_setup(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES])
{
    __m128i rk[15];
    expand_key(ctx, key);
    load_round_keys(ctx, rk);
    __m128i h = byte_reverse(encrypt1(rk, _mm_setzero_si128()));
    __m128i power = h;
    store16(ctx->h_powers[0], h);
    for (int i = 1; i < CP_LANES; i++) {
        power = gf_mul(power, h);
        store16(ctx->h_powers[i], power);
    }
}

/*
 * ---- VAES + VPCLMULQDQ on 256-bit registers (AVX2): two blocks per instruction ----
 * Compiled for those extensions per function, so the file still builds with the base firmware flags.
 * Needs XCR0 to enable YMM state (the VMM sets it) and CPL3 or a native CPL0, like the rest of this file.
 */
#define CP_VAES_TARGET __attribute__((target("avx2,vaes,vpclmulqdq")))
#define CP_VLANES 8 /* ymm registers in flight in CTR: 16 blocks */

CP_VAES_TARGET static inline __m256i load32(const uint8_t *p)
{
    return _mm256_loadu_si256((const __m256i *)(const void *)p);
}

CP_VAES_TARGET static inline void store32(uint8_t *p, __m256i v)
{
    _mm256_storeu_si256((__m256i *)(void *)p, v);
}

CP_VAES_TARGET void cp_vaes_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out,
                                size_t len)
{
    /* Counters kept little-endian in dword 3 so a plain add steps them; one shuffle makes them GCM's. */
    const __m128i swap_ctr = _mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i swap = _mm256_broadcastsi128_si256(swap_ctr);
    const __m256i step = _mm256_set_epi32(2, 0, 0, 0, 2, 0, 0, 0);
    __m256i rk[15];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    __m128i first = _mm_add_epi32(_mm_shuffle_epi8(load16(j0), swap_ctr), _mm_set_epi32(1, 0, 0, 0));
    __m256i ctrs = _mm256_add_epi32(_mm256_broadcastsi128_si256(first), _mm256_set_epi32(1, 0, 0, 0, 0, 0, 0, 0));
    for (int i = 0; i < 15; i++)
        rk[i] = _mm256_broadcastsi128_si256(load16(ctx->round_keys[i]));
    for (; len >= 32 * CP_VLANES; len -= 32 * CP_VLANES) {
        __m256i b[CP_VLANES];
#pragma GCC unroll 8
        for (int i = 0; i < CP_VLANES; i++) {
            b[i] = _mm256_xor_si256(_mm256_shuffle_epi8(ctrs, swap), rk[0]);
            ctrs = _mm256_add_epi32(ctrs, step);
        }
        for (int r = 1; r < 14; r++) {
#pragma GCC unroll 8
            for (int i = 0; i < CP_VLANES; i++)
                b[i] = _mm256_aesenc_epi128(b[i], rk[r]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < CP_VLANES; i++) {
            b[i] = _mm256_aesenclast_epi128(b[i], rk[14]);
            store32(out + 32 * i, _mm256_xor_si256(b[i], load32(in + 32 * i)));
        }
        in += 32 * CP_VLANES;
        out += 32 * CP_VLANES;
        ctr += 2 * CP_VLANES;
    }
    if (len > 0) {
        /* The last < 16 blocks: the 128-bit path, from where the counter stands. */
        uint8_t rest_j0[16];
        cp_copy_bytes(rest_j0, j0, 12);
        cp_store_be32(rest_j0 + 12, ctr - 1u);
        cp_aesni_ctr(ctx, rest_j0, in, out, len);
    }
}

/* Y over n groups of 8 blocks: blocks (2j, 2j+1) times (H^(8-2j), H^(7-2j)), summed, one reduction. */
CP_VAES_TARGET static __m128i vghash_groups(__m128i y, const cp_gcm_ctx *ctx, const uint8_t *p, size_t groups)
{
    const __m256i rev = _mm256_broadcastsi128_si256(
        _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m256i hp[4];
    for (int j = 0; j < 4; j++) /* memory order is H^(7-2j), H^(8-2j): swap the two lanes */
        hp[j] = _mm256_permute4x64_epi64(load32(ctx->h_powers[6 - 2 * j]), 0x4e);
    for (; groups > 0; groups--, p += 128) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256(), mid = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m256i x = _mm256_shuffle_epi8(load32(p + 32 * j), rev);
            if (j == 0)
                x = _mm256_xor_si256(x, _mm256_inserti128_si256(_mm256_setzero_si256(), y, 0));
            lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, hp[j], 0x00));
            hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, hp[j], 0x11));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, hp[j], 0x01));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, hp[j], 0x10));
        }
        clmul_acc acc = {
            _mm_xor_si128(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)),
            _mm_xor_si128(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)),
            _mm_xor_si128(_mm256_castsi256_si128(mid), _mm256_extracti128_si256(mid, 1)),
        };
        y = reduce(acc);
    }
    return y;
}

CP_VAES_TARGET void cp_vaes_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                                  size_t c_len, uint8_t s[16])
{
    __m128i h[CP_LANES];
    uint8_t lens[16];
    for (int i = 0; i < CP_LANES; i++)
        h[i] = load16(ctx->h_powers[i]);
    __m128i y = ghash_absorb(_mm_setzero_si128(), h, aad, aad_len);
    size_t groups = c_len / (16 * CP_LANES);
    y = vghash_groups(y, ctx, c, groups);
    y = ghash_absorb(y, h, c + groups * 16 * CP_LANES, c_len - groups * 16 * CP_LANES);
    cp_gcm_length_block(lens, aad_len, c_len);
    y = absorb_group(y, h, lens, 1);
    store16(s, byte_reverse(y));
}
