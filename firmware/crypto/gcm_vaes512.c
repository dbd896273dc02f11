/*
 * AES-256-GCM on 512-bit registers: VAES + VPCLMULQDQ with AVX-512F/BW/VL (CP_GCM_IMPL_VAES512).
 *
 * Chunks of 16 blocks (4 zmm of four blocks) as in gcm_vaes.c, with three differences measured on an AMD
 * EPYC (Zen 4) with AVX-512 (docs/crypto.md, "Session 12"): GHASH reduces with two carry-less multiplies
 * (Montgomery style, key powers carrying x^-1) instead of the shift sequence; seal is stitched (chunk i's
 * AES rounds interleaved with the GHASH of chunk i-1's ciphertext, still in registers) and open interleaves
 * each chunk's rounds with its own GHASH; and the whole GCM runs here (AAD, tails, the length block and
 * E(K, J0)) with no AES-NI helper calls, so a 4 KiB page costs little beyond its 16 chunks. Picked only
 * when the VMM's feature word says the CPU has AVX-512F/BW/VL, VAES and VPCLMULQDQ and XCR0 enables the
 * opmask, ZMM_Hi256 and Hi16_ZMM states (cp_gcm_pick_impl). On CPUs without AVX-512 its logic runs in the
 * tests with the intrinsics from SIMDe (CP_EMULATE_AVX512, emul512.h): docs/crypto.md, "Tests".
 */
#include "ghash_x86.h"

#ifdef CP_EMULATE_AVX512 /* test builds only: the intrinsics from SIMDe on any AVX2 CPU (emul512.h) */
#include "emul512.h"
#define CP_VAES_TARGET
#else
#define CP_VAES_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))
#endif
#define CHUNK 256u /* bytes per fused step: 16 blocks */
#define VREGS 4    /* zmm registers per chunk */

/* Per-call expanded state: round keys broadcast to all lanes, and the H-power quad for each zmm of a chunk. */
struct vkeys {
    __m512i rk[15];
    __m512i hp[VREGS]; /* hp[j] lanes = H^(16-4j)..H^(13-4j) times x^-1 (mul_x_inv): block 4j is 16-4j from the end */
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

/* Each lane's 64-bit halves swapped. */
CP_VAES_TARGET static inline __m512i swap64(__m512i v)
{
    return _mm512_shuffle_epi32(v, 0x4e);
}

/* x^63 + x^62 + x^57 in the high qword: the reduction folds 64 bits at a time with one multiply by it. */
CP_VAES_TARGET static inline __m512i gfpoly(void)
{
    return _mm512_broadcast_i32x4(_mm_set_epi64x((long long)0xc200000000000000ull, 1));
}

/*
 * Each lane times x^-1 (GHASH's bit order): a carry-less multiply of two byte-reflected blocks brings in an
 * extra factor x, which one x^-1 in the key powers cancels, so products need no 1-bit shift before vreduce.
 * A left shift of the 128-bit value by one; the bit shifted out adds x^-1 = 0xc2..01 (in this bit order).
 */
CP_VAES_TARGET static inline __m512i mul_x_inv(__m512i h)
{
    const __m512i poly_hi = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)0xc200000000000000ull, 0));
    __m512i top = _mm512_srli_epi64(h, 63); /* each qword's top bit: low's carries into high, high's out */
    __m512i out = _mm512_and_si512(_mm512_sub_epi64(_mm512_setzero_si512(), top), poly_hi);
    return _mm512_xor_si512(_mm512_xor_si512(_mm512_add_epi64(h, h), swap64(top)), out);
}

CP_VAES_TARGET static void vkeys_init(struct vkeys *k, const cp_gcm_ctx *ctx)
{
    for (int i = 0; i < 15; i++)
        k->rk[i] = _mm512_broadcast_i32x4(load16(ctx->round_keys[i]));
    for (int j = 0; j < VREGS; j++) { /* memory order is H^(13-4j)..H^(16-4j): reverse the four lanes */
        __m512i q = load64(ctx->h_powers[12 - 4 * j]);
        k->hp[j] = mul_x_inv(_mm512_shuffle_i64x2(q, q, 0x1b));
        k->hk[j] = _mm512_xor_si512(k->hp[j], swap64(k->hp[j]));
    }
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

/* The chunk's 16 counter blocks, after round 0. */
CP_VAES_TARGET static inline void aes_begin(struct vkeys *k, __m512i b[VREGS])
{
    const __m512i swap = _mm512_broadcast_i32x4(_mm_set_epi8(12, 13, 14, 15, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    const __m512i step = _mm512_set_epi32(4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0);
#pragma GCC unroll 4
    for (int i = 0; i < VREGS; i++) {
        b[i] = _mm512_xor_si512(_mm512_shuffle_epi8(k->ctrs, swap), k->rk[0]);
        k->ctrs = _mm512_add_epi32(k->ctrs, step);
    }
}

typedef __m512i vec;
#define vec_aesenc _mm512_aesenc_epi128
#include "gcm_vaes_rounds.h"

/* Unreduced sum of products (Karatsuba terms), four blocks per register. */
struct vacc {
    __m512i lo, hi, mid;
};

/* Karatsuba: lo = a0 b0, hi = a1 b1, and (a0 ^ a1)(b0 ^ b1) summed as is; the true middle term is that
 * sum xor lo xor hi, which vreduce takes once per chunk (all three are sums, and xor is linear). Three
 * carry-less multiplies per block instead of four. */
CP_VAES_TARGET static inline void vmul_add(struct vacc *a, __m512i x, __m512i h, __m512i hk)
{
    a->lo = _mm512_xor_si512(a->lo, _mm512_clmulepi64_epi128(x, h, 0x00));
    a->hi = _mm512_xor_si512(a->hi, _mm512_clmulepi64_epi128(x, h, 0x11));
    a->mid = _mm512_xor_si512(a->mid, _mm512_clmulepi64_epi128(_mm512_xor_si512(x, swap64(x)), hk, 0x00));
}

/* The four 128-bit lanes xored into one. */
CP_VAES_TARGET static inline __m128i fold4(__m512i v)
{
    __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/*
 * Montgomery-style reduction of each lane, then the lanes summed: the key powers carry x^-1, so a lane's
 * product x^128 hi + x^64 mid + lo (bit-reflected order) needs no shift; each of two steps cancels its low
 * 64 bits with one multiply by gfpoly (lo's low half into mid, then mid's into hi). Linear in the products,
 * so reducing before the lanes are summed equals reducing their sum. Design consulted: Linux's
 * aes-gcm-avx10 (_ghash_reduce).
 */
CP_VAES_TARGET static inline __m128i vreduce(struct vacc a)
{
    const __m512i poly = gfpoly();
    __m512i mid = _mm512_xor_si512(a.mid, _mm512_xor_si512(a.lo, a.hi));
    mid = _mm512_xor_si512(mid, _mm512_xor_si512(swap64(a.lo), _mm512_clmulepi64_epi128(poly, a.lo, 0x01)));
    __m512i hi = _mm512_xor_si512(a.hi, _mm512_xor_si512(swap64(mid), _mm512_clmulepi64_epi128(poly, mid, 0x01)));
    return fold4(hi);
}

/* Block quad j of a chunk (GCM byte order) into the accumulator; quad 0 carries the running Y. */
CP_VAES_TARGET static inline void absorb_quad(struct vacc *a, const struct vkeys *k, int j, __m512i c, __m128i y)
{
    __m512i x = rev64(c);
    if (j == 0)
        x = _mm512_xor_si512(x, _mm512_zextsi128_si512(y));
    vmul_add(a, x, k->hp[j], k->hk[j]);
}

CP_VAES_TARGET static inline struct vacc vacc_zero(void)
{
    struct vacc a = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    return a;
}

/* GHASH over whole chunks in memory (AAD, or ciphertext already authenticated-to-be). */
CP_VAES_TARGET static __m128i ghash_chunks(const struct vkeys *k, __m128i y, const uint8_t *p, size_t n)
{
    for (; n > 0; n--, p += CHUNK) {
        struct vacc a = vacc_zero();
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++)
            absorb_quad(&a, k, j, load64(p + 64 * j), y);
        y = vreduce(a);
    }
    return y;
}

/* The chunk's last round and the xor with its input quads: ciphertext (seal) or plaintext (open). */
CP_VAES_TARGET static inline void aes_finish(const struct vkeys *k, __m512i b[VREGS], const __m512i x[VREGS])
{
#pragma GCC unroll 4
    for (int j = 0; j < VREGS; j++)
        b[j] = _mm512_xor_si512(_mm512_aesenclast_epi128(b[j], k->rk[14]), x[j]);
}

CP_VAES_TARGET static inline void load_chunk(__m512i x[VREGS], const uint8_t *p)
{
#pragma GCC unroll 4
    for (int j = 0; j < VREGS; j++)
        x[j] = load64(p + 64 * j);
}

/* One chunk of CTR: the next 16 key-stream blocks xor in (read once), into c and out. */
CP_VAES_TARGET static inline void ctr_chunk(struct vkeys *k, const uint8_t *in, uint8_t *out, __m512i c[VREGS])
{
    __m512i x[VREGS];
    aes_rounds(k, c);
    load_chunk(x, in);
    aes_finish(k, c, x);
#pragma GCC unroll 4
    for (int j = 0; j < VREGS; j++)
        store64(out + 64 * j, c[j]);
}

/* A chunk's 13 rounds from aes_begin on, with the GHASH of the four quads c between them (rounds 1, 4, 7,
 * 10: one quad each; the reduction after round 12), so the AES and carry-less-multiply units work side by
 * side. Returns the new Y; the last round is the caller's. */
CP_VAES_TARGET static inline __m128i rounds_with_ghash(struct vkeys *k, __m512i b[VREGS], const __m512i c[VREGS],
                                                       __m128i y)
{
    struct vacc a = vacc_zero();
    aes_begin(k, b);
#pragma GCC unroll 13
    for (int r = 1; r < 14; r++) {
        aes_round(k, b, r);
        if (r % 3 == 1 && r < 12)
            absorb_quad(&a, k, r / 3, c[r / 3], y);
        if (r == 12)
            y = vreduce(a);
    }
    return y;
}

/* Stitched: chunk i's AES rounds run interleaved with the GHASH of chunk i-1's ciphertext (still in
 * registers, never read back from out). */
CP_VAES_TARGET static __m128i seal_chunks(struct vkeys *k, __m128i y, const uint8_t *in, uint8_t *out, size_t n)
{
    __m512i c[VREGS], b[VREGS], x[VREGS];
    if (n == 0)
        return y;
    ctr_chunk(k, in, out, c);
    for (n--; n > 0; n--) {
        in += CHUNK;
        out += CHUNK;
        y = rounds_with_ghash(k, b, c, y); /* the previous chunk's ciphertext */
        load_chunk(x, in);
        aes_finish(k, b, x);
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++) {
            c[j] = b[j];
            store64(out + 64 * j, c[j]);
        }
    }
    struct vacc a = vacc_zero();
#pragma GCC unroll 4
    for (int j = 0; j < VREGS; j++)
        absorb_quad(&a, k, j, c[j], y);
    return vreduce(a);
}

/* Chunk by chunk: one read of the input, GHASH between the rounds, plaintext to out (private). Each chunk
 * also fetches its 256 bytes of `place` for writing, so the caller's copy there after the tag meets lines
 * already owned: in the guest, that copy into RAM the cache does not hold cost ~600 TSC ticks a page. */
CP_VAES_TARGET static __m128i open_chunks(struct vkeys *k, __m128i y, const uint8_t *in, uint8_t *out, size_t n,
                                          const uint8_t *place)
{
    for (; n > 0; n--, in += CHUNK, out += CHUNK, place += CHUNK) {
        __m512i b[VREGS], c[VREGS];
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++)
            __asm__ volatile("prefetchw %0" : : "m"(place[64 * j]));
        load_chunk(c, in); /* the one read of these input bytes: hashed and decrypted from registers */
        y = rounds_with_ghash(k, b, c, y);
        aes_finish(k, b, c);
#pragma GCC unroll 4
        for (int j = 0; j < VREGS; j++)
            store64(out + 64 * j, b[j]);
    }
    return y;
}

/*
 * Up to 4 blocks (len <= 64 bytes, zero-padded to whole blocks) into Y, straight from p by one masked
 * load (bytes past len are neither read nor hashed): block l meets H^(m-l), so H^m..H^1 are the last m
 * lanes of the quad H^4..H^1 moved down; lanes past the data hold any power, times zero.
 */
CP_VAES_TARGET static __m128i ghash_quad(const struct vkeys *k, __m128i y, const uint8_t *p, size_t len)
{
    struct vacc a = vacc_zero();
    long long shift = 2 * (4 - (long long)((len + 15) / 16)); /* in qwords */
    __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(shift), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    __m512i pw = _mm512_permutexvar_epi64(idx, k->hp[3]);
    __m512i x = rev64(_mm512_maskz_loadu_epi8(len >= 64 ? ~0ull : (1ull << len) - 1u, p));
    vmul_add(&a, _mm512_xor_si512(x, _mm512_zextsi128_si512(y)), pw, _mm512_xor_si512(pw, swap64(pw)));
    return vreduce(a);
}

/*
 * Fewer than 16 blocks (len < CHUNK bytes, zero-padded to whole blocks) into Y as one chunk: the m blocks
 * sit at the chunk's end so they meet H^m..H^1, and Y joins the first of them. Private copy: p is read once.
 */
CP_VAES_TARGET static __m128i ghash_partial(const struct vkeys *k, __m128i y, const uint8_t *p, size_t len)
{
    uint8_t buf[CHUNK] __attribute__((aligned(64)));
    size_t first = CHUNK - 16 * ((len + 15) / 16);
    struct vacc a = vacc_zero();
    if (len == 0)
        return y;
    if (len <= 64)
        return ghash_quad(k, y, p, len);
#pragma GCC unroll 4
    for (int j = 0; j < VREGS; j++)
        store64(buf + 64 * j, _mm512_setzero_si512());
    cp_copy_bytes(buf + first, p, len);
    store16(buf + first, _mm_xor_si128(load16(buf + first), byte_reverse(y)));
    for (size_t j = first / 64; j < VREGS; j++)
        absorb_quad(&a, k, (int)j, load64(buf + 64 * j), _mm_setzero_si128());
    return vreduce(a);
}

/* Y after len bytes at p: whole chunks, then the rest. */
CP_VAES_TARGET static __m128i absorb(const struct vkeys *k, __m128i y, const uint8_t *p, size_t len)
{
    size_t n = len / CHUNK;
    return ghash_partial(k, ghash_chunks(k, y, p, n), p + n * CHUNK, len - n * CHUNK);
}

/* S = (Y xor the length block) H, in GCM byte order: H^1 is lane 3 of the last quad. */
CP_VAES_TARGET static __m128i ghash_final(const struct vkeys *k, __m128i y, size_t aad_len, size_t len)
{
    struct vacc a = vacc_zero();
    __m128i lengths = _mm_set_epi64x((long long)((uint64_t)aad_len * 8u), (long long)((uint64_t)len * 8u));
    vmul_add(&a, _mm512_inserti32x4(_mm512_setzero_si512(), _mm_xor_si128(y, lengths), 3), k->hp[3], k->hk[3]);
    return byte_reverse(vreduce(a));
}

/* E(K, J0), the tag's mask: 14 rounds on one block, started first so they overlap the bulk. */
CP_VAES_TARGET static __m128i tag_mask(const struct vkeys *k, const uint8_t j0[16])
{
    __m128i b = _mm_xor_si128(load16(j0), _mm512_castsi512_si128(k->rk[0]));
    for (int r = 1; r < 14; r++)
        b = _mm_aesenc_si128(b, _mm512_castsi512_si128(k->rk[r]));
    return _mm_aesenclast_si128(b, _mm512_castsi512_si128(k->rk[14]));
}

/* Key stream for the (< CHUNK) tail into the private buf, xored with the zero-padded input copied there
 * (in may be buf itself). */
CP_VAES_TARGET static void tail_xor(struct vkeys *k, uint8_t buf[CHUNK], const uint8_t *in, size_t len)
{
    __m512i c[VREGS];
    cp_copy_bytes(buf, in, len);
    cp_zero_bytes(buf + len, CHUNK - len);
    ctr_chunk(k, buf, buf, c);
    cp_zero_bytes(buf + len, CHUNK - len); /* key stream beyond the data: never hashed, never kept */
}

CP_VAES_TARGET static void setup(struct vkeys *k, const cp_gcm_ctx *ctx, const uint8_t j0[16])
{
    vkeys_init(k, ctx);
    vkeys_counters(k, j0, cp_load_be32(j0 + 12) + 1u);
}

CP_VAES_TARGET void cp_vaes512_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad,
                                    size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16])
{
    struct vkeys k;
    uint8_t tail[CHUNK] __attribute__((aligned(64)));
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    setup(&k, ctx, j0);
    __m128i mask = tag_mask(&k, j0);
    __m128i y = seal_chunks(&k, absorb(&k, _mm_setzero_si128(), aad, aad_len), in, out, n);
    if (rest > 0) { /* ciphertext made privately, hashed there, then copied out: out stays write-only */
        tail_xor(&k, tail, in + n * CHUNK, rest);
        y = ghash_partial(&k, y, tail, rest);
        cp_copy_bytes(out + n * CHUNK, tail, rest);
    }
    store16(tag, _mm_xor_si128(ghash_final(&k, y, aad_len, len), mask));
}

CP_VAES_TARGET void cp_vaes512_open(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad,
                                    size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16],
                                    const uint8_t *place)
{
    struct vkeys k;
    uint8_t tail[CHUNK] __attribute__((aligned(64)));
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    setup(&k, ctx, j0);
    __m128i mask = tag_mask(&k, j0);
    __m128i y = open_chunks(&k, absorb(&k, _mm_setzero_si128(), aad, aad_len), in, out, n, place);
    if (rest > 0) { /* the input tail read once into private memory; hashed and decrypted there */
        cp_copy_bytes(tail, in + n * CHUNK, rest);
        y = ghash_partial(&k, y, tail, rest);
        tail_xor(&k, tail, tail, rest);
        cp_copy_bytes(out + n * CHUNK, tail, rest);
        cp_wipe_bytes(tail, sizeof(tail));
    }
    store16(tag, _mm_xor_si128(ghash_final(&k, y, aad_len, len), mask));
}

CP_VAES_TARGET void cp_vaes512_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                                     size_t c_len, uint8_t s[16])
{
    struct vkeys k;
    vkeys_init(&k, ctx);
    __m128i y = absorb(&k, absorb(&k, _mm_setzero_si128(), aad, aad_len), c, c_len);
    store16(s, ghash_final(&k, y, aad_len, c_len));
}

/* CTR alone (cp_gcm_open's second pass, after the tag matched). */
CP_VAES_TARGET void cp_vaes512_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out,
                                   size_t len)
{
    struct vkeys k;
    uint8_t tail[CHUNK] __attribute__((aligned(64)));
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    setup(&k, ctx, j0);
    for (size_t c = 0; c < n; c++, in += CHUNK, out += CHUNK) {
        __m512i b[VREGS];
        ctr_chunk(&k, in, out, b);
    }
    if (rest > 0) {
        tail_xor(&k, tail, in, rest);
        cp_copy_bytes(out, tail, rest);
        cp_wipe_bytes(tail, sizeof(tail));
    }
}
