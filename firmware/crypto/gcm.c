/* cp_gcm public API: implementation choice, seal/open framing, nonce sequences, page batches. */
#include "cp_gcm_internal.h"

uint32_t cp_cpu_features_from_cpuid(uint32_t leaf1_ecx, uint32_t leaf7_ebx, uint32_t leaf7_ecx, uint64_t xcr0)
{
    uint32_t f = 0;
    f |= (leaf1_ecx >> 25 & 1u) ? CP_CPU_AESNI : 0u;
    f |= (leaf1_ecx >> 1 & 1u) ? CP_CPU_PCLMUL : 0u;
    f |= (leaf1_ecx >> 9 & 1u) ? CP_CPU_SSSE3 : 0u;
    f |= (leaf1_ecx >> 19 & 1u) ? CP_CPU_SSE41 : 0u;
    f |= (leaf7_ebx >> 5 & 1u) ? CP_CPU_AVX2 : 0u;
    f |= (leaf7_ecx >> 9 & 1u) ? CP_CPU_VAES : 0u;
    f |= (leaf7_ecx >> 10 & 1u) ? CP_CPU_VPCLMUL : 0u;
    f |= (xcr0 & 6u) == 6u ? CP_CPU_YMM_STATE : 0u;
    f |= (leaf7_ebx >> 16 & 1u) ? CP_CPU_AVX512F : 0u;
    f |= (leaf7_ebx >> 30 & 1u) ? CP_CPU_AVX512BW : 0u;
    f |= (leaf7_ebx >> 31 & 1u) ? CP_CPU_AVX512VL : 0u;
    f |= (xcr0 & 0xe6u) == 0xe6u ? CP_CPU_ZMM_STATE : 0u;
    f |= (leaf1_ecx >> 30 & 1u) ? CP_CPU_RDRAND : 0u;
    return f;
}

uint32_t cp_gcm_pick_impl(uint32_t cpu_features)
{
    const uint32_t aesni_needs = CP_CPU_AESNI | CP_CPU_PCLMUL | CP_CPU_SSSE3 | CP_CPU_SSE41;
    const uint32_t vaes_needs = aesni_needs | CP_CPU_AVX2 | CP_CPU_VAES | CP_CPU_VPCLMUL | CP_CPU_YMM_STATE;
    const uint32_t vaes512_needs = vaes_needs | CP_CPU_AVX512F | CP_CPU_AVX512BW | CP_CPU_AVX512VL | CP_CPU_ZMM_STATE;
    if ((cpu_features & vaes512_needs) == vaes512_needs)
        return CP_GCM_IMPL_VAES512;
    if ((cpu_features & vaes_needs) == vaes_needs)
        return CP_GCM_IMPL_VAES;
    if ((cpu_features & aesni_needs) == aesni_needs)
        return CP_GCM_IMPL_AESNI;
    return CP_GCM_IMPL_PORTABLE;
}

size_t cp_gcm_ctx_size(void)
{
    return sizeof(cp_gcm_ctx);
}

void cp_gcm_wipe(cp_gcm_ctx *ctx)
{
    cp_wipe_bytes(ctx, sizeof(*ctx));
}

int cp_gcm_init(cp_gcm_ctx *ctx, const uint8_t key[CP_GCM_KEY_BYTES], uint32_t impl)
{
    cp_gcm_wipe(ctx);
    if (impl == CP_GCM_IMPL_PORTABLE)
        cp_portable_setup(ctx, key);
    else if (impl == CP_GCM_IMPL_AESNI || impl == CP_GCM_IMPL_VAES || impl == CP_GCM_IMPL_VAES512)
        cp_aesni_setup(ctx, key);
    else
        return -1;
    ctx->impl = impl;
    ctx->magic = CP_GCM_CTX_MAGIC;
    return 0;
}

static int call_ok(const cp_gcm_ctx *ctx, size_t aad_len, size_t len)
{
    if (ctx == 0 || ctx->magic != CP_GCM_CTX_MAGIC)
        return 0;
    return (uint64_t)len <= CP_GCM_MAX_TEXT_BYTES && (uint64_t)aad_len <= CP_GCM_MAX_AAD_BYTES;
}

static void make_j0(uint8_t j0[16], const uint8_t iv[CP_GCM_IV_BYTES])
{
    cp_copy_bytes(j0, iv, CP_GCM_IV_BYTES);
    cp_store_be32(j0 + 12, 1u);
}

static void impl_ctr(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *in, uint8_t *out, size_t len)
{
    if (ctx->impl == CP_GCM_IMPL_VAES512)
        cp_vaes512_ctr(ctx, j0, in, out, len);
    else if (ctx->impl == CP_GCM_IMPL_VAES)
        cp_vaes_ctr(ctx, j0, in, out, len);
    else if (ctx->impl == CP_GCM_IMPL_AESNI)
        cp_aesni_ctr(ctx, j0, in, out, len);
    else
        cp_portable_ctr(ctx, j0, in, out, len);
}

/* The implementations with one-pass seal (and open_shared without the separate copy): all but portable. */
static int fused(const cp_gcm_ctx *ctx)
{
    return ctx->impl != CP_GCM_IMPL_PORTABLE;
}

/* T = E(K, J0) xor S. */
static void finish_tag(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t s[16], uint8_t tag[16])
{
    uint8_t ek0[16];
    if (ctx->impl == CP_GCM_IMPL_PORTABLE)
        cp_portable_encrypt_block(ctx, j0, ek0);
    else
        cp_aesni_encrypt_block(ctx, j0, ek0);
    for (int i = 0; i < 16; i++)
        tag[i] = (uint8_t)(s[i] ^ ek0[i]);
    cp_wipe_bytes(ek0, sizeof(ek0));
}

/* T = E(K, J0) xor GHASH(A, C): the full 16-byte tag. */
static void compute_tag(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                        const uint8_t *c, size_t c_len, uint8_t tag[16])
{
    uint8_t s[16];
    if (ctx->impl == CP_GCM_IMPL_VAES512)
        cp_vaes512_ghash(ctx, aad, aad_len, c, c_len, s);
    else if (ctx->impl == CP_GCM_IMPL_VAES)
        cp_vaes_ghash(ctx, aad, aad_len, c, c_len, s);
    else if (ctx->impl == CP_GCM_IMPL_AESNI)
        cp_aesni_ghash(ctx, aad, aad_len, c, c_len, s);
    else
        cp_portable_ghash(ctx, aad, aad_len, c, c_len, s);
    finish_tag(ctx, j0, s, tag);
}

/* Constant time: the time taken does not depend on where (or whether) the tags differ. */
static int tags_equal(const uint8_t a[16], const uint8_t b[16])
{
    uint32_t diff = 0;
    for (int i = 0; i < 16; i++)
        diff |= (uint32_t)(a[i] ^ b[i]);
    return (int)(1u & ((diff - 1u) >> 8));
}

/* The fused seal: CTR and GHASH together, out never read back. */
static void fused_seal(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                       const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[16])
{
    uint8_t s[16];
    if (ctx->impl == CP_GCM_IMPL_VAES512) { /* the whole tag: E(K, J0) overlaps the bulk */
        cp_vaes512_seal(ctx, j0, aad, aad_len, in, out, len, tag);
        return;
    }
    if (ctx->impl == CP_GCM_IMPL_VAES)
        cp_vaes_seal(ctx, j0, aad, aad_len, in, out, len, s);
    else
        cp_aesni_seal(ctx, j0, aad, aad_len, in, out, len, s);
    finish_tag(ctx, j0, s, tag);
}

/*
 * The helper's open from shared memory on the fused paths; each byte of `in` is read once. VAES and AES-NI:
 * GHASH while copying the ciphertext into scratch, then (tag matched) CTR from scratch into out: on AMD
 * Zen 3 AES and carry-less multiplies hardly overlap, so this costs what a fused pass costs and no
 * plaintext exists before the tag matched (docs/crypto.md has the figures). VAES512 (AMD Zen 4, where AES
 * and GHASH overlap): one fused pass into scratch, then (tag matched) the copy into out. Returns 0, or -1
 * with out untouched and no plaintext left in scratch.
 */
static int fused_open_shared(const cp_gcm_ctx *ctx, const uint8_t j0[16], const uint8_t *aad, size_t aad_len,
                             const uint8_t *in, uint8_t *out, size_t len, const uint8_t want[16],
                             uint8_t *scratch)
{
    uint8_t s[16], got[16];
    int one_pass = ctx->impl == CP_GCM_IMPL_VAES512;
    if (one_pass) {
        cp_vaes512_open(ctx, j0, aad, aad_len, in, scratch, len, got, out);
    } else {
        if (ctx->impl == CP_GCM_IMPL_AESNI)
            cp_aesni_ghash_copy(ctx, aad, aad_len, in, scratch, len, s);
        else
            cp_vaes_ghash_copy(ctx, aad, aad_len, in, scratch, len, s);
        finish_tag(ctx, j0, s, got);
    }
    int ok = tags_equal(got, want);
    cp_wipe_bytes(got, sizeof(got));
    if (!ok) {
        if (one_pass)
            cp_wipe_bytes(scratch, len); /* plaintext of a record that failed authentication */
        return -1;
    }
    if (one_pass)
        cp_copy_string(out, scratch, len);
    else
        impl_ctr(ctx, j0, scratch, out, len);
    return 0;
}

/* A plain copy for the buffers of the *_shared calls (no libc here): 16 bytes at a time, then bytes. */
static void copy_block_wise(uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        __builtin_memcpy(dst + i, src + i, 16); /* a fixed 16 bytes: inlined as one load and one store */
    cp_copy_bytes(dst + i, src + i, n - i);
}

int cp_gcm_seal(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[CP_GCM_TAG_BYTES])
{
    uint8_t j0[16];
    if (!call_ok(ctx, aad_len, len))
        return -1;
    make_j0(j0, iv);
    if (fused(ctx)) {
        fused_seal(ctx, j0, aad, aad_len, in, out, len, tag);
        return 0;
    }
    impl_ctr(ctx, j0, in, out, len);
    compute_tag(ctx, j0, aad, aad_len, out, len, tag);
    return 0;
}

int cp_gcm_seal_shared(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, uint8_t *out, size_t len, uint8_t tag[CP_GCM_TAG_BYTES],
                       uint8_t *scratch)
{
    if (fused(ctx))
        return cp_gcm_seal(ctx, iv, aad, aad_len, in, out, len, tag);
    /* Portable (two passes) reads the ciphertext back for GHASH: make it where nobody else writes. */
    if (cp_gcm_seal(ctx, iv, aad, aad_len, in, scratch, len, tag) != 0)
        return -1;
    copy_block_wise(out, scratch, len);
    return 0;
}

int cp_gcm_open(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                size_t aad_len, const uint8_t *in, uint8_t *out, size_t len,
                const uint8_t tag[CP_GCM_TAG_BYTES])
{
    uint8_t j0[16];
    uint8_t expected[16];
    if (!call_ok(ctx, aad_len, len))
        return -1;
    make_j0(j0, iv);
    /* Authenticate before a single plaintext byte exists anywhere. */
    compute_tag(ctx, j0, aad, aad_len, in, len, expected);
    int ok = tags_equal(expected, tag);
    cp_wipe_bytes(expected, sizeof(expected));
    if (!ok)
        return -1;
    impl_ctr(ctx, j0, in, out, len);
    return 0;
}

int cp_gcm_open_shared(const cp_gcm_ctx *ctx, const uint8_t iv[CP_GCM_IV_BYTES], const uint8_t *aad,
                       size_t aad_len, const uint8_t *in, uint8_t *out, size_t len,
                       const uint8_t tag[CP_GCM_TAG_BYTES], uint8_t *scratch)
{
    uint8_t j0[16], want[16];
    if (!call_ok(ctx, aad_len, len))
        return -1;
    cp_copy_bytes(want, tag, sizeof(want)); /* the tag is read once too */
    if (!fused(ctx)) {
        copy_block_wise(scratch, in, len);
        return cp_gcm_open(ctx, iv, aad, aad_len, scratch, out, len, want);
    }
    make_j0(j0, iv);
    return fused_open_shared(ctx, j0, aad, aad_len, in, out, len, want, scratch);
}

void cp_gcm_nonce_seq_init(cp_gcm_nonce_seq *seq, uint32_t sender_id, uint64_t first_counter)
{
    seq->sender_id = sender_id;
    seq->exhausted = 0;
    seq->next = first_counter;
}

int cp_gcm_nonce_next(cp_gcm_nonce_seq *seq, uint8_t iv[CP_GCM_IV_BYTES])
{
    if (seq->exhausted)
        return -1;
    cp_store_be32(iv, seq->sender_id);
    cp_store_be64(iv + 4, seq->next);
    /* The last counter value is still usable once; after it the sequence is closed for good. */
    if (seq->next == UINT64_MAX)
        seq->exhausted = 1;
    else
        seq->next++;
    return 0;
}

size_t cp_gcm_seal_pages(const cp_gcm_ctx *ctx, cp_gcm_nonce_seq *seq, size_t n, const uint8_t *aad,
                         size_t aad_len, const uint8_t *in, uint8_t *out, uint8_t *ivs, uint8_t *tags)
{
    size_t done = 0;
    for (; done < n; done++) {
        uint8_t *iv = ivs + CP_GCM_IV_BYTES * done;
        size_t off = (size_t)CP_GCM_PAGE_BYTES * done;
        if (cp_gcm_nonce_next(seq, iv) != 0)
            break;
        if (cp_gcm_seal(ctx, iv, aad + aad_len * done, aad_len, in + off, out + off, CP_GCM_PAGE_BYTES,
                        tags + CP_GCM_TAG_BYTES * done) != 0)
            break;
    }
    return done;
}

size_t cp_gcm_open_pages(const cp_gcm_ctx *ctx, size_t n, const uint8_t *ivs, const uint8_t *aad,
                         size_t aad_len, const uint8_t *in, uint8_t *out, const uint8_t *tags,
                         int32_t *status)
{
    uint8_t scratch[CP_GCM_PAGE_BYTES] __attribute__((aligned(64)));
    size_t refused = 0;
    for (size_t i = 0; i < n; i++) {
        size_t off = (size_t)CP_GCM_PAGE_BYTES * i;
        int rc = cp_gcm_open_shared(ctx, ivs + CP_GCM_IV_BYTES * i, aad + aad_len * i, aad_len, in + off,
                                    out + off, CP_GCM_PAGE_BYTES, tags + CP_GCM_TAG_BYTES * i, scratch);
        if (status != 0)
            status[i] = rc;
        refused += rc != 0;
    }
    cp_wipe_bytes(scratch, sizeof(scratch));
    return refused;
}
