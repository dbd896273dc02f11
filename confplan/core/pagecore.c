/*
 * confplan page-transfer core. See pagecore.h for the contract and docs/wire.md for the byte layout.
 *
 * Portable C11 that gcc vectorises, plus an SSE4.2 CRC-32C path compiled with a per-function target
 * attribute and chosen at load time (so the library needs no -msse4.2 and still runs on any x86-64).
 */
#include "pagecore.h"
#include "pagecore_int.h"

#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__)
#include <emmintrin.h> /* SSE2 is part of x86-64: streaming stores need no runtime check */
#include <nmmintrin.h> /* SSE4.2 crc32: used only behind a runtime check */
#define CP_HAVE_X86 1
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the wire format is little-endian and this core writes native structs: port the loads and stores"
#endif

_Static_assert(sizeof(struct cp_frame_header) == CP_HEADER_SIZE, "frame header is 32 bytes");
_Static_assert(offsetof(struct cp_frame_header, header_crc32c) == 28, "header CRC is the last field");
_Static_assert(CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE +
                   (uint64_t)CP_MAX_FRAME_PAGES * (CP_SHARED_ENTRY_SIZE + CP_PAGE_SIZE) <= CP_MAX_PAYLOAD,
               "a full SHARED_PAGES frame fits the payload limit");
_Static_assert(CP_PAGES_PREFIX_SIZE + (uint64_t)CP_MAX_FRAME_PAGES * CP_SEALED_PAGE_SIZE <= CP_MAX_PAYLOAD,
               "a full SEALED_PAGES frame fits the payload limit");

#define HEADER_CRC_SPAN 28u
#define NO_INDEX UINT32_MAX

/* ------------------------------------------------------------------------------------------------ */
/* Unaligned little-endian loads and stores: frames and bitmaps come from Python buffers of any alignment. */

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static int fail(struct cp_error *err, int code, uint32_t index, uint64_t value, uint64_t expected)
{
    if (err) {
        err->code = code;
        err->index = index;
        err->value = value;
        err->expected = expected;
    }
    return code;
}

static void clear_error(struct cp_error *err)
{
    if (err)
        memset(err, 0, sizeof(*err));
}

/* ------------------------------------------------------------------------------------------------ */
/* CRC-32C. The register form (no pre/post inversion) is linear, which the 3-way hardware path relies on. */

#define CRC32C_POLY 0x82f63b78u  /* reflected Castagnoli polynomial */
#define CRC_LONG 2048u           /* bytes per stream in a 3-stream block */
#define CRC_SHORT 256u

static uint32_t sw_table[8][256];       /* slice-by-8 */
static uint32_t shift_long[4][256];     /* register advanced over CRC_LONG zero bytes */
static uint32_t shift_short[4][256];
static bool crc_hw;       /* use the SSE4.2 path */
static bool crc_hw_cpu;   /* the CPU has SSE4.2 */

static uint32_t reg_over_zeros(uint32_t reg, size_t nbytes)
{
    for (size_t i = 0; i < nbytes; i++)
        reg = sw_table[0][reg & 0xff] ^ (reg >> 8);
    return reg;
}

/* The zeros operator is linear: build it from its images of the 32 basis vectors. */
static void build_shift_table(uint32_t table[4][256], size_t nbytes)
{
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++)
        basis[bit] = reg_over_zeros(1u << bit, nbytes);
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int bit = 0; bit < 8; bit++)
                if (b & (1u << bit))
                    v ^= basis[8 * k + bit];
            table[k][b] = v;
        }
    }
}

static inline uint32_t shift(const uint32_t table[4][256], uint32_t reg)
{
    return table[0][reg & 0xff] ^ table[1][(reg >> 8) & 0xff] ^ table[2][(reg >> 16) & 0xff] ^
           table[3][reg >> 24];
}

__attribute__((constructor)) static void cp_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        sw_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            sw_table[k][n] = (sw_table[k - 1][n] >> 8) ^ sw_table[0][sw_table[k - 1][n] & 0xff];
    build_shift_table(shift_long, CRC_LONG);
    build_shift_table(shift_short, CRC_SHORT);
#ifdef CP_HAVE_X86
    __builtin_cpu_init();
    crc_hw_cpu = __builtin_cpu_supports("sse4.2");
    crc_hw = crc_hw_cpu;
#endif
}

static uint32_t crc_sw(uint32_t reg, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint64_t w = ld64(p) ^ reg;
        reg = sw_table[7][w & 0xff] ^ sw_table[6][(w >> 8) & 0xff] ^ sw_table[5][(w >> 16) & 0xff] ^
              sw_table[4][(w >> 24) & 0xff] ^ sw_table[3][(w >> 32) & 0xff] ^ sw_table[2][(w >> 40) & 0xff] ^
              sw_table[1][(w >> 48) & 0xff] ^ sw_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        reg = sw_table[0][(reg ^ *p++) & 0xff] ^ (reg >> 8);
    return reg;
}

#ifdef CP_HAVE_X86
/* Three independent crc32 chains hide the instruction's 3-cycle latency; the shift tables join them. */
#define CRC_3WAY(BLK, TABLE)                                                          \
    while (len >= 3 * (BLK)) {                                                        \
        uint64_t c1 = 0, c2 = 0;                                                      \
        const uint8_t *end = p + (BLK);                                               \
        do {                                                                          \
            c0 = _mm_crc32_u64(c0, ld64(p));                                          \
            c1 = _mm_crc32_u64(c1, ld64(p + (BLK)));                                  \
            c2 = _mm_crc32_u64(c2, ld64(p + 2 * (BLK)));                              \
            p += 8;                                                                   \
        } while (p < end);                                                            \
        c0 = shift(TABLE, (uint32_t)c0) ^ (uint32_t)c1;                               \
        c0 = shift(TABLE, (uint32_t)c0) ^ (uint32_t)c2;                               \
        p += 2 * (BLK);                                                               \
        len -= 3 * (BLK);                                                             \
    }

__attribute__((target("sse4.2"))) static uint32_t crc_x86(uint32_t reg, const uint8_t *p, size_t len)
{
    uint64_t c0 = reg;
    CRC_3WAY(CRC_LONG, shift_long)
    CRC_3WAY(CRC_SHORT, shift_short)
    while (len >= 8) {
        c0 = _mm_crc32_u64(c0, ld64(p));
        p += 8;
        len -= 8;
    }
    while (len--)
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return (uint32_t)c0;
}
#endif

/* The CRC register (no pre/post inversion) advanced over len bytes. */
static uint32_t crc_reg(uint32_t reg, const uint8_t *p, size_t len)
{
#ifdef CP_HAVE_X86
    if (crc_hw)
        return crc_x86(reg, p, len);
#endif
    return crc_sw(reg, p, len);
}

/* Copy a page and advance the CRC register over the copy while it is still in L1: guest RAM is read once.
 * (Measured on this machine: ~30% faster than a fused 3-stream load/crc32/store loop.) */
static uint32_t crc_copy_page(uint32_t reg, uint8_t *dst, const uint8_t *src)
{
    memcpy(dst, src, CP_PAGE_SIZE);
    return crc_reg(reg, dst, CP_PAGE_SIZE);
}

uint32_t cp_crc32c(uint32_t crc, const void *buf, size_t len)
{
    return ~crc_reg(~crc, buf, len);
}

int cp_crc32c_select(int want_hw)
{
    crc_hw = want_hw && crc_hw_cpu;
    return crc_hw;
}

/* ------------------------------------------------------------------------------------------------ */

int cp_abi_version(void) { return CP_ABI_VERSION; }

uint64_t cp_query(int which)
{
    switch (which) {
    case CP_Q_MAGIC: return CP_WIRE_MAGIC;
    case CP_Q_WIRE_VERSION: return CP_WIRE_VERSION;
    case CP_Q_HEADER_SIZE: return CP_HEADER_SIZE;
    case CP_Q_MAX_PAYLOAD: return CP_MAX_PAYLOAD;
    case CP_Q_MAX_FRAME_PAGES: return CP_MAX_FRAME_PAGES;
    case CP_Q_SEALED_PAGE_SIZE: return CP_SEALED_PAGE_SIZE;
    case CP_Q_CRC_HW: return crc_hw;
    case CP_Q_TAG_SIZE: return CP_TAG_SIZE;
    default: return 0;
    }
}

/* Word-wise OR in 256-byte chunks: vectorised, and a non-zero page usually exits in the first chunk. */
int cp_page_is_zero(const void *page)
{
    const uint8_t *p = page;
    for (size_t off = 0; off < CP_PAGE_SIZE; off += 256) {
        uint64_t acc = 0;
        for (size_t i = 0; i < 256; i += 8)
            acc |= ld64(p + off + i);
        if (acc)
            return 0;
    }
    return 1;
}

/* Target-side page stores bypass the cache: migrated pages are not read soon, and streaming stores skip the
 * read-for-ownership of every destination line (the same reason memmove streams large copies). */
static void store_page(uint8_t *dst, const uint8_t *src)
{
#ifdef CP_HAVE_X86
    if (((uintptr_t)dst & 15) == 0) {
        for (size_t i = 0; i < CP_PAGE_SIZE; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 48));
            _mm_stream_si128((__m128i *)(void *)(dst + i), a);
            _mm_stream_si128((__m128i *)(void *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(void *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(void *)(dst + i + 48), d);
        }
        return;
    }
#endif
    memcpy(dst, src, CP_PAGE_SIZE);
}

static void clear_page(uint8_t *dst)
{
#ifdef CP_HAVE_X86
    if (((uintptr_t)dst & 15) == 0) {
        __m128i z = _mm_setzero_si128();
        for (size_t i = 0; i < CP_PAGE_SIZE; i += 16)
            _mm_stream_si128((__m128i *)(void *)(dst + i), z);
        return;
    }
#endif
    memset(dst, 0, CP_PAGE_SIZE);
}

/* Streaming stores are weakly ordered: fence before the caller may hand the pages to anyone else. */
static void stores_done(void)
{
#ifdef CP_HAVE_X86
    _mm_sfence();
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Bitmap scan: bit i of little-endian u64 word i/64 is page i; set in `shared` = the page is shared. */

static bool scan_args_ok(const void *dirty, uint64_t npages, uint64_t gpa_base)
{
    if (!dirty || gpa_base % CP_PAGE_SIZE)
        return false;
    /* the last GPA must fit in 64 bits */
    return npages <= (UINT64_MAX - gpa_base) / CP_PAGE_SIZE;
}

static inline uint64_t word_mask(uint64_t w, uint64_t nwords, uint64_t npages)
{
    uint64_t rem = npages % 64;
    return (w == nwords - 1 && rem) ? ((1ull << rem) - 1) : ~0ull;
}

int cp_scan_count(const void *dirty, const void *shared, uint64_t npages, uint64_t *n_shared,
                  uint64_t *n_private)
{
    if (!scan_args_ok(dirty, npages, 0) || !n_shared || !n_private)
        return CP_E_ARG;
    const uint8_t *d = dirty, *s = shared;
    uint64_t nwords = (npages + 63) / 64, ns = 0, np = 0;
    for (uint64_t w = 0; w < nwords; w++) {
        uint64_t dw = ld64(d + 8 * w) & word_mask(w, nwords, npages);
        uint64_t sw = s ? ld64(s + 8 * w) : 0;
        ns += (uint64_t)__builtin_popcountll(dw & sw);
        np += (uint64_t)__builtin_popcountll(dw & ~sw);
    }
    *n_shared = ns;
    *n_private = np;
    return CP_OK;
}

static int emit_bits(uint64_t bits, uint64_t first_gpa, uint64_t *out, uint64_t cap, uint64_t *n,
                     struct cp_error *err)
{
    while (bits) {
        if (*n >= cap)
            return fail(err, CP_E_SPACE, NO_INDEX, *n + 1, cap);
        out[(*n)++] = first_gpa + (uint64_t)__builtin_ctzll(bits) * CP_PAGE_SIZE;
        bits &= bits - 1;
    }
    return CP_OK;
}

int cp_scan(const void *dirty, const void *shared, uint64_t npages, uint64_t gpa_base, uint64_t *shared_out,
            uint64_t shared_cap, uint64_t *private_out, uint64_t private_cap, uint64_t *n_shared,
            uint64_t *n_private, struct cp_error *err)
{
    clear_error(err);
    if (!scan_args_ok(dirty, npages, gpa_base) || !n_shared || !n_private || (shared_cap && !shared_out) ||
        (private_cap && !private_out))
        return fail(err, CP_E_ARG, NO_INDEX, npages, 0);
    const uint8_t *d = dirty, *s = shared;
    uint64_t nwords = (npages + 63) / 64, ns = 0, np = 0;
    for (uint64_t w = 0; w < nwords; w++) {
        uint64_t dw = ld64(d + 8 * w) & word_mask(w, nwords, npages);
        if (!dw)
            continue;
        uint64_t sw = s ? ld64(s + 8 * w) : 0;
        uint64_t first_gpa = gpa_base + w * 64 * CP_PAGE_SIZE;
        int rc = emit_bits(dw & sw, first_gpa, shared_out, shared_cap, &ns, err);
        if (rc == CP_OK)
            rc = emit_bits(dw & ~sw, first_gpa, private_out, private_cap, &np, err);
        if (rc != CP_OK)
            return rc;
    }
    *n_shared = ns;
    *n_private = np;
    return CP_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* Frame header */

/* Write the header of a frame whose payload (already in place) has CRC payload_crc. */
void cp_write_header(uint8_t *h, uint32_t type, uint32_t flags, uint64_t seq, uint32_t payload_len,
                         uint32_t payload_crc)
{
    struct cp_frame_header hdr = {
        .magic = CP_WIRE_MAGIC,
        .version = CP_WIRE_VERSION,
        .type = (uint16_t)type,
        .flags = flags,
        .payload_len = payload_len,
        .seq = seq,
        .payload_crc32c = payload_crc,
    };
    memcpy(h, &hdr, CP_HEADER_SIZE);
    st32(h + HEADER_CRC_SPAN, cp_crc32c(0, h, HEADER_CRC_SPAN));
}

int cp_frame_finish(void *frame, size_t cap, uint32_t type, uint32_t flags, uint64_t seq, uint32_t payload_len,
                    struct cp_error *err)
{
    clear_error(err);
    if (!frame)
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (type == 0 || type > CP_FT_LAST)
        return fail(err, CP_E_TYPE, NO_INDEX, type, CP_FT_LAST);
    if (flags)
        return fail(err, CP_E_FLAGS, NO_INDEX, flags, 0);
    if (payload_len > CP_MAX_PAYLOAD)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, payload_len, CP_MAX_PAYLOAD);
    if (cap < (size_t)CP_HEADER_SIZE + payload_len)
        return fail(err, CP_E_SPACE, NO_INDEX, (uint64_t)CP_HEADER_SIZE + payload_len, cap);
    uint8_t *h = frame;
    uint32_t crc = type == CP_FT_SEALED_PAGES ? cp_sealed_payload_crc(h + CP_HEADER_SIZE, payload_len)
                                              : cp_crc32c(0, h + CP_HEADER_SIZE, payload_len);
    cp_write_header(h, type, flags, seq, payload_len, crc);
    return CP_OK;
}

int cp_header_check(const void *buf, size_t len, struct cp_frame_header *out, struct cp_error *err)
{
    clear_error(err);
    if (!buf || !out)
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (len < CP_HEADER_SIZE)
        return fail(err, CP_E_TRUNCATED, NO_INDEX, len, CP_HEADER_SIZE);
    struct cp_frame_header h;
    memcpy(&h, buf, CP_HEADER_SIZE);
    /* magic and version first: a foreign stream gets the clearest message, not a CRC error */
    if (h.magic != CP_WIRE_MAGIC)
        return fail(err, CP_E_MAGIC, NO_INDEX, h.magic, CP_WIRE_MAGIC);
    if (h.version != CP_WIRE_VERSION)
        return fail(err, CP_E_VERSION, NO_INDEX, h.version, CP_WIRE_VERSION);
    uint32_t crc = cp_crc32c(0, buf, HEADER_CRC_SPAN);
    if (crc != h.header_crc32c)
        return fail(err, CP_E_HEADER_CRC, NO_INDEX, h.header_crc32c, crc);
    if (h.type == 0 || h.type > CP_FT_LAST)
        return fail(err, CP_E_TYPE, NO_INDEX, h.type, CP_FT_LAST);
    if (h.flags & ~CP_HF_PROTECTED)
        return fail(err, CP_E_FLAGS, NO_INDEX, h.flags, CP_HF_PROTECTED);
    if (h.payload_len > CP_MAX_PAYLOAD)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, h.payload_len, CP_MAX_PAYLOAD);
    *out = h;
    return CP_OK;
}

/* A PROTECTED frame has no payload CRC (wire v3): its tag covers the payload, or, for SEALED_PAGES, the
 * prefix and the record headers, and the helper's own tag covers each record's ciphertext. */
static bool crc_free(const struct cp_frame_header *h)
{
    return (h->flags & CP_HF_PROTECTED) != 0;
}

uint32_t cp_sealed_payload_crc(const uint8_t *payload, size_t len)
{
    uint32_t crc = cp_crc32c(0, payload, len < CP_PAGES_PREFIX_SIZE ? len : CP_PAGES_PREFIX_SIZE);
    for (size_t off = CP_PAGES_PREFIX_SIZE; off < len; off += CP_SEALED_PAGE_SIZE)
        crc = cp_crc32c(crc, payload + off, len - off < CP_SEALED_HEADER_SIZE ? len - off : CP_SEALED_HEADER_SIZE);
    return crc;
}

/* The payload CRC of an unprotected frame: of the whole payload, or (SEALED_PAGES, wire v3) of the prefix
 * and each record's 64-byte header (the ciphertexts are the helper's tags' to check). */
static uint32_t payload_crc(const struct cp_frame_header *h, const uint8_t *payload)
{
    return h->type == CP_FT_SEALED_PAGES ? cp_sealed_payload_crc(payload, h->payload_len)
                                         : cp_crc32c(0, payload, h->payload_len);
}

int cp_frame_check(const void *frame, size_t len, struct cp_frame_header *out, struct cp_error *err)
{
    int rc = cp_header_check(frame, len, out, err);
    if (rc != CP_OK)
        return rc;
    uint64_t need = (uint64_t)CP_HEADER_SIZE + out->payload_len;
    if (len < need)
        return fail(err, CP_E_TRUNCATED, NO_INDEX, len, need);
    if (crc_free(out))
        return out->payload_crc32c ? fail(err, CP_E_FLAGS, NO_INDEX, out->payload_crc32c, 0) : CP_OK;
    uint32_t crc = payload_crc(out, (const uint8_t *)frame + CP_HEADER_SIZE);
    if (crc != out->payload_crc32c)
        return fail(err, CP_E_PAYLOAD_CRC, NO_INDEX, out->payload_crc32c, crc);
    return CP_OK;
}

/* A SEALED_PAGES frame's GMAC input: `header` (the one sent), the payload's prefix, each record's header. */
static int gather_sealed_aad(const uint8_t *header, const struct cp_frame_header *h, const uint8_t *payload,
                             uint8_t *aad, size_t cap, uint64_t *aad_len, struct cp_error *err)
{
    if (h->payload_len < CP_PAGES_PREFIX_SIZE)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, h->payload_len, CP_PAGES_PREFIX_SIZE);
    uint32_t count = ld32(payload);
    if (count > CP_MAX_FRAME_PAGES)
        return fail(err, CP_E_COUNT, NO_INDEX, count, CP_MAX_FRAME_PAGES);
    uint64_t want = CP_PAGES_PREFIX_SIZE + (uint64_t)count * CP_SEALED_PAGE_SIZE;
    if (h->payload_len != want)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, h->payload_len, want);
    size_t need = CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE + (size_t)count * CP_SEALED_HEADER_SIZE;
    if (!aad || cap < need)
        return fail(err, CP_E_SPACE, NO_INDEX, need, cap);
    memcpy(aad, header, CP_HEADER_SIZE);
    memcpy(aad + CP_HEADER_SIZE, payload, CP_PAGES_PREFIX_SIZE);
    uint8_t *o = aad + CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    const uint8_t *rec = payload + CP_PAGES_PREFIX_SIZE;
    for (uint32_t i = 0; i < count; i++)
        memcpy(o + (size_t)i * CP_SEALED_HEADER_SIZE, rec + (size_t)i * CP_SEALED_PAGE_SIZE,
               CP_SEALED_HEADER_SIZE);
    *aad_len = need;
    return CP_OK;
}

/* A checked header, and the whole payload is there. */
static int whole_frame(const void *frame, size_t len, struct cp_frame_header *h, struct cp_error *err)
{
    int rc = cp_header_check(frame, len, h, err);
    if (rc != CP_OK)
        return rc;
    uint64_t need = (uint64_t)CP_HEADER_SIZE + h->payload_len;
    return len < need ? fail(err, CP_E_TRUNCATED, NO_INDEX, len, need) : CP_OK;
}

int cp_frame_protect(const void *frame, size_t len, void *out_header, void *aad, size_t aad_cap,
                     uint64_t *aad_len, struct cp_frame_header *out, struct cp_error *err)
{
    struct cp_frame_header h;
    int rc = whole_frame(frame, len, &h, err);
    if (rc == CP_OK && (!out_header || !aad_len || !out))
        rc = fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (rc != CP_OK)
        return rc;
    if (h.flags)
        return fail(err, CP_E_FLAGS, NO_INDEX, h.flags, 0);
    h.flags = CP_HF_PROTECTED;
    cp_write_header(out_header, h.type, h.flags, h.seq, h.payload_len, crc_free(&h) ? 0 : h.payload_crc32c);
    memcpy(out, out_header, CP_HEADER_SIZE);
    *aad_len = 0;
    if (h.type != CP_FT_SEALED_PAGES)
        return CP_OK;
    return gather_sealed_aad(out_header, &h, (const uint8_t *)frame + CP_HEADER_SIZE, aad, aad_cap, aad_len,
                             err);
}

int cp_frame_aad(const void *frame, size_t len, void *aad, size_t aad_cap, uint64_t *aad_len,
                 struct cp_error *err)
{
    struct cp_frame_header h;
    int rc = whole_frame(frame, len, &h, err);
    if (rc == CP_OK && !aad_len)
        rc = fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (rc != CP_OK)
        return rc;
    if (h.type != CP_FT_SEALED_PAGES)
        return fail(err, CP_E_TYPE, NO_INDEX, h.type, CP_FT_SEALED_PAGES);
    return gather_sealed_aad(frame, &h, (const uint8_t *)frame + CP_HEADER_SIZE, aad, aad_cap, aad_len, err);
}

/* A checked frame of the expected type: its payload and the {count, reserved} prefix. */
static int open_pages_frame(const void *frame, size_t len, uint32_t type, const uint8_t **payload,
                            uint32_t *payload_len, uint32_t *count, struct cp_frame_info *info,
                            struct cp_error *err)
{
    struct cp_frame_header h;
    /* the type first: the payload CRC's span depends on it (wire v3) */
    int rc = cp_header_check(frame, len, &h, err);
    if (rc == CP_OK && h.type != type)
        rc = fail(err, CP_E_TYPE, NO_INDEX, h.type, type);
    if (rc == CP_OK)
        rc = cp_frame_check(frame, len, &h, err);
    if (rc != CP_OK)
        return rc;
    if (h.payload_len < CP_PAGES_PREFIX_SIZE)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, h.payload_len, CP_PAGES_PREFIX_SIZE);
    *payload = (const uint8_t *)frame + CP_HEADER_SIZE;
    *payload_len = h.payload_len;
    *count = ld32(*payload);
    if (*count > CP_MAX_FRAME_PAGES)
        return fail(err, CP_E_COUNT, NO_INDEX, *count, CP_MAX_FRAME_PAGES);
    if (ld32(*payload + 4))
        return fail(err, CP_E_FLAGS, NO_INDEX, ld32(*payload + 4), 0);
    memset(info, 0, sizeof(*info));
    info->seq = h.seq;
    info->type = h.type;
    info->count = *count;
    info->frame_len = (uint64_t)CP_HEADER_SIZE + h.payload_len;
    return CP_OK;
}

/* A GPA is usable when page-aligned, its whole page lies in [gpa_base, gpa_base + ram_size) and it is
 * not in the guest's RAM hole under 4 GiB (guest ABI v8: no RAM there, and the VMM maps it PROT_NONE, so
 * a forged GPA there must be refused, not followed): the one GPA bounds check of the core (the data loops
 * in datapath.c use it too). */
int cp_check_gpa(uint64_t gpa, uint64_t gpa_base, uint64_t ram_size, uint32_t index, struct cp_error *err)
{
    if (gpa % CP_PAGE_SIZE)
        return fail(err, CP_E_GPA_ALIGN, index, gpa, CP_PAGE_SIZE);
    if (gpa < gpa_base || gpa - gpa_base >= ram_size)
        return fail(err, CP_E_GPA_RANGE, index, gpa, gpa_base + ram_size);
    if (gpa >= CP_RAM_HOLE_START && gpa < CP_RAM_HOLE_END)
        return fail(err, CP_E_GPA_RANGE, index, gpa, CP_RAM_HOLE_START);
    return CP_OK;
}

static bool ram_args_ok(uint64_t gpa_base, uint64_t ram_size)
{
    return gpa_base % CP_PAGE_SIZE == 0 && ram_size % CP_PAGE_SIZE == 0 && ram_size <= UINT64_MAX - gpa_base;
}

/* ------------------------------------------------------------------------------------------------ */
/* SHARED_PAGES */

int cp_frame_shared(void *out, size_t cap, const void *ram, uint64_t gpa_base, uint64_t ram_size,
                    const void *gpas, uint32_t count, uint64_t seq, struct cp_frame_info *info,
                    struct cp_error *err)
{
    clear_error(err);
    if (!out || !ram || !info || (count && !gpas) || !ram_args_ok(gpa_base, ram_size))
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (count > CP_MAX_FRAME_PAGES)
        return fail(err, CP_E_COUNT, NO_INDEX, count, CP_MAX_FRAME_PAGES);
    size_t need = CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    if (cap < need)
        return fail(err, CP_E_SPACE, NO_INDEX, need, cap);
    uint8_t *o = out;
    const uint8_t *r = ram;
    size_t pos = need;
    uint32_t zeros = 0;
    st32(o + CP_HEADER_SIZE, count);
    st32(o + CP_HEADER_SIZE + 4, 0);
    /* the payload CRC is built while the pages are copied: guest RAM is read once */
    uint32_t reg = crc_reg(~0u, o + CP_HEADER_SIZE, CP_PAGES_PREFIX_SIZE);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t gpa = ld64((const uint8_t *)gpas + 8 * (size_t)i);
        int rc = cp_check_gpa(gpa, gpa_base, ram_size, i, err);
        if (rc != CP_OK)
            return rc;
        const uint8_t *page = r + (gpa - gpa_base);
        bool zero = cp_page_is_zero(page);
        size_t entry = CP_SHARED_ENTRY_SIZE + (zero ? 0 : CP_PAGE_SIZE);
        if (cap - pos < entry)
            return fail(err, CP_E_SPACE, i, pos + entry, cap);
        st64(o + pos, gpa);
        st32(o + pos + 8, zero ? CP_PAGE_ZERO : 0);
        st32(o + pos + 12, 0);
        reg = crc_reg(reg, o + pos, CP_SHARED_ENTRY_SIZE);
        if (!zero)
            reg = crc_copy_page(reg, o + pos + CP_SHARED_ENTRY_SIZE, page);
        zeros += zero;
        pos += entry;
    }
    cp_write_header(o, CP_FT_SHARED_PAGES, 0, seq, (uint32_t)(pos - CP_HEADER_SIZE), ~reg);
    memset(info, 0, sizeof(*info));
    info->seq = seq;
    info->type = CP_FT_SHARED_PAGES;
    info->count = count;
    info->zero_pages = zeros;
    info->frame_len = pos;
    return CP_OK;
}

/* The shared-page CRC table of verify (confplan/migration/verify.py SharedTable), one pass in C so the pause
 * does not walk the shared pages in Python: for each GPA, its page's CRC-32C comes from crcs[page] when
 * valid[page], else it is computed from guest RAM and stored (valid set). *crc continues over the page CRCs
 * (u32 LE) in list order; *computed counts the pages computed. Both tables hold table_pages entries. */
int cp_crc_table(const void *ram, uint64_t gpa_base, uint64_t ram_size, const void *gpas, uint64_t count,
                 uint32_t *crcs, uint8_t *valid, uint64_t table_pages, uint32_t *crc, uint64_t *computed,
                 struct cp_error *err)
{
    clear_error(err);
    if (!ram || !crcs || !valid || !crc || !computed || (count && !gpas) || !ram_args_ok(gpa_base, ram_size))
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (table_pages < ram_size / CP_PAGE_SIZE)
        return fail(err, CP_E_SPACE, NO_INDEX, ram_size / CP_PAGE_SIZE, table_pages);
    const uint8_t *r = ram;
    uint32_t reg = ~*crc;
    uint64_t done = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t gpa = ld64((const uint8_t *)gpas + 8 * (size_t)i);
        int rc = cp_check_gpa(gpa, gpa_base, ram_size, (uint32_t)i, err);
        if (rc != CP_OK)
            return rc;
        uint64_t page = (gpa - gpa_base) / CP_PAGE_SIZE;
        if (!valid[page]) {
            crcs[page] = cp_crc32c(0, r + (gpa - gpa_base), CP_PAGE_SIZE);
            valid[page] = 1;
            done++;
        }
        uint8_t le[4];
        st32(le, crcs[page]);
        reg = crc_reg(reg, le, sizeof(le));
    }
    *crc = ~reg;
    *computed = done;
    return CP_OK;
}

/* The CRC table's forget, in C: a pause may forget thousands of pages, a Python loop held the GIL ~0.7 ms
 * per 5000. All GPAs are checked before any entry changes. */
int cp_forget_pages(const void *gpas, uint64_t count, uint64_t gpa_base, uint8_t *valid, uint64_t table_pages,
                    struct cp_error *err)
{
    clear_error(err);
    if (!valid || (count && !gpas) || table_pages > UINT64_MAX / CP_PAGE_SIZE)
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    for (uint64_t i = 0; i < count; i++) {
        uint64_t gpa = ld64((const uint8_t *)gpas + 8 * (size_t)i);
        int rc = cp_check_gpa(gpa, gpa_base, table_pages * CP_PAGE_SIZE, (uint32_t)i, err);
        if (rc != CP_OK)
            return rc;
    }
    for (uint64_t i = 0; i < count; i++)
        valid[(ld64((const uint8_t *)gpas + 8 * (size_t)i) - gpa_base) / CP_PAGE_SIZE] = 0;
    return CP_OK;
}

/* Pass 1 of unframe: every entry well-formed and in range, and the entries fill the payload exactly. */
static int check_shared_entries(const uint8_t *payload, uint32_t payload_len, uint32_t count,
                                uint64_t gpa_base, uint64_t ram_size, uint32_t *zeros, struct cp_error *err)
{
    size_t pos = CP_PAGES_PREFIX_SIZE;
    *zeros = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (payload_len - pos < CP_SHARED_ENTRY_SIZE)
            return fail(err, CP_E_PAYLOAD_LEN, i, payload_len, pos + CP_SHARED_ENTRY_SIZE);
        uint64_t gpa = ld64(payload + pos);
        uint32_t flags = ld32(payload + pos + 8);
        if ((flags & ~CP_PAGE_ZERO) || ld32(payload + pos + 12))
            return fail(err, CP_E_FLAGS, i, flags, CP_PAGE_ZERO);
        int rc = cp_check_gpa(gpa, gpa_base, ram_size, i, err);
        if (rc != CP_OK)
            return rc;
        size_t entry = CP_SHARED_ENTRY_SIZE + ((flags & CP_PAGE_ZERO) ? 0 : CP_PAGE_SIZE);
        if (payload_len - pos < entry)
            return fail(err, CP_E_PAYLOAD_LEN, i, payload_len, pos + entry);
        *zeros += (flags & CP_PAGE_ZERO) != 0;
        pos += entry;
    }
    if (pos != payload_len)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, payload_len, pos);
    return CP_OK;
}

int cp_unframe_shared(const void *frame, size_t len, void *ram, uint64_t gpa_base, uint64_t ram_size,
                      void *gpas_out, uint32_t gpas_cap, struct cp_frame_info *info, struct cp_error *err)
{
    clear_error(err);
    if (!frame || !ram || !info || (gpas_cap && !gpas_out) || !ram_args_ok(gpa_base, ram_size))
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    const uint8_t *payload;
    uint32_t payload_len, count, zeros;
    int rc = open_pages_frame(frame, len, CP_FT_SHARED_PAGES, &payload, &payload_len, &count, info, err);
    if (rc == CP_OK)
        rc = check_shared_entries(payload, payload_len, count, gpa_base, ram_size, &zeros, err);
    if (rc != CP_OK)
        return rc;
    if (gpas_out && gpas_cap < count)
        return fail(err, CP_E_SPACE, NO_INDEX, count, gpas_cap);
    uint8_t *r = ram;
    size_t pos = CP_PAGES_PREFIX_SIZE;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t gpa = ld64(payload + pos);
        uint8_t *page = r + (gpa - gpa_base);
        /* a zero page must overwrite what an earlier round put there */
        if (ld32(payload + pos + 8) & CP_PAGE_ZERO) {
            clear_page(page);
            pos += CP_SHARED_ENTRY_SIZE;
        } else {
            store_page(page, payload + pos + CP_SHARED_ENTRY_SIZE);
            pos += CP_SHARED_ENTRY_SIZE + CP_PAGE_SIZE;
        }
        if (gpas_out)
            st64((uint8_t *)gpas_out + 8 * (size_t)i, gpa);
    }
    stores_done();
    info->zero_pages = zeros;
    return CP_OK;
}

/* ------------------------------------------------------------------------------------------------ */
/* SEALED_PAGES */

static int check_sealed_records(const uint8_t *recs, uint32_t count, const void *expected_gpas,
                                uint64_t gpa_base, uint64_t ram_size, struct cp_error *err)
{
    static const uint8_t zeros[16];
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *rec = recs + (size_t)i * CP_SEALED_PAGE_SIZE;
        uint64_t gpa = ld64(rec + offsetof(struct cp_sealed_page, gpa));
        uint32_t status = ld32(rec + offsetof(struct cp_sealed_page, status));
        if (status != CP_SEAL_OK)
            return fail(err, CP_E_SEAL_STATUS, i, status, CP_SEAL_OK);
        if (memcmp(rec + offsetof(struct cp_sealed_page, reserved), zeros, sizeof(zeros)))
            return fail(err, CP_E_FLAGS, i, 0, 0);
        int rc = cp_check_gpa(gpa, gpa_base, ram_size, i, err);
        if (rc != CP_OK)
            return rc;
        uint64_t want = expected_gpas ? ld64((const uint8_t *)expected_gpas + 8 * (size_t)i) : gpa;
        if (gpa != want)
            return fail(err, CP_E_GPA_MISMATCH, i, gpa, want);
    }
    return CP_OK;
}

int cp_frame_sealed(void *out, size_t cap, const void *records, uint32_t count, const void *expected_gpas,
                    uint64_t gpa_base, uint64_t ram_size, uint64_t seq, struct cp_frame_info *info,
                    struct cp_error *err)
{
    clear_error(err);
    if (!out || !info || (count && !records) || !ram_args_ok(gpa_base, ram_size))
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    if (count > CP_MAX_FRAME_PAGES)
        return fail(err, CP_E_COUNT, NO_INDEX, count, CP_MAX_FRAME_PAGES);
    size_t body = (size_t)count * CP_SEALED_PAGE_SIZE;
    size_t need = CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE + body;
    if (cap < need)
        return fail(err, CP_E_SPACE, NO_INDEX, need, cap);
    uint8_t *o = out;
    uint8_t *copy = o + CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    st32(o + CP_HEADER_SIZE, count);
    st32(o + CP_HEADER_SIZE + 4, 0);
    if (count)
        memcpy(copy, records, body);
    /* check the copy, never guest memory the guest could change after the check */
    int rc = check_sealed_records(copy, count, expected_gpas, gpa_base, ram_size, err);
    if (rc != CP_OK)
        return rc;
    /* wire v3: the CRC covers the prefix and the record headers, not the ciphertexts */
    uint32_t crc = cp_sealed_payload_crc(o + CP_HEADER_SIZE, need - CP_HEADER_SIZE);
    cp_write_header(o, CP_FT_SEALED_PAGES, 0, seq, (uint32_t)(need - CP_HEADER_SIZE), crc);
    memset(info, 0, sizeof(*info));
    info->seq = seq;
    info->type = CP_FT_SEALED_PAGES;
    info->count = count;
    info->frame_len = need;
    return CP_OK;
}

int cp_unframe_sealed(const void *frame, size_t len, void *records, uint32_t records_cap, uint64_t gpa_base,
                      uint64_t ram_size, void *gpas_out, uint32_t gpas_cap, struct cp_frame_info *info,
                      struct cp_error *err)
{
    clear_error(err);
    if (!frame || !info || (records_cap && !records) || (gpas_cap && !gpas_out) ||
        !ram_args_ok(gpa_base, ram_size))
        return fail(err, CP_E_ARG, NO_INDEX, 0, 0);
    const uint8_t *payload;
    uint32_t payload_len, count;
    int rc = open_pages_frame(frame, len, CP_FT_SEALED_PAGES, &payload, &payload_len, &count, info, err);
    if (rc != CP_OK)
        return rc;
    uint64_t want = CP_PAGES_PREFIX_SIZE + (uint64_t)count * CP_SEALED_PAGE_SIZE;
    if (payload_len != want)
        return fail(err, CP_E_PAYLOAD_LEN, NO_INDEX, payload_len, want);
    const uint8_t *recs = payload + CP_PAGES_PREFIX_SIZE;
    rc = check_sealed_records(recs, count, NULL, gpa_base, ram_size, err);
    if (rc != CP_OK)
        return rc;
    if (records_cap < count)
        return fail(err, CP_E_SPACE, NO_INDEX, count, records_cap);
    if (gpas_out && gpas_cap < count)
        return fail(err, CP_E_SPACE, NO_INDEX, count, gpas_cap);
    if (count)
        memcpy(records, recs, (size_t)count * CP_SEALED_PAGE_SIZE);
    for (uint32_t i = 0; gpas_out && i < count; i++)
        st64((uint8_t *)gpas_out + 8 * (size_t)i, ld64(recs + (size_t)i * CP_SEALED_PAGE_SIZE));
    return CP_OK;
}
