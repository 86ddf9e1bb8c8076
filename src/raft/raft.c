/*
 * raft.c: the Raft state machine (see raft.h for the contract).
 *
 * Structure follows etcd-io/raft: one step function per role, per-peer
 * progress (probe / replicate / snapshot) on the leader, and an output queue
 * drained by raft_ready(). The whole log since the last compaction point is
 * kept in memory (like canonical/raft's log cache); entry payloads are owned
 * by the log. Outgoing AppendEntries record only an index range; the entries
 * are resolved into pointers when raft_ready() freezes the core, so nothing
 * dangles when the log grows, and a range that was compacted away in the
 * meantime is simply dropped (as if lost on the wire).
 *
 * Section references are to the Raft paper (§5.x) and Ongaro's dissertation.
 */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"
#include "raft/raft.h"

#define RAFT_INFLIGHT_MAX 128

struct inflight {
    uint64_t last; /* last index carried by the message */
    size_t bytes;
};

struct progress {
    uint64_t id;
    uint64_t match;
    uint64_t next;
    uint8_t state;
    bool probe_sent;    /* PROBE: one append outstanding, wait for an answer */
    bool recent_active; /* heard from since the last check-quorum round */
    bool vote_known;
    bool vote_granted;
    /* REPLICATE: ring of messages in flight */
    struct inflight infl[RAFT_INFLIGHT_MAX];
    unsigned infl_start;
    unsigned infl_count;
    size_t infl_bytes;
    /* SNAPSHOT: which snapshot and how far the peer acknowledged it */
    uint64_t snap_index;
    uint64_t snap_acked;
    unsigned snap_stall; /* heartbeats without progress; resend at 3 */
    uint64_t read_ack;   /* highest ReadIndex round acknowledged */
};

struct pending_read {
    uint64_t ctx;
    uint64_t index;
    uint64_t round;
    uint64_t from; /* RAFT_NONE or self: local; else a follower to answer */
};

struct msg_queue {
    struct raft_msg *v;
    size_t n, cap;
};

struct raft {
    struct raft_config cfg;
    uint64_t id;
    uint64_t rng;

    /* persistent */
    uint64_t term;
    uint64_t vote;

    /* the message raft_step_take() is stepping (its entry bytes may be taken) */
    struct raft_msg *take;

    /* log: ents[0] has index first; term of first-1 is prev_term */
    struct raft_entry *ents;
    size_t n_ents, cap_ents;
    uint64_t first;
    uint64_t prev_term;
    uint64_t persisted;
    uint64_t commit;
    uint64_t applied;

    /* latest snapshot (ours or installed) */
    struct raft_snapshot_meta snap;
    uint8_t *snap_conf;

    /* configuration in effect and where it came from */
    struct raft_conf conf;
    uint64_t conf_index;

    /* volatile */
    enum raft_role role;
    uint64_t lead;
    unsigned election_elapsed;
    unsigned heartbeat_elapsed;
    unsigned randomized_timeout;
    struct progress prs[RAFT_MAX_MEMBERS];
    size_t n_prs;
    uint64_t pending_conf_index;
    uint64_t transferee;
    size_t uncommitted_bytes;
    bool bcast_pending;
    bool heartbeat_pending;
    uint64_t read_round;
    struct pending_read *reads_pending;
    size_t n_reads_pending, cap_reads_pending;

    /* incoming snapshot staging */
    uint64_t rx_index, rx_term, rx_offset, rx_size, rx_from;

    /* output */
    struct msg_queue msgs;       /* leader replication: may go before persist */
    struct msg_queue msgs_after; /* everything else: after persist */
    struct raft_read_state *reads;
    size_t n_reads, cap_reads;
    struct raft_snapshot_chunk chunk;
    uint8_t *chunk_buf;
    size_t chunk_cap;
    bool chunk_pending;
    bool snapshot_pending;
    bool snapshot_keep_log;
    struct raft_hard_state prev_hs;
    bool frozen;
};

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_next(struct raft *r)
{
    /* xorshift64* */
    uint64_t x = r->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t last_index(const struct raft *r)
{
    return r->first + r->n_ents - 1;
}

/* Term of the entry at index, or 0 if unknown (compacted or beyond last). */
static uint64_t term_at(const struct raft *r, uint64_t index)
{
    if (index == r->first - 1)
        return r->prev_term;
    if (index < r->first || index > last_index(r))
        return 0;
    return r->ents[index - r->first].term;
}

static uint64_t last_term(const struct raft *r)
{
    return term_at(r, last_index(r));
}

static struct raft_entry *entry_at(struct raft *r, uint64_t index)
{
    if (index < r->first || index > last_index(r))
        return NULL;
    return &r->ents[index - r->first];
}

static uint8_t *dup_bytes(const void *p, size_t n)
{
    if (n == 0)
        return NULL;
    uint8_t *q = pb_xmalloc(n);
    memcpy(q, p, n);
    return q;
}

/* Appends e's fields; the caller sets data. */
static struct raft_entry *log_push(struct raft *r, const struct raft_entry *e)
{
    if (r->n_ents == r->cap_ents) {
        r->cap_ents = r->cap_ents ? r->cap_ents * 2 : 64;
        r->ents = pb_xreallocarray(r->ents, r->cap_ents, sizeof(*r->ents));
    }
    struct raft_entry *d = &r->ents[r->n_ents++];
    *d = *e;
    d->data = NULL;
    return d;
}

static void log_append_copy(struct raft *r, const struct raft_entry *e)
{
    log_push(r, e)->data = dup_bytes(e->data, e->len);
}

/* The bytes of entry i of m, taken (the message's pointer cleared) when m
 * was handed over with raft_step_take(), else a copy. */
static uint8_t *msg_entry_bytes(struct raft *r, const struct raft_msg *m, size_t i)
{
    if (r->take != m)
        return dup_bytes(m->entries[i].data, m->entries[i].len);
    uint8_t *d = r->take->entries[i].data;
    r->take->entries[i].data = NULL;
    return d;
}

static void log_append_msg_entry(struct raft *r, const struct raft_msg *m, size_t i)
{
    struct raft_entry *d = log_push(r, &m->entries[i]);
    d->data = msg_entry_bytes(r, m, i);
}

/* Drops entries >= index. */
static void log_truncate(struct raft *r, uint64_t index)
{
    assert(index >= r->first);
    for (uint64_t i = index; i <= last_index(r); i++)
        free(r->ents[i - r->first].data);
    r->n_ents = (size_t)(index - r->first);
    if (r->persisted >= index)
        r->persisted = index - 1;
}

/* Drops entries <= index (index must be in [first-1, last]). */
static void log_compact(struct raft *r, uint64_t index)
{
    if (index < r->first)
        return;
    assert(index <= last_index(r));
    size_t k = (size_t)(index - r->first + 1);
    r->prev_term = r->ents[k - 1].term;
    for (size_t i = 0; i < k; i++)
        free(r->ents[i].data);
    memmove(r->ents, r->ents + k, (r->n_ents - k) * sizeof(*r->ents));
    r->n_ents -= k;
    r->first = index + 1;
}

static void log_reset(struct raft *r, uint64_t index, uint64_t term)
{
    for (size_t i = 0; i < r->n_ents; i++)
        free(r->ents[i].data);
    r->n_ents = 0;
    r->first = index + 1;
    r->prev_term = term;
}

static const struct raft_member *self_member(const struct raft *r)
{
    return raft_conf_find(&r->conf, r->id);
}

static bool is_voter(const struct raft *r, uint64_t id)
{
    const struct raft_member *m = raft_conf_find(&r->conf, id);
    return m != NULL && m->role == RAFT_VOTER;
}

static bool promotable(const struct raft *r)
{
    return is_voter(r, r->id);
}

static size_t n_voters(const struct raft *r)
{
    size_t n = 0;
    for (size_t i = 0; i < r->conf.n; i++)
        n += r->conf.members[i].role == RAFT_VOTER;
    return n;
}

static size_t quorum(const struct raft *r)
{
    return n_voters(r) / 2 + 1;
}

static struct progress *progress_find(struct raft *r, uint64_t id)
{
    for (size_t i = 0; i < r->n_prs; i++)
        if (r->prs[i].id == id)
            return &r->prs[i];
    return NULL;
}

static void progress_reset_inflight(struct progress *pr)
{
    pr->infl_start = 0;
    pr->infl_count = 0;
    pr->infl_bytes = 0;
}

static void progress_become_probe(struct progress *pr)
{
    if (pr->state == RAFT_PROGRESS_SNAPSHOT)
        pr->next = PB_MAX(pr->match + 1, pr->snap_index + 1);
    else
        pr->next = pr->match + 1;
    pr->state = RAFT_PROGRESS_PROBE;
    pr->probe_sent = false;
    pr->snap_index = 0;
    progress_reset_inflight(pr);
}

static void progress_become_replicate(struct progress *pr)
{
    pr->state = RAFT_PROGRESS_REPLICATE;
    pr->next = pr->match + 1;
    pr->probe_sent = false;
    progress_reset_inflight(pr);
}

static bool inflight_full(const struct raft *r, const struct progress *pr)
{
    unsigned max = PB_MIN(r->cfg.max_inflight_msgs, RAFT_INFLIGHT_MAX);
    return pr->infl_count >= max || pr->infl_bytes >= r->cfg.max_inflight_bytes;
}

static void inflight_add(struct progress *pr, uint64_t last, size_t bytes)
{
    assert(pr->infl_count < RAFT_INFLIGHT_MAX);
    unsigned slot = (pr->infl_start + pr->infl_count) % RAFT_INFLIGHT_MAX;
    pr->infl[slot].last = last;
    pr->infl[slot].bytes = bytes;
    pr->infl_count++;
    pr->infl_bytes += bytes;
}

static void inflight_free_to(struct progress *pr, uint64_t index)
{
    while (pr->infl_count > 0 && pr->infl[pr->infl_start].last <= index) {
        pr->infl_bytes -= pr->infl[pr->infl_start].bytes;
        pr->infl_start = (pr->infl_start + 1) % RAFT_INFLIGHT_MAX;
        pr->infl_count--;
    }
}

static void inflight_free_first(struct progress *pr)
{
    if (pr->infl_count > 0)
        inflight_free_to(pr, pr->infl[pr->infl_start].last);
}

static bool progress_paused(const struct raft *r, const struct progress *pr)
{
    switch (pr->state) {
    case RAFT_PROGRESS_PROBE:
        return pr->probe_sent;
    case RAFT_PROGRESS_REPLICATE:
        return inflight_full(r, pr);
    default:
        return true;
    }
}

/* ---------------------------------------------------------------- output */

static struct raft_msg *queue_push(struct msg_queue *q)
{
    if (q->n == q->cap) {
        q->cap = q->cap ? q->cap * 2 : 16;
        q->v = pb_xreallocarray(q->v, q->cap, sizeof(*q->v));
    }
    struct raft_msg *m = &q->v[q->n++];
    memset(m, 0, sizeof(*m));
    return m;
}

static void msg_free_owned(struct raft_msg *m)
{
    if (m->type == RAFT_MSG_PROP) {
        for (size_t i = 0; i < m->n_entries; i++)
            free(m->entries[i].data);
        free(m->entries);
    }
}

static void queue_clear(struct msg_queue *q)
{
    for (size_t i = 0; i < q->n; i++)
        msg_free_owned(&q->v[i]);
    q->n = 0;
}

/* Leader replication traffic may leave before the local persist (§10.2.1);
 * everything else (votes, acknowledgements, forwarded proposals) depends on
 * state that must be durable first. */
static struct raft_msg *msg_new(struct raft *r, uint8_t type, uint64_t to)
{
    bool early = r->role == RAFT_LEADER && (type == RAFT_MSG_APP || type == RAFT_MSG_HEARTBEAT ||
                                            type == RAFT_MSG_SNAP || type == RAFT_MSG_TIMEOUT_NOW);
    struct raft_msg *m = queue_push(early ? &r->msgs : &r->msgs_after);
    m->type = type;
    m->from = r->id;
    m->to = to;
    m->term = r->term;
    return m;
}

static void read_state_push(struct raft *r, uint64_t ctx, uint64_t index)
{
    if (r->n_reads == r->cap_reads) {
        r->cap_reads = r->cap_reads ? r->cap_reads * 2 : 8;
        r->reads = pb_xreallocarray(r->reads, r->cap_reads, sizeof(*r->reads));
    }
    r->reads[r->n_reads].ctx = ctx;
    r->reads[r->n_reads].index = index;
    r->n_reads++;
}

/* ---------------------------------------------------------- configuration */

/* Re-derives the configuration in effect: the last CONF entry in the log,
 * else the snapshot's. Called after any change to the log that may add or
 * remove a CONF entry (append, truncation, snapshot install). */
static void conf_refresh(struct raft *r)
{
    struct raft_conf c;
    uint64_t idx = 0;
    int rc = -EINVAL;
    for (uint64_t i = last_index(r); i >= r->first && i > 0; i--) {
        const struct raft_entry *e = &r->ents[i - r->first];
        if (e->type == RAFT_ENTRY_CONF) {
            rc = raft_conf_decode(e->data, e->len, &c);
            idx = i;
            break;
        }
    }
    if (idx == 0 && r->snap_conf != NULL) {
        rc = raft_conf_decode(r->snap_conf, r->snap.conf_len, &c);
        idx = r->snap.index;
    }
    if (rc != 0)
        memset(&c, 0, sizeof(c));
    raft_conf_clear(&r->conf);
    r->conf = c;
    r->conf_index = idx;

    /* Leader: progress for exactly the members, keeping what we know. */
    struct progress old[RAFT_MAX_MEMBERS];
    size_t n_old = r->n_prs;
    memcpy(old, r->prs, n_old * sizeof(old[0]));
    r->n_prs = 0;
    for (size_t i = 0; i < r->conf.n; i++) {
        struct progress *pr = &r->prs[r->n_prs++];
        uint64_t id = r->conf.members[i].id;
        bool found = false;
        for (size_t j = 0; j < n_old; j++) {
            if (old[j].id == id) {
                memcpy(pr, &old[j], sizeof(*pr));
                found = true;
                break;
            }
        }
        if (!found) {
            memset(pr, 0, sizeof(*pr));
            pr->id = id;
            pr->next = last_index(r) + 1;
            pr->recent_active = true;
            if (id == r->id)
                pr->match = r->persisted;
        }
    }
}

/* ---------------------------------------------------------- role changes */

/* Drops queued after-persist messages that must not leave any more:
 * responses of an older term (stale once we moved on: canonical/raft 35479fc)
 * and acknowledgements of entries at or above a truncation point. */
static void drop_stale_after(struct raft *r, uint64_t below_term, uint64_t truncated_from)
{
    size_t k = 0;
    for (size_t i = 0; i < r->msgs_after.n; i++) {
        struct raft_msg *m = &r->msgs_after.v[i];
        bool stale = m->term != 0 && m->term < below_term;
        stale |= m->type == RAFT_MSG_APP_RESP && !m->reject && m->index >= truncated_from;
        if (stale)
            msg_free_owned(m);
        else
            r->msgs_after.v[k++] = *m;
    }
    r->msgs_after.n = k;
}

static void reset(struct raft *r, uint64_t term)
{
    if (r->term != term) {
        r->term = term;
        r->vote = RAFT_NONE;
        drop_stale_after(r, term, UINT64_MAX);
    }
    r->lead = RAFT_NONE;
    r->election_elapsed = 0;
    r->heartbeat_elapsed = 0;
    r->randomized_timeout = r->cfg.election_tick + (unsigned)(rng_next(r) % r->cfg.election_tick);
    r->transferee = RAFT_NONE;
    r->bcast_pending = false;
    r->heartbeat_pending = false;
    r->n_reads_pending = 0;
    r->uncommitted_bytes = 0;
    /* Leader traffic not yet handed out belongs to a term that is over. */
    queue_clear(&r->msgs);
    for (size_t i = 0; i < r->n_prs; i++) {
        struct progress *pr = &r->prs[i];
        uint64_t id = pr->id;
        memset(pr, 0, sizeof(*pr));
        pr->id = id;
        pr->next = last_index(r) + 1;
        pr->recent_active = true;
    }
}

static void become_follower(struct raft *r, uint64_t term, uint64_t lead)
{
    reset(r, term);
    r->role = RAFT_FOLLOWER;
    r->lead = lead;
}

/* Appends a new entry of this term holding data (owned from now on). */
static void append_local_owned(struct raft *r, uint8_t type, uint64_t client_id, uint64_t seq,
                               uint8_t *data, size_t len)
{
    struct raft_entry e = {
            .term = r->term,
            .index = last_index(r) + 1,
            .client_id = client_id,
            .seq = seq,
            .type = type,
            .len = len,
    };
    log_push(r, &e)->data = data;
    r->uncommitted_bytes += len;
    if (type == RAFT_ENTRY_CONF) {
        conf_refresh(r);
        r->pending_conf_index = e.index;
    }
    r->bcast_pending = true;
}

static void append_local(struct raft *r, uint8_t type, uint64_t client_id, uint64_t seq,
                         const void *data, size_t len)
{
    append_local_owned(r, type, client_id, seq, dup_bytes(data, len), len);
}

static void become_leader(struct raft *r)
{
    reset(r, r->term);
    r->role = RAFT_LEADER;
    r->lead = r->id;
    struct progress *self = progress_find(r, r->id);
    if (self != NULL)
        self->match = r->persisted;
    /* No configuration change until an entry of this term commits. */
    r->pending_conf_index = last_index(r);
    append_local(r, RAFT_ENTRY_NOOP, 0, 0, NULL, 0);
}

static void send_vote_requests(struct raft *r, bool pre, bool transfer)
{
    for (size_t i = 0; i < r->conf.n; i++) {
        const struct raft_member *mb = &r->conf.members[i];
        if (mb->role != RAFT_VOTER || mb->id == r->id)
            continue;
        struct raft_msg *m = msg_new(r, pre ? RAFT_MSG_PREVOTE : RAFT_MSG_VOTE, mb->id);
        m->term = pre ? r->term + 1 : r->term;
        m->index = last_index(r);
        m->log_term = last_term(r);
        if (transfer)
            m->flags |= RAFT_MSG_FLAG_TRANSFER;
    }
}

/* Records a vote and returns 1 (won), -1 (lost) or 0 (pending). */
static int poll(struct raft *r, uint64_t id, bool granted)
{
    struct progress *pr = progress_find(r, id);
    if (pr != NULL && !pr->vote_known) {
        pr->vote_known = true;
        pr->vote_granted = granted;
    }
    size_t yes = 0, no = 0;
    for (size_t i = 0; i < r->n_prs; i++) {
        if (!is_voter(r, r->prs[i].id) || !r->prs[i].vote_known)
            continue;
        if (r->prs[i].vote_granted)
            yes++;
        else
            no++;
    }
    size_t q = quorum(r);
    if (yes >= q)
        return 1;
    if (no >= q || n_voters(r) - no < q)
        return -1;
    return 0;
}

static void campaign(struct raft *r, bool pre, bool transfer)
{
    if (pre) {
        r->role = RAFT_PRE_CANDIDATE;
        r->lead = RAFT_NONE;
        for (size_t i = 0; i < r->n_prs; i++)
            r->prs[i].vote_known = false;
    } else {
        reset(r, r->term + 1);
        r->role = RAFT_CANDIDATE;
        r->vote = r->id;
        for (size_t i = 0; i < r->n_prs; i++)
            r->prs[i].vote_known = false;
    }
    if (poll(r, r->id, true) == 1) {
        if (pre)
            campaign(r, false, transfer);
        else
            become_leader(r);
        return;
    }
    send_vote_requests(r, pre, transfer);
}

/* ---------------------------------------------------------- replication */

static void send_snapshot_chunk(struct raft *r, struct progress *pr)
{
    uint64_t off = pr->snap_acked;
    uint64_t left = r->snap.size - off;
    size_t len = (size_t)PB_MIN(left, (uint64_t)r->cfg.snapshot_chunk_bytes);
    struct raft_msg *m = msg_new(r, RAFT_MSG_SNAP, pr->id);
    m->index = r->snap.index;
    m->log_term = r->snap.term;
    m->snap.index = r->snap.index;
    m->snap.term = r->snap.term;
    m->snap.size = r->snap.size;
    m->offset = off;
    m->len = len;
    if (off + len == r->snap.size)
        m->flags |= RAFT_MSG_FLAG_DONE;
    pr->snap_stall = 0;
}

/* Sends the peer what it lacks; returns true if a message went out. */
static bool send_append(struct raft *r, struct progress *pr, bool allow_empty)
{
    if (pr->id == r->id || progress_paused(r, pr))
        return false;
    uint64_t prev = pr->next - 1;
    uint64_t last = last_index(r);
    if (prev < r->first - 1) {
        /* The entries it needs were compacted: send the snapshot. */
        if (r->snap.index == 0)
            return false;
        pr->state = RAFT_PROGRESS_SNAPSHOT;
        pr->snap_index = r->snap.index;
        pr->snap_acked = 0;
        progress_reset_inflight(pr);
        send_snapshot_chunk(r, pr);
        return true;
    }
    if (!allow_empty && pr->next > last)
        return false;
    size_t n = 0, bytes = 0;
    for (uint64_t i = pr->next; i <= last; i++) {
        size_t len = r->ents[i - r->first].len;
        if (n > 0 && bytes + len > r->cfg.max_msg_bytes)
            break;
        n++;
        bytes += len;
    }
    struct raft_msg *m = msg_new(r, RAFT_MSG_APP, pr->id);
    m->index = prev;
    m->log_term = term_at(r, prev);
    m->commit = r->commit;
    m->n_entries = n; /* entries resolved in raft_ready() */
    if (pr->state == RAFT_PROGRESS_REPLICATE) {
        if (n > 0) {
            pr->next = prev + n + 1;
            inflight_add(pr, prev + n, bytes);
        }
    } else {
        pr->probe_sent = true;
    }
    return true;
}

static void send_heartbeat(struct raft *r, struct progress *pr)
{
    struct raft_msg *m = msg_new(r, RAFT_MSG_HEARTBEAT, pr->id);
    /* Only what the follower is known to hold may be committed there. */
    m->commit = PB_MIN(pr->match, r->commit);
    m->ctx = r->read_round;
}

static void bcast_heartbeat(struct raft *r)
{
    for (size_t i = 0; i < r->n_prs; i++)
        if (r->prs[i].id != r->id)
            send_heartbeat(r, &r->prs[i]);
}

static void release_reads(struct raft *r);

static void commit_advanced(struct raft *r, uint64_t old)
{
    for (uint64_t i = old + 1; i <= r->commit; i++) {
        const struct raft_entry *e = entry_at(r, i);
        if (e != NULL && e->term == r->term)
            r->uncommitted_bytes -= PB_MIN(r->uncommitted_bytes, e->len);
    }
}

/* §5.4.2 / Figure 8: only an entry of the current term is committed by
 * counting replicas; earlier ones commit indirectly with it. */
static bool maybe_commit(struct raft *r)
{
    uint64_t m[RAFT_MAX_MEMBERS];
    size_t n = 0;
    for (size_t i = 0; i < r->n_prs; i++) {
        if (!is_voter(r, r->prs[i].id))
            continue;
        m[n++] = r->prs[i].id == r->id ? r->persisted : r->prs[i].match;
    }
    if (n == 0)
        return false;
    for (size_t i = 1; i < n; i++) /* insertion sort, descending */
        for (size_t j = i; j > 0 && m[j] > m[j - 1]; j--) {
            uint64_t t = m[j];
            m[j] = m[j - 1];
            m[j - 1] = t;
        }
    uint64_t q = m[quorum(r) - 1];
    if (q > r->commit && term_at(r, q) == r->term) {
        uint64_t old = r->commit;
        r->commit = q;
        commit_advanced(r, old);
        return true;
    }
    return false;
}

/* A leader that removed itself steps down once the removal commits. */
static void check_self_removal(struct raft *r)
{
    if (r->role == RAFT_LEADER && self_member(r) == NULL && r->conf_index <= r->commit)
        become_follower(r, r->term, RAFT_NONE);
}

static void leader_commit_check(struct raft *r)
{
    if (maybe_commit(r)) {
        r->bcast_pending = true;
        check_self_removal(r);
    }
}

static void send_timeout_now(struct raft *r, uint64_t to)
{
    msg_new(r, RAFT_MSG_TIMEOUT_NOW, to);
}

static void leader_handle_app_resp(struct raft *r, const struct raft_msg *m)
{
    struct progress *pr = progress_find(r, m->from);
    if (pr == NULL || pr->id == r->id)
        return;
    pr->recent_active = true;
    if (m->reject) {
        /* Stale rejections (for an append we already moved past) are ignored. */
        if (pr->state == RAFT_PROGRESS_REPLICATE) {
            if (m->index <= pr->match)
                return;
            progress_become_probe(pr);
        } else if (pr->state == RAFT_PROGRESS_PROBE) {
            if (pr->next - 1 != m->index)
                return;
            /* Fast backtracking: skip whole terms the follower cannot match. */
            uint64_t probe = m->hint;
            if (m->log_term > 0 && probe >= r->first - 1 && probe <= last_index(r)) {
                while (probe >= r->first && term_at(r, probe) > m->log_term)
                    probe--;
            }
            uint64_t next = PB_MIN(m->index, probe + 1);
            pr->next = PB_MAX(next, pr->match + 1);
            pr->probe_sent = false;
        } else {
            return;
        }
        send_append(r, pr, true);
        return;
    }
    if (m->index > last_index(r))
        return;
    bool updated = false;
    if (m->index > pr->match) {
        pr->match = m->index;
        updated = true;
    }
    if (pr->next < m->index + 1)
        pr->next = m->index + 1;
    pr->probe_sent = false;
    switch (pr->state) {
    case RAFT_PROGRESS_PROBE:
        progress_become_replicate(pr);
        break;
    case RAFT_PROGRESS_SNAPSHOT:
        if (pr->match + 1 >= r->first)
            progress_become_probe(pr);
        break;
    case RAFT_PROGRESS_REPLICATE:
        inflight_free_to(pr, m->index);
        break;
    }
    if (updated)
        leader_commit_check(r);
    if (r->role != RAFT_LEADER)
        return;
    while (send_append(r, pr, false))
        ;
    if (m->from == r->transferee && pr->match == last_index(r))
        send_timeout_now(r, m->from);
}

static void leader_handle_heartbeat_resp(struct raft *r, const struct raft_msg *m)
{
    struct progress *pr = progress_find(r, m->from);
    if (pr == NULL || pr->id == r->id)
        return;
    pr->recent_active = true;
    pr->probe_sent = false;
    if (pr->state == RAFT_PROGRESS_REPLICATE && inflight_full(r, pr))
        inflight_free_first(pr);
    if (pr->match < last_index(r))
        send_append(r, pr, true);
    if (m->ctx > pr->read_ack && m->ctx <= r->read_round) {
        pr->read_ack = m->ctx;
        release_reads(r);
    }
}

static void leader_handle_snap_resp(struct raft *r, const struct raft_msg *m)
{
    struct progress *pr = progress_find(r, m->from);
    if (pr == NULL || pr->id == r->id)
        return;
    pr->recent_active = true;
    if (pr->state != RAFT_PROGRESS_SNAPSHOT || pr->snap_index != r->snap.index)
        return;
    if (m->reject) {
        /* Resume from where the peer is, if it stages this very snapshot. */
        uint64_t off = m->index == pr->snap_index ? m->offset : 0;
        pr->snap_acked = PB_MIN(off, r->snap.size);
        send_snapshot_chunk(r, pr);
        return;
    }
    if (m->index != pr->snap_index || m->offset <= pr->snap_acked || m->offset > r->snap.size)
        return;
    pr->snap_acked = m->offset;
    pr->snap_stall = 0;
    if (m->offset == r->snap.size) {
        if (pr->match < pr->snap_index)
            pr->match = pr->snap_index;
        progress_become_probe(pr);
        send_append(r, pr, true);
    } else {
        send_snapshot_chunk(r, pr);
    }
}

static void add_read(struct raft *r, uint64_t ctx, uint64_t from)
{
    if (n_voters(r) == 1 && promotable(r)) {
        if (from == r->id)
            read_state_push(r, ctx, r->commit);
        else {
            struct raft_msg *m = msg_new(r, RAFT_MSG_READ_INDEX_RESP, from);
            m->ctx = ctx;
            m->index = r->commit;
        }
        return;
    }
    if (r->n_reads_pending == r->cap_reads_pending) {
        r->cap_reads_pending = r->cap_reads_pending ? r->cap_reads_pending * 2 : 8;
        r->reads_pending =
                pb_xreallocarray(r->reads_pending, r->cap_reads_pending, sizeof(*r->reads_pending));
    }
    struct pending_read *p = &r->reads_pending[r->n_reads_pending++];
    p->ctx = ctx;
    p->index = r->commit;
    p->round = ++r->read_round;
    p->from = from;
    r->heartbeat_pending = true;
}

/* §6.4: a read may be served at index once a quorum confirmed, after the read
 * arrived, that we are still the leader. */
static void release_reads(struct raft *r)
{
    if (r->n_reads_pending == 0)
        return;
    uint64_t a[RAFT_MAX_MEMBERS];
    size_t n = 0;
    for (size_t i = 0; i < r->n_prs; i++) {
        if (!is_voter(r, r->prs[i].id))
            continue;
        a[n++] = r->prs[i].id == r->id ? r->read_round : r->prs[i].read_ack;
    }
    if (n == 0)
        return;
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && a[j] > a[j - 1]; j--) {
            uint64_t t = a[j];
            a[j] = a[j - 1];
            a[j - 1] = t;
        }
    uint64_t acked = a[quorum(r) - 1];
    size_t k = 0;
    for (size_t i = 0; i < r->n_reads_pending; i++) {
        struct pending_read *p = &r->reads_pending[i];
        if (p->round > acked) {
            r->reads_pending[k++] = *p;
            continue;
        }
        if (p->from == r->id) {
            read_state_push(r, p->ctx, p->index);
        } else {
            struct raft_msg *m = msg_new(r, RAFT_MSG_READ_INDEX_RESP, p->from);
            m->ctx = p->ctx;
            m->index = p->index;
        }
    }
    r->n_reads_pending = k;
}

static bool leader_committed_in_term(const struct raft *r)
{
    return term_at(r, r->commit) == r->term;
}

static int leader_append_props(struct raft *r, const struct raft_msg *m)
{
    if (r->transferee != RAFT_NONE)
        return -EBUSY;
    for (size_t i = 0; i < m->n_entries; i++) {
        const struct raft_entry *e = &m->entries[i];
        if (e->len > 0 && e->data == NULL)
            return -EINVAL;
        if (r->uncommitted_bytes + e->len > r->cfg.max_uncommitted_bytes)
            return -ENOBUFS;
        append_local_owned(r, RAFT_ENTRY_NORMAL, e->client_id, e->seq, msg_entry_bytes(r, m, i),
                           e->len);
    }
    return 0;
}

static void step_leader(struct raft *r, const struct raft_msg *m)
{
    switch (m->type) {
    case RAFT_MSG_PROP:
        leader_append_props(r, m);
        break;
    case RAFT_MSG_APP_RESP:
        leader_handle_app_resp(r, m);
        break;
    case RAFT_MSG_HEARTBEAT_RESP:
        leader_handle_heartbeat_resp(r, m);
        break;
    case RAFT_MSG_SNAP_RESP:
        leader_handle_snap_resp(r, m);
        break;
    case RAFT_MSG_READ_INDEX:
        if (leader_committed_in_term(r) && progress_find(r, m->from) != NULL)
            add_read(r, m->ctx, m->from);
        break;
    default:
        break;
    }
}

/* ---------------------------------------------------------- follower side */

static void commit_to(struct raft *r, uint64_t index)
{
    index = PB_MIN(index, last_index(r));
    if (index > r->commit)
        r->commit = index;
}

static void respond_append(struct raft *r, uint64_t to, uint64_t index)
{
    struct raft_msg *resp = msg_new(r, RAFT_MSG_APP_RESP, to);
    resp->index = index;
}

static bool entries_well_formed(const struct raft_msg *m)
{
    for (size_t i = 0; i < m->n_entries; i++) {
        const struct raft_entry *e = &m->entries[i];
        if (e->index != m->index + 1 + i || e->term > m->term || e->term == 0 ||
            (i == 0 ? e->term < m->log_term : e->term < m->entries[i - 1].term) ||
            e->type > RAFT_ENTRY_CONF || (e->len > 0 && e->data == NULL))
            return false;
        if (e->type == RAFT_ENTRY_CONF) {
            struct raft_conf c;
            if (raft_conf_decode(e->data, e->len, &c) != 0)
                return false;
            raft_conf_clear(&c);
        }
    }
    return true;
}

static void handle_append(struct raft *r, const struct raft_msg *m)
{
    if (m->index < r->commit) {
        respond_append(r, m->from, r->commit);
        return;
    }
    if (!entries_well_formed(m))
        return;
    if (term_at(r, m->index) == m->log_term && m->index <= last_index(r)) {
        uint64_t last_new = m->index + m->n_entries;
        bool conf_changed = false;
        size_t i = 0;
        /* Skip entries we already hold: a duplicated or reordered append
         * must never truncate a matching log. */
        for (; i < m->n_entries; i++) {
            const struct raft_entry *e = &m->entries[i];
            if (e->index > last_index(r) || term_at(r, e->index) != e->term)
                break;
        }
        if (i < m->n_entries) {
            uint64_t from = m->entries[i].index;
            if (from <= r->commit)
                return; /* committed entries never conflict: a bogus leader */
            if (from <= last_index(r)) {
                drop_stale_after(r, 0, from);
                for (uint64_t k = from; k <= last_index(r); k++)
                    conf_changed |= r->ents[k - r->first].type == RAFT_ENTRY_CONF;
                log_truncate(r, from);
            }
            for (; i < m->n_entries; i++) {
                conf_changed |= m->entries[i].type == RAFT_ENTRY_CONF;
                log_append_msg_entry(r, m, i);
            }
        }
        if (conf_changed)
            conf_refresh(r);
        commit_to(r, PB_MIN(m->commit, last_new));
        respond_append(r, m->from, last_new);
        return;
    }
    /* Reject with a hint: the largest index <= min(prev, last) whose term is
     * not above the leader's prev term; the leader skips past the rest. */
    uint64_t hint = PB_MIN(m->index, last_index(r));
    while (hint >= r->first && term_at(r, hint) > m->log_term)
        hint--;
    struct raft_msg *resp = msg_new(r, RAFT_MSG_APP_RESP, m->from);
    resp->reject = true;
    resp->index = m->index;
    resp->hint = hint;
    resp->log_term = term_at(r, hint);
}

static void handle_heartbeat(struct raft *r, const struct raft_msg *m)
{
    commit_to(r, m->commit);
    struct raft_msg *resp = msg_new(r, RAFT_MSG_HEARTBEAT_RESP, m->from);
    resp->ctx = m->ctx;
}

static void chunk_stage(struct raft *r, const struct raft_msg *m)
{
    if (!r->chunk_pending) {
        r->chunk.index = m->snap.index;
        r->chunk.term = m->snap.term;
        r->chunk.offset = m->offset;
        r->chunk.len = 0;
        r->chunk_pending = true;
    }
    size_t need = r->chunk.len + m->len;
    if (need > r->chunk_cap) {
        r->chunk_cap = PB_MAX(need, 2 * r->chunk_cap);
        r->chunk_buf = pb_xrealloc(r->chunk_buf, r->chunk_cap);
    }
    if (m->len > 0)
        memcpy(r->chunk_buf + r->chunk.len, m->data, m->len);
    r->chunk.len = need;
}

/* Figure 13 rules 6-7: keep the suffix after a snapshot that matches our log,
 * otherwise discard the whole log. */
static void install_snapshot(struct raft *r, const struct raft_msg *m)
{
    uint64_t index = m->snap.index, term = m->snap.term;
    bool keep = index <= last_index(r) && index >= r->first - 1 && term_at(r, index) == term;
    if (keep) {
        log_compact(r, index);
        if (r->persisted < index)
            r->persisted = index;
    } else {
        log_reset(r, index, term);
        r->persisted = index;
    }
    free(r->snap_conf);
    r->snap_conf = dup_bytes(m->snap.conf, m->snap.conf_len);
    r->snap.index = index;
    r->snap.term = term;
    r->snap.size = m->snap.size;
    r->snap.conf_len = m->snap.conf_len;
    r->snap.conf = r->snap_conf;
    if (r->commit < index)
        r->commit = index;
    if (r->applied < index)
        r->applied = index;
    conf_refresh(r);
    r->snapshot_pending = true;
    r->snapshot_keep_log = keep;
    r->rx_index = 0;
    r->rx_offset = 0;
}

static void handle_snapshot(struct raft *r, const struct raft_msg *m)
{
    if (m->snap.index == 0 || m->snap.term == 0 || m->snap.term > m->term ||
        m->offset > m->snap.size || m->len > m->snap.size - m->offset ||
        (m->len > 0 && m->data == NULL))
        return;
    bool done = (m->flags & RAFT_MSG_FLAG_DONE) != 0;
    if (done) {
        struct raft_conf c;
        if (m->offset + m->len != m->snap.size ||
            raft_conf_decode(m->snap.conf, m->snap.conf_len, &c) != 0)
            return;
        raft_conf_clear(&c);
    }
    if (m->snap.index <= r->commit) {
        /* Already have all of it: tell the leader where we are. */
        respond_append(r, m->from, r->commit);
        return;
    }
    if (r->snapshot_pending)
        return; /* one install per ready; the leader will resend */
    bool same = r->rx_index == m->snap.index && r->rx_term == m->snap.term &&
                r->rx_size == m->snap.size && r->rx_from == m->from;
    if (m->offset == 0 && !same && r->chunk_pending)
        return; /* this ready already acknowledges another transfer's chunk */
    if (m->offset == 0 && !same) {
        /* A new transfer; a duplicate first chunk of the current one falls
         * through to the offset check and is answered with our offset. */
        r->rx_from = m->from;
        r->rx_index = m->snap.index;
        r->rx_term = m->snap.term;
        r->rx_size = m->snap.size;
        r->rx_offset = 0;
    }
    struct raft_msg *resp;
    /* Resume only the very transfer we staged: two leaders' snapshots of
     * one index need not be byte-identical. */
    if (r->rx_index != m->snap.index || r->rx_term != m->snap.term || r->rx_size != m->snap.size ||
        r->rx_from != m->from || m->offset != r->rx_offset) {
        resp = msg_new(r, RAFT_MSG_SNAP_RESP, m->from);
        resp->reject = true;
        resp->index = r->rx_index;
        resp->offset = r->rx_index == m->snap.index && r->rx_from == m->from ? r->rx_offset : 0;
        return;
    }
    chunk_stage(r, m);
    r->rx_offset += m->len;
    resp = msg_new(r, RAFT_MSG_SNAP_RESP, m->from);
    resp->index = m->snap.index;
    resp->offset = r->rx_offset;
    if (done) {
        resp->flags |= RAFT_MSG_FLAG_DONE;
        install_snapshot(r, m);
    }
}

#define RAFT_PROP_MAX_HOPS 2

/* Forwards proposals to the leader; their bytes are copied, or taken when
 * take (n must then be 1). */
static void forward_props_take(struct raft *r, const struct raft_entry *ents, size_t n,
                               uint64_t hops, bool take)
{
    if (n == 0)
        return;
    struct raft_msg *m = msg_new(r, RAFT_MSG_PROP, r->lead);
    m->term = 0;
    m->ctx = hops;
    m->entries = pb_xcalloc(n, sizeof(*m->entries));
    m->n_entries = n;
    for (size_t i = 0; i < n; i++) {
        m->entries[i].client_id = ents[i].client_id;
        m->entries[i].seq = ents[i].seq;
        m->entries[i].type = RAFT_ENTRY_NORMAL;
        m->entries[i].data = take ? ents[i].data : dup_bytes(ents[i].data, ents[i].len);
        m->entries[i].len = ents[i].data != NULL ? ents[i].len : 0;
    }
}

static void forward_props(struct raft *r, const struct raft_entry *ents, size_t n, uint64_t hops)
{
    forward_props_take(r, ents, n, hops, false);
}

static void step_follower(struct raft *r, const struct raft_msg *m)
{
    switch (m->type) {
    case RAFT_MSG_APP:
        r->election_elapsed = 0;
        r->lead = m->from;
        handle_append(r, m);
        break;
    case RAFT_MSG_HEARTBEAT:
        r->election_elapsed = 0;
        r->lead = m->from;
        handle_heartbeat(r, m);
        break;
    case RAFT_MSG_SNAP:
        r->election_elapsed = 0;
        r->lead = m->from;
        handle_snapshot(r, m);
        break;
    case RAFT_MSG_TIMEOUT_NOW:
        /* §3.10: the leader chose us; skip pre-vote and stickiness. */
        if (promotable(r))
            campaign(r, false, true);
        break;
    case RAFT_MSG_READ_INDEX_RESP:
        if (m->from == r->lead)
            read_state_push(r, m->ctx, m->index);
        break;
    case RAFT_MSG_PROP:
        /* Sent to us as if we led (a stale view): pass it on, a bounded
         * number of hops (ctx counts them) so that stale views cannot loop. */
        if (r->lead != RAFT_NONE && r->lead != m->from && m->ctx < RAFT_PROP_MAX_HOPS)
            forward_props(r, m->entries, m->n_entries, m->ctx + 1);
        break;
    default:
        break;
    }
}

static void step_candidate(struct raft *r, const struct raft_msg *m)
{
    uint8_t resp_type = r->role == RAFT_PRE_CANDIDATE ? RAFT_MSG_PREVOTE_RESP : RAFT_MSG_VOTE_RESP;
    switch (m->type) {
    case RAFT_MSG_APP:
    case RAFT_MSG_HEARTBEAT:
    case RAFT_MSG_SNAP:
        /* A leader exists in our term. */
        become_follower(r, m->term, m->from);
        step_follower(r, m);
        break;
    case RAFT_MSG_VOTE_RESP:
    case RAFT_MSG_PREVOTE_RESP:
        if (m->type != resp_type)
            break;
        switch (poll(r, m->from, !m->reject)) {
        case 1:
            if (r->role == RAFT_PRE_CANDIDATE)
                campaign(r, false, false);
            else
                become_leader(r);
            break;
        case -1:
            become_follower(r, r->term, RAFT_NONE);
            break;
        default:
            break;
        }
        break;
    default:
        break;
    }
}

static bool log_up_to_date(const struct raft *r, uint64_t index, uint64_t term)
{
    uint64_t lt = last_term(r);
    return term > lt || (term == lt && index >= last_index(r));
}

static void handle_vote_request(struct raft *r, const struct raft_msg *m)
{
    bool pre = m->type == RAFT_MSG_PREVOTE;
    uint8_t resp_type = pre ? RAFT_MSG_PREVOTE_RESP : RAFT_MSG_VOTE_RESP;
    bool can_vote = r->vote == m->from || (r->vote == RAFT_NONE && r->lead == RAFT_NONE) ||
                    (pre && m->term > r->term);
    struct raft_msg *resp;
    if (can_vote && log_up_to_date(r, m->index, m->log_term)) {
        resp = msg_new(r, resp_type, m->from);
        /* Mirror the request term: a pre-vote is for a term we are not in. */
        resp->term = m->term;
        if (!pre) {
            r->election_elapsed = 0;
            r->vote = m->from;
        }
    } else {
        resp = msg_new(r, resp_type, m->from);
        resp->reject = true;
    }
}

/* ---------------------------------------------------------- public entry */

void raft_config_init(struct raft_config *cfg, uint64_t id)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->id = id;
    cfg->seed = id;
    cfg->election_tick = 10;
    cfg->heartbeat_tick = 1;
    cfg->max_msg_bytes = 1 << 20;
    cfg->max_inflight_msgs = 64;
    cfg->max_inflight_bytes = 8u << 20;
    cfg->max_uncommitted_bytes = 64u << 20;
    cfg->snapshot_chunk_bytes = 1 << 20;
    cfg->snapshot_trailing = 128;
    cfg->catchup_max_lag = 64;
}

struct raft *raft_new(const struct raft_config *cfg)
{
    if (cfg->id == RAFT_NONE || cfg->election_tick < 2 || cfg->heartbeat_tick == 0 ||
        cfg->heartbeat_tick >= cfg->election_tick || cfg->max_inflight_msgs == 0 ||
        cfg->max_inflight_bytes == 0 || cfg->snapshot_chunk_bytes == 0 || cfg->max_msg_bytes == 0)
        return NULL;
    struct raft *r = pb_xcalloc(1, sizeof(*r));
    r->cfg = *cfg;
    if (r->cfg.max_inflight_msgs > RAFT_INFLIGHT_MAX)
        r->cfg.max_inflight_msgs = RAFT_INFLIGHT_MAX;
    r->id = cfg->id;
    r->rng = cfg->seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;
    if (r->rng == 0)
        r->rng = 1;
    r->first = 1;
    r->role = RAFT_FOLLOWER;
    become_follower(r, 0, RAFT_NONE);
    return r;
}

void raft_free(struct raft *r)
{
    if (r == NULL)
        return;
    log_reset(r, 0, 0);
    free(r->ents);
    queue_clear(&r->msgs);
    queue_clear(&r->msgs_after);
    free(r->msgs.v);
    free(r->msgs_after.v);
    free(r->reads);
    free(r->reads_pending);
    free(r->chunk_buf);
    free(r->snap_conf);
    raft_conf_clear(&r->conf);
    free(r);
}

static bool pristine(const struct raft *r)
{
    return r->term == 0 && r->n_ents == 0 && r->snap.index == 0 && r->first == 1;
}

int raft_bootstrap(struct raft *r, const struct raft_conf *conf)
{
    uint8_t *enc;
    size_t len;
    if (r->frozen)
        return -EBUSY;
    if (!pristine(r) || conf->n == 0)
        return -EINVAL;
    bool voter = false;
    for (size_t i = 0; i < conf->n; i++)
        voter |= conf->members[i].role == RAFT_VOTER;
    if (!voter || raft_conf_encode(conf, &enc, &len) != 0)
        return -EINVAL;
    struct raft_entry e = {.term = 1, .index = 1, .type = RAFT_ENTRY_CONF, .data = enc, .len = len};
    become_follower(r, 1, RAFT_NONE);
    log_append_copy(r, &e);
    free(enc);
    /* Every founding member holds this identical entry: it is committed. */
    r->commit = 1;
    conf_refresh(r);
    return 0;
}

int raft_restore(struct raft *r, const struct raft_restore_state *st)
{
    if (r->frozen)
        return -EBUSY;
    if (!pristine(r))
        return -EINVAL;
    const struct raft_snapshot_meta *s = st->snapshot;
    uint64_t snap_index = s ? s->index : 0, snap_term = s ? s->term : 0;
    struct raft_conf c;
    if (s != NULL) {
        if (s->index == 0 || s->term == 0 || raft_conf_decode(s->conf, s->conf_len, &c) != 0)
            return -EINVAL;
        raft_conf_clear(&c);
    }
    for (size_t i = 0; i < st->n_entries; i++) {
        const struct raft_entry *e = &st->entries[i];
        if (e->term == 0 || e->index != st->entries[0].index + i ||
            (i > 0 && e->term < st->entries[i - 1].term) || e->term > st->hs.term)
            return -EINVAL;
        if (e->index == snap_index && e->term != snap_term)
            return -EINVAL;
    }
    size_t skip = 0;
    uint64_t first = snap_index + 1, prev_term = snap_term;
    if (st->n_entries > 0) {
        uint64_t e0 = st->entries[0].index;
        uint64_t elast = e0 + st->n_entries - 1;
        if (e0 > snap_index + 1)
            return -EINVAL;
        if (elast < snap_index) {
            skip = st->n_entries;
        } else if (e0 == 1 && snap_index == 0) {
            first = 1;
            prev_term = 0;
        } else if (e0 == snap_index + 1) {
            first = e0;
        } else {
            /* Trailing entries before the snapshot: the first one only
             * provides the term of its index. */
            skip = 1;
            first = e0 + 1;
            prev_term = st->entries[0].term;
        }
    }
    r->first = first;
    r->prev_term = prev_term;
    for (size_t i = skip; i < st->n_entries; i++)
        log_append_copy(r, &st->entries[i]);
    if (s != NULL) {
        r->snap_conf = dup_bytes(s->conf, s->conf_len);
        r->snap = *s;
        r->snap.conf = r->snap_conf;
    }
    r->persisted = last_index(r);
    uint64_t commit = PB_MAX(st->hs.commit, PB_MAX(st->applied, snap_index));
    if (commit > last_index(r)) {
        log_reset(r, 0, 0);
        r->first = 1;
        free(r->snap_conf);
        r->snap_conf = NULL;
        memset(&r->snap, 0, sizeof(r->snap));
        r->persisted = 0;
        return -EINVAL;
    }
    r->term = st->hs.term;
    r->vote = st->hs.vote;
    r->commit = commit;
    r->applied = PB_MAX(st->applied, snap_index);
    r->prev_hs = st->hs;
    conf_refresh(r);
    return 0;
}

int raft_tick(struct raft *r)
{
    if (r->frozen)
        return -EBUSY;
    if (r->role != RAFT_LEADER) {
        r->election_elapsed++;
        if (promotable(r) && r->election_elapsed >= r->randomized_timeout) {
            r->election_elapsed = 0;
            campaign(r, !r->cfg.disable_pre_vote, false);
        }
        return 0;
    }
    r->heartbeat_elapsed++;
    r->election_elapsed++;
    if (r->election_elapsed >= r->cfg.election_tick) {
        r->election_elapsed = 0;
        if (!r->cfg.disable_check_quorum) {
            /* §6.2: step down unless a quorum was heard from this round. */
            size_t active = 0;
            for (size_t i = 0; i < r->n_prs; i++) {
                struct progress *pr = &r->prs[i];
                if (is_voter(r, pr->id) && (pr->id == r->id || pr->recent_active))
                    active++;
                if (pr->id != r->id)
                    pr->recent_active = false;
            }
            if (active < quorum(r)) {
                become_follower(r, r->term, RAFT_NONE);
                return 0;
            }
        }
        r->transferee = RAFT_NONE; /* a transfer that did not finish in time */
    }
    if (r->heartbeat_elapsed >= r->cfg.heartbeat_tick) {
        r->heartbeat_elapsed = 0;
        bcast_heartbeat(r);
        for (size_t i = 0; i < r->n_prs; i++) {
            struct progress *pr = &r->prs[i];
            if (pr->state == RAFT_PROGRESS_SNAPSHOT && ++pr->snap_stall >= 3) {
                if (pr->snap_index == r->snap.index)
                    send_snapshot_chunk(r, pr);
                else
                    progress_become_probe(pr);
            }
        }
    }
    return 0;
}

static bool msg_type_valid(uint8_t t)
{
    return t >= RAFT_MSG_PROP && t <= RAFT_MSG_TYPE_MAX;
}

int raft_step(struct raft *r, const struct raft_msg *m)
{
    if (r->frozen)
        return -EBUSY;
    if (!msg_type_valid(m->type) || m->to != r->id || m->from == RAFT_NONE || m->from == r->id ||
        (m->n_entries > 0 && m->entries == NULL))
        return 0;
    bool local_kind = m->type == RAFT_MSG_PROP || m->type == RAFT_MSG_READ_INDEX;
    if (m->term == 0 && !local_kind)
        return 0;
    if (m->term > r->term) {
        if (m->type == RAFT_MSG_VOTE || m->type == RAFT_MSG_PREVOTE) {
            /* §4.2.3 leader stickiness: a live leader makes us deaf to
             * campaigns, unless the leader itself asked for one. */
            bool force = (m->flags & RAFT_MSG_FLAG_TRANSFER) != 0;
            bool in_lease = !r->cfg.disable_check_quorum && r->lead != RAFT_NONE &&
                            r->election_elapsed < r->cfg.election_tick;
            if (!force && in_lease)
                return 0;
        }
        if (m->type == RAFT_MSG_PREVOTE) {
            /* never change term for a pre-vote */
        } else if (m->type == RAFT_MSG_PREVOTE_RESP && !m->reject) {
            /* granted pre-votes carry the term we would campaign in */
        } else if (m->type == RAFT_MSG_APP || m->type == RAFT_MSG_HEARTBEAT ||
                   m->type == RAFT_MSG_SNAP) {
            become_follower(r, m->term, m->from);
        } else {
            become_follower(r, m->term, RAFT_NONE);
        }
    } else if (m->term < r->term && !local_kind) {
        if (m->type == RAFT_MSG_APP || m->type == RAFT_MSG_HEARTBEAT) {
            /* A stale leader (e.g. back from a partition): tell it our term
             * so it steps down; otherwise with pre-vote + check-quorum it
             * could keep a minority stuck (etcd #8501). */
            msg_new(r, RAFT_MSG_APP_RESP, m->from);
        } else if (m->type == RAFT_MSG_PREVOTE) {
            struct raft_msg *resp = msg_new(r, RAFT_MSG_PREVOTE_RESP, m->from);
            resp->reject = true;
        }
        return 0;
    }
    if (m->type == RAFT_MSG_VOTE || m->type == RAFT_MSG_PREVOTE) {
        handle_vote_request(r, m);
        return 0;
    }
    switch (r->role) {
    case RAFT_LEADER:
        step_leader(r, m);
        break;
    case RAFT_FOLLOWER:
        step_follower(r, m);
        break;
    default:
        step_candidate(r, m);
        break;
    }
    return 0;
}

int raft_step_take(struct raft *r, struct raft_msg *m)
{
    r->take = m;
    int rc = raft_step(r, m);
    r->take = NULL;
    return rc;
}

/* raft_propose() and raft_propose_take(): data is taken (on success only)
 * when take, else copied. */
static int propose(struct raft *r, uint64_t client_id, uint64_t seq, const void *data, size_t len,
                   uint64_t *index, bool take)
{
    if (index != NULL)
        *index = 0;
    if (r->frozen)
        return -EBUSY;
    if (len > 0 && data == NULL)
        return -EINVAL;
    uint8_t *owned = (uint8_t *)(uintptr_t)data;
    if (r->role == RAFT_LEADER) {
        if (r->transferee != RAFT_NONE)
            return -EBUSY;
        if (r->uncommitted_bytes + len > r->cfg.max_uncommitted_bytes)
            return -ENOBUFS;
        append_local_owned(r, RAFT_ENTRY_NORMAL, client_id, seq,
                           take ? owned : dup_bytes(data, len), len);
        if (index != NULL)
            *index = last_index(r);
        return 0;
    }
    if (r->role != RAFT_FOLLOWER || r->lead == RAFT_NONE)
        return -EAGAIN;
    struct raft_entry e = {.client_id = client_id, .seq = seq, .data = owned, .len = len};
    forward_props_take(r, &e, 1, 0, take);
    return 0;
}

int raft_propose(struct raft *r, uint64_t client_id, uint64_t seq, const void *data, size_t len,
                 uint64_t *index)
{
    return propose(r, client_id, seq, data, len, index, false);
}

int raft_propose_take(struct raft *r, uint64_t client_id, uint64_t seq, void *data, size_t len,
                      uint64_t *index)
{
    return propose(r, client_id, seq, data, len, index, true);
}

int raft_change_conf(struct raft *r, enum raft_conf_change type, uint64_t id, const void *ctx,
                     size_t ctx_len)
{
    if (r->frozen)
        return -EBUSY;
    if (r->role != RAFT_LEADER)
        return -EPERM;
    if (id == RAFT_NONE || ctx_len > RAFT_MAX_CONTEXT || (ctx_len > 0 && ctx == NULL))
        return -EINVAL;
    if (r->transferee != RAFT_NONE || r->pending_conf_index > r->commit)
        return -EBUSY;
    if (!leader_committed_in_term(r))
        return -EAGAIN; /* dissertation errata: commit in our term first */
    struct raft_conf c;
    const struct raft_member *cur = raft_conf_find(&r->conf, id);
    switch (type) {
    case RAFT_CONF_ADD_LEARNER:
        if (cur != NULL)
            return -EEXIST;
        if (r->conf.n >= RAFT_MAX_MEMBERS)
            return -EINVAL;
        raft_conf_copy(&c, &r->conf);
        c.members[c.n].id = id;
        c.members[c.n].role = RAFT_LEARNER;
        c.members[c.n].ctx = dup_bytes(ctx, ctx_len);
        c.members[c.n].ctx_len = ctx_len;
        c.n++;
        break;
    case RAFT_CONF_PROMOTE: {
        if (cur == NULL)
            return -ENOENT;
        if (cur->role != RAFT_LEARNER)
            return -EEXIST;
        const struct progress *pr = progress_find(r, id);
        if (pr == NULL || !pr->recent_active || pr->match + r->cfg.catchup_max_lag < last_index(r))
            return -EAGAIN;
        raft_conf_copy(&c, &r->conf);
        for (size_t i = 0; i < c.n; i++)
            if (c.members[i].id == id)
                c.members[i].role = RAFT_VOTER;
        break;
    }
    case RAFT_CONF_REMOVE:
        if (cur == NULL)
            return -ENOENT;
        if (cur->role == RAFT_VOTER && n_voters(r) == 1)
            return -EINVAL;
        raft_conf_copy(&c, &r->conf);
        for (size_t i = 0, k = 0; i < c.n; i++) {
            if (c.members[i].id == id)
                free(c.members[i].ctx);
            else
                c.members[k++] = c.members[i];
        }
        c.n--;
        break;
    default:
        return -EINVAL;
    }
    uint8_t *enc;
    size_t len;
    int rc = raft_conf_encode(&c, &enc, &len);
    raft_conf_clear(&c);
    if (rc != 0)
        return rc;
    append_local(r, RAFT_ENTRY_CONF, 0, 0, enc, len);
    free(enc);
    /* With the leader gone from the voters, a commit may already be due. */
    leader_commit_check(r);
    return 0;
}

int raft_transfer_leader(struct raft *r, uint64_t target)
{
    if (r->frozen)
        return -EBUSY;
    if (r->role != RAFT_LEADER)
        return -EPERM;
    if (target == r->id || !is_voter(r, target))
        return -EINVAL;
    if (r->transferee != RAFT_NONE)
        return r->transferee == target ? 0 : -EBUSY;
    struct progress *pr = progress_find(r, target);
    r->transferee = target;
    r->election_elapsed = 0;
    if (pr->match == last_index(r))
        send_timeout_now(r, target);
    else
        send_append(r, pr, true);
    return 0;
}

int raft_read_index(struct raft *r, uint64_t ctx)
{
    if (r->frozen)
        return -EBUSY;
    if (r->role == RAFT_LEADER) {
        if (!leader_committed_in_term(r))
            return -EAGAIN;
        add_read(r, ctx, r->id);
        return 0;
    }
    if (r->role != RAFT_FOLLOWER || r->lead == RAFT_NONE)
        return -EAGAIN;
    struct raft_msg *m = msg_new(r, RAFT_MSG_READ_INDEX, r->lead);
    m->term = 0;
    m->ctx = ctx;
    return 0;
}

int raft_snapshot_taken(struct raft *r, uint64_t index, uint64_t size,
                        struct raft_snapshot_meta *meta, uint64_t *compact_to)
{
    if (r->frozen)
        return -EBUSY;
    if (index > r->applied || index <= r->snap.index || index < r->first)
        return -EINVAL;
    /* Configuration as of index: the last CONF entry at or before it. */
    uint8_t *conf = NULL;
    size_t conf_len = 0;
    bool found = false;
    for (uint64_t i = index; i >= r->first && i > 0; i--) {
        const struct raft_entry *e = &r->ents[i - r->first];
        if (e->type == RAFT_ENTRY_CONF) {
            conf = dup_bytes(e->data, e->len);
            conf_len = e->len;
            found = true;
            break;
        }
    }
    if (!found && r->snap_conf != NULL) {
        conf = dup_bytes(r->snap_conf, r->snap.conf_len);
        conf_len = r->snap.conf_len;
    } else if (!found) {
        struct raft_conf empty;
        memset(&empty, 0, sizeof(empty));
        raft_conf_encode(&empty, &conf, &conf_len);
    }
    free(r->snap_conf);
    r->snap_conf = conf;
    r->snap.index = index;
    r->snap.term = term_at(r, index);
    r->snap.size = size;
    r->snap.conf = conf;
    r->snap.conf_len = conf_len;
    if (index > r->cfg.snapshot_trailing)
        log_compact(r, index - r->cfg.snapshot_trailing);
    /* Transfers of an older snapshot cannot be served any more. */
    for (size_t i = 0; i < r->n_prs; i++)
        if (r->prs[i].state == RAFT_PROGRESS_SNAPSHOT)
            progress_become_probe(&r->prs[i]);
    if (r->role == RAFT_LEADER)
        r->bcast_pending = true;
    if (meta != NULL)
        *meta = r->snap;
    if (compact_to != NULL)
        *compact_to = r->first - 1;
    return 0;
}

/* Resolves outgoing messages into pointers; drops what can no longer be
 * served (compacted ranges, superseded snapshots). */
static void resolve_msgs(struct raft *r)
{
    size_t k = 0;
    for (size_t i = 0; i < r->msgs.n; i++) {
        struct raft_msg *m = &r->msgs.v[i];
        if (m->type == RAFT_MSG_APP) {
            if (m->index + 1 < r->first || m->index + m->n_entries > last_index(r) ||
                term_at(r, m->index) != m->log_term)
                continue;
            m->entries = m->n_entries ? &r->ents[m->index + 1 - r->first] : NULL;
        } else if (m->type == RAFT_MSG_SNAP) {
            if (m->snap.index != r->snap.index)
                continue;
            m->snap.conf = r->snap.conf;
            m->snap.conf_len = r->snap.conf_len;
        }
        r->msgs.v[k++] = *m;
    }
    r->msgs.n = k;
}

bool raft_ready(struct raft *r, struct raft_ready *rd)
{
    memset(rd, 0, sizeof(*rd));
    if (r->frozen)
        return false;
    if (r->role == RAFT_LEADER) {
        if (r->bcast_pending) {
            r->bcast_pending = false;
            for (size_t i = 0; i < r->n_prs; i++)
                send_append(r, &r->prs[i], true);
        }
        if (r->heartbeat_pending) {
            r->heartbeat_pending = false;
            bcast_heartbeat(r);
        }
    }
    resolve_msgs(r);
    assert(r->persisted + 1 >= r->first);
    if (last_index(r) > r->persisted) {
        rd->entries = &r->ents[r->persisted + 1 - r->first];
        rd->n_entries = (size_t)(last_index(r) - r->persisted);
    }
    rd->hs.term = r->term;
    rd->hs.vote = r->vote;
    rd->hs.commit = r->commit;
    rd->hs_changed = memcmp(&rd->hs, &r->prev_hs, sizeof(rd->hs)) != 0;
    if (r->chunk_pending) {
        r->chunk.data = r->chunk_buf;
        rd->chunk = &r->chunk;
    }
    if (r->snapshot_pending) {
        rd->snapshot = &r->snap;
        rd->snapshot_keep_log = r->snapshot_keep_log;
    }
    rd->must_sync = rd->hs.term != r->prev_hs.term || rd->hs.vote != r->prev_hs.vote ||
                    rd->n_entries > 0 || rd->chunk != NULL || rd->snapshot != NULL;
    if (r->commit > r->applied) {
        assert(r->applied + 1 >= r->first);
        rd->committed = &r->ents[r->applied + 1 - r->first];
        rd->n_committed = (size_t)(r->commit - r->applied);
    }
    rd->msgs = r->msgs.v;
    rd->n_msgs = r->msgs.n;
    rd->msgs_after_persist = r->msgs_after.v;
    rd->n_msgs_after_persist = r->msgs_after.n;
    rd->reads = r->reads;
    rd->n_reads = r->n_reads;
    bool any = rd->hs_changed || rd->n_entries || rd->chunk || rd->snapshot || rd->n_committed ||
               rd->n_msgs || rd->n_msgs_after_persist || rd->n_reads;
    r->frozen = any;
    return any;
}

void raft_advance(struct raft *r, const struct raft_ready *rd)
{
    if (!r->frozen)
        return;
    r->frozen = false;
    if (rd->n_entries > 0)
        r->persisted = rd->entries[rd->n_entries - 1].index;
    if (rd->hs_changed)
        r->prev_hs = rd->hs;
    if (rd->n_committed > 0)
        r->applied = rd->committed[rd->n_committed - 1].index;
    queue_clear(&r->msgs);
    queue_clear(&r->msgs_after);
    r->n_reads = 0;
    r->chunk_pending = false;
    r->snapshot_pending = false;
    if (r->role == RAFT_LEADER) {
        struct progress *self = progress_find(r, r->id);
        if (self != NULL)
            self->match = r->persisted;
        leader_commit_check(r);
    }
}

void raft_persist_failed(struct raft *r, const struct raft_ready *rd)
{
    (void)rd;
    if (!r->frozen)
        return;
    r->frozen = false;
    /* Nothing that depended on the persist may leave; what was to be
     * persisted (entries above persisted, hard state, snapshot chunk and
     * install) stays pending, so the next ready retries it. */
    queue_clear(&r->msgs);
    queue_clear(&r->msgs_after);
    r->n_reads = 0;
    /* Durable state unknown: a leader steps down (DESIGN.md section 5). */
    if (r->role == RAFT_LEADER)
        become_follower(r, r->term, RAFT_NONE);
}

/* ---------------------------------------------------------- introspection */

void raft_status(const struct raft *r, struct raft_status *st)
{
    memset(st, 0, sizeof(*st));
    st->id = r->id;
    st->role = r->role;
    st->term = r->term;
    st->vote = r->vote;
    st->leader = r->lead;
    st->commit = r->commit;
    st->applied = r->applied;
    st->persisted = r->persisted;
    st->first_index = r->first;
    st->last_index = last_index(r);
    st->snapshot_index = r->snap.index;
    st->transferee = r->transferee;
    for (size_t i = 0; i < r->conf.n; i++) {
        struct raft_peer_status *p = &st->peers[st->n_peers++];
        p->id = r->conf.members[i].id;
        p->ctx = r->conf.members[i].ctx;
        p->ctx_len = r->conf.members[i].ctx_len;
        p->role = r->conf.members[i].role;
        if (r->role == RAFT_LEADER) {
            for (size_t j = 0; j < r->n_prs; j++) {
                const struct progress *pr = &r->prs[j];
                if (pr->id != p->id)
                    continue;
                p->state = pr->state;
                p->match = pr->id == r->id ? r->persisted : pr->match;
                p->next = pr->next;
                p->recent_active = pr->id == r->id || pr->recent_active;
            }
        }
    }
}

const struct raft_conf *raft_conf(const struct raft *r)
{
    return &r->conf;
}

const struct raft_entry *raft_entry_at(const struct raft *r, uint64_t index)
{
    if (index < r->first || index > last_index(r))
        return NULL;
    return &r->ents[index - r->first];
}

uint64_t raft_term(const struct raft *r)
{
    return r->term;
}

uint64_t raft_commit(const struct raft *r)
{
    return r->commit;
}

enum raft_role raft_role(const struct raft *r)
{
    return r->role;
}

uint64_t raft_leader(const struct raft *r)
{
    return r->lead;
}

const char *raft_role_name(enum raft_role role)
{
    switch (role) {
    case RAFT_FOLLOWER:
        return "follower";
    case RAFT_PRE_CANDIDATE:
        return "pre-candidate";
    case RAFT_CANDIDATE:
        return "candidate";
    case RAFT_LEADER:
        return "leader";
    }
    return "unknown";
}

const char *raft_msg_type_name(uint8_t type)
{
    static const char *const names[] = {
            "?",         "PROP",      "APP",          "APP_RESP",   "VOTE",
            "VOTE_RESP", "PREVOTE",   "PREVOTE_RESP", "HEARTBEAT",  "HEARTBEAT_RESP",
            "SNAP",      "SNAP_RESP", "TIMEOUT_NOW",  "READ_INDEX", "READ_INDEX_RESP",
    };
    return type < PB_ARRAY_SIZE(names) ? names[type] : "?";
}
