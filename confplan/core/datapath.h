/*
 * confplan data loops (datapath.c): one call per round (source) or per run of sealed frames (target) that
 * drives the migration helpers' mailboxes and the socket with no Python per op or frame (docs/migration.md,
 * "Session 5"). Loaded with ctypes like the rest of the core; the GIL is released for the whole call.
 *
 * The frames are wire v2 (docs/wire.md); the mailbox protocol is firmware/include/cp_mailbox.h. Every struct
 * here is mirrored in confplan/core/datapath.py; a change bumps CP_ABI_VERSION.
 */
#ifndef CONFPLAN_DATAPATH_H
#define CONFPLAN_DATAPATH_H

#include <stdint.h>

#include "pagecore.h"
#include "rearm.h"

/* One helper's mailbox as a loop drives it: its control page, its data slots, and the banks it may use. */
struct cp_dp_mailbox {
    uint8_t *ctl;         /* control page: proto block at 0x40, op ring at 0x400 */
    uint8_t *slots;       /* data area: batch_pages struct cp_sealed_page */
    uint32_t batch_pages;
    uint32_t bank_slots;  /* slots per bank */
    uint32_t banks;       /* banks used: banks * bank_slots <= batch_pages, banks <= CP_MB_RING */
    uint32_t mh_index;
    int32_t kick_fd;      /* >= 0: an eventfd; a helper to wake gets a write of 1 there, not the poke (no GIL) */
    uint32_t reserved;
};

/* Called from the loop (it takes the GIL: rare). mh >= 0: kick that helper (it had caught up and parks;
 * only for a mailbox without a kick_fd);
 * mh == -1: the periodic look (every ~10 ms, and while waiting): return 0 to go on, CP_DP_CANCELLED when the
 * round was cancelled, CP_DP_MACHINE when the guest died. */
typedef int32_t (*cp_dp_poke_fn)(int32_t mh);

/* Why a loop stopped (struct cp_dp_stream.stop). */
enum cp_dp_stop {
    CP_DP_DONE = 0,        /* all pages sent (source) / a frame that is not SEALED_PAGES arrived (target) */
    CP_DP_REFUSED = 1,     /* the helper refused a page: bad_mailbox, bad_slot, bad_status, bad_gpa */
    CP_DP_OP_FAILED = 2,   /* an op's status is neither OK nor PARTIAL: bad_mailbox, bad_status */
    CP_DP_OP_TIMEOUT = 3,  /* an op took longer than op_timeout: bad_mailbox */
    CP_DP_PEER = 4,        /* source: the target wrote (its ERROR frame): Python reads it */
    CP_DP_CANCELLED = 5,   /* the poke said so (Ctrl-C: cancel_round) */
    CP_DP_MACHINE = 6,     /* the poke said the guest died: Python raises the machine's error */
    CP_DP_TIMEOUT = 7,     /* a send/receive made no progress within io_timeout */
    CP_DP_SOCKET = 8,      /* a socket call failed (sys_errno) or the peer closed (sys_errno 0) */
    CP_DP_FRAME = 9,       /* a frame or record failed a check: err (cp_status, index, values) */
    CP_DP_CRYPTO = 10,     /* libcrypto could not be loaded or failed */
    CP_DP_ARG = 11,        /* bad arguments */
    CP_DP_DIRTY_LOG = 12,  /* source: re-arming the dirty log failed (rearm->sys_errno, rearm->bad_gpa) */
};

/* One call's arguments and results. Progress fields are read by other threads while the loop runs. */
struct cp_dp_stream {
    /* in */
    int32_t fd;
    uint32_t n_mailboxes;
    struct cp_dp_mailbox *mailboxes;
    const uint64_t *gpas;    /* source: the pages to seal; target: where the GPAs received go (gpas_cap) */
    uint64_t count;          /* source: how many; target: capacity of gpas */
    uint64_t gpa_base;
    uint64_t ram_size;
    uint32_t generation;     /* source: the round's SAVE generation */
    uint32_t protect;        /* 1: PROTECTED frames under key (wire v2), 0: CRC-only frames */
    uint8_t key[32];         /* the direction's frame key */
    uint8_t direction[4];    /* nonce prefix of that direction */
    double op_timeout;       /* seconds an op may take */
    double io_timeout;       /* seconds a send or receive may make no progress (<= 0: no limit) */
    double bandwidth;        /* source: bytes/s cap (0: none), counted with pace_sent from pace_t0 */
    double pace_t0;          /* CLOCK_MONOTONIC seconds the stream's pacing started */
    uint64_t pace_sent;      /* stream bytes sent before this call */
    struct cp_rearm *rearm;  /* source: re-arm the dirty log of the pages ahead of each SAVE (NULL: none) */
    /* in/out */
    uint64_t seq;            /* the next frame's seq (source: sent; target: expected) */
    /* out */
    uint64_t pages;          /* pages sent / received and LOADed */
    uint64_t bytes;          /* frame bytes sent / received (tags included) */
    uint64_t frames;
    uint64_t ops;
    uint64_t kicks;
    int32_t stop;            /* enum cp_dp_stop */
    int32_t sys_errno;
    uint32_t bad_mailbox;
    uint32_t bad_slot;
    uint32_t bad_status;
    uint32_t reserved;
    uint64_t bad_gpa;
    uint8_t next_header[CP_HEADER_SIZE]; /* target: the header that ended the call (stop CP_DP_DONE) */
    struct cp_error err;
};

/* Source: SAVE every page of gpas[0..count) over the mailboxes' banks, send each done bank's records from
 * the slots as one SEALED_PAGES frame (checked, authenticated), repost; return once all are sent or on a
 * stop (every posted op done first). Returns stop. */
int32_t cp_dp_send_sealed(struct cp_dp_stream *s, cp_dp_poke_fn poke);
/* Target: receive SEALED_PAGES frames straight into free banks, check each, post LOAD; at the first other
 * frame header wait for every LOAD and return CP_DP_DONE with that header in next_header. Returns stop. */
int32_t cp_dp_recv_sealed(struct cp_dp_stream *s, cp_dp_poke_fn poke);

#endif /* CONFPLAN_DATAPATH_H */
