/*
 * store.c: raft.db's lifetime: open (lock, schema, validation, the two
 * connections, the completion event, the storage thread), close, health and
 * retry.
 *
 * schema.c holds the schema, format and startup checks; read.c the loop
 * thread's reads; commit.c the write path and the storage thread;
 * faultvfs.c the fault-injection VFS.
 */
#include "config.h"

#include "store/store.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/store_int.h"

#define STORE_BUSY_TIMEOUT_MS 5000

/* Per-connection settings, both connections. */
static int store_setup_conn(sqlite3 *db, bool writer, struct pb_error *err)
{
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, STORE_BUSY_TIMEOUT_MS);
    int rc = store_exec(db,
                        "PRAGMA trusted_schema = OFF;"
                        "PRAGMA cell_size_check = ON;"
                        "PRAGMA foreign_keys = OFF;"
                        "PRAGMA temp_store = MEMORY;"
                        "PRAGMA cache_size = -16384;",
                        err);
    if (rc < 0)
        return rc;
    if (writer)
        /* FULL: the WAL is synced at every commit; NORMAL could lose a vote
         * or an acknowledged entry on power loss. The WAL is truncated back
         * to 64 MiB after checkpoints (commit.c runs them, not autocheckpoint).
         * secure_delete FAST: Debian's SQLite zeroes every freed page by
         * default, so compacting the log read and wrote every byte of every
         * entry once more (WAL and checkpoint); FAST only clears freed cells
         * inside pages that are written anyway. Not about durability: the
         * bytes of compacted entries are copies of what the tree holds. */
        return store_exec(db,
                          "PRAGMA synchronous = FULL;"
                          "PRAGMA journal_size_limit = 67108864;"
                          "PRAGMA secure_delete = FAST;",
                          err);
    return store_exec(db, "PRAGMA query_only = ON;", err);
}

int store_open_writer(struct store *s, struct pb_error *err)
{
    int rc = sqlite3_open_v2(s->path, &s->w,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             store_fault_vfs_name(s->fvfs));
    if (rc != SQLITE_OK) {
        rc = store_sql_error(s->w, rc, err, "open");
        sqlite3_close(s->w);
        s->w = NULL;
        return rc;
    }
    rc = store_setup_conn(s->w, true, err);
    if (rc < 0) {
        sqlite3_close(s->w);
        s->w = NULL;
    }
    return rc;
}

static void store_on_event(evutil_socket_t fd, short what, void *arg)
{
    struct store *s = arg;
    uint64_t v;
    (void)what;
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_warning("store: eventfd read: %s", strerror(errno));
    pthread_mutex_lock(&s->mu);
    struct store_completion *done = s->done;
    size_t n = s->n_done;
    s->done = NULL;
    s->n_done = s->cap_done = 0;
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < n; i++)
        if (s->on_complete != NULL)
            s->on_complete(s->arg, &done[i]);
    free(done);
}

static void store_free(struct store *s)
{
    if (s->ev != NULL)
        event_free(s->ev);
    if (s->efd >= 0)
        close(s->efd);
    sqlite3_close(s->r);
    sqlite3_close(s->w);
    store_fault_vfs_free(s->fvfs);
    /* Closed only after SQLite's: closing any descriptor of the file would
     * drop the process's POSIX locks on it. */
    if (s->lock_fd >= 0)
        close(s->lock_fd);
    struct store_pending *p = s->q_head;
    while (p != NULL) {
        struct store_pending *next = p->next;
        free(p->mem);
        free(p);
        p = next;
    }
    free(s->done);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    free(s->path);
    free(s);
}

int store_open(struct store **out, const struct store_options *opts, struct pb_error *err)
{
    *out = NULL;
    if (opts == NULL || opts->dir == NULL || opts->base == NULL)
        return pb_error_set(err, -EINVAL, "store: a directory and an event base are required");
    if (sqlite3_threadsafe() == 0)
        return pb_error_set(err, -ENOTSUP, "store: SQLite was built without thread support");

    struct store *s = pb_xcalloc(1, sizeof(*s));
    s->lock_fd = -1;
    s->efd = -1;
    s->q_tail = &s->q_head;
    s->next_seq = 1;
    s->on_complete = opts->on_complete;
    s->arg = opts->arg;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->path = pb_xasprintf("%s/%s", opts->dir, STORE_DB_NAME);
    int rc;

    /* One process per raft.db: two daemons on one identity would be two
     * voters with one vote. flock() is separate from SQLite's POSIX locks. */
    s->lock_fd = open(s->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->lock_fd < 0) {
        rc = pb_error_set(err, -errno, "%s: %s", s->path, strerror(errno));
        goto fail;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK)
            rc = pb_error_set(err, -EBUSY, "%s is in use by another process", s->path);
        else
            rc = pb_error_set(err, -errno, "%s: flock: %s", s->path, strerror(errno));
        goto fail;
    }

    s->fvfs = store_fault_vfs_new();
    if (s->fvfs == NULL) {
        rc = pb_error_set(err, -ENOTSUP, "store: cannot register the SQLite VFS shim");
        goto fail;
    }
    rc = store_open_writer(s, err);
    if (rc < 0)
        goto fail;
    rc = store_init_schema(s->w, err);
    if (rc < 0)
        goto fail;
    rc = store_drop_incomplete(s->w, err);
    if (rc < 0)
        goto fail;
    rc = store_load_wstate(s->w, &s->ws, err);
    if (rc < 0)
        goto fail;
    rc = store_validate(s->w, &s->ws, err);
    if (rc == 0 && opts->quick_check)
        rc = store_quick_check(s->w, err);
    if (rc < 0)
        goto fail;

    rc = sqlite3_open_v2(s->path, &s->r, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        rc = store_sql_error(s->r, rc, err, "open reader");
        goto fail;
    }
    rc = store_setup_conn(s->r, false, err);
    if (rc < 0)
        goto fail;

    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->efd < 0) {
        rc = pb_error_set(err, -errno, "store: eventfd: %s", strerror(errno));
        goto fail;
    }
    s->ev = event_new(opts->base, s->efd, EV_READ | EV_PERSIST, store_on_event, s);
    if (s->ev == NULL || event_add(s->ev, NULL) < 0) {
        rc = pb_error_set(err, -ENOMEM, "store: cannot add the completion event");
        goto fail;
    }
    /* Logged before the thread owns s->ws. */
    log_info("opened %s first_index=%" PRIu64 " last_index=%" PRIu64 " term=%" PRIu64
             " snapshot_index=%" PRIu64,
             s->path, s->ws.first, s->ws.last, s->ws.term, s->ws.snap_index);
    rc = store_thread_start(s);
    if (rc < 0) {
        pb_error_set(err, rc, "store: cannot start the storage thread: %s", strerror(-rc));
        goto fail;
    }
    *out = s;
    return 0;
fail:
    store_free(s);
    return rc;
}

void store_close(struct store *s)
{
    if (s == NULL)
        return;
    store_thread_stop(s);
    store_free(s);
}

void store_health(struct store *s, struct store_health *h)
{
    memset(h, 0, sizeof(*h));
    pthread_mutex_lock(&s->mu);
    h->degraded = s->degraded;
    h->code = s->deg_code;
    memcpy(h->msg, s->deg_msg, sizeof(h->msg));
    h->since_ms = s->deg_since_ms;
    h->last_persisted_seq = s->last_persisted_seq;
    h->transactions = s->n_transactions;
    h->batches = s->n_batches;
    h->commit_time = s->commit_hist;
    pthread_mutex_unlock(&s->mu);
}

int store_retry(struct store *s)
{
    pthread_mutex_lock(&s->mu);
    if (s->degraded) {
        log_notice("raft.db: retrying after: %s", s->deg_msg);
        s->degraded = false;
        s->deg_code = 0;
        s->deg_msg[0] = '\0';
        s->deg_since_ms = 0;
        s->reopen = true;
        pthread_cond_signal(&s->cond);
    }
    pthread_mutex_unlock(&s->mu);
    return 0;
}

uint64_t store_retry_backoff_ms(unsigned attempt)
{
    if (attempt >= 9)
        return 30000;
    return PB_MIN((uint64_t)100 << attempt, (uint64_t)30000);
}

void store_fault_inject(struct store *s, enum store_fault kind, unsigned n)
{
    store_fault_vfs_arm(s->fvfs, kind, n);
}
