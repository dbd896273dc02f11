/* The launch-secret page: an efi_secret table (docs/attestation.md). Bounds-checked walk, the same rules as
 * confplan.sev.secret_table.parse_secret_table: a malformed table is a status, never a read past the page. */
#include "bytes.h"
#include "cp_mailbox.h"
#include "secret.h"

#define SECRET_HEADER_LEN 20u
#define SECRET_ENTRY_LEN 20u
#define SECRET_MAX_ENTRIES 64u

/* GUIDs in EFI byte order (uuid.UUID.bytes_le). */
static const uint8_t header_guid[16] = { /* 1e74f542-71dd-4d66-963e-ef4287ff173b */
    0x42, 0xf5, 0x74, 0x1e, 0xdd, 0x71, 0x66, 0x4d, 0x96, 0x3e, 0xef, 0x42, 0x87, 0xff, 0x17, 0x3b};
static const uint8_t key_guid[16] = { /* 6b3f2a9e-51c4-4d7e-9a0b-c2f18e7d4a35: CONFPLAN_TRANSPORT_KEY_GUID */
    0x9e, 0x2a, 0x3f, 0x6b, 0xc4, 0x51, 0x7e, 0x4d, 0x9a, 0x0b, 0xc2, 0xf1, 0x8e, 0x7d, 0x4a, 0x35};
static const uint8_t id_guid[16] = { /* 6b519384-fec4-4e17-9bbd-4fccc92f780f: CONFPLAN_MIGRATION_ID_GUID */
    0x84, 0x93, 0x51, 0x6b, 0xc4, 0xfe, 0x17, 0x4e, 0x9b, 0xbd, 0x4f, 0xcc, 0xc9, 0x2f, 0x78, 0x0f};

static int guid_eq(const uint8_t *a, const uint8_t *b)
{
    uint32_t diff = 0;
    for (int i = 0; i < 16; i++)
        diff |= (uint32_t)(a[i] ^ b[i]);
    return diff == 0;
}

uint32_t cp_mh_parse_secret(const uint8_t *table, uint64_t size, uint8_t key[CP_MH_KEY_BYTES],
                            uint8_t id[CP_MH_ID_BYTES], uint32_t *have_id)
{
    uint32_t have_key = 0;
    *have_id = 0;
    if (table == 0 || size < SECRET_HEADER_LEN || !guid_eq(table, header_guid))
        return CP_MBS_SECRET_HEADER;
    uint64_t total = cp_mh_load_le32(table + 16);
    if (total < SECRET_HEADER_LEN || total > size)
        return CP_MBS_SECRET_LENGTH;
    uint64_t pos = SECRET_HEADER_LEN;
    for (uint32_t n = 0; pos < total; n++) {
        if (n == SECRET_MAX_ENTRIES || pos + SECRET_ENTRY_LEN > total)
            return CP_MBS_SECRET_ENTRY;
        const uint8_t *entry = table + pos;
        uint64_t len = cp_mh_load_le32(entry + 16);
        if (len < SECRET_ENTRY_LEN || len > total - pos)
            return CP_MBS_SECRET_ENTRY;
        uint64_t data_len = len - SECRET_ENTRY_LEN;
        /* A later entry with the same GUID wins, as in the Python parser's dict. */
        if (guid_eq(entry, key_guid)) {
            if (data_len != CP_MH_KEY_BYTES)
                return CP_MBS_SECRET_KEY_LEN;
            cp_mh_copy(key, entry + SECRET_ENTRY_LEN, CP_MH_KEY_BYTES);
            have_key = 1;
        } else if (guid_eq(entry, id_guid)) {
            if (data_len != CP_MH_ID_BYTES)
                return CP_MBS_SECRET_ID_LEN;
            cp_mh_copy(id, entry + SECRET_ENTRY_LEN, CP_MH_ID_BYTES);
            *have_id = 1;
        }
        pos += len;
    }
    return have_key ? CP_MBS_OK : CP_MBS_SECRET_NO_KEY;
}
