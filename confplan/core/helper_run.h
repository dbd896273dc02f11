/*
 * A migration helper vCPU's run loop in C (helper_run.c; docs/mailbox.md, "Parking").
 *
 * A helper that has answered its op (its mailbox doorbell) or has nothing to do (the idle doorbell) parks
 * until the VMM posts again. Those two exits are most of a helper's exits during a stream, so they are
 * handled here, with the GIL released: record the doorbell's seq, park on the vCPU's eventfd, enter
 * KVM_RUN again. Every other exit goes back to the VMM's Python loop, as does a park interrupted by
 * pause, stop or the watchdog (they set the run struct's immediate_exit before they signal or wake). The
 * struct is mirrored in confplan/core/helper_run.py; a change bumps CP_ABI_VERSION.
 */
#ifndef CONFPLAN_HELPER_RUN_H
#define CONFPLAN_HELPER_RUN_H

#include <stdint.h>

enum {
    CP_HR_EXIT = 1,        /* an exit for the VMM to dispatch is in the run struct */
    CP_HR_INTERRUPTED = 2, /* a park ended on immediate_exit: its doorbell exit is still to complete */
};

struct cp_helper_run {
    /* in */
    int32_t vcpu_fd;
    int32_t wake_fd;         /* the eventfd a park waits on (kick, pause, stop and the data loops write it) */
    int32_t rung_fd;         /* an eventfd written after each doorbell recorded (the VMM's waiters poll it) */
    uint32_t reserved;
    void *run;               /* the vCPU's mmap'ed struct kvm_run */
    uint64_t bell_gpa;       /* this helper's mailbox doorbell: an 8-byte store of the seq it answered */
    uint64_t idle_gpa;       /* the idle doorbell: a store of anything */
    uint64_t *rung;          /* the highest seq this helper's doorbell carried */
    uint64_t *rings;         /* its doorbell stores */
    /* out */
    uint64_t exits;          /* exits handled here (each one parked) */
    uint32_t parked;         /* 1 while waiting on wake_fd */
    uint32_t reserved2;
};

/* KVM_RUN until an exit this loop does not handle: CP_HR_EXIT or CP_HR_INTERRUPTED, or -errno when
 * KVM_RUN failed or was interrupted (-EINTR: pause, stop, the watchdog) or the park's wait failed. */
int32_t cp_helper_run(struct cp_helper_run *h);

#endif /* CONFPLAN_HELPER_RUN_H */
