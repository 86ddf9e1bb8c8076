/*
 * sm.c: the node's state machine: Raft entries -> fsm_apply over state.db
 * and the tree; snapshots from statedb's stream (see sm.h).
 */
#include <config.h>

#include "daemon/sm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "fsm/bigwrite.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "store/statedb.h"

#define SM_SNAP_MAGIC 0x50425332u /* "PBS2" */
#define SM_SNAP_HDR   20u
#define SM_SNAP_IO    (64u * 1024u) /* bytes per write while taking a snapshot */

struct sm {
    char *state_dir;
    char *data_dir;
    struct statedb *db;
    struct fsm_tree *tree; /* NULL while tree_error */
    struct fsm_apply *ap;  /* NULL while tree_error */
    uint64_t applied;
    uint64_t applied_term;
    char tree_error[512]; /* "" = fine */
    uint64_t tree_failures;
    struct sm_observer obs;
    bool has_obs;
    int snap_fd; /* the current snapshot's file (snapshot.pbs), -1: none */
    uint64_t snap_len;
    uint64_t snap_index;
    bool chunks_wanted;      /* chunk bytes may be missing: the fetcher should look */
    struct event_base *base; /* sm_set_loop(); NULL: big files are written in the apply */
    struct fsm_bigwrite *bw; /* the background writer of big files (with ap) */
    struct event *bw_ev;     /* its eventfd */
    uint64_t bw_min;         /* files of at least this many bytes go to it; 0: none */
    uint64_t fetched_chunks, fetched_bytes;
};

static int sm_reload_applied(struct sm *sm)
{
    struct statedb_applied a;
    int rc = statedb_applied_get(sm->db, &a);
    if (rc < 0)
        return rc;
    sm->applied = a.index;
    sm->applied_term = a.term;
    return 0;
}

/* What the background writes that ended since the last look mean for the
 * node: bytes to fetch, or a tree to repair (returned). */
static bool sm_bigwrite_outcome(struct sm *sm)
{
    struct fsm_bigwrite_stats st;
    if (sm->bw == NULL)
        return false;
    fsm_bigwrite_take_stats(sm->bw, &st);
    if (st.nodata > 0)
        sm->chunks_wanted = true;
    if (st.failed > 0)
        sm->tree_failures += st.failed;
    return st.failed > 0;
}

/* Finishes, on the loop, the big files the worker has written: the
 * check, rename and directory fsync, and their records in one state.db
 * transaction after them. */
static void sm_on_bigwrite(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct sm *sm = arg;
    if (sm->bw == NULL || sm->ap == NULL)
        return;
    struct fsm_disk disk;
    fsm_apply_bind_disk(sm->ap, &disk);
    bool txn = statedb_begin(sm->db) == 0;
    int rc = fsm_bigwrite_complete(sm->bw, &disk);
    if (rc < 0)
        log_warning("state.db: big file records: %s", statedb_errmsg(sm->db));
    if (txn && statedb_commit(sm->db) < 0)
        log_warning("state.db: big file records: %s", statedb_errmsg(sm->db));
    if (sm_bigwrite_outcome(sm) || rc < 0)
        sm_repair(sm);
}

/* Waits for every background write and completes it (before a repair or a
 * snapshot install, which must see the tree as the writes leave it). */
static void sm_drain_bigwrite(struct sm *sm)
{
    if (sm->bw == NULL || fsm_bigwrite_count(sm->bw) == 0)
        return;
    struct fsm_disk disk;
    fsm_apply_bind_disk(sm->ap, &disk);
    bool txn = statedb_begin(sm->db) == 0;
    if (fsm_bigwrite_drain(sm->bw, &disk) < 0)
        log_warning("state.db: big file records: %s", statedb_errmsg(sm->db));
    if (txn && statedb_commit(sm->db) < 0)
        log_warning("state.db: big file records: %s", statedb_errmsg(sm->db));
    sm_bigwrite_outcome(sm); /* the caller repairs anyway */
}

/* With a loop and an applier: the background writer (doc/fsm.md, "Big
 * files"). Without one, big files are written during the apply, as small
 * ones are. */
static void sm_start_bigwrite(struct sm *sm)
{
    if (sm->bw != NULL || sm->base == NULL || sm->ap == NULL || sm->bw_min == 0)
        return;
    struct pb_error err;
    char *path = pb_xasprintf("%s/%s", sm->state_dir, SM_DB_NAME);
    int rc = fsm_bigwrite_new(sm->tree, path, sm->bw_min, &sm->bw, &err);
    free(path);
    if (rc < 0) {
        log_warning("big files will be written during the apply: %s", err.msg);
        return;
    }
    fsm_bigwrite_set_hold(sm->bw, getenv("PICKBOX_TEST_BIGWRITE_HOLD"));
    sm->bw_ev =
            event_new(sm->base, fsm_bigwrite_fd(sm->bw), EV_READ | EV_PERSIST, sm_on_bigwrite, sm);
    event_add(sm->bw_ev, NULL);
    fsm_apply_set_bigwrite(sm->ap, sm->bw);
}

/* Opens the tree (and the applier on it). fresh: state.db knows nothing yet,
 * so an unmarked directory may be marked. */
static int sm_open_tree(struct sm *sm, bool fresh, struct pb_error *err)
{
    struct pb_error e2;
    pb_error_clear(&e2);
    if (fresh && mkdir(sm->data_dir, 0755) == 0)
        log_info("created the tree %s", sm->data_dir);
    int rc = fsm_tree_open(sm->data_dir, &sm->tree, &e2);
    if (rc == -FSM_TREE_ENOMARKER && fresh) {
        if ((rc = fsm_tree_init(sm->data_dir, &e2)) == 0)
            rc = fsm_tree_open(sm->data_dir, &sm->tree, &e2);
    }
    if (rc == -FSM_TREE_ENOMARKER) {
        snprintf(sm->tree_error, sizeof(sm->tree_error),
                 "the tree %s has lost its .pickbox marker (unmounted or replaced?): "
                 "not replicating until it is back",
                 sm->data_dir);
        return 0;
    }
    if (rc < 0)
        return pb_error_set(err, rc, "%s", e2.msg);
    sm->ap = fsm_apply_new(sm->db, sm->tree);
    sm->tree_error[0] = '\0';
    sm_start_bigwrite(sm);
    return 0;
}

static void sm_close_tree(struct sm *sm)
{
    /* the worker stops first: its temps go, the paths stay behind the
     * index for the next repair */
    if (sm->bw_ev != NULL)
        event_free(sm->bw_ev);
    sm->bw_ev = NULL;
    if (sm->ap != NULL)
        fsm_apply_set_bigwrite(sm->ap, NULL);
    fsm_bigwrite_free(sm->bw);
    sm->bw = NULL;
    fsm_apply_free(sm->ap);
    sm->ap = NULL;
    fsm_tree_close(sm->tree);
    sm->tree = NULL;
}

int sm_repair(struct sm *sm)
{
    if (sm->ap == NULL)
        return -FSM_TREE_ENOMARKER;
    unsigned repaired = 0, pending = 0;
    sm_drain_bigwrite(sm);
    int rc = fsm_apply_repair(sm->ap, &repaired, &pending);
    if (repaired || pending)
        log_info("tree repair: %u path(s) brought up to date, %u local edit(s) pending", repaired,
                 pending);
    if (rc < 0) {
        sm->tree_failures++;
        log_warning("tree repair failed: %s", strerror(-rc));
        if (rc == -FSM_TREE_ENOMARKER) {
            sm_close_tree(sm);
            snprintf(sm->tree_error, sizeof(sm->tree_error),
                     "the tree %s has lost its .pickbox marker (unmounted or replaced?): "
                     "not replicating until it is back",
                     sm->data_dir);
            log_err("%s", sm->tree_error);
        }
    }
    return rc;
}

/* The tree must be there before anything is applied: retried by every
 * sm_apply() while in error. */
static int sm_need_tree(struct sm *sm, struct pb_error *err)
{
    if (sm->ap != NULL)
        return 0;
    int rc = sm_open_tree(sm, false, err);
    if (rc < 0)
        return rc;
    if (sm->ap == NULL)
        return pb_error_set(err, -ENOMEDIUM, "%s", sm->tree_error);
    log_notice("the tree %s is back: resuming", sm->data_dir);
    sm_repair(sm);
    return 0;
}

/* Starts <state_dir>/snapshot.pbs.tmp; *tmp is the caller's. */
static int sm_snap_file_open(struct sm *sm, char **tmp, struct pb_error *err)
{
    *tmp = pb_xasprintf("%s/%s.tmp", sm->state_dir, SM_SNAP_NAME);
    int fd = open(*tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return pb_error_set(err, -errno, "%s: %s", *tmp, strerror(errno));
    return fd;
}

/* Makes the written temp file the current snapshot, durably (fsync, rename,
 * fsync of the directory); fd stays open for reading it. rc: the writing's
 * result. On failure fd is closed, the temp file removed and the current
 * snapshot kept. Frees tmp. */
static int sm_snap_file_commit(struct sm *sm, int fd, char *tmp, uint64_t index, uint64_t len,
                               int rc, struct pb_error *err)
{
    char *path = pb_xasprintf("%s/%s", sm->state_dir, SM_SNAP_NAME);
    if (rc < 0)
        rc = pb_error_set(err, rc, "%s: write: %s", tmp, strerror(-rc));
    else if (fsync(fd) < 0)
        rc = pb_error_set(err, -errno, "%s: fsync: %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) < 0)
        rc = pb_error_set(err, -errno, "rename %s: %s", tmp, strerror(errno));
    if (rc == 0) {
        int dfd = open(sm->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            if (fsync(dfd) < 0)
                rc = pb_error_set(err, -errno, "fsync %s: %s", sm->state_dir, strerror(errno));
            close(dfd);
        }
    }
    if (rc < 0) {
        close(fd);
        unlink(tmp);
    } else {
        if (sm->snap_fd >= 0)
            close(sm->snap_fd);
        sm->snap_fd = fd;
        sm->snap_len = len;
        sm->snap_index = index;
    }
    free(path);
    free(tmp);
    return rc;
}

/* The stream format of a blob: its first record is the header
 * (u32 len, 'H', "PBSD", u32 format); 0 if it is not one. */
static uint32_t sm_snap_stream_format(const uint8_t *p, size_t len)
{
    if (len < SM_SNAP_HDR + 13 || p[SM_SNAP_HDR + 4] != 'H' ||
        memcmp(p + SM_SNAP_HDR + 5, "PBSD", 4) != 0)
        return 0;
    return pb_load_u32(p + SM_SNAP_HDR + 9);
}

/* Loads <state_dir>/snapshot.pbs if it is a snapshot state.db has reached.
 * Returns true if it is one of an older stream format (to be taken again:
 * peers would refuse it). */
static bool sm_snap_file_load(struct sm *sm)
{
    char *path = pb_xasprintf("%s/%s", sm->state_dir, SM_SNAP_NAME);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    uint8_t hdr[SM_SNAP_HDR + 13];
    bool old = false;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size < (off_t)sizeof(hdr) ||
        pread(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr)) {
        if (fd >= 0)
            log_info("ignoring %s (too short)", path);
    } else if (pb_load_u32(hdr) != SM_SNAP_MAGIC || pb_load_u64(hdr + 4) > sm->applied) {
        log_info("ignoring %s (not a snapshot of this state.db)", path);
    } else if (sm_snap_stream_format(hdr, sizeof(hdr)) != STATEDB_SNAP_FORMAT) {
        log_notice("%s has snapshot stream format %" PRIu32 " (this pickbox sends format %d): "
                   "taking a new snapshot",
                   path, sm_snap_stream_format(hdr, sizeof(hdr)), STATEDB_SNAP_FORMAT);
        old = true;
    } else {
        sm->snap_fd = fd;
        sm->snap_len = (uint64_t)st.st_size;
        sm->snap_index = pb_load_u64(hdr + 4);
        fd = -1;
    }
    if (fd >= 0)
        close(fd);
    free(path);
    return old;
}

int sm_open(struct sm **out, const char *state_dir, const char *data_dir, struct pb_error *err)
{
    *out = NULL;
    struct sm *sm = pb_xcalloc(1, sizeof(*sm));
    sm->snap_fd = -1;
    sm->bw_min = FSM_BIGWRITE_MIN_BYTES;
    const char *bw = getenv("PICKBOX_TEST_BIGWRITE_BYTES"); /* tests: smaller files; 0: off */
    if (bw != NULL && pb_parse_u64(bw, 0, UINT64_MAX, &sm->bw_min) < 0)
        sm->bw_min = FSM_BIGWRITE_MIN_BYTES;
    sm->state_dir = pb_xstrdup(state_dir);
    sm->data_dir = pb_xstrdup(data_dir);
    char *path = pb_xasprintf("%s/%s", state_dir, SM_DB_NAME);
    int rc = statedb_open(path, &sm->db, err);
    free(path);
    if (rc < 0)
        goto fail;
    if ((rc = sm_reload_applied(sm)) < 0) {
        pb_error_set(err, rc, "state.db: %s", statedb_errmsg(sm->db));
        goto fail;
    }
    if ((rc = sm_open_tree(sm, sm->applied == 0, err)) < 0)
        goto fail;
    if (sm->ap == NULL)
        log_err("%s", sm->tree_error);
    else
        sm_repair(sm);
    if (sm_snap_file_load(sm) && sm->applied > 0) {
        struct pb_error e2;
        uint64_t size = 0;
        if (sm_snapshot_take(sm, 0, &size, &e2) < 0)
            log_warning("cannot take a new snapshot: %s", e2.msg);
    }
    sm->chunks_wanted = true; /* a snapshot installed before a restart */
    *out = sm;
    return 0;
fail:
    sm_close(sm);
    return rc;
}

void sm_close(struct sm *sm)
{
    if (sm == NULL)
        return;
    sm_close_tree(sm);
    if (sm->db != NULL && statedb_sync(sm->db) < 0)
        log_warning("state.db: %s", statedb_errmsg(sm->db));
    statedb_close(sm->db);
    if (sm->snap_fd >= 0)
        close(sm->snap_fd);
    free(sm->state_dir);
    free(sm->data_dir);
    free(sm);
}

void sm_set_observer(struct sm *sm, const struct sm_observer *obs)
{
    sm->has_obs = obs != NULL;
    if (obs != NULL)
        sm->obs = *obs;
    else
        memset(&sm->obs, 0, sizeof(sm->obs));
}

uint64_t sm_applied(const struct sm *sm)
{
    return sm->applied;
}

void sm_set_loop(struct sm *sm, struct event_base *base)
{
    if (sm->base == base)
        return;
    if (sm->bw != NULL) { /* another loop: a new writer on it */
        sm_drain_bigwrite(sm);
        event_free(sm->bw_ev);
        sm->bw_ev = NULL;
        fsm_apply_set_bigwrite(sm->ap, NULL);
        fsm_bigwrite_free(sm->bw);
        sm->bw = NULL;
    }
    sm->base = base;
    sm_start_bigwrite(sm);
}

uint64_t sm_materialized(const struct sm *sm)
{
    uint64_t oldest = sm->bw != NULL ? fsm_bigwrite_oldest(sm->bw) : 0;
    return oldest > 0 && oldest - 1 < sm->applied ? oldest - 1 : sm->applied;
}

size_t sm_writing(const struct sm *sm)
{
    return sm->bw != NULL ? fsm_bigwrite_count(sm->bw) : 0;
}

uint64_t sm_session_seq(const struct sm *sm, uint64_t client_id)
{
    uint64_t seq = 0;
    if (statedb_session_get(sm->db, client_id, &seq) < 0)
        return 0;
    return seq;
}

struct statedb *sm_statedb(struct sm *sm)
{
    return sm->db;
}

struct fsm_tree *sm_tree(struct sm *sm)
{
    return sm->tree;
}

struct fsm_apply *sm_fsm(struct sm *sm)
{
    return sm->ap;
}

const char *sm_tree_error(const struct sm *sm)
{
    return sm->tree_error[0] ? sm->tree_error : NULL;
}

uint64_t sm_tree_failures(const struct sm *sm)
{
    return sm->tree_failures;
}

/* A NORMAL entry that is an fsm op (not a probe). */
static bool sm_is_op(const struct raft_entry *e)
{
    return e->type == RAFT_ENTRY_NORMAL && e->len > 0 && e->data != NULL && e->data[0] != 0;
}

static bool sm_own(const struct sm *sm, const struct raft_entry *e)
{
    return sm->has_obs && sm->obs.client_id != 0 && e->client_id == sm->obs.client_id &&
           sm_is_op(e);
}

int sm_apply(struct sm *sm, const struct raft_entry *e, size_t n, sm_applied_fn cb, void *arg,
             struct pb_error *err)
{
    size_t i0 = 0;
    while (i0 < n && e[i0].index <= sm->applied)
        i0++;
    if (i0 == n)
        return 0;
    if (e[i0].index != sm->applied + 1)
        return pb_error_set(err, -EINVAL, "state machine: entry %" PRIu64 " after applied %" PRIu64,
                            e[i0].index, sm->applied);
    int rc = sm_need_tree(sm, err);
    if (rc < 0)
        return rc;
    if ((rc = fsm_tree_check_marker(sm->tree)) < 0) {
        sm_repair(sm); /* notices the marker and stops */
        return pb_error_set(err, -ENOMEDIUM, "%s",
                            sm->tree_error[0] ? sm->tree_error : "tree marker missing");
    }
    size_t m = n - i0;
    struct fsm_apply_input *in = pb_xcalloc(m, sizeof(*in));
    struct fsm_apply_result *res = pb_xcalloc(m, sizeof(*res));
    bool has_op = false;
    for (size_t i = 0; i < m; i++) {
        const struct raft_entry *x = &e[i0 + i];
        in[i].index = x->index;
        in[i].term = x->term;
        if (sm_is_op(x)) {
            has_op = true;
            in[i].client_id = x->client_id;
            in[i].seq = x->seq;
            in[i].data = x->data;
            in[i].len = x->len;
        }
        if (sm_own(sm, x) && sm->obs.before != NULL)
            sm->obs.before(sm->obs.arg, x);
    }
    if (sm->has_obs && sm->obs.batch_before != NULL)
        sm->obs.batch_before(sm->obs.arg, e + i0, m);
    /* A batch without fsm ops (probes, NOOP and CONF entries) changes only
     * the applied index and counters and nothing in the tree: its commit
     * may be lazy (no fsync). After a power loss state.db may be back at an
     * earlier index, and the same entries, still in raft.db (sm_snapshot_take
     * syncs before raft.db is compacted), are applied again to the same
     * effect. A batch with ops stays durable: its effects reach the tree,
     * which must never be ahead of durable state.db (doc/decisions.md D8). */
    statedb_set_lazy(sm->db, !has_op);
    if (sm->bw != NULL)
        fsm_bigwrite_set_index(sm->bw, e[i0].index);
    rc = fsm_apply_entries(sm->ap, in, m, res, err);
    statedb_set_lazy(sm->db, false);
    if (rc < 0) {
        if (rc != -EPROTONOSUPPORT)
            sm_reload_applied(sm);
        if (sm->has_obs && sm->obs.batch_after != NULL)
            sm->obs.batch_after(sm->obs.arg, e + i0, m, NULL);
        goto out;
    }
    sm->applied = e[n - 1].index;
    sm->applied_term = e[n - 1].term;
    /* jobs settled by this batch's ops (bigwrite.h) that could not write */
    bool repair = sm_bigwrite_outcome(sm);
    for (size_t i = 0; i < m; i++) {
        const struct raft_entry *x = &e[i0 + i];
        if (res[i].tree_rc == -ENODATA)
            sm->chunks_wanted = true; /* bytes of an older chunk not here yet */
        if (res[i].tree_rc < 0) {
            sm->tree_failures++;
            log_warning("entry %" PRIu64 ": the tree could not follow: %s", x->index,
                        strerror(-res[i].tree_rc));
            repair = true;
        }
        if (sm_own(sm, x)) {
            /* Lost (conflict) or dropped (an edit beat our delete, our
             * rename's source was gone): the tree is brought back to the
             * index, the local bytes being in a copy or re-proposed. */
            if (res[i].conflicts > 0 ||
                (res[i].status == FSM_APPLY_DONE && res[i].outcome == FSM_OUT_NOOP))
                repair = true;
            if (sm->obs.after != NULL)
                sm->obs.after(sm->obs.arg, x, &res[i]);
        }
    }
    if (repair)
        sm_repair(sm);
    if (sm->has_obs && sm->obs.batch_after != NULL)
        sm->obs.batch_after(sm->obs.arg, e + i0, m, res);
    for (size_t i = 0; i < m && cb != NULL; i++) {
        const struct raft_entry *x = &e[i0 + i];
        if (x->type != RAFT_ENTRY_NORMAL || x->client_id == 0)
            continue;
        if (res[i].status == FSM_APPLY_DUPLICATE)
            continue;
        cb(arg, x);
    }
out:
    free(in);
    free(res);
    return rc;
}

int sm_snapshot_take(struct sm *sm, uint64_t term, uint64_t *size, struct pb_error *err)
{
    /* The caller compacts raft.db's log up to the snapshot: everything
     * applied so far must be durable first, or a power loss could leave
     * state.db behind a log that no longer holds the entries to redo. */
    int rc = statedb_sync(sm->db);
    if (rc < 0)
        return pb_error_set(err, rc, "state.db: %s", statedb_errmsg(sm->db));
    struct statedb_snapshot *s = NULL;
    rc = statedb_snapshot_begin(sm->db, &s, err);
    if (rc < 0)
        return rc;
    uint64_t index = 0, sterm = 0;
    statedb_snapshot_info(s, &index, &sterm);
    /* The blob says the term Raft knows the snapshot by (the caller's: the
     * term of the entry at the applied index, which state.db also holds). */
    if (term != 0)
        sterm = term;
    /* Streamed to the file: memory stays bounded whatever the state's size. */
    char *tmp = NULL;
    int fd = sm_snap_file_open(sm, &tmp, err);
    if (fd < 0) {
        statedb_snapshot_end(s);
        free(tmp);
        return fd;
    }
    uint8_t *chunk = pb_xmalloc(SM_SNAP_IO);
    pb_store_u32(chunk, SM_SNAP_MAGIC);
    pb_store_u64(chunk + 4, index);
    pb_store_u64(chunk + 12, sterm);
    int wrc = pb_write_all(fd, chunk, SM_SNAP_HDR);
    uint64_t off = 0;
    while (wrc == 0) {
        size_t got = 0;
        rc = statedb_snapshot_read(s, off, chunk, SM_SNAP_IO, &got, err);
        if (rc < 0)
            break;
        wrc = pb_write_all(fd, chunk, got);
        off += got;
        if (got < SM_SNAP_IO)
            break;
    }
    free(chunk);
    statedb_snapshot_end(s);
    if (rc < 0) {
        close(fd);
        unlink(tmp);
        free(tmp);
        return rc;
    }
    rc = sm_snap_file_commit(sm, fd, tmp, index, SM_SNAP_HDR + off, wrc, err);
    if (rc < 0)
        return rc;
    *size = sm->snap_len;
    return 0;
}

uint64_t sm_snapshot_index(const struct sm *sm)
{
    return sm->snap_fd >= 0 ? sm->snap_index : 0;
}

uint64_t sm_snapshot_size(const struct sm *sm)
{
    return sm->snap_fd >= 0 ? sm->snap_len : 0;
}

int sm_snapshot_read(const struct sm *sm, uint64_t offset, void *buf, size_t len, size_t *n)
{
    *n = 0;
    if (sm->snap_fd < 0)
        return -ENOENT;
    if (offset >= sm->snap_len)
        return 0;
    len = (size_t)PB_MIN((uint64_t)len, sm->snap_len - offset);
    uint8_t *p = buf;
    while (*n < len) {
        ssize_t r = pread(sm->snap_fd, p + *n, len - *n, (off_t)(offset + *n));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -EIO; /* the file is shorter than it was */
        *n += (size_t)r;
    }
    return 0;
}

int sm_snapshot_install(struct sm *sm, uint64_t index, uint64_t term, const uint8_t *data,
                        size_t len, struct pb_error *err)
{
    if (len < SM_SNAP_HDR || pb_load_u32(data) != SM_SNAP_MAGIC || pb_load_u64(data + 4) != index ||
        pb_load_u64(data + 12) != term)
        return pb_error_set(err, -EINVAL, "snapshot %" PRIu64 "/%" PRIu64 " is malformed", index,
                            term);
    /* the jobs read chunks the install may replace: finished first */
    if (sm->ap != NULL)
        sm_drain_bigwrite(sm);
    struct statedb_install *in = NULL;
    int rc = statedb_install_begin(sm->db, &in, err);
    if (rc < 0)
        return rc;
    uint64_t s_index = 0, s_term = 0;
    rc = statedb_install_write(in, data + SM_SNAP_HDR, len - SM_SNAP_HDR, err);
    if (rc == 0)
        rc = statedb_install_finish(in, &s_index, &s_term, err);
    statedb_install_abort(in);
    if (rc == -EBADMSG)
        rc = -EINVAL;
    if (rc < 0)
        return rc;
    sm_reload_applied(sm);
    if (s_index != index)
        log_warning("snapshot %" PRIu64 " holds state at %" PRIu64, index, s_index);
    sm->applied = index;
    sm->chunks_wanted = true;
    char *tmp = NULL;
    int fd = sm_snap_file_open(sm, &tmp, err);
    if (fd < 0) {
        free(tmp);
        return fd;
    }
    rc = sm_snap_file_commit(sm, fd, tmp, index, len, pb_write_all(fd, data, len), err);
    if (rc < 0)
        return rc;
    if (sm->ap != NULL)
        sm_repair(sm);
    return 0;
}

bool sm_chunks_wanted(struct sm *sm)
{
    bool w = sm->chunks_wanted;
    sm->chunks_wanted = false;
    return w;
}

int sm_chunk_store(struct sm *sm, const struct statedb_chunk_in *in, size_t n)
{
    uint64_t chunks = 0, bytes = 0;
    for (size_t i = 0; i < n; i++) {
        int had = statedb_chunk_data_has(sm->db, in[i].id);
        if (had < 0)
            return had;
        if (!had) {
            chunks++;
            bytes += in[i].len;
        }
    }
    int rc = statedb_chunk_data_put_many(sm->db, in, n);
    if (rc == 0) {
        sm->fetched_chunks += chunks;
        sm->fetched_bytes += bytes;
    }
    return rc;
}

void sm_fetch_counters(const struct sm *sm, uint64_t *chunks, uint64_t *bytes)
{
    *chunks = sm->fetched_chunks;
    *bytes = sm->fetched_bytes;
}
