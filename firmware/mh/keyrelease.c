/*
 * The SNP key release, the helper's side (docs/key-release.md). Helper 0 of an SNP guest:
 *   KEY_REQUEST  draws g from RDRAND, seals MSG_REPORT_REQ (REPORT_DATA = nonce || G) under VMPCK0
 *   KEY_REPORT   opens the PSP's MSG_REPORT_RSP, checks it answers that request, keeps the signed report
 *   KEY_RELEASE  opens the broker's wrap (X25519(g, E) || X25519(g, S) with S the owner's static key from
 *                the measured boot parameters, HKDF, AES-GCM over the report), stores the table
 * Everything the host hands in is copied once into private memory (ctx->seal_buf) before it is looked at;
 * VMPCK0 is read from the secrets page (the PSP wrote it; the host cannot on SNP hardware) for each use.
 */
#include "keyrelease.h"

#include "../crypto/cp_kx.h"
#include "bytes.h"
#include "context.h"

#define KR_REQ_MSG (CP_SNP_MSG_HDR + CP_SNP_REPORT_REQ_SZ) /* 0xC0 */
#define KR_RSP_MSG (CP_SNP_MSG_HDR + CP_SNP_REPORT_RSP_SZ) /* 0x520 */
#define KR_RSP_REPORT 0x20u                                 /* the report inside the response payload */
#define KR_ROOM KR_RSP_MSG                                  /* the most any key op reads or writes */
#define KR_PLAIN 0x800u   /* seal_buf: the message at 0, its plaintext from here */
#define KR_INFO_BYTES (sizeof(CP_KR_INFO) - 1)
#define KR_KDF_INFO (KR_INFO_BYTES + 48u + 32u) /* label || MEASUREMENT || REPORT_ID */

_Static_assert(KR_PLAIN >= KR_RSP_MSG && KR_PLAIN + CP_SNP_REPORT_RSP_SZ <= CP_MH_SEAL_BUF, "seal_buf use");
_Static_assert(CP_KR_WRAP_MAX <= KR_PLAIN, "a wrapped key fits before the plaintext");
_Static_assert(KR_ROOM <= CP_MB_SLOT_SIZE, "one data slot holds any key op");

/* The 12-byte GCM IV of message `seqno`: MSG_SEQNO little-endian, then 4 zero bytes. */
static void msg_iv(uint8_t iv[CP_GCM_IV_BYTES], uint64_t seqno)
{
    cp_mh_store_le64(iv, seqno);
    cp_mh_store_le32(iv + 8, 0);
}

/* VMPCK0 from the PSP's secrets page, as a GCM key. Non-zero: the secret page is too small. */
static int vmpck0(const struct cp_mh_ctx *ctx, cp_gcm_ctx *gcm)
{
    uint8_t key[CP_GCM_KEY_BYTES];
    if (ctx->cfg.secret_size < CP_SNP_SECRETS_VMPCK0 + CP_GCM_KEY_BYTES)
        return -1;
    cp_mh_copy(key, ctx->cfg.secret + CP_SNP_SECRETS_VMPCK0, sizeof(key));
    int rc = cp_gcm_init(gcm, key, ctx->impl);
    cp_mh_wipe(key, sizeof(key));
    return rc;
}

static void forget_exchange(struct cp_mh_keyrel *kr)
{
    cp_mh_wipe(kr->priv, sizeof(kr->priv));
    cp_mh_wipe(kr->pub, sizeof(kr->pub));
    cp_mh_wipe(kr->nonce, sizeof(kr->nonce));
    cp_mh_wipe(kr->report, sizeof(kr->report));
    kr->state = CP_KR_NONE;
}

/* The fixed header fields of a guest message (AAD part), MSG_SEQNO and zero elsewhere. */
static void build_header(uint8_t *hdr, uint64_t seqno, uint32_t type, uint32_t size)
{
    cp_mh_wipe(hdr, CP_SNP_MSG_HDR);
    cp_mh_store_le64(hdr + CP_SNP_HDR_SEQNO, seqno);
    hdr[CP_SNP_HDR_ALGO] = CP_SNP_AEAD_AES_256_GCM;
    hdr[CP_SNP_HDR_HDR_VERSION] = 1;
    cp_mh_store_le(hdr + CP_SNP_HDR_HDR_SZ, CP_SNP_MSG_HDR, 2);
    hdr[CP_SNP_HDR_MSG_TYPE] = (uint8_t)type;
    hdr[CP_SNP_HDR_MSG_VERSION] = 1;
    cp_mh_store_le(hdr + CP_SNP_HDR_MSG_SZ, size, 2);
    hdr[CP_SNP_HDR_MSG_VMPCK] = 0;
}

/* ---- KEY_REQUEST ---- */

static uint32_t key_request(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data)
{
    struct cp_mh_keyrel *kr = &ctx->keyrel;
    uint8_t *msg = ctx->seal_buf, *payload = ctx->seal_buf + KR_PLAIN, iv[CP_GCM_IV_BYTES];
    cp_gcm_ctx gcm;
    forget_exchange(kr); /* a new request starts over: the old key pair is never used again */
    if (!(ctx->cfg.cpu_features & CP_CPU_RDRAND))
        return CP_MBS_ENTROPY;
    if (vmpck0(ctx, &gcm) != 0)
        return CP_MBS_CONFIG;
    cp_mh_copy(kr->nonce, data, CP_KR_NONCE); /* read once */
    if (!cp_rdrand_bytes(kr->priv, sizeof(kr->priv))) {
        cp_gcm_wipe(&gcm);
        forget_exchange(kr);
        return CP_MBS_ENTROPY;
    }
    cp_x25519_base(kr->pub, kr->priv);
    /* The sequence number is spent here, answered or not: no IV is ever used twice under VMPCK0. */
    kr->req_seqno = 2 * kr->requests++ + 1;
    cp_mh_wipe(payload, CP_SNP_REPORT_REQ_SZ); /* VMPL 0 and the reserved bytes */
    cp_mh_copy(payload, kr->nonce, CP_KR_NONCE);
    cp_mh_copy(payload + CP_KR_NONCE, kr->pub, sizeof(kr->pub));
    build_header(msg, kr->req_seqno, CP_SNP_MSG_REPORT_REQ, CP_SNP_REPORT_REQ_SZ);
    msg_iv(iv, kr->req_seqno);
    int bad = cp_gcm_seal(&gcm, iv, msg + CP_SNP_HDR_AAD, CP_SNP_MSG_HDR - CP_SNP_HDR_AAD, payload,
                          msg + CP_SNP_MSG_HDR, CP_SNP_REPORT_REQ_SZ, msg + CP_SNP_HDR_AUTHTAG);
    cp_gcm_wipe(&gcm);
    cp_mh_wipe(payload, CP_SNP_REPORT_REQ_SZ);
    if (bad) {
        forget_exchange(kr);
        return CP_MBS_CONFIG;
    }
    cp_mh_copy(data, msg, KR_REQ_MSG);
    cp_mh_wipe(msg, KR_REQ_MSG);
    kr->state = CP_KR_REQUESTED;
    c->n_ok = KR_REQ_MSG;
    return CP_MBS_OK;
}

/* ---- KEY_REPORT ---- */

static uint32_t le(const uint8_t *p, unsigned bytes)
{
    return (uint32_t)cp_mh_load_le(p, bytes);
}

/* The response's header: the fields AMD fixes, our request's number + 1, and zero in the bytes the tag
 * does not cover (AUTHTAG[16:32], 0x28..0x2F), so no byte of the response can change unnoticed. */
static int response_header_ok(const uint8_t *h, uint64_t seqno)
{
    uint8_t loose = 0;
    for (unsigned i = 16; i < 32; i++)
        loose |= h[i];
    for (unsigned i = 0x28; i < 0x30; i++)
        loose |= h[i];
    return loose == 0 && cp_mh_load_le64(h + CP_SNP_HDR_SEQNO) == seqno &&
           h[CP_SNP_HDR_ALGO] == CP_SNP_AEAD_AES_256_GCM && h[CP_SNP_HDR_HDR_VERSION] == 1 &&
           le(h + CP_SNP_HDR_HDR_SZ, 2) == CP_SNP_MSG_HDR && h[CP_SNP_HDR_MSG_TYPE] == CP_SNP_MSG_REPORT_RSP &&
           h[CP_SNP_HDR_MSG_VERSION] == 1 && le(h + CP_SNP_HDR_MSG_SZ, 2) == CP_SNP_REPORT_RSP_SZ &&
           h[CP_SNP_HDR_MSG_VMPCK] == 0;
}

/* The opened payload: the PSP's STATUS and REPORT_SIZE, and a report about what we asked. */
static int report_ok(const struct cp_mh_keyrel *kr, const uint8_t *payload)
{
    const uint8_t *report = payload + KR_RSP_REPORT, *rd = report + CP_SNP_REPORT_DATA;
    uint8_t diff = 0;
    for (unsigned i = 0; i < CP_KR_NONCE; i++)
        diff |= (uint8_t)(rd[i] ^ kr->nonce[i]) | (uint8_t)(rd[CP_KR_NONCE + i] ^ kr->pub[i]);
    return le(payload, 4) == 0 && le(payload + 4, 4) == CP_SNP_REPORT_SIZE && diff == 0 &&
           le(report + CP_SNP_REPORT_VMPL, 4) == 0;
}

static uint32_t open_response(struct cp_mh_ctx *ctx, const uint8_t *msg, uint8_t *payload)
{
    uint8_t iv[CP_GCM_IV_BYTES];
    cp_gcm_ctx gcm;
    if (!response_header_ok(msg, ctx->keyrel.req_seqno + 1))
        return CP_MBS_KEY_MSG;
    if (vmpck0(ctx, &gcm) != 0)
        return CP_MBS_CONFIG;
    msg_iv(iv, ctx->keyrel.req_seqno + 1);
    int bad = cp_gcm_open(&gcm, iv, msg + CP_SNP_HDR_AAD, CP_SNP_MSG_HDR - CP_SNP_HDR_AAD, msg + CP_SNP_MSG_HDR,
                          payload, CP_SNP_REPORT_RSP_SZ, msg + CP_SNP_HDR_AUTHTAG);
    cp_gcm_wipe(&gcm);
    if (bad)
        return CP_MBS_KEY_MSG_AUTH;
    return report_ok(&ctx->keyrel, payload) ? CP_MBS_OK : CP_MBS_KEY_PSP;
}

static uint32_t key_report(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t len)
{
    struct cp_mh_keyrel *kr = &ctx->keyrel;
    uint8_t *msg = ctx->seal_buf, *payload = ctx->seal_buf + KR_PLAIN;
    if (kr->state != CP_KR_REQUESTED)
        return CP_MBS_KEY_STATE;
    uint32_t rc = CP_MBS_KEY_MSG;
    if (len == KR_RSP_MSG) {
        cp_mh_copy(msg, data, KR_RSP_MSG); /* read once: the tag check reads the ciphertext twice */
        rc = open_response(ctx, msg, payload);
    }
    if (rc == CP_MBS_OK) {
        cp_mh_copy(kr->report, payload + KR_RSP_REPORT, CP_SNP_REPORT_SIGNED);
        cp_mh_copy(data, payload + KR_RSP_REPORT, CP_SNP_REPORT_SIZE);
        kr->state = CP_KR_REPORTED;
        c->n_ok = CP_SNP_REPORT_SIZE;
    } else {
        forget_exchange(kr); /* the request is answered (or spoilt): the next one starts over */
    }
    cp_mh_wipe(ctx->seal_buf, KR_PLAIN + CP_SNP_REPORT_RSP_SZ);
    return rc;
}

/* ---- KEY_RELEASE ---- */

/* kek = HKDF-SHA256(salt = nonce, ikm = X25519(g, E) || X25519(g, S), info = label || MEASUREMENT ||
 * REPORT_ID), from our own report; S is the owner's static key (measured), so only its holder wraps. */
static void derive_kek(const struct cp_mh_keyrel *kr, const uint8_t ikm[2 * CP_X25519_BYTES], uint8_t kek[32])
{
    uint8_t info[KR_KDF_INFO];
    cp_mh_copy(info, CP_KR_INFO, KR_INFO_BYTES);
    cp_mh_copy(info + KR_INFO_BYTES, kr->report + CP_SNP_REPORT_MEASUREMENT, 48);
    cp_mh_copy(info + KR_INFO_BYTES + 48, kr->report + CP_SNP_REPORT_ID, 32);
    (void)cp_hkdf_sha256(kr->nonce, CP_KR_NONCE, ikm, 2 * CP_X25519_BYTES, info, sizeof(info), kek, 32);
}

/* Opens the wrap at `wrap` (len bytes, private) into `table`. Returns CP_MBS_OK or KEY_WRAP / KEY_AUTH. */
static uint32_t open_wrap(struct cp_mh_ctx *ctx, const uint8_t *wrap, uint64_t len, uint8_t *table)
{
    const struct cp_mh_keyrel *kr = &ctx->keyrel;
    uint8_t diff = 0, s[2 * CP_X25519_BYTES], kek[32];
    cp_gcm_ctx gcm;
    for (unsigned i = 0; i < CP_KR_MAGIC_BYTES; i++)
        diff |= (uint8_t)(wrap[i] ^ (uint8_t)CP_KR_MAGIC[i]);
    if (diff != 0)
        return CP_MBS_KEY_WRAP;
    const uint8_t *owner = wrap + CP_KR_MAGIC_BYTES, *iv = owner + CP_X25519_BYTES, *ct = iv + CP_GCM_IV_BYTES;
    uint64_t ct_len = len - CP_KR_WRAP_MIN;
    uint32_t rc = CP_MBS_KEY_AUTH;
    /* Both halves must be non-zero (a low-order E or S is refused); no early exit between them. */
    int bad = cp_x25519(s, kr->priv, owner) | cp_x25519(s + CP_X25519_BYTES, kr->priv, ctx->cfg.owner_key);
    if (bad == 0) {
        derive_kek(kr, s, kek);
        if (cp_gcm_init(&gcm, kek, ctx->impl) == 0 &&
            cp_gcm_open(&gcm, iv, kr->report, CP_SNP_REPORT_SIGNED, ct, table, ct_len, ct + ct_len) == 0)
            rc = CP_MBS_OK;
        cp_gcm_wipe(&gcm);
    }
    cp_mh_wipe(s, sizeof(s));
    cp_mh_wipe(kek, sizeof(kek));
    return rc;
}

static uint32_t key_release(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t len)
{
    struct cp_mh_keyrel *kr = &ctx->keyrel;
    struct cp_mh_shared *sh = ctx->cfg.shared;
    uint8_t *wrap = ctx->seal_buf, *table = ctx->seal_buf + KR_PLAIN;
    if (kr->state != CP_KR_REPORTED)
        return CP_MBS_KEY_STATE;
    if (len < CP_KR_WRAP_MIN || len > CP_KR_WRAP_MAX)
        return CP_MBS_KEY_WRAP;
    cp_mh_copy(wrap, data, len); /* read once */
    uint32_t table_len = (uint32_t)(len - CP_KR_WRAP_MIN);
    uint32_t rc = open_wrap(ctx, wrap, len, table);
    if (rc == CP_MBS_OK) {
        cp_mh_lock(sh);
        cp_mh_copy(sh->released, table, table_len);
        cp_mh_wipe(sh->released + table_len, CP_KR_TABLE_MAX - table_len);
        sh->released_len = table_len;
        cp_mh_unlock(sh);
        forget_exchange(kr); /* g is used once */
        kr->state = CP_KR_RELEASED;
        c->n_ok = table_len;
    } /* else: stays REPORTED, a forged wrap does not burn the key */
    cp_mh_wipe(ctx->seal_buf, KR_PLAIN + CP_KR_TABLE_MAX);
    return rc;
}

/* ---- dispatch and INIT ---- */

uint32_t cp_mh_key_op(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                      uint32_t op, uint64_t arg1)
{
    if (!ctx->cfg.snp)
        return CP_MBS_NOT_SNP;
    if (ctx->cfg.mh_index != 0)
        return CP_MBS_KEY_HELPER;
    if (room < KR_ROOM)
        return CP_MBS_COUNT;
    if (op == CP_MB_OP_KEY_REQUEST)
        return key_request(ctx, c, data);
    if (op == CP_MB_OP_KEY_REPORT)
        return key_report(ctx, c, data, arg1);
    return key_release(ctx, c, data, arg1);
}

uint32_t cp_mh_released_table(struct cp_mh_ctx *ctx, uint8_t out[CP_KR_TABLE_MAX])
{
    struct cp_mh_shared *sh = ctx->cfg.shared;
    cp_mh_lock(sh);
    uint32_t len = sh->released_len <= CP_KR_TABLE_MAX ? sh->released_len : 0;
    cp_mh_copy(out, sh->released, len);
    cp_mh_unlock(sh);
    return len;
}
