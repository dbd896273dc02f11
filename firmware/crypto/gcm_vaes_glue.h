/* The entry points of the 256-bit VAES path around its vector helpers: included by gcm_vaes.c after it
 * defined struct vkeys, vkeys_init, vkeys_counters, ghash_chunks, seal_chunks, CP_VAES_TARGET, CHUNK and
 * VAES_FN(name), the name of its entry points. (gcm_vaes512.c runs the whole GCM itself: AAD, tails and
 * tag on its own reduction.) */
#ifndef VAES_FN
#error "define VAES_FN before including gcm_vaes_glue.h"
#endif

/* Y after the AAD: whole chunks here, the rest on the AES-NI code. */
CP_VAES_TARGET static __m128i absorb(const cp_gcm_ctx *ctx, const struct vkeys *k, __m128i y, const uint8_t *p,
                                     size_t len)
{
    uint8_t yb[16];
    size_t n = len / CHUNK;
    y = ghash_chunks(k, y, p, n);
    store16(yb, y);
    cp_aesni_ghash_update(ctx, yb, p + n * CHUNK, len - n * CHUNK);
    return load16(yb);
}

/* j0 with its counter word set so cp_aesni_ctr (which starts at counter + 1) continues at `next`. */
static void tail_j0(uint8_t out[16], const uint8_t j0[16], uint32_t next)
{
    cp_copy_bytes(out, j0, 12);
    cp_store_be32(out + 12, next - 1u);
}

CP_VAES_TARGET void VAES_FN(seal)(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                                 const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16])
{
    struct vkeys k;
    uint8_t yb[16], rest_j0[16], tail[CHUNK];
    uint32_t ctr = cp_load_be32(j0 + 12) + 1u;
    size_t n = len / CHUNK, rest = len - n * CHUNK;
    vkeys_init(&k, ctx);
    vkeys_counters(&k, j0, ctr);
    __m128i y = absorb(ctx, &k, _mm_setzero_si128(), aad, aad_len);
    y = seal_chunks(&k, y, in, out, n);
    store16(yb, y);
    if (rest > 0) { /* ciphertext made privately, hashed there, then copied out: out stays write-only */
        tail_j0(rest_j0, j0, ctr + (uint32_t)(16 * n));
        cp_aesni_ctr(ctx, rest_j0, in + n * CHUNK, tail, rest);
        cp_aesni_ghash_update(ctx, yb, tail, rest);
        cp_copy_bytes(out + n * CHUNK, tail, rest);
    }
    cp_aesni_ghash_finish(ctx, yb, aad_len, len, s);
}

CP_VAES_TARGET void VAES_FN(ghash)(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                                  size_t c_len, uint8_t s[16])
{
    struct vkeys k;
    uint8_t yb[16];
    vkeys_init(&k, ctx);
    __m128i y = absorb(ctx, &k, _mm_setzero_si128(), aad, aad_len);
    store16(yb, absorb(ctx, &k, y, c, c_len));
    cp_aesni_ghash_finish(ctx, yb, aad_len, c_len, s);
}
