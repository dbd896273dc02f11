/* Shared between the cp_gcm sources only: the per-implementation entry points and byte helpers. */
#ifndef CP_GCM_INTERNAL_H
#define CP_GCM_INTERNAL_H

#include "cp_gcm.h"

#define CP_GCM_CTX_MAGIC 0x4d434743u /* "CGCM" */

/*
 * Each implementation provides the same four operations. j0 is the pre-counter block IV || 0^31 || 1;
 * ctr encrypts starting from inc32(j0); ghash computes S = GHASH_H(A || pad || C || pad || [len(A)]64 ||
 * [len(C)]64) in GCM byte order.
 */
void cp_portable_setup(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES]);
void cp_portable_encrypt_block(const cp_gcm_ctx *ctx, const uint8_t in[16], uint8_t out[16]);
void cp_portable_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out,
                     size_t len);
void cp_portable_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                       size_t c_len, uint8_t s[16]);

void cp_aesni_setup(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES]);
void cp_aesni_encrypt_block(const cp_gcm_ctx *ctx, const uint8_t in[16], uint8_t out[16]);

void cp_aesni_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len);
void cp_aesni_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                    size_t c_len, uint8_t s[16]);

/* Incremental GHASH on the AES-NI context: y is the running value in the reflected domain (start at 0);
 * update absorbs len bytes (a partial last block zero-padded); finish absorbs the length block into S. */
void cp_aesni_ghash_update(const cp_gcm_ctx *ctx, uint8_t y[16], const uint8_t *p, size_t len);
void cp_aesni_ghash_finish(const cp_gcm_ctx *ctx, const uint8_t y[16], size_t aad_len, size_t c_len,
                           uint8_t s[16]);

/* Fused AES-NI passes: seal encrypts in -> out and hashes the ciphertext from a private copy (out is never
 * read); ghash_copy hashes `in` (each byte read once) while copying it to the private out. Both write S as
 * cp_aesni_ghash would. */
void cp_aesni_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                   const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16]);
void cp_aesni_ghash_copy(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *in,
                         uint8_t *out, size_t len, uint8_t s[16]);

/*
 * The VAES implementations share the AES-NI key setup, single-block encryption and context layout, and
 * add fused passes: seal encrypts in -> out and hashes the ciphertext from registers (out is never read);
 * (512-bit) open hashes and decrypts each block of `in` read once (in -> out). Both write S as *_ghash
 * would.
 */
void cp_vaes_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len);
void cp_vaes_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c, size_t c_len,
                   uint8_t s[16]);
void cp_vaes_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                  const uint8_t *in, uint8_t *out, size_t len, uint8_t s[16]);
/* GHASH (S, as *_ghash) over `in` while copying it to `out`: every input byte is read once. */
void cp_vaes_ghash_copy(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *in,
                        uint8_t *out, size_t len, uint8_t s[16]);
void cp_vaes512_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len);
void cp_vaes512_ghash(const cp_gcm_ctx *ctx, const uint8_t *aad, size_t aad_len, const uint8_t *c,
                      size_t c_len, uint8_t s[16]);
/* The 512-bit seal and open write the whole tag T = E(K, J0) xor S (its 14 rounds overlap the bulk). */
void cp_vaes512_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16]);
/* open decrypts into out (private scratch) and, as it goes, fetches the lines of `place` (where the caller
 * copies the plaintext once the tag matched) for writing: a prefetch only, place is never read or written. */
void cp_vaes512_open(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16], const uint8_t *place);

/* Our own byte helpers: there is no libc in the firmware. Lengths here are small (at most 16) but for
 * cp_copy_string's. */
static inline void cp_copy_bytes(uint8_t *dst, const uint8_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = src[i];
}

/* The CPU's string copy (rep movsb): for pages. Measured in the guest for the open's copy into place
 * (docs/crypto.md, session 12): faster than an AVX2 loop into guest RAM the cache does not hold. */
static inline void cp_copy_string(uint8_t *dst, const uint8_t *src, size_t n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static inline void cp_zero_bytes(uint8_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = 0;
}

/* Zeroing that the compiler may not drop as a dead store (key material, computed tags). */
static inline void cp_wipe_bytes(void *dst, size_t n)
{
    volatile uint8_t *p = (volatile uint8_t *)dst;
    for (size_t i = 0; i < n; i++)
        p[i] = 0;
}

static inline void cp_store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void cp_store_be64(uint8_t *p, uint64_t v)
{
    cp_store_be32(p, (uint32_t)(v >> 32));
    cp_store_be32(p + 4, (uint32_t)v);
}

static inline uint32_t cp_load_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint64_t cp_load_be64(const uint8_t *p)
{
    return ((uint64_t)cp_load_be32(p) << 32) | cp_load_be32(p + 4);
}

/* The GHASH length block [len(A)]64 || [len(C)]64, in bits. */
static inline void cp_gcm_length_block(uint8_t block[16], size_t aad_len, size_t c_len)
{
    cp_store_be64(block, (uint64_t)aad_len * 8u);
    cp_store_be64(block + 8, (uint64_t)c_len * 8u);
}

#endif /* CP_GCM_INTERNAL_H */
