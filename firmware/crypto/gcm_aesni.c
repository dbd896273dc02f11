/*
 * AES-256-GCM with AES-NI and PCLMULQDQ, and the key setup every x86 implementation shares (round keys,
 * H^1..H^16).
 *
 * CTR runs 8 independent blocks through the rounds together so the AES unit's latency is hidden. GHASH
 * follows Gueron and Kounavis, "Intel Carry-Less Multiplication Instruction and its Usage for Computing the
 * GCM Mode": blocks are byte-reflected, 16 blocks are multiplied by H^16..H^1 (precomputed at key setup) with
 * Karatsuba's three multiplies each and summed unreduced, then one shift-by-one and one reduction serve the
 * whole group. Seal is fused (CTR and GHASH in one walk, seal_groups); the helper's open hashes while it
 * copies into private memory, then runs CTR from there (docs/crypto.md says why not fused here).
 * Needs SSE at CPL3 (or a native CPL0): never call at emulated CPL0.
 */
#include "ghash_x86.h"

#define CP_LANES 8

static void load_round_keys(const cp_gcm_ctx *ctx, __m128i rk[15])
{
    for (int i = 0; i < 15; i++)
        rk[i] = load16(ctx->round_keys[i]);
}

static inline __m128i encrypt1(const __m128i rk[15], __m128i b)
{
    b = _mm_xor_si128(b, rk[0]);
    for (int r = 1; r < 14; r++)
        b = _mm_aesenc_si128(b, rk[r]);
    return _mm_aesenclast_si128(b, rk[14]);
}

static inline __m128i counter_block(__m128i base, uint32_t ctr)
{
    return _mm_insert_epi32(base, (int)__builtin_bswap32(ctr), 3);
}

/*
 * Round 0 of 8 counter blocks ctr..ctr+7. The counter is big-endian in dword 3, so while its low byte does
 * not wrap within the 8 (31 batches in 32), adding 1 << 24 to that dword steps it: one add per block instead
 * of a byte swap and an insert (shuffle-unit work that competes with AES). The branch is on the counter,
 * which is public.
 */
static inline void first_round8(__m128i b[CP_LANES], __m128i base, uint32_t ctr, __m128i rk0)
{
    if ((ctr & 0xffu) <= 0x100u - CP_LANES) {
        const __m128i step = _mm_set_epi32(1 << 24, 0, 0, 0);
        __m128i c = counter_block(base, ctr);
#pragma GCC unroll 8
        for (int i = 0; i < CP_LANES; i++, c = _mm_add_epi32(c, step))
            b[i] = _mm_xor_si128(c, rk0);
        return;
    }
#pragma GCC unroll 8
    for (int i = 0; i < CP_LANES; i++)
        b[i] = _mm_xor_si128(counter_block(base, ctr + (uint32_t)i), rk0);
}

/* 8 counter blocks through rounds 0..13 side by side (the last round is the caller's). */
static inline void ctr8_rounds(const __m128i rk[15], __m128i b[CP_LANES], __m128i base, uint32_t ctr)
{
    first_round8(b, base, ctr, rk[0]);
    for (int r = 1; r < 14; r++) {
#pragma GCC unroll 8
        for (int i = 0; i < CP_LANES; i++)
            b[i] = _mm_aesenc_si128(b[i], rk[r]);
    }
}

/* 8 counter blocks through all 14 rounds side by side, xored into 128 bytes of input. */
static inline void ctr8(const __m128i rk[15], __m128i base, uint32_t ctr, const uint8_t *in, uint8_t *out)
{
    __m128i b[CP_LANES];
    first_round8(b, base, ctr, rk[0]);
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

/* ---- GHASH: 16 blocks per reduction, Karatsuba products ---- */

#define CP_GROUP 16 /* blocks summed unreduced before one reduction (H^1..H^16 are in the context) */

/* hr[j] = H^(16-j), so block i of an n-block group (n <= 16) takes hr[16-n+i]; hk[j]: hr[j]'s two halves
 * xored (both halves), Karatsuba's third operand. Built per call from the context. */
struct hkeys {
    __m128i hr[CP_GROUP];
    __m128i hk[CP_GROUP];
};

static void load_hkeys(const cp_gcm_ctx *ctx, struct hkeys *k)
{
    for (int j = 0; j < CP_GROUP; j++) {
        k->hr[j] = load16(ctx->h_powers[CP_GROUP - 1 - j]);
        k->hk[j] = _mm_xor_si128(k->hr[j], _mm_shuffle_epi32(k->hr[j], 0x4e));
    }
}

/* Karatsuba: lo = x0 h0, hi = x1 h1 and (x0 ^ x1)(h0 ^ h1) summed as is; kreduce recovers the middle term
 * once per group (all three are sums, xor is linear). Three carry-less multiplies per block, not four. */
static inline void kmul_add(clmul_acc *acc, __m128i x, __m128i h, __m128i hk)
{
    acc->lo = _mm_xor_si128(acc->lo, _mm_clmulepi64_si128(x, h, 0x00));
    acc->hi = _mm_xor_si128(acc->hi, _mm_clmulepi64_si128(x, h, 0x11));
    acc->mid = _mm_xor_si128(acc->mid,
                             _mm_clmulepi64_si128(_mm_xor_si128(x, _mm_shuffle_epi32(x, 0x4e)), hk, 0x00));
}

static inline __m128i kreduce(clmul_acc acc)
{
    acc.mid = _mm_xor_si128(acc.mid, _mm_xor_si128(acc.lo, acc.hi));
    return reduce(acc);
}

static inline clmul_acc acc_zero(void)
{
    clmul_acc acc = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    return acc;
}

/* Y = (Y + X1)H^n + X2 H^(n-1) + ... + Xn H for n (1..16) full blocks, one reduction. */
static inline __m128i absorb_group(__m128i y, const struct hkeys *k, const uint8_t *p, int n)
{
    clmul_acc acc = acc_zero();
    const int first = CP_GROUP - n;
    kmul_add(&acc, _mm_xor_si128(byte_reverse(load16(p)), y), k->hr[first], k->hk[first]);
    for (int i = 1; i < n; i++)
        kmul_add(&acc, byte_reverse(load16(p + 16 * i)), k->hr[first + i], k->hk[first + i]);
    return kreduce(acc);
}

/* 8 blocks (GCM byte order) into acc against powers hr[at..at+7]; y folded into the first (0 when the group
 * is already under way). */
static inline void absorb8(clmul_acc *acc, const struct hkeys *k, int at, const uint8_t *p, __m128i y)
{
    kmul_add(acc, _mm_xor_si128(byte_reverse(load16(p)), y), k->hr[at], k->hk[at]);
#pragma GCC unroll 7
    for (int i = 1; i < CP_LANES; i++)
        kmul_add(acc, byte_reverse(load16(p + 16 * i)), k->hr[at + i], k->hk[at + i]);
}

static inline __m128i absorb_group16(__m128i y, const struct hkeys *k, const uint8_t *p)
{
    clmul_acc acc = acc_zero();
    absorb8(&acc, k, 0, p, y);
    absorb8(&acc, k, CP_LANES, p + 16 * CP_LANES, _mm_setzero_si128());
    return kreduce(acc);
}

/* Absorbs data, zero-padding a final partial block. */
static __m128i ghash_absorb(__m128i y, const struct hkeys *k, const uint8_t *p, size_t len)
{
    for (; len >= 16 * CP_GROUP; len -= 16 * CP_GROUP, p += 16 * CP_GROUP)
        y = absorb_group16(y, k, p);
    if (len >= 16) {
        int n = (int)(len / 16);
        y = absorb_group(y, k, p, n);
        p += 16 * (size_t)n;
        len -= 16 * (size_t)n;
    }
    if (len > 0) {
        uint8_t last[16];
        cp_zero_bytes(last, sizeof(last));
        cp_copy_bytes(last, p, len);
        y = absorb_group(y, k, last, 1);
    }
    return y;
}

/* S = (Y + lengths) H, back in GCM byte order. */
static __m128i ghash_final(__m128i y, const cp_gcm_ctx *ctx, size_t aad_len, size_t c_len)
{
    uint8_t lens[16];
    cp_gcm_length_block(lens, aad_len, c_len);
    return byte_reverse(gf_mul(_mm_xor_si128(byte_reverse(load16(lens)), y), load16(ctx->h_powers[0])));
}

void cp_aesni_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                    size_t c_len, uint8_t s[16])
{
    struct hkeys k;
    load_hkeys(ctx, &k);
    __m128i y = ghash_absorb(_mm_setzero_si128(), &k, aad, aad_len);
    y = ghash_absorb(y, &k, c, c_len);
    store16(s, ghash_final(y, ctx, aad_len, c_len));
}

void cp_aesni_ghash_update(const cp_gcm_ctx *ctx, uint8_t y[16], const uint8_t *p, size_t len)
{
    struct hkeys k;
    if (len == 0)
        return;
    load_hkeys(ctx, &k);
    store16(y, ghash_absorb(load16(y), &k, p, len));
}

void cp_aesni_ghash_finish(const cp_gcm_ctx *ctx, const uint8_t y[16], size_t aad_len, size_t c_len,
                           uint8_t s[16])
{
    store16(s, ghash_final(load16(y), ctx, aad_len, c_len));
}

/* ---- Fused passes: CTR and GHASH in one walk over the data ---- */

/*
 * 8 counter blocks through rounds 0..13 with 8 blocks of GHASH woven in, one block after each of the first
 * eight rounds: the AES rounds of one group and the carry-less multiplies of another are independent, so
 * a CPU with the two in separate units runs them side by side (the "stitching" of OpenSSL's aesni-gcm).
 * `g` is the private copy of the 8 blocks to hash (GCM byte order), against hr[at..at+7], y folded into
 * the first. The last round is the caller's, fused with its xor.
 */
static inline void rounds_hashing(const __m128i rk[15], __m128i b[CP_LANES], __m128i base, uint32_t ctr,
                                  clmul_acc *acc, const struct hkeys *k, int at, const uint8_t *g, __m128i y)
{
    first_round8(b, base, ctr, rk[0]);
    kmul_add(acc, _mm_xor_si128(byte_reverse(load16(g)), y), k->hr[at], k->hk[at]);
#pragma GCC unroll 13
    for (int r = 1; r < 14; r++) {
#pragma GCC unroll 8
        for (int i = 0; i < CP_LANES; i++)
            b[i] = _mm_aesenc_si128(b[i], rk[r]);
        if (r < CP_LANES)
            kmul_add(acc, byte_reverse(load16(g + 16 * r)), k->hr[at + r], k->hk[at + r]);
    }
}

/* The last round and the xor with 128 bytes of input; the result to out and to the private copy priv
 * (out may be shared: it is never read back). */
static inline void last_round_out(const __m128i rk[15], __m128i b[CP_LANES], const uint8_t *in, uint8_t *out,
                                  uint8_t *priv)
{
#pragma GCC unroll 8
    for (int i = 0; i < CP_LANES; i++) {
        __m128i c = _mm_xor_si128(_mm_aesenclast_si128(b[i], rk[14]), load16(in + 16 * i));
        store16(out + 16 * i, c);
        store16(priv + 16 * i, c);
    }
}

/*
 * Seal in groups of 16 blocks (two halves of 8), out only written. The GHASH of each half runs inside the
 * AES rounds of the next: half A of a group is hashed while half B is encrypted, half B while the next
 * group's half A is, and the group's one reduction follows (its Y is needed by the next half A's hash, one
 * half later). The ciphertext waits for its hash in a private 128-byte buffer, never in `out`.
 */
static __m128i seal_groups(const __m128i rk[15], const struct hkeys *k, __m128i base, uint32_t ctr, __m128i y,
                           const uint8_t *in, uint8_t *out, size_t n)
{
    uint8_t prev[16 * CP_LANES] __attribute__((aligned(16)));
    __m128i b[CP_LANES];
    clmul_acc acc = acc_zero();
    for (size_t g = 0; g < n; g++, ctr += CP_GROUP, in += 16 * CP_GROUP, out += 16 * CP_GROUP) {
        if (g == 0) {
            ctr8_rounds(rk, b, base, ctr);
        } else { /* half B of the previous group, then its reduction */
            rounds_hashing(rk, b, base, ctr, &acc, k, CP_LANES, prev, _mm_setzero_si128());
            y = kreduce(acc);
            acc = acc_zero();
        }
        last_round_out(rk, b, in, out, prev);
        rounds_hashing(rk, b, base, ctr + CP_LANES, &acc, k, 0, prev, y);
        last_round_out(rk, b, in + 16 * CP_LANES, out + 16 * CP_LANES, prev);
    }
    if (n > 0) {
        absorb8(&acc, k, CP_LANES, prev, _mm_setzero_si128());
        y = kreduce(acc);
    }
    cp_wipe_bytes(prev, sizeof(prev));
    return y;
}

/* j0 with its counter word set so this file's CTR (which starts at counter + 1) continues at `next`. */
static void tail_j0(uint8_t out[16], const uint8_t j0[16], uint32_t next)
{
    cp_copy_bytes(out, j0, 12);
    cp_store_be32(out + 12, next - 1u);
}

/* Fused seal: S as GHASH would give over the ciphertext written to out; out is never read. */
void cp_aesni_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                   const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16])
{
    __m128i rk[15];
    struct hkeys k;
    uint8_t tail[16 * CP_GROUP], rest_j0[16], yb[16];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    size_t n = len / (16 * CP_GROUP), done = n * 16 * CP_GROUP, rest = len - done;
    load_round_keys(ctx, rk);
    load_hkeys(ctx, &k);
    __m128i y = ghash_absorb(_mm_setzero_si128(), &k, aad, aad_len);
    y = seal_groups(rk, &k, load16(j0), ctr, y, in, out, n);
    if (rest > 0) { /* made privately, hashed there, then copied out */
        tail_j0(rest_j0, j0, ctr + (uint32_t)(CP_GROUP * n));
        cp_aesni_ctr(ctx, rest_j0, in + done, tail, rest);
        y = ghash_absorb(y, &k, tail, rest);
        cp_copy_bytes(out + done, tail, rest);
        cp_wipe_bytes(tail, rest);
    }
    store16(yb, y);
    cp_aesni_ghash_finish(ctx, yb, aad_len, len, s);
}

/* GHASH (S) over `in` while copying it to the private `out`, each input byte read once: the first half of
 * the two-pass open (then CTR from `out`, once the tag matched). */
void cp_aesni_ghash_copy(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *in,
                         uint8_t *out, size_t len, uint8_t s[16])
{
    struct hkeys k;
    size_t n = len / (16 * CP_GROUP), done = n * 16 * CP_GROUP;
    load_hkeys(ctx, &k);
    __m128i y = ghash_absorb(_mm_setzero_si128(), &k, aad, aad_len);
    for (size_t g = 0; g < n; g++) {
        const uint8_t *src = in + 16 * CP_GROUP * g;
        uint8_t *dst = out + 16 * CP_GROUP * g;
#pragma GCC unroll 16
        for (int i = 0; i < CP_GROUP; i++)
            store16(dst + 16 * i, load16(src + 16 * i));
        y = absorb_group16(y, &k, dst);
    }
    cp_copy_bytes(out + done, in + done, len - done);
    y = ghash_absorb(y, &k, out + done, len - done);
    store16(s, ghash_final(y, ctx, aad_len, len));
}

/* ---- AES-256 key schedule (shared by every x86 implementation) ---- */

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

void cp_aesni_encrypt_block(const cp_gcm_ctx *ctx, const uint8_t in[16], uint8_t out[16])
{
    __m128i rk[15];
    load_round_keys(ctx, rk);
    store16(out, encrypt1(rk, load16(in)));
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
