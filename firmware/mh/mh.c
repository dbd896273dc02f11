/* Migration-helper entry (CPL3, on aux vCPUs or the mirror VM): builds its mailbox engine's config from the
 * (measured) boot parameters, announces itself, then serves its mailbox (firmware/mh/mailbox.c) until the
 * guest dies. The serve loop rings the mailbox doorbell only once it has caught up with every queued op,
 * and the VMM parks the vCPU there until the next post; otherwise idle = the IDLE doorbell. The VMM's kick
 * is latched by the vCPU thread (VcpuRunner.park), so a kick that lands between "no new seq" and the park
 * ends the park at once and the loop looks again. */
#include "cp_lib.h"
#include "mailbox.h"

_Static_assert(sizeof(struct cp_mh_ctx) <= CP_MH_CTX_STRIDE, "MH context outgrew CP_MH_CTX_STRIDE");
_Static_assert(sizeof(struct cp_mh_shared) <= CP_PAGE_SIZE, "MH shared block is one page");
_Static_assert(CP_MH_GEN_ENTRY == sizeof(uint32_t), "generation table entry");
_Static_assert(CP_MH_MAC_ENTRY == CP_MB_MAC_BYTES, "MAC table entry");
_Static_assert(sizeof(struct cp_vmsa_slot) == CP_VMSA_SLOT_SIZE, "VMSA slot");

void mh_entry(uint64_t idx) __attribute__((noreturn));

struct mh_idle {
    uint64_t idx;
    uint32_t announced;
    uint32_t impl;
};

static const char *impl_name(uint32_t impl)
{
    return impl == CP_GCM_IMPL_VAES512 ? "vaes512"
           : impl == CP_GCM_IMPL_VAES  ? "vaes"
           : impl == CP_GCM_IMPL_AESNI ? "aes-ni"
                                       : "portable";
}

/* Called by cp_mh_serve with nothing new to do (IDLE) or after publishing a result (DONE). The first call
 * means the protocol block is published: only then does the VMM hear "ready". */
static int mh_idle(void *arg, volatile uint8_t *ctl, uint32_t why, uint64_t seen)
{
    struct mh_idle *st = arg;
    (void)ctl;
    (void)seen;
    if (!st->announced) {
        st->announced = 1;
        cp_printf("mh: helper vCPU %lu ready, aes %s%s", st->idx, impl_name(st->impl),
                  (CP_BP->flags & CP_BP_FLAG_MH_ONLY) ? " (mh_only)" : "");
        cp_event(CP_EV_MH_READY);
    }
    if (why == CP_MH_WHY_IDLE)
        cp_idle();
    return 0;
}

static void own_low_page(struct cp_mh_config *cfg, uint64_t page)
{
    if (page < CP_MH_OWN_LOW_PAGES)
        cfg->own_low[page / 64] |= 1ull << (page % 64);
}

static void fill_config(struct cp_mh_config *cfg, uint64_t idx)
{
    const volatile struct cp_boot_params *bp = CP_BP;
    cfg->ram = (uint8_t *)0;
    cfg->ram_size = bp->ram_top; /* v8: RAM above 4 GiB; the hole below is refused and skipped */
    /* (v7) Off limits to SAVE/LOAD/DIGEST: the MH area and the MH's own low pages (memory-map.md, "What
     * migrates"). Every other page below the workload area is the guest's (CPU tables, boot page, its
     * page tables and CPL0 stacks, the firmware image) and moves; the helper's tables map them for it. */
    cfg->mh_base = bp->mh_base;
    cfg->mh_size = bp->mh_size;
    for (uint32_t i = 0; i < CP_MH_OWN_LOW_PAGES / 64; i++)
        cfg->own_low[i] = 0;
    own_low_page(cfg, 0);
    for (uint64_t gpa = CP_PT_MH_GPA; gpa < CP_KSTACK_GPA; gpa += CP_PAGE_SIZE)
        own_low_page(cfg, gpa / CP_PAGE_SIZE);
    for (uint64_t id = bp->nr_vcpus; id < (uint64_t)bp->nr_vcpus + bp->mh_vcpus; id++)
        own_low_page(cfg, (CP_KSTACK_GPA + id * CP_KSTACK_SIZE) / CP_PAGE_SIZE);
    cfg->shared = (struct cp_mh_shared *)(uintptr_t)bp->mh_shared_gpa;
    cfg->gen_table = (uint32_t *)(uintptr_t)bp->mh_gen_gpa;
    cfg->gen_entries = bp->mh_gen_entries;
    cfg->mac_table = (uint8_t *)(uintptr_t)bp->mh_mac_gpa;
    cfg->mac_entries = bp->mh_mac_entries;
    cfg->vmsa = (uint8_t *)(uintptr_t)bp->mh_vmsa_gpa;
    cfg->vmsa_slots = bp->mh_vmsa_slots;
    cfg->secret = (const uint8_t *)(uintptr_t)bp->secret_gpa;
    cfg->secret_size = CP_PAGE_SIZE;
    cfg->doorbell = (volatile uint64_t *)(uintptr_t)(bp->mmio_mailbox + 8 * idx);
    cfg->cpu_features = cp_mh_features_from_bp(bp->cpu_features);
    cfg->side = (bp->flags & CP_BP_FLAG_MH_ONLY) ? CP_MH_SIDE_TARGET : CP_MH_SIDE_SOURCE;
    cfg->snp = (bp->flags & CP_BP_FLAG_SNP) ? 1u : 0u; /* measured: a host that lies changes the digest */
    for (uint32_t i = 0; i < sizeof(cfg->owner_key); i++) /* measured too */
        cfg->owner_key[i] = bp->owner_key[i];
    cfg->mh_index = (uint32_t)idx;
    cfg->batch_pages = bp->batch_pages;
}

void mh_entry(uint64_t idx)
{
    const volatile struct cp_boot_params *bp = CP_BP;
    if (idx >= bp->mh_vcpus || bp->mh_ctx_stride < sizeof(struct cp_mh_ctx)) {
        cp_printf("mh: helper vCPU %lu has no mailbox or context (mh_vcpus %u)", idx, bp->mh_vcpus);
        cp_park_forever();
    }
    volatile uint8_t *ctl = (volatile uint8_t *)(uintptr_t)(bp->mailbox_gpa + idx * bp->mailbox_stride);
    volatile struct cp_mailbox_header *mb = (volatile struct cp_mailbox_header *)ctl;
    struct cp_mh_ctx *ctx = (struct cp_mh_ctx *)(uintptr_t)(bp->mh_ctx_gpa + idx * bp->mh_ctx_stride);
    struct cp_mh_config cfg;
    fill_config(&cfg, idx);
    uint32_t rc = cp_mh_setup(ctx, &cfg);
    mb->magic = CP_MB_MAGIC;
    mb->mh_index = (uint32_t)idx;
    if (rc != CP_MBS_OK) {
        cp_printf("mh: helper vCPU %lu: setup refused its config (status %u)", idx, rc);
        cp_park_forever();
    }
    mb->state = CP_MH_ST_READY;
    struct mh_idle st = {.idx = idx, .announced = 0, .impl = ctx->impl};
    cp_mh_serve(ctx, ctl, (uint8_t *)(uintptr_t)(ctl + CP_MB_SLOTS_OFFSET), mh_idle, &st);
    cp_park_forever();
}
