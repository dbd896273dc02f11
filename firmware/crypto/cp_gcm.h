/*
 * cp_gcm: AES-256-GCM for the confplan firmware (migration helper, CPL3 only).
 *
 * Freestanding C: no libc, only compiler headers. Four implementations, picked explicitly by the caller
 * (the guest cannot rely on CPUID at CPL3; the VMM passes the host's features in the boot parameters):
 *   CP_GCM_IMPL_PORTABLE  plain C, any x86-64 CPU (table-based AES: see docs/crypto.md for its caveat)
 *   CP_GCM_IMPL_AESNI     AES-NI + PCLMULQDQ: 8 blocks interleaved, GHASH aggregated over 16 blocks; seal
 *                         fused (CTR and GHASH in one pass), the helper's open hashes while copying
 *   CP_GCM_IMPL_VAES      256-bit registers (VAES + VPCLMULQDQ, AVX2): seal fuses CTR and GHASH in one
 *                         pass, 16 blocks in flight, GHASH aggregated over 16 blocks
 *   CP_GCM_IMPL_VAES512   the same on 512-bit registers (AVX-512F/BW/VL + VAES + VPCLMULQDQ, ZMM state)
 * All give bit-identical results. Never call any of this at CPL0: it uses SSE registers.
 *
 * Only 12-byte nonces and 16-byte tags are supported (the only shapes the migration helper uses).
 */
#ifndef CP_GCM_H
#define CP_GCM_H

#include <stddef.h>
#include <stdint.h>

#define CP_GCM_KEY_BYTES 32u
#define CP_GCM_IV_BYTES 12u
#define CP_GCM_TAG_BYTES 16u
#define CP_GCM_PAGE_BYTES 4096u
/* NIST SP 800-38D limits for one call: plaintext <= 2^39 - 256 bits, AAD < 2^64 bits. */
#define CP_GCM_MAX_TEXT_BYTES ((((uint64_t)1) << 36) - 32u)
#define CP_GCM_MAX_AAD_BYTES ((((uint64_t)1) << 61) - 1u)

enum cp_gcm_impl {
    CP_GCM_IMPL_PORTABLE = 0,
    CP_GCM_IMPL_AESNI = 1,
    CP_GCM_IMPL_VAES = 2,
    CP_GCM_IMPL_VAES512 = 3,
};

#define CP_GCM_H_POWERS 16u /* H^1..H^16 per key: the VAES paths fold 16 blocks per reduction */

/* Feature-bit word the VMM hands to the guest (boot parameters). */
#define CP_CPU_AESNI (1u << 0)   /* CPUID.1:ECX[25] */
#define CP_CPU_PCLMUL (1u << 1)  /* CPUID.1:ECX[1] */
#define CP_CPU_SSSE3 (1u << 2)   /* CPUID.1:ECX[9] */
#define CP_CPU_SSE41 (1u << 3)   /* CPUID.1:ECX[19] */
#define CP_CPU_AVX2 (1u << 4)    /* CPUID.7.0:EBX[5] */
#define CP_CPU_VAES (1u << 5)    /* CPUID.7.0:ECX[9] */
#define CP_CPU_VPCLMUL (1u << 6) /* CPUID.7.0:ECX[10] */
#define CP_CPU_YMM_STATE (1u << 7) /* XCR0 bits 1 and 2 set (the VMM's KVM_SET_XCRS): YMM usable */
#define CP_CPU_AVX512F (1u << 8)  /* CPUID.7.0:EBX[16] */
#define CP_CPU_AVX512BW (1u << 9) /* CPUID.7.0:EBX[30] */
#define CP_CPU_AVX512VL (1u << 10) /* CPUID.7.0:EBX[31] */
#define CP_CPU_ZMM_STATE (1u << 11) /* XCR0 bits 5, 6, 7 (opmask, ZMM_Hi256, Hi16_ZMM) also set: ZMM usable */
#define CP_CPU_RDRAND (1u << 12)  /* CPUID.1:ECX[30]: not for GCM; the SNP key release's entropy (cp_kx.h) */

/*
 * Per-key state: AES-256 round keys and the GHASH key powers H^1..H^8 in the chosen implementation's
 * representation. Byte arrays only, so it has no alignment requirement (callers from ctypes or from a
 * packed shared page are fine). Treat as opaque; wipe it with cp_gcm_wipe when the key is retired.
 */
typedef struct cp_gcm_ctx {
    uint8_t round_keys[15][16];
    uint8_t h_powers[CP_GCM_H_POWERS][16];
    uint32_t impl;
    uint32_t magic; /* CP_GCM_CTX_MAGIC once initialised; any call on another value fails */
} cp_gcm_ctx;

/*
 * Nonce sequence: 4-byte sender id || 8-byte big-endian counter. One sequence per (key, sender): the
 * counter only moves forward and refuses to wrap, so a nonce never repeats under one key as long as each
 * sender id is used by exactly one sequence for that key.
 */
typedef struct cp_gcm_nonce_seq {
    uint32_t sender_id;
    uint32_t exhausted; /* set once the counter has handed out its last value */
    uint64_t next;
} cp_gcm_nonce_seq;

/*
 * Folds the raw CPUID words the VMM offers the guest (leaf 1 ECX, leaf 7 subleaf 0 EBX and ECX) and the XCR0
 * it sets into CP_CPU_* bits (ZMM state needs XCR0 bits 1, 2, 5, 6 and 7 all set).
 */
uint32_t cp_cpu_features_from_cpuid(uint32_t leaf1_ecx, uint32_t leaf7_ebx, uint32_t leaf7_ecx, uint64_t xcr0);

/* The fastest implementation the feature word allows (CP_GCM_IMPL_PORTABLE when in doubt). */
uint32_t cp_gcm_pick_impl(uint32_t cpu_features);

/* Expands key into ctx for impl. Returns 0, or -1 (ctx marked unusable) for an unknown impl. */
int cp_gcm_init(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES], uint32_t impl);

/* Overwrites every byte of ctx (round keys included) so the key does not linger in memory. */
void cp_gcm_wipe(cp_gcm_ctx *ctx);

size_t cp_gcm_ctx_size(void);

/*
 * Encrypts len bytes from in to out and writes the 16-byte tag. in == out is allowed; other overlaps are
 * not. Returns 0, or -1 (nothing written) for an uninitialised ctx or lengths beyond the GCM limits.
 * The caller must never reuse iv under the same key: use cp_gcm_nonce_next.
 */
int cp_gcm_seal(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[CP_GCM_TAG_BYTES]);

/*
 * Verifies tag over aad and the ciphertext first (constant-time compare), and only then decrypts into
 * out. Returns 0, or -1 with out untouched. in must not be writable by an untrusted party during the call
 * (copy a sealed page out of shared memory first): the ciphertext is read twice.
 */
int cp_gcm_open(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                size_t aad_len, const uint8_t *in, uint8_t *out, size_t len,
                const uint8_t tag[CP_GCM_TAG_BYTES]);

/*
 * Seal and open where one side of the call is memory another party may write while we work (the host's
 * mailbox slot). seal_shared: `out` is shared; it is only written, never read back (the ciphertext is
 * hashed from private copies as it is made). open_shared: `in` and `tag` are shared; each byte is read
 * exactly once, so what was authenticated is what gets decrypted. `scratch` is a private buffer of len
 * bytes: VAES and AES-NI hash the ciphertext while copying it there and decrypt from there once the tag
 * matched; VAES512 decrypts into it in the same pass as GHASH and copies the plaintext to `out` once the
 * tag matched (wiping it on a refusal); portable seals into it / copies the ciphertext into it first. Seal
 * is one pass (no scratch) on all but portable. A refused
 * open leaves `out` untouched and no plaintext in `scratch`. No overlap between in, out, scratch.
 */
int cp_gcm_seal_shared(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[CP_GCM_TAG_BYTES],
                       uint8_t *scratch);
int cp_gcm_open_shared(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, uint8_t *out, size_t len,
                       const uint8_t tag[CP_GCM_TAG_BYTES], uint8_t *scratch);

void cp_gcm_nonce_seq_init(cp_gcm_nonce_seq *seq, uint32_t sender_id, uint64_t first_counter);

/* Writes the next nonce to iv and advances. Returns 0, or -1 once the counter space is used up. */
int cp_gcm_nonce_next(cp_gcm_nonce_seq *seq, uint8_t iv[CP_GCM_IV_BYTES]);

/*
 * Seals n 4 KiB pages: page i from in + 4096*i to out + 4096*i with AAD aad + aad_len*i, under a nonce
 * taken from seq (written to ivs + 12*i), tag to tags + 16*i. Returns the number of pages sealed (n, or
 * fewer if seq ran out of nonces).
 */
size_t cp_gcm_seal_pages(const cp_gcm_ctx *ctx, cp_gcm_nonce_seq *seq, size_t n, const uint8_t *aad,
                         size_t aad_len, const uint8_t *in, uint8_t *out, uint8_t *ivs, uint8_t *tags);

/*
 * Opens n 4 KiB pages laid out as cp_gcm_seal_pages writes them, the way the migration helper does
 * (cp_gcm_open_shared through a private scratch page on the stack). A page whose tag fails leaves its
 * output page untouched; status[i] (if status is not NULL) is 0 or -1 per page. Returns the number refused.
 */
size_t cp_gcm_open_pages(const cp_gcm_ctx *ctx, size_t n, const uint8_t *ivs, const uint8_t *aad,
                         size_t aad_len, const uint8_t *in, uint8_t *out, const uint8_t *tags,
                         int32_t *status);

#endif /* CP_GCM_H */
