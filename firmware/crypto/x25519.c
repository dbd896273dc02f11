/*
 * X25519 (RFC 7748, section 5) for the firmware: the Montgomery ladder over GF(p), p = 2^255 - 19.
 *
 * Field elements are 5 limbs of 51 bits (value = sum limb[i] * 2^(51 i)), multiplied through unsigned
 * __int128 (x86-64 `mul`, no library call). Constant time: the ladder runs the same 255 steps for every
 * scalar, the scalar's bits only ever become a 0/all-ones mask for the conditional swap (no branch and no
 * memory index depends on a secret), the inversion's exponent p - 2 is public, and the final reduction is
 * arithmetic (a carry out of "value + 19", not a comparison). docs/crypto.md has the bounds argument.
 */
#include "cp_kx.h"

typedef unsigned __int128 u128;
typedef uint64_t fe[5];

#define MASK51 ((1ull << 51) - 1)

static void wipe(void *dst, size_t n)
{
    volatile uint8_t *p = (volatile uint8_t *)dst;
    for (size_t i = 0; i < n; i++)
        p[i] = 0;
}

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void store_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static void fe_copy(fe r, const fe a)
{
    for (int i = 0; i < 5; i++)
        r[i] = a[i];
}

static void fe_set(fe r, uint64_t v)
{
    r[0] = v;
    for (int i = 1; i < 5; i++)
        r[i] = 0;
}

/* The low 255 bits of 32 little-endian bytes (RFC 7748: the top bit of u is ignored). A u in [p, 2^255)
 * stays as it is: the arithmetic below works modulo p, so it is the same as u - p. */
static void fe_frombytes(fe r, const uint8_t s[32])
{
    r[0] = load_le64(s) & MASK51;
    r[1] = load_le64(s + 6) >> 3 & MASK51;
    r[2] = load_le64(s + 12) >> 6 & MASK51;
    r[3] = load_le64(s + 19) >> 1 & MASK51;
    r[4] = load_le64(s + 24) >> 12 & MASK51;
}

/* Carries 5 wide limbs down to 51 bits each (2^255 = 19 mod p folds the top carry into limb 0). Output:
 * limbs < 2^51, except limb 1 < 2^51 + 2^18. */
static void fe_carry_wide(fe r, u128 t[5])
{
    for (int i = 0; i < 4; i++) {
        t[i + 1] += t[i] >> 51;
        t[i] &= MASK51;
    }
    t[0] += (t[4] >> 51) * 19;
    t[4] &= MASK51;
    t[1] += t[0] >> 51;
    t[0] &= MASK51;
    for (int i = 0; i < 5; i++)
        r[i] = (uint64_t)t[i];
}

/* r = a * b. Inputs: limbs < 2^54 (every caller's are: see docs/crypto.md). */
static void fe_mul(fe r, const fe a, const fe b)
{
    uint64_t b19[5];
    for (int i = 1; i < 5; i++)
        b19[i] = b[i] * 19; /* < 2^59 */
    u128 t[5];
    t[0] = (u128)a[0] * b[0] + (u128)a[1] * b19[4] + (u128)a[2] * b19[3] + (u128)a[3] * b19[2] +
           (u128)a[4] * b19[1];
    t[1] = (u128)a[0] * b[1] + (u128)a[1] * b[0] + (u128)a[2] * b19[4] + (u128)a[3] * b19[3] +
           (u128)a[4] * b19[2];
    t[2] = (u128)a[0] * b[2] + (u128)a[1] * b[1] + (u128)a[2] * b[0] + (u128)a[3] * b19[4] +
           (u128)a[4] * b19[3];
    t[3] = (u128)a[0] * b[3] + (u128)a[1] * b[2] + (u128)a[2] * b[1] + (u128)a[3] * b[0] +
           (u128)a[4] * b19[4];
    t[4] = (u128)a[0] * b[4] + (u128)a[1] * b[3] + (u128)a[2] * b[2] + (u128)a[3] * b[1] +
           (u128)a[4] * b[0];
    fe_carry_wide(r, t);
}

/* r = a * 121665 (a24 of curve25519, RFC 7748). Input limbs < 2^54. */
static void fe_mul_a24(fe r, const fe a)
{
    u128 t[5];
    for (int i = 0; i < 5; i++)
        t[i] = (u128)a[i] * 121665u;
    fe_carry_wide(r, t);
}

static void fe_add(fe r, const fe a, const fe b)
{
    for (int i = 0; i < 5; i++)
        r[i] = a[i] + b[i];
}

/* r = a - b + 2p, so no limb goes negative: b's limbs must be below 2p's (2^52 - 38, 2^52 - 2), which
 * holds for every fe_mul / fe_mul_a24 output. */
static void fe_sub(fe r, const fe a, const fe b)
{
    r[0] = a[0] + 0xFFFFFFFFFFFDAull - b[0];
    for (int i = 1; i < 5; i++)
        r[i] = a[i] + 0xFFFFFFFFFFFFEull - b[i];
}

/* Swaps a and b when bit is 1, without a branch: bit becomes a 0 / all-ones mask. */
static void fe_cswap(fe a, fe b, uint64_t bit)
{
    uint64_t mask = 0 - bit;
    __asm__("" : "+r"(mask)); /* the compiler must not turn the mask back into a branch on bit */
    for (int i = 0; i < 5; i++) {
        uint64_t x = mask & (a[i] ^ b[i]);
        a[i] ^= x;
        b[i] ^= x;
    }
}

/* r = z^(p - 2) = 1/z (0 for z = 0). Square-and-multiply over the public exponent 2^255 - 21. */
static void fe_invert(fe r, const fe z)
{
    fe acc;
    fe_set(acc, 1);
    for (int bit = 254; bit >= 0; bit--) {
        fe_mul(acc, acc, acc);
        /* p - 2 = 2^255 - 21: every bit of 254..5 is 1; of bits 4..0 (01011), 0, 1 and 3 are */
        if (bit >= 5 || bit == 3 || bit == 1 || bit == 0)
            fe_mul(acc, acc, z);
    }
    fe_copy(r, acc);
    wipe(acc, sizeof(acc));
}

/* The canonical 32-byte encoding (value mod p, in [0, p)). Input limbs < 2^54. */
static void fe_tobytes(uint8_t s[32], const fe a)
{
    fe h;
    fe_copy(h, a);
    /* Two carry passes: after the first, only limb 0 can exceed 51 bits (by the 19 x carry folded in);
     * the second leaves every limb below 2^51, so the value is below 2^255. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < 4; i++) {
            h[i + 1] += h[i] >> 51;
            h[i] &= MASK51;
        }
        h[0] += 19 * (h[4] >> 51);
        h[4] &= MASK51;
    }
    /* q = 1 iff value >= p, i.e. value + 19 carries out of bit 255 */
    uint64_t q = (h[0] + 19) >> 51;
    for (int i = 1; i < 5; i++)
        q = (h[i] + q) >> 51;
    h[0] += 19 * q;
    for (int i = 0; i < 4; i++) {
        h[i + 1] += h[i] >> 51;
        h[i] &= MASK51;
    }
    h[4] &= MASK51; /* drop the 2^255 that "+ 19" carried into: value - p */
    store_le64(s, h[0] | h[1] << 51);
    store_le64(s + 8, h[1] >> 13 | h[2] << 38);
    store_le64(s + 16, h[2] >> 26 | h[3] << 25);
    store_le64(s + 24, h[3] >> 39 | h[4] << 12);
    wipe(h, sizeof(h));
}

int cp_x25519_is_zero(const uint8_t v[CP_X25519_BYTES])
{
    uint32_t acc = 0;
    for (unsigned i = 0; i < CP_X25519_BYTES; i++)
        acc |= v[i];
    return (int)((acc - 1) >> 31); /* acc is 0..255: only acc == 0 wraps to the top bit */
}

/* The RFC's ladder; x1 = u(point), the result is x2/z2. */
static void ladder(fe x2, fe z2, const uint8_t k[32], const fe x1)
{
    fe x3, z3, a, aa, b, bb, e, c, d, da, cb;
    uint64_t swap = 0;
    fe_set(x2, 1);
    fe_set(z2, 0);
    fe_copy(x3, x1);
    fe_set(z3, 1);
    for (int t = 254; t >= 0; t--) {
        uint64_t bit = (uint64_t)(k[t >> 3] >> (t & 7)) & 1u; /* index from the public counter */
        swap ^= bit;
        fe_cswap(x2, x3, swap);
        fe_cswap(z2, z3, swap);
        swap = bit;
        fe_add(a, x2, z2);
        fe_mul(aa, a, a);
        fe_sub(b, x2, z2);
        fe_mul(bb, b, b);
        fe_sub(e, aa, bb);
        fe_add(c, x3, z3);
        fe_sub(d, x3, z3);
        fe_mul(da, d, a);
        fe_mul(cb, c, b);
        fe_add(x3, da, cb);
        fe_mul(x3, x3, x3);
        fe_sub(z3, da, cb);
        fe_mul(z3, z3, z3);
        fe_mul(z3, z3, x1);
        fe_mul(x2, aa, bb);
        fe_mul_a24(z2, e);
        fe_add(z2, z2, aa);
        fe_mul(z2, z2, e);
    }
    fe_cswap(x2, x3, swap);
    fe_cswap(z2, z3, swap);
    wipe(x3, sizeof(x3));
    wipe(z3, sizeof(z3));
    wipe(a, sizeof(a));
    wipe(aa, sizeof(aa));
    wipe(b, sizeof(b));
    wipe(bb, sizeof(bb));
    wipe(e, sizeof(e));
    wipe(c, sizeof(c));
    wipe(d, sizeof(d));
    wipe(da, sizeof(da));
    wipe(cb, sizeof(cb));
}

int cp_x25519(uint8_t out[CP_X25519_BYTES], const uint8_t scalar[CP_X25519_BYTES],
              const uint8_t point[CP_X25519_BYTES])
{
    uint8_t k[32];
    fe x1, x2, z2;
    for (int i = 0; i < 32; i++)
        k[i] = scalar[i];
    k[0] &= 248; /* clamp (RFC 7748, decodeScalar25519) */
    k[31] &= 127;
    k[31] |= 64;
    fe_frombytes(x1, point);
    ladder(x2, z2, k, x1);
    fe_invert(z2, z2);
    fe_mul(x2, x2, z2);
    fe_tobytes(out, x2);
    wipe(k, sizeof(k));
    wipe(x2, sizeof(x2));
    wipe(z2, sizeof(z2));
    return cp_x25519_is_zero(out) ? -1 : 0;
}

void cp_x25519_base(uint8_t out[CP_X25519_BYTES], const uint8_t scalar[CP_X25519_BYTES])
{
    static const uint8_t nine[32] = {9};
    (void)cp_x25519(out, scalar, nine); /* 9 generates the prime-order subgroup: never zero */
}
