/*
 * The migration helper's mailbox engine: plain freestanding C over explicit pointers, so the same source
 * runs in the guest (CPL3 only: it calls the SSE/AES-NI crypto) and in a host shared library for tests
 * (firmware/mh/host/). No globals, no libc; everything it touches is reached through the context.
 */
#ifndef CP_MH_MAILBOX_H
#define CP_MH_MAILBOX_H

#include <stddef.h>
#include <stdint.h>

#include "../crypto/cp_gcm.h"
#include "cp_mailbox.h"

#define CP_MH_PAGE 4096u
#define CP_MH_KEY_BYTES 32u
#define CP_MH_ID_BYTES 16u
#define CP_MH_GEN_BUSY 0xffffffffu /* generation-table marker: a LOAD of this GPA is in flight */
#define CP_MH_MAX_SENDERS 0x10000u /* sender index space per side */
#define CP_MH_DIGEST_CHUNK 256u    /* page hashes folded per chain step */

/* The one state all MH vCPUs of a guest share (in MH memory; zero-initialised before the first setup). */
struct cp_mh_shared {
    uint32_t next_sender; /* claimed with an atomic add: two MH vCPUs never share a nonce prefix */
    uint32_t lock;        /* INIT's table decision */
    uint32_t have_id;     /* last_id is valid */
    uint32_t pad;
    uint8_t last_id[CP_MH_ID_BYTES]; /* migration id the generation table belongs to */
};

/* What the firmware (or the host test) tells one MH vCPU about its guest. Pointers are host pointers on
 * the host build and GPAs (identity mapped) in the guest. */
struct cp_mh_config {
    uint8_t *ram;               /* GPA 0 */
    uint64_t ram_size;          /* bytes of guest RAM from GPA 0 */
    uint64_t mh_base;           /* MH area [mh_base, mh_base + mh_size): never sealed, loaded or hashed */
    uint64_t mh_size;
    struct cp_mh_shared *shared;
    uint32_t *gen_table;        /* one u32 per guest page, shared by every MH vCPU, in MH memory */
    uint64_t gen_entries;
    const uint8_t *secret;      /* the launch-secret page (efi_secret table) */
    uint64_t secret_size;
    volatile uint64_t *doorbell; /* MMIO doorbell (bp.mmio_mailbox + 8 * idx), NULL on the host */
    uint32_t cpu_features;      /* CP_CPU_* (cp_gcm.h), see cp_mh_features_from_bp */
    uint32_t side;              /* 0 source, 1 target: from the measured boot parameters, not the host */
    uint32_t mh_index;
    uint32_t batch_pages;       /* data slots in this MH's mailbox */
    uint32_t pad;
    uint8_t *mac_table;         /* CP_MB_MAC_BYTES per guest page, shared by every MH vCPU, in MH memory */
    uint64_t mac_entries;
};

/* One MH vCPU's private state: keys, nonce sequence, bounce buffers. Lives in MH memory, never shared. */
struct cp_mh_ctx {
    struct cp_mh_config cfg;
    uint32_t magic;
    uint32_t keyed;             /* INIT succeeded and no RESET since */
    uint32_t sender_id;
    uint32_t key_id;
    uint32_t impl;
    uint32_t pad;
    cp_gcm_nonce_seq nonce;     /* set once at setup; never rewound (RESET and INIT leave it alone) */
    cp_gcm_ctx transport;       /* seals/opens pages */
    cp_gcm_ctx digest_key;      /* per-page GMAC and chain */
    cp_gcm_ctx final_key;       /* digest finalisation (a PRF over the chain value) */
    uint8_t migration_id[CP_MH_ID_BYTES];
    uint8_t bounce[CP_MB_SLOT_SIZE] __attribute__((aligned(64)));      /* private copy of one record */
    uint8_t chain[16 + 16 * CP_MH_DIGEST_CHUNK] __attribute__((aligned(64))); /* digest chain || page hashes */
};

/* The idle/wait hook of the serve loop. why = CP_MH_WHY_IDLE (nothing new since `seen`: park or spin) or
 * CP_MH_WHY_DONE (results for `seen` published). A non-zero return ends cp_mh_serve (host tests only). */
#define CP_MH_WHY_IDLE 0u
#define CP_MH_WHY_DONE 1u
typedef int (*cp_mh_idle_fn)(void *arg, volatile uint8_t *ctl, uint32_t why, uint64_t seen);

size_t cp_mh_ctx_size(void);
size_t cp_mh_shared_size(void);

/* Boot-parameter feature word (CP_FEAT_* in confplan_abi.h) -> cp_gcm's CP_CPU_* word. The VMM enables YMM
 * state (XCR0 = 7) whenever it reports AVX. */
uint32_t cp_mh_features_from_bp(uint32_t bp_features);

/* Once per MH vCPU at boot: checks the config, claims a sender index, starts the nonce sequence.
 * Returns CP_MBS_OK or CP_MBS_CONFIG. */
uint32_t cp_mh_setup(struct cp_mh_ctx *ctx, const struct cp_mh_config *cfg);

/* Handles the next op, ring entry (done + 1) of the control page `ctl` (slots at `slots`): writes its results
 * into the entry and the slot statuses, not `done`. Returns the op status. */
uint32_t cp_mh_handle(struct cp_mh_ctx *ctx, volatile uint8_t *ctl, uint8_t *slots);

/* Publishes the protocol block, then loops: while done < seq, handle op done + 1 and publish done; ring the
 * doorbell once caught up (done == seq); idle_fn after each op (DONE) and when nothing is queued (IDLE).
 * Returns only when idle_fn returns non-zero. */
int cp_mh_serve(struct cp_mh_ctx *ctx, volatile uint8_t *ctl, uint8_t *slots, cp_mh_idle_fn idle_fn,
                void *idle_arg);

/* secret.c: the efi_secret table walk (same rules as confplan.sev.secret_table.parse_secret_table). Finds
 * the transport key (required) and the migration id (optional; *have_id says). Returns a CP_MBS_*. */
uint32_t cp_mh_parse_secret(const uint8_t *table, uint64_t size, uint8_t key[CP_MH_KEY_BYTES],
                            uint8_t id[CP_MH_ID_BYTES], uint32_t *have_id);

/* digest.c: sub-keys and the keyed digest. */
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

/* Small freestanding helpers (mailbox.c): copies and wipes the compiler cannot turn into libc calls. */
void cp_mh_copy(void *dst, const void *src, size_t n);
void cp_mh_wipe(void *dst, size_t n);

#endif /* CP_MH_MAILBOX_H */
