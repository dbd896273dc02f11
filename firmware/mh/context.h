/*
 * The migration helper's state: its constants, the block all MH vCPUs share, the config the firmware (or
 * the host harness) hands each MH vCPU, and one vCPU's private context. Used by every unit of the engine
 * (mailbox.c, digest.c); the engine's API is mailbox.h.
 */
#ifndef CP_MH_CONTEXT_H
#define CP_MH_CONTEXT_H

#include <stddef.h>
#include <stdint.h>

#include "../crypto/cp_gcm.h"
#include "confplan_abi.h"
#include "cp_mailbox.h"
#include "cp_sealed_page.h"
#include "keyrelease.h"
#include "secret.h"

#define CP_MH_PAGE 4096u
#define CP_MH_GEN_BUSY 0xffffffffu /* generation-table marker: a LOAD of this GPA is in flight */
#define CP_MH_MAX_SENDERS 0x10000u /* sender index space per side */
#define CP_MH_DIGEST_CHUNK 256u    /* page hashes folded per chain step */
#define CP_MH_SIDE_SOURCE 0u /* cp_mh_config.side */
#define CP_MH_SIDE_TARGET 1u
#define CP_MH_SEAL_BUF CP_MB_SEALED_MAX /* private buffer for a manifest or vCPU state being sealed or opened */

/* The one state all MH vCPUs of a guest share (in MH memory; zero-initialised before the first setup). */
struct cp_mh_shared {
    uint32_t next_sender; /* claimed with an atomic add: two MH vCPUs never share a nonce prefix */
    uint32_t lock;        /* INIT's table decision */
    uint32_t have_id;     /* last_id is valid */
    uint32_t pad;
    uint8_t last_id[CP_MH_ID_BYTES]; /* migration id the generation table belongs to */
    /* v5, under `lock`: a CHECK_MANIFEST passed for last_id, and nothing changed the tables since */
    uint32_t verified;
    uint32_t changes;  /* bumped by every op that changes the tables a check reads (LOAD, MAC_*) */
    /* v6, under `lock`: the efi_secret table helper 0's KEY_RELEASE opened (SNP guests' INIT reads it) */
    uint32_t released_len;
    /* (v7, session 7) bumped by OPEN_STATE: the VMSA slots a check reads. Apart from `changes` because a
     * PREPARE covers the tables, never the slots (CHECK reads their tags itself): a state opened after a
     * PREPARE leaves it usable, while "verified" still needs no state opened since the CHECK began. */
    uint32_t state_changes;
    uint8_t released[CP_KR_TABLE_MAX];
};

/* The shared block's spin lock: INIT's table decision, (v5) the "verified" record, (v6) the released table. */
static inline void cp_mh_lock(struct cp_mh_shared *sh)
{
    while (__atomic_exchange_n(&sh->lock, 1u, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
}

static inline void cp_mh_unlock(struct cp_mh_shared *sh)
{
    __atomic_store_n(&sh->lock, 0u, __ATOMIC_RELEASE);
}

/* What the firmware (or the host test) tells one MH vCPU about its guest. Pointers are host pointers on
 * the host build and GPAs (identity mapped) in the guest. */
struct cp_mh_config {
    uint8_t *ram;               /* GPA 0 */
    uint64_t ram_size;          /* bytes from GPA 0 to the top of RAM, the hole under 4 GiB included (v8) */
    /* [mh_base, mh_base + mh_size) and the low pages in own_low: pages the MH never seals, loads or
     * hashes (SAVE/LOAD/MAC_LIST refuse them with GPA_MH, DIGEST/MAC_RANGE/FOLD skip them): the MH area
     * and (v7) the MH's pages below it (mh.c, fill_config). Every other page is the guest's and migrates,
     * the CPL0 area included. */
    uint64_t mh_base;
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
    uint32_t snp;               /* (v6) an SNP guest (CP_BP_FLAG_SNP, measured): `secret` is the PSP's
                                   secrets page, INIT reads the released table (docs/key-release.md) */
    uint8_t *mac_table;         /* CP_MB_MAC_BYTES per guest page, shared by every MH vCPU, in MH memory */
    uint64_t mac_entries;
    uint8_t *vmsa;              /* (v5) vmsa_slots x CP_VMSA_SLOT_SIZE (struct cp_vmsa_slot), in MH memory */
    uint64_t vmsa_slots;        /* the guest's vCPUs; at most CP_MAX_VCPUS */
    /* (v7) bit i of own_low[i / 64]: page i (below CP_MH_OWN_LOW_PAGES) is the MH's: page 0 (the null
     * guard, mapped by no table), the helper's page tables, the CPL0 stacks of the MH vCPUs. 0 on the host.
     * (v8) The whole low 2 MiB, since the CPL0 stacks of 128 vCPUs end at 0x120000. */
    uint64_t own_low[8];
    /* (ABI v9) an SNP guest: the owner's static X25519 public key from the measured boot parameters; a key
     * release opens only if its KEK has X25519(g, owner_key) in it (docs/key-release.md) */
    uint8_t owner_key[32];
};

#define CP_MH_OWN_LOW_PAGES 512u

/* Is ``gpa`` (page aligned, below ram_size) one of the MH's own pages, never a guest page to move? */
static inline int cp_mh_owns(const struct cp_mh_config *cfg, uint64_t gpa)
{
    uint64_t page = gpa / CP_MH_PAGE;
    if (gpa >= cfg->mh_base && gpa - cfg->mh_base < cfg->mh_size)
        return 1;
    return page < CP_MH_OWN_LOW_PAGES && (cfg->own_low[page / 64] >> (page % 64)) & 1u;
}

/* (v8) Is ``gpa`` in the hole under 4 GiB (the MMIO window, the xAPIC page), where no RAM is? */
static inline int cp_mh_hole(uint64_t gpa)
{
    return gpa >= CP_RAM_HOLE_START && gpa < CP_RAM_HOLE_END;
}

/* Pages DIGEST, MAC_RANGE and FOLD pass over: the MH's own, and the hole's (no RAM: the same on both
 * sides, so the digests still agree). */
static inline int cp_mh_skips(const struct cp_mh_config *cfg, uint64_t gpa)
{
    return cp_mh_hole(gpa) || cp_mh_owns(cfg, gpa);
}

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
    cp_gcm_ctx seal_key;        /* (v5) manifests and vCPU state: never the transport key */
    uint8_t migration_id[CP_MH_ID_BYTES];
    struct cp_sealed_page bounce __attribute__((aligned(64))); /* private copy of one record */
    uint8_t chain[16 + 16 * CP_MH_DIGEST_CHUNK] __attribute__((aligned(64))); /* digest chain || page hashes */
    uint8_t seal_buf[CP_MH_SEAL_BUF] __attribute__((aligned(64))); /* (v5) a record sealed or opened here */
    /* (v7) PREPARE_MANIFEST's result (manifest.c); any op but PREPARE/SEAL/CHECK_MANIFEST and VERIFIED drops it */
    struct cp_mh_prepared {
        uint32_t valid;       /* 1: what follows is a PREPARE's result */
        uint32_t changes;     /* the tables' change counter when it started: usable only while still equal */
        uint64_t start, npages;
        uint32_t chunk, max_gen;
        uint32_t in_seal_buf; /* source: the body's chunk entries wait in seal_buf, untouched since */
        uint32_t pad;
        uint8_t bitmap_digest[CP_MB_DIGEST_BYTES];
        uint8_t entries_digest[CP_MB_DIGEST_BYTES]; /* target: keyed digest of its chunk entries */
    } prep;
    struct cp_mh_keyrel keyrel; /* (v6) helper 0's SNP key release */
};

#endif /* CP_MH_CONTEXT_H */
