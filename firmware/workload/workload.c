/* The guest workload (CPL3, natively): kind dirty-writer fills its pages with pseudo-random content,
 * then rewrites them at the plan's rate, keeping a ledger (sequence number + checksum per page) so it
 * can verify all of its memory when the VMM asks. All state lives in guest RAM and registers, so a
 * migrated copy continues from the restored memory and vCPU registers. */
#include "cp_lib.h"

struct wl {
    volatile struct cp_wl_control *ctl;
    volatile struct cp_wl_vcpu_status *st;
    const volatile struct cp_pvclock *pv; /* this vCPU's kvm-clock */
    struct cp_ledger_entry *ledger;
    uint8_t *data;
    uint64_t low_pages; /* (v8) data pages below the hole; page low_pages and on start at 4 GiB */
    uint64_t seed;
    uint64_t first, count; /* this vCPU's partition of the data pages */
};

void wl_entry(uint64_t idx) __attribute__((noreturn));

/* Data page p: low RAM after the ledger, then (v8) RAM above 4 GiB, as an OS finds its RAM in the e820
 * map (the VMM's GuestLayout.data_page_gpa is the same rule). */
static uint8_t *page_at(const struct wl *w, uint64_t p)
{
    if (p < w->low_pages)
        return w->data + p * CP_PAGE_SIZE;
    return (uint8_t *)(uintptr_t)(CP_RAM_HOLE_END + (p - w->low_pages) * CP_PAGE_SIZE);
}

/* KVM_HC_MAP_GPA_RANGE over data pages [first, first + count): one call per run of contiguous GPAs. */
static void map_pages(const struct wl *w, uint64_t first, uint64_t count, uint64_t attrs)
{
    uint64_t low = first < w->low_pages ? w->low_pages - first : 0;
    low = low < count ? low : count;
    if (low)
        cp_map_gpa_range((uint64_t)(uintptr_t)page_at(w, first), low, attrs);
    if (count > low)
        cp_map_gpa_range((uint64_t)(uintptr_t)page_at(w, first + low), count - low, attrs);
}

static void write_page(struct wl *w, uint64_t p)
{
    struct cp_ledger_entry *e = &w->ledger[p];
    uint32_t kind = e->seq & CP_LEDGER_SHARED;
    uint32_t seq = ((e->seq & ~CP_LEDGER_SHARED) + 1) & ~CP_LEDGER_SHARED;
    uint32_t csum = cp_page_fill((uint64_t *)page_at(w, p), w->seed, p, seq);
    e->seq = seq | kind;
    e->csum = csum;
    w->st->pages_written++;
}

/* Convert data page p to the other kind the way a Linux guest does for a bounce buffer: known contents
 * written as the old kind, KVM_HC_MAP_GPA_RANGE (here its MMIO doorbell or hypercall service), then the
 * page written again as the new kind (what it held means nothing in the new kind). The ledger's bit 31
 * keeps the kind, so the guest knows which way to convert next time. */
static void convert_page(struct wl *w, uint64_t p)
{
    struct cp_ledger_entry *e = &w->ledger[p];
    int shared = (e->seq & CP_LEDGER_SHARED) != 0;
    write_page(w, p);
    map_pages(w, p, 1, shared ? CP_MAP_GPA_RANGE_ENCRYPTED : 0);
    e->seq ^= CP_LEDGER_SHARED;
    write_page(w, p);
    w->st->conversions++;
}

/* The vector state the workload keeps for its whole life where the CPU has AVX: a per-vCPU pattern in all
 * 256 bits of ymm15, which no other user code touches (it is built with -ffixed-xmm15). A migration that
 * drops the upper YMM halves (KVM_SET_FPU carries only the XMM part) or any of it shows in the next CHECK. */
static int has_avx(void)
{
    return (CP_BP->cpu_features & CP_FEAT_AVX) != 0;
}

static void vec_pattern(const struct wl *w, uint64_t idx, uint64_t v[4])
{
    for (int i = 0; i < 4; i++)
        v[i] = (w->seed ^ 0x5ec7a7e5ec7a7e00ULL) + (idx << 8) + (uint64_t)i * 0x9e3779b97f4a7c15ULL;
}

static void vec_keep(const struct wl *w, uint64_t idx)
{
    uint64_t v[4];
    if (!has_avx())
        return;
    vec_pattern(w, idx, v);
    __asm__ volatile("vmovdqu %0, %%ymm15" : : "m"(*(const uint64_t(*)[4])v));
}

static uint32_t vec_check(const struct wl *w, uint64_t idx)
{
    uint64_t want[4], now[4];
    if (!has_avx())
        return CP_VEC_UNCHECKED;
    vec_pattern(w, idx, want);
    __asm__ volatile("vmovdqu %%ymm15, %0" : "=m"(*(uint64_t(*)[4])now));
    for (int i = 0; i < 4; i++)
        if (now[i] != want[i])
            return CP_VEC_LOST;
    return CP_VEC_INTACT;
}

static void clock_watch(struct wl *w, uint64_t slept_ns);

/* CHECK reads the clock every 1024 pages, as an OS keeps time through long work: the check of a large
 * guest (~1 s for 8 GiB) is then not mistaken for a pause, and a pause during it is still seen. */
static void check_pages(struct wl *w)
{
    w->st->vector = vec_check(w, (uint64_t)(w->st - w->ctl->vcpu));
    uint64_t bad = CP_NO_PAGE;
    for (uint64_t p = w->first; p < w->first + w->count; p++) {
        const struct cp_ledger_entry *e = &w->ledger[p];
        if (((p - w->first) & 1023) == 1023)
            clock_watch(w, 0);
        if (e->seq == 0 || cp_page_csum((const uint64_t *)page_at(w, p)) != e->csum) {
            bad = p;
            break;
        }
    }
    w->st->first_bad = bad;
    w->st->checked = bad == CP_NO_PAGE ? w->count : bad - w->first;
    w->st->result = bad == CP_NO_PAGE ? CP_CHECK_OK : CP_CHECK_BAD;
}

static void write_list(struct wl *w)
{
    uint32_t n = w->ctl->list_count;
    if (n > CP_WL_LIST_MAX)
        n = CP_WL_LIST_MAX;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t p = w->ctl->list[i];
        if (p >= w->first && p < w->first + w->count)
            write_page(w, p);
    }
    w->st->result = CP_CHECK_OK;
}

/* Serve a command the VMM posted (it writes cmd and args, then bumps cmd_seq). */
static void poll_command(struct wl *w)
{
    uint32_t seq = w->ctl->cmd_seq;
    if (seq == w->st->ack_seq)
        return;
    __asm__ volatile("" ::: "memory");
    if (w->ctl->cmd == CP_WL_CMD_CHECK)
        check_pages(w);
    else if (w->ctl->cmd == CP_WL_CMD_WRITE_LIST)
        write_list(w);
    w->st->ack_seq = seq;
    cp_event(CP_EV_WL_CMD_DONE);
}

/* Read kvm-clock once a loop, as an OS's timekeeping does: time never goes back (clock_back counts it
 * if it does) and the largest gap between two readings, less the sleep this vCPU asked for in between
 * (`slept_ns`; CP_SLEPT_UNKNOWN after an IDLE park, whose length the guest cannot know), is the longest
 * it was stopped without asking: a migration's pause shows there. */
#define CP_SLEPT_UNKNOWN 0xffffffffffffffffULL

static void clock_watch(struct wl *w, uint64_t slept_ns)
{
    uint64_t now = cp_clock_ns(w->pv), last = w->st->clock_ns;
    if (w->st->clock_reads && now < last)
        w->st->clock_back++;
    else if (w->st->clock_reads && slept_ns != CP_SLEPT_UNKNOWN) {
        uint64_t gap = now - last;
        gap = gap > slept_ns ? gap - slept_ns : 0;
        if (gap > w->st->max_gap_ns)
            w->st->max_gap_ns = gap;
    }
    w->st->clock_ns = now;
    w->st->clock_reads++;
}

static inline uint64_t next_rand(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Pages per paced burst: enough that a burst lasts ~CP_WL_BURST_NS, so the vCPU sleeps in a few-ms parks
 * (an exit costs ~50 us here) instead of spinning on the TSC between pages. */
#define CP_WL_BURST_NS 4000000ULL
#define CP_WL_MAX_SLEEP_NS 100000000ULL

static uint64_t burst_pages(uint64_t rate)
{
    uint64_t pages = rate * CP_WL_BURST_NS / 1000000000ULL / CP_PAGE_SIZE;
    return pages ? pages : 1;
}

/* The conversions due by now (wl_conv_rate per second, this vCPU's share of it), done between writes. */
struct conv_pace {
    uint64_t tsc_per_conv; /* 0: no conversions */
    uint64_t t0, done;
};

static void convert_due(struct wl *w, struct conv_pace *c, uint64_t *rnd)
{
    if (!c->tsc_per_conv)
        return;
    uint64_t due = (cp_rdtsc() - c->t0) / c->tsc_per_conv;
    for (int i = 0; c->done < due && i < 16; i++, c->done++)
        convert_page(w, w->first + next_rand(rnd) % w->count);
}

static uint64_t conv_interval(void)
{
    uint64_t rate = CP_BP->wl_conv_rate, nr = CP_BP->nr_vcpus ? CP_BP->nr_vcpus : 1;
    return rate ? CP_BP->tsc_khz * 1000 * nr / rate : 0; /* each vCPU does 1/nr of the rate */
}

/* This vCPU's share of the guest's dirty rate (bytes/s; 0 = unlimited). */
static uint64_t own_rate(void)
{
    uint64_t rate = CP_BP->wl_rate_bps, nr = CP_BP->nr_vcpus ? CP_BP->nr_vcpus : 1;
    return rate ? (rate / nr ? rate / nr : 1) : 0;
}

/* Rewrite random pages of the partition: unlimited (a tight loop), or paced to rate bytes/s by the TSC:
 * write what is due, then sleep (SLEEP_NS doorbell) until the next burst (or conversion) is due. The
 * schedule is the same as pacing page by page (page n is due at n * tsc_per_page), only grouped into
 * bursts. Conversions, if any, are paced the same way between the writes. */
static void __attribute__((noreturn)) dirty_loop(struct wl *w, uint64_t idx)
{
    uint64_t rate = own_rate();
    uint64_t tsc_per_us = CP_BP->tsc_khz / 1000 ? CP_BP->tsc_khz / 1000 : 1;
    uint64_t tsc_per_page = rate ? CP_BP->tsc_khz * 1000 * CP_PAGE_SIZE / rate : 0;
    uint64_t burst = rate ? burst_pages(rate) : 0;
    uint64_t rnd = (w->seed ^ (idx + 1) * 0x9e3779b97f4a7c15ULL) | 1;
    uint64_t t0 = cp_rdtsc(), done = 0;
    struct conv_pace conv = {conv_interval(), t0, 0};
    uint64_t slept = 0;
    for (;;) {
        w->st->heartbeat++;
        clock_watch(w, slept);
        slept = 0;
        poll_command(w);
        convert_due(w, &conv, &rnd);
        if (tsc_per_page == 0) {
            for (int i = 0; i < 16; i++)
                write_page(w, w->first + next_rand(&rnd) % w->count);
            continue;
        }
        uint64_t elapsed = cp_rdtsc() - t0;
        uint64_t due = elapsed / tsc_per_page;
        if (done < due) {
            uint64_t n = due - done > 64 ? 64 : due - done; /* commands are polled between chunks */
            for (uint64_t i = 0; i < n; i++)
                write_page(w, w->first + next_rand(&rnd) % w->count);
            done += n;
            continue;
        }
        uint64_t next = (done + burst) * tsc_per_page; /* the TSC at which the next burst is due */
        if (conv.tsc_per_conv && (conv.done + 1) * conv.tsc_per_conv < next)
            next = (conv.done + 1) * conv.tsc_per_conv; /* or the next conversion, if sooner */
        uint64_t wait_ns = next > elapsed ? (next - elapsed) * 1000 / tsc_per_us : 0;
        if (wait_ns) {
            slept = wait_ns > CP_WL_MAX_SLEEP_NS ? CP_WL_MAX_SLEEP_NS : wait_ns;
            cp_sleep_ns(slept);
        }
    }
}

static void __attribute__((noreturn)) quiet_loop(struct wl *w)
{
    for (;;) {
        w->st->heartbeat++;
        clock_watch(w, CP_SLEPT_UNKNOWN);
        poll_command(w);
        cp_idle();
    }
}

static void fill(struct wl *w)
{
    w->st->state = CP_WL_ST_FILLING;
    for (uint64_t p = w->first; p < w->first + w->count; p++) {
        write_page(w, p);
        w->st->heartbeat++;
    }
    uint64_t shared = w->count * CP_BP->wl_shared_ppm / 1000000;
    if (shared)
        map_pages(w, w->first, shared, 0);
    for (uint64_t p = w->first; p < w->first + shared; p++)
        w->ledger[p].seq |= CP_LEDGER_SHARED;
}

void wl_entry(uint64_t idx)
{
    struct wl w;
    uint64_t n = CP_BP->wl_data_pages, nr = CP_BP->nr_vcpus;
    w.ctl = (volatile struct cp_wl_control *)(uintptr_t)CP_BP->wl_ctl_gpa;
    w.st = &w.ctl->vcpu[idx];
    w.ledger = (struct cp_ledger_entry *)(uintptr_t)CP_BP->wl_ledger_gpa;
    w.data = (uint8_t *)(uintptr_t)CP_BP->wl_data_gpa;
    w.low_pages = CP_BP->wl_data_low_pages;
    w.seed = CP_BP->wl_seed;
    w.first = idx * n / nr;
    w.count = (idx + 1) * n / nr - w.first;
    w.pv = (const volatile struct cp_pvclock *)(uintptr_t)(CP_BP->wl_pvclock_gpa + idx * CP_PVCLOCK_SIZE);
    w.st->state = CP_WL_ST_STARTING;
    vec_keep(&w, idx);
    cp_time_init((uint64_t)(uintptr_t)w.pv, CP_BP->timer_count);
    if (idx == 0) /* KVM writes the pvclock page: shared, as Linux marks its hv_clock (__bss_decrypted) */
        cp_map_gpa_range(CP_BP->wl_pvclock_gpa, 1, 0);
    cp_event(CP_EV_WL_STARTED);
    if (idx == 0)
        cp_printf("workload: kind %u on %u vCPUs, %lu data pages", CP_BP->wl_kind, CP_BP->nr_vcpus, n);
    if (CP_BP->wl_kind == CP_WL_PROBE_MH) {
        volatile uint64_t *secret = (volatile uint64_t *)(uintptr_t)CP_BP->secret_gpa;
        cp_printf("workload: reading the secret page: %lx", *secret); /* must fault first */
    }
    if (CP_BP->wl_kind == CP_WL_SPIN)
        for (;;)
            __asm__ volatile("" ::: "memory");
    if (CP_BP->wl_kind == CP_WL_NONE || w.count == 0) {
        w.st->state = CP_WL_ST_PARKED;
        cp_park_forever();
    }
    fill(&w);
    w.st->state = CP_WL_ST_RUNNING;
    cp_event(CP_EV_WL_FILLED);
    if (CP_BP->wl_kind == CP_WL_DIRTY_WRITER)
        dirty_loop(&w, idx);
    quiet_loop(&w);
}
