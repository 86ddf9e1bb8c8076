/*
 * replica.c: watcher candidates -> fsm ops -> proposals, and the node's own
 * entries as they apply (see replica.h and doc/fsm.md "Pending local
 * edits").
 */
#include <config.h>

#include "daemon/replica.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "ctl/ctl.h"
#include "daemon/cluster.h"
#include "daemon/nodeconf.h"
#include "daemon/push.h"
#include "daemon/sm.h"
#include "fsm/op.h"
#include "fsm/propose.h"
#include "fsm/tree.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "store/statedb.h"
#include "watch/watch.h"

#define REPLICA_TICK_MS           20
#define REPLICA_RETRY_LEADER_MS   3000
#define REPLICA_RETRY_FOLLOWER_MS 1000
#define REPLICA_RETRY_DOUBLINGS   4 /* the 5th and later retries wait 16 x as long */
#define REPLICA_MAX_INFLIGHT      256
/* Bytes of our entries in flight (at least one entry): a follower forwards
 * its proposals through a bounded peer queue (16 MiB), and a CHUNKS entry
 * dropped there while its PUT gets through fails the PUT: under it, with a
 * margin for the entries' framing (was 10 MiB, paced by the 20 ms tick). */
#define REPLICA_INFLIGHT_BYTES (12u * 1024u * 1024u)
/* An entry this large travels in the peer transport's bulk class, which a
 * later small (control class) message overtakes: a big entry of ours is
 * always alone in flight, or a later seq could commit first and the
 * session table would then skip the big one. */
#define REPLICA_BIG_ENTRY (200u * 1024u)
/* An entry must travel in one peer message (NET_MSG_MAX, 16 MiB, with the
 * Raft message around it): a larger one would stall replication. */
#define REPLICA_ENTRY_MAX (12u * 1024u * 1024u)
/* An entry at least this large surely travels in the bulk class (frames
 * carry up to 256 KiB), where order is kept: several such entries may be in
 * flight together, which pipelines the CHUNKS entries of a big file. */
#define REPLICA_BULK_ENTRY (512u * 1024u)
/* A file larger than this is read, chunked and hashed a slice per loop turn
 * (struct rjob), and only while our entries not yet applied stay under
 * REPLICA_INFLIGHT_BYTES; smaller ones are read at once. A slice of 4 MiB is
 * ~5 ms of chunking + SHA-256 (doc/fsm.md). */
#define REPLICA_SLICE_BYTES     (4u * 1024u * 1024u)
#define REPLICA_SLICES_PER_TURN 4
/* A big file's chunks pushed beside the log (D13, push.h): bytes of chunks
 * per batch (one PUSH frame with the chunk that crosses it), the room a
 * slice needs in every peer's window before it is read, how long the other
 * reachable peers' acknowledgements are waited for once a majority holds
 * the bytes. */
#define REPLICA_PUSH_CARRY    (PUSH_FRAME_BYTES - FSM_CHUNK_MAX_LEN)
#define REPLICA_PUSH_ROOM     (2u * PUSH_FRAME_BYTES)
#define REPLICA_PUSH_GRACE_MS 1000u

/* One proposal of ours, until its entry applies. */
struct rprop {
    struct rprop *next;
    uint64_t seq;
    enum fsm_op_type type;
    char *path;              /* NULL for CHUNKS */
    char *from;              /* RENAME: the source */
    struct fsm_tree_stat st; /* what the tree held at path when proposed */
    bool has_st;
    bool record_after;        /* MKDIR over a path we never recorded: see obs_before */
    struct statedb_disk prev; /* PUT: the record obs_before replaced */
    bool has_prev;
    uint8_t *data;
    size_t len;
    bool proposed;
    uint64_t retry_at_ms;
    uint64_t proposed_us; /* first proposed (pb_now_us), for the latency */
    uint64_t proposed_ms; /* when last proposed */
    unsigned retries;     /* timer retries since the last leader change */
};

/* A path to look at again (its own proposal was busy, lost or unreadable). */
struct rdirty {
    struct rdirty *next;
    char *path;
    bool carry_all;
};

struct rjob;

/* Building the ops of a chunk list (the ctx of lacks_chunk and emit_op). */
struct emit_ctx {
    struct replica *r;
    struct fsm_tree_stat st;
    bool carry_all;    /* every chunk travels */
    struct rjob *push; /* the job, when its chunks are pushed (D13) */
};

/* The big file being proposed, a slice at a time (one at a time). */
struct rjob {
    struct fsm_propose *p;
    struct emit_ctx x;
    struct sm *sm; /* whose tree p reads: a new one ends the job */
    char *path;
    /* Pushing its chunks beside the log (D13; x.push == this job): the
     * chunks pushed (for the REFS entries), the PUT without bytes once the
     * file is read. */
    struct fsm_chunk_ref *refs;
    uint32_t n_refs, cap_refs;
    struct fsm_op put;
    bool read;
    uint64_t majority_ms; /* when a majority held every batch, 0: not yet */
    uint64_t started_ms;
};

/* A `sync` request waiting. */
struct rsync {
    struct rsync *next;
    struct ctl_request *req;
    uint64_t target;
    uint64_t deadline_ms;
};

struct replica {
    const struct pb_config *cfg;
    struct event_base *base;
    struct cluster *c;
    struct watch *w;
    struct event *tick;
    struct event *kick; /* one-shot: propose now (an op was queued, or one of ours applied) */
    uint64_t client_id;
    uint64_t next_seq;
    struct rprop *head, *tail;
    size_t n_props;
    size_t n_inflight;
    size_t inflight_bytes;
    size_t inflight_big;
    size_t inflight_bulk;
    size_t queued_bytes; /* of every entry of ours not applied yet */
    struct rjob *job;
    struct rdirty *dirty;
    bool tree_was_bad;
    char leader[80];
    uint64_t props_dropped; /* cluster_props_dropped() as last seen */
    /* full rescan bookkeeping */
    bool scanning;
    char *scan_root;
    char **seen;
    size_t n_seen, cap_seen;
    /* paths held from the watcher (watch_suppress_begin) during a batch */
    char **held;
    size_t n_held, cap_held;
    char **moves; /* from, to pairs of others' renames in the batch */
    uint64_t *move_idx;
    size_t n_moves, cap_moves;
    struct rsync *syncs;
    struct sm *last_sm; /* a join discards and reopens the state machine */
    uint64_t proposed, applied, lost, skipped;
    uint64_t chunks_sent, chunks_dedup; /* chunk bytes carried / left out (the cluster has them) */
    struct pb_hist latency;             /* first propose -> own entry applied here */
    uint64_t proposed_bytes;            /* of entries proposed (first time each) */
    uint64_t progress_ms;               /* when one of ours last applied */
    char *missing_path;                 /* its PUT missed chunks: propose it again */
    char *push_off_path;                /* its push failed: CHUNKS entries next time */
    uint64_t pushed_files, push_fallbacks;
    size_t refs_queued; /* REFS entries of ours not applied: hold the collection */
    char last_error[256];
};

static void sync_check(struct replica *r, uint64_t now);

static struct sm *replica_sm(struct replica *r)
{
    return cluster_sm(r->c);
}

static void replica_error(struct replica *r, const char *fmt, ...) PB_PRINTF(2, 3);

static void replica_error(struct replica *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->last_error, sizeof(r->last_error), fmt, ap);
    va_end(ap);
    log_warning("%s", r->last_error);
}

/* ---- bookkeeping ---- */

static bool prop_touches(const struct rprop *p, const char *path)
{
    return (p->path != NULL && strcmp(p->path, path) == 0) ||
           (p->from != NULL && strcmp(p->from, path) == 0);
}

static bool path_busy(const struct replica *r, const char *path)
{
    if (r->job != NULL && strcmp(r->job->path, path) == 0)
        return true;
    for (const struct rprop *p = r->head; p != NULL; p = p->next) {
        if (prop_touches(p, path))
            return true;
    }
    return false;
}

static void mark_dirty(struct replica *r, const char *path, bool carry_all)
{
    for (struct rdirty *d = r->dirty; d != NULL; d = d->next) {
        if (strcmp(d->path, path) == 0) {
            d->carry_all |= carry_all;
            return;
        }
    }
    struct rdirty *d = pb_xcalloc(1, sizeof(*d));
    d->path = pb_xstrdup(path);
    d->carry_all = carry_all;
    d->next = r->dirty;
    r->dirty = d;
}

static void prop_free(struct rprop *p)
{
    free(p->path);
    free(p->from);
    free(p->data);
    free(p);
}

static void prop_unlink(struct replica *r, struct rprop *p)
{
    struct rprop **pp = &r->head, *prev = NULL;
    while (*pp != NULL && *pp != p) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (*pp == NULL)
        return;
    *pp = p->next;
    if (r->tail == p)
        r->tail = prev;
    r->n_props--;
    r->queued_bytes -= p->len <= r->queued_bytes ? p->len : r->queued_bytes;
    if (p->type == FSM_OP_REFS && r->refs_queued > 0)
        r->refs_queued--;
    if (p->proposed && r->n_inflight > 0) {
        r->n_inflight--;
        r->inflight_bytes -= p->len <= r->inflight_bytes ? p->len : r->inflight_bytes;
        if (p->len > REPLICA_BIG_ENTRY && r->inflight_big > 0)
            r->inflight_big--;
        if (p->len >= REPLICA_BULK_ENTRY && r->inflight_bulk > 0)
            r->inflight_bulk--;
    }
}

/* Runs replica_propose_some() on the next loop turn instead of the next
 * tick (up to REPLICA_TICK_MS later): for the latency of one write and for
 * the in-flight window refilling as soon as our entries apply. */
static void replica_kick(struct replica *r)
{
    if (r->kick != NULL && !event_pending(r->kick, EV_TIMEOUT, NULL))
        event_active(r->kick, EV_TIMEOUT, 0);
}

/* Encodes op and queues it with the next seq. */
static int queue_op(struct replica *r, const struct fsm_op *op, const struct fsm_tree_stat *st,
                    const char *from)
{
    struct pb_error err;
    pb_error_clear(&err);
    if (fsm_op_validate(op, &err) < 0) {
        replica_error(r, "not proposing %s %s: %s", fsm_op_type_name(op->type),
                      op->path ? op->path : "", err.msg);
        return -EINVAL;
    }
    struct buf b = BUF_INIT;
    int rc = fsm_op_encode(op, &b);
    if (rc < 0) {
        buf_free(&b);
        replica_error(r, "cannot encode %s %s: %s", fsm_op_type_name(op->type),
                      op->path ? op->path : "", strerror(-rc));
        return rc;
    }
    if (b.len > REPLICA_ENTRY_MAX) {
        replica_error(r, "not proposing %s %s: its entry would be %zu bytes (at most %u)",
                      fsm_op_type_name(op->type), op->path ? op->path : "(chunks)", b.len,
                      REPLICA_ENTRY_MAX);
        buf_free(&b);
        return -EMSGSIZE;
    }
    struct rprop *p = pb_xcalloc(1, sizeof(*p));
    p->seq = r->next_seq++;
    p->type = op->type;
    if (op->type == FSM_OP_REFS)
        r->refs_queued++;
    p->path = op->path ? pb_xstrdup(op->path) : NULL;
    p->from = from ? pb_xstrdup(from) : NULL;
    if (st != NULL) {
        p->st = *st;
        p->has_st = true;
    }
    p->data = buf_steal(&b, &p->len);
    if (r->tail)
        r->tail->next = p;
    else
        r->head = p;
    r->tail = p;
    r->n_props++;
    r->queued_bytes += p->len;
    replica_kick(r);
    log_debug("queued %s %s (seq %" PRIu64 ", %zu bytes)", fsm_op_type_name(op->type),
              op->path ? op->path : "(chunks)", p->seq, p->len);
    return 0;
}

/* ---- building ops ---- */

static uint64_t row_version(struct replica *r, const char *path, struct statedb_row *row)
{
    struct statedb_row tmp;
    if (row == NULL)
        row = &tmp;
    if (statedb_row_get(sm_statedb(replica_sm(r)), path, row, NULL) < 0) {
        memset(row, 0, sizeof(*row));
        return 0;
    }
    return row->version;
}

/*
 * The version of path this node's tree has seen, the base of an op about it
 * (doc/conflicts.md, "Trees that were not in sync"): the row's version when
 * the node's disk record says the tree holds that row's content (recorded
 * from the manifest, or its own committed edit still in the row), else 0. A path the node
 * never materialized (it joined with its own file there) or whose newer
 * content it skipped for a local edit (it was cut off or down meanwhile) was
 * changed without seeing the cluster's version: a concurrent change, decided
 * by the conflict rules, never a sequential overwrite.
 */
static uint64_t base_version(struct replica *r, const char *path)
{
    struct statedb_row row;
    uint64_t v = row_version(r, path, &row);
    if (v == 0 || row.deleted)
        return v;
    static const uint8_t zero[STATEDB_ID_LEN];
    struct statedb_disk d;
    if (statedb_disk_get(sm_statedb(replica_sm(r)), path, &d) < 0 || d.kind == 0)
        return 0;
    if (memcmp(d.row_content, row.content, sizeof(zero)) == 0)
        return v;
    /* Recorded as our own committed edit: seen if the content is still ours
     * (another node's later edit, skipped here for a local one, is not). */
    if (memcmp(d.row_content, zero, sizeof(zero)) == 0 && strcmp(row.origin, r->cfg->node_id) == 0)
        return v;
    return 0;
}

static void record_of(struct replica *r, const char *path, struct fsm_tree_stat *st)
{
    struct statedb_disk d;
    memset(st, 0, sizeof(*st));
    if (statedb_disk_get(sm_statedb(replica_sm(r)), path, &d) < 0 || d.kind == 0)
        return;
    st->kind = (enum fsm_kind)d.kind;
    st->mode = d.mode;
    st->size = d.size;
    st->mtime_ns = d.mtime_ns;
    st->ino = d.ino;
}

/* fsm_propose_begin passes the same arg to lacks and emit. */
static int lacks_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    struct emit_ctx *x = arg;
    struct replica *r = x->r;
    if (x->carry_all) {
        r->chunks_sent++;
        return 1;
    }
    int rc = statedb_chunk_has(sm_statedb(replica_sm(r)), id);
    if (rc == 0)
        r->chunks_sent++;
    else if (rc > 0)
        r->chunks_dedup++;
    return rc < 0 ? rc : !rc;
}

/* Bytes of chunk data per entry of a small file (fsm_propose_begin's
 * carry_max: a file up to REPLICA_SLICE_BYTES is one PUT), and the most an
 * op's carried bytes may be before emit_op re-cuts them into CHUNKS ops. */
#define REPLICA_CARRY_MAX (8u * 1024u * 1024u)
/* Bytes of chunks per CHUNKS entry of a big file. Small enough that the
 * entries Raft keeps in memory after a snapshot (a count of trailing
 * entries, 128) stay moderate (~80 MiB), and that ~16 of them pipeline
 * within REPLICA_INFLIGHT_BYTES; at least REPLICA_BULK_ENTRY, so they
 * travel (and keep their order) in the bulk class. */
#define REPLICA_JOB_CARRY (512u * 1024u)

/* Stores n chunks here (durably, without a row) and pushes them to the
 * peers of the job's push; they are named by the REFS entries later. */
static int push_chunks(struct replica *r, struct rjob *j, const struct fsm_chunk_data *d,
                       uint32_t n)
{
    if (n == 0)
        return 0;
    struct statedb_chunk_in *in = pb_xreallocarray(NULL, n, sizeof(*in));
    for (uint32_t i = 0; i < n; i++) {
        in[i].id = d[i].id;
        in[i].data = d[i].data;
        in[i].len = d[i].len;
        if (j->n_refs == j->cap_refs) {
            j->cap_refs = j->cap_refs ? 2 * j->cap_refs : 256;
            j->refs = pb_xreallocarray(j->refs, j->cap_refs, sizeof(*j->refs));
        }
        memcpy(j->refs[j->n_refs].id, d[i].id, FSM_CHUNK_ID_LEN);
        j->refs[j->n_refs++].len = d[i].len;
    }
    /* sent first: the peers store while this node does */
    int rc = push_send(cluster_push(r->c), in, n, pb_now_ms());
    struct statedb *db = sm_statedb(replica_sm(r));
    if (rc == 0 && db == NULL)
        rc = -ENOENT;
    if (rc == 0 && (rc = statedb_chunk_data_put_many(db, in, n)) < 0)
        replica_error(r, "%s: cannot store chunks to push: %s", j->path, statedb_errmsg(db));
    free(in);
    return rc;
}

/* Keeps the PUT (without its bytes: they were pushed) until the chunks are
 * held by a majority. */
static int push_keep_put(struct replica *r, struct rjob *j, const struct fsm_op *op)
{
    int rc = push_chunks(r, j, op->u.put.data, op->u.put.n_data);
    if (rc < 0)
        return rc;
    fsm_op_free(&j->put);
    j->put.type = FSM_OP_PUT;
    j->put.origin = pb_xstrdup(op->origin);
    j->put.path = pb_xstrdup(op->path);
    j->put.base = op->base;
    j->put.u.put.mode = op->u.put.mode;
    j->put.u.put.mtime_ns = op->u.put.mtime_ns;
    j->put.u.put.size = op->u.put.size;
    j->put.u.put.n_refs = op->u.put.n_refs;
    if (op->u.put.n_refs > 0) {
        j->put.u.put.refs = pb_xreallocarray(NULL, op->u.put.n_refs, sizeof(*op->u.put.refs));
        memcpy(j->put.u.put.refs, op->u.put.refs, op->u.put.n_refs * sizeof(*op->u.put.refs));
    }
    return 0;
}

static int emit_op(void *arg, const struct fsm_op *op)
{
    struct emit_ctx *x = arg;
    if (x->push != NULL && op->type == FSM_OP_CHUNKS)
        return push_chunks(x->r, x->push, op->u.chunks.data, op->u.chunks.n_data);
    if (x->push != NULL && op->type == FSM_OP_PUT)
        return push_keep_put(x->r, x->push, op);
    const struct fsm_chunk_data *data = NULL;
    uint32_t n_data = 0;
    if (op->type == FSM_OP_CHUNKS) {
        data = op->u.chunks.data;
        n_data = op->u.chunks.n_data;
    } else if (op->type == FSM_OP_PUT) {
        data = op->u.put.data;
        n_data = op->u.put.n_data;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < n_data; i++)
        total += data[i].len;
    /* The PUT comes last; its stat is filled by fsm_propose_step() after the
     * read, so it is recorded by the caller. */
    if (total <= REPLICA_CARRY_MAX)
        return queue_op(x->r, op, NULL, NULL);
    /* Shallow ops over the same bytes (owned by op, never freed here). */
    for (uint32_t i = 0; i < n_data;) {
        uint32_t k = 0;
        uint64_t bytes = 0;
        while (i + k < n_data && (k == 0 || bytes + data[i + k].len <= REPLICA_CARRY_MAX))
            bytes += data[i + k++].len;
        struct fsm_op c;
        fsm_op_init(&c);
        c.type = FSM_OP_CHUNKS;
        c.origin = op->origin;
        c.u.chunks.data = (struct fsm_chunk_data *)(uintptr_t)(data + i);
        c.u.chunks.n_data = k;
        int rc = queue_op(x->r, &c, NULL, NULL);
        if (rc < 0)
            return rc;
        i += k;
    }
    if (op->type != FSM_OP_PUT)
        return 0;
    struct fsm_op put = *op;
    put.u.put.data = NULL;
    put.u.put.n_data = 0;
    return queue_op(x->r, &put, NULL, NULL);
}

/* The last op queued is the PUT of a file: it records what the tree held. */
static void note_put_stat(struct replica *r, size_t n_before, const struct fsm_tree_stat *st)
{
    if (r->n_props > n_before && r->tail != NULL && r->tail->type == FSM_OP_PUT) {
        r->tail->st = *st;
        r->tail->has_st = true;
    }
}

/* Ends the big file's proposal: rc 0 (its PUT is queued), -EAGAIN (it
 * changed while read, or the tree went away: later), -ECANCELED (the
 * daemon stops), or an error. */
/* Ends a file's proposal with rc (1 never): a file changing while read is
 * looked at again later, an error is reported; frees j. */
static void job_free(struct replica *r, struct rjob *j, int rc)
{
    if (rc == -EAGAIN)
        mark_dirty(r, j->path, j->x.carry_all);
    else if (rc < 0 && rc != -ECANCELED)
        replica_error(r, "cannot propose %s: %s", j->path, strerror(-rc));
    else if (rc == 0)
        log_debug("%s: %" PRIu64 " bytes read, %" PRIu64 " bytes of chunks proposed", j->path,
                  fsm_propose_offset(j->p), fsm_propose_carried(j->p));
    fsm_propose_free(j->p);
    if (j->x.push != NULL) {
        push_set_observer(cluster_push(r->c), NULL, NULL);
        push_stop(cluster_push(r->c));
    }
    free(j->refs);
    fsm_op_free(&j->put);
    free(j->path);
    free(j);
}

static void job_end(struct replica *r, int rc)
{
    struct rjob *j = r->job;
    r->job = NULL;
    job_free(r, j, rc);
}

/*
 * Reads the next slices of the big file, as long as our entries not yet
 * applied stay under REPLICA_INFLIGHT_BYTES: memory for a file in flight is
 * bounded by that budget plus one slice, and one loop turn by
 * REPLICA_SLICES_PER_TURN slices, whatever the file's size. Reading on the
 * loop (not a worker thread) keeps the tree, state.db and the queue
 * single-threaded; a slice costs a few ms.
 */
static int cmp_ref_id(const void *a, const void *b)
{
    return memcmp(((const struct fsm_chunk_ref *)a)->id, ((const struct fsm_chunk_ref *)b)->id,
                  FSM_CHUNK_ID_LEN);
}

/* A majority holds every pushed chunk durably: the REFS entries naming them
 * (FSM_OP_MAX_REFS each), then the PUT, are queued as any op of ours. */
static int push_finish(struct replica *r, struct rjob *j)
{
    if (j->n_refs > 1)
        qsort(j->refs, j->n_refs, sizeof(*j->refs), cmp_ref_id);
    uint32_t n = 0;
    for (uint32_t i = 0; i < j->n_refs; i++)
        if (n == 0 || memcmp(j->refs[n - 1].id, j->refs[i].id, FSM_CHUNK_ID_LEN) != 0)
            j->refs[n++] = j->refs[i];
    j->n_refs = n;
    int rc = 0;
    for (uint32_t i = 0; i < n && rc == 0; i += FSM_OP_MAX_REFS) {
        struct fsm_op op;
        fsm_op_init(&op);
        op.type = FSM_OP_REFS;
        op.origin = j->put.origin;
        op.u.refs.refs = j->refs + i;
        op.u.refs.n_refs = n - i < FSM_OP_MAX_REFS ? n - i : FSM_OP_MAX_REFS;
        rc = queue_op(r, &op, NULL, NULL); /* shallow: nothing to free */
    }
    if (rc == 0)
        rc = queue_op(r, &j->put, &j->x.st, NULL);
    if (rc == 0) {
        r->pushed_files++;
        log_info("%s: %u chunks pushed in %" PRIu64 " ms (a majority held them after %" PRIu64
                 " ms); proposing REFS and the PUT",
                 j->path, n, pb_now_ms() - j->started_ms, j->majority_ms - j->started_ms);
    }
    return rc;
}

/* Stops pushing the job's chunks: the file is proposed again, this time as
 * CHUNKS entries (today's path); what was pushed is collected later. */
static void push_fallback(struct replica *r, const char *why)
{
    log_info("%s: pushing its chunks beside the log failed (%s): proposing them in the log",
             r->job->path, why);
    r->push_fallbacks++;
    free(r->push_off_path);
    r->push_off_path = pb_xstrdup(r->job->path);
    job_end(r, -EAGAIN);
}

/* The job whose chunks are pushed: 1 if the next slice may be read (every
 * peer's window has room), 0 to wait (the window, or the acknowledgements
 * once the file is read); the end of the job is handled here. */
static int push_check(struct replica *r, struct rjob *j)
{
    struct push_progress pg;
    struct push_peer cur[PUSH_MAX_PEERS];
    size_t n_cur = 0, voters = 0;
    bool self_voter = false;
    /* The configuration now, not at the start: a member added since (that
     * may not read REFS), a voter added, removed or demoted, this node
     * removed or demoted all change what a majority is. */
    if (cluster_push_targets(r->c, cur, PUSH_MAX_PEERS, &n_cur, &voters, &self_voter) < 0) {
        push_fallback(r, "the configuration no longer allows pushing");
        return 0;
    }
    push_set_voters(cluster_push(r->c), cur, n_cur);
    push_progress_get(cluster_push(r->c), &pg);
    if (!pg.active) {
        push_fallback(r, "the push was stopped");
        return 0;
    }
    size_t need = voters / 2 + 1;
    size_t self = self_voter ? 1 : 0;
    if (pg.voters_in + self < need) {
        push_fallback(r, "too few voters hold the chunks");
        return 0;
    }
    if (!j->read)
        return push_room(cluster_push(r->c), REPLICA_PUSH_ROOM) ? 1 : 0;
    if (pg.voters_complete + self < need)
        return 0;
    uint64_t now = pb_now_ms();
    if (j->majority_ms == 0)
        j->majority_ms = now;
    /* the other reachable peers too, for a short while: on a healthy
     * cluster every node holds the bytes when the PUT applies */
    if (pg.complete < pg.peers - pg.left && now - j->majority_ms < REPLICA_PUSH_GRACE_MS)
        return 0;
    job_end(r, push_finish(r, j));
    return 0;
}

static void job_run(struct replica *r)
{
    for (unsigned n = 0; r->job != NULL && n < REPLICA_SLICES_PER_TURN; n++) {
        struct rjob *j = r->job;
        if (replica_sm(r) != j->sm) {
            job_end(r, -EAGAIN);
            return;
        }
        if (j->x.push != NULL) {
            if (push_check(r, j) <= 0)
                return;
        } else if (r->queued_bytes >= REPLICA_INFLIGHT_BYTES) {
            return; /* go on once some of ours applied */
        }
        size_t before = r->n_props;
        int rc = fsm_propose_step(j->p, REPLICA_SLICE_BYTES, &j->x.st);
        if (rc == 1)
            continue;
        if (rc == 0 && j->x.push != NULL) {
            j->read = true; /* the PUT waits for the acknowledgements */
            continue;
        }
        if (rc == 0)
            note_put_stat(r, before, &j->x.st);
        job_end(r, rc);
    }
}

/* push_set_observer(): an acknowledgement came, the job may go on. */
static void push_progressed(void *arg)
{
    replica_kick(arg);
}

/* Whether the big file's chunks go beside the log (D13): every member
 * speaks version 2, and its last push did not fail. Starts the push. */
static bool push_begin(struct replica *r, struct rjob *j)
{
    struct push *pu = cluster_push(r->c);
    uint64_t now = pb_now_ms();
    struct push_peer peers[PUSH_MAX_PEERS];
    size_t n = 0, voters = 0;
    bool self_voter = false;
    if (r->push_off_path != NULL && strcmp(r->push_off_path, j->path) == 0) {
        free(r->push_off_path); /* this once */
        r->push_off_path = NULL;
        return false;
    }
    if (pu == NULL ||
        cluster_push_targets(r->c, peers, PUSH_MAX_PEERS, &n, &voters, &self_voter) < 0 ||
        push_start(pu, peers, n, now) < 0)
        return false;
    j->x.push = j;
    j->started_ms = now;
    push_set_observer(pu, push_progressed, r);
    log_debug("%s: pushing its chunks to %zu peers (%zu voters)", j->path, n, voters);
    return true;
}

static void op_start(struct fsm_op *op, struct replica *r, enum fsm_op_type type, const char *path)
{
    fsm_op_init(op);
    op->type = type;
    op->origin = pb_xstrdup(r->cfg->node_id);
    op->path = pb_xstrdup(path);
    op->base = base_version(r, path);
}

static bool read_target(struct replica *r, const char *path, char *buf, size_t len)
{
    char *full = pb_xasprintf("%s/%s", r->cfg->data_dir, path);
    ssize_t n = readlink(full, buf, len - 1);
    free(full);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    return true;
}

struct below_ctx {
    const char *dir;
    size_t len;
    char **paths;
    size_t n, cap;
};

static int below_row(void *arg, const char *path, const struct statedb_row *row)
{
    struct below_ctx *b = arg;
    if (row->deleted || strncmp(path, b->dir, b->len) != 0 || path[b->len] != '/')
        return 0;
    if (b->n == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 32;
        b->paths = pb_xreallocarray(b->paths, b->cap, sizeof(*b->paths));
    }
    b->paths[b->n++] = pb_xstrdup(path);
    return 0;
}

static void replica_check(struct replica *r, const char *path, bool carry_all);

/* A directory vanished with its subtree: its entries go first, deepest
 * first (reverse byte order puts "a/b/c" before "a/b"). */
static void delete_below(struct replica *r, const char *dir)
{
    struct below_ctx b = {.dir = dir, .len = strlen(dir)};
    statedb_row_foreach(sm_statedb(replica_sm(r)), below_row, &b);
    for (size_t i = b.n; i-- > 0;) {
        replica_check(r, b.paths[i], false);
        free(b.paths[i]);
    }
    free(b.paths);
}

/*
 * Looks at path on disk and proposes what differs from the node's record
 * (nothing when they match: our own writes, or an op already in flight).
 */
static void replica_check(struct replica *r, const char *path, bool carry_all)
{
    struct sm *sm = replica_sm(r);
    struct fsm_tree *t = sm ? sm_tree(sm) : NULL;
    if (t == NULL || !fsm_path_valid(path))
        return;
    if (fsm_tree_check_marker(t) < 0) {
        /* unmounted or replaced under us: what the watcher sees now is not
         * the tree state.db describes; propose nothing (sm stops applying) */
        if (!r->tree_was_bad)
            log_err("the tree %s has lost its .pickbox marker: not proposing changes",
                    r->cfg->data_dir);
        r->tree_was_bad = true;
        return;
    }
    if (path_busy(r, path)) {
        log_debug("%s: own proposal in flight: later", path);
        mark_dirty(r, path, carry_all);
        return;
    }
    struct fsm_tree_stat now, rec;
    int rc = fsm_tree_lstat(t, path, &now);
    if (rc == -ENOENT || rc == -ENOTDIR) {
        memset(&now, 0, sizeof(now));
        rc = 0;
    }
    if (rc < 0) {
        log_debug("%s: %s (not proposed)", path, strerror(-rc));
        return;
    }
    record_of(r, path, &rec);
    bool retry = r->missing_path != NULL && strcmp(r->missing_path, path) == 0;
    if (!carry_all && !retry && fsm_tree_stat_matches(&rec, &now)) {
        log_debug("%s: as recorded (kind %d size %" PRIu64 " ino %" PRIu64 "): no op", path,
                  (int)now.kind, now.size, now.ino);
        return; /* what we wrote or already proposed and committed */
    }
    struct fsm_op op;
    switch (now.kind) {
    case FSM_KIND_FILE: {
        bool big = now.size > REPLICA_SLICE_BYTES;
        if (big && r->job != NULL) {
            mark_dirty(r, path, carry_all); /* one big file at a time */
            return;
        }
        struct rjob *j = pb_xcalloc(1, sizeof(*j));
        j->x.r = r;
        j->x.carry_all = carry_all;
        j->sm = sm;
        j->path = pb_xstrdup(path);
        fsm_op_init(&j->put);
        bool push = big && push_begin(r, j);
        rc = fsm_propose_begin(t, path, r->cfg->node_id, base_version(r, path),
                               push  ? REPLICA_PUSH_CARRY
                               : big ? REPLICA_JOB_CARRY
                                     : REPLICA_CARRY_MAX,
                               lacks_chunk, emit_op, &j->x, &j->p);
        if (rc == 0 && big) {
            r->job = j;
            job_run(r);
            return;
        }
        if (rc == 0) {
            size_t before = r->n_props;
            while ((rc = fsm_propose_step(j->p, UINT64_MAX, &j->x.st)) == 1)
                ;
            if (rc == 0)
                note_put_stat(r, before, &j->x.st);
        }
        job_free(r, j, rc); /* -EAGAIN: changing while read, later */
        return;
    }
    case FSM_KIND_DIR: {
        struct statedb_row row;
        uint64_t v = row_version(r, path, &row);
        if (v != 0 && !row.deleted && row.kind == FSM_KIND_DIR && rec.kind == FSM_KIND_DIR &&
            rec.ino == now.ino) {
            if ((row.mode & 0777) == (now.mode & 0777))
                return;
            op_start(&op, r, FSM_OP_SETATTR, path);
            op.u.setattr.fields = FSM_ATTR_MODE;
            op.u.setattr.mode = now.mode & 07777;
        } else {
            op_start(&op, r, FSM_OP_MKDIR, path);
            op.u.mkdir.mode = now.mode & 07777;
            op.u.mkdir.mtime_ns = now.mtime_ns;
        }
        queue_op(r, &op, &now, NULL);
        fsm_op_free(&op);
        return;
    }
    case FSM_KIND_SYMLINK: {
        char target[FSM_PATH_MAX + 1];
        if (!read_target(r, path, target, sizeof(target)))
            return;
        op_start(&op, r, FSM_OP_SYMLINK, path);
        op.u.symlink.target = pb_xstrdup(target);
        op.u.symlink.mtime_ns = now.mtime_ns;
        queue_op(r, &op, &now, NULL);
        fsm_op_free(&op);
        return;
    }
    case FSM_KIND_NONE: {
        if (rec.kind == FSM_KIND_NONE)
            return; /* we never had it here: nothing to delete */
        struct statedb_row row;
        uint64_t v = row_version(r, path, &row);
        if (v == 0 || row.deleted)
            return;
        if (row.kind == FSM_KIND_DIR)
            delete_below(r, path); /* the watcher says: the whole subtree is gone */
        op_start(&op, r, FSM_OP_DELETE, path);
        op.u.del.is_dir = row.kind == FSM_KIND_DIR;
        queue_op(r, &op, &now, NULL);
        fsm_op_free(&op);
        return;
    }
    default:
        r->skipped++;
        log_info("%s: not a regular file, directory or symlink: not replicated", path);
        return;
    }
}

static void replica_rename(struct replica *r, const char *from, const char *to)
{
    struct sm *sm = replica_sm(r);
    struct fsm_tree *t = sm ? sm_tree(sm) : NULL;
    if (t == NULL)
        return;
    if (!fsm_path_valid(from) || !fsm_path_valid(to)) {
        replica_check(r, to, false);
        return;
    }
    struct fsm_tree_stat rec, now;
    record_of(r, from, &rec);
    struct statedb_row row;
    uint64_t v = row_version(r, from, &row);
    struct fsm_tree_stat rec_to;
    record_of(r, to, &rec_to);
    if (path_busy(r, from) || path_busy(r, to) || rec.kind == FSM_KIND_NONE || v == 0 ||
        row.deleted || fsm_tree_lstat(t, to, &now) < 0 || now.kind == FSM_KIND_NONE ||
        fsm_tree_stat_matches(&rec_to, &now)) {
        /* Not something we can move in the index as is, or the destination
         * is as recorded (our own apply moved it there, e.g. a leaf moved
         * aside to a conflict copy, R11/R16): look at both ends. */
        replica_check(r, from, false);
        replica_check(r, to, false);
        return;
    }
    struct fsm_op op;
    op_start(&op, r, FSM_OP_RENAME, from);
    op.u.rename.to = pb_xstrdup(to);
    op.u.rename.base_to = base_version(r, to);
    queue_op(r, &op, &now, from);
    /* the proposal is about `to` (stat), moving from */
    if (r->tail != NULL && r->tail->type == FSM_OP_RENAME) {
        free(r->tail->path);
        r->tail->path = pb_xstrdup(to);
    }
    fsm_op_free(&op);
}

/* ---- full rescans: what was recorded and is gone ---- */

static void seen_add(struct replica *r, const char *path)
{
    if (r->n_seen == r->cap_seen) {
        r->cap_seen = r->cap_seen ? r->cap_seen * 2 : 256;
        r->seen = pb_xreallocarray(r->seen, r->cap_seen, sizeof(*r->seen));
    }
    r->seen[r->n_seen++] = pb_xstrdup(path);
}

static void seen_clear(struct replica *r)
{
    for (size_t i = 0; i < r->n_seen; i++)
        free(r->seen[i]);
    free(r->seen);
    r->seen = NULL;
    r->n_seen = r->cap_seen = 0;
    free(r->scan_root);
    r->scan_root = NULL;
    r->scanning = false;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

struct gone_ctx {
    struct replica *r;
    char **paths;
    size_t n, cap;
};

static int gone_row(void *arg, const char *path, const struct statedb_row *row)
{
    struct gone_ctx *g = arg;
    struct replica *r = g->r;
    if (row->deleted)
        return 0;
    size_t lr = strlen(r->scan_root);
    if (lr > 0 && (strncmp(path, r->scan_root, lr) != 0 || (path[lr] != '\0' && path[lr] != '/')))
        return 0;
    const char *key = path;
    if (r->n_seen > 0 && bsearch(&key, r->seen, r->n_seen, sizeof(*r->seen), cmp_str) != NULL)
        return 0;
    if (g->n == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 64;
        g->paths = pb_xreallocarray(g->paths, g->cap, sizeof(*g->paths));
    }
    g->paths[g->n++] = pb_xstrdup(path);
    return 0;
}

static void rescan_end(struct replica *r)
{
    if (r->n_seen > 0)
        qsort(r->seen, r->n_seen, sizeof(*r->seen), cmp_str);
    struct gone_ctx g = {.r = r};
    statedb_row_foreach(sm_statedb(replica_sm(r)), gone_row, &g);
    /* Children first (reverse byte order), so a gone directory's entries
     * are deleted before it. */
    for (size_t i = g.n; i-- > 0;) {
        replica_check(r, g.paths[i], false);
        free(g.paths[i]);
    }
    free(g.paths);
    seen_clear(r);
}

/* ---- the watcher ---- */

static void on_change(const struct watch_change *ch, void *arg)
{
    struct replica *r = arg;
    struct sm *sm = replica_sm(r);
    if (sm == NULL || sm_tree(sm) == NULL) {
        r->tree_was_bad = true;
        return;
    }
    log_debug("candidate %d %s%s%s", (int)ch->kind, ch->from ? ch->from : "",
              ch->from ? " -> " : "", ch->path ? ch->path : "");
    switch (ch->kind) {
    case WATCH_RESCAN_BEGIN:
        seen_clear(r);
        r->scanning = true;
        r->scan_root = pb_xstrdup(ch->path ? ch->path : "");
        return;
    case WATCH_RESCAN_END:
        if (r->scanning)
            rescan_end(r);
        return;
    default:
        break;
    }
    if (ch->rescan && r->scanning)
        seen_add(r, ch->path);
    switch (ch->kind) {
    case WATCH_UPSERT_FILE:
    case WATCH_ATTR:
        if (ch->st.type == WATCH_TYPE_FILE && ch->st.nlink > 1) {
            r->skipped++;
            log_info("%s: has %" PRIu64 " hard links: not replicated", ch->path, ch->st.nlink);
            return;
        }
        replica_check(r, ch->path, false);
        return;
    case WATCH_MKDIR:
    case WATCH_SYMLINK:
    case WATCH_REMOVE:
        replica_check(r, ch->path, false);
        return;
    case WATCH_RENAME:
        replica_rename(r, ch->from, ch->path);
        return;
    case WATCH_UNSUPPORTED:
        r->skipped++;
        log_info("%s: a device, FIFO or socket: not replicated", ch->path);
        return;
    default:
        return;
    }
}

/* ---- own entries applying (sm observer) ---- */

static struct rprop *prop_by_seq(struct replica *r, uint64_t seq)
{
    for (struct rprop *p = r->head; p != NULL; p = p->next) {
        if (p->seq == seq)
            return p;
    }
    return NULL;
}

static void obs_before(void *arg, const struct raft_entry *e)
{
    struct replica *r = arg;
    struct rprop *p = prop_by_seq(r, e->seq);
    struct sm *sm = replica_sm(r);
    if (p == NULL || p->path == NULL || sm_tree(sm) == NULL)
        return;
    if (p->type == FSM_OP_RENAME && p->from != NULL) {
        /* The tree already did the move: move the records with it, so the
         * applied MOVE finds them where the entries are. */
        statedb_disk_move(sm_statedb(sm), p->from, p->path);
        return;
    }
    if (!p->has_st)
        return;
    struct fsm_tree_stat now;
    if (p->type == FSM_OP_DELETE) {
        /* Still gone: drop the record, so that if the delete loses (an edit
         * beats a concurrent delete, R14) the repair brings the path back
         * instead of finding "a local edit" forever. */
        int rc = fsm_tree_lstat(sm_tree(sm), p->path, &now);
        if (rc == -ENOENT || rc == -ENOTDIR || (rc == 0 && now.kind == FSM_KIND_NONE))
            fsm_apply_record_local(sm_fsm(sm), p->path, &p->st);
        return;
    }
    if (p->type == FSM_OP_MKDIR) {
        /* Our directory where this tree never held the index's entry (a
         * joining tree, R11): recorded now, a plan moving the index's leaf
         * aside would move our directory instead. Recorded once applied. */
        struct fsm_tree_stat rec;
        record_of(r, p->path, &rec);
        if (rec.kind == FSM_KIND_NONE) {
            p->record_after = true;
            return;
        }
    }
    if (fsm_tree_lstat(sm_tree(sm), p->path, &now) < 0 || now.kind == FSM_KIND_NONE)
        return;
    /* Recorded also when the path already holds a newer local edit (a writer
     * that truncated, was proposed, then wrote; a second save): that edit is
     * still different from the record, so nothing replaces it, and its op is
     * based on this one, whose content the tree has seen, instead of on an
     * older version: a node's own edits in a row are sequential, never a
     * conflict with each other. Only local edits can have changed the path
     * meanwhile: an apply skips a path whose tree differs from the record. */
    bool same = fsm_tree_stat_matches(&p->st, &now);
    if (!same && p->type != FSM_OP_PUT && p->type != FSM_OP_SYMLINK)
        return;
    /* a PUT that fails for missing chunks takes no effect: its record
     * goes back (obs_after), or a repair would delete the new file */
    if (p->type == FSM_OP_PUT)
        p->has_prev = statedb_disk_get(sm_statedb(sm), p->path, &p->prev) == 0;
    fsm_apply_record_local(sm_fsm(sm), p->path, &p->st);
    /* The file holds what the op carries: recorded, not written again (a
     * writer may still have it open). */
    if (same && p->type == FSM_OP_PUT)
        fsm_apply_note_in_tree(sm_fsm(sm), e->index, p->path, &p->st);
}

static void obs_after(void *arg, const struct raft_entry *e, const struct fsm_apply_result *res)
{
    struct replica *r = arg;
    struct rprop *p = prop_by_seq(r, e->seq);
    if (p == NULL)
        return;
    /* Ours with a lower seq can never apply now (the session moved past
     * them): look at their paths again. */
    struct rprop *next;
    for (struct rprop *q = r->head; q != NULL && q != p; q = next) {
        next = q->next;
        if (q->seq < p->seq) {
            r->lost++;
            prop_unlink(r, q);
            if (q->type == FSM_OP_RENAME && q->has_st && q->st.kind == FSM_KIND_DIR)
                /* a directory moved in our tree and not in the index: what
                 * it holds is as new as the directory itself (as after a
                 * rename whose source was gone, below) */
                watch_rescan(r->w, q->path);
            else if (q->path)
                mark_dirty(r, q->path, false);
            if (q->from)
                mark_dirty(r, q->from, false);
            prop_free(q);
        }
    }
    log_debug("own seq %" PRIu64 " (%s %s) applied at %" PRIu64 ": status %d outcome %d", p->seq,
              fsm_op_type_name(p->type), p->path ? p->path : "", e->index, (int)res->status,
              (int)res->outcome);
    prop_unlink(r, p);
    r->applied++; /* obs_batch_after kicks the queue on */
    if (p->proposed)
        pb_hist_observe_us(&r->latency, pb_now_us() - p->proposed_us);
    struct sm *sm = replica_sm(r);
    struct fsm_tree_stat now;
    if (p->record_after && res->status == FSM_APPLY_DONE && sm_tree(sm) != NULL &&
        fsm_tree_lstat(sm_tree(sm), p->path, &now) == 0 && fsm_tree_stat_matches(&p->st, &now))
        fsm_apply_record_local(sm_fsm(sm), p->path, &p->st);
    if ((p->type == FSM_OP_PUT || p->type == FSM_OP_SYMLINK) && p->has_st &&
        res->status == FSM_APPLY_DONE && res->outcome == FSM_OUT_NOOP && sm_tree(sm) != NULL &&
        fsm_tree_lstat(sm_tree(sm), p->path, &now) == 0 && now.kind != FSM_KIND_NONE) {
        /* The index already held these bytes (R5, e.g. a joining tree's
         * identical file): the tree holds the index's row, recorded as such,
         * so that our next edit of it is sequential (also when that edit is
         * already there, as in obs_before()). */
        struct fsm_disk disk;
        fsm_apply_bind_disk(sm_fsm(sm), &disk);
        disk.record(disk.arg, p->path, &p->st);
    }
    if (p->type == FSM_OP_RENAME && p->from != NULL && res->status == FSM_APPLY_DONE &&
        res->outcome == FSM_OUT_NOOP) {
        /* The source was gone (deleted or moved concurrently, R19): the
         * index knows nothing at the destination, so its records go back
         * to the source (removed there by the repair) and the entry in our
         * tree is proposed as a creation. */
        statedb_disk_move(sm_statedb(replica_sm(r)), p->path, p->from);
        if (p->st.kind == FSM_KIND_DIR)
            watch_rescan(r->w, p->path); /* the directory and what it holds */
        else
            mark_dirty(r, p->path, false);
    }
    r->progress_ms = pb_now_ms();
    bool missing = res->status == FSM_APPLY_DONE && res->outcome == FSM_OUT_MISSING_CHUNKS;
    bool same = p->path && r->missing_path && strcmp(r->missing_path, p->path) == 0;
    bool again = missing && same;
    if (p->type == FSM_OP_PUT && same) {
        free(r->missing_path);
        r->missing_path = NULL;
    }
    if (missing && p->has_prev) {
        /* The local file is not in the index: the record must not say it
         * is safe to replace (doc/fsm.md, "Pending local edits"); else
         * the next repair (a snapshot install, a tree error) removes it as
         * a path the index no longer has. */
        if (sm != NULL && statedb_disk_set(sm_statedb(sm), p->path, &p->prev) < 0)
            log_warning("%s: disk record: %s", p->path, statedb_errmsg(sm_statedb(sm)));
    }
    if (missing && p->path) {
        /* A CHUNKS entry of ours was lost (a leader change, or skipped
         * behind a later seq) or its chunks were collected meanwhile.
         * First again with what state.db lacks now (what the PUT missed):
         * only those travel. A second miss in a row carries every chunk,
         * which cannot miss. */
        log_info("%s: chunks missing when the PUT applied: proposing again with %s", p->path,
                 again ? "every chunk" : "the missing ones");
        if (!again)
            r->missing_path = pb_xstrdup(p->path);
        mark_dirty(r, p->path, again);
    }
    prop_free(p);
}

/* ---- holding the watcher while a batch writes the tree ---- */

static void hold_path(struct replica *r, const char *path)
{
    if (!fsm_path_valid(path))
        return;
    /* the parents too: implicit directories are created for a path */
    char *tmp = pb_xstrdup(path);
    for (char *s = tmp;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char c = *s;
        *s = '\0';
        if (watch_suppress_begin(r->w, tmp) == 0) {
            if (r->n_held == r->cap_held) {
                r->cap_held = r->cap_held ? r->cap_held * 2 : 64;
                r->held = pb_xreallocarray(r->held, r->cap_held, sizeof(*r->held));
            }
            r->held[r->n_held++] = pb_xstrdup(tmp);
        }
        *s = c;
        if (c == '\0')
            break;
    }
    free(tmp);
}

static void hold_op(struct replica *r, const struct fsm_op *op, uint64_t index, bool own)
{
    if (op->type == FSM_OP_BATCH) {
        for (uint32_t i = 0; i < op->u.batch.n_ops; i++)
            hold_op(r, &op->u.batch.ops[i], index, own);
        return;
    }
    if (op->path == NULL)
        return;
    hold_path(r, op->path);
    if (op->type == FSM_OP_RENAME) {
        hold_path(r, op->u.rename.to);
        if (!own) {
            if (r->n_moves == r->cap_moves) {
                r->cap_moves = r->cap_moves ? r->cap_moves * 2 : 8;
                r->moves = pb_xreallocarray(r->moves, r->cap_moves * 2, sizeof(*r->moves));
                r->move_idx = pb_xreallocarray(r->move_idx, r->cap_moves, sizeof(*r->move_idx));
            }
            r->moves[2 * r->n_moves] = pb_xstrdup(op->path);
            r->moves[2 * r->n_moves + 1] = pb_xstrdup(op->u.rename.to);
            r->move_idx[r->n_moves++] = index;
        }
    }
}

static void obs_batch_before(void *arg, const struct raft_entry *e, size_t n)
{
    struct replica *r = arg;
    for (size_t i = 0; i < n; i++) {
        if (e[i].type != RAFT_ENTRY_NORMAL || e[i].len < 2 || e[i].data == NULL ||
            e[i].data[0] == 0 || e[i].data[1] == FSM_OP_CHUNKS || e[i].data[1] == FSM_OP_REFS)
            continue; /* probes and chunk bytes touch no path */
        struct fsm_op op;
        if (fsm_op_decode(e[i].data, e[i].len, &op, NULL) < 0)
            continue;
        hold_op(r, &op, e[i].index, e[i].client_id == r->client_id);
        fsm_op_free(&op);
    }
}

static void lstat_watch(struct replica *r, const char *path, struct watch_stat *ws, bool *exists)
{
    char *full = pb_xasprintf("%s/%s", r->cfg->data_dir, path);
    struct stat st;
    *exists = lstat(full, &st) == 0;
    if (*exists)
        watch_stat_from_stat(ws, &st);
    free(full);
}

static void obs_batch_after(void *arg, const struct raft_entry *e, size_t n,
                            const struct fsm_apply_result *res)
{
    struct replica *r = arg;
    /* Others' renames that moved something in our tree: the watcher moves
     * its model (and watches) along. */
    for (size_t k = 0; k < r->n_moves; k++) {
        const char *from = r->moves[2 * k], *to = r->moves[2 * k + 1];
        bool moved = false;
        for (size_t i = 0; res != NULL && i < n; i++) {
            if (e[i].index == r->move_idx[k])
                moved = res[i].status == FSM_APPLY_DONE && res[i].outcome == FSM_OUT_APPLIED &&
                        res[i].pending == 0 && res[i].tree_rc == 0;
        }
        struct watch_stat ws;
        bool from_there, to_there;
        lstat_watch(r, from, &ws, &from_there);
        lstat_watch(r, to, &ws, &to_there);
        if (moved && !from_there && to_there)
            watch_suppress_rename(r->w, from, to);
        free(r->moves[2 * k]);
        free(r->moves[2 * k + 1]);
    }
    r->n_moves = 0;
    /* Release in reverse (children before parents); what is there now is
     * what the watcher "reported". A path whose disk differs from our
     * record holds a local edit: look at it (the watcher will not). */
    for (size_t i = r->n_held; i-- > 0;) {
        struct watch_stat ws;
        bool there;
        lstat_watch(r, r->held[i], &ws, &there);
        watch_suppress_end(r->w, r->held[i], there ? &ws : NULL);
        mark_dirty(r, r->held[i], false);
        free(r->held[i]);
    }
    r->n_held = 0;
    /* Ours applied: the byte budget has room again. The big file's job and
     * the queue go on as soon as the loop is back (not inside the apply,
     * and not one tick later: the tick paced a big file at 20 ms per
     * budget's worth). */
    if (r->job != NULL || r->head != NULL)
        replica_kick(r);
}

static void set_observer(struct replica *r)
{
    struct sm *sm = replica_sm(r);
    if (sm == NULL)
        return;
    struct sm_observer obs = {.arg = r,
                              .client_id = r->client_id,
                              .before = obs_before,
                              .after = obs_after,
                              .batch_before = obs_batch_before,
                              .batch_after = obs_batch_after};
    sm_set_observer(sm, &obs);
    sm_set_loop(sm, r->base); /* big files are written off the apply, finished here */
}

/* ---- proposing ---- */

static void replica_propose_some(struct replica *r, uint64_t now)
{
    for (struct rprop *p = r->head; p != NULL; p = p->next) {
        /* Retried when it is overdue and none of ours applied for as long:
         * a slow apply (a big file) is not a lost proposal, and a retry is
         * one more copy of the entry in the log. */
        if (p->proposed &&
            (now < p->retry_at_ms || now < r->progress_ms + (p->retry_at_ms - p->proposed_ms)))
            continue;
        /* bulk entries keep their order among themselves */
        bool bulk_train = p->len >= REPLICA_BULK_ENTRY && r->inflight_bulk == r->n_inflight;
        if (!p->proposed && r->n_inflight > 0 &&
            (r->n_inflight >= REPLICA_MAX_INFLIGHT ||
             (!bulk_train && (p->len > REPLICA_BIG_ENTRY || r->inflight_big > 0)) ||
             r->inflight_bytes + p->len > REPLICA_INFLIGHT_BYTES))
            break;
        uint64_t index = 0;
        int rc = cluster_propose(r->c, r->client_id, p->seq, p->data, p->len, &index);
        if (rc < 0) {
            if (rc != -EBUSY && rc != -EAGAIN && rc != -ENOBUFS)
                log_debug("propose seq %" PRIu64 ": %s", p->seq, strerror(-rc));
            break; /* in order: the rest waits */
        }
        log_debug("proposed seq %" PRIu64 " (%zu bytes, index %" PRIu64 ", inflight %zu/%zu)",
                  p->seq, p->len, index, r->n_inflight, r->inflight_big);
        if (!p->proposed) {
            r->n_inflight++;
            r->inflight_bytes += p->len;
            if (p->len > REPLICA_BIG_ENTRY)
                r->inflight_big++;
            if (p->len >= REPLICA_BULK_ENTRY)
                r->inflight_bulk++;
            r->proposed++;
            p->proposed_us = pb_now_us();
            r->proposed_bytes += p->len;
        }
        /* Each timer retry waits twice as long (up to 16 times the first
         * wait): a copy dropped on a full link is sent again, but a slow
         * cluster is not flooded with copies of entries still on their way
         * (a leader change re-proposes everything at once instead). */
        if (p->proposed && p->retries < REPLICA_RETRY_DOUBLINGS)
            p->retries++;
        p->proposed = true;
        p->proposed_ms = now;
        p->retry_at_ms =
                now + ((uint64_t)(index ? REPLICA_RETRY_LEADER_MS : REPLICA_RETRY_FOLLOWER_MS)
                       << p->retries);
    }
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct replica *r = arg;
    struct sm *sm = replica_sm(r);
    if (r->job != NULL && (r->job->sm != sm || sm_tree(sm) == NULL))
        job_end(r, -EAGAIN); /* its tree is gone (join, stop): later */
    set_observer(r);
    /* our pushed bytes stay until the REFS entries naming them apply, even
     * if the cluster cannot commit for longer than the collection's grace */
    if (cluster_push(r->c) != NULL)
        push_hold_collect(cluster_push(r->c), r->refs_queued > 0);
    if (r->syncs != NULL)
        sync_check(r, pb_now_ms());
    if (sm == NULL)
        return;
    if (sm_tree(sm) == NULL || fsm_tree_check_marker(sm_tree(sm)) < 0) {
        r->tree_was_bad = true;
        return;
    }
    if (r->tree_was_bad || sm != r->last_sm) {
        /* the tree is back, or a new state machine (join): what the tree
         * holds is compared with its records again */
        r->tree_was_bad = false;
        if (r->last_sm != NULL)
            watch_rescan(r->w, "");
        r->last_sm = sm;
    }
    /* A new leader, or proposals the core refused after queueing them: what
     * was in flight may be lost, propose it again now. */
    struct cluster_view v;
    cluster_view(r->c, &v);
    const char *leader = v.leader ? v.leader : "";
    uint64_t dropped = cluster_props_dropped(r->c);
    if (strcmp(leader, r->leader) != 0 || dropped != r->props_dropped) {
        snprintf(r->leader, sizeof(r->leader), "%s", leader);
        r->props_dropped = dropped; /* queued while frozen, then refused */
        for (struct rprop *p = r->head; p != NULL; p = p->next) {
            p->retry_at_ms = p->proposed_ms = 0;
            p->retries = 0;
        }
        r->progress_ms = 0;
    }
    /* Paths to look at again, once nothing of ours is in flight on them. */
    struct rdirty *d = r->dirty, *keep = NULL;
    r->dirty = NULL;
    while (d != NULL) {
        struct rdirty *next = d->next;
        if (path_busy(r, d->path)) {
            d->next = keep;
            keep = d;
        } else {
            replica_check(r, d->path, d->carry_all);
            free(d->path);
            free(d);
        }
        d = next;
    }
    while (keep != NULL) { /* back, merged with what the checks added */
        struct rdirty *next = keep->next;
        keep->next = r->dirty;
        r->dirty = keep;
        keep = next;
    }
    job_run(r);
    replica_propose_some(r, pb_now_ms());
    sync_check(r, pb_now_ms());
}

/* An op was queued or one of ours applied: what the tick would do for the
 * big file's job and the queue, at once. */
static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct replica *r = arg;
    struct sm *sm = replica_sm(r);
    /* the tick's conditions for proposing; it does the rest */
    if (sm == NULL || sm_tree(sm) == NULL || r->tree_was_bad || sm != r->last_sm)
        return;
    if (r->job != NULL && r->job->sm == sm)
        job_run(r);
    replica_propose_some(r, pb_now_ms());
}

/* ---- sync ---- */

/*
 * `sync` waits until this node and every reachable member (voters and
 * learners) have applied the target, the highest commit index the node knew
 * when asked (cluster_commit_known(): on a follower, the leader's as last
 * reported). A member whose link is down (partitioned, stopped, gone) is
 * not waited for; one that is connected but slow is. Members report their
 * applied index to every peer within a heartbeat (cluster_applied.c), so no
 * forwarding to the leader is needed. A node that knows no leader (cut off
 * from the majority) cannot know what is committed: it waits, and times
 * out saying so. behind (may be NULL) gets the members that have not caught
 * up yet, as "name (applied N)".
 */
static bool sync_reached(struct replica *r, const struct cluster_view *v, const json_t *arr,
                         uint64_t target, char *behind, size_t len)
{
    /* applied and in the tree: a big file still being written holds it */
    struct sm *sm = replica_sm(r);
    uint64_t applied = sm != NULL ? sm_materialized(sm) : v->applied;
    bool ok = applied >= target;
    if (behind != NULL && len > 0)
        behind[0] = '\0';
    size_t used = 0;
    if (!ok && behind != NULL)
        used += (size_t)snprintf(behind, len, "%s (applied %" PRIu64 ")", r->cfg->node_id, applied);
    if (v->leader == NULL)
        ok = false; /* cut off from the majority: what is committed is not known here */
    size_t i;
    json_t *m;
    json_array_foreach((json_t *)arr, i, m)
    {
        if (json_is_true(json_object_get(m, "self")) ||
            !json_is_true(json_object_get(m, "reachable")))
            continue;
        json_t *ai = json_object_get(m, "applied_index");
        if (json_is_integer(ai) && (uint64_t)json_integer_value(ai) >= target)
            continue;
        ok = false;
        if (behind != NULL && used < len) {
            const char *name = json_string_value(json_object_get(m, "id"));
            char what[48];
            if (json_is_integer(ai))
                snprintf(what, sizeof(what), "applied %" PRIu64, (uint64_t)json_integer_value(ai));
            else
                snprintf(what, sizeof(what), "no report yet");
            used += (size_t)snprintf(behind + used, len - used, "%s%s (%s)", used ? ", " : "",
                                     name ? name : "?", what);
        }
    }
    return ok;
}

static void sync_check(struct replica *r, uint64_t now)
{
    if (r->syncs == NULL)
        return;
    /* one look at the cluster for every waiting request */
    struct cluster_view v;
    cluster_view(r->c, &v);
    json_t *mj = cluster_members_json(r->c);
    const json_t *arr = json_object_get(mj, "members");
    struct rsync **pp = &r->syncs;
    while (*pp != NULL) {
        struct rsync *q = *pp;
        char behind[512];
        bool late = now >= q->deadline_ms;
        if (sync_reached(r, &v, arr, q->target, late ? behind : NULL, sizeof(behind))) {
            ctl_reply_result(q->req, json_pack("{s:I}", "index", (json_int_t)q->target));
        } else if (late && v.leader == NULL) {
            ctl_reply_error(q->req, CTL_ERR_TIMEOUT, NULL,
                            "no leader known (cut off from the majority?): cannot tell whether "
                            "index %" PRIu64 " is applied everywhere",
                            q->target);
        } else if (late) {
            ctl_reply_error(q->req, CTL_ERR_TIMEOUT, NULL,
                            "not every reachable node applied index %" PRIu64
                            " in time; behind: %s",
                            q->target, behind);
        } else {
            pp = &q->next;
            continue;
        }
        *pp = q->next;
        free(q);
    }
    json_decref(mj);
}

void replica_sync(struct replica *r, struct ctl_request *req, unsigned timeout_ms)
{
    struct rsync *q = pb_xcalloc(1, sizeof(*q));
    q->req = req;
    q->target = cluster_commit_known(r->c);
    q->deadline_ms = pb_now_ms() + timeout_ms;
    q->next = r->syncs;
    r->syncs = q;
    sync_check(r, pb_now_ms());
}

/* ---- life cycle ---- */

int replica_new(struct replica **out, const struct pb_config *cfg, struct event_base *base,
                struct cluster *c, struct pb_error *err)
{
    *out = NULL;
    struct replica *r = pb_xcalloc(1, sizeof(*r));
    r->cfg = cfg;
    r->base = base;
    r->c = c;
    r->client_id = cluster_id_self(c);
    struct sm *sm = replica_sm(r);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t us = (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    uint64_t last = sm ? sm_session_seq(sm, r->client_id) : 0;
    r->next_seq = (us > last ? us : last) + 1;
    set_observer(r);
    r->last_sm = sm;
    struct watch_options wo;
    watch_options_init(&wo);
    wo.ignore = (const char *const *)cfg->ignore;
    wo.n_ignore = cfg->n_ignore;
    r->w = watch_new(base, cfg->data_dir, &wo, on_change, r, err);
    if (r->w == NULL) {
        replica_free(r);
        return err != NULL && err->code < 0 ? err->code : -EIO;
    }
    r->tick = event_new(base, -1, EV_PERSIST, on_tick, r);
    struct timeval tv = {0, REPLICA_TICK_MS * 1000};
    event_add(r->tick, &tv);
    r->kick = event_new(base, -1, 0, on_kick, r);
    *out = r;
    return 0;
}

void replica_free(struct replica *r)
{
    if (r == NULL)
        return;
    struct sm *sm = r->c ? cluster_sm(r->c) : NULL;
    if (sm != NULL)
        sm_set_observer(sm, NULL);
    if (r->tick)
        event_free(r->tick);
    if (r->kick)
        event_free(r->kick);
    if (r->job != NULL)
        job_end(r, -ECANCELED);
    free(r->missing_path);
    free(r->push_off_path);
    watch_free(r->w);
    while (r->head != NULL) {
        struct rprop *p = r->head;
        r->head = p->next;
        prop_free(p);
    }
    while (r->dirty != NULL) {
        struct rdirty *d = r->dirty;
        r->dirty = d->next;
        free(d->path);
        free(d);
    }
    seen_clear(r);
    free(r->held);
    free(r->moves);
    free(r->move_idx);
    while (r->syncs != NULL) {
        struct rsync *q = r->syncs;
        r->syncs = q->next;
        ctl_reply_error(q->req, CTL_ERR_UNAVAILABLE, NULL, "the daemon is stopping");
        free(q);
    }
    free(r);
}

size_t replica_pending(const struct replica *r)
{
    return r->n_props + (r->job != NULL ? 1 : 0);
}

/* The manifest's totals and the applied counters (zeros without a state
 * machine), for status and metrics. */
static void tree_totals(struct replica *r, struct statedb_status *s, struct statedb_applied *a)
{
    struct sm *sm = replica_sm(r);
    memset(s, 0, sizeof(*s));
    memset(a, 0, sizeof(*a));
    if (sm != NULL) {
        statedb_status_get(sm_statedb(sm), FSM_KIND_FILE, FSM_KIND_DIR, s);
        statedb_applied_get(sm_statedb(sm), a);
    }
}

void replica_status_fill(struct replica *r, json_t *obj)
{
    struct sm *sm = replica_sm(r);
    json_t *t = json_object();
    struct statedb_status s;
    struct statedb_applied a;
    tree_totals(r, &s, &a);
    json_object_set_new(t, "files", json_integer((json_int_t)s.files));
    json_object_set_new(t, "dirs", json_integer((json_int_t)s.dirs));
    json_object_set_new(t, "bytes", json_integer((json_int_t)s.bytes));
    uint64_t fetched_chunks = 0, fetched_bytes = 0;
    if (sm != NULL)
        sm_fetch_counters(sm, &fetched_chunks, &fetched_bytes);
    json_object_set_new(t, "chunks_missing", json_integer((json_int_t)s.missing));
    json_object_set_new(t, "chunk_bytes_missing", json_integer((json_int_t)s.missing_bytes));
    json_object_set_new(t, "fetched_chunks", json_integer((json_int_t)fetched_chunks));
    json_object_set_new(t, "fetched_bytes", json_integer((json_int_t)fetched_bytes));
    json_object_set_new(t, "pending", json_integer((json_int_t)replica_pending(r)));
    json_object_set_new(t, "writing", json_integer((json_int_t)(sm ? sm_writing(sm) : 0)));
    json_object_set_new(t, "conflicts", json_integer((json_int_t)a.conflicts));
    json_object_set_new(t, "proposed", json_integer((json_int_t)r->proposed));
    json_object_set_new(t, "proposed_bytes", json_integer((json_int_t)r->proposed_bytes));
    json_object_set_new(t, "skipped", json_integer((json_int_t)r->skipped));
    json_object_set_new(t, "pushed_files", json_integer((json_int_t)r->pushed_files));
    json_object_set_new(t, "push_fallbacks", json_integer((json_int_t)r->push_fallbacks));
    const char *te = sm ? sm_tree_error(sm) : NULL;
    json_object_set_new(t, "tree_error", te ? json_string(te) : json_null());
    json_object_set_new(t, "last_error",
                        r->last_error[0] ? json_string(r->last_error) : json_null());
    json_object_set_new(obj, "tree", t);
}

void replica_metrics_get(struct replica *r, struct replica_metrics *m)
{
    memset(m, 0, sizeof(*m));
    struct statedb_status s;
    struct statedb_applied a;
    tree_totals(r, &s, &a);
    m->files = s.files;
    m->dirs = s.dirs;
    m->bytes = s.bytes;
    m->chunks_missing = s.missing;
    m->chunk_bytes_missing = s.missing_bytes;
    struct sm *sm = replica_sm(r);
    m->writing = sm != NULL ? sm_writing(sm) : 0;
    m->conflicts = a.conflicts;
    m->pending = replica_pending(r); /* as status says: a big file being read counts */
    m->proposed = r->proposed;
    m->applied = r->applied;
    m->lost = r->lost;
    m->chunks_sent = r->chunks_sent;
    m->chunks_dedup = r->chunks_dedup;
    m->latency = r->latency;
    watch_get_stats(r->w, &m->watch);
}

static int conflict_row(void *arg, const char *path, const struct statedb_row *row)
{
    json_t *arr = arg;
    if (row->deleted || strstr(path, ".pickbox-conflict-") == NULL)
        return 0;
    json_array_append_new(arr, json_pack("{s:s,s:s,s:I}", "path", path, "node", row->origin,
                                         "index", (json_int_t)row->content_version));
    return 0;
}

json_t *replica_conflicts_json(struct replica *r)
{
    json_t *arr = json_array();
    struct sm *sm = replica_sm(r);
    if (sm != NULL)
        statedb_row_foreach(sm_statedb(sm), conflict_row, arr);
    return json_pack("{s:o}", "conflicts", arr);
}
