/*
 * confplan migration-helper (MH) mailbox protocol, version 1: the layout shared by the MH (firmware/mh/) and
 * the VMM (confplan/migration/mailbox.py, whose offsets a test checks against this header). docs/mailbox.md
 * is the prose contract. Any layout change bumps CP_MB_PROTO_VERSION.
 *
 * Per MH vCPU, at bp.mailbox_gpa + idx * bp.mailbox_stride:
 *   +0x0000  struct cp_mailbox_header (confplan_abi.h: magic "CMBX", state, heartbeat, ping/pong)
 *   +0x0040  struct cp_mb_proto (this file)
 *   +0x1000  bp.batch_pages data slots, each a struct cp_sealed_page (confplan/core/pagecore.h): 64-byte
 *            header then 4096 bytes, CP_MB_SLOT_SIZE apart.
 * The VMM writes the op and its arguments, then bumps `seq` ("go") and kicks the vCPU; the MH handles the
 * op, writes results and per-slot statuses, then stores `done = seq` and rings its doorbell once.
 */
#ifndef CP_MAILBOX_H
#define CP_MAILBOX_H

#include <stdint.h>

#define CP_MB_PROTO_MAGIC 0x504d4243u /* "CBMP" */
#define CP_MB_PROTO_VERSION 1u
#define CP_MB_PROTO_OFFSET 0x40u
#define CP_MB_SLOTS_OFFSET 0x1000u
#define CP_MB_SLOT_SIZE 4160u
#define CP_MB_SLOT_HEADER 64u
#define CP_MB_DIGEST_BYTES 32u
#define CP_MB_NO_INDEX 0xffffffffu

/* Ops (cp_mb_proto.op). */
#define CP_MB_OP_INIT 1u   /* read the launch secret: transport key (+ migration id), derive sub-keys */
#define CP_MB_OP_SAVE 2u   /* seal `count` slots: slot.gpa from the VMM, `generation` for the batch */
#define CP_MB_OP_LOAD 3u   /* open `count` received records into their GPAs */
#define CP_MB_OP_DIGEST 4u /* keyed digest of npages = arg1 pages from GPA arg0, MH area skipped */
#define CP_MB_OP_RESET 5u  /* wipe the key; nonce counters and generation table stay */

/*
 * Statuses: cp_mb_proto.status for the op, cp_sealed_page.status per slot. 0 is success everywhere; the
 * C page core refuses to frame a record whose status is not 0.
 */
#define CP_MBS_OK 0u
#define CP_MBS_BAD_OP 1u          /* unknown op */
#define CP_MBS_NO_KEY 2u          /* SAVE/LOAD/DIGEST before a successful INIT (or after RESET) */
#define CP_MBS_COUNT 3u           /* count is 0 or above the slots this mailbox has */
#define CP_MBS_PARTIAL 4u         /* op status: some slots refused, see their statuses */
#define CP_MBS_GPA_ALIGN 5u       /* GPA not a multiple of 4096 */
#define CP_MBS_GPA_RANGE 6u       /* GPA (or digest range) outside guest RAM */
#define CP_MBS_GPA_MH 7u          /* GPA inside the MH's own area */
#define CP_MBS_GEN_INVALID 8u     /* generation 0 or 0xffffffff */
#define CP_MBS_GEN_STALE 9u       /* generation not newer than the one already sealed/placed for this GPA */
#define CP_MBS_AUTH 10u           /* GCM tag does not verify (ciphertext, tag, nonce, GPA or generation changed) */
#define CP_MBS_KEY_ID 11u         /* record sealed under another transport key */
#define CP_MBS_RESERVED 12u       /* record reserved bytes or status not zero */
#define CP_MBS_NONCE 13u          /* this MH's nonce sequence is used up: a new key is needed */
#define CP_MBS_SECRET_HEADER 14u  /* no efi_secret header GUID at the secret page */
#define CP_MBS_SECRET_LENGTH 15u  /* table length outside [20, secret page size] */
#define CP_MBS_SECRET_ENTRY 16u   /* an entry overruns the table, is too short, or more than 64 entries */
#define CP_MBS_SECRET_NO_KEY 17u  /* no CONFPLAN_TRANSPORT_KEY_GUID entry */
#define CP_MBS_SECRET_KEY_LEN 18u /* transport key entry data is not 32 bytes */
#define CP_MBS_SECRET_ID_LEN 19u  /* migration id entry data is not 16 bytes */
#define CP_MBS_CONFIG 20u         /* the MH context was set up inconsistently (firmware bug) */
#define CP_MBS_LAST CP_MBS_CONFIG

/* The protocol block of a control page, at CP_MB_PROTO_OFFSET. "VMM:" fields are written by the VMM before
 * it bumps seq; "MH:" fields by the helper before it stores done. Little-endian, naturally aligned. */
struct cp_mb_proto {
    uint32_t magic;           /*   0 MH: CP_MB_PROTO_MAGIC once the serve loop runs */
    uint16_t version;         /*   4 MH: CP_MB_PROTO_VERSION */
    uint16_t flags;           /*   6 reserved, 0 */
    uint32_t batch_pages;     /*   8 MH: slots this mailbox has */
    uint32_t sender_id;       /*  12 MH: nonce prefix of this MH (side << 16 | claimed index) */
    uint64_t seq;             /*  16 VMM: bumped last, the "go" */
    uint64_t done;            /*  24 MH: = seq once every result of that op is written */
    uint32_t op;              /*  32 VMM: CP_MB_OP_* */
    uint32_t count;           /*  36 VMM: slots used by SAVE/LOAD */
    uint32_t generation;      /*  40 VMM: SAVE generation (precopy round), 1..0xfffffffe */
    uint32_t status;          /*  44 MH: CP_MBS_* for the op */
    uint64_t arg0;            /*  48 VMM: DIGEST first GPA */
    uint64_t arg1;            /*  56 VMM: DIGEST page count */
    uint32_t n_ok;            /*  64 MH: slots done */
    uint32_t n_refused;       /*  68 MH: slots refused */
    uint32_t first_bad;       /*  72 MH: index of the first refused slot, CP_MB_NO_INDEX if none */
    uint32_t key_id;          /*  76 MH: key fingerprint (after INIT), written into every sealed record */
    uint8_t migration_id[16]; /*  80 MH: the id bound into every AAD (after INIT) */
    uint8_t digest[CP_MB_DIGEST_BYTES]; /* 96 MH: DIGEST result */
    uint64_t digest_pages;    /* 128 MH: pages hashed by the last DIGEST */
    uint64_t digest_skipped;  /* 136 MH: pages of the range skipped (MH area) */
    uint64_t pages_sealed;    /* 144 MH: counters since boot */
    uint64_t pages_opened;    /* 152 */
    uint64_t pages_refused;   /* 160 */
    uint64_t ops;             /* 168 */
    uint64_t reserved[10];    /* 176 */
};

_Static_assert(sizeof(struct cp_mb_proto) == 256, "cp_mb_proto layout");

#endif /* CP_MAILBOX_H */
