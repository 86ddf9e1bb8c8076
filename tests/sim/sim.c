/*
 * sim.c: deterministic Raft cluster simulator (see sim.h).
 *
 * Everything random comes from one xorshift PRNG seeded by the run's seed,
 * and every container is scanned in a fixed order, so a seed replays the
 * exact same history (--trace prints it).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/util.h"
#include "sim/sim.h"

#define ELECTION_TICK 10

struct sim_msg {
    uint64_t at;
    struct raft_msg m;
};

struct fsm {
    uint64_t applied;
    uint64_t hash;
    uint64_t ops;
    uint64_t sess[SIM_MAX_CLIENTS];
};

struct disk {
    struct raft_hard_state hs;
    struct raft_entry *ents; /* contiguous from first */
    size_t n, cap;
    uint64_t first;
    bool has_snap;
    uint64_t snap_index, snap_term, snap_size;
    uint8_t *snap_conf;
    size_t snap_conf_len;
    uint8_t *snap_data;
    /* the state machine's durable state (state.db in the daemon) */
    bool has_fsm;
    struct fsm fsm;
    /* staging area of an incoming snapshot */
    uint64_t st_index, st_term;
    uint8_t *st_data;
    size_t st_len;
};

struct node {
    bool exists;
    bool founder;
    uint64_t id;
    struct raft *r;
    struct disk disk;
    struct fsm fsm;
    bool busy;
    uint64_t busy_until;
    struct raft_ready rd;
    enum raft_role prev_role;
    uint64_t snap_every;
};

struct client {
    uint64_t seq; /* op in flight (or last acked when !pending) */
    uint64_t acked;
    bool pending;
    uint64_t retry_at;
};

struct pending_read {
    uint64_t ctx;
    uint64_t id;
    uint64_t min_index;
};

struct lm_slot {
    uint64_t index, term, hash, prev_term;
    bool used;
};

struct sim {
    struct sim_opts o;
    uint64_t rng;
    uint64_t now;
    uint64_t next_id;
    struct node nodes[SIM_MAX_SLOTS];
    bool blocked[SIM_MAX_SLOTS][SIM_MAX_SLOTS];
    unsigned drop, dup, long_delay, leader_faults, conf_rate, disk_fail; /* per mille */
    unsigned skew[SIM_MAX_SLOTS]; /* per mille of missed ticks */
    bool chaos_on;
    struct sim_msg *net;
    size_t n_net, cap_net;
    struct client clients[SIM_MAX_CLIENTS];
    struct pending_read reads[64];
    size_t n_reads;
    uint64_t read_ctx;
    /* invariant state */
    uint64_t *leader_of_term;
    size_t cap_terms;
    uint64_t *com_term, *com_hash, *com_fsm;
    size_t cap_com, cap_com_hash, cap_com_fsm;
    uint64_t max_committed;
    struct lm_slot *lm;
    size_t cap_lm, n_lm;
    bool failed;
    char err[512];
    struct sim_stats st;
};

/* ------------------------------------------------------------ utilities */

static uint64_t rnd(struct sim *s)
{
    uint64_t x = s->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static unsigned rndn(struct sim *s, unsigned n)
{
    return n ? (unsigned)(rnd(s) % n) : 0;
}

static bool chance(struct sim *s, unsigned per_mille)
{
    return rndn(s, 1000) < per_mille;
}

static void trace(struct sim *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void trace(struct sim *s, const char *fmt, ...)
{
    if (!s->o.trace)
        return;
    va_list ap;
    printf("t=%" PRIu64 " ", s->now);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

static void fail(struct sim *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct sim *s, const char *fmt, ...)
{
    if (s->failed)
        return;
    va_list ap;
    int n = snprintf(s->err, sizeof(s->err), "t=%" PRIu64 ": ", s->now);
    va_start(ap, fmt);
    vsnprintf(s->err + n, sizeof(s->err) - (size_t)n, fmt, ap);
    va_end(ap);
    s->failed = true;
    if (s->o.trace)
        printf("INVARIANT VIOLATED: %s\n", s->err);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t entry_hash(const struct raft_entry *e)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    h = fnv(h, &e->type, 1);
    h = fnv(h, &e->client_id, sizeof(e->client_id));
    h = fnv(h, &e->seq, sizeof(e->seq));
    if (e->len)
        h = fnv(h, e->data, e->len);
    return h;
}

static uint8_t *dup_bytes(const void *p, size_t n)
{
    if (n == 0 || p == NULL)
        return NULL;
    uint8_t *q = pb_xmalloc(n);
    memcpy(q, p, n);
    return q;
}

static void *grow_u64(uint64_t *p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return p;
    size_t nc = *cap ? *cap : 256;
    while (nc < need)
        nc *= 2;
    p = pb_xreallocarray(p, nc, sizeof(uint64_t));
    memset(p + *cap, 0, (nc - *cap) * sizeof(uint64_t));
    *cap = nc;
    return p;
}

static int slot_of(const struct sim *s, uint64_t id)
{
    for (int i = 0; i < SIM_MAX_SLOTS; i++)
        if (s->nodes[i].exists && s->nodes[i].id == id)
            return i;
    return -1;
}

/* ------------------------------------------------------------ the disk */

static uint64_t disk_last(const struct disk *d)
{
    return d->first + d->n - 1;
}

/* Term at index on disk, 0 if unknown. */
static uint64_t disk_term(const struct disk *d, uint64_t index)
{
    if (index >= d->first && index <= disk_last(d))
        return d->ents[index - d->first].term;
    if (d->has_snap && index == d->snap_index)
        return d->snap_term;
    return 0;
}

static void disk_truncate_from(struct disk *d, uint64_t index)
{
    while (d->n > 0 && disk_last(d) >= index) {
        free(d->ents[d->n - 1].data);
        d->n--;
    }
}

static void disk_drop_upto(struct disk *d, uint64_t index)
{
    size_t k = 0;
    while (k < d->n && d->ents[k].index <= index)
        free(d->ents[k++].data);
    memmove(d->ents, d->ents + k, (d->n - k) * sizeof(*d->ents));
    d->n -= k;
    if (d->first <= index)
        d->first = index + 1;
}

static void disk_free(struct disk *d)
{
    disk_truncate_from(d, 0);
    free(d->ents);
    free(d->snap_conf);
    free(d->snap_data);
    free(d->st_data);
    memset(d, 0, sizeof(*d));
    d->first = 1;
}

/* Configuration as the disk of a node knows it (for slot reuse). */
static bool disk_has_member(const struct disk *d, uint64_t id)
{
    struct raft_conf c;
    for (size_t i = d->n; i > 0; i--) {
        const struct raft_entry *e = &d->ents[i - 1];
        if (e->type != RAFT_ENTRY_CONF)
            continue;
        if (raft_conf_decode(e->data, e->len, &c) != 0)
            return false;
        bool found = raft_conf_find(&c, id) != NULL;
        raft_conf_clear(&c);
        return found;
    }
    if (d->has_snap && raft_conf_decode(d->snap_conf, d->snap_conf_len, &c) == 0) {
        bool found = raft_conf_find(&c, id) != NULL;
        raft_conf_clear(&c);
        return found;
    }
    return false;
}

/* ------------------------------------------------------------ state machine */

static void fsm_encode(const struct fsm *f, struct buf *b)
{
    buf_put_u64(b, f->applied);
    buf_put_u64(b, f->hash);
    buf_put_u64(b, f->ops);
    for (int i = 0; i < SIM_MAX_CLIENTS; i++)
        buf_put_u64(b, f->sess[i]);
    /* Padding so snapshots take several chunks, varying with the state. */
    size_t pad = 40 + (size_t)(f->hash % 90);
    for (size_t i = 0; i < pad; i++)
        buf_put_u8(b, (uint8_t)(f->hash >> (i % 8)));
}

static int fsm_decode(struct fsm *f, const uint8_t *p, size_t n)
{
    struct cursor c;
    cursor_init(&c, p, n);
    f->applied = cursor_u64(&c);
    f->hash = cursor_u64(&c);
    f->ops = cursor_u64(&c);
    for (int i = 0; i < SIM_MAX_CLIENTS; i++)
        f->sess[i] = cursor_u64(&c);
    size_t pad = 40 + (size_t)(f->hash % 90);
    if (!cursor_ok(&c) || cursor_remaining(&c) != pad)
        return -EINVAL;
    for (size_t i = 0; i < pad; i++)
        if (cursor_u8(&c) != (uint8_t)(f->hash >> (i % 8)))
            return -EINVAL;
    return 0;
}

static void record_committed(struct sim *s, struct node *nd, const struct raft_entry *e)
{
    s->com_term = grow_u64(s->com_term, &s->cap_com, (size_t)e->index + 1);
    s->com_hash = grow_u64(s->com_hash, &s->cap_com_hash, (size_t)e->index + 1);
    s->com_fsm = grow_u64(s->com_fsm, &s->cap_com_fsm, (size_t)e->index + 1);
    uint64_t h = entry_hash(e);
    if (s->com_term[e->index] == 0) {
        s->com_term[e->index] = e->term;
        s->com_hash[e->index] = h;
        s->com_fsm[e->index] = nd->fsm.hash;
        if (e->index > s->max_committed)
            s->max_committed = e->index;
        return;
    }
    if (s->com_term[e->index] != e->term || s->com_hash[e->index] != h)
        fail(s,
             "state machine safety: n%" PRIu64 " applied index %" PRIu64 " term %" PRIu64
             ", another node applied term %" PRIu64 " (or other content)",
             nd->id, e->index, e->term, s->com_term[e->index]);
    else if (s->com_fsm[e->index] != nd->fsm.hash)
        fail(s, "state machine safety: n%" PRIu64 " state after %" PRIu64 " differs", nd->id,
             e->index);
}

static void fsm_apply(struct sim *s, struct node *nd, const struct raft_entry *e)
{
    struct fsm *f = &nd->fsm;
    if (e->index != f->applied + 1) {
        fail(s, "n%" PRIu64 " applies index %" PRIu64 " after %" PRIu64, nd->id, e->index,
             f->applied);
        return;
    }
    f->applied = e->index;
    if (e->type == RAFT_ENTRY_NORMAL && e->client_id >= 1 && e->client_id <= SIM_MAX_CLIENTS) {
        unsigned c = (unsigned)e->client_id - 1;
        if (e->seq <= f->sess[c]) {
            /* a retried op that was already applied: the session skips it */
            s->st.dups++;
            goto dup;
        }
        if (e->seq != f->sess[c] + 1) {
            fail(s, "exactly-once: n%" PRIu64 " client %u applies seq %" PRIu64 " after %" PRIu64,
                 nd->id, c + 1, e->seq, f->sess[c]);
            return;
        }
        f->sess[c] = e->seq;
        f->ops++;
        f->hash = fnv(f->hash, &e->client_id, 8);
        f->hash = fnv(f->hash, &e->seq, 8);
        if (e->len)
            f->hash = fnv(f->hash, e->data, e->len);
        struct client *cl = &s->clients[c];
        if (cl->pending && cl->seq == e->seq) {
            cl->pending = false;
            cl->acked = e->seq;
            trace(s, "client %u seq %" PRIu64 " acknowledged (index %" PRIu64 ")", c + 1, e->seq,
                  e->index);
        }
    }
dup:
    record_committed(s, nd, e);
}

/* ------------------------------------------------------------ network */

static void msg_free(struct raft_msg *m)
{
    raft_msg_clear(m);
}

static void describe(char *buf, size_t n, const struct raft_msg *m)
{
    snprintf(buf, n,
             "n%" PRIu64 "->n%" PRIu64 " %s term=%" PRIu64 " idx=%" PRIu64 " lt=%" PRIu64
             " n=%zu commit=%" PRIu64 "%s hint=%" PRIu64 " off=%" PRIu64 " len=%zu ctx=%" PRIu64
             "%s",
             m->from, m->to, raft_msg_type_name(m->type), m->term, m->index, m->log_term,
             m->n_entries, m->commit, m->reject ? " REJECT" : "", m->hint, m->offset, m->len,
             m->ctx, (m->flags & RAFT_MSG_FLAG_DONE) ? " DONE" : "");
}

/* What a node may send only once it is on its disk. */
static void check_sent(struct sim *s, struct node *nd, const struct raft_msg *m)
{
    const struct disk *d = &nd->disk;
    switch (m->type) {
    case RAFT_MSG_VOTE_RESP:
        /* A later persisted term implies we never vote again in m->term. */
        if (!m->reject && d->hs.term <= m->term && (d->hs.term != m->term || d->hs.vote != m->to))
            fail(s,
                 "n%" PRIu64 " granted a vote for term %" PRIu64 " to n%" PRIu64
                 " before persisting it (disk term %" PRIu64 " vote %" PRIu64 ")",
                 nd->id, m->term, m->to, d->hs.term, d->hs.vote);
        break;
    case RAFT_MSG_VOTE:
        if (d->hs.term < m->term || (d->hs.term == m->term && d->hs.vote != nd->id))
            fail(s, "n%" PRIu64 " requested votes for term %" PRIu64 " before persisting it",
                 nd->id, m->term);
        break;
    case RAFT_MSG_APP:
    case RAFT_MSG_HEARTBEAT:
    case RAFT_MSG_SNAP:
    case RAFT_MSG_TIMEOUT_NOW:
        if (d->hs.term < m->term)
            fail(s, "n%" PRIu64 " leads term %" PRIu64 " but disk has term %" PRIu64, nd->id,
                 m->term, d->hs.term);
        break;
    case RAFT_MSG_APP_RESP:
        if (!m->reject && m->index > 0 && m->index > disk_last(d) &&
            !(d->has_snap && d->snap_index >= m->index))
            fail(s,
                 "n%" PRIu64 " acknowledged index %" PRIu64 " not on its disk (last %" PRIu64 ")",
                 nd->id, m->index, disk_last(d));
        break;
    case RAFT_MSG_SNAP_RESP:
        if (!m->reject && !(d->st_index == m->index && d->st_len >= m->offset) &&
            !(d->has_snap && d->snap_index >= m->index))
            fail(s, "n%" PRIu64 " acknowledged snapshot bytes it has not staged", nd->id);
        break;
    default:
        break;
    }
}

static void net_push(struct sim *s, const struct sim_msg *sm)
{
    if (s->n_net == s->cap_net) {
        s->cap_net = s->cap_net ? s->cap_net * 2 : 64;
        s->net = pb_xreallocarray(s->net, s->cap_net, sizeof(*s->net));
    }
    s->net[s->n_net++] = *sm;
}

/* Every message crosses the wire codec, as it will between real nodes. */
static bool msg_copy(struct sim *s, struct node *from, const struct raft_msg *m, struct raft_msg *d)
{
    struct raft_msg tmp = *m;
    if (m->type == RAFT_MSG_SNAP && m->data == NULL) {
        /* The application serves chunks of its current snapshot. */
        const struct disk *dk = &from->disk;
        if (!dk->has_snap || dk->snap_index != m->snap.index || m->offset + m->len > dk->snap_size)
            return false;
        tmp.data = dk->snap_data + m->offset;
        s->st.snapshots_sent += m->offset == 0;
    }
    struct buf b = BUF_INIT;
    int rc = raft_msg_encode(&tmp, &b);
    if (rc == 0)
        rc = raft_msg_decode(b.data, b.len, d);
    buf_free(&b);
    if (rc != 0)
        fail(s, "codec: %s message does not round-trip: %d", raft_msg_type_name(m->type), rc);
    return rc == 0;
}

static void net_send(struct sim *s, struct node *from, const struct raft_msg *m)
{
    struct sim_msg sm;
    check_sent(s, from, m);
    s->st.msgs++;
    if (s->chaos_on && chance(s, s->drop)) {
        s->st.dropped++;
        trace(s, "drop n%" PRIu64 "->n%" PRIu64 " %s", m->from, m->to, raft_msg_type_name(m->type));
        return;
    }
    if (!msg_copy(s, from, m, &sm.m))
        return;
    sm.at = s->now + 1 + rndn(s, 3);
    if (s->chaos_on && chance(s, s->long_delay))
        sm.at += rndn(s, 4 * ELECTION_TICK);
    net_push(s, &sm);
    if (s->chaos_on && chance(s, s->dup)) {
        struct sim_msg dup;
        if (!msg_copy(s, from, &sm.m, &dup.m))
            return;
        dup.at = s->now + 1 + rndn(s, 2 * ELECTION_TICK);
        net_push(s, &dup);
        s->st.duplicated++;
    }
}

/* ------------------------------------------------------------ nodes */

static struct raft *node_core(struct sim *s, struct node *nd)
{
    struct raft_config cfg;
    raft_config_init(&cfg, nd->id);
    cfg.seed = rnd(s);
    cfg.election_tick = ELECTION_TICK;
    cfg.heartbeat_tick = 2;
    cfg.max_msg_bytes = 16;
    cfg.max_inflight_msgs = 4;
    cfg.max_inflight_bytes = 256;
    cfg.snapshot_chunk_bytes = 48;
    cfg.snapshot_trailing = 4;
    cfg.catchup_max_lag = 3;
    return raft_new(&cfg);
}

static void node_start(struct sim *s, struct node *nd)
{
    struct disk *d = &nd->disk;
    nd->r = node_core(s, nd);
    memset(&nd->fsm, 0, sizeof(nd->fsm));
    nd->busy = false;
    nd->prev_role = RAFT_FOLLOWER;
    nd->snap_every = 10 + rndn(s, 30);
    if (d->hs.term == 0 && d->n == 0 && !d->has_snap) {
        if (nd->founder) {
            struct raft_conf c;
            char ctx[SIM_MAX_SLOTS][64];
            memset(&c, 0, sizeof(c));
            for (unsigned i = 0; i < s->o.nodes; i++) {
                int len = snprintf(ctx[i], sizeof(ctx[i]), "n%u@10.0.0.%u:8010", i + 1, i + 1);
                c.members[c.n].id = i + 1;
                c.members[c.n].role = RAFT_VOTER;
                c.members[c.n].ctx = (uint8_t *)ctx[i];
                c.members[c.n].ctx_len = (size_t)len;
                c.n++;
            }
            if (raft_bootstrap(nd->r, &c) != 0)
                fail(s, "bootstrap failed");
        }
        return;
    }
    struct raft_snapshot_meta meta = {
            .index = d->snap_index,
            .term = d->snap_term,
            .size = d->snap_size,
            .conf = d->snap_conf,
            .conf_len = d->snap_conf_len,
    };
    struct raft_restore_state st = {
            .hs = d->hs,
            .snapshot = d->has_snap ? &meta : NULL,
            .entries = d->ents,
            .n_entries = d->n,
            .applied = d->has_snap ? d->snap_index : 0,
    };
    if (d->has_snap && fsm_decode(&nd->fsm, d->snap_data, d->snap_size) != 0)
        fail(s, "n%" PRIu64 " snapshot on disk does not decode", nd->id);
    if (d->has_fsm && chance(s, 500)) {
        /* Like state.db: the state machine kept its own durable state (and
         * applied index); only later entries are applied again. */
        nd->fsm = d->fsm;
        st.applied = d->fsm.applied;
    }
    int rc = raft_restore(nd->r, &st);
    if (rc != 0)
        fail(s, "n%" PRIu64 " restore failed: %d", nd->id, rc);
}

static void node_stop(struct sim *s, struct node *nd)
{
    (void)s;
    raft_free(nd->r);
    nd->r = NULL;
    nd->busy = false;
}

static void lm_check(struct sim *s, struct node *nd, const struct raft_entry *e, uint64_t prev_term,
                     bool prev_known)
{
    if (s->n_lm * 2 >= s->cap_lm) {
        size_t oc = s->cap_lm;
        struct lm_slot *old = s->lm;
        s->cap_lm = oc ? oc * 2 : 1024;
        s->lm = pb_xcalloc(s->cap_lm, sizeof(*s->lm));
        for (size_t i = 0; i < oc; i++) {
            if (!old[i].used)
                continue;
            size_t h = (size_t)((old[i].index * 31 + old[i].term) * 0x9E3779B97F4A7C15ULL);
            h &= s->cap_lm - 1;
            while (s->lm[h].used)
                h = (h + 1) & (s->cap_lm - 1);
            s->lm[h] = old[i];
        }
        free(old);
    }
    size_t h = (size_t)((e->index * 31 + e->term) * 0x9E3779B97F4A7C15ULL) & (s->cap_lm - 1);
    uint64_t eh = entry_hash(e);
    while (s->lm[h].used) {
        struct lm_slot *x = &s->lm[h];
        if (x->index == e->index && x->term == e->term) {
            if (x->hash != eh || (prev_known && x->prev_term != prev_term))
                fail(s, "log matching: n%" PRIu64 " has a different entry %" PRIu64 "/%" PRIu64,
                     nd->id, e->index, e->term);
            return;
        }
        h = (h + 1) & (s->cap_lm - 1);
    }
    if (!prev_known) /* record only fully known facts */
        return;
    s->lm[h].used = true;
    s->lm[h].index = e->index;
    s->lm[h].term = e->term;
    s->lm[h].hash = eh;
    s->lm[h].prev_term = prev_term;
    s->n_lm++;
}

static void persist(struct sim *s, struct node *nd, const struct raft_ready *rd)
{
    struct disk *d = &nd->disk;
    if (rd->chunk) {
        const struct raft_snapshot_chunk *c = rd->chunk;
        if (c->offset == 0) {
            d->st_index = c->index;
            d->st_term = c->term;
            d->st_len = 0;
        }
        if (d->st_index != c->index || d->st_term != c->term || d->st_len != c->offset) {
            fail(s, "n%" PRIu64 " chunk at %" PRIu64 " does not continue staging (%" PRIu64 ")",
                 nd->id, c->offset, (uint64_t)d->st_len);
            return;
        }
        d->st_data = pb_xrealloc(d->st_data, d->st_len + c->len);
        if (c->len)
            memcpy(d->st_data + d->st_len, c->data, c->len);
        d->st_len += c->len;
    }
    if (rd->snapshot) {
        const struct raft_snapshot_meta *m = rd->snapshot;
        if (d->st_index != m->index || d->st_term != m->term || d->st_len != m->size) {
            fail(s, "n%" PRIu64 " installs snapshot %" PRIu64 " but staged %" PRIu64 "/%zu", nd->id,
                 m->index, d->st_index, d->st_len);
            return;
        }
        struct fsm f;
        if (fsm_decode(&f, d->st_data, d->st_len) != 0 || f.applied != m->index) {
            fail(s, "n%" PRIu64 " received snapshot %" PRIu64 " is corrupt", nd->id, m->index);
            return;
        }
        if (m->index < s->cap_com && s->com_term[m->index] && s->com_fsm[m->index] != f.hash)
            fail(s, "n%" PRIu64 " snapshot %" PRIu64 " state differs from applied state", nd->id,
                 m->index);
        free(d->snap_data);
        free(d->snap_conf);
        d->snap_data = d->st_data;
        d->snap_size = d->st_len;
        d->st_data = NULL;
        d->st_len = 0;
        d->st_index = 0;
        d->has_snap = true;
        d->snap_index = m->index;
        d->snap_term = m->term;
        d->snap_conf = dup_bytes(m->conf, m->conf_len);
        d->snap_conf_len = m->conf_len;
        if (rd->snapshot_keep_log) {
            if (disk_term(d, m->index) != m->term && m->index <= disk_last(d))
                fail(s, "n%" PRIu64 " keeps a log that conflicts with its snapshot", nd->id);
            disk_drop_upto(d, m->index);
        } else {
            disk_truncate_from(d, 0);
            d->first = m->index + 1;
        }
        if (d->n == 0)
            d->first = m->index + 1;
        nd->fsm = f;
        s->st.snapshots_installed++;
        trace(s, "n%" PRIu64 " installed snapshot %" PRIu64 "/%" PRIu64 " keep_log=%d", nd->id,
              m->index, m->term, rd->snapshot_keep_log);
    }
    if (rd->n_entries) {
        uint64_t i0 = rd->entries[0].index;
        if (d->n == 0)
            d->first = i0;
        if (i0 > disk_last(d) + 1 || i0 < d->first) {
            fail(s, "n%" PRIu64 " appends at %" PRIu64 " to a disk log [%" PRIu64 ", %" PRIu64 "]",
                 nd->id, i0, d->first, disk_last(d));
            return;
        }
        disk_truncate_from(d, i0);
        for (size_t i = 0; i < rd->n_entries; i++) {
            const struct raft_entry *e = &rd->entries[i];
            uint64_t pt = e->index == 1 ? 0 : disk_term(d, e->index - 1);
            lm_check(s, nd, e, pt, e->index == 1 || pt != 0);
            if (d->n == d->cap) {
                d->cap = d->cap ? d->cap * 2 : 64;
                d->ents = pb_xreallocarray(d->ents, d->cap, sizeof(*d->ents));
            }
            d->ents[d->n] = *e;
            d->ents[d->n].data = dup_bytes(e->data, e->len);
            d->n++;
        }
    }
    if (rd->hs_changed) {
        if (rd->hs.term < d->hs.term)
            fail(s, "n%" PRIu64 " persists term %" PRIu64 " below %" PRIu64, nd->id, rd->hs.term,
                 d->hs.term);
        if (rd->hs.term == d->hs.term && d->hs.vote != RAFT_NONE && rd->hs.vote != d->hs.vote)
            fail(s, "n%" PRIu64 " voted twice in term %" PRIu64, nd->id, rd->hs.term);
        d->hs = rd->hs;
    }
}

static void take_snapshot(struct sim *s, struct node *nd)
{
    struct disk *d = &nd->disk;
    if (nd->fsm.applied < (d->has_snap ? d->snap_index : 0) + nd->snap_every)
        return;
    struct buf b = BUF_INIT;
    fsm_encode(&nd->fsm, &b);
    struct raft_snapshot_meta meta;
    uint64_t compact_to;
    int rc = raft_snapshot_taken(nd->r, nd->fsm.applied, b.len, &meta, &compact_to);
    if (rc != 0) {
        fail(s, "n%" PRIu64 " snapshot at %" PRIu64 " refused: %d", nd->id, nd->fsm.applied, rc);
        buf_free(&b);
        return;
    }
    size_t len;
    free(d->snap_data);
    d->snap_data = buf_steal(&b, &len);
    d->snap_size = len;
    free(d->snap_conf);
    d->snap_conf = dup_bytes(meta.conf, meta.conf_len);
    d->snap_conf_len = meta.conf_len;
    d->snap_index = meta.index;
    d->snap_term = meta.term;
    d->has_snap = true;
    disk_drop_upto(d, compact_to);
    if (d->n == 0 && d->first <= meta.index)
        d->first = meta.index + 1;
    nd->snap_every = 10 + rndn(s, 30);
    s->st.compactions++;
    trace(s, "n%" PRIu64 " snapshot at %" PRIu64 " (%zu bytes), log compacted to %" PRIu64, nd->id,
          meta.index, len, compact_to);
}

static void check_reads(struct sim *s, struct node *nd, const struct raft_ready *rd)
{
    for (size_t i = 0; i < rd->n_reads; i++) {
        for (size_t k = 0; k < s->n_reads; k++) {
            struct pending_read *p = &s->reads[k];
            if (p->ctx != rd->reads[i].ctx)
                continue;
            if (p->id != nd->id)
                fail(s, "read %" PRIu64 " answered on the wrong node", p->ctx);
            else if (rd->reads[i].index < p->min_index)
                fail(s,
                     "stale ReadIndex: n%" PRIu64 " read %" PRIu64 " at %" PRIu64 " but %" PRIu64
                     " was committed before it was issued",
                     nd->id, p->ctx, rd->reads[i].index, p->min_index);
            trace(s, "n%" PRIu64 " read %" PRIu64 " at index %" PRIu64, nd->id, p->ctx,
                  rd->reads[i].index);
            s->reads[k] = s->reads[--s->n_reads];
            s->st.reads++;
            break;
        }
    }
}

static void complete_ready(struct sim *s, struct node *nd)
{
    struct raft_ready *rd = &nd->rd;
    if (s->chaos_on && rd->must_sync && chance(s, s->disk_fail)) {
        /* The write was rolled back: nothing reached the disk. */
        trace(s, "n%" PRIu64 " persist FAILED (disk error), will retry", nd->id);
        raft_persist_failed(nd->r, rd);
        nd->busy = false;
        s->st.disk_failures++;
        return;
    }
    if (s->o.trace && (rd->hs_changed || rd->n_entries || rd->n_committed))
        trace(s,
              "n%" PRIu64 " persisted term=%" PRIu64 " vote=%" PRIu64 " commit=%" PRIu64
              " entries=[%" PRIu64 "..%" PRIu64 "], applies [%" PRIu64 "..%" PRIu64 "]",
              nd->id, rd->hs.term, rd->hs.vote, rd->hs.commit,
              rd->n_entries ? rd->entries[0].index : 0,
              rd->n_entries ? rd->entries[rd->n_entries - 1].index : 0,
              rd->n_committed ? rd->committed[0].index : 0,
              rd->n_committed ? rd->committed[rd->n_committed - 1].index : 0);
    persist(s, nd, rd);
    for (size_t i = 0; i < rd->n_msgs_after_persist; i++)
        net_send(s, nd, &rd->msgs_after_persist[i]);
    for (size_t i = 0; i < rd->n_committed; i++)
        fsm_apply(s, nd, &rd->committed[i]);
    check_reads(s, nd, rd);
    raft_advance(nd->r, rd);
    nd->busy = false;
    nd->disk.fsm = nd->fsm; /* the state machine's own durable copy */
    nd->disk.has_fsm = true;
    take_snapshot(s, nd);
}

static void process_ready(struct sim *s, struct node *nd)
{
    for (int round = 0; round < 8 && nd->r && !nd->busy && !s->failed; round++) {
        if (!raft_ready(nd->r, &nd->rd))
            return;
        for (size_t i = 0; i < nd->rd.n_msgs; i++)
            net_send(s, nd, &nd->rd.msgs[i]);
        if (s->chaos_on && chance(s, 300)) {
            nd->busy = true;
            nd->busy_until = s->now + 1 + rndn(s, 3);
            trace(s, "n%" PRIu64 " persisting until t=%" PRIu64, nd->id, nd->busy_until);
            return;
        }
        complete_ready(s, nd);
    }
}

/* ------------------------------------------------------------ invariants */

static void check_roles(struct sim *s)
{
    for (int i = 0; i < SIM_MAX_SLOTS; i++) {
        struct node *nd = &s->nodes[i];
        if (!nd->exists || nd->r == NULL)
            continue;
        enum raft_role role = raft_role(nd->r);
        uint64_t term = raft_term(nd->r);
        if (role == RAFT_LEADER) {
            s->leader_of_term = grow_u64(s->leader_of_term, &s->cap_terms, (size_t)term + 1);
            if (s->leader_of_term[term] == 0)
                s->leader_of_term[term] = nd->id;
            else if (s->leader_of_term[term] != nd->id)
                fail(s, "election safety: n%" PRIu64 " and n%" PRIu64 " both lead term %" PRIu64,
                     s->leader_of_term[term], nd->id, term);
            if (nd->prev_role != RAFT_LEADER) {
                s->st.elections++;
                trace(s, "n%" PRIu64 " became leader of term %" PRIu64, nd->id, term);
                /* Leader completeness: every committed entry is in its log. */
                struct raft_status st;
                raft_status(nd->r, &st);
                for (uint64_t k = st.first_index; k <= s->max_committed; k++) {
                    if (k >= s->cap_com || s->com_term[k] == 0)
                        continue;
                    const struct raft_entry *e = raft_entry_at(nd->r, k);
                    if (e == NULL || e->term != s->com_term[k]) {
                        fail(s,
                             "leader completeness: n%" PRIu64 " leads term %" PRIu64
                             " without committed entry %" PRIu64,
                             nd->id, term, k);
                        break;
                    }
                }
            }
        }
        nd->prev_role = role;
    }
}

/* ------------------------------------------------------------ chaos */

static int random_up(struct sim *s)
{
    int c[SIM_MAX_SLOTS], n = 0;
    for (int i = 0; i < SIM_MAX_SLOTS; i++)
        if (s->nodes[i].exists && s->nodes[i].r)
            c[n++] = i;
    return n ? c[rndn(s, (unsigned)n)] : -1;
}

static int find_leader(struct sim *s)
{
    int best = -1;
    uint64_t bt = 0;
    for (int i = 0; i < SIM_MAX_SLOTS; i++) {
        struct node *nd = &s->nodes[i];
        if (nd->exists && nd->r && !nd->busy && raft_role(nd->r) == RAFT_LEADER &&
            raft_term(nd->r) >= bt) {
            best = i;
            bt = raft_term(nd->r);
        }
    }
    return best;
}

static void op_data(unsigned c, uint64_t seq, char *buf, size_t n, size_t *len)
{
    int k = snprintf(buf, n, "c%u-s%" PRIu64 "-", c + 1, seq);
    size_t pad = (size_t)((seq * 7 + c) % 13);
    for (size_t i = 0; i < pad && (size_t)k + i < n; i++)
        buf[k + i] = (char)('a' + i);
    *len = (size_t)k + pad;
}

int sim_propose(struct sim *s, unsigned slot, unsigned client)
{
    struct node *nd = &s->nodes[slot];
    struct client *cl = &s->clients[client];
    if (!nd->exists || nd->r == NULL || nd->busy)
        return -EAGAIN;
    if (!cl->pending) {
        cl->seq = cl->acked + 1;
        cl->pending = true;
    }
    char data[64];
    size_t len;
    op_data(client, cl->seq, data, sizeof(data), &len);
    int rc = raft_propose(nd->r, client + 1, cl->seq, data, len, NULL);
    trace(s, "client %u proposes seq %" PRIu64 " via n%" PRIu64 ": %d", client + 1, cl->seq, nd->id,
          rc);
    cl->retry_at = s->now + (rc == 0 ? 30 + rndn(s, 50) : 3 + rndn(s, 5));
    return rc;
}

static void chaos_clients(struct sim *s, bool new_ops)
{
    for (unsigned c = 0; c < SIM_MAX_CLIENTS; c++) {
        struct client *cl = &s->clients[c];
        bool go = cl->pending ? s->now >= cl->retry_at : (new_ops && chance(s, 150));
        if (!go)
            continue;
        int slot = random_up(s);
        /* Clients mostly talk to members (a removed node may never learn
         * it was removed and keeps a stale view of the leader). */
        int l = find_leader(s);
        for (int tries = 0; l >= 0 && slot >= 0 && tries < 8 && !chance(s, 150); tries++) {
            if (raft_conf_find(raft_conf(s->nodes[l].r), s->nodes[slot].id) != NULL)
                break;
            slot = random_up(s);
        }
        if (slot >= 0)
            sim_propose(s, (unsigned)slot, c);
    }
}

static bool slot_free(struct sim *s, int i)
{
    struct node *nd = &s->nodes[i];
    if (!nd->exists)
        return true;
    for (int k = 0; k < SIM_MAX_SLOTS; k++) {
        struct node *o = &s->nodes[k];
        if (!o->exists)
            continue;
        if (o->r && raft_conf_find(raft_conf(o->r), nd->id) != NULL)
            return false;
        if (disk_has_member(&o->disk, nd->id))
            return false;
    }
    return true;
}

static void node_retire(struct sim *s, struct node *nd)
{
    trace(s, "n%" PRIu64 " retired", nd->id);
    node_stop(s, nd);
    disk_free(&nd->disk);
    nd->exists = false;
}

int sim_add_learner(struct sim *s, unsigned leader_slot)
{
    struct node *ld = &s->nodes[leader_slot];
    if (!ld->r || ld->busy || raft_role(ld->r) != RAFT_LEADER)
        return -EPERM;
    int free_slot = -1;
    for (int i = 0; i < SIM_MAX_SLOTS && free_slot < 0; i++)
        if (slot_free(s, i))
            free_slot = i;
    if (free_slot < 0)
        return -ENOSPC;
    uint64_t id = s->next_id;
    char ctx[64];
    int len = snprintf(ctx, sizeof(ctx), "n%" PRIu64 "@10.0.1.%" PRIu64 ":8010", id, id);
    int rc = raft_change_conf(ld->r, RAFT_CONF_ADD_LEARNER, id, ctx, (size_t)len);
    trace(s, "n%" PRIu64 " add learner n%" PRIu64 ": %d", ld->id, id, rc);
    if (rc != 0)
        return rc;
    s->next_id++;
    struct node *nd = &s->nodes[free_slot];
    if (nd->exists)
        node_retire(s, nd);
    memset(nd, 0, sizeof(*nd));
    nd->exists = true;
    nd->id = id;
    nd->disk.first = 1;
    node_start(s, nd);
    s->st.conf_changes++;
    return free_slot;
}

static void chaos_membership(struct sim *s)
{
    int l = find_leader(s);
    if (l < 0)
        return;
    struct node *ld = &s->nodes[l];
    const struct raft_conf *c = raft_conf(ld->r);
    unsigned what = rndn(s, 3);
    if (what == 0) {
        sim_add_learner(s, (unsigned)l);
        return;
    }
    const struct raft_member *m = &c->members[rndn(s, (unsigned)c->n)];
    uint64_t id = m->id;
    if (what == 1 && m->role == RAFT_LEARNER) {
        int rc = raft_change_conf(ld->r, RAFT_CONF_PROMOTE, id, NULL, 0);
        trace(s, "n%" PRIu64 " promote n%" PRIu64 ": %d", ld->id, id, rc);
        s->st.conf_changes += rc == 0;
    } else if (what == 2) {
        size_t voters = 0;
        for (size_t i = 0; i < c->n; i++)
            voters += c->members[i].role == RAFT_VOTER;
        if (m->role == RAFT_VOTER && voters <= 2)
            return;
        int rc = raft_change_conf(ld->r, RAFT_CONF_REMOVE, id, NULL, 0);
        trace(s, "n%" PRIu64 " remove n%" PRIu64 ": %d", ld->id, id, rc);
        s->st.conf_changes += rc == 0;
    }
}

static void chaos(struct sim *s)
{
    chaos_clients(s, true);
    if (chance(s, 4)) {
        int i = random_up(s);
        if (i >= 0)
            sim_crash(s, (unsigned)i);
    }
    for (int i = 0; i < SIM_MAX_SLOTS; i++)
        if (s->nodes[i].exists && !s->nodes[i].r && chance(s, 25))
            sim_restart(s, (unsigned)i);
    if (chance(s, 6)) {
        if (chance(s, 500)) {
            /* symmetric: a random side against the rest */
            unsigned mask = rndn(s, 1u << SIM_MAX_SLOTS);
            for (int a = 0; a < SIM_MAX_SLOTS; a++)
                for (int b = 0; b < SIM_MAX_SLOTS; b++)
                    s->blocked[a][b] = ((mask >> a) & 1) != ((mask >> b) & 1);
            trace(s, "partition mask %#x", mask);
        } else {
            unsigned a = rndn(s, SIM_MAX_SLOTS), b = rndn(s, SIM_MAX_SLOTS);
            s->blocked[a][b] = true;
            trace(s, "one-way block slot %u -> slot %u", a, b);
        }
    }
    if (chance(s, s->leader_faults)) {
        /* Leader churn is where commitment bugs (Figure 8) live. */
        int l = find_leader(s);
        if (l >= 0 && chance(s, 500)) {
            sim_crash(s, (unsigned)l);
        } else if (l >= 0) {
            sim_isolate(s, (unsigned)l, true);
            trace(s, "isolate leader n%" PRIu64, s->nodes[l].id);
        }
    }
    if (chance(s, 12))
        sim_heal(s);
    if (s->o.membership && chance(s, s->conf_rate))
        chaos_membership(s);
    if (chance(s, 4)) {
        int l = find_leader(s);
        if (l >= 0) {
            const struct raft_conf *c = raft_conf(s->nodes[l].r);
            if (c->n > 0) {
                uint64_t to = c->members[rndn(s, (unsigned)c->n)].id;
                int rc = raft_transfer_leader(s->nodes[l].r, to);
                trace(s, "n%" PRIu64 " transfer leadership to n%" PRIu64 ": %d", s->nodes[l].id, to,
                      rc);
                s->st.transfers += rc == 0;
            }
        }
    }
    if (chance(s, 15)) {
        int i = random_up(s);
        if (i >= 0 && !s->nodes[i].busy && s->n_reads < PB_ARRAY_SIZE(s->reads)) {
            uint64_t ctx = ++s->read_ctx;
            int rc = raft_read_index(s->nodes[i].r, ctx);
            trace(s, "n%" PRIu64 " read index ctx %" PRIu64 ": %d", s->nodes[i].id, ctx, rc);
            if (rc == 0) {
                struct pending_read *p = &s->reads[s->n_reads++];
                p->ctx = ctx;
                p->id = s->nodes[i].id;
                p->min_index = s->max_committed;
            }
        }
    }
}

/* ------------------------------------------------------------ the tick */

static void deliver(struct sim *s)
{
    size_t *due = pb_xcalloc(s->n_net ? s->n_net : 1, sizeof(*due)), n = 0;
    for (size_t i = 0; i < s->n_net; i++)
        if (s->net[i].at <= s->now)
            due[n++] = i;
    /* shuffle: messages due in the same tick arrive in any order */
    for (size_t i = n; i > 1; i--) {
        size_t j = rndn(s, (unsigned)i);
        size_t t = due[i - 1];
        due[i - 1] = due[j];
        due[j] = t;
    }
    struct sim_msg *batch = pb_xcalloc(n ? n : 1, sizeof(*batch));
    bool *keep = pb_xcalloc(n ? n : 1, sizeof(bool));
    for (size_t i = 0; i < n; i++)
        batch[i] = s->net[due[i]];
    /* remove the due messages from the queue */
    size_t k = 0;
    for (size_t i = 0; i < s->n_net; i++)
        if (s->net[i].at > s->now)
            s->net[k++] = s->net[i];
    s->n_net = k;
    for (size_t i = 0; i < n && !s->failed; i++) {
        struct raft_msg *m = &batch[i].m;
        int to = slot_of(s, m->to), from = slot_of(s, m->from);
        if (to < 0 || !s->nodes[to].r || (from >= 0 && s->blocked[from][to]))
            continue;
        if (s->nodes[to].busy) {
            keep[i] = true;
            continue;
        }
        if (s->o.trace) {
            char b[300];
            describe(b, sizeof(b), m);
            trace(s, "deliver %s", b);
        }
        raft_step(s->nodes[to].r, m);
    }
    for (size_t i = 0; i < n; i++) {
        if (keep[i]) {
            batch[i].at = s->now + 1;
            net_push(s, &batch[i]);
        } else {
            msg_free(&batch[i].m);
        }
    }
    free(batch);
    free(keep);
    free(due);
}

int sim_tick(struct sim *s)
{
    if (s->failed)
        return -1;
    s->now++;
    if (s->chaos_on)
        chaos(s);
    deliver(s);
    for (int i = 0; i < SIM_MAX_SLOTS; i++) {
        struct node *nd = &s->nodes[i];
        if (!nd->exists || !nd->r)
            continue;
        if (nd->busy && nd->busy_until <= s->now)
            complete_ready(s, nd);
        /* clocks drift: a node sometimes misses a tick */
        if (!nd->busy && !(s->chaos_on && chance(s, s->skew[i])))
            raft_tick(nd->r);
    }
    for (int i = 0; i < SIM_MAX_SLOTS; i++)
        if (s->nodes[i].exists)
            process_ready(s, &s->nodes[i]);
    check_roles(s);
    return s->failed ? -1 : 0;
}

/* ------------------------------------------------------------ public */

void sim_opts_init(struct sim_opts *o, uint64_t seed, unsigned nodes)
{
    memset(o, 0, sizeof(*o));
    o->seed = seed;
    o->nodes = nodes;
    o->steps = 1000;
    o->chaos = true;
    o->membership = true;
    o->liveness_ticks = 600;
}

struct sim *sim_new(const struct sim_opts *o)
{
    if (o->nodes < 1 || o->nodes > SIM_MAX_SLOTS)
        return NULL;
    struct sim *s = pb_xcalloc(1, sizeof(*s));
    s->o = *o;
    s->rng = o->seed * 0x9E3779B97F4A7C15ULL + 0x1234567ULL;
    if (s->rng == 0)
        s->rng = 1;
    for (int i = 0; i < 4; i++)
        rnd(s);
    s->chaos_on = o->chaos;
    s->drop = rndn(s, 60);
    s->dup = rndn(s, 30);
    s->long_delay = rndn(s, 30);
    s->leader_faults = rndn(s, 25);
    s->conf_rate = 2 + rndn(s, 60);
    s->disk_fail = rndn(s, 3) == 0 ? rndn(s, 40) : 0;
    for (int i = 0; i < SIM_MAX_SLOTS; i++)
        s->skew[i] = rndn(s, 4) == 0 ? rndn(s, 150) : 0;
    s->next_id = o->nodes + 1;
    for (unsigned i = 0; i < o->nodes; i++) {
        struct node *nd = &s->nodes[i];
        nd->exists = true;
        nd->founder = true;
        nd->id = i + 1;
        nd->disk.first = 1;
        node_start(s, nd);
    }
    return s;
}

void sim_free(struct sim *s)
{
    if (s == NULL)
        return;
    for (int i = 0; i < SIM_MAX_SLOTS; i++) {
        node_stop(s, &s->nodes[i]);
        disk_free(&s->nodes[i].disk);
    }
    for (size_t i = 0; i < s->n_net; i++)
        msg_free(&s->net[i].m);
    free(s->net);
    free(s->leader_of_term);
    free(s->com_term);
    free(s->com_hash);
    free(s->com_fsm);
    free(s->lm);
    free(s);
}

const char *sim_error(const struct sim *s)
{
    return s->err;
}

bool sim_failed(const struct sim *s)
{
    return s->failed;
}

struct raft *sim_raft(struct sim *s, unsigned slot)
{
    return slot < SIM_MAX_SLOTS && s->nodes[slot].exists ? s->nodes[slot].r : NULL;
}

uint64_t sim_id(const struct sim *s, unsigned slot)
{
    return s->nodes[slot].id;
}

void sim_crash(struct sim *s, unsigned slot)
{
    struct node *nd = &s->nodes[slot];
    if (!nd->exists || !nd->r)
        return;
    trace(s, "n%" PRIu64 " CRASH%s", nd->id, nd->busy ? " (persist in progress lost)" : "");
    node_stop(s, nd);
    s->st.crashes++;
    size_t k = 0;
    for (size_t i = 0; i < s->n_reads; i++)
        if (s->reads[i].id != nd->id)
            s->reads[k++] = s->reads[i];
    s->n_reads = k;
}

void sim_restart(struct sim *s, unsigned slot)
{
    struct node *nd = &s->nodes[slot];
    if (!nd->exists || nd->r)
        return;
    trace(s,
          "n%" PRIu64 " restart (disk term %" PRIu64 " vote %" PRIu64 " log [%" PRIu64 ", %" PRIu64
          "] snap %" PRIu64 ")",
          nd->id, nd->disk.hs.term, nd->disk.hs.vote, nd->disk.first, disk_last(&nd->disk),
          nd->disk.snap_index);
    node_start(s, nd);
}

void sim_block(struct sim *s, unsigned from, unsigned to, bool blocked)
{
    s->blocked[from][to] = blocked;
}

void sim_isolate(struct sim *s, unsigned slot, bool isolated)
{
    for (unsigned i = 0; i < SIM_MAX_SLOTS; i++) {
        if (i == slot)
            continue;
        s->blocked[slot][i] = isolated;
        s->blocked[i][slot] = isolated;
    }
}

void sim_heal(struct sim *s)
{
    memset(s->blocked, 0, sizeof(s->blocked));
    trace(s, "network healed");
}

void sim_set_drop(struct sim *s, unsigned per_mille)
{
    s->drop = per_mille;
}

uint64_t sim_acked(const struct sim *s, unsigned client)
{
    return s->clients[client].acked;
}

uint64_t sim_applied_ops(const struct sim *s, unsigned slot)
{
    return s->nodes[slot].fsm.ops;
}

uint64_t sim_dups_skipped(const struct sim *s)
{
    return s->st.dups;
}

uint64_t sim_now(const struct sim *s)
{
    return s->now;
}

void sim_stats(const struct sim *s, struct sim_stats *st)
{
    *st = s->st;
    st->acked = 0;
    for (unsigned c = 0; c < SIM_MAX_CLIENTS; c++)
        st->acked += s->clients[c].acked;
}

int sim_wait_leader(struct sim *s, unsigned max, unsigned *slot)
{
    for (unsigned t = 0; t < max; t++) {
        int l = find_leader(s);
        if (l >= 0) {
            struct raft_status st;
            raft_status(s->nodes[l].r, &st);
            const struct raft_entry *e = raft_entry_at(s->nodes[l].r, st.commit);
            if (e != NULL && e->term == st.term) {
                if (slot)
                    *slot = (unsigned)l;
                return 0;
            }
        }
        if (sim_tick(s) != 0)
            return -1;
    }
    return -ETIMEDOUT;
}

/* Healed and quiet: one leader, everyone in its configuration caught up,
 * every client op acknowledged and present everywhere. */
static bool settled(struct sim *s)
{
    int l = find_leader(s);
    if (l < 0)
        return false;
    struct raft *lr = s->nodes[l].r;
    struct raft_status st;
    raft_status(lr, &st);
    const struct raft_entry *e = raft_entry_at(lr, st.commit);
    if (e == NULL || e->term != st.term)
        return false;
    for (unsigned c = 0; c < SIM_MAX_CLIENTS; c++)
        if (s->clients[c].pending)
            return false;
    const struct raft_conf *c = raft_conf(lr);
    for (size_t i = 0; i < c->n; i++) {
        int k = slot_of(s, c->members[i].id);
        if (k < 0 || !s->nodes[k].r)
            return false;
        if (s->nodes[k].fsm.applied < st.commit)
            return false;
        for (unsigned cl = 0; cl < SIM_MAX_CLIENTS; cl++)
            if (s->nodes[k].fsm.sess[cl] < s->clients[cl].acked)
                return false;
    }
    return true;
}

int sim_run(struct sim *s)
{
    for (unsigned t = 0; t < s->o.steps; t++)
        if (sim_tick(s) != 0)
            return -1;
    /* Heal: restart everyone, stop faults, keep retrying pending ops. */
    s->chaos_on = false;
    sim_heal(s);
    for (unsigned i = 0; i < SIM_MAX_SLOTS; i++)
        if (s->nodes[i].exists && !s->nodes[i].r)
            sim_restart(s, i);
    uint64_t healed_at = s->now;
    for (unsigned t = 0; t < s->o.liveness_ticks; t++) {
        chaos_clients(s, false);
        if (sim_tick(s) != 0)
            return -1;
        if (settled(s)) {
            s->st.settle_ticks = s->now - healed_at;
            trace(s, "settled %" PRIu64 " ticks after healing", s->now - healed_at);
            return 0;
        }
    }
    fail(s, "liveness: no settled leader %u ticks after the network healed", s->o.liveness_ticks);
    return -1;
}
