/*
 * A migration helper vCPU's run loop (helper_run.h): its doorbell exits and parks without Python.
 */
#define _GNU_SOURCE
#include "helper_run.h"

#include <errno.h>
#include <linux/kvm.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* A store this loop owns: an 8-byte MMIO write to the helper's mailbox doorbell or to the idle doorbell. */
static int owned(const struct cp_helper_run *h, const struct kvm_run *run)
{
    if (run->exit_reason != KVM_EXIT_MMIO || !run->mmio.is_write || run->mmio.len != 8)
        return 0;
    return run->mmio.phys_addr == h->bell_gpa || run->mmio.phys_addr == h->idle_gpa;
}

/* What the Python device does for the same store (devices/mailbox_doorbell.py): the highest seq, a count,
 * then the waiters' eventfd. Only this helper's thread writes these two words. */
static void ring(struct cp_helper_run *h, const struct kvm_run *run)
{
    uint64_t seq, one = 1;
    memcpy(&seq, run->mmio.data, sizeof(seq));
    if (seq > __atomic_load_n(h->rung, __ATOMIC_RELAXED))
        __atomic_store_n(h->rung, seq, __ATOMIC_RELEASE);
    __atomic_store_n(h->rings, *h->rings + 1, __ATOMIC_RELEASE);
    if (write(h->rung_fd, &one, sizeof(one)) < 0) {
        /* the counter can only overflow after 2^64 - 1 writes: nothing to do */
    }
}

/* Wait on wake_fd and consume the wake. 0: woken; 1: immediate_exit was set (pause, stop, watchdog: they
 * set it before they wake or signal); -errno: the wait failed. */
static int32_t park(struct cp_helper_run *h, volatile struct kvm_run *run)
{
    int32_t rc = 0;
    __atomic_store_n(&h->parked, 1, __ATOMIC_RELEASE);
    for (;;) {
        if (run->immediate_exit) {
            rc = 1;
            break;
        }
        struct pollfd pfd = {.fd = h->wake_fd, .events = POLLIN};
        int r = poll(&pfd, 1, -1);
        if (r > 0) {
            uint64_t n;
            if (read(h->wake_fd, &n, sizeof(n)) < 0 && errno != EAGAIN)
                rc = -errno;
            break;
        }
        if (r < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
    }
    __atomic_store_n(&h->parked, 0, __ATOMIC_RELEASE);
    return rc;
}

int32_t cp_helper_run(struct cp_helper_run *h)
{
    struct kvm_run *run = h->run;
    for (;;) {
        if (ioctl(h->vcpu_fd, KVM_RUN, 0) < 0)
            return -errno;
        if (!owned(h, run))
            return CP_HR_EXIT;
        if (run->mmio.phys_addr == h->bell_gpa)
            ring(h, run);
        h->exits++;
        int32_t rc = park(h, run);
        if (rc)
            return rc > 0 ? CP_HR_INTERRUPTED : rc;
    }
}
