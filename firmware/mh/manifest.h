/*
 * Protocol v5 (manifest.c): the manifest that lets a target resume only what its helper verified, and the
 * sealed vCPU state of SEV-ES/SNP guests (docs/mailbox.md, "The manifest and sealed vCPU state").
 *
 * Each op takes the data area from its first slot (`data`, `room` bytes: the host can write it at any time,
 * so everything is read once into private memory) and writes its results into the ring entry `c`.
 */
#ifndef CP_MH_MANIFEST_H
#define CP_MH_MANIFEST_H

#include <stdint.h>

#include "context.h"

/* Source only: digest this side's tables over [start, start + npages pages) in chunks of `chunk` pages and
 * seal the manifest over the request at `data`; c->n_ok = the sealed bytes. */
uint32_t cp_mh_seal_manifest(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                             uint64_t start, uint64_t npages, uint32_t chunk);

/* Target only: open the manifest that follows the request at `data`, recompute every field from this side's
 * tables and compare; the status names the first field that differs. Records "verified" on success. */
uint32_t cp_mh_check_manifest(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, const uint8_t *data,
                              uint64_t room, uint64_t start, uint64_t npages, uint32_t chunk);

/* Source only: seal `len` bytes of vCPU `vcpu`'s state at `data`, in place; c->n_ok = the sealed bytes. */
uint32_t cp_mh_seal_state(struct cp_mh_ctx *ctx, volatile struct cp_mb_cmd *c, uint8_t *data, uint64_t room,
                          uint64_t vcpu, uint64_t len);

/* Target only: open the sealed state of `size` bytes at `data` into VMSA slot `vcpu` (never into `data`). */
uint32_t cp_mh_open_state(struct cp_mh_ctx *ctx, const uint8_t *data, uint64_t room, uint64_t vcpu,
                          uint64_t size);

/* v7, either side: compute this side's manifest fields over the request at `data` (SEAL's request; its
 * bitmap) ahead of the SEAL_MANIFEST / CHECK_MANIFEST that follows on this MH vCPU. */
uint32_t cp_mh_prepare_manifest(struct cp_mh_ctx *ctx, const uint8_t *data, uint64_t room, uint64_t start,
                                uint64_t npages, uint32_t chunk);
/* Drop a prepared manifest (every op that does not use it). */
void cp_mh_forget_prepared(struct cp_mh_ctx *ctx);
/* VERIFIED: 1 if a CHECK_MANIFEST passed for this migration id and nothing changed the tables since. */
uint32_t cp_mh_verified(struct cp_mh_ctx *ctx);

/* Something a check reads is about to change or just changed (LOAD, MAC_LIST, MAC_RANGE): take back
 * "verified". Cheap; call it before and after such an op. */
void cp_mh_tables_changed(struct cp_mh_ctx *ctx);

/* INIT with a new migration id: the VMSA slots go with the tables. Call with the shared lock held. */
void cp_mh_forget_states(struct cp_mh_ctx *ctx);

#endif /* CP_MH_MANIFEST_H */
