/*
 * Host-only glue for tests and the bench: the serve loop's idle hook parks the MH thread on a futex over the
 * low half of `seq` (what a parked vCPU is in the guest), and the VMM side's kick and wait use the same
 * futexes. Never part of the guest image.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "cp_mailbox.h"
#include "mailbox.h"

struct cp_mh_host_idle {
    volatile uint32_t stop; /* set by cp_mh_host_stop: the serve loop returns */
    uint32_t pad;
    uint64_t parks;         /* times the MH thread slept waiting for work */
};

static volatile struct cp_mb_proto *proto(volatile uint8_t *ctl)
{
    return (volatile struct cp_mb_proto *)(ctl + CP_MB_PROTO_OFFSET);
}

static void futex_wait(volatile void *word, uint32_t expected, long timeout_ns)
{
    struct timespec ts = {timeout_ns / 1000000000L, timeout_ns % 1000000000L};
    syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake(volatile void *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* The cp_mh_idle_fn for host threads. The 50 ms timeout only bounds a lost wake-up; kicks wake at once. */
int cp_mh_host_idle(void *arg, volatile uint8_t *ctl, uint32_t why, uint64_t seen)
{
    struct cp_mh_host_idle *idle = arg;
    volatile struct cp_mb_proto *p = proto(ctl);
    if (why == CP_MH_WHY_DONE) {
        futex_wake(&p->done);
        return idle->stop != 0;
    }
    if (idle->stop)
        return 1;
    idle->parks++;
    futex_wait(&p->seq, (uint32_t)seen, 50 * 1000 * 1000L);
    return idle->stop != 0;
}

size_t cp_mh_host_idle_size(void)
{
    return sizeof(struct cp_mh_host_idle);
}

/* The VMM side's kick: wake the MH thread parked on seq. */
void cp_mh_host_kick(volatile uint8_t *ctl)
{
    futex_wake(&proto(ctl)->seq);
}

/* Waits until done == seq or timeout_ns passes; returns 0 or -1 (timeout). Called from Python with the GIL
 * released (ctypes), so the MH threads run meanwhile. */
int cp_mh_host_wait_done(volatile uint8_t *ctl, uint64_t seq, int64_t timeout_ns)
{
    volatile struct cp_mb_proto *p = proto(ctl);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        uint64_t done = __atomic_load_n(&p->done, __ATOMIC_ACQUIRE);
        if (done == seq)
            return 0;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t left = timeout_ns - ((int64_t)(now.tv_sec - start.tv_sec) * 1000000000L +
                                     (now.tv_nsec - start.tv_nsec));
        if (left <= 0)
            return -1;
        futex_wait(&p->done, (uint32_t)done, left < 10000000L ? left : 10000000L);
    }
}

/* Ends a serve loop: it returns at its next wake-up. */
void cp_mh_host_stop(struct cp_mh_host_idle *idle, volatile uint8_t *ctl)
{
    idle->stop = 1;
    futex_wake(&proto(ctl)->seq);
}
