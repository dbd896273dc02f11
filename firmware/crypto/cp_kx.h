/*
 * cp_kx: the key-exchange primitives of the confplan firmware (migration helper, CPL3 only), for the SNP
 * key release (docs/key-release.md): SHA-256, HMAC-SHA256, HKDF-SHA256 (RFC 5869), X25519 (RFC 7748) and
 * RDRAND. Freestanding C, no libc, no tables; docs/crypto.md gives the constant-time argument.
 *
 *   sha256.c   FIPS 180-4 SHA-256; HMAC (RFC 2104); HKDF extract + expand
 *   x25519.c   Montgomery ladder over GF(2^255 - 19), 5 x 51-bit limbs, masked swaps only
 *   rdrand.c   RDRAND, 10 tries per 64-bit word (the guest's only entropy: CP_FEAT_RDRAND says it exists)
 */
#ifndef CP_KX_H
#define CP_KX_H

#include <stddef.h>
#include <stdint.h>

#define CP_SHA256_BYTES 32u
#define CP_SHA256_BLOCK 64u
#define CP_HKDF_MAX_OUT (255u * CP_SHA256_BYTES)
#define CP_X25519_BYTES 32u

typedef struct cp_sha256_ctx {
    uint32_t h[8];
    uint64_t total;                /* bytes hashed so far */
    uint8_t buf[CP_SHA256_BLOCK];  /* the partial block */
    uint32_t fill;                 /* bytes in buf */
    uint32_t pad;
} cp_sha256_ctx;

typedef struct cp_hmac_sha256_ctx {
    cp_sha256_ctx inner;
    cp_sha256_ctx outer;
} cp_hmac_sha256_ctx;

void cp_sha256_init(cp_sha256_ctx *ctx);
void cp_sha256_update(cp_sha256_ctx *ctx, const uint8_t *data, size_t len);
/* Writes the digest and wipes ctx. */
void cp_sha256_final(cp_sha256_ctx *ctx, uint8_t out[CP_SHA256_BYTES]);
void cp_sha256(const uint8_t *data, size_t len, uint8_t out[CP_SHA256_BYTES]);

/* HMAC-SHA256 with a key of any length (longer than a block: hashed first, RFC 2104). */
void cp_hmac_sha256_init(cp_hmac_sha256_ctx *ctx, const uint8_t *key, size_t key_len);
void cp_hmac_sha256_update(cp_hmac_sha256_ctx *ctx, const uint8_t *data, size_t len);
void cp_hmac_sha256_final(cp_hmac_sha256_ctx *ctx, uint8_t out[CP_SHA256_BYTES]); /* wipes ctx */
void cp_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *data, size_t len,
                    uint8_t out[CP_SHA256_BYTES]);

/* RFC 5869. extract: prk = HMAC(salt, ikm) (salt NULL/0 = 32 zero bytes). expand: out_len <= 255 * 32,
 * returns 0, or -1 (nothing written) for a longer out_len. cp_hkdf_sha256 = extract then expand. */
void cp_hkdf_sha256_extract(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                            uint8_t prk[CP_SHA256_BYTES]);
int cp_hkdf_sha256_expand(const uint8_t prk[CP_SHA256_BYTES], const uint8_t *info, size_t info_len,
                          uint8_t *out, size_t out_len);
int cp_hkdf_sha256(const uint8_t *salt, size_t salt_len, const uint8_t *ikm, size_t ikm_len,
                   const uint8_t *info, size_t info_len, uint8_t *out, size_t out_len);

/*
 * RFC 7748 X25519: out = scalar * u(point). The scalar is clamped (bits 0-2 and 255 cleared, bit 254 set);
 * the top bit of the point's u is ignored and non-canonical u (>= 2^255 - 19) are reduced, as the RFC
 * says. Constant time in the scalar and the point. Returns 0, or -1 if the result is all zero (a low-order
 * point: the caller must refuse it); out is written either way.
 */
int cp_x25519(uint8_t out[CP_X25519_BYTES], const uint8_t scalar[CP_X25519_BYTES],
              const uint8_t point[CP_X25519_BYTES]);
/* out = scalar * 9 (the public key of a private scalar). */
void cp_x25519_base(uint8_t out[CP_X25519_BYTES], const uint8_t scalar[CP_X25519_BYTES]);
/* 1 if the 32 bytes are all zero (constant time), else 0. */
int cp_x25519_is_zero(const uint8_t v[CP_X25519_BYTES]);

/* n bytes from RDRAND (10 tries per 64-bit word). Returns 1, or 0 (out wiped) if RDRAND kept failing. Only
 * call it where the CPU has RDRAND (CP_CPU_RDRAND): otherwise it faults (#UD). */
int cp_rdrand_bytes(uint8_t *out, size_t n);

#endif /* CP_KX_H */
