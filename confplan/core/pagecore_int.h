/*
 * Internal to the core's C files (pagecore.c, datapath.c): helpers shared between them, not part of the
 * ctypes API (the binding never calls these).
 */
#ifndef CONFPLAN_PAGECORE_INT_H
#define CONFPLAN_PAGECORE_INT_H

#include "pagecore.h"

/* Write the header of a frame whose payload CRC is payload_crc (header CRC included). */
void cp_write_header(uint8_t *h, uint32_t type, uint32_t flags, uint64_t seq, uint32_t payload_len,
                     uint32_t payload_crc);
/* The one GPA check: page-aligned and inside guest RAM; fills err (index) on refusal. */
int cp_check_gpa(uint64_t gpa, uint64_t gpa_base, uint64_t ram_size, uint32_t index, struct cp_error *err);

/* Wire v3: the payload CRC of an unprotected SEALED_PAGES frame, over the prefix and each record's header. */
uint32_t cp_sealed_payload_crc(const uint8_t *payload, size_t len);

#endif /* CONFPLAN_PAGECORE_INT_H */
