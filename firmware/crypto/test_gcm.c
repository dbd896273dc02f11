/*
 * Host test program for cp_gcm (a hosted program: it uses stdio; the code under test does not).
 * Known answers from NIST CAVP gcmEncryptExtIV256.rsp / gcmDecrypt256.rsp (Keylen 256, IVlen 96,
 * Taglen 128), plus one 4 KiB page whose answer came from OpenSSL. Every vector runs through every
 * implementation this CPU can execute. Exits 0 when all checks pass, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cp_gcm_internal.h" /* the implementations' entry points too (run_aesni_passes) */

struct kat {
    const char *name, *key, *iv, *aad, *pt, *ct, *tag;
    int must_fail; /* a gcmDecrypt256 FAIL record: open must refuse it */
};

static const struct kat kats[] = {
    {"enc count 0: empty PT, empty AAD", "b52c505a37d78eda5dd34f20c22540ea1b58963cf8e5bf8ffa85f9f2492505b4",
     "516c33929df5a3284ff463d7", "", "", "", "bdc1ac884d332457a1d2664f168c76f0", 0},
    {"enc: AAD only, 16 bytes", "78dc4e0aaf52d935c3c01eea57428f00ca1fd475f5da86a49c8dd73d68c8e223",
     "d79cf22d504cc793c3fb6c8a", "b96baa8c1c75a671bfb2d08d06be5f36", "", "", "3e5d486aa2e30b22e040b85723a06e76",
     0},
    {"enc: AAD only, 20 bytes", "886cff5f3e6b8d0e1ad0a38fcdb26de97e8acbe79f6bed66959a598fa5047d65",
     "3a8efa1cd74bbab5448f9945", "519fee519d25c7a304d6c6aa1897ee1eb8c59655", "", "",
     "f6d47505ec96c98a42dc3ae719877b87", 0},
    {"enc: AAD only, 90 bytes", "03ccb7dbc7b8425465c2c3fc39ed0593929ffd02a45ff583bd89b79c6f646fe9",
     "fd119985533bd5520b301d12",
     "98e68c10bf4b5ae62d434928fc6405147c6301417303ef3a703dcfd2c0c339a4d0a89bd29fe61fecf1066ab06d7a5c31a48ffbfe"
     "d22f749b17e9bd0dc1c6f8fbd6fd4587184db964d5456132106d782338c3f117ec05229b0899",
     "", "", "cf54e7141349b66f248154427810c87a", 0},
    {"enc: PT 16 bytes", "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22",
     "0d18e06c7c725ac9e362e1ce", "", "2db5168e932556f8089a0622981d017d", "fa4362189661d163fcd6a56d8bf0405a",
     "d636ac1bbedd5cc3ee727dc2ab4a9489", 0},
    {"enc: PT 13 bytes", "e5a0eb92cc2b064e1bc80891faf1fab5e9a17a9c3a984e25416720e30e6c2b21",
     "4742357c335913153ff0eb0f", "", "8499893e16b0ba8b007d54665a", "eb8e6175f1fe38eb1acf95fd51",
     "88a8b74bb74fda553e91020a23deed45", 0},
    {"enc: PT 32 bytes", "37f39137416bafde6f75022a7a527cc593b6000a83ff51ec04871a0ff5360e4e",
     "a291484c3de8bec6b47f525f", "", "fafd94cede8b5a0730394bec68a8e77dba288d6ccaa8e1563a81d6e7ccc7fc97",
     "44dc868006b21d49284016565ffb3979cc4271d967628bf7cdaf86db888e92e5", "01a2b578aa2f41ec6379a44a31cc019c", 0},
    {"enc: PT 51 bytes", "595f259c55abe00ae07535ca5d9b09d6efb9f7e9abb64605c337acbd6b14fc7e",
     "92f258071d79af3e63672285", "",
     "a6fee33eb110a2d769bbc52b0f36969c287874f665681477a25fc4c48015c541fbe2394133ba490a34ee2dd67b898177849a91",
     "bbca4a9e09ae9690c0f6f8d405e53dccd666aa9c5fa13c8758bc30abe1ddd1bcce0d36a1eaaaaffef20cd3c5970b9673f8a65c",
     "26ccecb9976fd6ac9c2c0f372c52c821", 0},
    {"enc: PT 51 bytes, AAD 90 bytes", "4d07f78d19e6d8bb32bf209f138307890f0f1ae39362779ff2bf1f9b734fe653",
     "d983a5d5af78a3b1cd5fbd58",
     "a3dc9ff9210bc4b3276909883db2c2aa0762cd22b46901a248c0372d073e7778b9c1d8469b26bb42406e484ef7747f71dea785fc"
     "0020a2eac17e0ac3fbe0453629efd68d5678fbecc10af8ffbe7828f826defb638763f4ecfe82",
     "94f0bbc4340d97d854e25cc7ce85ea1e781e68bf6f639e0a981bb03e3c209cbf5127171cb0fff65bc3ecac92774d10146d1ac5",
     "6543b4d97fccd273b36436fef719ac31bf0e5c4c058ea71aea2a0e5b60e329be6ea81ce386e6e9fe4480e58363c3b2036865ac",
     "924cf7c0770f228a4b92e9b2a11fc70b", 0},
    {"enc: PT 51 bytes, AAD 90 bytes (2)", "6be7f4d18ff0fbdd9b3b3cacaba4629a0c617387079add62f6ce1584b33faad1",
     "fda568c9cb13d9c176bcef03",
     "11ebeb97dd4a9925c1fbe2b9af77392058d2d971e42db15da39f090d7bc132573c34bf7d92a2d72dc66ee6840c3ff07985b8976e"
     "e8d8f36bf47ae330b899fdc60652dd5a23c45f3680f11951f019e0697c8acfcaa95f01b9c7dd",
     "4df668e99d5068604a48bcca5baa8245435928558a83d68d7b0b081861224e9bd39ea8f2d55a635949e66c6f6a7ff5cc34dd94",
     "488b40ad594e1845ccdd9e9467fc5e1afbbfde34e57d45bfcd30b61cc326d57fe8e3f31a39cdebf00f60bbd2c3cdf69f756eff",
     "3bf3fbab9b48486fd08a5552604df639", 0},
    {"dec: valid, empty", "f5a2b27c74355872eb3ef6c5feafaa740e6ae990d9d48c3bd9bb8235e589f010",
     "58d2240f580a31c1d24948e9", "", "", "", "15e051a5e4a5f5da6cea92e2ebee5bac", 0},
    {"dec: FAIL record, empty", "e5a8123f2e2e007d4e379ba114a2fb66e6613f57c72d4e4f024964053028a831",
     "51e43385bf533e168427e1ad", "", "", "", "38fe845c66e66bdd884c2aecafd280e6", 1},
    {"dec: FAIL record, AAD 16", "2c392a5eb1a9c705371beda3a901c7c61dca4d93b4291de1dd0dd15ec11ffc45",
     "0723fb84a08f4ea09841f32a", "140be561b6171eab942c486a94d33d43", "", "", "aa0e1c9b57975bfc91aa137231977d2c", 1},
};

static int failures;

static void check(int cond, const char *what, const char *name, const char *impl)
{
    if (!cond) {
        printf("FAIL [%s] %s: %s\n", impl, name, what);
        failures++;
    }
}

static size_t unhex(const char *hex, unsigned char *out)
{
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
    return n;
}

static const char *impl_name(uint32_t impl)
{
    return impl == CP_GCM_IMPL_VAES512     ? "vaes512"
           : impl == CP_GCM_IMPL_VAES      ? "vaes"
           : impl == CP_GCM_IMPL_AESNI     ? "aesni"
                                           : "portable";
}

static void run_kat(const struct kat *k, uint32_t impl)
{
    unsigned char key[32], iv[12], aad[256], pt[256], ct[256], tag[16], out[256], got_tag[16];
    size_t aad_len, pt_len;
    cp_gcm_ctx ctx;
    const char *in = impl_name(impl);
    unhex(k->key, key);
    unhex(k->iv, iv);
    aad_len = unhex(k->aad, aad);
    pt_len = unhex(k->pt, pt);
    unhex(k->ct, ct);
    unhex(k->tag, tag);
    check(cp_gcm_init(&ctx, key, impl) == 0, "init", k->name, in);
    if (k->must_fail) {
        memset(out, 0xa5, sizeof(out));
        check(cp_gcm_open(&ctx, iv, aad, aad_len, ct, out, pt_len, tag) == -1, "FAIL record accepted", k->name,
              in);
        return;
    }
    check(cp_gcm_seal(&ctx, iv, aad, aad_len, pt, out, pt_len, got_tag) == 0, "seal rc", k->name, in);
    check(memcmp(out, ct, pt_len) == 0, "ciphertext", k->name, in);
    check(memcmp(got_tag, tag, 16) == 0, "tag", k->name, in);
    memset(out, 0, sizeof(out));
    check(cp_gcm_open(&ctx, iv, aad, aad_len, ct, out, pt_len, tag) == 0, "open rc", k->name, in);
    check(memcmp(out, pt, pt_len) == 0, "plaintext", k->name, in);
    /* In place, as the helper may do it. */
    memcpy(out, pt, pt_len);
    check(cp_gcm_seal(&ctx, iv, aad, aad_len, out, out, pt_len, got_tag) == 0, "in-place seal rc", k->name, in);
    check(memcmp(out, ct, pt_len) == 0 && memcmp(got_tag, tag, 16) == 0, "in-place seal", k->name, in);
    /* The migration helper's calls: seal into a buffer never read back, open reading the input once. */
    unsigned char scratch[256];
    check(cp_gcm_seal_shared(&ctx, iv, aad, aad_len, pt, out, pt_len, got_tag, scratch) == 0, "seal_shared rc",
          k->name, in);
    check(memcmp(out, ct, pt_len) == 0 && memcmp(got_tag, tag, 16) == 0, "seal_shared", k->name, in);
    memset(out, 0, sizeof(out));
    check(cp_gcm_open_shared(&ctx, iv, aad, aad_len, ct, out, pt_len, tag, scratch) == 0, "open_shared rc",
          k->name, in);
    check(memcmp(out, pt, pt_len) == 0, "open_shared plaintext", k->name, in);
    /* A flipped tag bit is refused and nothing is written. */
    tag[15] ^= 0x01;
    memset(out, 0x5a, sizeof(out));
    check(cp_gcm_open(&ctx, iv, aad, aad_len, ct, out, pt_len, tag) == -1, "bad tag accepted", k->name, in);
    check(cp_gcm_open_shared(&ctx, iv, aad, aad_len, ct, out, pt_len, tag, scratch) == -1,
          "bad tag accepted (shared)", k->name, in);
    for (size_t i = 0; i < sizeof(out); i++)
        if (out[i] != 0x5a) {
            check(0, "output written on refusal", k->name, in);
            break;
        }
    cp_gcm_wipe(&ctx);
    check(cp_gcm_seal(&ctx, iv, aad, aad_len, pt, out, pt_len, got_tag) == -1, "wiped ctx usable", k->name, in);
}

/* One migration-helper-shaped page: 4 KiB plaintext, AAD = gpa u64 | generation u32 | migration id. */
static void run_page(uint32_t impl)
{
    static unsigned char pt[4096], out[4096], back[4096];
    unsigned char key[32], iv[12], aad[28], tag[16], want[16];
    cp_gcm_ctx ctx;
    const char *in = impl_name(impl);
    for (int i = 0; i < 32; i++)
        key[i] = (unsigned char)i;
    for (int i = 0; i < 4096; i++)
        pt[i] = (unsigned char)((i * 7 + (i >> 8)) & 0xff);
    unhex("000000010000000000000007", iv);
    unhex("009078563412000005000000a0a1a2a3a4a5a6a7a8a9aaabacadaeaf", aad);
    cp_gcm_init(&ctx, key, impl);
    check(cp_gcm_seal(&ctx, iv, aad, sizeof(aad), pt, out, 4096, tag) == 0, "seal rc", "4 KiB page", in);
    unhex("83012581086c6562fe3607b0ef5ecc00", want);
    check(memcmp(out, want, 16) == 0, "first ciphertext block", "4 KiB page", in);
    unhex("eb3443cd7cc200bcc48bc230355a6b13", want);
    check(memcmp(out + 4080, want, 16) == 0, "last ciphertext block", "4 KiB page", in);
    unhex("cfed042b66c6930483f59ac9bab5c6af", want);
    check(memcmp(tag, want, 16) == 0, "tag", "4 KiB page", in);
    check(cp_gcm_open(&ctx, iv, aad, sizeof(aad), out, back, 4096, tag) == 0, "open rc", "4 KiB page", in);
    check(memcmp(back, pt, 4096) == 0, "round trip", "4 KiB page", in);
}

/* Deterministic test bytes (an LCG), so a failure reproduces. */
static void fill_lcg(unsigned char *buf, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)((seed = seed * 1103515245u + 12345u) >> 16);
}

/* Every implementation must agree bit for bit with the portable one around the 8/16-block edges. */
static void run_agreement(uint32_t impl)
{
    static unsigned char buf[4200], a[4200], b[4200], c[4200], scratch[4200];
    unsigned char key[32], iv[12], aad[70], ta[16], tb[16];
    cp_gcm_ctx cp, ci;
    fill_lcg(buf, sizeof(buf), 12345);
    memcpy(key, buf + 5, 32);
    memcpy(iv, buf + 50, 12);
    memcpy(aad, buf + 80, sizeof(aad));
    cp_gcm_init(&cp, key, CP_GCM_IMPL_PORTABLE);
    cp_gcm_init(&ci, key, impl);
    /* Every length to 600 (the fused paths' 256-byte chunks and their tails), then strides to 4200. */
    for (size_t len = 0; len <= sizeof(buf); len += len < 600 ? 1 : 13) {
        size_t aad_len = len % sizeof(aad);
        cp_gcm_seal(&cp, iv, aad, aad_len, buf, a, len, ta);
        cp_gcm_seal_shared(&ci, iv, aad, aad_len, buf, b, len, tb, scratch);
        memset(c, 0, sizeof(c));
        int opened = cp_gcm_open_shared(&ci, iv, aad, aad_len, a, c, len, ta, scratch);
        if (memcmp(a, b, len) != 0 || memcmp(ta, tb, 16) != 0 || opened != 0 || memcmp(c, buf, len) != 0) {
            printf("FAIL portable and %s disagree at len %zu aad %zu\n", impl_name(impl), len, aad_len);
            failures++;
        }
    }
}

typedef void (*pass_fn)(const cp_gcm_ctx *, const uint8_t *, const uint8_t *, size_t, const uint8_t *, uint8_t *,
                        size_t, uint8_t *);
typedef void (*copy_fn)(const cp_gcm_ctx *, const uint8_t *, size_t, const uint8_t *, uint8_t *, size_t, uint8_t *);

/*
 * The AES-NI passes one by one: the fused seal (also in place) and ghash_copy, against the portable CTR and
 * GHASH, for every length to 600 and strides to 4200, AAD lengths around the 16-block groups, with the
 * 32-bit counter wrapping inside the data.
 */
static void run_aesni_passes(uint32_t impl, pass_fn seal, copy_fn ghash_copy)
{
    static unsigned char buf[4200], want[4200], got[4200], aad[300];
    unsigned char key[32], j0[16], s_want[16], s_got[16];
    static const size_t aad_lens[] = {0, 1, 16, 28, 255, 256, 257, 300};
    cp_gcm_ctx cp, ci;
    fill_lcg(buf, sizeof(buf), 777);
    memcpy(key, buf + 7, 32);
    memcpy(j0, buf + 60, 12);
    memcpy(aad, buf + 900, sizeof(aad));
    j0[12] = 0xff, j0[13] = 0xff, j0[14] = 0xff, j0[15] = 0xf0; /* the 32-bit counter wraps inside the data */
    cp_gcm_init(&cp, key, CP_GCM_IMPL_PORTABLE);
    cp_gcm_init(&ci, key, impl);
    int bad = 0;
    for (size_t len = 0, round = 0; len <= sizeof(buf); len += len < 600 ? 1 : 13, round++) {
        size_t aad_len = aad_lens[round % (sizeof(aad_lens) / sizeof(aad_lens[0]))];
        cp_portable_ctr(&cp, j0, buf, want, len);
        cp_portable_ghash(&cp, aad, aad_len, want, len, s_want);
        seal(&ci, j0, aad, aad_len, buf, got, len, s_got);
        bad |= memcmp(got, want, len) != 0 || memcmp(s_got, s_want, 16) != 0;
        memcpy(got, buf, len);
        seal(&ci, j0, aad, aad_len, got, got, len, s_got); /* in place */
        bad |= memcmp(got, want, len) != 0 || memcmp(s_got, s_want, 16) != 0;
        ghash_copy(&ci, aad, aad_len, want, got, len, s_got);
        bad |= memcmp(got, want, len) != 0 || memcmp(s_got, s_want, 16) != 0;
        if (bad) {
            printf("FAIL %s passes disagree with portable at len %zu aad %zu\n", impl_name(impl), len, aad_len);
            failures++;
            return;
        }
    }
}

static void run_nonce_seq(void)
{
    cp_gcm_nonce_seq seq;
    unsigned char iv[12], want[12];
    cp_gcm_nonce_seq_init(&seq, 0x01020304u, 0xfffffffffffffffeull);
    check(cp_gcm_nonce_next(&seq, iv) == 0, "first nonce", "nonce seq", "-");
    unhex("01020304fffffffffffffffe", want);
    check(memcmp(iv, want, 12) == 0, "layout sender || be64 counter", "nonce seq", "-");
    check(cp_gcm_nonce_next(&seq, iv) == 0, "last counter value usable", "nonce seq", "-");
    check(cp_gcm_nonce_next(&seq, iv) == -1, "wraps instead of refusing", "nonce seq", "-");
    check(cp_gcm_nonce_next(&seq, iv) == -1, "exhaustion is sticky", "nonce seq", "-");
}

static void run_pick_impl(void)
{
    uint32_t all = cp_cpu_features_from_cpuid(1u << 25 | 1u << 1 | 1u << 9 | 1u << 19, 1u << 5, 3u << 9, 7u);
    check(all == (CP_CPU_AESNI | CP_CPU_PCLMUL | CP_CPU_SSSE3 | CP_CPU_SSE41 | CP_CPU_AVX2 | CP_CPU_VAES |
                  CP_CPU_VPCLMUL | CP_CPU_YMM_STATE),
          "cpuid bits", "features", "-");
    check(cp_gcm_pick_impl(all) == CP_GCM_IMPL_VAES, "vaes when all present", "pick", "-");
    check(cp_gcm_pick_impl(all & ~CP_CPU_YMM_STATE) == CP_GCM_IMPL_AESNI, "no YMM state -> aesni", "pick", "-");
    check(cp_gcm_pick_impl(all & ~CP_CPU_VAES) == CP_GCM_IMPL_AESNI, "no VAES -> aesni", "pick", "-");
    check(cp_gcm_pick_impl(all & ~CP_CPU_PCLMUL) == CP_GCM_IMPL_PORTABLE, "no pclmul -> portable", "pick", "-");
    check(cp_gcm_pick_impl(0) == CP_GCM_IMPL_PORTABLE, "nothing -> portable", "pick", "-");
    uint32_t avx512 = 1u << 16 | 1u << 30 | 1u << 31;
    uint32_t zmm = cp_cpu_features_from_cpuid(1u << 25 | 1u << 1 | 1u << 9 | 1u << 19, 1u << 5 | avx512, 3u << 9, 0xe7);
    check(cp_gcm_pick_impl(zmm) == CP_GCM_IMPL_VAES512, "vaes512 when all present", "pick", "-");
    check(cp_gcm_pick_impl(zmm & ~CP_CPU_ZMM_STATE) == CP_GCM_IMPL_VAES, "no ZMM state -> vaes", "pick", "-");
    check(cp_gcm_pick_impl(zmm & ~CP_CPU_AVX512BW) == CP_GCM_IMPL_VAES, "no AVX-512BW -> vaes", "pick", "-");
    check(cp_gcm_pick_impl(all) == CP_GCM_IMPL_VAES, "no AVX-512 -> vaes", "pick", "-");
    cp_gcm_ctx ctx;
    unsigned char key[32] = {0};
    check(cp_gcm_init(&ctx, key, 7) == -1, "unknown impl accepted", "init", "-");
}

int main(void)
{
    uint32_t impls[4] = {CP_GCM_IMPL_PORTABLE};
    int n_impls = 1;
    int n_kats = (int)(sizeof(kats) / sizeof(kats[0]));
    int aesni = __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul");
    int vaes = aesni && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vaes") &&
               __builtin_cpu_supports("vpclmulqdq");
    if (aesni)
        impls[n_impls++] = CP_GCM_IMPL_AESNI;
    if (vaes)
        impls[n_impls++] = CP_GCM_IMPL_VAES;
#ifdef CP_TEST_EMULATED_512
    /* This build's 512-bit path takes its intrinsics from SIMDe (emul512.h): it needs only AVX2 and AES-NI. */
    if (aesni && __builtin_cpu_supports("avx2")) {
        impls[n_impls++] = CP_GCM_IMPL_VAES512;
        printf("vaes512 here through SIMDe's portable AVX-512 intrinsics (its logic, not the CPU's instructions)\n");
    }
#else
    /* The 512-bit path runs only where the CPU has it; elsewhere the program says it was not tested. */
    if (vaes && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        impls[n_impls++] = CP_GCM_IMPL_VAES512;
    else
        printf("not tested here: vaes512 (this CPU lacks AVX-512F/BW/VL or VAES)\n");
#endif
    for (int i = 0; i < n_impls; i++) {
        for (int k = 0; k < n_kats; k++)
            run_kat(&kats[k], impls[i]);
        run_page(impls[i]);
        if (i > 0)
            run_agreement(impls[i]);
        printf("tested %s\n", impl_name(impls[i]));
    }
    if (aesni)
        run_aesni_passes(CP_GCM_IMPL_AESNI, cp_aesni_seal, cp_aesni_ghash_copy);
    run_nonce_seq();
    run_pick_impl();
    printf("%s: %d known-answer vectors x %d implementation(s), %d failure(s)\n", failures ? "FAILED" : "ok",
           n_kats + 1, n_impls, failures);
    return failures ? 1 : 0;
}
