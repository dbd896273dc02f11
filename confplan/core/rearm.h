/*
 * The source's dirty log re-armed just before pages are read (rearm.c; docs/dirty-log.md).
 *
 * With KVM's manual dirty-log protection a fetch (KVM_GET_DIRTY_LOG) leaves the log as it is; a page is
 * write-protected again, and its bit cleared, only by KVM_CLEAR_DIRTY_LOG. The reader clears exactly the
 * pages it is about to read, just before it reads them: a write after that is logged and the page goes
 * again next round; a write before it lands in what is read. Every struct is mirrored in
 * confplan/core/rearm.py; a change bumps CP_ABI_VERSION.
 */
#ifndef CONFPLAN_REARM_H
#define CONFPLAN_REARM_H

#include <stdint.h>

/* One KVM memslot of guest RAM: GPAs [gpa, gpa + size), both multiples of 64 pages. */
struct cp_rearm_slot {
    uint64_t gpa;
    uint64_t size;
    uint32_t slot;
    uint32_t reserved;
};

struct cp_rearm {
    /* in */
    int32_t vm_fd;                     /* the VM whose log is re-armed */
    uint32_t n_slots;
    const struct cp_rearm_slot *slots;
    /* out (added to) */
    uint64_t calls;                    /* KVM_CLEAR_DIRTY_LOG calls made */
    uint64_t pages;                    /* pages re-armed */
    int32_t sys_errno;                 /* the failed call's errno (0: none) */
    uint32_t reserved;
    uint64_t bad_gpa;                  /* a GPA outside every slot, or the first page of the failed call */
};

/* Re-arm gpas[0..count) (any order; ascending is cheapest). 0, or -1 with sys_errno and bad_gpa set
 * (sys_errno EINVAL and no call made: bad_gpa is in no slot). */
int32_t cp_rearm_pages(struct cp_rearm *r, const uint64_t *gpas, uint64_t count);

#endif /* CONFPLAN_REARM_H */
