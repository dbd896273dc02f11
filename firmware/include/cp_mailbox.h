/*
 * confplan migration-helper (MH) mailbox protocol, version 6: the layout shared by the MH (firmware/mh/) and
 * the VMM (confplan/migration/mailbox.py, whose offsets a test checks against this header). docs/mailbox.md
 * is the prose contract. Any layout change bumps CP_MB_PROTO_VERSION.
 *
 * Per MH vCPU, at bp.mailbox_gpa + idx * bp.mailbox_stride:
 *   +0x0000  struct cp_mailbox_header (confplan_abi.h: magic "CMBX", state, heartbeat, ping/pong)
 *   +0x0040  struct cp_mb_proto (this file)
 *   +0x0400  the op ring: CP_MB_RING struct cp_mb_cmd; op number `seq` lives in ring[seq % CP_MB_RING]
 *   +0x1000  bp.batch_pages data slots, each a struct cp_sealed_page (cp_sealed_page.h, the wire record):
 *            64-byte header then 4096 bytes, CP_MB_SLOT_SIZE apart.
 * The VMM writes an op into its ring entry, then bumps `seq` ("go") and kicks the vCPU. It may queue up to
 * CP_MB_RING ops (on disjoint slot ranges: `first`, `count`) before the first is done. The MH handles them in
 * order, writes each op's results into its entry and per-slot statuses, then stores `done` = that op's
 * number. It rings its doorbell only when it has caught up (done == seq): one exit per drained queue, none
 * per op while the VMM keeps it fed.
 */
#ifndef CP_MAILBOX_H
#define CP_MAILBOX_H

#include <stddef.h>
#include <stdint.h>

#include "cp_sealed_page.h"

#define CP_MB_PROTO_MAGIC 0x504d4243u /* "CBMP" */
#define CP_MB_PROTO_VERSION 9u
#define CP_MB_PROTO_OFFSET 0x40u
#define CP_MB_SLOTS_OFFSET 0x1000u
#define CP_MB_RING_OFFSET 0x400u
#define CP_MB_RING 16u
#define CP_MB_CMD_SIZE 64u
#define CP_MB_SLOT_SIZE 4160u
#define CP_MB_SLOT_HEADER 64u
#define CP_MB_DIGEST_BYTES 32u
#define CP_MB_NO_INDEX 0xffffffffu

/* Ops (cp_mb_proto.op). */
#define CP_MB_OP_INIT 1u   /* read the launch secret: transport key (+ migration id), derive sub-keys */
#define CP_MB_OP_SAVE 2u   /* seal `count` slots from `first`: slot.gpa from the VMM, `generation` for all */
#define CP_MB_OP_LOAD 3u   /* open `count` received records (slots from `first`) into their GPAs */
#define CP_MB_OP_DIGEST 4u /* keyed digest of npages = arg1 pages from GPA arg0, MH area skipped */
#define CP_MB_OP_RESET 5u  /* wipe the key; nonce counters and generation table stay */
/* v3: the per-page MAC table (one 16-byte keyed MAC per guest page, MH memory), so verify in the pause costs
 * the pages changed since, not the whole range. FOLD of a range whose MACs are current equals its DIGEST. */
#define CP_MB_OP_MAC_RANGE 6u /* MAC npages = arg1 pages from GPA arg0 into the table, MH area skipped */
#define CP_MB_OP_MAC_LIST 7u  /* MAC `count` pages whose GPAs (u64 LE) are packed from slot `first` on */
#define CP_MB_OP_FOLD 8u      /* digests of npages = arg1 pages from GPA arg0 in chunks of `count` pages,
                                 folded from the table; 32 bytes per chunk packed from slot `first` on */
/* v4: SAVE and LOAD also set the table entry of each page they seal or open to that record's GCM tag, so
 * both sides' tables follow the stream without a pass over the pages; MAC_RANGE/MAC_LIST are then needed
 * only for pages that moved otherwise (shared pages). */
/* v5: the target resumes only what its helper verified (docs/mailbox.md, "The manifest"). The request and
 * the records live in the data area from slot `first` on; the v5 ops are allowed on one side only. */
#define CP_MB_OP_SEAL_MANIFEST 9u  /* source: seal a manifest of its tables over npages = arg1 from GPA arg0 */
#define CP_MB_OP_CHECK_MANIFEST 10u /* target: open a manifest and compare it with its own tables */
#define CP_MB_OP_SEAL_STATE 11u    /* source: seal arg1 bytes of vCPU arg0's state (SEV-ES/SNP registers) */
#define CP_MB_OP_OPEN_STATE 12u    /* target: open a sealed state of arg1 bytes into VMSA slot arg0 */
#define CP_MB_OP_VERIFIED 13u      /* n_ok = 1 if a CHECK_MANIFEST passed and nothing changed the tables since */
/* v6: the SNP key release (docs/key-release.md): an SNP guest's helper 0 gets the transport key against an
 * attestation report. Input and output in the data area from slot `first` (0) on; n_ok = output bytes.
 * Allowed before INIT (they are how an SNP guest gets what INIT reads). */
#define CP_MB_OP_KEY_REQUEST 14u   /* data: the owner's 32-byte nonce -> the sealed MSG_REPORT_REQ (0xC0 bytes) */
#define CP_MB_OP_KEY_REPORT 15u    /* data: the PSP's MSG_REPORT_RSP, arg1 bytes -> the report (0x4A0 bytes) */
#define CP_MB_OP_KEY_RELEASE 16u   /* data: the broker's wrapped key, arg1 bytes -> n_ok = the table's length */
/* v7: the pause's manifest work ahead of time (docs/mailbox.md, "PREPARE_MANIFEST"): the side's own fields
 * computed while the rest of the pause goes on; the next SEAL_MANIFEST / CHECK_MANIFEST on this MH vCPU uses
 * them only if nothing changed the tables since and it is given the same range and bitmap. */
#define CP_MB_OP_PREPARE_MANIFEST 17u /* either side: SEAL/CHECK's request (its bitmap), arg0/arg1/count alike */
/* v8: the helper's view of guest RAM mapped while the host still maps it 2 MiB at a time: once the source's
 * dirty log is on, KVM maps each new access 4 KiB at a time, and a shadow MMU (kvm_pvm) would fault the
 * helper once per 32 KiB it SAVEs (docs/mailbox.md, "WARM"). Reads only; needs no key. */
#define CP_MB_OP_WARM 18u /* read a byte of each of npages = arg1 pages from GPA arg0, MH area skipped */
/* v9: WARM's `count` holds flags (others refused with COUNT). HUGE: the host backs guest RAM with 2 MiB pages,
 * so above the low 2 MiB one read per 2 MiB page of the helper's view maps it all (the VMM says so only when
 * its RAM mapping is all on huge pages; a wrong "yes" costs faults in round 0, never a wrong page). */
#define CP_MB_WARM_HUGE 1u
/* v9: WRITE (a target's helper only, else SIDE): each touch is a locked OR of zero, which leaves the byte and
 * maps the page writable, so the LOADs that follow do not fault (a read maps it read-only). */
#define CP_MB_WARM_WRITE 2u
#define CP_MB_OP_LAST CP_MB_OP_WARM

/*
 * Statuses: cp_mb_proto.status for the op, cp_sealed_page.status per slot. 0 is success everywhere; the
 * C page core refuses to frame a record whose status is not 0.
 */
#define CP_MBS_OK 0u
#define CP_MBS_BAD_OP 1u          /* unknown op */
#define CP_MBS_NO_KEY 2u          /* SAVE/LOAD/DIGEST before a successful INIT (or after RESET) */
#define CP_MBS_COUNT 3u           /* count is 0, or first + count above the slots this mailbox has */
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
#define CP_MBS_MAC_MISSING 21u    /* FOLD: a page of the range has no MAC in the table yet (MAC it first) */
#define CP_MBS_SIDE 22u           /* v5 op not allowed on this side (seal: source only; check/open: target only) */
#define CP_MBS_MANIFEST_AUTH 23u  /* sealed manifest does not open (tag, head, key, not from a source MH) */
#define CP_MBS_MANIFEST_ID 24u    /* authentic manifest of another migration id */
#define CP_MBS_MANIFEST_RANGE 25u /* manifest covers another range / chunk size / chunk count / vCPU count */
#define CP_MBS_MANIFEST_BITMAP 26u /* encryption bitmap differs */
#define CP_MBS_MANIFEST_STATE 27u /* the VMMs' hashes of the vCPU and device state differ */
#define CP_MBS_MANIFEST_ROUNDS 28u /* round counts differ */
#define CP_MBS_MANIFEST_VMSA 29u  /* VMSA slot first_bad does not hold the state the source sealed last */
#define CP_MBS_MANIFEST_GENERATIONS 30u /* final generations of chunk first_bad differ */
#define CP_MBS_MANIFEST_MAC 31u   /* MACs of chunk first_bad differ (or have a gap) */
#define CP_MBS_MANIFEST_BUSY 32u  /* the tables changed while the check ran (another MH vCPU): check again */
#define CP_MBS_STATE_LABEL 33u    /* OPEN_STATE: authentic state sealed for another vCPU or migration id */
/* v6: the key release's refusals (docs/key-release.md) */
#define CP_MBS_NOT_SNP 34u        /* key op in a guest booted without CP_BP_FLAG_SNP */
#define CP_MBS_ENTROPY 35u        /* no RDRAND (CP_FEAT_RDRAND), or RDRAND kept failing */
#define CP_MBS_KEY_STATE 36u      /* key op out of order (KEY_REPORT before KEY_REQUEST, KEY_RELEASE before a
                                     good KEY_REPORT or after the release) */
#define CP_MBS_KEY_MSG 37u        /* the PSP response's header, size or sequence number is wrong */
#define CP_MBS_KEY_MSG_AUTH 38u   /* the PSP response does not open under VMPCK0 */
#define CP_MBS_KEY_PSP 39u        /* PSP STATUS != 0, REPORT_SIZE != 0x4A0, or REPORT_DATA / VMPL not as asked */
#define CP_MBS_KEY_WRAP 40u       /* the wrapped key is malformed (magic "CPSNPKR2", length) */
#define CP_MBS_KEY_AUTH 41u       /* the wrapped key does not open, or the ECDH result is all zero */
#define CP_MBS_KEY_HELPER 42u     /* key op on a helper other than index 0 */
#define CP_MBS_LAST CP_MBS_KEY_HELPER

#define CP_MB_MAC_BYTES 16u       /* one table entry: the page's keyed MAC h(gpa), see docs/mailbox.md */

/*
 * v6: the SNP key release's formats (docs/key-release.md). An SNP guest message is a 0x60-byte header (AMD
 * SEV-SNP ABI, "Guest messages") then MSG_SZ bytes of AES-256-GCM ciphertext under VMPCK0: IV = MSG_SEQNO
 * (8 bytes LE) || 4 zero bytes, AAD = header bytes [0x30, 0x60), tag = AUTHTAG[0:16].
 */
#define CP_SNP_MSG_HDR 0x60u
#define CP_SNP_HDR_AUTHTAG 0x00u
#define CP_SNP_HDR_SEQNO 0x20u
#define CP_SNP_HDR_ALGO 0x30u         /* u8: 1 = AES-256-GCM */
#define CP_SNP_HDR_HDR_VERSION 0x31u  /* u8: 1 */
#define CP_SNP_HDR_HDR_SZ 0x32u       /* u16: 0x60 */
#define CP_SNP_HDR_MSG_TYPE 0x34u     /* u8 */
#define CP_SNP_HDR_MSG_VERSION 0x35u  /* u8: 1 */
#define CP_SNP_HDR_MSG_SZ 0x36u       /* u16 */
#define CP_SNP_HDR_MSG_VMPCK 0x3Cu    /* u8: 0 */
#define CP_SNP_HDR_AAD 0x30u          /* the AAD: header bytes [0x30, 0x60) */
#define CP_SNP_AEAD_AES_256_GCM 1u
#define CP_SNP_MSG_REPORT_REQ 5u
#define CP_SNP_MSG_REPORT_RSP 6u
#define CP_SNP_REPORT_REQ_SZ 0x60u    /* REPORT_DATA[64] || VMPL u32 || 28 reserved */
#define CP_SNP_REPORT_RSP_SZ 0x4C0u   /* STATUS u32 || REPORT_SIZE u32 || 24 reserved || report */
#define CP_SNP_REPORT_SIZE 0x4A0u
#define CP_SNP_REPORT_SIGNED 0x2A0u   /* report bytes the VCEK signs: the key release's AAD */
#define CP_SNP_REPORT_VMPL 0x30u      /* u32 */
#define CP_SNP_REPORT_DATA 0x50u      /* 64 bytes: nonce || G */
#define CP_SNP_REPORT_MEASUREMENT 0x90u /* 48 bytes */
#define CP_SNP_REPORT_ID 0x140u       /* 32 bytes */
#define CP_SNP_SECRETS_VMPCK0 0x20u   /* VMPCK0 in the PSP's secrets page */
#define CP_KR_NONCE 32u
#define CP_KR_MAGIC "CPSNPKR2"
#define CP_KR_MAGIC_BYTES 8u
#define CP_KR_INFO "confplan-snp-key-release/v2"
#define CP_KR_TABLE_MAX 1024u         /* the released efi_secret table, at most */
#define CP_KR_WRAP_MIN (8u + 32u + 12u + 16u)  /* magic || O || IV || (table) || tag */
#define CP_KR_WRAP_MAX (CP_KR_WRAP_MIN + CP_KR_TABLE_MAX)

/* The protocol block of a control page, at CP_MB_PROTO_OFFSET. "VMM:" fields are written by the VMM before
 * it bumps seq; "MH:" fields by the helper before it stores done. Little-endian, naturally aligned.
 * INIT and DIGEST results stay here (the last such op done); per-op results are in the op's ring entry. */
struct cp_mb_proto {
    uint32_t magic;           /*   0 MH: CP_MB_PROTO_MAGIC once the serve loop runs */
    uint16_t version;         /*   4 MH: CP_MB_PROTO_VERSION */
    uint16_t flags;           /*   6 reserved, 0 */
    uint32_t batch_pages;     /*   8 MH: slots this mailbox has */
    uint32_t sender_id;       /*  12 MH: nonce prefix of this MH (side << 16 | claimed index) */
    uint64_t seq;             /*  16 VMM: number of the last op posted, bumped last: the "go" */
    uint64_t done;            /*  24 MH: number of the last op whose results are all written */
    uint32_t ring;            /*  32 MH: CP_MB_RING, entries in the op ring */
    uint32_t key_id;          /*  36 MH: key fingerprint (after INIT), written into every sealed record */
    uint8_t migration_id[16]; /*  40 MH: the id bound into every AAD (after INIT) */
    uint8_t digest[CP_MB_DIGEST_BYTES]; /* 56 MH: DIGEST result (FOLD writes its digests to the slots) */
    uint64_t digest_pages;    /*  88 MH: pages hashed (DIGEST, MAC_RANGE) or folded (FOLD) by the last such op */
    uint64_t digest_skipped;  /*  96 MH: pages of the range skipped (MH area) */
    uint64_t pages_sealed;    /* 104 MH: counters since boot */
    uint64_t pages_opened;    /* 112 */
    uint64_t pages_refused;   /* 120 */
    uint64_t ops;             /* 128 */
    uint64_t drains;          /* 136 MH: times it caught up with seq and rang its doorbell */
    uint64_t reserved[14];    /* 144 */
};

/* One op in the ring (at CP_MB_RING_OFFSET + (seq % CP_MB_RING) * CP_MB_CMD_SIZE). */
struct cp_mb_cmd {
    uint32_t op;         /*  0 VMM: CP_MB_OP_* */
    uint32_t count;      /*  4 VMM: slots used by SAVE/LOAD; GPAs of MAC_LIST; chunk pages of FOLD */
    uint32_t generation; /*  8 VMM: SAVE generation (precopy round), 1..0xfffffffe */
    uint32_t first;      /* 12 VMM: first slot of SAVE/LOAD (slots first .. first + count - 1) */
    uint64_t arg0;       /* 16 VMM: DIGEST / MAC_RANGE / FOLD first GPA */
    uint64_t arg1;       /* 24 VMM: DIGEST / MAC_RANGE / FOLD page count */
    uint32_t status;     /* 32 MH: CP_MBS_* for the op */
    uint32_t n_ok;       /* 36 MH: slots (MAC_LIST: GPAs) done */
    uint32_t n_refused;  /* 40 MH: slots (MAC_LIST: GPAs) refused */
    uint32_t first_bad;  /* 44 MH: first refused slot / list index, from `first`; CP_MB_NO_INDEX if none */
    uint64_t tsc_start;  /* 48 MH: guest TSC when it began the op (profiling; 0 where rdtsc is not used) */
    uint64_t tsc_end;    /* 56 MH: guest TSC when it finished */
};

/*
 * v5 records (docs/mailbox.md, "The manifest and sealed vCPU state"). A sealed manifest or vCPU state is this
 * 64-byte head then `length` bytes of AES-256-GCM ciphertext under the seal key; AAD = the 16-byte domain
 * label (CP_MB_LABEL_*) || head bytes 0..47. Only a source MH seals them (the nonce's sender side is 0).
 */
#define CP_MB_MANIFEST_MAGIC 0x464d5043u /* "CPMF" */
#define CP_MB_STATE_MAGIC 0x53565043u    /* "CPVS" */
#define CP_MB_SEALED_VERSION 1u
#define CP_MB_SEALED_HEAD 64u
#define CP_MB_SEALED_AAD 48u             /* head bytes the tag covers (all but the tag) */
#define CP_MB_SEALED_MAX 0x9000u         /* largest record, head included (the MH's private seal buffer) */
#define CP_MB_LABEL_BYTES 16u
#define CP_MB_LABEL_MANIFEST "CP-MANIFEST-V1\0\0"
#define CP_MB_LABEL_STATE "CP-VCPU-STATE-V1"
#define CP_MB_REQUEST_BYTES 64u
#define CP_MB_MANIFEST_CHUNK_ALIGN 128u  /* chunk pages: a multiple of this (whole 16-byte blocks of bits) */
#define CP_MB_MANIFEST_CHUNK_MAX 32768u  /* ... and at most this (one chunk's bits fit the MH's bounce buffer) */
#define CP_MB_MANIFEST_ENTRY 64u         /* per chunk: generation digest (32) || MAC digest (32) */
#define CP_MB_VMSA_TAG 16u               /* per vCPU in the manifest: the tag of its sealed state */

struct cp_sealed_blob {
    uint32_t magic;           /*  0: CP_MB_MANIFEST_MAGIC or CP_MB_STATE_MAGIC */
    uint16_t version;         /*  4: CP_MB_SEALED_VERSION */
    uint16_t flags;           /*  6: 0 */
    uint32_t length;          /*  8: ciphertext bytes after the head */
    uint32_t key_id;          /* 12 */
    uint8_t migration_id[16]; /* 16 */
    uint8_t nonce[12];        /* 32: sender id BE32 || counter BE64 */
    uint32_t label;           /* 44: vCPU index (state), 0 (manifest) */
    uint8_t tag[16];          /* 48 */
};

/* What the VMM hands SEAL_MANIFEST / CHECK_MANIFEST at slot `first`; then bitmap_bytes of the range's
 * encryption bitmap (bit i = page arg0 / 4096 + i, 1 = private), zero-padded to 16; then (CHECK) the sealed
 * manifest, sealed_bytes long. */
struct cp_manifest_request {
    uint8_t state_hash[32];   /*  0: SHA-256 of the vCPU and device state the VMM sent / received */
    uint32_t rounds;          /* 32: rounds sent / received, the final one included */
    uint32_t bitmap_bytes;    /* 36: >= ceil(arg1 / 8) */
    uint32_t sealed_bytes;    /* 40: CHECK: the sealed manifest's size; SEAL: 0 */
    uint32_t reserved[5];     /* 44: zero */
};

/* The manifest's plaintext: this, then vcpus x CP_MB_VMSA_TAG, then chunks x CP_MB_MANIFEST_ENTRY. */
struct cp_manifest_body {
    uint64_t start;           /*   0: first GPA */
    uint64_t npages;          /*   8 */
    uint32_t chunk_pages;     /*  16 */
    uint32_t chunks;          /*  20 */
    uint32_t rounds;          /*  24: the source VMM's */
    uint32_t max_generation;  /*  28: highest entry of the masked generation table */
    uint32_t vcpus;           /*  32: VMSA tags that follow */
    uint32_t reserved0;       /*  36 */
    uint64_t reserved1;       /*  40 */
    uint8_t bitmap_digest[32]; /* 48 */
    uint8_t state_hash[32];   /*  80: the source VMM's */
};

_Static_assert(sizeof(struct cp_mb_proto) == 256, "cp_mb_proto layout");
_Static_assert(sizeof(CP_KR_MAGIC) - 1 == CP_KR_MAGIC_BYTES, "key release magic");
_Static_assert(sizeof(struct cp_sealed_blob) == CP_MB_SEALED_HEAD, "sealed record head");
_Static_assert(offsetof(struct cp_sealed_blob, tag) == CP_MB_SEALED_AAD, "the tag ends the head");
_Static_assert(sizeof(struct cp_manifest_request) == CP_MB_REQUEST_BYTES, "manifest request");
_Static_assert(sizeof(struct cp_manifest_body) == 112, "manifest body");
_Static_assert(sizeof(CP_MB_LABEL_MANIFEST) - 1 == CP_MB_LABEL_BYTES, "manifest label");
_Static_assert(sizeof(CP_MB_LABEL_STATE) - 1 == CP_MB_LABEL_BYTES, "state label");
_Static_assert(sizeof(struct cp_mb_cmd) == CP_MB_CMD_SIZE, "cp_mb_cmd layout");
_Static_assert(CP_MB_SLOT_SIZE == sizeof(struct cp_sealed_page), "a slot is one sealed page record");
_Static_assert(CP_MB_SLOT_HEADER == offsetof(struct cp_sealed_page, ct), "slot header = record header");
_Static_assert(CP_MB_PROTO_OFFSET + sizeof(struct cp_mb_proto) <= CP_MB_RING_OFFSET, "proto block below the ring");
_Static_assert(CP_MB_RING_OFFSET + CP_MB_RING * CP_MB_CMD_SIZE <= CP_MB_SLOTS_OFFSET, "ring inside the control page");

#endif /* CP_MAILBOX_H */
