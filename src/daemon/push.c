/*
 * push.c: pushing a big file's chunk bytes to the peers beside the Raft log,
 * and receiving such pushes (see push.h and doc/decisions.md D13).
 */
#include <config.h>

#include "daemon/push.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"

/* Header of a PUSH: version, push id, batch, count. */
#define PUSH_HDR_LEN (1 + 8 + 4 + 2)
/* Per chunk: id and length. */
#define PUSH_ITEM_HDR (32 + 4)
#define PUSH_ACK_LEN  (1 + 8 + 4 + 1)
/* Rejections logged at most this often. */
#define PUSH_WARN_EVERY_MS 10000u

struct push_target {
    uint64_t id;
    bool voter;
    bool left;
    uint32_t acked;       /* batches acknowledged, in order */
    uint64_t unacked;     /* bytes sent, not acknowledged */
    uint64_t progress_ms; /* last send into an empty window, or last ack */
};

struct push {
    struct push_ops ops;
    bool active;
    uint64_t id;
    struct push_target peers[PUSH_MAX_PEERS];
    size_t n_peers;
    uint64_t *batch_bytes; /* chunk bytes of each batch sent */
    uint32_t n_batches, cap_batches;
    uint64_t next_collect_ms;
    bool hold_collect;
    uint64_t warned_ms;
    struct push_stats st;
    void (*obs)(void *arg);
    void *obs_arg;
    uint64_t crash_at; /* tests (PICKBOX_TEST_PUSH_CRASH): see push_on_push */
};

static void push_notify(struct push *p)
{
    if (p->obs != NULL)
        p->obs(p->obs_arg);
}

void push_set_observer(struct push *p, void (*fn)(void *arg), void *arg)
{
    p->obs = fn;
    p->obs_arg = arg;
}

struct push *push_new(const struct push_ops *ops)
{
    struct push *p = pb_xcalloc(1, sizeof(*p));
    p->ops = *ops;
    const char *crash = getenv("PICKBOX_TEST_PUSH_CRASH");
    if (crash != NULL && pb_parse_u64(crash, 1, UINT32_MAX, &p->crash_at) < 0)
        p->crash_at = 0;
    return p;
}

void push_free(struct push *p)
{
    if (p == NULL)
        return;
    free(p->batch_bytes);
    free(p);
}

void push_get_stats(const struct push *p, struct push_stats *out)
{
    *out = p->st;
}

/* ---- sender ---- */

static struct push_target *target_of(struct push *p, uint64_t id)
{
    for (size_t i = 0; i < p->n_peers; i++)
        if (p->peers[i].id == id)
            return &p->peers[i];
    return NULL;
}

int push_start(struct push *p, const struct push_peer *peers, size_t n, uint64_t now_ms)
{
    if (n > PUSH_MAX_PEERS)
        return -EINVAL;
    push_stop(p);
    uint64_t id = 0;
    if (RAND_bytes((unsigned char *)&id, sizeof(id)) != 1)
        id = pb_now_us() ^ ((uint64_t)(uintptr_t)p << 16);
    p->id = id ? id : 1;
    p->active = true;
    p->n_peers = 0;
    for (size_t i = 0; i < n; i++) {
        if (target_of(p, peers[i].id) != NULL)
            continue; /* one peer, one vote */
        struct push_target *t = &p->peers[p->n_peers++];
        memset(t, 0, sizeof(*t));
        t->id = peers[i].id;
        t->voter = peers[i].voter;
        t->progress_ms = now_ms;
    }
    return 0;
}

void push_stop(struct push *p)
{
    p->active = false;
    p->n_peers = 0;
    p->n_batches = 0;
}

static void target_leave(struct push *p, struct push_target *t, const char *why)
{
    if (t->left)
        return;
    t->left = true;
    p->st.peers_left++;
    log_info("push %016" PRIx64 ": peer %016" PRIx64 " left it (%s); it fetches the bytes later",
             p->id, t->id, why);
    push_notify(p);
}

bool push_room(const struct push *p, size_t bytes)
{
    if (!p->active)
        return false;
    for (size_t i = 0; i < p->n_peers; i++) {
        const struct push_target *t = &p->peers[i];
        if (!t->left && t->unacked > 0 && t->unacked + bytes > PUSH_WINDOW_BYTES)
            return false;
    }
    return true;
}

/* One PUSH frame of in[0..n) to every peer still in the push. */
static void send_frame(struct push *p, const struct statedb_chunk_in *in, size_t n, uint64_t bytes,
                       uint64_t now_ms)
{
    struct buf b = BUF_INIT;
    buf_put_u8(&b, PUSH_VERSION);
    buf_put_u64(&b, p->id);
    buf_put_u32(&b, p->n_batches);
    buf_put_u16(&b, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        buf_put(&b, in[i].id, STATEDB_ID_LEN);
        buf_put_u32(&b, in[i].len);
        buf_put(&b, in[i].data, in[i].len);
    }
    if (p->n_batches == p->cap_batches) {
        p->cap_batches = p->cap_batches ? 2 * p->cap_batches : 64;
        p->batch_bytes = pb_xreallocarray(p->batch_bytes, p->cap_batches, sizeof(*p->batch_bytes));
    }
    p->batch_bytes[p->n_batches++] = bytes;
    for (size_t i = 0; i < p->n_peers; i++) {
        struct push_target *t = &p->peers[i];
        if (t->left)
            continue;
        int rc = p->ops.send(p->ops.arg, t->id, false, b.data, b.len);
        if (rc < 0) {
            target_leave(p, t, strerror(-rc));
            continue;
        }
        if (t->unacked == 0)
            t->progress_ms = now_ms;
        t->unacked += bytes;
        p->st.sent_frames++;
        p->st.sent_bytes += bytes;
    }
    buf_free(&b);
}

int push_send(struct push *p, const struct statedb_chunk_in *in, size_t n, uint64_t now_ms)
{
    if (!p->active)
        return -EINVAL;
    size_t i = 0;
    while (i < n) {
        size_t k = 0;
        uint64_t bytes = 0;
        while (i + k < n && k < PUSH_BATCH_MAX &&
               (k == 0 || bytes + in[i + k].len <= PUSH_FRAME_BYTES)) {
            if (in[i + k].len == 0 || in[i + k].len > PUSH_CHUNK_MAX)
                return -EINVAL;
            bytes += in[i + k++].len;
        }
        send_frame(p, in + i, k, bytes, now_ms);
        i += k;
    }
    return 0;
}

void push_progress_get(const struct push *p, struct push_progress *out)
{
    memset(out, 0, sizeof(*out));
    out->active = p->active;
    if (!p->active)
        return;
    out->peers = p->n_peers;
    out->batches = p->n_batches;
    for (size_t i = 0; i < p->n_peers; i++) {
        const struct push_target *t = &p->peers[i];
        if (t->left) {
            out->left++;
            continue;
        }
        if (t->voter)
            out->voters_in++;
        if (t->acked == p->n_batches) {
            out->complete++;
            if (t->voter)
                out->voters_complete++;
        }
    }
}

void push_set_voters(struct push *p, const struct push_peer *cur, size_t n)
{
    for (size_t i = 0; p->active && i < p->n_peers; i++) {
        struct push_target *t = &p->peers[i];
        bool voter = false;
        for (size_t k = 0; k < n; k++)
            if (cur[k].id == t->id)
                voter = cur[k].voter;
        t->voter = voter;
    }
}

void push_hold_collect(struct push *p, bool hold)
{
    p->hold_collect = hold;
}

void push_on_ack(struct push *p, uint64_t from, const uint8_t *data, size_t len, uint64_t now_ms)
{
    struct cursor c;
    cursor_init(&c, data, len);
    uint8_t ver = cursor_u8(&c);
    uint64_t id = cursor_u64(&c);
    uint32_t batch = cursor_u32(&c);
    uint8_t status = cursor_u8(&c);
    if (!cursor_ok(&c) || ver != PUSH_VERSION) {
        log_debug("push: malformed ack from %016" PRIx64, from);
        return;
    }
    struct push_target *t = p->active && id == p->id ? target_of(p, from) : NULL;
    if (t == NULL || t->left)
        return; /* an earlier push, or a peer that already left */
    if (status != PUSH_STORED) {
        target_leave(p, t, status == PUSH_REJECTED ? "it rejected a batch" : "it could not store");
        return;
    }
    if (batch != t->acked || batch >= p->n_batches) {
        target_leave(p, t, "acknowledgement out of order");
        return;
    }
    uint64_t bytes = p->batch_bytes[batch];
    t->acked++;
    t->unacked -= bytes <= t->unacked ? bytes : t->unacked;
    t->progress_ms = now_ms;
    p->st.acked_frames++;
    p->st.acked_bytes += bytes;
    push_notify(p);
}

void push_peer_down(struct push *p, uint64_t node_id)
{
    struct push_target *t = p->active ? target_of(p, node_id) : NULL;
    if (t != NULL)
        target_leave(p, t, "link down");
}

void push_tick(struct push *p, struct statedb *db, uint64_t now_ms)
{
    for (size_t i = 0; p->active && i < p->n_peers; i++) {
        struct push_target *t = &p->peers[i];
        if (!t->left && t->unacked > 0 && now_ms - t->progress_ms >= PUSH_ACK_TIMEOUT_MS)
            target_leave(p, t, "no acknowledgement in time");
    }
    if (db == NULL || p->hold_collect)
        return;
    if (p->next_collect_ms == 0)
        p->next_collect_ms = now_ms + PUSH_COLLECT_EVERY_MS;
    if (now_ms < p->next_collect_ms)
        return;
    p->next_collect_ms = now_ms + PUSH_COLLECT_EVERY_MS;
    uint64_t n = 0;
    int rc = statedb_chunk_data_collect_unrowed(db, now_ms, PUSH_UNROWED_MAX_AGE_MS, &n);
    if (rc < 0)
        log_warning("push: collecting pushed chunks never referenced: %s", statedb_errmsg(db));
    else if (n > 0)
        log_info("push: removed %" PRIu64 " pushed chunks that no committed entry named", n);
    p->st.unrowed_collected += n;
}

/* ---- receiver ---- */

int push_decode(const uint8_t *data, size_t len, uint64_t *id, uint32_t *batch,
                struct statedb_chunk_in *out, size_t max, size_t *n, struct pb_error *err)
{
    struct cursor c;
    *n = 0;
    cursor_init(&c, data, len);
    uint8_t ver = cursor_u8(&c);
    *id = cursor_u64(&c);
    *batch = cursor_u32(&c);
    uint16_t count = cursor_u16(&c);
    if (!cursor_ok(&c))
        return pb_error_set(err, -EPROTO, "truncated header");
    if (ver != PUSH_VERSION)
        return pb_error_set(err, -EPROTO, "version %u (this node reads %u)", ver, PUSH_VERSION);
    if (count == 0 || count > PUSH_BATCH_MAX || count > max)
        return pb_error_set(err, -EPROTO, "%u chunks (1..%u)", count, PUSH_BATCH_MAX);
    uint64_t total = 0;
    for (size_t i = 0; i < count; i++) {
        const uint8_t *cid = cursor_take(&c, STATEDB_ID_LEN);
        uint32_t clen = cursor_u32(&c);
        if (!cursor_ok(&c))
            return pb_error_set(err, -EPROTO, "chunk %zu truncated", i);
        if (clen == 0 || clen > PUSH_CHUNK_MAX)
            return pb_error_set(err, -EPROTO, "chunk %zu has length %u (1..%u)", i, clen,
                                PUSH_CHUNK_MAX);
        const uint8_t *bytes = cursor_take(&c, clen);
        if (bytes == NULL)
            return pb_error_set(err, -EPROTO, "chunk %zu truncated", i);
        total += clen;
        if (total > PUSH_FRAME_BYTES)
            return pb_error_set(err, -EPROTO, "over %u bytes of chunks", PUSH_FRAME_BYTES);
        out[i].id = cid;
        out[i].data = bytes;
        out[i].len = clen;
    }
    if (cursor_remaining(&c) != 0)
        return pb_error_set(err, -EPROTO, "%zu trailing bytes", cursor_remaining(&c));
    for (size_t i = 0; i < count; i++) {
        uint8_t h[FSM_CHUNK_ID_LEN];
        if (fsm_sha256(out[i].data, out[i].len, h) < 0)
            return pb_error_set(err, -EIO, "SHA-256 failed");
        if (memcmp(h, out[i].id, FSM_CHUNK_ID_LEN) != 0)
            return pb_error_set(err, -EBADMSG, "chunk %zu does not hash to its id", i);
    }
    *n = count;
    return 0;
}

/* PICKBOX_TEST_PUSH_CRASH=N: the N-th PUSH this process stores kills it
 * once its bytes are in the pack and before their index commits (the state
 * a kill -9 or a power cut leaves at that moment: a pack tail never
 * committed, cut at the next open). */
static void push_crash_now(void)
{
    log_notice("push: PICKBOX_TEST_PUSH_CRASH: killed before the index of pushed bytes commits");
    raise(SIGKILL);
}

static int store_pushed(struct push *p, struct statedb *db, const struct statedb_chunk_in *in,
                        size_t n)
{
    bool crash = p->crash_at != 0 && p->st.received_frames + 1 == p->crash_at;
    if (crash)
        statedb_test_before_data_commit(push_crash_now);
    int rc = statedb_chunk_data_put_many(db, in, n);
    if (crash)
        statedb_test_before_data_commit(NULL);
    return rc;
}

static void send_ack(struct push *p, uint64_t to, uint64_t id, uint32_t batch, uint8_t status)
{
    uint8_t a[PUSH_ACK_LEN];
    a[0] = PUSH_VERSION;
    pb_store_u64(a + 1, id);
    pb_store_u32(a + 9, batch);
    a[13] = status;
    int rc = p->ops.send(p->ops.arg, to, true, a, sizeof(a));
    if (rc < 0)
        log_debug("push: ack to %016" PRIx64 ": %s", to, strerror(-rc));
}

size_t push_on_push(struct push *p, struct statedb *db, uint64_t from, const uint8_t *data,
                    size_t len)
{
    size_t referenced = 0;
    struct statedb_chunk_in *in = pb_xcalloc(PUSH_BATCH_MAX, sizeof(*in));
    uint64_t id = 0;
    uint32_t batch = 0;
    size_t n = 0;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = push_decode(data, len, &id, &batch, in, PUSH_BATCH_MAX, &n, &err);
    uint8_t status = PUSH_STORED;
    if (rc < 0) {
        p->st.rejected_frames++;
        status = PUSH_REJECTED;
        uint64_t now = pb_now_ms();
        if (p->warned_ms == 0 || now - p->warned_ms >= PUSH_WARN_EVERY_MS) {
            p->warned_ms = now;
            log_warning("push: rejected a PUSH of %zu bytes from %016" PRIx64 ": %s (%" PRIu64
                        " rejected so far)",
                        len, from, err.msg, p->st.rejected_frames);
        }
    } else if (db == NULL) {
        p->st.failed_frames++;
        status = PUSH_FAILED;
    } else if ((rc = store_pushed(p, db, in, n)) < 0) {
        p->st.failed_frames++;
        status = PUSH_FAILED;
        log_warning("push: cannot store %zu pushed chunks: %s", n, statedb_errmsg(db));
    } else {
        p->st.received_frames++;
        for (size_t i = 0; i < n; i++) {
            p->st.received_bytes += in[i].len;
            uint64_t refs = 0;
            if (statedb_chunk_refs(db, in[i].id, &refs) == 0 && refs > 0)
                referenced++;
        }
    }
    free(in);
    if (rc == -EPROTO && len < PUSH_HDR_LEN)
        return 0; /* not even a header to answer */
    send_ack(p, from, id, batch, status);
    return referenced;
}
