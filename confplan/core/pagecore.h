/*
 * confplan page-transfer core: the C half of confplan.core (loaded with ctypes, no Python API).
 *
 * It scans KVM's dirty bitmap AND the page-encryption bitmap into GPA lists, gathers shared pages from guest
 * RAM into SHARED_PAGES frames and scatters them back, frames the migration helper's sealed page records into
 * SEALED_PAGES frames and unframes them into the target helper's data area, and owns the frame header and its
 * CRC-32C checks. The byte layout is documented in docs/wire.md; every change to a struct or a constant here
 * bumps CP_ABI_VERSION (the Python binding refuses a library whose ABI version differs).
 *
 * Conventions: every function that can fail returns 0 or a negative enum cp_status and, when `err` is not
 * NULL, fills it with where (record index) and what (offending value, expected value). A function that
 * refuses a frame writes nothing to guest RAM or to the data area. Wire integers are little-endian. GPA lists
 * (`gpas`, `expected_gpas`, `gpas_out`) are arrays of u64 of any alignment, hence `void *`.
 */
#ifndef CONFPLAN_PAGECORE_H
#define CONFPLAN_PAGECORE_H

#include <stddef.h>
#include <stdint.h>

/* struct cp_sealed_page and CP_SEALED_PAGE_SIZE: the record the migration helper writes is defined once,
 * with the firmware (its _Static_asserts pin every field's offset). */
#include "../../firmware/include/cp_sealed_page.h"

/* The guest's RAM hole (guest ABI v8, CP_RAM_HOLE_* in firmware/include/confplan_abi.h; tests compare
 * them): GPAs there are no RAM, whatever ram_size says. */
#define CP_RAM_HOLE_START 0xE0000000ULL
#define CP_RAM_HOLE_END 0x100000000ULL

#define CP_ABI_VERSION 5

#define CP_WIRE_MAGIC 0x4c504643u   /* the bytes "CFPL" */
#define CP_WIRE_VERSION 4u
#define CP_PAGE_SIZE 4096u
#define CP_HEADER_SIZE 32u
#define CP_MAX_PAYLOAD (16u << 20)  /* a receiver can size one buffer for any frame */
#define CP_MAX_FRAME_PAGES 2048u    /* pages (shared) or records (sealed) in one frame */
#define CP_PAGES_PREFIX_SIZE 8u     /* {count u32, reserved u32} before the entries */
#define CP_SHARED_ENTRY_SIZE 16u    /* {gpa u64, flags u32, reserved u32}, then 4096 bytes unless ZERO */
#define CP_SEALED_HEADER_SIZE CP_SEALED_PAGE_HEADER  /* a record's header: everything but the ciphertext */
#define CP_TAG_SIZE 16u             /* the AES-GCM tag after a PROTECTED frame's payload (not in payload_len) */

/* Frame header flags (version 2) */
#define CP_HF_PROTECTED 0x1u        /* a tag follows the payload; the payload CRC is 0 unless SEALED_PAGES */

/* SHARED_PAGES entry flags */
#define CP_PAGE_ZERO 0x1u           /* the page is all zeros: no payload follows the entry */

/* cp_sealed_page.status written by the migration helper */
#define CP_SEAL_OK 0u

enum cp_frame_type {
    CP_FT_HELLO = 1,
    CP_FT_SHARED_PAGES = 2,
    CP_FT_SEALED_PAGES = 3,
    CP_FT_ROUND_END = 4,
    CP_FT_VCPU_STATE = 5,
    CP_FT_DEVICE_STATE = 6,
    CP_FT_MANIFEST = 7,
    CP_FT_DONE = 8,
    CP_FT_ERROR = 9,
    CP_FT_CHALLENGE = 10,    /* handshake, target -> source (docs/stream-security.md) */
    CP_FT_AUTH = 11,         /* handshake, source -> target */
    CP_FT_HANDOVER = 12,     /* the handover's messages, both ways (docs/handover.md) */
    CP_FT_LAST = CP_FT_HANDOVER,
};

enum cp_status {
    CP_OK = 0,
    CP_E_ARG = -1,           /* bad argument from the caller (NULL, unaligned base, size overflow) */
    CP_E_TRUNCATED = -2,     /* fewer bytes than the header or the header's payload_len */
    CP_E_MAGIC = -3,
    CP_E_VERSION = -4,
    CP_E_HEADER_CRC = -5,
    CP_E_TYPE = -6,          /* unknown frame type, or not the type this function handles */
    CP_E_FLAGS = -7,         /* header flags, entry flags or a reserved field not zero */
    CP_E_PAYLOAD_LEN = -8,   /* payload_len above the maximum or not what the entries add up to */
    CP_E_PAYLOAD_CRC = -9,
    CP_E_COUNT = -10,        /* page or record count above CP_MAX_FRAME_PAGES */
    CP_E_GPA_ALIGN = -11,    /* GPA not a multiple of 4096 */
    CP_E_GPA_RANGE = -12,    /* GPA outside [gpa_base, gpa_base + ram_size) */
    CP_E_SPACE = -13,        /* an output buffer is too small */
    CP_E_SEAL_STATUS = -14,  /* a sealed record whose status is not CP_SEAL_OK */
    CP_E_GPA_MISMATCH = -15, /* a sealed record for another GPA than the one asked for */
};

/* The fixed frame header. header_crc32c covers bytes [0, 28); payload_crc32c covers the payload. */
struct cp_frame_header {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t flags;          /* CP_HF_PROTECTED or 0 */
    uint32_t payload_len;
    uint64_t seq;            /* 0, 1, 2, ... per stream; checked by the reader */
    uint32_t payload_crc32c; /* 0 for a PROTECTED frame (its tag covers it); SEALED_PAGES: prefix and record
                              * headers only (wire v3) */
    uint32_t header_crc32c;
};

/* Where a refusal happened: index of the page/record (UINT32_MAX if none), the value found, the limit or the
 * value expected. */
struct cp_error {
    int32_t code;
    uint32_t index;
    uint64_t value;
    uint64_t expected;
};

/* What an unframe function found in a valid frame. */
struct cp_frame_info {
    uint64_t seq;
    uint32_t type;
    uint32_t count;          /* pages or records */
    uint32_t zero_pages;     /* SHARED_PAGES: entries sent as ZERO */
    uint32_t reserved;
    uint64_t frame_len;      /* CP_HEADER_SIZE + payload_len */
};

int cp_abi_version(void);
/* The layout constants, so the binding can check a stale library; `which` is a CP_Q_* value. */
uint64_t cp_query(int which);
enum { CP_Q_MAGIC = 1, CP_Q_WIRE_VERSION, CP_Q_HEADER_SIZE, CP_Q_MAX_PAYLOAD, CP_Q_MAX_FRAME_PAGES,
       CP_Q_SEALED_PAGE_SIZE, CP_Q_CRC_HW, CP_Q_TAG_SIZE };

/* CRC-32C (Castagnoli), chainable: cp_crc32c(cp_crc32c(0, a), b) == CRC of a||b. */
uint32_t cp_crc32c(uint32_t crc, const void *buf, size_t len);
/* Use the SSE4.2 path (want_hw != 0, if the CPU has it) or the portable one; returns whether hardware is now
 * used. For tests of the fallback: not to be called while other threads use the core. */
int cp_crc32c_select(int want_hw);
int cp_page_is_zero(const void *page);

/* Dirty pages split by the encryption bitmap (bit set = shared). `shared` may be NULL (all private). */
int cp_scan_count(const void *dirty, const void *shared, uint64_t npages, uint64_t *n_shared,
                  uint64_t *n_private);
int cp_scan(const void *dirty, const void *shared, uint64_t npages, uint64_t gpa_base, uint64_t *shared_out,
            uint64_t shared_cap, uint64_t *private_out, uint64_t private_cap, uint64_t *n_shared,
            uint64_t *n_private, struct cp_error *err);

/* Header: fill it in front of a payload already at frame + CP_HEADER_SIZE, or check one. */
int cp_frame_finish(void *frame, size_t cap, uint32_t type, uint32_t flags, uint64_t seq, uint32_t payload_len,
                    struct cp_error *err);
int cp_header_check(const void *buf, size_t len, struct cp_frame_header *out, struct cp_error *err);
/* Header check, then the whole frame is present and its payload CRC matches. A PROTECTED frame other than
 * SEALED_PAGES has no payload CRC (the field must be 0): the stream reader has checked its tag. */
int cp_frame_check(const void *frame, size_t len, struct cp_frame_header *out, struct cp_error *err);

/* Stream protection (docs/stream-security.md), one call per frame on each side.
 * cp_frame_protect: a writer's view of the whole unprotected frame (checked, flags 0): the PROTECTED header
 * it sends, into out_header (32 bytes; flag set, payload CRC zeroed unless SEALED_PAGES, header CRC redone)
 * and, for SEALED_PAGES, the GMAC input into aad (*aad_len bytes; 0 for other types).
 * cp_frame_aad: a reader's view of a received protected SEALED_PAGES frame: its GMAC input.
 * The GMAC input is the header sent, the payload's {count, reserved} prefix and the first 64 bytes of each
 * record (40 + 64 * count bytes); the count must fill payload_len exactly. */
int cp_frame_protect(const void *frame, size_t len, void *out_header, void *aad, size_t aad_cap,
                     uint64_t *aad_len, struct cp_frame_header *out, struct cp_error *err);
int cp_frame_aad(const void *frame, size_t len, void *aad, size_t aad_cap, uint64_t *aad_len,
                 struct cp_error *err);

/* verify's shared-page CRC table: CRC-32C of each listed page (cached in crcs/valid), folded into *crc. */
int cp_crc_table(const void *ram, uint64_t gpa_base, uint64_t ram_size, const void *gpas, uint64_t count,
                 uint32_t *crcs, uint8_t *valid, uint64_t table_pages, uint32_t *crc, uint64_t *computed,
                 struct cp_error *err);

/* ... and its forget: valid[page] = 0 for each listed GPA (all checked against table_pages first). */
int cp_forget_pages(const void *gpas, uint64_t count, uint64_t gpa_base, uint8_t *valid, uint64_t table_pages,
                    struct cp_error *err);

/* Source: gather shared pages from guest RAM into a SHARED_PAGES frame (zero pages flagged, no payload). */
int cp_frame_shared(void *out, size_t cap, const void *ram, uint64_t gpa_base, uint64_t ram_size,
                    const void *gpas, uint32_t count, uint64_t seq, struct cp_frame_info *info,
                    struct cp_error *err);
/* Target: check a SHARED_PAGES frame completely, then scatter it into guest RAM. gpas_out may be NULL. */
int cp_unframe_shared(const void *frame, size_t len, void *ram, uint64_t gpa_base, uint64_t ram_size,
                      void *gpas_out, uint32_t gpas_cap, struct cp_frame_info *info, struct cp_error *err);

/* Source: copy `count` sealed records from the helper's data area into a SEALED_PAGES frame, then check the
 * copy (so the guest cannot change a record between the check and the send). expected_gpas may be NULL. */
int cp_frame_sealed(void *out, size_t cap, const void *records, uint32_t count, const void *expected_gpas,
                    uint64_t gpa_base, uint64_t ram_size, uint64_t seq, struct cp_frame_info *info,
                    struct cp_error *err);
/* Target: check a SEALED_PAGES frame completely, then copy its records into the helper's data area. */
int cp_unframe_sealed(const void *frame, size_t len, void *records, uint32_t records_cap, uint64_t gpa_base,
                      uint64_t ram_size, void *gpas_out, uint32_t gpas_cap, struct cp_frame_info *info,
                      struct cp_error *err);

#endif /* CONFPLAN_PAGECORE_H */
