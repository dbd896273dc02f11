/* Sub-keys from the transport key, the keyed digest and the per-page MAC table (digest.c). */
#ifndef CP_MH_DIGEST_H
#define CP_MH_DIGEST_H

#include <stdint.h>

#include "context.h"

/* Sets ctx->transport, digest_key, final_key, key_id, and migration_id (owner_id, or derived if NULL). */
uint32_t cp_mh_derive(struct cp_mh_ctx *ctx, const uint8_t key[CP_MH_KEY_BYTES], const uint8_t *owner_id);
uint32_t cp_mh_digest(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                      uint64_t *hashed, uint64_t *skipped);
/* The per-page MAC table (v3): MAC_RANGE/MAC_LIST store h(gpa) of the page as it is now; FOLD runs DIGEST's
 * chain over the stored MACs instead of the pages (so a current table folds to the range's DIGEST). */
uint32_t cp_mh_mac_range(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint64_t *hashed,
                         uint64_t *skipped);
uint32_t cp_mh_mac_page(struct cp_mh_ctx *ctx, uint64_t gpa);
/* v4: SAVE and LOAD store each record's GCM tag as the page's entry (no second pass over the page). */
void cp_mh_mac_set(struct cp_mh_ctx *ctx, uint64_t gpa, const uint8_t tag[CP_GCM_TAG_BYTES]);
uint32_t cp_mh_fold(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint8_t out[CP_MB_DIGEST_BYTES],
                    uint64_t *folded, uint64_t *skipped);

#endif /* CP_MH_DIGEST_H */
