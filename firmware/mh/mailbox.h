/*
 * The migration helper's mailbox engine: plain freestanding C over explicit pointers, so the same source
 * runs in the guest (CPL3 only: it calls the SSE/AES-NI crypto) and in a host shared library for tests
 * (firmware/mh/host/). No globals, no libc; everything it touches is reached through the context.
 */
#ifndef CP_MH_MAILBOX_H
#define CP_MH_MAILBOX_H

#include <stddef.h>
#include <stdint.h>

#include "context.h"

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

#endif /* CP_MH_MAILBOX_H */
