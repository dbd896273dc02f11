/* CPL3 runtime shared by the workload and the migration helper: MMIO services, console, pages. */
#ifndef CP_LIB_H
#define CP_LIB_H
#include <stddef.h>
#include <stdint.h>

#include "confplan_abi.h"

#define CP_BP ((const volatile struct cp_boot_params *)(uintptr_t)CP_BOOT_PARAMS_GPA)

static inline void cp_mmio_store(uint64_t gpa, uint64_t value)
{
    *(volatile uint64_t *)(uintptr_t)gpa = value;
}

static inline uint64_t cp_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static inline void cp_pause(void) { __asm__ volatile("pause" ::: "memory"); }

static inline void cp_event(uint64_t code) { cp_mmio_store(CP_MMIO_DOORBELL + CP_DB_EVENT, code); }
static inline void cp_idle(void) { cp_mmio_store(CP_MMIO_DOORBELL + CP_DB_IDLE, 1); }
static inline void cp_sleep_ns(uint64_t ns) { cp_mmio_store(CP_MMIO_DOORBELL + CP_DB_SLEEP_NS, ns); }

__attribute__((noreturn)) void cp_park_forever(void);
void cp_map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs);
void cp_time_init(uint64_t pvclock_gpa, uint64_t timer_count);
uint64_t cp_clock_ns(const volatile struct cp_pvclock *pv);
void cp_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

uint32_t cp_page_fill(uint64_t *page, uint64_t seed, uint64_t index, uint32_t seq);
uint32_t cp_page_csum(const uint64_t *page);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
#endif
