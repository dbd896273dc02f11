/*
 * Sub-keys from the transport key, and the keyed digest of a GPA range (docs/mailbox.md, "DIGEST").
 *
 * Derivation: the AES-256-GCM keystream under the transport key for the reserved IV ff ff ff ff "CPKDF v1"
 * (sender id 0xffffffff is never handed to a nonce sequence): bytes 0..31 digest key, 32..63 final key,
 * 64..79 the key-derived migration id, 80..83 key id (u32 LE), (v5) 96..127 the seal key for manifests and
 * vCPU state.
 *
 * Digest: h(gpa) = GMAC_Kd(IV ff ff ff fe || gpa BE64, AAD = page) per page the helper does not own; the
 * chain starts as c = start LE64 || npages LE64 and folds every 256 hashes:
 * c = GMAC_Kd(IV ff ff ff fd || j BE64, AAD = c || h...). The result is the keystream of the final key at
 * IV c[0..11] (32 bytes): a PRF of the chain value, so published digests say nothing about the GHASH key or
 * the memory.
 *
 * IV kinds under the digest key (ff ff ff kind || value BE64): fe page hash, fd chain step, (v5) fc the
 * manifest's generation chain, fb its bitmap chain (manifest.c).
 */
#include "bytes.h"
#include "digest.h"

static const uint8_t kdf_iv[CP_GCM_IV_BYTES] = {0xff, 0xff, 0xff, 0xff, 'C', 'P', 'K', 'D', 'F', ' ', 'v', '1'};

static void make_iv(uint8_t iv[CP_GCM_IV_BYTES], uint8_t kind, uint64_t value)
{
    iv[0] = 0xff;
    iv[1] = 0xff;
    iv[2] = 0xff;
    iv[3] = kind;
    cp_mh_store_be64(iv + 4, value);
}

uint32_t cp_mh_derive(struct cp_mh_ctx *ctx, const uint8_t key[CP_MH_KEY_BYTES], const uint8_t *owner_id)
{
    uint8_t ks[128] __attribute__((aligned(16)));
    uint8_t tag[CP_GCM_TAG_BYTES];
    uint32_t rc = CP_MBS_CONFIG;
    cp_mh_wipe(ks, sizeof(ks));
    if (cp_gcm_init(&ctx->transport, key, ctx->impl) != 0 ||
        cp_gcm_seal(&ctx->transport, kdf_iv, 0, 0, ks, ks, sizeof(ks), tag) != 0)
        goto out;
    if (cp_gcm_init(&ctx->digest_key, ks, ctx->impl) != 0 || cp_gcm_init(&ctx->final_key, ks + 32, ctx->impl) != 0 ||
        cp_gcm_init(&ctx->seal_key, ks + 96, ctx->impl) != 0)
        goto out;
    cp_mh_copy(ctx->migration_id, owner_id ? owner_id : ks + 64, CP_MH_ID_BYTES);
    ctx->key_id = cp_mh_load_le32(ks + 80);
    rc = CP_MBS_OK;
out:
    cp_mh_wipe(ks, sizeof(ks));
    cp_mh_wipe(tag, sizeof(tag));
    return rc;
}

int cp_mh_gmac(struct cp_mh_ctx *ctx, uint8_t kind, uint64_t value, const uint8_t *aad, size_t len,
               uint8_t out[CP_GCM_TAG_BYTES])
{
    uint8_t iv[CP_GCM_IV_BYTES];
    make_iv(iv, kind, value);
    return cp_gcm_seal(&ctx->digest_key, iv, aad, len, 0, 0, 0, out);
}

int cp_mh_prf(struct cp_mh_ctx *ctx, const uint8_t c[CP_GCM_TAG_BYTES], uint8_t out[CP_MB_DIGEST_BYTES])
{
    uint8_t tag[CP_GCM_TAG_BYTES];
    cp_mh_wipe(out, CP_MB_DIGEST_BYTES);
    int rc = cp_gcm_seal(&ctx->final_key, c, 0, 0, out, out, CP_MB_DIGEST_BYTES, tag);
    cp_mh_wipe(tag, sizeof(tag));
    return rc;
}

/* One chain step: chain[0..16) = GMAC_Kd(IV ff ff ff kind || step, AAD = chain[0..16 + bytes)). */
static int fold_kind(struct cp_mh_ctx *ctx, uint8_t kind, uint64_t step, size_t bytes)
{
    uint8_t c[CP_GCM_TAG_BYTES];
    if (cp_mh_gmac(ctx, kind, step, ctx->chain, 16u + bytes, c) != 0)
        return -1;
    cp_mh_copy(ctx->chain, c, sizeof(c));
    return 0;
}

static int fold(struct cp_mh_ctx *ctx, uint64_t step, uint32_t hashes)
{
    return fold_kind(ctx, 0xfd, step, 16u * hashes);
}

static int hash_page(struct cp_mh_ctx *ctx, uint64_t gpa, uint8_t out[CP_GCM_TAG_BYTES])
{
    uint8_t iv[CP_GCM_IV_BYTES];
    make_iv(iv, 0xfe, gpa);
    return cp_gcm_seal(&ctx->digest_key, iv, ctx->cfg.ram + gpa, CP_MH_PAGE, ctx->chain, ctx->chain, 0, out);
}

static uint32_t check_range(const struct cp_mh_config *cfg, uint64_t start, uint64_t npages)
{
    if (start % CP_MH_PAGE)
        return CP_MBS_GPA_ALIGN;
    if (start > cfg->ram_size || npages > (cfg->ram_size - start) / CP_MH_PAGE)
        return CP_MBS_GPA_RANGE;
    return CP_MBS_OK;
}

static int mac_missing(const uint8_t *mac)
{
    const cp_mh_u64u *w = (const cp_mh_u64u *)mac;
    return (w[0] | w[1]) == 0; /* a real MAC is all zero with probability 2^-128: zero means "never computed" */
}

/* Pages from `gpa` on (at most `left`) that no check would skip: 0 if `gpa` itself is skipped or among the
 * low pages (those take the per-page path), else up to the next region that is (the hole, the MH area). The
 * table walks below take such a run without a per-page skip test. */
static uint64_t clean_run(const struct cp_mh_config *cfg, uint64_t gpa, uint64_t left)
{
    if (gpa / CP_MH_PAGE < CP_MH_OWN_LOW_PAGES || cp_mh_skips(cfg, gpa))
        return 0;
    uint64_t end = gpa + left * CP_MH_PAGE; /* check_range bounds it by the RAM size: no overflow */
    if (gpa < CP_RAM_HOLE_START && end > CP_RAM_HOLE_START)
        end = CP_RAM_HOLE_START;
    if (gpa < cfg->mh_base && end > cfg->mh_base)
        end = cfg->mh_base;
    return (end - gpa) / CP_MH_PAGE;
}

/* Copies n MAC table entries to `dst`; 1 if one of them is missing (all zero). */
static int copy_macs(uint8_t *dst, const uint8_t *src, uint64_t n)
{
    uint64_t missing = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = ((const cp_mh_u64u *)src)[2 * i], b = ((const cp_mh_u64u *)src)[2 * i + 1];
        ((cp_mh_u64u *)dst)[2 * i] = a;
        ((cp_mh_u64u *)dst)[2 * i + 1] = b;
        missing |= (a | b) == 0;
    }
    return missing != 0;
}

/* DIGEST's chain over a range; each page's h(gpa) is computed from the page, or (from_table) taken from
 * the MAC table, where a missing entry refuses the fold. */
static uint32_t chain_range(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, int from_table,
                            uint8_t out[CP_MB_DIGEST_BYTES], uint64_t *hashed, uint64_t *skipped)
{
    uint32_t m = 0;
    uint64_t step = 0;
    *hashed = *skipped = 0;
    uint32_t rc = check_range(&ctx->cfg, start, npages);
    if (rc != CP_MBS_OK)
        return rc;
    cp_mh_store_le64(ctx->chain, start);
    cp_mh_store_le64(ctx->chain + 8, npages);
    for (uint64_t p = 0; p < npages; p++) {
        uint64_t gpa = start + p * CP_MH_PAGE;
        uint8_t *slot = ctx->chain + 16 + 16 * m;
        uint64_t run = from_table ? clean_run(&ctx->cfg, gpa, npages - p) : 0;
        if (run) { /* the same entries as the per-page path below, up to the chain step's end */
            uint64_t take = run < CP_MH_DIGEST_CHUNK - m ? run : CP_MH_DIGEST_CHUNK - m;
            if (copy_macs(slot, ctx->cfg.mac_table + gpa / CP_MH_PAGE * CP_MB_MAC_BYTES, take))
                return CP_MBS_MAC_MISSING;
            *hashed += take;
            m += (uint32_t)take;
            p += take - 1;
            if (m == CP_MH_DIGEST_CHUNK) {
                if (fold(ctx, step++, m) != 0)
                    return CP_MBS_CONFIG;
                m = 0;
            }
            continue;
        }
        if (cp_mh_skips(&ctx->cfg, gpa)) {
            ++*skipped;
            continue;
        }
        if (from_table) {
            if (!cp_mh_copy16(slot, ctx->cfg.mac_table + gpa / CP_MH_PAGE * CP_MB_MAC_BYTES))
                return CP_MBS_MAC_MISSING;
        } else if (hash_page(ctx, gpa, slot) != 0) {
            return CP_MBS_CONFIG;
        }
        ++*hashed;
        if (++m == CP_MH_DIGEST_CHUNK) {
            if (fold(ctx, step++, m) != 0)
                return CP_MBS_CONFIG;
            m = 0;
        }
    }
    if (m && fold(ctx, step, m) != 0)
        return CP_MBS_CONFIG;
    if (cp_mh_prf(ctx, ctx->chain, out) != 0)
        return CP_MBS_CONFIG;
    cp_mh_wipe(ctx->chain, sizeof(ctx->chain));
    return CP_MBS_OK;
}

uint32_t cp_mh_digest(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                      uint64_t *hashed, uint64_t *skipped)
{
    return chain_range(ctx, start, npages, 0, out, hashed, skipped);
}

uint32_t cp_mh_fold(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                    uint64_t *folded, uint64_t *skipped)
{
    uint32_t rc = chain_range(ctx, start, npages, 1, out, folded, skipped);
    if (rc != CP_MBS_OK)
        cp_mh_wipe(ctx->chain, sizeof(ctx->chain));
    return rc;
}

/* v4: the table entry of a page SAVE sealed or LOAD opened is that record's GCM tag. Both sides store the
 * same 16 bytes for the same record, and a tag binds the page's bytes (under the GPA, generation and nonce)
 * as h(gpa) does: equal entries still mean equal pages, at no cost beyond a 16-byte copy. */
void cp_mh_mac_set(struct cp_mh_ctx *ctx, uint64_t gpa, const uint8_t tag[CP_GCM_TAG_BYTES])
{
    uint8_t mac[CP_MB_MAC_BYTES];
    if (!cp_mh_copy16(mac, tag))
        mac[0] = 1; /* the same fix-up on both sides keeps the entries equal and "zero = none" true */
    cp_mh_copy16(ctx->cfg.mac_table + gpa / CP_MH_PAGE * CP_MB_MAC_BYTES, mac);
}

/* One table entry: h(gpa) of the page as it is now. The table lives in MH memory, so only the MH writes it;
 * the caller has checked the GPA (aligned, in RAM, not the helper's own). */
uint32_t cp_mh_mac_page(struct cp_mh_ctx *ctx, uint64_t gpa)
{
    uint8_t mac[CP_GCM_TAG_BYTES];
    if (hash_page(ctx, gpa, mac) != 0)
        return CP_MBS_CONFIG;
    if (mac_missing(mac))
        mac[0] = 1; /* keep "zero = never computed" true (probability 2^-128; costs nothing) */
    cp_mh_copy16(ctx->cfg.mac_table + gpa / CP_MH_PAGE * CP_MB_MAC_BYTES, mac);
    return CP_MBS_OK;
}

#define HUGE_PAGE (512u * CP_MH_PAGE) /* a 2 MiB page of the helper's view (confplan_abi.h: PDs above the low 2 MiB) */

/* fn on every page of the range but the helper's own (counted in skipped); stops at the first refusal. With
 * `huge`, above the low 2 MiB only on the first page not skipped of each 2 MiB page (v9 WARM). */
static uint32_t each_page(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, int huge,
                          uint32_t (*fn)(struct cp_mh_ctx *, uint64_t), uint64_t *done, uint64_t *skipped)
{
    *done = *skipped = 0;
    uint32_t rc = check_range(&ctx->cfg, start, npages);
    for (uint64_t p = 0; rc == CP_MBS_OK && p < npages; p++) {
        uint64_t gpa = start + p * CP_MH_PAGE;
        if (cp_mh_skips(&ctx->cfg, gpa)) {
            ++*skipped;
            continue;
        }
        rc = fn(ctx, gpa);
        *done += rc == CP_MBS_OK;
        if (huge && gpa >= HUGE_PAGE) /* the rest of this 2 MiB page went with it: on to the next one */
            p += (HUGE_PAGE - gpa % HUGE_PAGE) / CP_MH_PAGE - 1;
    }
    return rc;
}

static uint32_t warm_page(struct cp_mh_ctx *ctx, uint64_t gpa)
{
    (void)*(volatile const uint8_t *)(ctx->cfg.ram + gpa); /* the access is the point: it maps the page */
    return CP_MBS_OK;
}

/* v9 WRITE: a locked OR of zero, so the byte is unchanged even beside another writer, and the page is
 * mapped writable (a read maps it read-only where LOAD then writes). In asm: a compiler may turn an
 * idempotent atomic into a plain load. */
static uint32_t warm_page_write(struct cp_mh_ctx *ctx, uint64_t gpa)
{
    __asm__ volatile("lock orb $0, %0" : "+m"(*(volatile uint8_t *)(ctx->cfg.ram + gpa)));
    return CP_MBS_OK;
}

uint32_t cp_mh_warm(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, int huge, int write, uint64_t *read,
                    uint64_t *skipped)
{
    return each_page(ctx, start, npages, huge, write ? warm_page_write : warm_page, read, skipped);
}

uint32_t cp_mh_mac_range(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint64_t *hashed,
                         uint64_t *skipped)
{
    return each_page(ctx, start, npages, 0, cp_mh_mac_page, hashed, skipped);
}

/* v5: the manifest's generation digest of one chunk. Entry of page p: its generation-table entry if the
 * chunk's private bitmap copy marks it private (bit p - start of `bits`), else 0; the helper's own pages skipped.
 * Packed as u32 LE, 4 to a 16-byte block, 1024 per chain step (IV kind fc). */
#define GEN_STEP (4u * CP_MH_DIGEST_CHUNK)

uint32_t cp_mh_gen_digest(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, const uint8_t *bits,
                          uint8_t out[CP_MB_DIGEST_BYTES], uint32_t *max_gen)
{
    uint32_t m = 0;
    uint64_t step = 0;
    uint32_t rc = check_range(&ctx->cfg, start, npages);
    if (rc != CP_MBS_OK)
        return rc;
    cp_mh_store_le64(ctx->chain, start);
    cp_mh_store_le64(ctx->chain + 8, npages);
    for (uint64_t p = 0; p < npages; p++) {
        uint64_t gpa = start + p * CP_MH_PAGE;
        uint64_t run = clean_run(&ctx->cfg, gpa, npages - p);
        if (run) { /* the same entries as the per-page path below, up to the chain step's end */
            uint64_t take = run < GEN_STEP - m ? run : GEN_STEP - m;
            const uint32_t *gens = ctx->cfg.gen_table + gpa / CP_MH_PAGE;
            uint8_t *out = ctx->chain + 16 + 4 * m;
            uint32_t top = *max_gen;
            for (uint64_t i = 0; i < take; i++) { /* branch-free: the bits of a bitmap byte mix kinds */
                uint64_t q = p + i;
                uint32_t gen = __atomic_load_n(&gens[i], __ATOMIC_ACQUIRE) & -(uint32_t)(bits[q / 8] >> (q % 8) & 1u);
                top = gen > top ? gen : top;
                __builtin_memcpy(out + 4 * i, &gen, 4); /* x86: little-endian, one store */
            }
            *max_gen = top;
            m += (uint32_t)take;
            p += take - 1;
            if (m == GEN_STEP) {
                if (fold_kind(ctx, 0xfc, step++, 4u * m) != 0)
                    return CP_MBS_CONFIG;
                m = 0;
            }
            continue;
        }
        if (cp_mh_skips(&ctx->cfg, gpa))
            continue;
        uint32_t gen = 0;
        if (bits[p / 8] >> (p % 8) & 1u)
            gen = __atomic_load_n(&ctx->cfg.gen_table[gpa / CP_MH_PAGE], __ATOMIC_ACQUIRE);
        *max_gen = gen > *max_gen ? gen : *max_gen;
        cp_mh_store_le32(ctx->chain + 16 + 4 * m, gen);
        if (++m == GEN_STEP) {
            if (fold_kind(ctx, 0xfc, step++, 4u * m) != 0)
                return CP_MBS_CONFIG;
            m = 0;
        }
    }
    if (m) {
        while (m % 4)
            cp_mh_store_le32(ctx->chain + 16 + 4 * m++, 0);
        if (fold_kind(ctx, 0xfc, step, 4u * m) != 0)
            return CP_MBS_CONFIG;
    }
    rc = cp_mh_prf(ctx, ctx->chain, out) != 0 ? CP_MBS_CONFIG : CP_MBS_OK;
    cp_mh_wipe(ctx->chain, sizeof(ctx->chain));
    return rc;
}
