/* Page content and checksum of the workload's self-check ledger. confplan/vmm/workload.py has the
 * same two functions in Python (tests compare them). */
#include "cp_lib.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint32_t fold(uint64_t h) { return (uint32_t)(h ^ (h >> 32)); }

/* Fill a page with xorshift64 output seeded by (seed, index, seq); return its checksum. */
uint32_t cp_page_fill(uint64_t *page, uint64_t seed, uint64_t index, uint32_t seq)
{
    uint64_t s = mix64(seed ^ mix64(index * 0x9e3779b97f4a7c15ULL + seq)) | 1;
    uint64_t h = FNV_OFFSET;
    for (unsigned i = 0; i < CP_PAGE_SIZE / 8; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        page[i] = s;
        h = (h ^ s) * FNV_PRIME;
    }
    return fold(h);
}

uint32_t cp_page_csum(const uint64_t *page)
{
    uint64_t h = FNV_OFFSET;
    for (unsigned i = 0; i < CP_PAGE_SIZE / 8; i++)
        h = (h ^ page[i]) * FNV_PRIME;
    return fold(h);
}
