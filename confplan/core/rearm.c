/*
 * The source's dirty log re-armed just before pages are read (rearm.h). A list of GPAs becomes a few
 * KVM_CLEAR_DIRTY_LOG calls: one per run of pages in one slot that fits a bitmap window (CP_REARM_WORDS
 * words from a 64-page boundary, as KVM wants it), the bits set exactly for the pages listed, so a page
 * that is not about to be read keeps its bit (and stays writable) whatever its neighbours do.
 */
#define _GNU_SOURCE
#include "rearm.h"

#include <errno.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>

#define PAGE_SHIFT 12
#define CP_REARM_WORDS 512 /* 32768 pages (128 MiB) a call at most */

struct window {
    const struct cp_rearm_slot *slot; /* NULL: empty */
    uint64_t first;                   /* the slot's page of bit 0 (a multiple of 64) */
    uint32_t words;                   /* words used */
    uint64_t bits[CP_REARM_WORDS];
};

static const struct cp_rearm_slot *slot_of(const struct cp_rearm *r, uint64_t gpa)
{
    for (uint32_t i = 0; i < r->n_slots; i++)
        if (gpa - r->slots[i].gpa < r->slots[i].size)
            return &r->slots[i];
    return NULL;
}

static int32_t flush(struct cp_rearm *r, struct window *w)
{
    if (!w->slot)
        return 0;
    uint64_t npages = w->slot->size >> PAGE_SHIFT;
    uint64_t num = (uint64_t)w->words * 64;
    if (num > npages - w->first)
        num = npages - w->first; /* KVM: a multiple of 64, or up to the slot's end */
    struct kvm_clear_dirty_log log = {
        .slot = w->slot->slot, .num_pages = (uint32_t)num, .first_page = w->first, .dirty_bitmap = w->bits};
    if (ioctl(r->vm_fd, KVM_CLEAR_DIRTY_LOG, &log) < 0) {
        r->sys_errno = errno;
        r->bad_gpa = w->slot->gpa + (w->first << PAGE_SHIFT);
        return -1;
    }
    r->calls++;
    w->slot = NULL;
    return 0;
}

int32_t cp_rearm_pages(struct cp_rearm *r, const uint64_t *gpas, uint64_t count)
{
    static _Thread_local struct window w; /* 4 KiB: off the stack, one per thread (two loops may run at once) */
    w.slot = NULL;
    for (uint64_t k = 0; k < count; k++) {
        const struct cp_rearm_slot *slot = slot_of(r, gpas[k]);
        if (!slot) {
            r->sys_errno = EINVAL;
            r->bad_gpa = gpas[k];
            return -1;
        }
        uint64_t page = (gpas[k] - slot->gpa) >> PAGE_SHIFT;
        if (w.slot != slot || page < w.first || page - w.first >= (uint64_t)CP_REARM_WORDS * 64) {
            if (flush(r, &w))
                return -1;
            w.slot = slot;
            w.first = page & ~(uint64_t)63;
            w.words = 0;
        }
        uint32_t word = (uint32_t)((page - w.first) / 64);
        if (word >= w.words) {
            memset(&w.bits[w.words], 0, (size_t)(word + 1 - w.words) * 8);
            w.words = word + 1;
        }
        w.bits[word] |= 1ULL << ((page - w.first) % 64);
        r->pages++;
    }
    return flush(r, &w);
}
