/*
 * One sealed page record: what the migration helper writes into a mailbox data slot, and what travels in a
 * SEALED_PAGES frame unchanged (docs/wire.md). The one definition: the MH (firmware/mh/mailbox.c) and the
 * C page core (confplan/core/pagecore.h) both include this header; confplan.core._lib.SealedPageC mirrors
 * it. Little-endian. A layout change is a wire change: bump CP_WIRE_VERSION and CP_MB_PROTO_VERSION.
 */
#ifndef CP_SEALED_PAGE_H
#define CP_SEALED_PAGE_H

#include <stddef.h>
#include <stdint.h>

#define CP_SEALED_PAGE_SIZE 4160u
#define CP_SEALED_PAGE_HEADER 64u /* bytes before the ciphertext */

/* AEAD = AES-256-GCM; AAD = gpa (u64 LE) || generation (u32 LE) || migration id (16 bytes). */
struct cp_sealed_page {
    uint64_t gpa;            /*  0: the private page this seals */
    uint32_t generation;     /*  8: precopy round the page was sealed in */
    uint32_t status;         /* 12: 0 = sealed, or the helper's error code (CP_MBS_*) for this page */
    uint8_t nonce[12];       /* 16: AES-256-GCM nonce, unique per seal */
    uint32_t key_id;         /* 28: which transport key */
    uint8_t tag[16];         /* 32: GCM tag */
    uint8_t reserved[16];    /* 48: must be zero */
    uint8_t ct[4096];        /* 64: ciphertext */
};

_Static_assert(offsetof(struct cp_sealed_page, gpa) == 0, "cp_sealed_page.gpa");
_Static_assert(offsetof(struct cp_sealed_page, generation) == 8, "cp_sealed_page.generation");
_Static_assert(offsetof(struct cp_sealed_page, status) == 12, "cp_sealed_page.status");
_Static_assert(offsetof(struct cp_sealed_page, nonce) == 16, "cp_sealed_page.nonce");
_Static_assert(offsetof(struct cp_sealed_page, key_id) == 28, "cp_sealed_page.key_id");
_Static_assert(offsetof(struct cp_sealed_page, tag) == 32, "cp_sealed_page.tag (16-byte aligned)");
_Static_assert(offsetof(struct cp_sealed_page, reserved) == 48, "cp_sealed_page.reserved");
_Static_assert(offsetof(struct cp_sealed_page, ct) == CP_SEALED_PAGE_HEADER, "cp_sealed_page.ct");
_Static_assert(sizeof(struct cp_sealed_page) == CP_SEALED_PAGE_SIZE, "cp_sealed_page is 4160 bytes");

#endif /* CP_SEALED_PAGE_H */
