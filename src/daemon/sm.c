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

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "raft/raft.h"
#include "store/statedb.h"

#define SM_SNAP_MAGIC 0x50425332u /* "PBS2" */
#define SM_SNAP_HDR   20u

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
    uint8_t *snap; /* current snapshot blob */
    size_t snap_len;
    uint64_t snap_index;
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
    return 0;
}

static void sm_close_tree(struct sm *sm)
{
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

static int sm_snap_file_write(struct sm *sm, struct pb_error *err)
{
    char *path = pb_xasprintf("%s/%s", sm->state_dir, SM_SNAP_NAME);
    char *tmp = pb_xasprintf("%s.tmp", path);
    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        rc = pb_error_set(err, -errno, "%s: %s", tmp, strerror(errno));
        goto out;
    }
    size_t off = 0;
    while (off < sm->snap_len) {
        ssize_t w = write(fd, sm->snap + off, sm->snap_len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            rc = pb_error_set(err, w < 0 ? -errno : -EIO, "%s: write failed", tmp);
            break;
        }
        off += (size_t)w;
    }
    if (rc == 0 && fsync(fd) < 0)
        rc = pb_error_set(err, -errno, "%s: fsync: %s", tmp, strerror(errno));
    close(fd);
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
    if (rc < 0)
        unlink(tmp);
out:
    free(tmp);
    free(path);
    return rc;
}

/* Loads <state_dir>/snapshot.pbs if it is a snapshot state.db has reached. */
static void sm_snap_file_load(struct sm *sm)
{
    char *path = pb_xasprintf("%s/%s", sm->state_dir, SM_SNAP_NAME);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size < (off_t)SM_SNAP_HDR) {
        if (fd >= 0)
            close(fd);
        free(path);
        return;
    }
    size_t len = (size_t)st.st_size;
    uint8_t *p = pb_xmalloc(len);
    size_t off = 0;
    while (off < len) {
        ssize_t r = read(fd, p + off, len - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    close(fd);
    uint64_t index = pb_load_u64(p + 4);
    if (off != len || pb_load_u32(p) != SM_SNAP_MAGIC || index > sm->applied) {
        log_info("ignoring %s (not a snapshot of this state.db)", path);
        free(p);
    } else {
        sm->snap = p;
        sm->snap_len = len;
        sm->snap_index = index;
    }
    free(path);
}

int sm_open(struct sm **out, const char *state_dir, const char *data_dir, struct pb_error *err)
{
    *out = NULL;
    struct sm *sm = pb_xcalloc(1, sizeof(*sm));
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
    sm_snap_file_load(sm);
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
    free(sm->snap);
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
    bool repair = false;
    for (size_t i = 0; i < m; i++) {
        const struct raft_entry *x = &e[i0 + i];
        if (res[i].tree_rc < 0) {
            sm->tree_failures++;
            log_warning("entry %" PRIu64 ": the tree could not follow: %s", x->index,
                        strerror(-res[i].tree_rc));
            repair = true;
        }
        if (sm_own(sm, x)) {
            if (res[i].conflicts > 0)
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
    rc = statedb_snapshot_begin(sm->db, NULL, NULL, &s, err);
    if (rc < 0)
        return rc;
    uint64_t index = 0, sterm = 0;
    statedb_snapshot_info(s, &index, &sterm);
    /* The blob says the term Raft knows the snapshot by (the caller's: the
     * term of the entry at the applied index, which state.db also holds). */
    if (term != 0)
        sterm = term;
    struct buf b = BUF_INIT;
    buf_put_u32(&b, SM_SNAP_MAGIC);
    buf_put_u64(&b, index);
    buf_put_u64(&b, sterm);
    uint8_t chunk[65536];
    uint64_t off = 0;
    for (;;) {
        size_t got = 0;
        rc = statedb_snapshot_read(s, off, chunk, sizeof(chunk), &got, err);
        if (rc < 0)
            break;
        buf_put(&b, chunk, got);
        off += got;
        if (got < sizeof(chunk))
            break;
    }
    statedb_snapshot_end(s);
    if (rc < 0) {
        buf_free(&b);
        return rc;
    }
    uint8_t *old = sm->snap;
    size_t old_len = sm->snap_len;
    uint64_t old_index = sm->snap_index;
    sm->snap = buf_steal(&b, &sm->snap_len);
    sm->snap_index = index;
    rc = sm_snap_file_write(sm, err);
    if (rc < 0) {
        free(sm->snap);
        sm->snap = old;
        sm->snap_len = old_len;
        sm->snap_index = old_index;
        return rc;
    }
    free(old);
    *size = sm->snap_len;
    return 0;
}

uint64_t sm_snapshot_index(const struct sm *sm)
{
    return sm->snap != NULL ? sm->snap_index : 0;
}

const uint8_t *sm_snapshot_data(const struct sm *sm, size_t *len)
{
    *len = sm->snap_len;
    return sm->snap;
}

int sm_snapshot_install(struct sm *sm, uint64_t index, uint64_t term, const uint8_t *data,
                        size_t len, struct pb_error *err)
{
    if (len < SM_SNAP_HDR || pb_load_u32(data) != SM_SNAP_MAGIC || pb_load_u64(data + 4) != index ||
        pb_load_u64(data + 12) != term)
        return pb_error_set(err, -EINVAL, "snapshot %" PRIu64 "/%" PRIu64 " is malformed", index,
                            term);
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
    uint8_t *old = sm->snap;
    sm->snap = pb_xmalloc(len);
    memcpy(sm->snap, data, len);
    sm->snap_len = len;
    sm->snap_index = index;
    free(old);
    rc = sm_snap_file_write(sm, err);
    if (rc < 0)
        return rc;
    if (sm->ap != NULL)
        sm_repair(sm);
    return 0;
}
