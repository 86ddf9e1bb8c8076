/*
 * bigwrite.c: the background writer of big files (see bigwrite.h).
 *
 * Jobs form one list in submission order, guarded by mu. A job is QUEUED,
 * then RUNNING while the worker fills its temp (outside the lock), then
 * DONE (rc and the temp set). Only the owner removes jobs from the list:
 * QUEUED or DONE ones, or RUNNING ones after raising `cancel` and waiting
 * for DONE. The worker only takes the first QUEUED job.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "fsm/bigwrite.h"
#include "lib/log.h"
#include "lib/util.h"
#include "store/statedb.h"

/* While a temp is filled, writeback of what it holds is started every this
 * many bytes (sync_file_range, SYNC_FILE_RANGE_WRITE: a hint, it waits for
 * nothing), so the disk writes while the rest is copied and the fsync that
 * ends the fill (unchanged) has little left to write. */
#define BW_WRITEBACK_BYTES (8u * 1024u * 1024u)

enum bw_state { BW_QUEUED, BW_RUNNING, BW_DONE };

struct bw_job {
    struct bw_job *next;
    char *path;
    struct fsm_chunk_ref *refs;
    uint32_t n_refs;
    uint32_t mode;
    int64_t mtime_ns;
    uint64_t size;
    uint8_t content[FSM_CHUNK_ID_LEN];
    uint64_t index;
    uint64_t t0_ms, fill_ms;
    enum bw_state state; /* mu */
    atomic_bool cancel;
    int rc;                    /* DONE: the background part's result */
    struct fsm_tree_temp *tmp; /* DONE with rc 0: the durable temp */
};

struct fsm_bigwrite {
    struct fsm_tree *t;
    struct statedb *rdb; /* the worker's read-only connection */
    uint64_t min_bytes;
    int efd;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work; /* the worker waits for a job or stop */
    pthread_cond_t done; /* the owner waits for a job to be DONE */
    bool stop;           /* mu */
    struct bw_job *head; /* mu */
    size_t n;            /* jobs in the list (owner only) */
    uint64_t index;
    struct fsm_bigwrite_stats stats;
    char *hold; /* test hook (fsm_bigwrite_set_hold()); set before any job */
};

/* ---- the worker ---------------------------------------------------------- */

struct bw_fill {
    struct fsm_bigwrite *w;
    struct bw_job *j;
    uint64_t off;     /* bytes written to the temp */
    uint64_t flushed; /* writeback started for [0, flushed) */
};

/* Starts writeback of what the temp holds past f->flushed once there is
 * BW_WRITEBACK_BYTES of it (or all of it at the end). Durability still
 * comes from the fsync after the fill: a failure here changes nothing. */
static void bw_writeback(struct bw_fill *f, int fd, bool last)
{
    uint64_t len = f->off - f->flushed;
    if (len == 0 || (!last && len < BW_WRITEBACK_BYTES))
        return;
    /* unsupported here (EINVAL, ESPIPE): the fsync does it all */
    (void)sync_file_range(fd, (off64_t)f->flushed, (off64_t)len, SYNC_FILE_RANGE_WRITE);
    f->flushed = f->off;
}

/* fsm_tree_fill_fn: the chunks in order, copied from the store's packs
 * into the temp by the kernel (statedb_chunk_copy: no user-space copy). */
static int bw_fill_chunks(void *arg, int fd)
{
    struct bw_fill *f = arg;
    int rc = 0;
    for (uint32_t i = 0; i < f->j->n_refs && rc == 0; i++) {
        if (atomic_load(&f->j->cancel)) {
            rc = -ECANCELED;
            break;
        }
        const struct fsm_chunk_ref *r = &f->j->refs[i];
        rc = statedb_chunk_copy(f->w->rdb, r->id, r->len, fd);
        if (rc == -ENOENT)
            rc = -ENODATA; /* the store lacks bytes, not "a parent is missing" */
        if (rc == 0) {
            f->off += r->len;
            bw_writeback(f, fd, i + 1 == f->j->n_refs);
        }
        /* the test hook: a temp half written, for as long as asked */
        while (rc == 0 && f->w->hold != NULL && access(f->w->hold, F_OK) == 0 &&
               !atomic_load(&f->j->cancel))
            nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    return rc;
}

static void *bw_worker(void *arg)
{
    struct fsm_bigwrite *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        struct bw_job *j = w->head;
        while (j != NULL && j->state != BW_QUEUED)
            j = j->next;
        if (w->stop)
            break;
        if (j == NULL) {
            pthread_cond_wait(&w->work, &w->mu);
            continue;
        }
        j->state = BW_RUNNING;
        pthread_mutex_unlock(&w->mu);
        struct bw_fill f = {w, j, 0, 0};
        struct fsm_tree_temp *tmp = NULL;
        uint64_t t0 = pb_now_ms();
        int rc = atomic_load(&j->cancel) ? -ECANCELED
                                         : fsm_tree_temp_write(w->t, j->path, j->mode, j->mtime_ns,
                                                               bw_fill_chunks, &f, &tmp);
        pthread_mutex_lock(&w->mu);
        j->fill_ms = pb_now_ms() - t0;
        j->rc = rc;
        j->tmp = tmp;
        j->state = BW_DONE;
        pthread_cond_broadcast(&w->done);
        uint64_t one = 1;
        if (write(w->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            log_warning("bigwrite: eventfd: %s", strerror(errno));
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- the owner's side ---------------------------------------------------- */

int fsm_bigwrite_new(struct fsm_tree *t, const char *db_path, uint64_t min_bytes,
                     struct fsm_bigwrite **out, struct pb_error *err)
{
    *out = NULL;
    struct fsm_bigwrite *w = pb_xcalloc(1, sizeof(*w));
    w->t = t;
    w->min_bytes = min_bytes > 0 ? min_bytes : 1;
    int rc = statedb_open_reader(db_path, &w->rdb, err);
    if (rc < 0) {
        free(w);
        return rc;
    }
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0) {
        rc = pb_error_set(err, -errno, "bigwrite: eventfd: %s", strerror(errno));
        statedb_close(w->rdb);
        free(w);
        return rc;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    if ((rc = pthread_create(&w->thread, NULL, bw_worker, w)) != 0) {
        pthread_cond_destroy(&w->done);
        pthread_cond_destroy(&w->work);
        pthread_mutex_destroy(&w->mu);
        close(w->efd);
        statedb_close(w->rdb);
        free(w);
        return pb_error_set(err, -rc, "bigwrite: thread: %s", strerror(rc));
    }
    *out = w;
    return 0;
}

static void bw_job_free(struct bw_job *j)
{
    fsm_tree_temp_discard(j->tmp);
    free(j->path);
    free(j->refs);
    free(j);
}

/* Takes j out of the list (the owner's thread, mu held). */
static void bw_unlink(struct fsm_bigwrite *w, struct bw_job *j)
{
    for (struct bw_job **pp = &w->head; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == j) {
            *pp = j->next;
            w->n--;
            return;
        }
    }
}

void fsm_bigwrite_free(struct fsm_bigwrite *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    for (struct bw_job *j = w->head; j != NULL; j = j->next)
        atomic_store(&j->cancel, true);
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    size_t n = 0;
    while (w->head != NULL) {
        struct bw_job *j = w->head;
        w->head = j->next;
        bw_job_free(j); /* its temp is removed */
        n++;
    }
    if (n > 0)
        log_info("bigwrite: %zu background write(s) stopped; the tree catches up at the next "
                 "start",
                 n);
    pthread_cond_destroy(&w->done);
    pthread_cond_destroy(&w->work);
    pthread_mutex_destroy(&w->mu);
    close(w->efd);
    statedb_close(w->rdb);
    free(w->hold);
    free(w);
}

void fsm_bigwrite_set_hold(struct fsm_bigwrite *w, const char *path)
{
    free(w->hold);
    w->hold = path != NULL ? pb_xstrdup(path) : NULL;
}

uint64_t fsm_bigwrite_min_bytes(const struct fsm_bigwrite *w)
{
    return w->min_bytes;
}

int fsm_bigwrite_fd(const struct fsm_bigwrite *w)
{
    return w->efd;
}

void fsm_bigwrite_set_index(struct fsm_bigwrite *w, uint64_t index)
{
    w->index = index;
}

void fsm_bigwrite_submit(struct fsm_bigwrite *w, const char *path, const struct fsm_chunk_ref *refs,
                         uint32_t n_refs, uint32_t mode, int64_t mtime_ns, uint64_t size,
                         const uint8_t content[FSM_CHUNK_ID_LEN])
{
    struct bw_job *j = pb_xcalloc(1, sizeof(*j));
    j->path = pb_xstrdup(path);
    j->refs = pb_xreallocarray(NULL, n_refs ? n_refs : 1, sizeof(*refs));
    if (n_refs > 0)
        memcpy(j->refs, refs, n_refs * sizeof(*refs));
    j->n_refs = n_refs;
    j->mode = mode;
    j->mtime_ns = mtime_ns;
    j->size = size;
    memcpy(j->content, content, FSM_CHUNK_ID_LEN);
    j->index = w->index;
    j->t0_ms = pb_now_ms();
    atomic_init(&j->cancel, false);
    pthread_mutex_lock(&w->mu);
    struct bw_job **pp = &w->head;
    while (*pp != NULL)
        pp = &(*pp)->next;
    *pp = j;
    w->n++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    log_debug("bigwrite: %s (%" PRIu64 " bytes) queued", path, size);
}

size_t fsm_bigwrite_count(const struct fsm_bigwrite *w)
{
    return w->n;
}

uint64_t fsm_bigwrite_oldest(const struct fsm_bigwrite *w)
{
    /* head is only changed by the owner, who is the caller */
    return w->head != NULL ? w->head->index : 0;
}

/* The owner's part of a DONE job, already out of the list: the check, the
 * rename, the directory fsync, the record. Frees j. */
static int bw_finish(struct fsm_bigwrite *w, struct bw_job *j, const struct fsm_disk *disk)
{
    int rc = j->rc;
    struct fsm_tree_stat exp, out;
    if (rc == 0 && (rc = disk->expected(disk->arg, j->path, &exp)) < 0) {
        bw_job_free(j);
        return rc; /* state.db: the caller's error */
    }
    if (rc == 0) {
        struct fsm_tree_temp *tmp = j->tmp;
        j->tmp = NULL;
        rc = fsm_tree_temp_commit(w->t, tmp, j->path, &exp, &out);
    }
    int ret = 0;
    if (rc == 0) {
        ret = disk->record_as != NULL
                      ? disk->record_as(disk->arg, j->path, &out, j->content, j->mode, j->mtime_ns)
                      : disk->record(disk->arg, j->path, &out);
        w->stats.written++;
        log_info("materialized %s: %" PRIu64 " bytes in %" PRIu64 " ms (in the background: %" PRIu64
                 " ms writing)",
                 j->path, j->size, pb_now_ms() - j->t0_ms, j->fill_ms);
    } else if (rc == -ECANCELED) {
        w->stats.dropped++;
    } else if (rc == -FSM_TREE_EPENDING || rc == -EAGAIN || rc == -ENOENT || rc == -ENOTDIR ||
               rc == -ELOOP) {
        w->stats.pending++;
        log_info("bigwrite %s: not renamed: the tree differs from the record (%s); a local "
                 "edit is pending",
                 j->path, strerror(-rc));
    } else if (rc == -ENODATA) {
        w->stats.nodata++;
        log_info("bigwrite %s: chunk bytes not on this node yet", j->path);
    } else {
        w->stats.failed++;
        log_warning("bigwrite %s: %s; the tree will be repaired from state.db", j->path,
                    strerror(-rc));
    }
    bw_job_free(j);
    return ret;
}

int fsm_bigwrite_complete(struct fsm_bigwrite *w, const struct fsm_disk *disk)
{
    uint64_t v;
    if (read(w->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        log_warning("bigwrite: eventfd: %s", strerror(errno));
    int n = 0, ret = 0;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        struct bw_job *j = w->head;
        while (j != NULL && j->state != BW_DONE)
            j = j->next;
        if (j != NULL)
            bw_unlink(w, j);
        pthread_mutex_unlock(&w->mu);
        if (j == NULL)
            break;
        int rc = bw_finish(w, j, disk);
        if (rc < 0 && ret == 0)
            ret = rc;
        n++;
    }
    return ret < 0 ? ret : n;
}

/* Takes j out of the list once it is DONE (raising cancel first if drop);
 * a QUEUED job that is dropped never runs. */
static void bw_take(struct fsm_bigwrite *w, struct bw_job *j, bool drop)
{
    pthread_mutex_lock(&w->mu);
    if (drop && j->state == BW_QUEUED) {
        j->state = BW_DONE;
        j->rc = -ECANCELED;
    }
    if (drop)
        atomic_store(&j->cancel, true);
    while (j->state != BW_DONE)
        pthread_cond_wait(&w->done, &w->mu);
    bw_unlink(w, j);
    pthread_mutex_unlock(&w->mu);
    if (drop) { /* whatever it wrote goes */
        fsm_tree_temp_discard(j->tmp);
        j->tmp = NULL;
        j->rc = -ECANCELED;
    }
}

/* a == b, or one is a directory above the other */
static bool bw_related(const char *a, const char *b, bool *a_at_or_above)
{
    size_t la = strlen(a), lb = strlen(b);
    *a_at_or_above = la <= lb && memcmp(a, b, la) == 0 && (la == lb || b[la] == '/');
    bool below = lb < la && memcmp(a, b, lb) == 0 && a[lb] == '/';
    return *a_at_or_above || below;
}

int fsm_bigwrite_settle(struct fsm_bigwrite *w, const char *path, bool drop,
                        const struct fsm_disk *disk)
{
    int ret = 0;
    for (;;) {
        /* the list only changes on this thread: no lock needed to read it */
        struct bw_job *j = w->head;
        bool above = false;
        while (j != NULL && !bw_related(path, j->path, &above))
            j = j->next;
        if (j == NULL)
            break;
        bool d = drop && above;
        if (!d)
            log_info("bigwrite %s: a later op on %s settles it first", j->path, path);
        bw_take(w, j, d);
        int rc = bw_finish(w, j, disk);
        if (rc < 0 && ret == 0)
            ret = rc;
    }
    return ret;
}

int fsm_bigwrite_drain(struct fsm_bigwrite *w, const struct fsm_disk *disk)
{
    int ret = 0;
    while (w->head != NULL) {
        struct bw_job *j = w->head;
        bw_take(w, j, false);
        int rc = bw_finish(w, j, disk);
        if (rc < 0 && ret == 0)
            ret = rc;
    }
    return ret;
}

void fsm_bigwrite_take_stats(struct fsm_bigwrite *w, struct fsm_bigwrite_stats *st)
{
    *st = w->stats;
    memset(&w->stats, 0, sizeof(w->stats));
}
