/*
 * The MH mailbox engine: one ring op per call (cp_mh_handle) and the serve loop (cp_mh_serve). Protocol in
 * firmware/include/cp_mailbox.h and docs/mailbox.md. Everything the host can write (control page, slots) is
 * read once into private memory before it is trusted.
 */
#include "mailbox.h"

#include "bytes.h"
#include "confplan_abi.h"
#include "cp_sealed_page.h"
#include "digest.h"
#include "keyrelease.h"
#include "manifest.h"
#include "secret.h"

#define MH_CTX_MAGIC 0x5854434du /* "MCTX" */

_Static_assert(sizeof(struct cp_mailbox_header) <= CP_MB_PROTO_OFFSET, "protocol block overlaps the header");
_Static_assert(CP_MB_PROTO_OFFSET + sizeof(struct cp_mb_proto) <= CP_MB_SLOTS_OFFSET, "protocol block size");
_Static_assert(CP_MB_SLOT_SIZE == CP_PAGE_SIZE + CP_MAILBOX_SLOT_TAG, "slot size matches the guest ABI");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "records are LE: the MH reads its copy as a struct");

/* A record field in a slot, which the host can write: read (once) and written bytewise at its offset. The
 * MH's private copy (ctx->bounce) is used through the struct. */
#define SLOT(field) offsetof(struct cp_sealed_page, field)
#define AAD_BYTES (8u + 4u + CP_MH_ID_BYTES) /* gpa || generation || migration id */

size_t cp_mh_ctx_size(void)
{
    return sizeof(struct cp_mh_ctx);
}

size_t cp_mh_shared_size(void)
{
    return sizeof(struct cp_mh_shared);
}

uint32_t cp_mh_features_from_bp(uint32_t f)
{
    uint32_t w = 0;
    w |= (f & CP_FEAT_AESNI) ? CP_CPU_AESNI : 0u;
    w |= (f & CP_FEAT_PCLMULQDQ) ? CP_CPU_PCLMUL : 0u;
    w |= (f & CP_FEAT_SSSE3) ? CP_CPU_SSSE3 : 0u;
    w |= (f & CP_FEAT_SSE41) ? CP_CPU_SSE41 : 0u;
    w |= (f & CP_FEAT_AVX2) ? CP_CPU_AVX2 : 0u;
    w |= (f & CP_FEAT_VAES) ? CP_CPU_VAES : 0u;
    w |= (f & CP_FEAT_VPCLMULQDQ) ? CP_CPU_VPCLMUL : 0u;
    w |= (f & CP_FEAT_AVX) ? CP_CPU_YMM_STATE : 0u;
    w |= (f & CP_FEAT_AVX512F) ? CP_CPU_AVX512F | CP_CPU_ZMM_STATE : 0u; /* the VMM set XCR0's ZMM states */
    w |= (f & CP_FEAT_AVX512BW) ? CP_CPU_AVX512BW : 0u;
    w |= (f & CP_FEAT_AVX512VL) ? CP_CPU_AVX512VL : 0u;
    w |= (f & CP_FEAT_RDRAND) ? CP_CPU_RDRAND : 0u;
    return w;
}

static int config_ok(const struct cp_mh_config *c)
{
    uint64_t pages = c->ram_size / CP_MH_PAGE;
    /* c->ram is not checked: in the guest it is GPA 0 (identity mapping), i.e. a null pointer. */
    return c->shared && c->gen_table && c->secret && c->mac_table && c->ram_size % CP_MH_PAGE == 0 &&
           c->gen_entries >= pages && c->mac_entries >= pages && c->mh_base % CP_MH_PAGE == 0 && c->side <= 1 &&
           c->batch_pages > 0 && c->secret_size >= 20 && c->vmsa_slots <= CP_MAX_VCPUS &&
           (c->vmsa || c->vmsa_slots == 0);
}

uint32_t cp_mh_setup(struct cp_mh_ctx *ctx, const struct cp_mh_config *cfg)
{
    cp_mh_wipe(ctx, sizeof(*ctx));
    if (!config_ok(cfg))
        return CP_MBS_CONFIG;
    /* Each setup takes a fresh index, so two contexts in one guest never share a nonce prefix even if the
     * host hands two vCPUs the same mh_index. */
    uint32_t index = __atomic_fetch_add(&cfg->shared->next_sender, 1u, __ATOMIC_SEQ_CST);
    if (index >= CP_MH_MAX_SENDERS)
        return CP_MBS_CONFIG;
    ctx->cfg = *cfg;
    ctx->sender_id = cfg->side << 16 | index;
    ctx->impl = cp_gcm_pick_impl(cfg->cpu_features);
    cp_gcm_nonce_seq_init(&ctx->nonce, ctx->sender_id, 0);
    ctx->magic = MH_CTX_MAGIC;
    return CP_MBS_OK;
}

/* ---- INIT / RESET ---- */

static void forget_key(struct cp_mh_ctx *ctx)
{
    cp_gcm_wipe(&ctx->transport);
    cp_gcm_wipe(&ctx->digest_key);
    cp_gcm_wipe(&ctx->final_key);
    cp_gcm_wipe(&ctx->seal_key);
    cp_mh_wipe(&ctx->bounce, sizeof(ctx->bounce));
    cp_mh_wipe(ctx->seal_buf, sizeof(ctx->seal_buf));
    cp_mh_wipe(ctx->chain, sizeof(ctx->chain));
    ctx->keyed = 0;
    ctx->key_id = 0;
}

/* The generation table belongs to one migration id: a new id starts it afresh, the same id (INIT again
 * after RESET) keeps it, so re-INIT cannot reopen the door to replayed records. The MAC table goes with
 * it: MACs under another id's key must never be folded; so do (v5) the VMSA slots and "verified". */
static void adopt_migration(struct cp_mh_ctx *ctx)
{
    struct cp_mh_shared *sh = ctx->cfg.shared;
    cp_mh_lock(sh);
    uint32_t same = sh->have_id;
    for (uint32_t i = 0; i < CP_MH_ID_BYTES; i++)
        same &= sh->last_id[i] == ctx->migration_id[i];
    if (!same) {
        cp_mh_wipe(ctx->cfg.gen_table, ctx->cfg.gen_entries * sizeof(uint32_t));
        cp_mh_wipe(ctx->cfg.mac_table, ctx->cfg.mac_entries * CP_MB_MAC_BYTES);
        cp_mh_forget_states(ctx);
        cp_mh_copy(sh->last_id, ctx->migration_id, CP_MH_ID_BYTES);
        sh->have_id = 1;
    }
    cp_mh_unlock(sh);
}

/* The efi_secret table INIT reads: the launch secret page (SEV), or (v6) in an SNP guest the table helper
 * 0's KEY_RELEASE opened (docs/key-release.md), copied privately; none yet = SECRET_HEADER. */
static uint32_t read_secret(struct cp_mh_ctx *ctx, uint8_t key[CP_MH_KEY_BYTES], uint8_t id[CP_MH_ID_BYTES],
                            uint32_t *have_id)
{
    if (!ctx->cfg.snp)
        return cp_mh_parse_secret(ctx->cfg.secret, ctx->cfg.secret_size, key, id, have_id);
    uint32_t len = cp_mh_released_table(ctx, ctx->seal_buf);
    uint32_t rc = cp_mh_parse_secret(ctx->seal_buf, len, key, id, have_id);
    cp_mh_wipe(ctx->seal_buf, CP_KR_TABLE_MAX);
    return rc;
}

static uint32_t op_init(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p)
{
    uint8_t key[CP_MH_KEY_BYTES];
    uint8_t id[CP_MH_ID_BYTES];
    uint32_t have_id = 0;
    forget_key(ctx);
    uint32_t rc = read_secret(ctx, key, id, &have_id);
    if (rc == CP_MBS_OK)
        rc = cp_mh_derive(ctx, key, have_id ? id : 0);
    cp_mh_wipe(key, sizeof(key));
    cp_mh_wipe(id, sizeof(id));
    if (rc != CP_MBS_OK) {
        forget_key(ctx);
        return rc;
    }
    adopt_migration(ctx);
    ctx->keyed = 1;
    p->key_id = ctx->key_id;
    for (uint32_t i = 0; i < CP_MH_ID_BYTES; i++)
        p->migration_id[i] = ctx->migration_id[i];
    return CP_MBS_OK;
}

/* ---- per-page checks shared by SAVE and LOAD ---- */

static uint32_t check_gpa(const struct cp_mh_config *cfg, uint64_t gpa)
{
    if (gpa % CP_MH_PAGE)
        return CP_MBS_GPA_ALIGN;
    if (gpa >= cfg->ram_size || cp_mh_hole(gpa))
        return CP_MBS_GPA_RANGE;
    if (cp_mh_owns(cfg, gpa))
        return CP_MBS_GPA_MH;
    return CP_MBS_OK;
}

static int gen_valid(uint32_t gen)
{
    return gen != 0 && gen != CP_MH_GEN_BUSY;
}

/* Claims the table entry of a page for generation `gen` (strictly newer than the entry). LOAD parks the entry
 * at BUSY while it writes, so two MH vCPUs can never place the same GPA out of order. */
static uint32_t gen_claim(uint32_t *entry, uint32_t gen, uint32_t mark, uint32_t *old_out)
{
    uint32_t old = __atomic_load_n(entry, __ATOMIC_ACQUIRE);
    for (;;) {
        if (old == CP_MH_GEN_BUSY) {
            __asm__ volatile("pause");
            old = __atomic_load_n(entry, __ATOMIC_ACQUIRE);
            continue;
        }
        if (gen <= old)
            return CP_MBS_GEN_STALE;
        if (__atomic_compare_exchange_n(entry, &old, mark, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *old_out = old;
            return CP_MBS_OK;
        }
    }
}

static void make_aad(uint8_t aad[AAD_BYTES], uint64_t gpa, uint32_t gen, const uint8_t *id)
{
    cp_mh_store_le64(aad, gpa);
    cp_mh_store_le32(aad + 8, gen);
    cp_mh_copy(aad + 12, id, CP_MH_ID_BYTES);
}

/* ---- SAVE ---- */

static uint32_t seal_one(struct cp_mh_ctx *ctx, uint8_t *slot, uint32_t gen)
{
    struct cp_sealed_page *rec = &ctx->bounce;
    uint8_t aad[AAD_BYTES];
    uint32_t old;
    uint64_t gpa = cp_mh_load_le64(slot + SLOT(gpa)); /* read once: the host may change the slot meanwhile */
    uint32_t rc = check_gpa(&ctx->cfg, gpa);
    if (rc == CP_MBS_OK)
        rc = gen_claim(&ctx->cfg.gen_table[gpa / CP_MH_PAGE], gen, gen, &old);
    if (rc != CP_MBS_OK)
        return rc;
    cp_mh_wipe(rec, CP_SEALED_PAGE_HEADER);
    rec->gpa = gpa;
    rec->generation = gen;
    rec->key_id = ctx->key_id;
    if (cp_gcm_nonce_next(&ctx->nonce, rec->nonce) != 0)
        return CP_MBS_NONCE;
    make_aad(aad, gpa, gen, ctx->migration_id);
    /* The ciphertext goes straight into the slot: seal_shared never reads it back (GHASH must not see what
     * the host may write); the header is built privately and copied after. */
    if (cp_gcm_seal_shared(&ctx->transport, rec->nonce, aad, AAD_BYTES, ctx->cfg.ram + gpa, slot + SLOT(ct),
                           CP_MH_PAGE, rec->tag, rec->ct) != 0)
        return CP_MBS_CONFIG;
    cp_mh_mac_set(ctx, gpa, rec->tag);
    cp_mh_copy(slot, rec, CP_SEALED_PAGE_HEADER);
    return CP_MBS_OK;
}

/* ---- LOAD ---- */

static uint32_t record_ok(const struct cp_mh_ctx *ctx, const struct cp_sealed_page *rec)
{
    uint8_t any = 0;
    for (uint32_t i = 0; i < sizeof(rec->reserved); i++)
        any |= rec->reserved[i];
    if (any || rec->status != 0)
        return CP_MBS_RESERVED;
    uint32_t rc = check_gpa(&ctx->cfg, rec->gpa);
    if (rc != CP_MBS_OK)
        return rc;
    if (!gen_valid(rec->generation))
        return CP_MBS_GEN_INVALID;
    if (rec->key_id != ctx->key_id)
        return CP_MBS_KEY_ID;
    return CP_MBS_OK;
}

static uint32_t open_one(struct cp_mh_ctx *ctx, const uint8_t *slot)
{
    struct cp_sealed_page *rec = &ctx->bounce;
    uint8_t aad[AAD_BYTES];
    uint32_t old;
    /* The header is copied privately and checked; the ciphertext is read once, by open_shared (one pass:
     * GHASH and CTR of each block as loaded, plaintext into rec->ct, placed only once the tag matched). */
    cp_mh_copy(rec, slot, CP_SEALED_PAGE_HEADER);
    uint32_t rc = record_ok(ctx, rec);
    if (rc != CP_MBS_OK)
        return rc;
    uint64_t gpa = rec->gpa;
    uint32_t gen = rec->generation;
    uint32_t *entry = &ctx->cfg.gen_table[gpa / CP_MH_PAGE];
    rc = gen_claim(entry, gen, CP_MH_GEN_BUSY, &old);
    if (rc != CP_MBS_OK)
        return rc;
    make_aad(aad, gpa, gen, ctx->migration_id);
    int bad = cp_gcm_open_shared(&ctx->transport, rec->nonce, aad, AAD_BYTES, slot + SLOT(ct),
                                 ctx->cfg.ram + gpa, CP_MH_PAGE, rec->tag, rec->ct);
    /* The tables move only after a successful open; a refused page leaves the page and both tables. */
    if (!bad)
        cp_mh_mac_set(ctx, gpa, rec->tag);
    __atomic_store_n(entry, bad ? old : gen, __ATOMIC_RELEASE);
    return bad ? CP_MBS_AUTH : CP_MBS_OK;
}

/* ---- dispatch ---- */

static uint32_t run_batch(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p, volatile struct cp_mb_cmd *c,
                          uint8_t *slots, uint32_t op, uint32_t count, uint32_t gen)
{
    uint32_t ok = 0, refused = 0, first_bad = CP_MB_NO_INDEX;
    if (op == CP_MB_OP_SAVE && !gen_valid(gen))
        return CP_MBS_GEN_INVALID;
    if (op == CP_MB_OP_LOAD)
        cp_mh_tables_changed(ctx); /* before and after: a check racing this op cannot end "verified" */
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *slot = slots + (size_t)i * CP_MB_SLOT_SIZE;
        uint32_t st = op == CP_MB_OP_SAVE ? seal_one(ctx, slot, gen) : open_one(ctx, slot);
        cp_mh_store_le32(slot + SLOT(status), st);
        if (st == CP_MBS_OK) {
            ok++;
        } else {
            first_bad = refused++ ? first_bad : i;
        }
    }
    cp_mh_wipe(&ctx->bounce, sizeof(ctx->bounce));
    if (op == CP_MB_OP_LOAD)
        cp_mh_tables_changed(ctx);
    c->n_ok = ok;
    c->n_refused = refused;
    c->first_bad = first_bad;
    if (op == CP_MB_OP_SAVE)
        p->pages_sealed += ok;
    else
        p->pages_opened += ok;
    p->pages_refused += refused;
    return refused ? CP_MBS_PARTIAL : CP_MBS_OK;
}

/* A range op's counts, where DIGEST, MAC_RANGE, FOLD and WARM publish them; returns rc. */
static uint32_t published(volatile struct cp_mb_proto *p, uint32_t rc, uint64_t done, uint64_t skipped)
{
    p->digest_pages = done;
    p->digest_skipped = skipped;
    return rc;
}

static uint32_t op_digest(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p, uint64_t start, uint64_t n)
{
    uint8_t out[CP_MB_DIGEST_BYTES];
    uint64_t hashed = 0, skipped = 0;
    uint32_t rc = cp_mh_digest(ctx, start, n, out, &hashed, &skipped);
    for (uint32_t i = 0; i < CP_MB_DIGEST_BYTES; i++)
        p->digest[i] = rc == CP_MBS_OK ? out[i] : 0;
    return published(p, rc, hashed, skipped);
}

/* WARM (v8); v9: `count` bit CP_MB_WARM_HUGE reads one page per 2 MiB page of the view, CP_MB_WARM_WRITE
 * (a target's helper only) touches for writing (digest.h). */
static uint32_t op_warm(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p, uint64_t start, uint64_t n,
                        uint32_t flags)
{
    uint64_t read = 0, skipped = 0;
    if (flags & ~(CP_MB_WARM_HUGE | CP_MB_WARM_WRITE))
        return CP_MBS_COUNT;
    if ((flags & CP_MB_WARM_WRITE) && ctx->cfg.side != CP_MH_SIDE_TARGET)
        return CP_MBS_SIDE; /* a source's guest runs and writes: no write of the helper's beside it */
    uint32_t rc = cp_mh_warm(ctx, start, n, (flags & CP_MB_WARM_HUGE) != 0, (flags & CP_MB_WARM_WRITE) != 0,
                             &read, &skipped);
    return published(p, rc, read, skipped);
}

static uint32_t op_mac_range(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p, uint64_t start, uint64_t n)
{
    uint64_t hashed = 0, skipped = 0;
    cp_mh_tables_changed(ctx);
    uint32_t rc = cp_mh_mac_range(ctx, start, n, &hashed, &skipped);
    cp_mh_tables_changed(ctx);
    return published(p, rc, hashed, skipped);
}

/* FOLD: the range in chunks of `chunk` pages, one digest per chunk written (32 bytes each, in order) into
 * the data area from slot `first` on, so one op answers for a whole range of chunks. */
static uint32_t op_fold(struct cp_mh_ctx *ctx, volatile struct cp_mb_proto *p, uint8_t *out, uint64_t room,
                        uint64_t start, uint64_t n, uint32_t chunk)
{
    uint8_t d[CP_MB_DIGEST_BYTES];
    uint64_t total = 0, total_skipped = 0;
    uint32_t rc = CP_MBS_OK;
    if (chunk == 0 || n == 0 || (n + chunk - 1) / chunk > room)
        return CP_MBS_COUNT;
    for (uint64_t at = 0; rc == CP_MBS_OK && at < n; at += chunk) {
        uint64_t folded = 0, skipped = 0, len = n - at < chunk ? n - at : chunk;
        rc = cp_mh_fold(ctx, start + at * CP_MH_PAGE, len, d, &folded, &skipped);
        if (rc == CP_MBS_OK)
            cp_mh_copy(out + at / chunk * CP_MB_DIGEST_BYTES, d, CP_MB_DIGEST_BYTES);
        total += folded;
        total_skipped += skipped;
    }
    return published(p, rc, total, total_skipped);
}

/* Bytes of the data area from slot `first` on (the v5 ops' requests and records live there). */
static uint64_t data_room(const struct cp_mh_ctx *ctx, uint32_t first)
{
    return first >= ctx->cfg.batch_pages ? 0 : (uint64_t)(ctx->cfg.batch_pages - first) * CP_MB_SLOT_SIZE;
}

/* Largest MAC_LIST from slot `first`: the GPAs fill the data area from there on, 8 bytes each (FOLD's
 * 32-byte digests: a quarter of that). */
static uint64_t mac_list_room(const struct cp_mh_ctx *ctx, uint32_t first)
{
    return data_room(ctx, first) / 8;
}

/* MAC each listed page; a refused GPA (alignment, range, MH area) is counted, not MAC'd. */
static uint32_t op_mac_list(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, const uint8_t *list,
                            uint32_t count)
{
    uint32_t ok = 0, refused = 0, first_bad = CP_MB_NO_INDEX, rc = CP_MBS_OK;
    cp_mh_tables_changed(ctx);
    for (uint32_t i = 0; rc == CP_MBS_OK && i < count; i++) {
        uint64_t gpa = cp_mh_load_le64(list + (size_t)i * 8); /* read once */
        uint32_t st = check_gpa(&ctx->cfg, gpa);
        if (st == CP_MBS_OK)
            st = cp_mh_mac_page(ctx, gpa);
        if (st == CP_MBS_CONFIG)
            rc = st;
        else if (st == CP_MBS_OK)
            ok++;
        else
            first_bad = refused++ ? first_bad : i;
    }
    cp_mh_tables_changed(ctx);
    c->n_ok = ok;
    c->n_refused = refused;
    c->first_bad = first_bad;
    return rc != CP_MBS_OK ? rc : refused ? CP_MBS_PARTIAL : CP_MBS_OK;
}

/* v5: the manifest and the sealed vCPU state (manifest.c), over the data area from slot `first`. */
static uint32_t op_v5(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *slots, uint32_t op,
                      uint32_t count, uint32_t first, uint64_t arg0, uint64_t arg1)
{
    uint64_t room = data_room(ctx, first);
    if (room == 0)
        return CP_MBS_COUNT;
    uint8_t *data = slots + (size_t)first * CP_MB_SLOT_SIZE;
    if (op == CP_MB_OP_SEAL_MANIFEST)
        return cp_mh_seal_manifest(ctx, c, data, room, arg0, arg1, count);
    if (op == CP_MB_OP_CHECK_MANIFEST)
        return cp_mh_check_manifest(ctx, c, data, room, arg0, arg1, count);
    if (op == CP_MB_OP_PREPARE_MANIFEST)
        return cp_mh_prepare_manifest(ctx, data, room, arg0, arg1, count);
    if (op == CP_MB_OP_SEAL_STATE)
        return cp_mh_seal_state(ctx, c, data, room, arg0, arg1);
    if (op == CP_MB_OP_OPEN_STATE)
        return cp_mh_open_state(ctx, data, room, arg0, arg1);
    c->n_ok = cp_mh_verified(ctx);
    return CP_MBS_OK;
}

/* The guest TSC for the ring entry's profiling stamps (CPL3 may read it: the VMM leaves CR4.TSD clear). */
static uint64_t tsc_now(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static volatile struct cp_mb_cmd *ring_entry(volatile uint8_t *ctl, uint64_t seq)
{
    return (volatile struct cp_mb_cmd *)(ctl + CP_MB_RING_OFFSET + (seq % CP_MB_RING) * CP_MB_CMD_SIZE);
}

uint32_t cp_mh_handle(struct cp_mh_ctx *ctx, volatile uint8_t *ctl, uint8_t *slots)
{
    volatile struct cp_mb_proto *p = (volatile struct cp_mb_proto *)(ctl + CP_MB_PROTO_OFFSET);
    if (ctx == 0 || ctx->magic != MH_CTX_MAGIC)
        return CP_MBS_CONFIG;
    volatile struct cp_mb_cmd *c = ring_entry(ctl, __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) + 1);
    c->tsc_start = tsc_now();
    /* Arguments are read once; the host may rewrite the page while we work. */
    uint32_t op = c->op, count = c->count, gen = c->generation, first = c->first;
    uint64_t arg0 = c->arg0, arg1 = c->arg1;
    uint32_t rc;
    c->n_ok = c->n_refused = 0;
    c->first_bad = CP_MB_NO_INDEX;
    /* (v7) a prepared manifest lives until anything else happens here; but OPEN_STATE (target only), which
     * changes no table it covers and leaves a target's prepared fields alone (they are not in seal_buf) */
    if (op != CP_MB_OP_PREPARE_MANIFEST && op != CP_MB_OP_SEAL_MANIFEST && op != CP_MB_OP_CHECK_MANIFEST &&
        op != CP_MB_OP_VERIFIED && !(op == CP_MB_OP_OPEN_STATE && ctx->cfg.side == CP_MH_SIDE_TARGET))
        cp_mh_forget_prepared(ctx);
    if (op == CP_MB_OP_INIT) {
        rc = op_init(ctx, p);
    } else if (op == CP_MB_OP_RESET) {
        forget_key(ctx);
        rc = CP_MBS_OK;
    } else if (op < CP_MB_OP_SAVE || op > CP_MB_OP_LAST) {
        rc = CP_MBS_BAD_OP;
    } else if (op >= CP_MB_OP_KEY_REQUEST && op <= CP_MB_OP_KEY_RELEASE) {
        /* v6: before INIT, which reads what they release */
        rc = cp_mh_key_op(ctx, c, slots + (size_t)(first < ctx->cfg.batch_pages ? first : 0) * CP_MB_SLOT_SIZE,
                          data_room(ctx, first), op, arg1);
    } else if (op == CP_MB_OP_WARM) {
        rc = op_warm(ctx, p, arg0, arg1, count); /* v8: maps the range into its view; no key */
    } else if (!ctx->keyed) {
        rc = CP_MBS_NO_KEY;
    } else if (op >= CP_MB_OP_SEAL_MANIFEST) {
        rc = op_v5(ctx, c, slots, op, count, first, arg0, arg1);
    } else if (op == CP_MB_OP_DIGEST) {
        rc = op_digest(ctx, p, arg0, arg1);
    } else if (op == CP_MB_OP_MAC_RANGE) {
        rc = op_mac_range(ctx, p, arg0, arg1);
    } else if (op == CP_MB_OP_FOLD) {
        rc = op_fold(ctx, p, slots + (size_t)first * CP_MB_SLOT_SIZE, mac_list_room(ctx, first) / 4, arg0, arg1,
                     count);
    } else if (op == CP_MB_OP_MAC_LIST) {
        rc = count == 0 || count > mac_list_room(ctx, first)
                 ? CP_MBS_COUNT
                 : op_mac_list(ctx, c, slots + (size_t)first * CP_MB_SLOT_SIZE, count);
    } else if (count == 0 || first >= ctx->cfg.batch_pages || count > ctx->cfg.batch_pages - first) {
        rc = CP_MBS_COUNT;
    } else {
        rc = run_batch(ctx, p, c, slots + (size_t)first * CP_MB_SLOT_SIZE, op, count, gen);
    }
    p->ops++;
    c->status = rc;
    c->tsc_end = tsc_now();
    return rc;
}

/* ~40 us at 2.5 GHz: longer than the VMM's send-and-repost of a bank, far shorter than an op */
#define CP_MH_SPIN_TSC 100000u

int cp_mh_serve(struct cp_mh_ctx *ctx, volatile uint8_t *ctl, uint8_t *slots, cp_mh_idle_fn idle_fn,
                void *idle_arg)
{
    volatile struct cp_mailbox_header *hdr = (volatile struct cp_mailbox_header *)ctl;
    volatile struct cp_mb_proto *p = (volatile struct cp_mb_proto *)(ctl + CP_MB_PROTO_OFFSET);
    p->version = CP_MB_PROTO_VERSION;
    p->batch_pages = ctx->cfg.batch_pages;
    p->sender_id = ctx->sender_id;
    p->ring = CP_MB_RING;
    __atomic_store_n(&p->magic, CP_MB_PROTO_MAGIC, __ATOMIC_RELEASE);
    uint64_t seen = __atomic_load_n(&p->done, __ATOMIC_ACQUIRE);
    for (;;) {
        hdr->heartbeat++;
        if (hdr->ping != hdr->pong)
            hdr->pong = hdr->ping;
        uint64_t seq = __atomic_load_n(&p->seq, __ATOMIC_ACQUIRE);
        if (seq == seen) {
            if (idle_fn(idle_arg, ctl, CP_MH_WHY_IDLE, seen))
                return 0;
            continue;
        }
        /* Ops are taken one at a time, in order, however far the VMM has run ahead. */
        cp_mh_handle(ctx, ctl, slots);
        seen++;
        /* Every result above is visible before done (x86 stores are ordered; the fence keeps the compiler). */
        __atomic_store_n(&p->done, seen, __ATOMIC_RELEASE);
        /* Store done, then load seq: a full fence, or x86 may let the load pass the store and the MH would
         * ring and park although a post came in (the latched kick would still wake it, one exit later). */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        /* Caught up: look at seq for a bounded while before ringing. A streaming VMM posts the next op within
         * tens of microseconds (it sends the bank just done, then reposts it); meeting that post here saves
         * the doorbell exit, the park and the kick (~100 us and a host thread wake-up on 2 busy cores). */
        for (uint64_t until = tsc_now() + CP_MH_SPIN_TSC;
             __atomic_load_n(&p->seq, __ATOMIC_ACQUIRE) == seen && tsc_now() < until;)
            __asm__ volatile("pause");
        if (__atomic_load_n(&p->seq, __ATOMIC_ACQUIRE) == seen) {
            /* Caught up: tell the VMM (and, in the guest, park there until the next post's kick). */
            p->drains++;
            if (ctx->cfg.doorbell)
                *ctx->cfg.doorbell = seen;
        }
        if (idle_fn(idle_arg, ctl, CP_MH_WHY_DONE, seen))
            return 0;
    }
}
