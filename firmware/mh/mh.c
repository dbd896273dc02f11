/* Migration-helper entry (CPL3, on aux vCPUs or the mirror VM): announces itself in its mailbox control
 * page and idles until the VMM kicks it. The mailbox protocol (SAVE/LOAD/...) is the next issue. */
#include "cp_lib.h"

void mh_entry(uint64_t idx) __attribute__((noreturn));

void mh_entry(uint64_t idx)
{
    volatile struct cp_mailbox_header *mb =
        (volatile struct cp_mailbox_header *)(uintptr_t)(CP_BP->mailbox_gpa + idx * CP_BP->mailbox_stride);
    mb->magic = CP_MB_MAGIC;
    mb->mh_index = (uint32_t)idx;
    mb->state = CP_MH_ST_READY;
    cp_printf("mh: helper vCPU %lu ready%s", idx, (CP_BP->flags & CP_BP_FLAG_MH_ONLY) ? " (mh_only)" : "");
    cp_event(CP_EV_MH_READY);
    for (;;) {
        mb->heartbeat++;
        if (mb->ping != mb->pong)
            mb->pong = mb->ping;
        cp_idle();
    }
}
