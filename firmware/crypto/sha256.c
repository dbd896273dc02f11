/*
 * SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104) and HKDF-SHA256 (RFC 5869) for the firmware. Written from
 * the standards: no tables beyond the 64 round constants, no data-dependent branches or indexes (the
 * message only ever flows through additions, rotations and boolean functions), so hashing a secret takes
 * the same time whatever the secret is.
 */
#include "cp_kx.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* Volatile stores: the compiler may not drop a wipe of a buffer it considers dead. */
static void wipe(void *dst, size_t n)
{
    volatile uint8_t *p = (volatile uint8_t *)dst;
    for (size_t i = 0; i < n; i++)
        p[i] = 0;
}

static uint32_t ror(uint32_t x, unsigned n)
{
    return x >> n | x << (32 - n);
}

static uint32_t load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void compress(uint32_t h[8], const uint8_t block[CP_SHA256_BLOCK])
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = load_be32(block + 4 * i);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
    wipe(w, sizeof(w));
}

void cp_sha256_init(cp_sha256_ctx *ctx)
{
    for (int i = 0; i < 8; i++)
        ctx->h[i] = H0[i];
    ctx->total = 0;
    ctx->fill = 0;
    ctx->pad = 0;
}

void cp_sha256_update(cp_sha256_ctx *ctx, const uint8_t *data, size_t len)
{
    ctx->total += len;
    while (len > 0) {
        if (ctx->fill == 0 && len >= CP_SHA256_BLOCK) {
            compress(ctx->h, data);
            data += CP_SHA256_BLOCK;
            len -= CP_SHA256_BLOCK;
            continue;
        }
        ctx->buf[ctx->fill++] = *data++;
        len--;
        if (ctx->fill == CP_SHA256_BLOCK) {
            compress(ctx->h, ctx->buf);
            ctx->fill = 0;
        }
    }
}

void cp_sha256_final(cp_sha256_ctx *ctx, uint8_t out[CP_SHA256_BYTES])
{
    uint64_t bits = ctx->total * 8;
    ctx->buf[ctx->fill++] = 0x80;
    if (ctx->fill > CP_SHA256_BLOCK - 8) {
        while (ctx->fill < CP_SHA256_BLOCK)
            ctx->buf[ctx->fill++] = 0;
        compress(ctx->h, ctx->buf);
        ctx->fill = 0;
    }
    while (ctx->fill < CP_SHA256_BLOCK - 8)
        ctx->buf[ctx->fill++] = 0;
    for (int i = 0; i < 8; i++)
        ctx->buf[CP_SHA256_BLOCK - 1 - i] = (uint8_t)(bits >> (8 * i));
    compress(ctx->h, ctx->buf);
    for (int i = 0; i < 8; i++)
        store_be32(out + 4 * i, ctx->h[i]);
    wipe(ctx, sizeof(*ctx));
}

void cp_sha256(const uint8_t *data, size_t len, uint8_t out[CP_SHA256_BYTES])
{
    cp_sha256_ctx ctx;
    cp_sha256_init(&ctx);
    cp_sha256_update(&ctx, data, len);
    cp_sha256_final(&ctx, out);
}

/* ---- HMAC ---- */

void cp_hmac_sha256_init(cp_hmac_sha256_ctx *ctx, const uint8_t *key, size_t key_len)
{
    uint8_t k[CP_SHA256_BLOCK], pad[CP_SHA256_BLOCK];
    for (size_t i = 0; i < CP_SHA256_BLOCK; i++)
        k[i] = 0;
    if (key_len > CP_SHA256_BLOCK) {
        cp_sha256(key, key_len, k);
    } else {
        for (size_t i = 0; i < key_len; i++)
            k[i] = key[i];
    }
    for (size_t i = 0; i < CP_SHA256_BLOCK; i++)
        pad[i] = k[i] ^ 0x36;
    cp_sha256_init(&ctx->inner);
    cp_sha256_update(&ctx->inner, pad, CP_SHA256_BLOCK);
    for (size_t i = 0; i < CP_SHA256_BLOCK; i++)
        pad[i] = k[i] ^ 0x5c;
    cp_sha256_init(&ctx->outer);
    cp_sha256_update(&ctx->outer, pad, CP_SHA256_BLOCK);
    wipe(k, sizeof(k));
    wipe(pad, sizeof(pad));
}

void cp_hmac_sha256_update(cp_hmac_sha256_ctx *ctx, const uint8_t *data, size_t len)
{
    cp_sha256_update(&ctx->inner, data, len);
}

void cp_hmac_sha256_final(cp_hmac_sha256_ctx *ctx, uint8_t out[CP_SHA256_BYTES])
{
    uint8_t inner[CP_SHA256_BYTES];
    cp_sha256_final(&ctx->inner, inner);
    cp_sha256_update(&ctx->outer, inner, sizeof(inner));
    cp_sha256_final(&ctx->outer, out);
    wipe(inner, sizeof(inner));
}

void cp_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len,
                    uint8_t out[CP_SHA256_BYTES])
{
    cp_hmac_sha256_ctx ctx;
    cp_hmac_sha256_init(&ctx, key, key_len);
    cp_hmac_sha256_update(&ctx, data, len);
    cp_hmac_sha256_final(&ctx, out);
}

/* ---- HKDF ---- */

void cp_hkdf_sha256_extract(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                            uint8_t prk[CP_SHA256_BYTES])
{
    static const uint8_t zeros[CP_SHA256_BYTES] = {0};
    if (salt == 0 || salt_len == 0) { /* RFC 5869 2.2: no salt = HashLen zero bytes (the same HMAC key) */
        salt = zeros;
        salt_len = sizeof(zeros);
    }
    cp_hmac_sha256(salt, salt_len, ikm, ikm_len, prk);
}

int cp_hkdf_sha256_expand(const uint8_t prk[CP_SHA256_BYTES], const uint8_t *info, size_t info_len,
                          uint8_t *out, size_t out_len)
{
    uint8_t t[CP_SHA256_BYTES];
    cp_hmac_sha256_ctx ctx;
    if (out_len > CP_HKDF_MAX_OUT)
        return -1;
    for (size_t done = 0, n = 1; done < out_len; n++) {
        uint8_t counter = (uint8_t)n;
        cp_hmac_sha256_init(&ctx, prk, CP_SHA256_BYTES);
        if (n > 1)
            cp_hmac_sha256_update(&ctx, t, sizeof(t));
        cp_hmac_sha256_update(&ctx, info, info_len);
        cp_hmac_sha256_update(&ctx, &counter, 1);
        cp_hmac_sha256_final(&ctx, t);
        for (size_t i = 0; i < CP_SHA256_BYTES && done < out_len; i++)
            out[done++] = t[i];
    }
    wipe(t, sizeof(t));
    return 0;
}

int cp_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                   const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len)
{
    uint8_t prk[CP_SHA256_BYTES];
    if (out_len > CP_HKDF_MAX_OUT)
        return -1;
    cp_hkdf_sha256_extract(salt, salt_len, ikm, ikm_len, prk);
    int rc = cp_hkdf_sha256_expand(prk, info, info_len, out, out_len);
    wipe(prk, sizeof(prk));
    return rc;
}
