/* The launch-secret page: the efi_secret table walk (same rules as confplan.sev.secret_table). */
#ifndef CP_MH_SECRET_H
#define CP_MH_SECRET_H

#include <stdint.h>

#define CP_MH_KEY_BYTES 32u /* the transport key */
#define CP_MH_ID_BYTES 16u  /* the migration id */

/* Finds the transport key (required) and the migration id (optional; *have_id says) in the table at
 * `table` (`size` readable bytes). Returns a CP_MBS_* (cp_mailbox.h); a malformed table is a status, never a
 * read past `size`. */
uint32_t cp_mh_parse_secret(const uint8_t *table, uint64_t size, uint8_t key[CP_MH_KEY_BYTES],
                            uint8_t id[CP_MH_ID_BYTES], uint32_t *have_id);

#endif /* CP_MH_SECRET_H */
