/*
 * The SNP key release, the helper's side (docs/key-release.md): KEY_REQUEST, KEY_REPORT, KEY_RELEASE on
 * helper 0 of an SNP guest, and the released table INIT reads there instead of the secret page.
 */
#ifndef CP_MH_KEYRELEASE_H
#define CP_MH_KEYRELEASE_H

#include <stdint.h>

#include "cp_mailbox.h"

/* The key release's states (docs/key-release.md, "Helper states"). */
#define CP_KR_NONE 0u
#define CP_KR_REQUESTED 1u  /* a request is out: its private key and nonce are held */
#define CP_KR_REPORTED 2u   /* a report binding our key passed: its signed bytes are held */
#define CP_KR_RELEASED 3u   /* the table is in the shared block; the private key is gone */

/* Helper 0's private key-release state, in its context (wiped at setup: 0 = NONE, no request yet). */
struct cp_mh_keyrel {
    uint32_t state;
    uint32_t pad;
    uint64_t requests;                    /* requests sealed so far: request n has MSG_SEQNO 2n + 1 */
    uint64_t req_seqno;                   /* the outstanding request's MSG_SEQNO */
    uint8_t priv[32];                     /* g: RDRAND, clamped by X25519; wiped after one release */
    uint8_t pub[32];                      /* G = X25519(g, 9) */
    uint8_t nonce[CP_KR_NONCE];           /* the owner's, from KEY_REQUEST */
    uint8_t report[CP_SNP_REPORT_SIGNED]; /* the passed report's signed bytes: the wrap's AAD */
};

struct cp_mh_ctx;
struct cp_mb_cmd;

/* One key op (op = CP_MB_OP_KEY_*): input read once from `data` (room bytes of the host's data area),
 * output written there, c->n_ok = its length. Returns a CP_MBS_*. */
uint32_t cp_mh_key_op(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                      uint32_t op, uint64_t arg1);

/* INIT in an SNP guest: the released table, copied under the shared lock into `out` (CP_KR_TABLE_MAX
 * bytes); returns its length (0: nothing released yet). */
uint32_t cp_mh_released_table(struct cp_mh_ctx *ctx, uint8_t out[CP_KR_TABLE_MAX]);

#endif /* CP_MH_KEYRELEASE_H */
