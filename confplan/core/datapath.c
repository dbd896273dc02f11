/*
 * confplan data loops: the source's and the target's sealed-page path in one call each (datapath.h; the
 * design, the bank ownership and the stops are in docs/migration.md, "Session 5").
 *
 * The frame authentication (wire v2, docs/stream-security.md) is the GMAC the Python FrameKey computes,
 * done here with OpenSSL's libcrypto, loaded with dlopen on first use (no build-time dependency on its
 * headers; the library is on every host that runs Python's ssl module).
 */
#define _GNU_SOURCE
#include "datapath.h"

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <time.h>

#include "../../firmware/include/cp_mailbox.h"
#include "pagecore_int.h"

#define CP_E_AUTH_TAG (-65) /* CoreStatus.AUTH_TAG in Python */
#define LOOK_EVERY 0.01     /* seconds between pokes (cancel, a dead guest) and op-timeout checks */
#define IDLE_NS 20000       /* sleep between looks at the helpers' done counters when nothing is ready */
#define REARM_AHEAD 8192     /* pages the source re-arms at a time, ahead of the SAVEs (32 MiB) */
#define AAD_MAX (CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE + CP_MAX_FRAME_PAGES * CP_SEALED_HEADER_SIZE)

_Static_assert(CP_MB_SLOT_SIZE == CP_SEALED_PAGE_SIZE, "a mailbox slot is one wire record");
_Static_assert(CP_MB_SLOT_HEADER == CP_SEALED_HEADER_SIZE, "the GMAC covers the slot header");

/* ------------------------------------------------------------------------------------------------ */
/* libcrypto: AES-256-GCM with empty plaintext (GMAC) over a frame's additional data. */

typedef void *(*ctx_new_fn)(void);
typedef void (*ctx_free_fn)(void *);
typedef const void *(*cipher_fn)(void);
typedef int (*init_fn)(void *, const void *, void *, const uint8_t *, const uint8_t *);
typedef int (*update_fn)(void *, uint8_t *, int *, const uint8_t *, int);
typedef int (*final_fn)(void *, uint8_t *, int *);
typedef int (*ctrl_fn)(void *, int, int, void *);

static struct {
    ctx_new_fn ctx_new;
    ctx_free_fn ctx_free;
    cipher_fn aes_256_gcm;
    init_fn enc_init, dec_init;
    update_fn enc_update, dec_update;
    final_fn enc_final, dec_final;
    ctrl_fn ctrl;
    bool ok;
} ssl;
static pthread_once_t ssl_once = PTHREAD_ONCE_INIT;

#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

static void ssl_load(void)
{
    void *h = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        h = dlopen("libcrypto.so", RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return;
    ssl.ctx_new = (ctx_new_fn)dlsym(h, "EVP_CIPHER_CTX_new");
    ssl.ctx_free = (ctx_free_fn)dlsym(h, "EVP_CIPHER_CTX_free");
    ssl.aes_256_gcm = (cipher_fn)dlsym(h, "EVP_aes_256_gcm");
    ssl.enc_init = (init_fn)dlsym(h, "EVP_EncryptInit_ex");
    ssl.dec_init = (init_fn)dlsym(h, "EVP_DecryptInit_ex");
    ssl.enc_update = (update_fn)dlsym(h, "EVP_EncryptUpdate");
    ssl.dec_update = (update_fn)dlsym(h, "EVP_DecryptUpdate");
    ssl.enc_final = (final_fn)dlsym(h, "EVP_EncryptFinal_ex");
    ssl.dec_final = (final_fn)dlsym(h, "EVP_DecryptFinal_ex");
    ssl.ctrl = (ctrl_fn)dlsym(h, "EVP_CIPHER_CTX_ctrl");
    ssl.ok = ssl.ctx_new && ssl.ctx_free && ssl.aes_256_gcm && ssl.enc_init && ssl.dec_init && ssl.enc_update &&
             ssl.dec_update && ssl.enc_final && ssl.dec_final && ssl.ctrl;
}

static void nonce_of(uint8_t nonce[12], const uint8_t direction[4], uint64_t seq)
{
    memcpy(nonce, direction, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(seq >> (56 - 8 * i)); /* big-endian, as FrameKey.nonce */
}

/* tag = GMAC(key, nonce, aad); verify: compare with `tag` instead. 0 = ok, -1 = crypto failure, 1 = bad tag. */
static int gmac(void *ctx, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t len,
                uint8_t tag[16], bool verify)
{
    int n = 0;
    uint8_t scratch[16];
    if (!verify) {
        if (ssl.enc_init(ctx, ssl.aes_256_gcm(), NULL, key, nonce) != 1 ||
            ssl.enc_update(ctx, NULL, &n, aad, (int)len) != 1 || ssl.enc_final(ctx, scratch, &n) != 1 ||
            ssl.ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
            return -1;
        return 0;
    }
    if (ssl.dec_init(ctx, ssl.aes_256_gcm(), NULL, key, nonce) != 1 ||
        ssl.dec_update(ctx, NULL, &n, aad, (int)len) != 1 || ssl.ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, tag) != 1)
        return -1;
    return ssl.dec_final(ctx, scratch, &n) == 1 ? 0 : 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* The loop's state shared by both sides: time, the periodic look, stops. */

struct pending {
    uint64_t seq;       /* mailbox op number */
    uint64_t gpa_index; /* source: index in s->gpas of the bank's first page */
    uint32_t count;
    uint32_t first;     /* first slot */
    double posted;
};

struct mbq {            /* one mailbox's ops in flight, oldest first (they finish in order) */
    struct pending q[CP_MB_RING];
    uint32_t head, n;
    uint32_t next_bank; /* target: the bank the next frame for this mailbox fills (freed in order too) */
};

struct loop {
    struct cp_dp_stream *s;
    cp_dp_poke_fn poke;
    struct mbq *mq;
    void *ctx;          /* libcrypto cipher context */
    uint8_t *aad;       /* AAD_MAX bytes */
    double next_look;
    uint64_t rearmed;   /* source: gpas[0..rearmed) are re-armed in the dirty log */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap(long ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L};
    nanosleep(&ts, NULL);
}

static int32_t stop_with(struct loop *L, int32_t why)
{
    if (L->s->stop == CP_DP_DONE)
        L->s->stop = why;
    return why;
}

static int32_t frame_error(struct loop *L, int code, uint32_t index, uint64_t value, uint64_t expected)
{
    struct cp_error *e = &L->s->err;
    e->code = code;
    e->index = index;
    e->value = value;
    e->expected = expected;
    return stop_with(L, CP_DP_FRAME);
}

static volatile struct cp_mb_proto *proto(const struct cp_dp_mailbox *mb)
{
    return (volatile struct cp_mb_proto *)(mb->ctl + CP_MB_PROTO_OFFSET);
}

static volatile struct cp_mb_cmd *cmd(const struct cp_dp_mailbox *mb, uint64_t seq)
{
    return (volatile struct cp_mb_cmd *)(mb->ctl + CP_MB_RING_OFFSET + (seq % CP_MB_RING) * CP_MB_CMD_SIZE);
}

static uint64_t done_of(const struct cp_dp_mailbox *mb)
{
    return __atomic_load_n(&proto(mb)->done, __ATOMIC_ACQUIRE);
}

/* Every LOOK_EVERY: the poke (cancel, a dead guest) and the oldest ops' age. Nonzero = stop. */
static int32_t look(struct loop *L, double now)
{
    if (now < L->next_look)
        return L->s->stop;
    L->next_look = now + LOOK_EVERY;
    int32_t r = L->poke(-1);
    if (r)
        return stop_with(L, r == CP_DP_CANCELLED ? CP_DP_CANCELLED : CP_DP_MACHINE);
    for (uint32_t i = 0; i < L->s->n_mailboxes; i++) {
        struct mbq *m = &L->mq[i];
        if (m->n && now - m->q[m->head].posted > L->s->op_timeout) {
            L->s->bad_mailbox = L->s->mailboxes[i].mh_index;
            return stop_with(L, CP_DP_OP_TIMEOUT);
        }
    }
    return L->s->stop;
}

/* Queue an op; kick the helper only if it had caught up (it rang its doorbell and parks, or is about to):
 * store seq, full fence, load done, against the helper's store done, full fence, load seq. */
static void post(struct loop *L, uint32_t i, uint32_t op, uint32_t count, uint32_t first, uint64_t gpa_index)
{
    struct cp_dp_mailbox *mb = &L->s->mailboxes[i];
    volatile struct cp_mb_proto *p = proto(mb);
    uint64_t old = __atomic_load_n(&p->seq, __ATOMIC_ACQUIRE), seq = old + 1;
    volatile struct cp_mb_cmd *c = cmd(mb, seq);
    c->op = op;
    c->count = count;
    c->generation = L->s->generation;
    c->first = first;
    c->arg0 = 0;
    c->arg1 = 0;
    __atomic_store_n(&p->seq, seq, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->done, __ATOMIC_ACQUIRE) == old) {
        uint64_t one = 1; /* the eventfd its vCPU thread parks on: no GIL, no Python; else the poke */
        if (mb->kick_fd < 0 || write(mb->kick_fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
            L->poke((int32_t)mb->mh_index);
        L->s->kicks++;
    }
    struct mbq *m = &L->mq[i];
    m->q[(m->head + m->n) % CP_MB_RING] = (struct pending){seq, gpa_index, count, first, now_s()};
    m->n++;
}

/* The oldest op of mailbox i is done: check its result (a refused page stops the loop). */
static int32_t finish(struct loop *L, uint32_t i, const struct pending *op)
{
    struct cp_dp_mailbox *mb = &L->s->mailboxes[i];
    volatile struct cp_mb_cmd *c = cmd(mb, op->seq);
    uint32_t status = c->status, n_refused = c->n_refused, first_bad = c->first_bad;
    L->s->ops++;
    if (status != CP_MBS_OK && status != CP_MBS_PARTIAL) {
        L->s->bad_mailbox = mb->mh_index;
        L->s->bad_status = status;
        return stop_with(L, CP_DP_OP_FAILED);
    }
    if (n_refused) {
        uint32_t slot = first_bad < op->count ? first_bad : 0;
        const struct cp_sealed_page *rec =
            (const struct cp_sealed_page *)(mb->slots + (size_t)(op->first + slot) * CP_MB_SLOT_SIZE);
        L->s->bad_mailbox = mb->mh_index;
        L->s->bad_slot = slot;
        L->s->bad_status = rec->status;
        L->s->bad_gpa = rec->gpa;
        L->s->err.value = n_refused;
        L->s->err.expected = op->count;
        return stop_with(L, CP_DP_REFUSED);
    }
    return CP_DP_DONE;
}

/* After a stop: every op posted must be done before Python touches the mailboxes again (bounded). */
static void drain(struct loop *L)
{
    for (uint32_t i = 0; i < L->s->n_mailboxes; i++) {
        struct mbq *m = &L->mq[i];
        if (!m->n)
            continue;
        uint64_t last = m->q[(m->head + m->n - 1) % CP_MB_RING].seq;
        double deadline = now_s() + L->s->op_timeout;
        while (done_of(&L->s->mailboxes[i]) < last && now_s() < deadline) {
            if (L->poke(-1) == CP_DP_MACHINE)
                break;
            nap(100000);
        }
        m->n = 0;
    }
}

/* Wait until fd is ready for `events`, at most io_timeout (<= 0: forever), looking every LOOK_EVERY. */
static int32_t wait_fd(struct loop *L, short events)
{
    double deadline = L->s->io_timeout > 0 ? now_s() + L->s->io_timeout : 0;
    for (;;) {
        struct pollfd pfd = {.fd = L->s->fd, .events = events};
        int r = poll(&pfd, 1, (int)(LOOK_EVERY * 1000));
        if (r > 0)
            return CP_DP_DONE;
        if (r < 0 && errno != EINTR) {
            L->s->sys_errno = errno;
            return stop_with(L, CP_DP_SOCKET);
        }
        double now = now_s();
        if (look(L, now))
            return L->s->stop;
        if (deadline && now >= deadline)
            return stop_with(L, CP_DP_TIMEOUT);
    }
}

static int32_t check_loop_args(struct cp_dp_stream *s)
{
    if (!s || !s->mailboxes || !s->n_mailboxes || (s->count && !s->gpas) || s->op_timeout <= 0)
        return CP_DP_ARG;
    for (uint32_t i = 0; i < s->n_mailboxes; i++) {
        const struct cp_dp_mailbox *mb = &s->mailboxes[i];
        if (!mb->ctl || !mb->slots || !mb->bank_slots || !mb->banks || mb->banks > CP_MB_RING ||
            mb->bank_slots > CP_MAX_FRAME_PAGES || (uint64_t)mb->banks * mb->bank_slots > mb->batch_pages)
            return CP_DP_ARG;
        /* the loop owns the ring for the call: nothing else may be queued */
        if (__atomic_load_n(&proto(mb)->seq, __ATOMIC_ACQUIRE) != done_of(mb))
            return CP_DP_ARG;
    }
    return CP_DP_DONE;
}

static int32_t loop_open(struct loop *L, struct cp_dp_stream *s, cp_dp_poke_fn poke)
{
    memset(L, 0, sizeof(*L));
    L->s = s;
    L->poke = poke;
    s->stop = CP_DP_DONE;
    s->sys_errno = 0;
    memset(&s->err, 0, sizeof(s->err));
    s->err.index = UINT32_MAX;
    if (!poke || check_loop_args(s) != CP_DP_DONE)
        return stop_with(L, CP_DP_ARG);
    if (s->protect) {
        pthread_once(&ssl_once, ssl_load);
        if (!ssl.ok || !(L->ctx = ssl.ctx_new()))
            return stop_with(L, CP_DP_CRYPTO);
    }
    L->mq = calloc(s->n_mailboxes, sizeof(*L->mq));
    L->aad = malloc(AAD_MAX);
    if (!L->mq || !L->aad)
        return stop_with(L, CP_DP_ARG);
    return CP_DP_DONE;
}

static int32_t loop_close(struct loop *L)
{
    if (L->mq)
        drain(L);
    if (L->ctx)
        ssl.ctx_free(L->ctx);
    free(L->mq);
    free(L->aad);
    return L->s->stop;
}

/* A record header (a copy: what is checked is what is authenticated) is well-formed for this RAM. */
static int check_record(struct loop *L, const uint8_t *hdr, uint32_t index, const uint64_t *want)
{
    static const uint8_t zeros[16];
    const struct cp_sealed_page *r = (const struct cp_sealed_page *)hdr;
    if (r->status != CP_SEAL_OK)
        return frame_error(L, CP_E_SEAL_STATUS, index, r->status, CP_SEAL_OK);
    if (memcmp(hdr + offsetof(struct cp_sealed_page, reserved), zeros, sizeof(zeros)))
        return frame_error(L, CP_E_FLAGS, index, 0, 0);
    if (cp_check_gpa(r->gpa, L->s->gpa_base, L->s->ram_size, index, &L->s->err) != CP_OK)
        return stop_with(L, CP_DP_FRAME);
    if (want && r->gpa != *want)
        return frame_error(L, CP_E_GPA_MISMATCH, index, r->gpa, *want);
    return CP_DP_DONE;
}

/* The record headers of `count` records at `recs` after header and prefix in L->aad; checked. */
static int32_t gather(struct loop *L, const uint8_t *recs, uint32_t count, const uint64_t *want)
{
    uint8_t *o = L->aad + CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *h = o + (size_t)i * CP_SEALED_HEADER_SIZE;
        memcpy(h, recs + (size_t)i * CP_SEALED_PAGE_SIZE, CP_SEALED_HEADER_SIZE);
        if (check_record(L, h, i, want ? want + i : NULL))
            return L->s->stop;
    }
    return CP_DP_DONE;
}

/* Wire v3's CRC of an unprotected sealed frame, from the gathered prefix and record headers in L->aad. */
static uint32_t header_crc(struct loop *L, uint32_t count)
{
    return cp_crc32c(0, L->aad + CP_HEADER_SIZE, CP_PAGES_PREFIX_SIZE + (size_t)count * CP_SEALED_HEADER_SIZE);
}

/* ------------------------------------------------------------------------------------------------ */
/* Source */

static int32_t send_iov(struct loop *L, struct iovec *iov, int n)
{
    while (n) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t sent = sendmsg(L->s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                L->s->sys_errno = errno;
                return stop_with(L, CP_DP_SOCKET);
            }
            if (wait_fd(L, POLLOUT))
                return L->s->stop;
            continue;
        }
        size_t left = (size_t)sent;
        while (n && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return CP_DP_DONE;
}

/* The plan's bandwidth cap: sleep off what was sent ahead of it, looking every LOOK_EVERY. */
static int32_t pace(struct loop *L)
{
    struct cp_dp_stream *s = L->s;
    if (s->bandwidth <= 0)
        return CP_DP_DONE;
    for (;;) {
        double now = now_s();
        double ahead = (double)(s->pace_sent + s->bytes) / s->bandwidth - (now - s->pace_t0);
        if (ahead <= 0)
            return CP_DP_DONE;
        nap((long)((ahead < LOOK_EVERY ? ahead : LOOK_EVERY) * 1e9));
        L->next_look = 0;
        if (look(L, now_s()))
            return s->stop;
    }
}

/* The target writes on this stream only to refuse it: stop before the next frame when it has. */
static int32_t peer_wrote(struct loop *L)
{
    struct pollfd pfd = {.fd = L->s->fd, .events = POLLIN};
    if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLIN | POLLHUP | POLLERR)))
        return stop_with(L, CP_DP_PEER);
    return CP_DP_DONE;
}

/* One done SAVE bank as a SEALED_PAGES frame, from the slots: header, prefix, records, tag. */
static int32_t send_bank(struct loop *L, const struct cp_dp_mailbox *mb, const struct pending *op)
{
    struct cp_dp_stream *s = L->s;
    const uint8_t *recs = mb->slots + (size_t)op->first * CP_MB_SLOT_SIZE;
    size_t body = (size_t)op->count * CP_SEALED_PAGE_SIZE;
    uint32_t payload_len = (uint32_t)(CP_PAGES_PREFIX_SIZE + body);
    uint8_t prefix[CP_PAGES_PREFIX_SIZE] = {0}, tag[CP_TAG_SIZE];
    memcpy(prefix, &op->count, 4);
    memcpy(L->aad + CP_HEADER_SIZE, prefix, sizeof(prefix));
    if (peer_wrote(L) || gather(L, recs, op->count, s->gpas + op->gpa_index))
        return s->stop;
    /* wire v3: no pass over the ciphertexts (the helper's tags cover them); a protected frame's GMAC covers
     * the header, the prefix and the record headers gathered (and checked) above, an unprotected frame's
     * CRC the same bytes. The records go from the slots: a guest that changes one after the gather breaks
     * only its own stream (the target's helper refuses the record). */
    uint32_t crc = s->protect ? 0 : header_crc(L, op->count);
    uint8_t *hdr = L->aad;
    cp_write_header(hdr, CP_FT_SEALED_PAGES, s->protect ? CP_HF_PROTECTED : 0, s->seq, payload_len, crc);
    if (s->protect) {
        uint8_t nonce[12];
        nonce_of(nonce, s->direction, s->seq);
        size_t aad_len = CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE + (size_t)op->count * CP_SEALED_HEADER_SIZE;
        if (gmac(L->ctx, s->key, nonce, L->aad, aad_len, tag, false))
            return stop_with(L, CP_DP_CRYPTO);
    }
    uint8_t head[CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE];
    memcpy(head, hdr, sizeof(head));
    struct iovec iov[3] = {
        {.iov_base = head, .iov_len = sizeof(head)},
        {.iov_base = (void *)recs, .iov_len = body},
        {.iov_base = tag, .iov_len = s->protect ? CP_TAG_SIZE : 0},
    };
    if (send_iov(L, iov, s->protect ? 3 : 2))
        return s->stop;
    s->seq++;
    s->frames++;
    s->pages += op->count;
    s->bytes += CP_HEADER_SIZE + payload_len; /* frame bytes, as Python counts them (no tag) */
    return pace(L);
}

/* The dirty log re-armed for gpas[..end) and REARM_AHEAD pages beyond, before a helper reads any of them:
 * a page written from here on is in the next round's log. Pages further on stay writable meanwhile, so the
 * guest's writes there cost no fault and are sent with this round (docs/dirty-log.md). */
static int32_t rearm_to(struct loop *L, uint64_t end)
{
    struct cp_dp_stream *s = L->s;
    if (!s->rearm || end <= L->rearmed)
        return CP_DP_DONE;
    uint64_t to = L->rearmed + REARM_AHEAD > end ? L->rearmed + REARM_AHEAD : end;
    if (to > s->count)
        to = s->count;
    if (cp_rearm_pages(s->rearm, s->gpas + L->rearmed, to - L->rearmed)) {
        s->sys_errno = s->rearm->sys_errno;
        s->bad_gpa = s->rearm->bad_gpa;
        return stop_with(L, CP_DP_DIRTY_LOG);
    }
    L->rearmed = to;
    return CP_DP_DONE;
}

static int32_t post_save(struct loop *L, uint32_t i, uint32_t first, uint64_t *pos)
{
    struct cp_dp_stream *s = L->s;
    struct cp_dp_mailbox *mb = &s->mailboxes[i];
    uint64_t left = s->count - *pos;
    uint32_t n = left < mb->bank_slots ? (uint32_t)left : mb->bank_slots;
    if (rearm_to(L, *pos + n))
        return s->stop;
    for (uint32_t k = 0; k < n; k++)
        ((struct cp_sealed_page *)(mb->slots + (size_t)(first + k) * CP_MB_SLOT_SIZE))->gpa = s->gpas[*pos + k];
    post(L, i, CP_MB_OP_SAVE, n, first, *pos);
    *pos += n;
    return CP_DP_DONE;
}

int32_t cp_dp_send_sealed(struct cp_dp_stream *s, cp_dp_poke_fn poke)
{
    struct loop L;
    if (loop_open(&L, s, poke))
        return loop_close(&L);
    uint64_t pos = 0;
    for (uint32_t b = 0; b < CP_MB_RING && pos < s->count && !s->stop; b++)
        for (uint32_t i = 0; i < s->n_mailboxes && pos < s->count && !s->stop; i++)
            if (b < s->mailboxes[i].banks)
                post_save(&L, i, b * s->mailboxes[i].bank_slots, &pos);
    for (;;) {
        bool busy = false, ready = false;
        for (uint32_t i = 0; i < s->n_mailboxes && !s->stop; i++) {
            struct mbq *m = &L.mq[i];
            if (!m->n)
                continue;
            busy = true;
            struct pending op = m->q[m->head];
            if (done_of(&s->mailboxes[i]) < op.seq)
                continue;
            ready = true;
            m->head = (m->head + 1) % CP_MB_RING;
            m->n--;
            if (finish(&L, i, &op) || send_bank(&L, &s->mailboxes[i], &op))
                break;
            if (pos < s->count && post_save(&L, i, op.first, &pos))
                break;
        }
        if (s->stop || !busy || look(&L, now_s())) /* a cancel is seen within LOOK_EVERY, busy or not */
            break;
        if (!ready)
            nap(IDLE_NS);
    }
    return loop_close(&L);
}

/* ------------------------------------------------------------------------------------------------ */
/* Target */

/* Read exactly len bytes, at most io_timeout without progress; the peer closing is CP_DP_SOCKET, errno 0. */
static int32_t recv_exact(struct loop *L, uint8_t *buf, size_t len)
{
    while (len) {
        ssize_t got = recv(L->s->fd, buf, len, MSG_DONTWAIT);
        if (got > 0) {
            buf += got;
            len -= (size_t)got;
            continue;
        }
        if (got == 0) {
            L->s->sys_errno = 0;
            return stop_with(L, CP_DP_SOCKET);
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            L->s->sys_errno = errno;
            return stop_with(L, CP_DP_SOCKET);
        }
        if (wait_fd(L, POLLIN))
            return L->s->stop;
    }
    return CP_DP_DONE;
}

/* Mailbox i's oldest LOAD is done (wait for it): check it and free its bank. */
static int32_t finish_oldest(struct loop *L, uint32_t i)
{
    struct mbq *m = &L->mq[i];
    struct pending op = m->q[m->head];
    while (done_of(&L->s->mailboxes[i]) < op.seq) {
        if (look(L, now_s()))
            return L->s->stop;
        nap(IDLE_NS);
    }
    m->head = (m->head + 1) % CP_MB_RING;
    m->n--;
    return finish(L, i, &op);
}

/* A mailbox with a bank free for the next frame, looking from `from` on (round robin); when every bank is in
 * flight, the first mailbox whose oldest LOAD is done (checked). So a helper the host has not scheduled yet
 * (two cores, six busy threads) does not hold up the stream while another helper could take the frame.
 * UINT32_MAX: the loop stopped. */
static uint32_t free_mailbox(struct loop *L, uint32_t from)
{
    uint32_t n = L->s->n_mailboxes;
    for (;;) {
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = (from + k) % n;
            if (L->mq[i].n < L->s->mailboxes[i].banks)
                return i;
        }
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = (from + k) % n;
            const struct mbq *m = &L->mq[i];
            if (done_of(&L->s->mailboxes[i]) >= m->q[m->head].seq)
                return finish_oldest(L, i) ? UINT32_MAX : i;
        }
        if (look(L, now_s()))
            return UINT32_MAX;
        nap(IDLE_NS);
    }
}

/* The frame after `h` is SEALED_PAGES of this stream, whole banks: else Python reads it (and refuses it). */
static bool ours(const struct loop *L, const struct cp_frame_header *h, uint32_t bank_slots, uint32_t *count)
{
    const struct cp_dp_stream *s = L->s;
    if (h->type != CP_FT_SEALED_PAGES || h->seq != s->seq || !!(h->flags & CP_HF_PROTECTED) != !!s->protect ||
        h->payload_len < CP_PAGES_PREFIX_SIZE + CP_SEALED_PAGE_SIZE)
        return false;
    uint64_t body = h->payload_len - CP_PAGES_PREFIX_SIZE;
    *count = (uint32_t)(body / CP_SEALED_PAGE_SIZE);
    return body % CP_SEALED_PAGE_SIZE == 0 && *count <= bank_slots;
}

/* One SEALED_PAGES frame (header h, already read) into bank `first` of mailbox i; checked; LOAD posted. */
static int32_t recv_bank(struct loop *L, uint32_t i, uint32_t first, const struct cp_frame_header *h,
                         uint32_t count)
{
    struct cp_dp_stream *s = L->s;
    struct cp_dp_mailbox *mb = &s->mailboxes[i];
    uint8_t *recs = mb->slots + (size_t)first * CP_MB_SLOT_SIZE;
    size_t body = (size_t)count * CP_SEALED_PAGE_SIZE;
    uint8_t *prefix = L->aad + CP_HEADER_SIZE, tag[CP_TAG_SIZE];
    if (recv_exact(L, prefix, CP_PAGES_PREFIX_SIZE) || recv_exact(L, recs, body) ||
        (s->protect && recv_exact(L, tag, CP_TAG_SIZE)))
        return s->stop;
    uint32_t n, reserved;
    memcpy(&n, prefix, 4);
    memcpy(&reserved, prefix + 4, 4);
    /* the record headers, copied once: what the tag (or CRC) covers is what is checked and posted */
    uint8_t *o = L->aad + CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    for (uint32_t k = 0; k < count; k++)
        memcpy(o + (size_t)k * CP_SEALED_HEADER_SIZE, recs + (size_t)k * CP_SEALED_PAGE_SIZE,
               CP_SEALED_HEADER_SIZE);
    if (s->protect) {
        uint8_t nonce[12];
        nonce_of(nonce, s->direction, h->seq);
        size_t aad_len = CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE + (size_t)count * CP_SEALED_HEADER_SIZE;
        int r = gmac(L->ctx, s->key, nonce, L->aad, aad_len, tag, true);
        if (r < 0)
            return stop_with(L, CP_DP_CRYPTO);
        if (r > 0)
            return frame_error(L, CP_E_AUTH_TAG, UINT32_MAX, h->seq, 0);
        if (h->payload_crc32c)
            return frame_error(L, CP_E_FLAGS, UINT32_MAX, h->payload_crc32c, 0);
    } else {
        uint32_t crc = header_crc(L, count);
        if (crc != h->payload_crc32c)
            return frame_error(L, CP_E_PAYLOAD_CRC, UINT32_MAX, h->payload_crc32c, crc);
    }
    if (n != count)
        return frame_error(L, CP_E_PAYLOAD_LEN, UINT32_MAX, h->payload_len,
                           CP_PAGES_PREFIX_SIZE + (uint64_t)n * CP_SEALED_PAGE_SIZE);
    if (reserved)
        return frame_error(L, CP_E_FLAGS, UINT32_MAX, reserved, 0);
    /* checked from the copy the tag covered */
    for (uint32_t k = 0; k < count; k++)
        if (check_record(L, o + (size_t)k * CP_SEALED_HEADER_SIZE, k, NULL))
            return s->stop;
    if (s->pages + count > s->count)
        return frame_error(L, CP_E_SPACE, UINT32_MAX, s->pages + count, s->count);
    uint64_t *out = (uint64_t *)s->gpas + s->pages;
    const uint8_t *hdrs = L->aad + CP_HEADER_SIZE + CP_PAGES_PREFIX_SIZE;
    for (uint32_t k = 0; k < count; k++)
        memcpy(&out[k], hdrs + (size_t)k * CP_SEALED_HEADER_SIZE, 8);
    post(L, i, CP_MB_OP_LOAD, count, first, 0);
    s->seq++;
    s->frames++;
    s->pages += count;
    s->bytes += CP_HEADER_SIZE + h->payload_len;
    return CP_DP_DONE;
}

int32_t cp_dp_recv_sealed(struct cp_dp_stream *s, cp_dp_poke_fn poke)
{
    struct loop L;
    if (loop_open(&L, s, poke))
        return loop_close(&L);
    uint32_t i = 0; /* where the search for a free bank starts: round robin over the mailboxes */
    for (;;) {
        struct cp_frame_header h;
        if (recv_exact(&L, s->next_header, CP_HEADER_SIZE))
            break;
        uint32_t count;
        struct cp_error ignored;
        if (cp_header_check(s->next_header, CP_HEADER_SIZE, &h, &ignored) != CP_OK)
            break;
        uint32_t pick = free_mailbox(&L, i);
        /* anything but a well-formed sealed frame of this stream is Python's (FrameReader refuses it with
         * the message it always gave); every LOAD finishes first */
        if (pick == UINT32_MAX || !ours(&L, &h, s->mailboxes[pick].bank_slots, &count))
            break;
        struct mbq *m = &L.mq[pick];
        memcpy(L.aad, s->next_header, CP_HEADER_SIZE);
        if (recv_bank(&L, pick, m->next_bank * s->mailboxes[pick].bank_slots, &h, count) || look(&L, now_s()))
            break;
        m->next_bank = (m->next_bank + 1) % s->mailboxes[pick].banks;
        i = (pick + 1) % s->n_mailboxes;
    }
    /* every LOAD must be done and checked before the frame that ends them is applied */
    for (uint32_t k = 0; k < s->n_mailboxes && !s->stop; k++)
        while (L.mq && L.mq[k].n && !finish_oldest(&L, k))
            ;
    return loop_close(&L);
}
