/*
 * AES-256-GCM with AES-NI and PCLMULQDQ.
 *
 * CTR runs 8 independent blocks through the rounds together so the AES unit's latency is hidden.
 * GHASH follows Gueron and Kounavis, "Intel Carry-Less Multiplication Instruction and its Usage for
 * Computing the GCM Mode": blocks are byte-reflected, 8 blocks are multiplied by H^8..H^1 (precomputed at
 * key setup) and summed unreduced, then one shift-by-one and one reduction serve the whole group.
 * Needs SSE at CPL3 (or a native CPL0): never call at emulated CPL0.
 */
#include "ghash_x86.h"

#define CP_LANES 8

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

static void load_h8(const cp_gcm_ctx *ctx, __m128i h[CP_LANES])
{
    for (int i = 0; i < CP_LANES; i++)
        h[i] = load16(ctx->h_powers[i]);
}

void cp_aesni_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                    size_t c_len, uint8_t s[16])
{
    uint8_t y[16];
    cp_zero_bytes(y, sizeof(y));
    cp_aesni_ghash_update(ctx, y, aad, aad_len);
    cp_aesni_ghash_update(ctx, y, c, c_len);
    cp_aesni_ghash_finish(ctx, y, aad_len, c_len, s);
}

void cp_aesni_ghash_update(const cp_gcm_ctx *ctx, uint8_t y[16], const uint8_t *p, size_t len)
{
    __m128i h[CP_LANES];
    load_h8(ctx, h);
    store16(y, ghash_absorb(load16(y), h, p, len));
}

void cp_aesni_ghash_finish(const cp_gcm_ctx *ctx, const uint8_t y[16], size_t aad_len, size_t c_len,
                           uint8_t s[16])
{
    __m128i h[CP_LANES];
    uint8_t lens[16];
    load_h8(ctx, h);
    cp_gcm_length_block(lens, aad_len, c_len);
    store16(s, byte_reverse(absorb_group(load16(y), h, lens, 1)));
}

/* Round keys, then H^1..H^16 in the reflected domain GHASH works in (the VAES paths aggregate 16). */
void cp_aesni_setup(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES])
{
    __m128i rk[15];
    expand_key(ctx, key);
    load_round_keys(ctx, rk);
    __m128i h = byte_reverse(encrypt1(rk, _mm_setzero_si128()));
    __m128i power = h;
    store16(ctx->h_powers[0], h);
    for (int i = 1; i < (int)CP_GCM_H_POWERS; i++) {
        power = gf_mul(power, h);
        store16(ctx->h_powers[i], power);
    }
}
