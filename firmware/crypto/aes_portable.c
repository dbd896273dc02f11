/*
 * Portable AES-256 and GHASH in plain C, for CPUs without AES-NI/PCLMULQDQ.
 * GHASH is constant time (bitwise, masks instead of branches). AES uses the 256-byte S-box table, so its
 * timing can depend on cache state: acceptable only as a fallback (every SEV-capable CPU has AES-NI).
 */
#include "cp_gcm_internal.h"

static const uint8_t sbox[256] = {
    0x63, 0x7c, 0x77, 0x7b, 0xf2, 0x6b, 0x6f, 0xc5, 0x30, 0x01, 0x67, 0x2b, 0xfe, 0xd7, 0xab, 0x76,
    0xca, 0x82, 0xc9, 0x7d, 0xfa, 0x59, 0x47, 0xf0, 0xad, 0xd4, 0xa2, 0xaf, 0x9c, 0xa4, 0x72, 0xc0,
    0xb7, 0xfd, 0x93, 0x26, 0x36, 0x3f, 0xf7, 0xcc, 0x34, 0xa5, 0xe5, 0xf1, 0x71, 0xd8, 0x31, 0x15,
    0x04, 0xc7, 0x23, 0xc3, 0x18, 0x96, 0x05, 0x9a, 0x07, 0x12, 0x80, 0xe2, 0xeb, 0x27, 0xb2, 0x75,
    0x09, 0x83, 0x2c, 0x1a, 0x1b, 0x6e, 0x5a, 0xa0, 0x52, 0x3b, 0xd6, 0xb3, 0x29, 0xe3, 0x2f, 0x84,
    0x53, 0xd1, 0x00, 0xed, 0x20, 0xfc, 0xb1, 0x5b, 0x6a, 0xcb, 0xbe, 0x39, 0x4a, 0x4c, 0x58, 0xcf,
    0xd0, 0xef, 0xaa, 0xfb, 0x43, 0x4d, 0x33, 0x85, 0x45, 0xf9, 0x02, 0x7f, 0x50, 0x3c, 0x9f, 0xa8,
    0x51, 0xa3, 0x40, 0x8f, 0x92, 0x9d, 0x38, 0xf5, 0xbc, 0xb6, 0xda, 0x21, 0x10, 0xff, 0xf3, 0xd2,
    0xcd, 0x0c, 0x13, 0xec, 0x5f, 0x97, 0x44, 0x17, 0xc4, 0xa7, 0x7e, 0x3d, 0x64, 0x5d, 0x19, 0x73,
    0x60, 0x81, 0x4f, 0xdc, 0x22, 0x2a, 0x90, 0x88, 0x46, 0xee, 0xb8, 0x14, 0xde, 0x5e, 0x0b, 0xdb,
    0xe0, 0x32, 0x3a, 0x0a, 0x49, 0x06, 0x24, 0x5c, 0xc2, 0xd3, 0xac, 0x62, 0x91, 0x95, 0xe4, 0x79,
    0xe7, 0xc8, 0x37, 0x6d, 0x8d, 0xd5, 0x4e, 0xa9, 0x6c, 0x56, 0xf4, 0xea, 0x65, 0x7a, 0xae, 0x08,
    0xba, 0x78, 0x25, 0x2e, 0x1c, 0xa6, 0xb4, 0xc6, 0xe8, 0xdd, 0x74, 0x1f, 0x4b, 0xbd, 0x8b, 0x8a,
    0x70, 0x3e, 0xb5, 0x66, 0x48, 0x03, 0xf6, 0x0e, 0x61, 0x35, 0x57, 0xb9, 0x86, 0xc1, 0x1d, 0x9e,
    0xe1, 0xf8, 0x98, 0x11, 0x69, 0xd9, 0x8e, 0x94, 0x9b, 0x1e, 0x87, 0xe9, 0xce, 0x55, 0x28, 0xdf,
    0x8c, 0xa1, 0x89, 0x0d, 0xbf, 0xe6, 0x42, 0x68, 0x41, 0x99, 0x2d, 0x0f, 0xb0, 0x54, 0xbb, 0x16,
};

static uint8_t xtime(uint8_t x)
{
    return (uint8_t)((x << 1) ^ (0x1bu & (uint8_t)-(x >> 7)));
}

/* FIPS-197 key expansion for Nk = 8, Nr = 14, kept in byte order (word i at bytes 4i..4i+3). */
static void expand_key(uint8_t round_keys[15][16], const uint8_t key[CP_GCM_KEY_BYTES])
{
    uint8_t *rk = (uint8_t *)round_keys; /* the whole 240-byte schedule */
    uint8_t rcon = 1;
    cp_copy_bytes(rk, key, CP_GCM_KEY_BYTES);
    for (int i = 8; i < 60; i++) {
        uint8_t t[4];
        cp_copy_bytes(t, rk + 4 * (i - 1), 4);
        if (i % 8 == 0) {
            uint8_t t0 = t[0];
            t[0] = (uint8_t)(sbox[t[1]] ^ rcon);
            t[1] = sbox[t[2]];
            t[2] = sbox[t[3]];
            t[3] = sbox[t0];
            rcon = xtime(rcon);
        } else if (i % 8 == 4) {
            for (int j = 0; j < 4; j++)
                t[j] = sbox[t[j]];
        }
        for (int j = 0; j < 4; j++)
            rk[4 * i + j] = (uint8_t)(rk[4 * (i - 8) + j] ^ t[j]);
    }
}

static void add_round_key(uint8_t s[16], const uint8_t *rk)
{
    for (int i = 0; i < 16; i++)
        s[i] ^= rk[i];
}

/* SubBytes and ShiftRows together: byte (row r, column c) comes from column c + r. */
static void sub_shift(uint8_t s[16])
{
    uint8_t t[16];
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < 4; r++)
            t[4 * c + r] = sbox[s[4 * ((c + r) & 3) + r]];
    cp_copy_bytes(s, t, 16);
}

static void mix_columns(uint8_t s[16])
{
    for (int c = 0; c < 4; c++) {
        uint8_t *col = s + 4 * c;
        uint8_t a0 = col[0], a1 = col[1], a2 = col[2], a3 = col[3];
        uint8_t all = (uint8_t)(a0 ^ a1 ^ a2 ^ a3);
        col[0] = (uint8_t)(a0 ^ all ^ xtime((uint8_t)(a0 ^ a1)));
        col[1] = (uint8_t)(a1 ^ all ^ xtime((uint8_t)(a1 ^ a2)));
        col[2] = (uint8_t)(a2 ^ all ^ xtime((uint8_t)(a2 ^ a3)));
        col[3] = (uint8_t)(a3 ^ all ^ xtime((uint8_t)(a3 ^ a0)));
    }
}

void cp_portable_encrypt_block(const cp_gcm_ctx *ctx, const uint8_t in[16], uint8_t out[16])
{
    const uint8_t *rk = (const uint8_t *)ctx->round_keys;
    uint8_t s[16];
    cp_copy_bytes(s, in, 16);
    add_round_key(s, rk);
    for (int round = 1; round < 14; round++) {
        sub_shift(s);
        mix_columns(s);
        add_round_key(s, rk + 16 * round);
    }
    sub_shift(s);
    add_round_key(s, rk + 16 * 14);
    cp_copy_bytes(out, s, 16);
}

void cp_portable_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len)
{
    uint8_t cb[16];
    uint8_t ks[16];
    uint32_t ctr = cp_load_be32(j0 + 12);
    cp_copy_bytes(cb, j0, 12);
    while (len > 0) {
        size_t n = len < 16 ? len : 16;
        ctr++; /* inc32: wraps mod 2^32, as SP 800-38D says */
        cp_store_be32(cb + 12, ctr);
        cp_portable_encrypt_block(ctx, cb, ks);
        for (size_t i = 0; i < n; i++)
            out[i] = (uint8_t)(in[i] ^ ks[i]);
        in += n;
        out += n;
        len -= n;
    }
    cp_wipe_bytes(ks, sizeof(ks));
}

/* A GHASH field element as two big-endian halves: bit 0 of the block is the top bit of hi. */
typedef struct {
    uint64_t hi, lo;
} gf128;

/* X * Y in GF(2^128) per SP 800-38D Algorithm 1, without secret-dependent branches. */
static gf128 gf_mul(gf128 x, gf128 y)
{
    gf128 z = {0, 0};
    gf128 v = y;
    for (int i = 0; i < 128; i++) {
        uint64_t word = i < 64 ? x.hi : x.lo;
        uint64_t bit = (word >> (63 - (i & 63))) & 1u;
        uint64_t take = (uint64_t)0 - bit;
        z.hi ^= v.hi & take;
        z.lo ^= v.lo & take;
        uint64_t carry = (uint64_t)0 - (v.lo & 1u);
        v.lo = (v.lo >> 1) | (v.hi << 63);
        v.hi = (v.hi >> 1) ^ (0xe100000000000000ull & carry);
    }
    return z;
}

static gf128 load_block(const uint8_t b[16])
{
    gf128 r = {cp_load_be64(b), cp_load_be64(b + 8)};
    return r;
}

/* Absorbs data, zero-padding a final partial block. */
static gf128 ghash_absorb(gf128 y, gf128 h, const uint8_t *p, size_t len)
{
    while (len >= 16) {
        gf128 x = load_block(p);
        y.hi ^= x.hi;
        y.lo ^= x.lo;
        y = gf_mul(y, h);
        p += 16;
        len -= 16;
    }
    if (len > 0) {
        uint8_t last[16];
        cp_zero_bytes(last, sizeof(last));
        cp_copy_bytes(last, p, len);
        gf128 x = load_block(last);
        y.hi ^= x.hi;
        y.lo ^= x.lo;
        y = gf_mul(y, h);
    }
    return y;
}

void cp_portable_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                       size_t c_len, uint8_t s[16])
{
    uint8_t lens[16];
    gf128 h = load_block(ctx->h_powers[0]);
    gf128 y = {0, 0};
    y = ghash_absorb(y, h, aad, aad_len);
    y = ghash_absorb(y, h, c, c_len);
    cp_gcm_length_block(lens, aad_len, c_len);
    y = ghash_absorb(y, h, lens, sizeof(lens));
    cp_store_be64(s, y.hi);
    cp_store_be64(s + 8, y.lo);
}

/* Round keys, then H = E(K, 0^128) in GCM byte order (this implementation only uses H^1). */
void cp_portable_setup(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES])
{
    uint8_t zero[16];
    expand_key(ctx->round_keys, key);
    cp_zero_bytes(zero, sizeof(zero));
    cp_portable_encrypt_block(ctx, zero, ctx->h_powers[0]);
}
