/* Sub-keys from the transport key, the keyed digest and the per-page MAC table (digest.c). */
#ifndef CP_MH_DIGEST_H
#define CP_MH_DIGEST_H

#include <stdint.h>

#include "context.h"

/* Sets ctx->transport, digest_key, final_key, key_id, and migration_id (owner_id, or derived if NULL). */
uint32_t cp_mh_derive(struct cp_mh_ctx *ctx, const uint8_t key[CP_MH_KEY_BYTES], const uint8_t *owner_id);
uint32_t cp_mh_digest(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                      uint64_t *hashed, uint64_t *skipped);
/* WARM: one byte of every page of the range read (MH area and hole skipped); counts as MAC_RANGE's do. (v9)
 * `huge`: the host backs guest RAM with 2 MiB pages, so above the low 2 MiB (where the helper's own tables
 * map 4 KiB pages) one read per 2 MiB page of the view maps all of it: the first page not skipped is read.
 * `write` (target only): each read is a locked OR of zero instead, which maps the page for writing. */
uint32_t cp_mh_warm(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, int huge, int write, uint64_t *read,
                    uint64_t *skipped);
/* The per-page MAC table (v3): MAC_RANGE/MAC_LIST store h(gpa) of the page as it is now; FOLD runs DIGEST's
 * chain over the stored MACs instead of the pages (so a current table folds to the range's DIGEST). */
uint32_t cp_mh_mac_range(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint64_t *hashed,
                         uint64_t *skipped);
uint32_t cp_mh_mac_page(struct cp_mh_ctx *ctx, uint64_t gpa);
/* v4: SAVE and LOAD store each record's GCM tag as the page's entry (no second pass over the page). */
void cp_mh_mac_set(struct cp_mh_ctx *ctx, uint64_t gpa, const uint8_t tag[CP_GCM_TAG_BYTES]);
/* v5 building blocks for the manifest (manifest.c): GMAC under the digest key at IV ff ff ff kind || value
 * BE64, and the PRF that ends every digest (32 bytes of the final key's keystream at IV c[0..11]). */
int cp_mh_gmac(struct cp_mh_ctx *ctx, uint8_t kind, uint64_t value, const uint8_t *aad, size_t len,
               uint8_t out[CP_GCM_TAG_BYTES]);
int cp_mh_prf(struct cp_mh_ctx *ctx, const uint8_t c[CP_GCM_TAG_BYTES], uint8_t out[CP_MB_DIGEST_BYTES]);
/* The generation digest of one chunk, masked by `bits` (private memory: bit i = page start + i, 1 = private);
 * raises *max_gen to the highest entry it took. */
uint32_t cp_mh_gen_digest(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, const uint8_t *bits,
                          uint8_t out[CP_MB_DIGEST_BYTES], uint32_t *max_gen);
uint32_t cp_mh_fold(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                    uint64_t *folded, uint64_t *skipped);

#endif /* CP_MH_DIGEST_H */
