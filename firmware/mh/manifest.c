/*
 * Protocol v5: SEAL_MANIFEST / CHECK_MANIFEST and SEAL_STATE / OPEN_STATE (docs/mailbox.md, "The manifest
 * and sealed vCPU state"). The source MH states, sealed, what its tables say it sent; the target MH recomputes
 * the same statement from its own tables and compares. Records are sealed and opened in the context's private
 * seal buffer only: the data area is host memory and is read once.
 */
#include "manifest.h"

#include "bytes.h"
#include "digest.h"

#define HEAD CP_MB_SEALED_HEAD
/* Record head fields (struct cp_sealed_blob), read bytewise from the private copy. */
#define H(field) offsetof(struct cp_sealed_blob, field)
#define B(field) offsetof(struct cp_manifest_body, field)
#define R(field) offsetof(struct cp_manifest_request, field)

static struct cp_vmsa_slot *slot_of(const struct cp_mh_ctx *ctx, uint64_t vcpu)
{
    return (struct cp_vmsa_slot *)(ctx->cfg.vmsa + vcpu * CP_VMSA_SLOT_SIZE);
}

static int bytes_equal(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

static uint64_t pad16(uint64_t n)
{
    return (n + 15u) & ~(uint64_t)15u;
}

/* ---- "verified" and the change counters, tables and VMSA slots (shared block, under its lock) ---- */

static void demote_slots(struct cp_mh_ctx *ctx)
{
    for (uint64_t i = 0; i < ctx->cfg.vmsa_slots; i++)
        if (slot_of(ctx, i)->state == CP_VMSA_VERIFIED)
            slot_of(ctx, i)->state = CP_VMSA_OPENED;
}

/* Call with the lock held. `states`: a VMSA slot changed (OPEN_STATE), else a table (LOAD, MAC_*). */
static void unverify_locked(struct cp_mh_ctx *ctx, int states)
{
    struct cp_mh_shared *sh = ctx->cfg.shared;
    if (states)
        sh->state_changes++;
    else
        sh->changes++;
    if (sh->verified) {
        sh->verified = 0;
        demote_slots(ctx);
    }
}

void cp_mh_tables_changed(struct cp_mh_ctx *ctx)
{
    cp_mh_lock(ctx->cfg.shared);
    unverify_locked(ctx, 0);
    cp_mh_unlock(ctx->cfg.shared);
}

uint32_t cp_mh_verified(struct cp_mh_ctx *ctx)
{
    cp_mh_lock(ctx->cfg.shared);
    uint32_t verified = ctx->cfg.shared->verified;
    cp_mh_unlock(ctx->cfg.shared);
    return verified;
}

void cp_mh_forget_states(struct cp_mh_ctx *ctx)
{
    cp_mh_wipe(ctx->cfg.vmsa, ctx->cfg.vmsa_slots * CP_VMSA_SLOT_SIZE);
    ctx->cfg.shared->verified = 0;
    ctx->cfg.shared->changes++;
    ctx->cfg.shared->state_changes++;
}

/* ---- sealed records: 64-byte head, then ciphertext; all in ctx->seal_buf ---- */

static void record_aad(uint8_t aad[CP_MB_LABEL_BYTES + CP_MB_SEALED_AAD], const char *label, const uint8_t *head)
{
    cp_mh_copy(aad, label, CP_MB_LABEL_BYTES);
    cp_mh_copy(aad + CP_MB_LABEL_BYTES, head, CP_MB_SEALED_AAD);
}

/* Seals the `length` plaintext bytes at seal_buf + HEAD in place and writes the head before them. */
static uint32_t seal_record(struct cp_mh_ctx *ctx, uint32_t magic, const char *label, uint32_t tag_label,
                            uint32_t length)
{
    uint8_t *rec = ctx->seal_buf;
    uint8_t aad[CP_MB_LABEL_BYTES + CP_MB_SEALED_AAD];
    cp_mh_wipe(rec, HEAD);
    cp_mh_store_le32(rec + H(magic), magic);
    cp_mh_store_le(rec + H(version), CP_MB_SEALED_VERSION, 2);
    cp_mh_store_le32(rec + H(length), length);
    cp_mh_store_le32(rec + H(key_id), ctx->key_id);
    cp_mh_copy(rec + H(migration_id), ctx->migration_id, CP_MH_ID_BYTES);
    if (cp_gcm_nonce_next(&ctx->nonce, rec + H(nonce)) != 0)
        return CP_MBS_NONCE;
    cp_mh_store_le32(rec + H(label), tag_label);
    record_aad(aad, label, rec);
    if (cp_gcm_seal(&ctx->seal_key, rec + H(nonce), aad, sizeof(aad), rec + HEAD, rec + HEAD, length,
                    rec + H(tag)) != 0)
        return CP_MBS_CONFIG;
    return CP_MBS_OK;
}

/* Opens the record of `size` bytes already copied to seal_buf, in place. Non-zero = refused: malformed head,
 * another key, not sealed by a source MH, or a bad tag. The caller compares migration id and label after. */
static int open_record(struct cp_mh_ctx *ctx, uint32_t magic, const char *label, uint64_t size)
{
    uint8_t *rec = ctx->seal_buf;
    uint8_t aad[CP_MB_LABEL_BYTES + CP_MB_SEALED_AAD];
    if (size < HEAD || size > CP_MB_SEALED_MAX)
        return -1;
    uint32_t length = cp_mh_load_le32(rec + H(length));
    uint32_t sender = (uint32_t)rec[H(nonce)] << 24 | (uint32_t)rec[H(nonce) + 1] << 16;
    if (cp_mh_load_le32(rec + H(magic)) != magic || cp_mh_load_le(rec + H(version), 2) != CP_MB_SEALED_VERSION ||
        cp_mh_load_le(rec + H(flags), 2) != 0 || length != size - HEAD)
        return -1;
    /* Only a source MH seals these: a target cannot have its own helper vouch for its own tables. */
    if (cp_mh_load_le32(rec + H(key_id)) != ctx->key_id || sender >> 16 != CP_MH_SIDE_SOURCE)
        return -1;
    record_aad(aad, label, rec);
    return cp_gcm_open(&ctx->seal_key, rec + H(nonce), aad, sizeof(aad), rec + HEAD, rec + HEAD, length,
                       rec + H(tag));
}

/* ---- the manifest's body ---- */

/* What the VMM asked for, read once from the data area. */
struct request {
    uint8_t state_hash[32];
    uint32_t rounds;
    uint64_t bitmap_bytes;
    uint64_t sealed_bytes;
    const uint8_t *bits;   /* in the data area: copied chunk by chunk before use */
    const uint8_t *sealed; /* in the data area (CHECK) */
};

static uint32_t read_request(const struct cp_mh_ctx *ctx, const uint8_t *data, uint64_t room, uint64_t start,
                             uint64_t npages, uint32_t chunk, struct request *rq)
{
    if (chunk == 0 || chunk % CP_MB_MANIFEST_CHUNK_ALIGN || chunk > CP_MB_MANIFEST_CHUNK_MAX || npages == 0)
        return CP_MBS_COUNT;
    if (start % CP_MH_PAGE)
        return CP_MBS_GPA_ALIGN;
    if (start > ctx->cfg.ram_size || npages > (ctx->cfg.ram_size - start) / CP_MH_PAGE)
        return CP_MBS_GPA_RANGE;
    if (room < CP_MB_REQUEST_BYTES)
        return CP_MBS_COUNT;
    cp_mh_copy(rq->state_hash, data + R(state_hash), sizeof(rq->state_hash));
    rq->rounds = cp_mh_load_le32(data + R(rounds));
    rq->bitmap_bytes = cp_mh_load_le32(data + R(bitmap_bytes));
    rq->sealed_bytes = cp_mh_load_le32(data + R(sealed_bytes));
    rq->bits = data + CP_MB_REQUEST_BYTES;
    rq->sealed = rq->bits + pad16(rq->bitmap_bytes);
    if (rq->bitmap_bytes < (npages + 7) / 8 || CP_MB_REQUEST_BYTES + pad16(rq->bitmap_bytes) + rq->sealed_bytes > room)
        return CP_MBS_COUNT;
    return CP_MBS_OK;
}

static uint64_t body_bytes(const struct cp_mh_ctx *ctx, uint64_t chunks)
{
    return sizeof(struct cp_manifest_body) + ctx->cfg.vmsa_slots * CP_MB_VMSA_TAG + chunks * CP_MB_MANIFEST_ENTRY;
}

/* Where the own side's values differ from a manifest's (CHECK). */
struct diffs {
    uint32_t gen_first, gen_count, mac_first, mac_count, chunks_differ;
};

static void note(uint32_t *first, uint32_t *count, uint32_t index)
{
    *first = (*count)++ ? *first : index;
}

/* Chunk k's bits into private memory (ctx->bounce after a 16-byte chain value), bits past the range cleared,
 * zero-padded to 16; then the bitmap chain absorbs them. Returns the private bits. */
static const uint8_t *take_bits(struct cp_mh_ctx *ctx, const struct request *rq, uint64_t k, uint32_t chunk,
                                uint64_t n, uint8_t chain[16], int *bad)
{
    uint8_t *buf = (uint8_t *)&ctx->bounce;
    uint64_t bytes = (n + 7) / 8;
    cp_mh_copy(buf, chain, 16);
    cp_mh_wipe(buf + 16, pad16(bytes));
    cp_mh_copy(buf + 16, rq->bits + k * (chunk / 8), bytes);
    if (n % 8)
        buf[16 + bytes - 1] &= (uint8_t)((1u << (n % 8)) - 1u);
    *bad |= cp_mh_gmac(ctx, 0xfb, k, buf, 16 + pad16(bytes), chain) != 0;
    return buf + 16;
}

/* Computes the body from this side's tables into `body` (SEAL), or compares it with `body` (CHECK, where a
 * chunk with a MAC gap counts as differing instead of failing the op). */
static uint32_t compute_body(struct cp_mh_ctx *ctx, const struct request *rq, uint64_t start, uint64_t npages,
                             uint32_t chunk, uint8_t *body, int check, struct diffs *d)
{
    uint8_t own[CP_MB_MANIFEST_ENTRY], chain[16], bitmap_digest[CP_MB_DIGEST_BYTES];
    uint64_t chunks = (npages + chunk - 1) / chunk, folded, skipped;
    uint32_t max_gen = 0;
    int bad = 0;
    uint8_t *entries = body + sizeof(struct cp_manifest_body) + ctx->cfg.vmsa_slots * CP_MB_VMSA_TAG;
    cp_mh_store_le64(chain, start);
    cp_mh_store_le64(chain + 8, npages);
    for (uint64_t k = 0; k < chunks; k++) {
        uint64_t s = start + k * chunk * CP_MH_PAGE, n = npages - k * chunk < chunk ? npages - k * chunk : chunk;
        const uint8_t *bits = take_bits(ctx, rq, k, chunk, n, chain, &bad);
        uint32_t rc = cp_mh_gen_digest(ctx, s, n, bits, own, &max_gen);
        if (rc != CP_MBS_OK)
            return rc;
        rc = cp_mh_fold(ctx, s, n, own + CP_MB_DIGEST_BYTES, &folded, &skipped);
        if (rc == CP_MBS_MAC_MISSING && check)
            cp_mh_wipe(own + CP_MB_DIGEST_BYTES, CP_MB_DIGEST_BYTES); /* a gap: never equal to a real fold */
        else if (rc != CP_MBS_OK)
            return rc;
        uint8_t *entry = entries + k * CP_MB_MANIFEST_ENTRY;
        if (!check) {
            cp_mh_copy(entry, own, CP_MB_MANIFEST_ENTRY);
            continue;
        }
        int gen_differs = !bytes_equal(entry, own, CP_MB_DIGEST_BYTES);
        int mac_differs = rc != CP_MBS_OK ||
                          !bytes_equal(entry + CP_MB_DIGEST_BYTES, own + CP_MB_DIGEST_BYTES, CP_MB_DIGEST_BYTES);
        if (gen_differs)
            note(&d->gen_first, &d->gen_count, (uint32_t)k);
        if (mac_differs)
            note(&d->mac_first, &d->mac_count, (uint32_t)k);
        d->chunks_differ += gen_differs || mac_differs;
    }
    cp_mh_wipe(&ctx->bounce, sizeof(ctx->bounce));
    if (bad || cp_mh_prf(ctx, chain, bitmap_digest) != 0)
        return CP_MBS_CONFIG;
    if (!check) {
        cp_mh_store_le32(body + B(max_generation), max_gen);
        cp_mh_copy(body + B(bitmap_digest), bitmap_digest, CP_MB_DIGEST_BYTES);
        return CP_MBS_OK;
    }
    if (!bytes_equal(body + B(bitmap_digest), bitmap_digest, CP_MB_DIGEST_BYTES))
        return CP_MBS_MANIFEST_BITMAP;
    if (cp_mh_load_le32(body + B(max_generation)) != max_gen && d->gen_count == 0)
        note(&d->gen_first, &d->gen_count, CP_MB_NO_INDEX);
    return CP_MBS_OK;
}

/* The bitmap digest alone (compute_body's chain without the tables): what a prepared manifest was made for. */
static uint32_t bitmap_digest(struct cp_mh_ctx *ctx, const struct request *rq, uint64_t start, uint64_t npages,
                              uint32_t chunk, uint8_t out[CP_MB_DIGEST_BYTES])
{
    uint8_t chain[16];
    int bad = 0;
    cp_mh_store_le64(chain, start);
    cp_mh_store_le64(chain + 8, npages);
    for (uint64_t k = 0; k * chunk < npages; k++) {
        uint64_t n = npages - k * chunk < chunk ? npages - k * chunk : chunk;
        take_bits(ctx, rq, k, chunk, n, chain, &bad);
    }
    cp_mh_wipe(&ctx->bounce, sizeof(ctx->bounce));
    return bad || cp_mh_prf(ctx, chain, out) != 0 ? CP_MBS_CONFIG : CP_MBS_OK;
}

/* v7: a keyed digest of the chunk entries (GMAC kind 0xfa, then the PRF): what a target compares a manifest's
 * entries with when its own were prepared. Equal digests of unequal entries: a forgery of the keyed GMAC. */
static uint32_t entries_digest(struct cp_mh_ctx *ctx, const uint8_t *entries, uint64_t chunks,
                               uint8_t out[CP_MB_DIGEST_BYTES])
{
    uint8_t c[CP_GCM_TAG_BYTES];
    if (cp_mh_gmac(ctx, 0xfa, chunks, entries, chunks * CP_MB_MANIFEST_ENTRY, c) != 0 || cp_mh_prf(ctx, c, out) != 0)
        return CP_MBS_CONFIG;
    return CP_MBS_OK;
}

void cp_mh_forget_prepared(struct cp_mh_ctx *ctx)
{
    if (ctx->prep.valid)
        cp_mh_wipe(&ctx->prep, sizeof(ctx->prep));
}

/* Whether the prepared manifest holds for this op: same range and chunks, nothing changed the tables since
 * it started (the counter), and the same bitmap (its digest, recomputed over this op's bits). */
static int prepared_for(struct cp_mh_ctx *ctx, const struct request *rq, uint64_t start, uint64_t npages,
                        uint32_t chunk, int source)
{
    uint8_t digest[CP_MB_DIGEST_BYTES];
    const struct cp_mh_prepared *pr = &ctx->prep;
    if (!pr->valid || (uint32_t)source != pr->in_seal_buf || pr->start != start || pr->npages != npages ||
        pr->chunk != chunk || __atomic_load_n(&ctx->cfg.shared->changes, __ATOMIC_ACQUIRE) != pr->changes)
        return 0;
    if (bitmap_digest(ctx, rq, start, npages, chunk, digest) != CP_MBS_OK)
        return 0;
    int same = bytes_equal(digest, pr->bitmap_digest, sizeof(digest));
    cp_mh_wipe(digest, sizeof(digest));
    return same;
}

/* The VMSA tags: per slot, the tag of the state sealed (source) or opened (target) last; zero for none. */
static void vmsa_tags(const struct cp_mh_ctx *ctx, uint8_t *out)
{
    for (uint64_t i = 0; i < ctx->cfg.vmsa_slots; i++) {
        const struct cp_vmsa_slot *slot = slot_of(ctx, i);
        if (slot->magic == CP_VMSA_MAGIC && slot->state != CP_VMSA_EMPTY)
            cp_mh_copy(out + i * CP_MB_VMSA_TAG, slot->tag, CP_MB_VMSA_TAG);
        else
            cp_mh_wipe(out + i * CP_MB_VMSA_TAG, CP_MB_VMSA_TAG);
    }
}

/* ---- PREPARE_MANIFEST (v7) ---- */

uint32_t cp_mh_prepare_manifest(struct cp_mh_ctx *ctx, const uint8_t *data, uint64_t room, uint64_t start,
                                uint64_t npages, uint32_t chunk)
{
    struct request rq;
    struct diffs unused = {0, 0, 0, 0, 0};
    cp_mh_forget_prepared(ctx);
    uint32_t changes = __atomic_load_n(&ctx->cfg.shared->changes, __ATOMIC_ACQUIRE); /* before any table read */
    uint32_t rc = read_request(ctx, data, room, start, npages, chunk, &rq);
    if (rc != CP_MBS_OK)
        return rc;
    uint64_t chunks = (npages + chunk - 1) / chunk, len = body_bytes(ctx, chunks);
    if (HEAD + len > CP_MB_SEALED_MAX)
        return CP_MBS_COUNT;
    /* The body as SEAL builds it, in the same place: its chunk entries, max_generation and bitmap digest. */
    uint8_t *body = ctx->seal_buf + HEAD;
    uint8_t *entries = body + sizeof(struct cp_manifest_body) + ctx->cfg.vmsa_slots * CP_MB_VMSA_TAG;
    struct cp_mh_prepared *pr = &ctx->prep;
    cp_mh_wipe(body, len);
    rc = compute_body(ctx, &rq, start, npages, chunk, body, 0, &unused);
    if (rc == CP_MBS_OK) {
        pr->changes = changes;
        pr->start = start;
        pr->npages = npages;
        pr->chunk = chunk;
        pr->max_gen = cp_mh_load_le32(body + B(max_generation));
        cp_mh_copy(pr->bitmap_digest, body + B(bitmap_digest), CP_MB_DIGEST_BYTES);
        pr->in_seal_buf = ctx->cfg.side == CP_MH_SIDE_SOURCE;
        if (!pr->in_seal_buf) /* the target's seal_buf is CHECK's: keep a digest of the entries instead */
            rc = entries_digest(ctx, entries, chunks, pr->entries_digest);
        pr->valid = rc == CP_MBS_OK;
    }
    if (!pr->valid) {
        cp_mh_wipe(body, len);
        cp_mh_wipe(pr, sizeof(*pr));
    } else if (!pr->in_seal_buf) {
        cp_mh_wipe(body, len);
    }
    return rc;
}

/* ---- SEAL_MANIFEST ---- */

uint32_t cp_mh_seal_manifest(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                             uint64_t start, uint64_t npages, uint32_t chunk)
{
    struct request rq;
    struct diffs unused = {0, 0, 0, 0, 0};
    if (ctx->cfg.side != CP_MH_SIDE_SOURCE)
        return CP_MBS_SIDE;
    uint32_t rc = read_request(ctx, data, room, start, npages, chunk, &rq);
    uint64_t chunks = npages ? (npages + chunk - 1) / chunk : 0;
    uint64_t len = body_bytes(ctx, chunks);
    if (rc != CP_MBS_OK)
        return rc;
    if (HEAD + len > CP_MB_SEALED_MAX || HEAD + len > room)
        return CP_MBS_COUNT;
    uint8_t *body = ctx->seal_buf + HEAD;
    int prepared = prepared_for(ctx, &rq, start, npages, chunk, 1);
    if (!prepared)
        cp_mh_wipe(body, len);
    cp_mh_store_le64(body + B(start), start);
    cp_mh_store_le64(body + B(npages), npages);
    cp_mh_store_le32(body + B(chunk_pages), chunk);
    cp_mh_store_le32(body + B(chunks), (uint32_t)chunks);
    cp_mh_store_le32(body + B(rounds), rq.rounds);
    cp_mh_store_le32(body + B(vcpus), (uint32_t)ctx->cfg.vmsa_slots);
    cp_mh_copy(body + B(state_hash), rq.state_hash, sizeof(rq.state_hash));
    vmsa_tags(ctx, body + sizeof(struct cp_manifest_body));
    if (!prepared) /* else the entries, max_generation and bitmap digest are PREPARE's, for this very bitmap */
        rc = compute_body(ctx, &rq, start, npages, chunk, body, 0, &unused);
    if (rc == CP_MBS_OK)
        rc = seal_record(ctx, CP_MB_MANIFEST_MAGIC, CP_MB_LABEL_MANIFEST, 0, (uint32_t)len);
    if (rc == CP_MBS_OK) {
        cp_mh_copy(data, ctx->seal_buf, HEAD + len);
        c->n_ok = (uint32_t)(HEAD + len);
    }
    cp_mh_wipe(ctx->seal_buf, HEAD + len);
    cp_mh_forget_prepared(ctx);
    return rc;
}

/* ---- CHECK_MANIFEST ---- */

/* The fields before the tables, in the order the status reports them. */
static uint32_t check_head(struct cp_mh_ctx *ctx, uint64_t start, uint64_t npages, uint32_t chunk, uint64_t len)
{
    const uint8_t *rec = ctx->seal_buf, *body = rec + HEAD;
    uint64_t chunks = (npages + chunk - 1) / chunk;
    if (!bytes_equal(rec + H(migration_id), ctx->migration_id, CP_MH_ID_BYTES))
        return CP_MBS_MANIFEST_ID;
    if (len != body_bytes(ctx, chunks) || cp_mh_load_le64(body + B(start)) != start ||
        cp_mh_load_le64(body + B(npages)) != npages || cp_mh_load_le32(body + B(chunk_pages)) != chunk ||
        cp_mh_load_le32(body + B(chunks)) != chunks || cp_mh_load_le32(body + B(vcpus)) != ctx->cfg.vmsa_slots)
        return CP_MBS_MANIFEST_RANGE;
    return CP_MBS_OK;
}

/* The prepared fields against the manifest's (compute_body's comparisons, in its order); 1 when the chunk
 * entries are equal too, 0 when they differ (the caller then computes every chunk to say which). */
static int check_prepared(struct cp_mh_ctx *ctx, const uint8_t *body, uint64_t chunks, struct diffs *d,
                          uint32_t *rc)
{
    uint8_t digest[CP_MB_DIGEST_BYTES];
    const struct cp_mh_prepared *pr = &ctx->prep;
    const uint8_t *entries = body + sizeof(struct cp_manifest_body) + ctx->cfg.vmsa_slots * CP_MB_VMSA_TAG;
    *rc = entries_digest(ctx, entries, chunks, digest);
    if (*rc != CP_MBS_OK || !bytes_equal(digest, pr->entries_digest, sizeof(digest)))
        return 0;
    if (!bytes_equal(body + B(bitmap_digest), pr->bitmap_digest, CP_MB_DIGEST_BYTES))
        *rc = CP_MBS_MANIFEST_BITMAP;
    else if (cp_mh_load_le32(body + B(max_generation)) != pr->max_gen)
        note(&d->gen_first, &d->gen_count, CP_MB_NO_INDEX);
    return 1;
}

static uint32_t check_tables(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, const struct request *rq,
                             uint64_t start, uint64_t npages, uint32_t chunk, int prepared)
{
    uint8_t *body = ctx->seal_buf + HEAD;
    uint8_t tags[CP_MAX_VCPUS * CP_MB_VMSA_TAG];
    struct diffs d = {CP_MB_NO_INDEX, 0, CP_MB_NO_INDEX, 0, 0};
    uint32_t chunks = (uint32_t)((npages + chunk - 1) / chunk);
    uint32_t rc = CP_MBS_OK;
    if (!prepared || !check_prepared(ctx, body, chunks, &d, &rc)) {
        d = (struct diffs){CP_MB_NO_INDEX, 0, CP_MB_NO_INDEX, 0, 0};
        rc = compute_body(ctx, rq, start, npages, chunk, body, 1, &d);
    }
    if (rc != CP_MBS_OK)
        return rc;
    if (!bytes_equal(body + B(state_hash), rq->state_hash, sizeof(rq->state_hash)))
        return CP_MBS_MANIFEST_STATE;
    if (cp_mh_load_le32(body + B(rounds)) != rq->rounds)
        return CP_MBS_MANIFEST_ROUNDS;
    vmsa_tags(ctx, tags);
    for (uint32_t i = 0; i < ctx->cfg.vmsa_slots; i++) {
        const uint8_t *theirs = body + sizeof(struct cp_manifest_body) + i * CP_MB_VMSA_TAG;
        if (!bytes_equal(theirs, tags + i * CP_MB_VMSA_TAG, CP_MB_VMSA_TAG)) {
            c->first_bad = i;
            return CP_MBS_MANIFEST_VMSA;
        }
    }
    c->n_ok = chunks - d.chunks_differ;
    c->n_refused = d.gen_count ? d.gen_count : d.mac_count;
    c->first_bad = d.gen_count ? d.gen_first : d.mac_first;
    return d.gen_count ? CP_MBS_MANIFEST_GENERATIONS : d.mac_count ? CP_MBS_MANIFEST_MAC : CP_MBS_OK;
}

/* Record the outcome: "verified" only if nothing changed the tables since `changes0` nor a VMSA slot since
 * `states0` (under the lock, so a LOAD or OPEN_STATE racing on another MH vCPU either shows in a counter or
 * clears the flag after us). */
static uint32_t settle(struct cp_mh_ctx *ctx, uint32_t rc, uint32_t changes0, uint32_t states0)
{
    struct cp_mh_shared *sh = ctx->cfg.shared;
    cp_mh_lock(sh);
    if (rc == CP_MBS_OK && (sh->changes != changes0 || sh->state_changes != states0))
        rc = CP_MBS_MANIFEST_BUSY;
    if (rc == CP_MBS_OK) {
        sh->verified = 1;
        for (uint64_t i = 0; i < ctx->cfg.vmsa_slots; i++)
            if (slot_of(ctx, i)->state == CP_VMSA_OPENED)
                slot_of(ctx, i)->state = CP_VMSA_VERIFIED;
    } else if (sh->verified) {
        sh->verified = 0;
        demote_slots(ctx);
    }
    cp_mh_unlock(sh);
    return rc;
}

uint32_t cp_mh_check_manifest(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, const uint8_t *data,
                              uint64_t room, uint64_t start, uint64_t npages, uint32_t chunk)
{
    struct request rq;
    if (ctx->cfg.side != CP_MH_SIDE_TARGET)
        return CP_MBS_SIDE;
    uint32_t changes0 = __atomic_load_n(&ctx->cfg.shared->changes, __ATOMIC_ACQUIRE);
    /* The VMSA slots count from here (the check reads their tags below), prepared or not. */
    uint32_t states0 = __atomic_load_n(&ctx->cfg.shared->state_changes, __ATOMIC_ACQUIRE);
    uint32_t rc = read_request(ctx, data, room, start, npages, chunk, &rq);
    if (rc != CP_MBS_OK)
        return settle(ctx, rc, changes0, states0);
    /* A prepared check counts from its PREPARE: "verified" then also needs no table change since that began. */
    int prepared = prepared_for(ctx, &rq, start, npages, chunk, 0);
    if (prepared)
        changes0 = ctx->prep.changes;
    if (rq.sealed_bytes < HEAD || rq.sealed_bytes > CP_MB_SEALED_MAX)
        return settle(ctx, CP_MBS_MANIFEST_AUTH, changes0, states0);
    cp_mh_copy(ctx->seal_buf, rq.sealed, rq.sealed_bytes); /* once: the tag check reads the ciphertext twice */
    if (open_record(ctx, CP_MB_MANIFEST_MAGIC, CP_MB_LABEL_MANIFEST, rq.sealed_bytes) != 0)
        rc = CP_MBS_MANIFEST_AUTH;
    if (rc == CP_MBS_OK)
        rc = check_head(ctx, start, npages, chunk, rq.sealed_bytes - HEAD);
    if (rc == CP_MBS_OK)
        rc = check_tables(ctx, c, &rq, start, npages, chunk, prepared);
    cp_mh_wipe(ctx->seal_buf, rq.sealed_bytes);
    cp_mh_forget_prepared(ctx);
    return settle(ctx, rc, changes0, states0);
}

/* ---- SEAL_STATE / OPEN_STATE ---- */

static void store_tag(uint8_t out[CP_MB_VMSA_TAG], const uint8_t *tag)
{
    uint8_t any = 0;
    cp_mh_copy(out, tag, CP_MB_VMSA_TAG);
    for (uint32_t i = 0; i < CP_MB_VMSA_TAG; i++)
        any |= out[i];
    if (!any)
        out[0] = 1; /* zero means "none" in the manifest; the same fix-up on both sides (p = 2^-128) */
}

uint32_t cp_mh_seal_state(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                          uint64_t vcpu, uint64_t len)
{
    if (ctx->cfg.side != CP_MH_SIDE_SOURCE)
        return CP_MBS_SIDE;
    if (vcpu >= ctx->cfg.vmsa_slots || len == 0 || len > CP_VMSA_DATA_BYTES || HEAD + len > room)
        return CP_MBS_COUNT;
    cp_mh_copy(ctx->seal_buf + HEAD, data, len); /* read once; sealed in private memory */
    uint32_t rc = seal_record(ctx, CP_MB_STATE_MAGIC, CP_MB_LABEL_STATE, (uint32_t)vcpu, (uint32_t)len);
    if (rc == CP_MBS_OK) {
        struct cp_vmsa_slot *slot = slot_of(ctx, vcpu);
        cp_mh_lock(ctx->cfg.shared);
        cp_mh_wipe(slot, CP_VMSA_SLOT_HEADER);
        slot->state = CP_VMSA_SEALED;
        slot->vcpu = (uint32_t)vcpu;
        store_tag(slot->tag, ctx->seal_buf + H(tag));
        cp_mh_copy(slot->migration_id, ctx->migration_id, CP_MH_ID_BYTES);
        slot->magic = CP_VMSA_MAGIC;
        cp_mh_unlock(ctx->cfg.shared);
        cp_mh_copy(data, ctx->seal_buf, HEAD + len);
        c->n_ok = (uint32_t)(HEAD + len);
    }
    cp_mh_wipe(ctx->seal_buf, HEAD + len);
    return rc;
}

static void write_slot(struct cp_mh_ctx *ctx, uint64_t vcpu, uint32_t len)
{
    struct cp_vmsa_slot *slot = slot_of(ctx, vcpu);
    cp_mh_wipe(slot, CP_VMSA_SLOT_SIZE);
    cp_mh_copy(slot->data, ctx->seal_buf + HEAD, len);
    slot->vcpu = (uint32_t)vcpu;
    slot->length = len;
    store_tag(slot->tag, ctx->seal_buf + H(tag));
    cp_mh_copy(slot->migration_id, ctx->migration_id, CP_MH_ID_BYTES);
    slot->state = CP_VMSA_OPENED;
    slot->magic = CP_VMSA_MAGIC;
}

uint32_t cp_mh_open_state(struct cp_mh_ctx *ctx, const uint8_t *data, uint64_t room, uint64_t vcpu,
                          uint64_t size)
{
    if (ctx->cfg.side != CP_MH_SIDE_TARGET)
        return CP_MBS_SIDE;
    if (vcpu >= ctx->cfg.vmsa_slots || size <= HEAD || size > HEAD + CP_VMSA_DATA_BYTES || size > room)
        return CP_MBS_COUNT;
    cp_mh_copy(ctx->seal_buf, data, size); /* private copy: the tag check reads the ciphertext twice */
    uint32_t rc = CP_MBS_OK;
    if (open_record(ctx, CP_MB_STATE_MAGIC, CP_MB_LABEL_STATE, size) != 0)
        rc = CP_MBS_AUTH;
    else if (!bytes_equal(ctx->seal_buf + H(migration_id), ctx->migration_id, CP_MH_ID_BYTES) ||
             cp_mh_load_le32(ctx->seal_buf + H(label)) != vcpu)
        rc = CP_MBS_STATE_LABEL;
    if (rc == CP_MBS_OK) {
        /* One critical section: no check can see the slot half written, and any earlier one is taken back. */
        cp_mh_lock(ctx->cfg.shared);
        unverify_locked(ctx, 1); /* a slot, not a table: a PREPARE of this helper or another still holds */
        write_slot(ctx, vcpu, (uint32_t)(size - HEAD));
        cp_mh_unlock(ctx->cfg.shared);
    }
    cp_mh_wipe(ctx->seal_buf, size);
    return rc;
}
