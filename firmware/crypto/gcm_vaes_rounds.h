/* A chunk's AES rounds, for either VAES width: included by gcm_vaes.c and gcm_vaes512.c after each defined
 * CP_VAES_TARGET, VREGS, struct vkeys (rk[15]), aes_begin, its vector type as `vec` and its VAESENC as
 * vec_aesenc. */
#ifndef CP_GCM_VAES_ROUNDS_H
#define CP_GCM_VAES_ROUNDS_H

/* One middle round on every register of the chunk. */
CP_VAES_TARGET static inline void aes_round(const struct vkeys *k, vec b[VREGS], int r)
{
#pragma GCC unroll 8
    for (int i = 0; i < VREGS; i++)
        b[i] = vec_aesenc(b[i], k->rk[r]);
}

/* 16 counter blocks through rounds 0..13 (the last round is the caller's, fused with its xor). */
CP_VAES_TARGET static inline void aes_rounds(struct vkeys *k, vec b[VREGS])
{
    aes_begin(k, b);
#pragma GCC unroll 13
    for (int r = 1; r < 14; r++)
        aes_round(k, b, r);
}

#endif /* CP_GCM_VAES_ROUNDS_H */
