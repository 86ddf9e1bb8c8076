/*
 * fetch.c: fetches the chunk bytes this node lacks from its peers, verifies
 * them and stores them; serves the same requests for peers (see fetch.h).
 */
#include <config.h>

#include "daemon/fetch.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/sm.h"
#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "store/statedb.h"

_Static_assert(FETCH_CHUNK_MAX == FSM_CHUNK_MAX_LEN, "the fetcher's chunk limit is the chunker's");
_Static_assert(STATEDB_ID_LEN == FSM_CHUNK_ID_LEN, "one chunk id size");

#define FETCH_PEERS_MAX 16
/* Between two repairs while a long pass stores bytes. */
#define FETCH_REPAIR_EVERY_MS 2000u

struct want {
    struct statedb_ref ref;
    bool got;
};

struct fetch {
    struct fetch_ops ops;
    bool active;
    /* the pass: chunks with ids after `cursor` are still to be looked at */
    uint8_t cursor[STATEDB_ID_LEN];
    bool have_cursor;
    uint64_t pass_fetched, pass_bytes, pass_unavailable;
    uint64_t retry_at_ms; /* 0: none */
    unsigned backoff_ms;
    uint64_t last_repair_ms;
    bool stored_since_repair;
    /* the batch */
    struct want batch[FETCH_BATCH_MAX];
    size_t n_batch;
    uint64_t peers[FETCH_PEERS_MAX];
    size_t n_peers, peer_at; /* peers[peer_at] has the request in flight */
    uint64_t req_id, next_req_id;
    uint64_t deadline_ms; /* 0: nothing in flight */
    struct fetch_stats st;
};

struct fetch *fetch_new(const struct fetch_ops *ops)
{
    struct fetch *f = pb_xcalloc(1, sizeof(*f));
    f->ops = *ops;
    f->backoff_ms = FETCH_BACKOFF_MIN;
    f->next_req_id = 1;
    return f;
}

void fetch_free(struct fetch *f)
{
    free(f);
}

void fetch_peer_up(struct fetch *f)
{
    if (f->retry_at_ms != 0) {
        f->retry_at_ms = 1;
        f->backoff_ms = FETCH_BACKOFF_MIN;
    }
}

void fetch_get_stats(const struct fetch *f, struct fetch_stats *out)
{
    *out = f->st;
    out->active = f->active;
}

static void fetch_repair(struct fetch *f, struct sm *sm, uint64_t now_ms)
{
    f->last_repair_ms = now_ms;
    f->stored_since_repair = false;
    sm_repair(sm);
}

/* The pass is over: report, repair, and come back later if chunks were
 * unavailable. */
static void fetch_pass_end(struct fetch *f, struct sm *sm, uint64_t now_ms)
{
    f->active = false;
    f->deadline_ms = 0;
    f->n_batch = 0;
    if (f->stored_since_repair)
        fetch_repair(f, sm, now_ms);
    f->st.unavailable = f->pass_unavailable;
    struct statedb_status s;
    if (statedb_status_get(sm_statedb(sm), 0, 0, &s) == 0)
        f->st.missing = s.missing;
    if (f->pass_unavailable > 0 || f->st.missing > 0) {
        log_warning("chunk fetch: %" PRIu64 " chunk(s) fetched (%" PRIu64 " bytes), %" PRIu64
                    " still missing (no connected peer had them: links not up yet, or "
                    "collected since, and a later entry replaces those files); retrying in "
                    "%u s",
                    f->pass_fetched, f->pass_bytes, f->st.missing, f->backoff_ms / 1000);
        f->retry_at_ms = now_ms + f->backoff_ms;
        f->backoff_ms = PB_MIN(f->backoff_ms * 2, FETCH_BACKOFF_MAX);
    } else {
        log_notice("chunk fetch: complete, %" PRIu64 " chunk(s) fetched (%" PRIu64 " bytes)",
                   f->pass_fetched, f->pass_bytes);
        f->retry_at_ms = 0;
        f->backoff_ms = FETCH_BACKOFF_MIN;
    }
}

/* Sends what the batch still lacks to the next peer that takes it; when no
 * peer is left, the rest is unavailable for this pass. */
static void fetch_send_next(struct fetch *f, struct sm *sm, uint64_t now_ms);

static void fetch_next_batch(struct fetch *f, struct sm *sm, uint64_t now_ms)
{
    struct statedb_ref refs[FETCH_BATCH_MAX];
    size_t n = 0;
    int rc = statedb_chunk_missing(sm_statedb(sm), f->have_cursor ? f->cursor : NULL, refs,
                                   FETCH_BATCH_MAX, &n);
    if (rc < 0) {
        log_warning("chunk fetch: %s", statedb_errmsg(sm_statedb(sm)));
        f->pass_unavailable++; /* come back later */
        fetch_pass_end(f, sm, now_ms);
        return;
    }
    if (n == 0) {
        fetch_pass_end(f, sm, now_ms);
        return;
    }
    uint64_t bytes = 0;
    f->n_batch = 0;
    for (size_t i = 0; i < n; i++) {
        if (f->n_batch > 0 && bytes + refs[i].len > FETCH_BATCH_BYTES)
            break;
        bytes += refs[i].len;
        f->batch[f->n_batch].ref = refs[i];
        f->batch[f->n_batch].got = false;
        f->n_batch++;
    }
    memcpy(f->cursor, f->batch[f->n_batch - 1].ref.id, STATEDB_ID_LEN);
    f->have_cursor = true;
    f->n_peers = f->ops.peers(f->ops.arg, f->peers, FETCH_PEERS_MAX);
    f->peer_at = 0;
    if (f->n_peers == 0) {
        log_info("chunk fetch: no peer connected; retrying later");
        f->pass_unavailable += f->n_batch;
        f->n_batch = 0;
        fetch_pass_end(f, sm, now_ms);
        return;
    }
    fetch_send_next(f, sm, now_ms);
}

static void fetch_send_next(struct fetch *f, struct sm *sm, uint64_t now_ms)
{
    for (;;) {
        size_t left = 0;
        for (size_t i = 0; i < f->n_batch; i++)
            left += !f->batch[i].got;
        if (left == 0) {
            fetch_next_batch(f, sm, now_ms);
            return;
        }
        if (f->peer_at >= f->n_peers) {
            f->pass_unavailable += left;
            log_info("chunk fetch: %zu chunk(s) not on any of %zu peer(s)", left, f->n_peers);
            fetch_next_batch(f, sm, now_ms);
            return;
        }
        struct buf b = BUF_INIT;
        f->req_id = f->next_req_id++;
        buf_put_u8(&b, FETCH_VERSION);
        buf_put_u64(&b, f->req_id);
        buf_put_u16(&b, (uint16_t)left);
        for (size_t i = 0; i < f->n_batch; i++) {
            if (f->batch[i].got)
                continue;
            buf_put(&b, f->batch[i].ref.id, STATEDB_ID_LEN);
            buf_put_u32(&b, f->batch[i].ref.len);
        }
        uint64_t peer = f->peers[f->peer_at];
        int rc = f->ops.send(f->ops.arg, peer, false, b.data, b.len);
        buf_free(&b);
        if (rc == 0) {
            f->st.requests++;
            f->deadline_ms = now_ms + FETCH_TIMEOUT_MS;
            log_debug("chunk fetch: asked %016" PRIx64 " for %zu chunk(s)", peer, left);
            return;
        }
        log_debug("chunk fetch: cannot ask %016" PRIx64 ": %s", peer, strerror(-rc));
        f->peer_at++;
    }
}

void fetch_tick(struct fetch *f, struct sm *sm, uint64_t now_ms)
{
    if (sm == NULL || sm_fsm(sm) == NULL)
        return;
    if (f->active) {
        if (f->deadline_ms != 0 && now_ms >= f->deadline_ms) {
            log_info("chunk fetch: no reply from %016" PRIx64 " within %u ms; asking the next peer",
                     f->peers[f->peer_at], FETCH_TIMEOUT_MS);
            f->deadline_ms = 0;
            f->peer_at++;
            fetch_send_next(f, sm, now_ms);
        } else if (f->stored_since_repair && now_ms >= f->last_repair_ms + FETCH_REPAIR_EVERY_MS) {
            fetch_repair(f, sm, now_ms);
        }
        return;
    }
    bool wanted = sm_chunks_wanted(sm);
    if (!wanted && (f->retry_at_ms == 0 || now_ms < f->retry_at_ms))
        return;
    struct statedb_status s;
    if (statedb_status_get(sm_statedb(sm), 0, 0, &s) < 0)
        return;
    f->st.missing = s.missing;
    if (s.missing == 0) {
        f->retry_at_ms = 0;
        f->backoff_ms = FETCH_BACKOFF_MIN;
        return;
    }
    log_notice("chunk fetch: %" PRIu64 " chunk(s) (%" PRIu64 " bytes) missing here; fetching "
               "them from peers",
               s.missing, s.missing_bytes);
    f->active = true;
    f->have_cursor = false;
    f->pass_fetched = f->pass_bytes = f->pass_unavailable = 0;
    f->last_repair_ms = now_ms;
    fetch_next_batch(f, sm, now_ms);
}

void fetch_on_reply(struct fetch *f, struct sm *sm, uint64_t from, const uint8_t *p, size_t len,
                    uint64_t now_ms)
{
    struct cursor c;
    cursor_init(&c, p, len);
    uint8_t version = cursor_u8(&c);
    uint64_t req_id = cursor_u64(&c);
    uint16_t n = cursor_u16(&c);
    if (!cursor_ok(&c) || version != FETCH_VERSION || n > FETCH_BATCH_MAX) {
        f->st.rejected++;
        log_warning("chunk fetch: malformed reply from %016" PRIx64 " (%zu bytes): dropped", from,
                    len);
        return;
    }
    if (sm == NULL || !f->active || f->deadline_ms == 0 || req_id != f->req_id ||
        from != f->peers[f->peer_at]) {
        log_debug("chunk fetch: stale reply %" PRIu64 " from %016" PRIx64 ": dropped", req_id,
                  from);
        return;
    }
    unsigned stored = 0, absent = 0, bad = 0;
    struct statedb_chunk_in in[FETCH_BATCH_MAX];
    struct want *got[FETCH_BATCH_MAX];
    size_t n_in = 0;
    for (uint16_t k = 0; k < n; k++) {
        const uint8_t *id = cursor_take(&c, STATEDB_ID_LEN);
        uint8_t status = cursor_u8(&c);
        const uint8_t *data = NULL;
        size_t dlen = 0;
        if (status == FETCH_HERE)
            data = cursor_bytes(&c, FETCH_CHUNK_MAX, &dlen);
        if (!cursor_ok(&c) || status > FETCH_LATER) {
            bad++;
            log_warning("chunk fetch: malformed item in the reply from %016" PRIx64
                        ": rest dropped",
                        from);
            break;
        }
        struct want *w = NULL;
        for (size_t i = 0; i < f->n_batch && w == NULL; i++)
            if (!f->batch[i].got && memcmp(f->batch[i].ref.id, id, STATEDB_ID_LEN) == 0)
                w = &f->batch[i];
        if (status != FETCH_HERE) {
            absent += w != NULL;
            continue;
        }
        uint8_t h[FSM_CHUNK_ID_LEN];
        if (w == NULL) {
            bad++;
            log_warning("chunk fetch: %016" PRIx64 " sent a chunk that was not asked for: "
                        "rejected",
                        from);
            continue;
        }
        if (dlen != w->ref.len || fsm_sha256(data, dlen, h) < 0 ||
            memcmp(h, id, STATEDB_ID_LEN) != 0) {
            bad++;
            log_warning("chunk fetch: %016" PRIx64 " sent a chunk whose bytes (%zu) do not "
                        "match its id: rejected",
                        from, dlen);
            continue;
        }
        w->got = true; /* a peer sending it twice in one reply: stored once */
        in[n_in] = (struct statedb_chunk_in){.id = id, .data = data, .len = (uint32_t)dlen};
        got[n_in++] = w;
    }
    /* the reply's chunks in one durable write (one pack sync) */
    if (n_in > 0) {
        int rc = sm_chunk_store(sm, in, n_in);
        if (rc == 0) {
            stored = (unsigned)n_in;
            for (size_t i = 0; i < n_in; i++) {
                f->pass_fetched++;
                f->pass_bytes += got[i]->ref.len;
            }
        } else {
            for (size_t i = 0; i < n_in; i++)
                got[i]->got = false;
            log_warning("chunk fetch: cannot store %zu chunk(s): %s", n_in,
                        statedb_errmsg(sm_statedb(sm)));
        }
    }
    f->st.rejected += bad;
    log_debug("chunk fetch: %016" PRIx64 ": %u stored, %u not there, %u rejected", from, stored,
              absent, bad);
    if (stored > 0)
        f->stored_since_repair = true;
    f->deadline_ms = 0;
    /* what this peer did not give, the next one may have; a complete
     * batch goes on with the next (from the first peer again) */
    f->peer_at++;
    fetch_send_next(f, sm, now_ms);
}

void fetch_on_request(struct fetch *f, struct sm *sm, uint64_t from, const uint8_t *p, size_t len)
{
    struct cursor c;
    cursor_init(&c, p, len);
    uint8_t version = cursor_u8(&c);
    uint64_t req_id = cursor_u64(&c);
    uint16_t n = cursor_u16(&c);
    if (!cursor_ok(&c) || version != FETCH_VERSION || n == 0 || n > FETCH_BATCH_MAX ||
        cursor_remaining(&c) != (size_t)n * (STATEDB_ID_LEN + 4)) {
        log_warning("chunk fetch: malformed request from %016" PRIx64 " (%zu bytes): dropped", from,
                    len);
        return;
    }
    struct buf b = BUF_INIT;
    buf_put_u8(&b, FETCH_VERSION);
    buf_put_u64(&b, req_id);
    buf_put_u16(&b, n);
    uint8_t *chunk = NULL;
    size_t budget = FETCH_BATCH_BYTES;
    for (uint16_t k = 0; k < n; k++) {
        const uint8_t *id = cursor_take(&c, STATEDB_ID_LEN);
        uint32_t clen = cursor_u32(&c);
        buf_put(&b, id, STATEDB_ID_LEN);
        if (sm == NULL || clen > FETCH_CHUNK_MAX) {
            buf_put_u8(&b, FETCH_ABSENT);
            continue;
        }
        if (clen > budget) {
            buf_put_u8(&b, FETCH_LATER);
            continue;
        }
        if (chunk == NULL)
            chunk = pb_xmalloc(FETCH_CHUNK_MAX);
        int rc = statedb_chunk_get(sm_statedb(sm), id, chunk, clen);
        if (rc < 0) {
            buf_put_u8(&b, FETCH_ABSENT);
            continue;
        }
        buf_put_u8(&b, FETCH_HERE);
        buf_put_bytes(&b, chunk, clen);
        budget -= clen;
        f->st.served_chunks++;
        f->st.served_bytes += clen;
    }
    free(chunk);
    int rc = f->ops.send(f->ops.arg, from, true, b.data, b.len);
    if (rc < 0)
        log_debug("chunk fetch: cannot answer %016" PRIx64 ": %s", from, strerror(-rc));
    buf_free(&b);
}
