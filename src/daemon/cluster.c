/*
 * cluster.c: the Raft driver (see cluster.h): the ready/persist/advance loop,
 * startup and restart, snapshots, membership upkeep and status.
 * cluster_req.c serves the control requests on top of it.
 */
#include <config.h>

#include "daemon/cluster_int.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <event2/event.h>

#include "ctl/ctl.h"
#include "daemon/nodeconf.h"
#include "daemon/secret.h"
#include "lib/buf.h"
#include "lib/util.h"

#define CLUSTER_CTX_VERSION    1
#define CLUSTER_INQ_MAX        8192 /* peer messages queued while frozen */
#define CLUSTER_INQ_MAX_BYTES  (64u << 20)
#define CLUSTER_MAX_MSG_BYTES  (192u * 1024u) /* entries per AppendEntries: one control frame */
#define CLUSTER_SNAP_CHUNK     (1u << 20)
#define CLUSTER_GONE_LINGER_MS 5000

/* Bytes of local proposals queued while frozen: a big file's writer keeps
 * its byte budget (replica.c) in flight, and the next batch takes what came
 * while the previous one was fsynced. */
#define CLUSTER_PROPQ_MAX_BYTES (16u << 20)

/* ---- member context ---- */

int cluster_ctx_encode(const char *name, const char *addr, uint8_t **out, size_t *len)
{
    struct buf b = BUF_INIT;
    buf_put_u8(&b, CLUSTER_CTX_VERSION);
    buf_put_str(&b, name);
    buf_put_str(&b, addr ? addr : "");
    *out = buf_steal(&b, len);
    return 0;
}

int cluster_ctx_decode(const uint8_t *p, size_t len, char name[65], char addr[CLUSTER_ADDR_MAX])
{
    struct cursor c;
    cursor_init(&c, p, len);
    uint8_t ver = cursor_u8(&c);
    size_t nl = 0, al = 0;
    const uint8_t *n = cursor_bytes(&c, 64, &nl);
    const uint8_t *a = cursor_bytes(&c, CLUSTER_ADDR_MAX - 1, &al);
    if (!cursor_ok(&c) || ver != CLUSTER_CTX_VERSION || nl == 0 || memchr(n, 0, nl) ||
        (al && memchr(a, 0, al)))
        return -EINVAL;
    memcpy(name, n, nl);
    name[nl] = '\0';
    if (al)
        memcpy(addr, a, al);
    addr[al] = '\0';
    return 0;
}

/* ---- small helpers ---- */

void cluster_hex(const uint8_t *p, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", p[i]);
    out[2 * n] = '\0';
}

uint64_t cluster_random_u64(void)
{
    uint64_t v = 0;
    while (v == 0) {
        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
            v = pb_now_us() ^ ((uint64_t)getpid() << 32);
    }
    return v;
}

const struct cluster_member *cluster_member_by_id(const struct cluster *c, uint64_t id)
{
    for (size_t i = 0; i < c->n_members; i++) {
        if (c->members[i].id == id)
            return &c->members[i];
    }
    return NULL;
}

const struct cluster_member *cluster_member_by_name(const struct cluster *c, const char *name)
{
    for (size_t i = 0; i < c->n_members; i++) {
        if (strcmp(c->members[i].name, name) == 0)
            return &c->members[i];
    }
    return NULL;
}

const char *cluster_name_of(struct cluster *c, uint64_t id)
{
    if (id == RAFT_NONE)
        return NULL;
    if (id == c->id)
        return c->cfg->node_id;
    const struct cluster_member *m = cluster_member_by_id(c, id);
    if (m != NULL)
        return m->name;
    /* Not in our configuration (yet): the name it gave in its HELLO. */
    struct net_peer_stats ps;
    if (c->net != NULL && net_peer_stats(c->net, id, &ps) == 0 && ps.name[0] != '\0') {
        snprintf(c->name_buf, sizeof(c->name_buf), "%s", ps.name);
        return c->name_buf;
    }
    return NULL;
}

void cluster_schedule(struct cluster *c)
{
    if (!c->scheduled && !c->closing) {
        c->scheduled = true;
        event_active(c->process_ev, EV_READ, 0);
    }
}

/* ---- membership upkeep: the cached member table and net's peer list ---- */

static bool cluster_conf_same(const struct cluster *c, const struct raft_conf *conf)
{
    if (conf->n != c->n_members)
        return false;
    for (size_t i = 0; i < conf->n; i++) {
        const struct raft_member *m = &conf->members[i];
        const struct cluster_member *x = &c->members[i];
        if (m->id != x->id || (m->role == RAFT_VOTER) != x->voter || m->ctx_len != x->ctx_len ||
            (m->ctx_len && memcmp(m->ctx, x->ctx, m->ctx_len) != 0))
            return false;
    }
    return true;
}

void cluster_sync_conf(struct cluster *c)
{
    const struct raft_conf *conf = raft_conf(c->raft);
    if (cluster_conf_same(c, conf))
        return;
    struct cluster_member *old = c->members;
    size_t n_old = c->n_members;
    c->members = pb_xcalloc(conf->n ? conf->n : 1, sizeof(*c->members));
    c->n_members = conf->n;
    for (size_t i = 0; i < conf->n; i++) {
        const struct raft_member *m = &conf->members[i];
        struct cluster_member *x = &c->members[i];
        x->id = m->id;
        x->voter = m->role == RAFT_VOTER;
        x->ctx = pb_xmalloc(m->ctx_len ? m->ctx_len : 1);
        memcpy(x->ctx, m->ctx, m->ctx_len);
        x->ctx_len = m->ctx_len;
        if (cluster_ctx_decode(m->ctx, m->ctx_len, x->name, x->addr) < 0) {
            snprintf(x->name, sizeof(x->name), "%016" PRIx64, m->id);
            x->addr[0] = '\0';
        }
        if (m->id == c->id)
            continue;
        const struct cluster_member *was = NULL;
        for (size_t j = 0; j < n_old; j++) {
            if (old[j].id == m->id)
                was = &old[j];
        }
        if (was == NULL)
            log_info("member %s (%016" PRIx64 ", %s) is in the configuration as a %s", x->name,
                     x->id, x->addr, x->voter ? "voter" : "learner");
        else if (was->voter != x->voter)
            log_info("member %s is now a %s", x->name, x->voter ? "voter" : "learner");
        if (x->addr[0] != '\0' && (was == NULL || strcmp(was->addr, x->addr) != 0)) {
            struct pb_error err;
            if (net_peer_add(c->net, x->id, x->addr, &err) < 0)
                log_warning("cannot add peer %s at %s: %s", x->name, x->addr, err.msg);
        }
    }
    for (size_t j = 0; j < n_old; j++) {
        if (old[j].id != c->id && cluster_member_by_id(c, old[j].id) == NULL) {
            log_info("member %s (%016" PRIx64 ") left the configuration", old[j].name, old[j].id);
            if (c->n_gone < PB_ARRAY_SIZE(c->gone)) {
                c->gone[c->n_gone].id = old[j].id;
                c->gone[c->n_gone].at_ms = pb_now_ms() + CLUSTER_GONE_LINGER_MS;
                c->n_gone++;
            } else {
                net_peer_remove(c->net, old[j].id);
            }
        }
    }
    for (size_t j = 0; j < n_old; j++)
        free(old[j].ctx);
    free(old);
    if (c->joining && cluster_member_by_id(c, c->id) != NULL) {
        c->joining = false;
        struct net_peer_stats ps;
        uint64_t leader = raft_leader(c->raft);
        if (!c->has_cluster_id && leader != RAFT_NONE && net_peer_stats(c->net, leader, &ps) == 0 &&
            ps.has_cluster_id) {
            /* The answer to our JOIN was lost: the leader's handshake
             * told us the cluster id too. */
            memcpy(c->cluster_id, ps.cluster_id, sizeof(c->cluster_id));
            c->has_cluster_id = true;
            c->pending_cluster_id = true;
            net_set_cluster_id(c->net, c->cluster_id);
        }
        log_notice("joined the cluster as %s",
                   cluster_member_by_id(c, c->id)->voter ? "a voter" : "a learner");
    }
    c->changed = true;
}

/* Drops the links of members that left once their linger time is over
 * (unless they came back). */
void cluster_gone_tick(struct cluster *c, uint64_t now)
{
    for (size_t i = 0; i < c->n_gone;) {
        if (cluster_member_by_id(c, c->gone[i].id) != NULL || now >= c->gone[i].at_ms) {
            if (cluster_member_by_id(c, c->gone[i].id) == NULL)
                net_peer_remove(c->net, c->gone[i].id);
            c->gone[i] = c->gone[--c->n_gone];
        } else {
            i++;
        }
    }
}

/* ---- sending ---- */

static void cluster_send_msg(struct cluster *c, const struct raft_msg *m)
{
    struct raft_msg tmp;
    uint8_t *piece = NULL;
    if (m->type == RAFT_MSG_SNAP && m->data == NULL) {
        /* The core asks for bytes of its snapshot: ours is the state
         * machine's current one. */
        uint64_t len = sm_snapshot_size(c->sm);
        if (len == 0 || sm_snapshot_index(c->sm) != m->snap.index || m->offset > len) {
            log_debug("no snapshot %" PRIu64 " to send to %016" PRIx64, m->snap.index, m->to);
            return;
        }
        /* read from snapshot.pbs: only this piece is in memory */
        size_t want = (size_t)PB_MIN((uint64_t)m->len, len - m->offset), got = 0;
        piece = pb_xmalloc(want ? want : 1);
        int rc = sm_snapshot_read(c->sm, m->offset, piece, want, &got);
        if (rc < 0 || got != want) {
            log_warning("cannot read snapshot %" PRIu64 ": %s", m->snap.index,
                        rc < 0 ? strerror(-rc) : "short read");
            free(piece);
            return;
        }
        tmp = *m;
        tmp.data = piece;
        tmp.len = got;
        m = &tmp;
    }
    buf_reset(&c->txbuf);
    int erc = raft_msg_encode(m, &c->txbuf);
    free(piece);
    if (erc < 0) {
        log_warning("cannot encode %s to %016" PRIx64, raft_msg_type_name(m->type), m->to);
        return;
    }
    enum net_class cls = c->txbuf.len <= NET_FRAME_MAX_PAYLOAD ? NET_CLASS_CONTROL : NET_CLASS_BULK;
    /* Appends and forwarded proposals must keep their order: a small one
     * that overtook big ones still queued (an empty append carrying the
     * commit index, a PUT behind its CHUNKS) is rejected or skipped, and
     * everything after it is sent again. */
    if (cls == NET_CLASS_CONTROL && (m->type == RAFT_MSG_APP || m->type == RAFT_MSG_PROP) &&
        net_peer_bulk_queued(c->net, m->to) > 0)
        cls = NET_CLASS_BULK;
    int rc;
    if (cls == NET_CLASS_BULK) {
        /* a big message is handed over, not copied once more */
        size_t len = 0;
        uint8_t *p = buf_steal(&c->txbuf, &len);
        rc = net_send_take(c->net, m->to, cls, CLUSTER_MSG_RAFT, p, len);
    } else {
        rc = net_send(c->net, m->to, cls, CLUSTER_MSG_RAFT, c->txbuf.data, c->txbuf.len);
    }
    if (rc < 0 && rc != -ENOTCONN && rc != -ENOENT)
        log_debug("send %s to %016" PRIx64 ": %s", raft_msg_type_name(m->type), m->to,
                  strerror(-rc));
}

static void cluster_send_all(struct cluster *c, const struct raft_msg *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        cluster_send_msg(c, &v[i]);
}

/* ---- storage errors ---- */

void cluster_storage_failed(struct cluster *c, int code, const char *msg)
{
    if (!c->storage_error) {
        c->storage_error = true;
        c->storage_since_ms = pb_now_ms();
        c->storage_attempt = 0;
        log_err("storage error: %s: not acknowledging anything until the storage works again", msg);
    }
    snprintf(c->storage_msg, sizeof(c->storage_msg), "%s", msg);
    c->storage_code = code;
    c->storage_retry_at = pb_now_ms() + store_retry_backoff_ms(c->storage_attempt++);
    c->changed = true;
}

/* ---- persisting one ready ---- */

static void cluster_persist_done(struct cluster *c);
static void cluster_apply_durable(struct cluster *c);

/* The batch of c->rd failed: the core unfreezes, steps down if it led,
 * drops what depended on the persist (acknowledgements, votes) and presents
 * the rest again in a later ready, which the storage retry lets through. */
static void cluster_ready_failed(struct cluster *c, int code, const char *msg)
{
    c->rx.len = c->rx_undo_len;
    raft_persist_failed(c->raft, &c->rd);
    c->frozen = false;
    c->ready_seq = 0;
    c->verify_overlap = true;
    cluster_storage_failed(c, code, msg);
    cluster_after_advance(c); /* report the step-down */
}

/* Submits the store batch for c->rd, or completes at once when nothing needs
 * to be durable (a commit-index change alone needs no fsync). */
static void cluster_persist(struct cluster *c)
{
    const struct raft_ready *rd = &c->rd;
    struct store_batch b;
    memset(&b, 0, sizeof(b));
    struct store_hard_state hs = {.term = rd->hs.term, .vote = rd->hs.vote};
    if (hs.term != c->stored_hs.term || hs.vote != c->stored_hs.vote)
        b.hard_state = &hs;
    if (c->pending_cluster_id)
        b.cluster_id = c->cluster_id;

    /* After a storage failure a batch may or may not have reached the disk:
     * entries already there with the same term are not written again (the
     * store refuses to truncate matching entries). */
    size_t skip = 0;
    if (c->verify_overlap && rd->n_entries > 0 && rd->entries[0].index <= c->stored_last) {
        struct store_entries have;
        struct pb_error err;
        uint64_t hi = PB_MIN(c->stored_last, rd->entries[rd->n_entries - 1].index);
        if (store_read_entries(c->store, rd->entries[0].index, hi, SIZE_MAX, &have, &err) == 0) {
            while (skip < have.n && skip < rd->n_entries &&
                   have.v[skip].index == rd->entries[skip].index &&
                   have.v[skip].term == rd->entries[skip].term)
                skip++;
            store_entries_free(&have);
        }
    }
    struct store_entry *ents = NULL;
    size_t n_ents = rd->n_entries - skip;
    if (n_ents > 0) {
        const struct raft_entry *re = rd->entries + skip;
        ents = pb_xcalloc(n_ents, sizeof(*ents));
        buf_reset(&c->entbuf);
        size_t *offs = pb_xcalloc(n_ents + 1, sizeof(*offs));
        for (size_t i = 0; i < n_ents; i++) {
            offs[i] = c->entbuf.len;
            raft_entry_encode(&re[i], &c->entbuf);
        }
        offs[n_ents] = c->entbuf.len;
        for (size_t i = 0; i < n_ents; i++) {
            ents[i].index = re[i].index;
            ents[i].term = re[i].term;
            ents[i].type = re[i].type;
            ents[i].data = c->entbuf.data + offs[i];
            ents[i].len = offs[i + 1] - offs[i];
        }
        free(offs);
        b.entries = ents;
        b.n_entries = n_ents;
        /* entbuf is not touched again before this batch completes: the next
         * ready (the only other user) comes after raft_advance() */
        b.borrow_entries = true;
        if (re[0].index <= c->stored_last)
            b.truncate_from = re[0].index;
    }

    /* Incoming snapshot chunks are staged in memory (a partial transfer is
     * not resumed across a restart anyway); the whole snapshot goes to
     * raft.db in the batch that installs it. A failed persist undoes the
     * staging: the core presents the chunk again. */
    c->rx_undo_len = c->rx.len;
    if (rd->chunk != NULL) {
        if (rd->chunk->offset == 0 || rd->chunk->index != c->rx_index ||
            rd->chunk->term != c->rx_term || rd->chunk->offset != c->rx.len) {
            buf_reset(&c->rx);
            c->rx_undo_len = 0;
            c->rx_index = rd->chunk->index;
            c->rx_term = rd->chunk->term;
        }
        if (rd->chunk->offset == c->rx.len)
            buf_put(&c->rx, rd->chunk->data, rd->chunk->len);
    }
    struct store_snapshot_chunk chunk;
    if (rd->snapshot != NULL && !(c->verify_overlap && c->stored_snap >= rd->snapshot->index)) {
        memset(&chunk, 0, sizeof(chunk));
        chunk.last_index = rd->snapshot->index;
        chunk.last_term = rd->snapshot->term;
        chunk.membership = rd->snapshot->conf;
        chunk.membership_len = rd->snapshot->conf_len;
        chunk.offset = 0;
        chunk.data = c->rx.data;
        chunk.len = c->rx.len;
        chunk.done = true;
        b.snapshot_chunk = &chunk;
    }

    if (b.hard_state == NULL && b.cluster_id == NULL && b.n_entries == 0 &&
        b.snapshot_chunk == NULL) {
        free(ents);
        c->ready_seq = 0;
        cluster_persist_done(c);
        return;
    }
    uint64_t seq = 0;
    int rc = store_submit(c->store, &b, &seq);
    free(ents);
    if (rc < 0) {
        char msg[200];
        snprintf(msg, sizeof(msg), "cannot write to raft.db: %s", strerror(-rc));
        cluster_ready_failed(c, rc, msg);
        return;
    }
    c->ready_seq = seq;
    c->batch_cluster_id = b.cluster_id != NULL;
    /* While the storage thread writes: apply what is already durable. */
    cluster_apply_durable(c);
    c->stats_batches++;
    c->stats_batch_entries += rd->n_entries;
}

static void cluster_on_applied(void *arg, const struct raft_entry *e)
{
    struct cluster *c = arg;
    cluster_req_applied(c, e);
}

/* Applies the committed entries of c->rd that are already durable in our
 * own raft.db, before this ready's batch is written: a reply must not wait
 * for the fsync of entries proposed after it. (Entries not yet in raft.db
 * wait: state.db must never run ahead of the local log, or a restart could
 * not replay.) A failure is left to cluster_persist_done(), which applies
 * again. */
static void cluster_apply_durable(struct cluster *c)
{
    const struct raft_ready *rd = &c->rd;
    if (rd->snapshot != NULL || rd->n_committed == 0 || rd->committed[0].index > c->stored_last)
        return;
    size_t n = 0;
    while (n < rd->n_committed && rd->committed[n].index <= c->stored_last)
        n++;
    struct pb_error err;
    sm_apply(c->sm, rd->committed, n, cluster_on_applied, c, &err);
}

/* The batch of c->rd is durable: steps 3-5 of raft.h's loop. Re-entered by
 * the storage retry when applying failed. */
static void cluster_persist_done(struct cluster *c)
{
    const struct raft_ready *rd = &c->rd;
    if (!c->rd_persisted) {
        c->rd_persisted = true;
        if (rd->n_entries > 0)
            c->stored_last = rd->entries[rd->n_entries - 1].index;
        if (rd->snapshot != NULL &&
            (!rd->snapshot_keep_log || c->stored_last < rd->snapshot->index))
            c->stored_last = rd->snapshot->index;
        c->stored_hs.term = rd->hs.term;
        c->stored_hs.vote = rd->hs.vote;
        if (c->batch_cluster_id)
            c->pending_cluster_id = false;
        c->batch_cluster_id = false;
        cluster_send_all(c, rd->msgs_after_persist, rd->n_msgs_after_persist);
    }
    struct pb_error err;
    pb_error_clear(&err);
    if (rd->snapshot != NULL && !c->rd_installed) {
        int rc = sm_snapshot_install(c->sm, rd->snapshot->index, rd->snapshot->term, c->rx.data,
                                     c->rx.len, &err);
        if (rc < 0) {
            cluster_storage_failed(c, rc, err.msg);
            return;
        }
        c->rd_installed = true;
        log_notice("installed snapshot at index %" PRIu64 " (term %" PRIu64 ", %zu bytes)",
                   rd->snapshot->index, rd->snapshot->term, c->rx.len);
        buf_free(&c->rx);
        cluster_req_snapshot_installed(c);
    }
    if (rd->n_committed > 0) {
        int rc = sm_apply(c->sm, rd->committed, rd->n_committed, cluster_on_applied, c, &err);
        if (rc < 0) {
            cluster_storage_failed(c, rc, err.msg);
            return;
        }
        for (size_t i = 0; i < rd->n_committed; i++)
            c->bytes_since_snapshot += rd->committed[i].len;
    }
    if (c->storage_error) {
        log_notice("storage works again: resuming");
        c->storage_error = false;
        c->changed = true;
    }
    raft_advance(c->raft, rd);
    c->frozen = false;
    c->rd_persisted = false;
    c->rd_installed = false;
    cluster_after_advance(c);
    cluster_schedule(c);
}

static void cluster_on_store_complete(void *arg, const struct store_completion *done)
{
    struct cluster *c = arg;
    bool covers_ready = c->frozen && c->ready_seq != 0 && c->ready_seq >= done->first_seq &&
                        c->ready_seq <= done->last_seq;
    bool covers_probe =
            c->probe_seq != 0 && c->probe_seq >= done->first_seq && c->probe_seq <= done->last_seq;
    if (done->status != 0) {
        struct store_health h;
        store_health(c->store, &h);
        const char *msg = h.msg[0] ? h.msg : strerror(-done->status);
        if (covers_probe)
            c->probe_seq = 0; /* retry again after the backoff */
        if (covers_ready)
            cluster_ready_failed(c, done->status, msg);
        else
            cluster_storage_failed(c, done->status, msg);
        return;
    }
    if (covers_probe) {
        c->probe_seq = 0;
        cluster_storage_recovered(c);
        return;
    }
    if (covers_ready) {
        c->ready_seq = 0;
        c->verify_overlap = false;
        cluster_persist_done(c);
    }
}

/* After store_retry() and a successful empty probe batch: rebuild our view
 * of raft.db (a failed batch may or may not be on disk) and go on. */
void cluster_storage_recovered(struct cluster *c)
{
    struct store_state st;
    struct pb_error err;
    int rc = store_load(c->store, INT64_MAX, 0, &st, &err);
    if (rc < 0) {
        cluster_storage_failed(c, rc, err.msg);
        return;
    }
    c->stored_last = st.last_index;
    c->stored_hs = st.hard_state;
    c->stored_snap = st.has_snapshot ? st.snapshot.last_index : 0;
    if (st.has_cluster_id)
        c->pending_cluster_id = false; /* the failed batch did write it */
    store_state_free(&st);
    if (c->frozen) {
        /* The persist was fine; applying to state.db failed: again. */
        cluster_persist_done(c);
        return;
    }
    log_notice("storage works again: resuming");
    c->storage_error = false;
    c->changed = true;
    cluster_schedule(c);
}

/* ---- feeding the core ---- */

static void cluster_propq_clear(struct cluster *c)
{
    for (size_t i = 0; i < c->propq_n; i++)
        free(c->propq[i].data);
    c->propq_n = 0;
    c->propq_bytes = 0;
}

static void cluster_inq_clear(struct cluster *c)
{
    for (size_t i = 0; i < c->inq_n; i++)
        raft_msg_clear(&c->inq[i]);
    c->inq_n = 0;
    c->inq_bytes = 0;
    if (c->propq_n > 0)
        c->props_dropped++; /* the proposer's retry covers them */
    cluster_propq_clear(c);
}

/* The proposals queued while frozen, in order. The first the core refuses
 * ends the queue: what follows must not commit ahead of it. */
static void cluster_propq_feed(struct cluster *c)
{
    for (size_t i = 0; i < c->propq_n; i++) {
        struct cluster_prop *q = &c->propq[i];
        int rc = raft_propose_take(c->raft, q->client_id, q->seq, q->data, q->len, NULL);
        if (rc == 0)
            q->data = NULL; /* the core's now */
        if (rc < 0) {
            log_debug("queued proposal seq %" PRIu64 " refused: %s (%zu dropped)", q->seq,
                      strerror(-rc), c->propq_n - i);
            c->props_dropped++;
            break;
        }
    }
    cluster_propq_clear(c);
}

static void cluster_on_raft_frame(struct cluster *c, uint64_t from, const uint8_t *p, size_t len)
{
    struct raft_msg m;
    int rc = raft_msg_decode(p, len, &m);
    if (rc < 0 || m.from != from || m.to != c->id) {
        if (rc == 0)
            raft_msg_clear(&m);
        c->stats_malformed++;
        uint64_t now = pb_now_ms();
        if (now - c->malformed_warned_ms >= 10000) {
            c->malformed_warned_ms = now;
            log_warning("dropped a malformed or misaddressed raft message from %016" PRIx64
                        " (%" PRIu64 " so far)",
                        from, c->stats_malformed);
        }
        return;
    }
    if (c->storage_error) {
        /* Not driven until the storage works (cluster_on_process). */
        raft_msg_clear(&m);
        return;
    }
    if (c->frozen || c->inq_n > 0) {
        if (c->inq_n >= CLUSTER_INQ_MAX || c->inq_bytes + len > CLUSTER_INQ_MAX_BYTES) {
            raft_msg_clear(&m);
            c->stats_inq_dropped++;
            return;
        }
        if (c->inq_n == c->inq_cap) {
            c->inq_cap = c->inq_cap ? 2 * c->inq_cap : 64;
            c->inq = pb_xreallocarray(c->inq, c->inq_cap, sizeof(*c->inq));
        }
        c->inq[c->inq_n++] = m;
        c->inq_bytes += len;
        return;
    }
    raft_step_take(c->raft, &m);
    raft_msg_clear(&m);
    cluster_schedule(c);
}

static void cluster_on_frame(void *arg, uint64_t node_id, uint8_t type, const uint8_t *data,
                             size_t len)
{
    struct cluster *c = arg;
    switch (type) {
    case CLUSTER_MSG_RAFT:
        cluster_on_raft_frame(c, node_id, data, len);
        break;
    case CLUSTER_MSG_ADMIN:
        cluster_admin_on_request(c, node_id, data, len);
        break;
    case CLUSTER_MSG_ADMIN_RESP:
        cluster_admin_on_response(c, node_id, data, len);
        break;
    case CLUSTER_MSG_APPLIED:
        cluster_applied_on_frame(c, node_id, data, len);
        break;
    case CLUSTER_MSG_CHUNK_REQ:
        if (c->fetch != NULL)
            fetch_on_request(c->fetch, c->sm, node_id, data, len);
        break;
    case CLUSTER_MSG_CHUNK_RESP:
        if (c->fetch != NULL)
            fetch_on_reply(c->fetch, c->sm, node_id, data, len, pb_now_ms());
        break;
    case CLUSTER_MSG_PUSH:
        /* bytes of a file whose PUT applied first: the tick repairs it */
        if (c->push != NULL &&
            push_on_push(c->push, c->sm != NULL ? sm_statedb(c->sm) : NULL, node_id, data, len) > 0)
            c->push_repair = true;
        break;
    case CLUSTER_MSG_PUSH_ACK:
        if (c->push != NULL)
            push_on_ack(c->push, node_id, data, len, pb_now_ms());
        break;
    default:
        log_debug("unknown frame type %u from %016" PRIx64, type, node_id);
        break;
    }
}

static void cluster_on_peer_state(void *arg, uint64_t node_id, bool up)
{
    struct cluster *c = arg;
    const char *name = cluster_name_of(c, node_id);
    struct net_peer_stats ps;
    bool have_ps = net_peer_stats(c->net, node_id, &ps) == 0;
    if (name == NULL)
        name = have_ps && ps.name[0] ? ps.name : "?";
    log_info("peer %s (%016" PRIx64 ") is %s", name, node_id, up ? "up" : "down");
    if (up && c->joining)
        c->join_next_ms = 0; /* ask now */
    if (up)
        cluster_applied_resend(c);
    if (up && c->fetch != NULL)
        fetch_peer_up(c->fetch); /* chunk bytes it may have */
    if (!up && c->push != NULL)
        push_peer_down(c->push, node_id); /* it fetches what it missed */
}

/* Everything that waited while the core was frozen, then ready. */
static void cluster_on_process(evutil_socket_t fd, short what, void *arg)
{
    struct cluster *c = arg;
    (void)fd;
    (void)what;
    c->scheduled = false;
    if (c->frozen || c->closing)
        return;
    if (c->storage_error) {
        /* Durable state unknown: acknowledge nothing, vote for nobody, lead
         * nothing until a probe write succeeds (cluster_on_tick). */
        cluster_inq_clear(c);
        c->ticks_pending = 0;
        return;
    }
    for (size_t i = 0; i < c->inq_n; i++)
        raft_step_take(c->raft, &c->inq[i]);
    cluster_propq_feed(c); /* after what peers sent meanwhile (a new leader) */
    cluster_inq_clear(c);
    for (; c->ticks_pending > 0; c->ticks_pending--)
        raft_tick(c->raft);
    cluster_req_actions(c);
    if (!raft_ready(c->raft, &c->rd)) {
        cluster_after_advance(c);
        return;
    }
    c->frozen = true;
    c->rd_persisted = false;
    c->rd_installed = false;
    cluster_send_all(c, c->rd.msgs, c->rd.n_msgs);
    cluster_persist(c);
}

/* ---- after each advance: observe changes, snapshots ---- */

static const char *cluster_role_of(const struct cluster *c)
{
    const struct cluster_member *self = cluster_member_by_id(c, c->id);
    switch (raft_role(c->raft)) {
    case RAFT_LEADER:
        return "leader";
    case RAFT_CANDIDATE:
    case RAFT_PRE_CANDIDATE:
        return "candidate";
    case RAFT_FOLLOWER:
        break;
    }
    return self != NULL && !self->voter ? "learner" : "follower";
}

static void cluster_record_snapshot(struct cluster *c, uint64_t index, uint64_t size);

static void cluster_maybe_snapshot(struct cluster *c)
{
    uint64_t applied = sm_applied(c->sm);
    if ((applied < sm_snapshot_index(c->sm) + c->snapshot_every &&
         c->bytes_since_snapshot < CLUSTER_SNAPSHOT_BYTES) ||
        c->storage_error)
        return;
    const struct raft_entry *e = raft_entry_at(c->raft, applied);
    if (e == NULL)
        return;
    struct pb_error err;
    uint64_t size;
    int rc = sm_snapshot_take(c->sm, e->term, &size, &err);
    if (rc < 0) {
        cluster_storage_failed(c, rc, err.msg);
        return;
    }
    cluster_record_snapshot(c, applied, size);
}

/* Tells the core about the state machine's snapshot at index, records it in
 * raft.db and compacts the log behind it. */
static void cluster_record_snapshot(struct cluster *c, uint64_t index, uint64_t size)
{
    struct raft_snapshot_meta meta;
    uint64_t compact_to = 0;
    c->bytes_since_snapshot = 0;
    int rc = raft_snapshot_taken(c->raft, index, size, &meta, &compact_to);
    if (rc < 0) {
        log_warning("raft refused snapshot at %" PRIu64 ": %s", index, strerror(-rc));
        return;
    }
    struct store_local_snapshot ls = {.last_index = meta.index,
                                      .last_term = meta.term,
                                      .membership = meta.conf,
                                      .membership_len = meta.conf_len};
    struct store_batch b;
    memset(&b, 0, sizeof(b));
    b.local_snapshot = &ls;
    uint64_t seq;
    rc = store_submit(c->store, &b, &seq);
    if (rc < 0) {
        cluster_storage_failed(c, rc, "cannot record the snapshot in raft.db");
        return;
    }
    if (compact_to > 0)
        store_compact(c->store, compact_to + 1);
    log_info("snapshot at index %" PRIu64 " (term %" PRIu64 ", %" PRIu64
             " bytes); raft.db compacted up to %" PRIu64,
             meta.index, meta.term, size, compact_to);
}

/* Notes when the commit index moved and forgets marks that are applied. */
static void cluster_lag_note(struct cluster *c, uint64_t now)
{
    uint64_t commit = raft_commit(c->raft), applied = sm_applied(c->sm);
    size_t drop = 0;
    while (drop < c->n_lag_marks && c->lag_marks[drop].index <= applied)
        drop++;
    memmove(c->lag_marks, c->lag_marks + drop, (c->n_lag_marks - drop) * sizeof(c->lag_marks[0]));
    c->n_lag_marks -= drop;
    if (commit <= applied)
        return;
    size_t n = c->n_lag_marks;
    if (n > 0 && c->lag_marks[n - 1].index >= commit)
        return;
    if (n == CLUSTER_LAG_MARKS) {
        c->lag_marks[n - 1].index = commit; /* keeps the older time: never under-reports */
        return;
    }
    c->lag_marks[n].index = commit;
    c->lag_marks[n].at_ms = now;
    c->n_lag_marks++;
}

void cluster_after_advance(struct cluster *c)
{
    cluster_sync_conf(c);
    cluster_lag_note(c, pb_now_ms());
    uint64_t leader = raft_leader(c->raft);
    uint64_t term = raft_term(c->raft);
    enum raft_role role = raft_role(c->raft);
    if (role != c->seen_role || leader != c->seen_leader || term != c->seen_term) {
        const char *lname = cluster_name_of(c, leader);
        if (role == RAFT_LEADER && (c->seen_role != RAFT_LEADER || term != c->seen_term))
            log_notice("%s became leader for term %" PRIu64, c->cfg->node_id, term);
        else if (role == RAFT_FOLLOWER && leader != RAFT_NONE &&
                 (leader != c->seen_leader || c->seen_role != RAFT_FOLLOWER))
            log_notice("%s is now a %s (leader %s, term %" PRIu64 ")", c->cfg->node_id,
                       cluster_role_of(c), lname ? lname : "?", term);
        else if (c->seen_role == RAFT_LEADER && role != RAFT_LEADER)
            log_notice("%s is no longer leader (term %" PRIu64 ")", c->cfg->node_id, term);
        if (leader != c->seen_leader)
            cluster_req_leader_changed(c);
        if (leader != c->seen_leader && leader != RAFT_NONE)
            c->leader_changes++;
        c->seen_role = role;
        c->seen_leader = leader;
        c->seen_term = term;
        c->changed = true;
    }
    cluster_req_check(c);
    cluster_maybe_snapshot(c);
    if (c->changed) {
        c->changed = false;
        if (c->opts.on_change != NULL)
            c->opts.on_change(c->opts.arg);
    }
}

/* ---- the tick ---- */

static void cluster_on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct cluster *c = arg;
    (void)fd;
    (void)what;
    uint64_t now = pb_now_ms();
    if (c->storage_error) {
        /* The core is not driven (nothing is acknowledged, no heartbeats
         * go out: the others elect a leader that can write) until a probe
         * batch succeeds. */
        if (c->probe_seq == 0 && now >= c->storage_retry_at) {
            store_retry(c->store);
            struct store_batch b;
            memset(&b, 0, sizeof(b));
            uint64_t seq = 0;
            int rc = store_submit(c->store, &b, &seq);
            if (rc < 0)
                cluster_storage_failed(c, rc, c->storage_msg);
            else
                c->probe_seq = seq;
        }
    } else if (c->frozen) {
        if (c->ticks_pending < c->election_tick)
            c->ticks_pending++;
    } else {
        raft_tick(c->raft);
    }
    cluster_req_tick(c, now);
    cluster_gone_tick(c, now);
    cluster_applied_tick(c, now);
    if (!c->frozen && c->fetch != NULL)
        fetch_tick(c->fetch, c->sm, now);
    if (c->push != NULL)
        push_tick(c->push, !c->frozen && c->sm != NULL ? sm_statedb(c->sm) : NULL, now);
    if (c->push_repair && !c->frozen && c->sm != NULL) {
        c->push_repair = false;
        sm_repair(c->sm);
    }
    cluster_schedule(c);
}

/* ---- startup ---- */

static unsigned cluster_env_unsigned(const char *name, unsigned dflt)
{
    const char *s = getenv(name);
    uint64_t v;
    if (s == NULL || pb_parse_u64(s, 1, UINT32_MAX, &v) < 0)
        return dflt;
    return (unsigned)v;
}

static int cluster_restore(struct cluster *c, struct store_state *st, struct pb_error *err)
{
    struct raft_restore_state rs;
    memset(&rs, 0, sizeof(rs));
    rs.hs.term = st->hard_state.term;
    rs.hs.vote = st->hard_state.vote;
    struct raft_snapshot_meta snap;
    if (st->has_snapshot) {
        snap.index = st->snapshot.last_index;
        snap.term = st->snapshot.last_term;
        snap.conf = st->snapshot.membership;
        snap.conf_len = st->snapshot.membership_len;
        snap.size = st->snapshot.size;
        if (sm_applied(c->sm) < snap.index) {
            /* Crashed between installing a received snapshot in raft.db and
             * in state.db: install it from raft.db. */
            if (st->snapshot.size == 0)
                return pb_error_set(err, -EBADMSG,
                                    "state.db (applied %" PRIu64
                                    ") is behind raft.db's snapshot %" PRIu64
                                    " and raft.db holds no payload for it",
                                    sm_applied(c->sm), snap.index);
            uint8_t *p = pb_xmalloc((size_t)st->snapshot.size);
            size_t got = 0, total = 0;
            int rc = 0;
            while (total < st->snapshot.size) {
                rc = store_snapshot_read(c->store, snap.index, total, p + total,
                                         (size_t)st->snapshot.size - total, &got, err);
                if (rc < 0 || got == 0)
                    break;
                total += got;
            }
            if (rc == 0)
                rc = sm_snapshot_install(c->sm, snap.index, snap.term, p, total, err);
            free(p);
            if (rc < 0)
                return rc;
        }
        /* A snapshot this node took itself is recorded without its payload
         * (size 0): its bytes are the state machine's blob (snapshot.pbs),
         * and the core needs their length to send them to a lagging peer. */
        if (snap.size == 0 && sm_snapshot_index(c->sm) == snap.index) {
            snap.size = sm_snapshot_size(c->sm);
        }
        rs.snapshot = &snap;
    }
    /* Only applied entries are known to be committed (raft.db keeps term
     * and vote, not the commit index). */
    rs.hs.commit = sm_applied(c->sm);
    rs.applied = sm_applied(c->sm);
    struct raft_entry *ents = pb_xcalloc(st->entries.n ? st->entries.n : 1, sizeof(*ents));
    size_t n = 0;
    int rc = 0;
    for (size_t i = 0; i < st->entries.n; i++) {
        const struct store_entry *se = &st->entries.v[i];
        rc = raft_entry_decode(se->data, se->len, &ents[n]);
        if (rc < 0 || ents[n].index != se->index || ents[n].term != se->term) {
            if (rc == 0)
                free(ents[n].data);
            rc = pb_error_set(err, -EBADMSG, "raft.db entry %" PRIu64 " does not decode",
                              se->index);
            break;
        }
        n++;
    }
    if (rc == 0) {
        rs.entries = ents;
        rs.n_entries = n;
        if (rs.applied > (n ? ents[n - 1].index : 0) && rs.applied > (rs.snapshot ? snap.index : 0))
            rc = pb_error_set(err, -EBADMSG,
                              "state.db has applied %" PRIu64 " but raft.db ends at %" PRIu64
                              ": raft.db was lost or replaced",
                              rs.applied, n ? ents[n - 1].index : 0);
    }
    if (rc == 0) {
        rc = raft_restore(c->raft, &rs);
        if (rc < 0)
            pb_error_set(err, rc, "raft.db and state.db are inconsistent (raft_restore: %s)",
                         strerror(-rc));
    }
    for (size_t i = 0; i < n; i++)
        free(ents[i].data);
    free(ents);
    c->stored_last = st->last_index;
    c->stored_hs = st->hard_state;
    return rc;
}

static int cluster_load_secret(struct cluster *c, bool bootstrap, struct pb_error *err)
{
    const struct pb_config *cfg = c->cfg;
    char *path = cfg->secret_file ? pb_xstrdup(cfg->secret_file)
                                  : pb_xasprintf("%s/secret", cfg->state_dir);
    int rc = secret_load(path, &c->secret, &c->secret_len, err);
    if (rc == -ENOENT && bootstrap) {
        rc = secret_generate(path, &c->secret, &c->secret_len, err);
        if (rc == 0)
            log_notice("generated cluster secret in %s: copy it to every node that joins "
                       "(secret_file)",
                       path);
    } else if (rc == -ENOENT) {
        rc = pb_error_set(err, -ENOENT,
                          "no cluster secret at %s: pass --secret-file with the secret file of "
                          "the cluster (a copy of <state_dir>/secret of its first node)",
                          path);
    }
    free(path);
    return rc;
}

static int cluster_start_raft(struct cluster *c, struct pb_error *err)
{
    const struct pb_config *cfg = c->cfg;
    struct raft_config rc_cfg;
    raft_config_init(&rc_cfg, c->id);
    rc_cfg.seed = cluster_random_u64();
    rc_cfg.heartbeat_tick = 1;
    unsigned et = cfg->heartbeat_ms ? cfg->election_timeout_ms / cfg->heartbeat_ms : 10;
    rc_cfg.election_tick = et < 2 ? 2 : et;
    rc_cfg.max_msg_bytes = CLUSTER_MAX_MSG_BYTES;
    rc_cfg.snapshot_chunk_bytes = CLUSTER_SNAP_CHUNK;
    c->election_tick = rc_cfg.election_tick;
    c->raft = raft_new(&rc_cfg);
    if (c->raft == NULL)
        return pb_error_set(err, -EINVAL, "bad raft configuration");
    return 0;
}

/* fetch_ops: chunk requests and replies travel in the bulk class. */
static int cluster_fetch_send(void *arg, uint64_t node_id, bool reply, const void *data, size_t len)
{
    struct cluster *c = arg;
    if (c->net == NULL)
        return -ENOTCONN;
    return net_send(c->net, node_id, NET_CLASS_BULK,
                    reply ? CLUSTER_MSG_CHUNK_RESP : CLUSTER_MSG_CHUNK_REQ, data, len);
}

/* push_ops: pushes travel in the bulk class, acknowledgements as control. */
static int cluster_push_send(void *arg, uint64_t node_id, bool ack, const void *data, size_t len)
{
    struct cluster *c = arg;
    if (c->net == NULL)
        return -ENOTCONN;
    return net_send(c->net, node_id, ack ? NET_CLASS_CONTROL : NET_CLASS_BULK,
                    ack ? CLUSTER_MSG_PUSH_ACK : CLUSTER_MSG_PUSH, data, len);
}

struct push *cluster_push(struct cluster *c)
{
    return c->push;
}

int cluster_push_targets(struct cluster *c, struct push_peer *out, size_t max, size_t *n,
                         size_t *voters, bool *self_voter)
{
    *n = 0;
    *voters = 0;
    *self_voter = false;
    const char *env = getenv("PICKBOX_TEST_PUSH");
    if (c->push == NULL || c->net == NULL || c->joining || (env != NULL && strcmp(env, "0") == 0))
        return -EAGAIN;
    bool member = false;
    for (size_t i = 0; i < c->n_members; i++) {
        const struct cluster_member *m = &c->members[i];
        if (m->voter)
            (*voters)++;
        if (m->id == c->id) {
            member = true;
            *self_voter = m->voter;
            continue;
        }
        /* its last link's version: a member down now that spoke 2 gets the
         * REFS entry when it is back, and fetches the bytes */
        struct net_peer_stats ps;
        if (net_peer_stats(c->net, m->id, &ps) < 0 || ps.version < 2)
            return -EAGAIN;
        if (ps.connected && *n < max) {
            out[*n].id = m->id;
            out[*n].voter = m->voter;
            (*n)++;
        }
    }
    return member ? 0 : -EAGAIN;
}

/* fetch_ops: the leader first, then the other members whose link is up. */
static size_t cluster_fetch_peers(void *arg, uint64_t *ids, size_t max)
{
    struct cluster *c = arg;
    size_t n = 0;
    uint64_t leader = c->raft != NULL ? raft_leader(c->raft) : 0;
    struct net_peer_stats ps;
    if (leader != 0 && leader != c->id && n < max && c->net != NULL &&
        net_peer_stats(c->net, leader, &ps) == 0 && ps.connected)
        ids[n++] = leader;
    for (size_t i = 0; i < c->n_members && n < max; i++) {
        uint64_t id = c->members[i].id;
        if (id == c->id || id == leader || c->net == NULL || net_peer_stats(c->net, id, &ps) < 0 ||
            !ps.connected)
            continue;
        ids[n++] = id;
    }
    return n;
}

static int cluster_start_net(struct cluster *c, int peer_fd, struct pb_error *err)
{
    struct net_config nc;
    memset(&nc, 0, sizeof(nc));
    nc.node_id = c->id;
    nc.node_name = c->cfg->node_id;
    nc.secret = c->secret;
    nc.secret_len = c->secret_len;
    nc.cluster_id = c->has_cluster_id ? c->cluster_id : NULL;
    nc.cb.on_frame = cluster_on_frame;
    nc.cb.on_peer_state = cluster_on_peer_state;
    nc.cb_arg = c;
    if (c->fetch == NULL) {
        struct fetch_ops fo = {.arg = c, .send = cluster_fetch_send, .peers = cluster_fetch_peers};
        c->fetch = fetch_new(&fo);
    }
    if (c->push == NULL) {
        struct push_ops po = {.arg = c, .send = cluster_push_send};
        c->push = push_new(&po);
    }
    /* a node speaking only protocol version 1 (no push, no REFS): tests of
     * a mixed-version cluster */
    nc.proto_max = (uint16_t)cluster_env_unsigned("PICKBOX_TEST_PROTO_MAX", NET_PROTO_VERSION);
    c->net = net_new(c->base, &nc, err);
    if (c->net == NULL) {
        if (peer_fd >= 0)
            close(peer_fd);
        return err->code ? err->code : -EINVAL;
    }
    if (peer_fd >= 0) {
        /* Keep a copy: `pickboxctl join` starts a new transport on it. */
        if (c->listen_fd < 0)
            c->listen_fd = fcntl(peer_fd, F_DUPFD_CLOEXEC, 0);
        int rc = net_listen_fd(c->net, peer_fd, err);
        if (rc < 0)
            return rc;
    }
    if (c->joining) {
        int rc = net_seed_add(c->net, c->join_addr, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* True when this node is alone in a cluster whose log holds nothing but
 * its bootstrap (configuration and no-op entries) and the ops its own
 * watcher proposed from its tree: `pickboxctl join` may then discard it.
 * The tree stays on disk and is proposed again after the join, as files
 * the cluster has not seen (doc/conflicts.md, "Trees that were not in
 * sync"), so nothing in it is lost. Probes, others' entries or a compacted
 * log (nothing to check) keep it. */
bool cluster_is_lone(struct cluster *c)
{
    if (c->joining || c->n_members != 1 || c->members[0].id != c->id)
        return false;
    struct raft_status rs;
    raft_status(c->raft, &rs);
    if (rs.snapshot_index != 0 || rs.first_index != 1)
        return false;
    for (uint64_t i = 1; i <= rs.last_index; i++) {
        const struct raft_entry *e = raft_entry_at(c->raft, i);
        if (e == NULL)
            return false;
        if (e->type == RAFT_ENTRY_NORMAL &&
            (e->client_id != c->id || e->len == 0 || e->data == NULL || e->data[0] == 0))
            return false;
    }
    return true;
}

/* Discards this lone node's cluster (raft.db, state.db) and starts joining
 * through addr with a new identity. Called with the core not frozen. */
int cluster_reset_for_join(struct cluster *c, const char *addr, struct pb_error *err)
{
    log_notice("discarding this node's one-node cluster to join through %s", addr);
    net_free(c->net);
    c->net = NULL;
    store_close(c->store);
    c->store = NULL;
    sm_close(c->sm);
    c->sm = NULL;
    raft_free(c->raft);
    c->raft = NULL;
    static const char *const files[] = {"raft.db",  "raft.db-wal",  "raft.db-shm",
                                        "state.db", "state.db-wal", "state.db-shm"};
    for (size_t i = 0; i < PB_ARRAY_SIZE(files); i++) {
        char *path = pb_xasprintf("%s/%s", c->cfg->state_dir, files[i]);
        if (unlink(path) < 0 && errno != ENOENT)
            log_warning("cannot remove %s: %s", path, strerror(errno));
        free(path);
    }
    cluster_inq_clear(c);
    for (size_t i = 0; i < c->n_members; i++)
        free(c->members[i].ctx);
    free(c->members);
    c->members = NULL;
    c->n_members = 0;
    c->n_gone = 0;
    c->n_reports = 0;
    cluster_applied_resend(c);
    c->frozen = false;
    c->ready_seq = 0;
    c->verify_overlap = false;
    c->stored_last = 0;
    memset(&c->stored_hs, 0, sizeof(c->stored_hs));
    buf_free(&c->rx);
    c->has_cluster_id = false;
    c->pending_cluster_id = false;
    c->storage_error = false;
    c->seen_role = RAFT_FOLLOWER;
    c->seen_leader = RAFT_NONE;
    c->seen_term = 0;
    c->n_lag_marks = 0;
    free(c->join_addr);
    c->join_addr = pb_xstrdup(addr);
    c->joining = true;
    c->join_next_ms = 0;
    c->join_attempt = 0;
    c->join_last_msg[0] = '\0';

    struct store_options so = {.dir = c->cfg->state_dir,
                               .base = c->base,
                               .on_complete = cluster_on_store_complete,
                               .arg = c};
    int rc = store_open(&c->store, &so, err);
    if (rc < 0)
        return rc;
    struct store_state st;
    rc = store_load(c->store, 0, 0, &st, err);
    if (rc < 0)
        return rc;
    c->id = st.node_id;
    store_state_free(&st);
    if ((rc = sm_open(&c->sm, c->cfg->state_dir, c->cfg->data_dir, err)) < 0)
        return rc;
    if (c->secret)
        memset(c->secret, 0, c->secret_len);
    free(c->secret);
    c->secret = NULL;
    if ((rc = cluster_load_secret(c, false, err)) < 0)
        return rc;
    if ((rc = cluster_start_raft(c, err)) < 0)
        return rc;
    int fd = c->listen_fd >= 0 ? fcntl(c->listen_fd, F_DUPFD_CLOEXEC, 0) : -1;
    if ((rc = cluster_start_net(c, fd, err)) < 0)
        return rc;
    c->changed = true;
    return 0;
}

int cluster_open(struct cluster **out, const struct cluster_options *opts, struct pb_error *err)
{
    *out = NULL;
    struct cluster *c = pb_xcalloc(1, sizeof(*c));
    c->opts = *opts;
    c->cfg = opts->cfg;
    c->base = opts->base;
    c->seen_role = RAFT_FOLLOWER;
    c->listen_fd = -1;
    c->join_addr = c->cfg->join ? pb_xstrdup(c->cfg->join) : NULL;
    c->snapshot_every = cluster_env_unsigned("PICKBOX_TEST_SNAPSHOT_EVERY", CLUSTER_SNAPSHOT_EVERY);
    c->client_prefix = (uint32_t)(cluster_random_u64() >> 16) | 1u;
    int peer_fd = opts->peer_fd;
    struct store_state st;
    memset(&st, 0, sizeof(st));
    bool have_st = false;
    int rc;

    c->process_ev = event_new(c->base, -1, 0, cluster_on_process, c);
    c->tick_ev = event_new(c->base, -1, EV_PERSIST, cluster_on_tick, c);
    struct store_options so = {.dir = c->cfg->state_dir,
                               .base = c->base,
                               .on_complete = cluster_on_store_complete,
                               .arg = c};
    rc = store_open(&c->store, &so, err);
    if (rc < 0)
        goto fail;
    rc = store_load(c->store, 0, SIZE_MAX, &st, err);
    if (rc < 0)
        goto fail;
    have_st = true;
    rc = sm_open(&c->sm, c->cfg->state_dir, c->cfg->data_dir, err);
    if (rc < 0)
        goto fail;
    c->id = st.node_id;
    bool has_state = st.has_cluster_id || st.last_index > 0 || st.hard_state.term > 0;
    bool bootstrap = !has_state && c->cfg->join == NULL;
    c->joining = !has_state && c->cfg->join != NULL;
    if (has_state && c->cfg->join != NULL)
        log_info("persisted state found in %s: resuming, --join %s is ignored", c->cfg->state_dir,
                 c->cfg->join);
    rc = cluster_load_secret(c, bootstrap, err);
    if (rc < 0)
        goto fail;
    rc = cluster_start_raft(c, err);
    if (rc < 0)
        goto fail;
    if (st.has_cluster_id) {
        memcpy(c->cluster_id, st.cluster_id, sizeof(c->cluster_id));
        c->has_cluster_id = true;
    }
    if (has_state) {
        rc = cluster_restore(c, &st, err);
        if (rc < 0)
            goto fail;
        uint64_t store_snap = st.has_snapshot ? st.snapshot.last_index : 0;
        if (sm_snapshot_index(c->sm) > store_snap) {
            /* Crashed between taking a snapshot and recording it in raft.db:
             * record it now, so that the one the core offers to lagging
             * peers is the one the state machine can serve. */
            cluster_record_snapshot(c, sm_snapshot_index(c->sm), sm_snapshot_size(c->sm));
        }
        log_notice("restarted from %s: term %" PRIu64 ", log %" PRIu64 "..%" PRIu64
                   ", applied %" PRIu64,
                   c->cfg->state_dir, st.hard_state.term, st.first_index, st.last_index,
                   sm_applied(c->sm));
    } else if (bootstrap) {
        struct raft_conf conf;
        memset(&conf, 0, sizeof(conf));
        conf.n = 1;
        conf.members[0].id = c->id;
        conf.members[0].role = RAFT_VOTER;
        cluster_ctx_encode(c->cfg->node_id, c->cfg->advertise, &conf.members[0].ctx,
                           &conf.members[0].ctx_len);
        rc = raft_bootstrap(c->raft, &conf);
        free(conf.members[0].ctx);
        if (rc < 0) {
            pb_error_set(err, rc, "cannot bootstrap: %s", strerror(-rc));
            goto fail;
        }
        if (getrandom(c->cluster_id, sizeof(c->cluster_id), 0) != (ssize_t)sizeof(c->cluster_id)) {
            rc = pb_error_set(err, -EIO, "getrandom failed");
            goto fail;
        }
        c->has_cluster_id = true;
        c->pending_cluster_id = true;
        char hex[33];
        cluster_hex(c->cluster_id, 16, hex);
        log_notice("bootstrapping a new cluster %s with %s as its only voter", hex,
                   c->cfg->node_id);
    } else {
        log_notice("joining a cluster through %s", c->cfg->join);
    }
    store_state_free(&st);
    have_st = false;

    rc = cluster_start_net(c, peer_fd, err);
    peer_fd = -1;
    if (rc < 0)
        goto fail;
    cluster_sync_conf(c);
    c->seen_term = raft_term(c->raft);
    struct timeval tv = {.tv_sec = c->cfg->heartbeat_ms / 1000,
                         .tv_usec = (c->cfg->heartbeat_ms % 1000) * 1000};
    event_add(c->tick_ev, &tv);
    cluster_schedule(c);
    *out = c;
    return 0;
fail:
    if (peer_fd >= 0)
        close(peer_fd);
    if (have_st)
        store_state_free(&st);
    cluster_close(c);
    return rc;
}

void cluster_close(struct cluster *c)
{
    if (c == NULL)
        return;
    c->closing = true;
    cluster_req_close_all(c);
    if (c->tick_ev)
        event_free(c->tick_ev);
    if (c->process_ev)
        event_free(c->process_ev);
    net_free(c->net);
    fetch_free(c->fetch);
    push_free(c->push);
    store_close(c->store);
    sm_close(c->sm);
    raft_free(c->raft);
    cluster_inq_clear(c);
    free(c->inq);
    free(c->propq);
    for (size_t i = 0; i < c->n_members; i++)
        free(c->members[i].ctx);
    free(c->members);
    buf_free(&c->txbuf);
    buf_free(&c->entbuf);
    buf_free(&c->rx);
    free(c->slots);
    free(c->free_slots);
    free(c->join_addr);
    if (c->listen_fd >= 0)
        close(c->listen_fd);
    if (c->secret)
        memset(c->secret, 0, c->secret_len);
    free(c->secret);
    free(c);
}

/* ---- status ---- */

struct sm *cluster_sm(struct cluster *c)
{
    return c->sm;
}

int cluster_propose(struct cluster *c, uint64_t client_id, uint64_t seq, const void *data,
                    size_t len, uint64_t *index)
{
    if (c->raft == NULL || c->storage_error || c->joining)
        return -EBUSY;
    if (c->frozen || c->propq_n > 0) {
        if (c->propq_n > 0 && c->propq_bytes + len > CLUSTER_PROPQ_MAX_BYTES)
            return -EBUSY;
        if (c->propq_n == c->propq_cap) {
            c->propq_cap = c->propq_cap ? 2 * c->propq_cap : 16;
            c->propq = pb_xreallocarray(c->propq, c->propq_cap, sizeof(*c->propq));
        }
        struct cluster_prop *q = &c->propq[c->propq_n++];
        q->client_id = client_id;
        q->seq = seq;
        q->len = len;
        q->data = pb_xmalloc(len ? len : 1);
        if (len > 0)
            memcpy(q->data, data, len);
        c->propq_bytes += len;
        if (index != NULL)
            *index = 0;
        cluster_schedule(c);
        return 0;
    }
    int rc = raft_propose(c->raft, client_id, seq, data, len, index);
    if (rc == 0)
        cluster_schedule(c);
    return rc;
}

uint64_t cluster_props_dropped(const struct cluster *c)
{
    return c->props_dropped;
}

uint64_t cluster_id_self(const struct cluster *c)
{
    return c->id;
}

void cluster_view(struct cluster *c, struct cluster_view *v)
{
    struct raft_status rs;
    raft_status(c->raft, &rs);
    v->role = c->storage_error && rs.role == RAFT_LEADER ? "follower" : cluster_role_of(c);
    v->term = rs.term;
    v->leader = cluster_name_of(c, rs.leader);
    v->commit = rs.commit;
    v->applied = sm_applied(c->sm);
}

static json_t *cluster_members_array(struct cluster *c)
{
    struct raft_status rs;
    raft_status(c->raft, &rs);
    bool leader = rs.role == RAFT_LEADER;
    uint64_t now = pb_now_ms();
    json_t *arr = json_array();
    for (size_t i = 0; i < c->n_members; i++) {
        const struct cluster_member *m = &c->members[i];
        char hex[17];
        snprintf(hex, sizeof(hex), "%016" PRIx64, m->id);
        bool self = m->id == c->id;
        json_t *o = json_pack("{s:s,s:s,s:s,s:b,s:b}", "id", m->name, "raft_id", hex, "address",
                              m->addr, "voter", m->voter, "self", self);
        struct net_peer_stats ps;
        bool have_ps = !self && net_peer_stats(c->net, m->id, &ps) == 0;
        if (self)
            json_object_set_new(o, "reachable", json_true());
        else
            json_object_set_new(o, "reachable", json_boolean(have_ps && ps.connected));
        json_t *match = json_null(), *lag = json_null();
        if (leader) {
            for (size_t j = 0; j < rs.n_peers; j++) {
                if (rs.peers[j].id == m->id) {
                    match = json_integer((json_int_t)rs.peers[j].match);
                    lag = json_integer((json_int_t)(rs.last_index > rs.peers[j].match
                                                            ? rs.last_index - rs.peers[j].match
                                                            : 0));
                }
            }
        }
        json_object_set_new(o, "match_index", match);
        json_object_set_new(o, "lag", lag);
        uint64_t applied;
        json_object_set_new(o, "applied_index",
                            cluster_member_applied(c, m->id, &applied)
                                    ? json_integer((json_int_t)applied)
                                    : json_null());
        if (have_ps && ps.last_contact_ms != 0)
            json_object_set_new(o, "last_contact_ms",
                                json_integer((json_int_t)(now - ps.last_contact_ms)));
        else
            json_object_set_new(o, "last_contact_ms", json_null());
        /* Frame bytes on the link to this member since the daemon started
         * (null for self); `pickboxctl bench` and metrics read these. */
        json_object_set_new(o, "bytes_sent",
                            have_ps ? json_integer((json_int_t)ps.bytes_sent) : json_null());
        json_object_set_new(o, "bytes_received",
                            have_ps ? json_integer((json_int_t)ps.bytes_recv) : json_null());
        json_array_append_new(arr, o);
    }
    return arr;
}

void cluster_metrics_get(const struct cluster *c, struct cluster_metrics *m)
{
    memset(m, 0, sizeof(*m));
    struct raft_status rs;
    raft_status(c->raft, &rs);
    uint64_t now = pb_now_ms();
    m->term = rs.term;
    m->commit = rs.commit;
    m->applied = sm_applied(c->sm);
    m->last_index = rs.last_index;
    m->snapshot_index = rs.snapshot_index;
    m->leader = rs.role == RAFT_LEADER && !c->storage_error;
    m->storage_error = c->storage_error;
    m->leader_changes = c->leader_changes;
    m->apply_lag = rs.commit > m->applied ? rs.commit - m->applied : 0;
    /* The marks are kept by cluster_lag_note() where the indexes move; here
     * they are only read: the oldest one not applied yet (none: the lag has
     * just begun, 0 s). */
    for (size_t i = 0; m->apply_lag > 0 && i < c->n_lag_marks; i++) {
        if (c->lag_marks[i].index > m->applied) {
            m->apply_lag_s = (double)(now - c->lag_marks[i].at_ms) / 1000.0;
            break;
        }
    }
    m->batches = c->stats_batches;
    m->batch_entries = c->stats_batch_entries;
    struct store_health h;
    store_health(c->store, &h);
    m->fsync = h.commit_time;
    if (c->push != NULL)
        push_get_stats(c->push, &m->push);
    for (size_t i = 0; i < c->n_members && m->n_peers < CLUSTER_METRICS_PEERS; i++) {
        struct net_peer_stats ps;
        if (c->members[i].id == c->id || c->net == NULL ||
            net_peer_stats(c->net, c->members[i].id, &ps) < 0)
            continue;
        struct cluster_peer_metrics *p = &m->peers[m->n_peers++];
        snprintf(p->name, sizeof(p->name), "%s", c->members[i].name);
        p->connected = ps.connected;
        p->bytes_sent = ps.bytes_sent;
        p->bytes_recv = ps.bytes_recv;
    }
}

json_t *cluster_members_json(struct cluster *c)
{
    return json_pack("{s:o}", "members", cluster_members_array(c));
}

void cluster_status_fill(struct cluster *c, json_t *obj)
{
    struct raft_status rs;
    raft_status(c->raft, &rs);
    struct cluster_view v;
    cluster_view(c, &v);
    char rid[17], cid[33];
    snprintf(rid, sizeof(rid), "%016" PRIx64, c->id);
    cluster_hex(c->cluster_id, 16, cid);
    json_object_set_new(obj, "raft_id", json_string(rid));
    json_object_set_new(obj, "cluster_id",
                        c->has_cluster_id && !c->joining ? json_string(cid) : json_null());
    json_object_set_new(obj, "role", json_string(v.role));
    json_object_set_new(obj, "term", json_integer((json_int_t)rs.term));
    json_object_set_new(obj, "leader_id", v.leader ? json_string(v.leader) : json_null());
    json_object_set_new(obj, "commit_index", json_integer((json_int_t)rs.commit));
    json_object_set_new(obj, "applied_index", json_integer((json_int_t)sm_applied(c->sm)));
    json_object_set_new(obj, "last_index", json_integer((json_int_t)rs.last_index));
    json_object_set_new(obj, "snapshot_index", json_integer((json_int_t)rs.snapshot_index));
    json_object_set_new(obj, "consensus_running", json_true());
    json_object_set_new(obj, "joining", json_boolean(c->joining));
    if (c->storage_error)
        json_object_set_new(obj, "storage_error",
                            json_pack("{s:s,s:I}", "message", c->storage_msg, "since_s",
                                      (json_int_t)((pb_now_ms() - c->storage_since_ms) / 1000)));
    else
        json_object_set_new(obj, "storage_error", json_null());
    json_object_set_new(obj, "members", cluster_members_array(c));
    /* How well group commit works: entries per raft.db batch. */
    json_object_set_new(obj, "raft_stats",
                        json_pack("{s:I,s:I,s:I,s:I}", "batches", (json_int_t)c->stats_batches,
                                  "entries", (json_int_t)c->stats_batch_entries,
                                  "malformed_dropped", (json_int_t)c->stats_malformed,
                                  "queue_dropped", (json_int_t)c->stats_inq_dropped));
    struct fetch_stats fs;
    memset(&fs, 0, sizeof(fs));
    if (c->fetch != NULL)
        fetch_get_stats(c->fetch, &fs);
    struct push_stats pst;
    memset(&pst, 0, sizeof(pst));
    if (c->push != NULL)
        push_get_stats(c->push, &pst);
    json_t *pj = json_object();
    json_object_set_new(pj, "sent_frames", json_integer((json_int_t)pst.sent_frames));
    json_object_set_new(pj, "sent_bytes", json_integer((json_int_t)pst.sent_bytes));
    json_object_set_new(pj, "acked_frames", json_integer((json_int_t)pst.acked_frames));
    json_object_set_new(pj, "acked_bytes", json_integer((json_int_t)pst.acked_bytes));
    json_object_set_new(pj, "received_frames", json_integer((json_int_t)pst.received_frames));
    json_object_set_new(pj, "received_bytes", json_integer((json_int_t)pst.received_bytes));
    json_object_set_new(pj, "rejected_frames", json_integer((json_int_t)pst.rejected_frames));
    json_object_set_new(pj, "failed_frames", json_integer((json_int_t)pst.failed_frames));
    json_object_set_new(pj, "peers_left", json_integer((json_int_t)pst.peers_left));
    json_object_set_new(pj, "unrowed_collected", json_integer((json_int_t)pst.unrowed_collected));
    json_object_set_new(obj, "chunk_push", pj);
    json_object_set_new(obj, "chunk_fetch",
                        json_pack("{s:b,s:I,s:I,s:I,s:I,s:I}", "active", fs.active, "requests",
                                  (json_int_t)fs.requests, "rejected", (json_int_t)fs.rejected,
                                  "unavailable", (json_int_t)fs.unavailable, "served_chunks",
                                  (json_int_t)fs.served_chunks, "served_bytes",
                                  (json_int_t)fs.served_bytes));
}
