/*
 * store.c: raft.db: open, schema and format, startup validation, reads.
 *
 * The write path (batches, group commit, the storage thread) is in commit.c;
 * the fault-injection VFS in faultvfs.c. The schema is:
 *
 *   raft_meta(id=1, format, cluster_id, node_id, current_term, voted_for,
 *             barriers)
 *       exactly one row; term and vote change in one UPDATE; barriers counts
 *       empty batches (a probe must change a byte to reach the disk)
 *   raft_log(idx PRIMARY KEY, term, type, data, crc)
 *       crc = CRC-32C of idx|term|type|data (big-endian integers)
 *   raft_snapshot(id, last_index, last_term, membership, size, crc, complete)
 *       at most one complete and one incomplete (being received) snapshot
 *   raft_snapshot_chunk(snap_id, off, data)
 *       the payload of a received snapshot, by byte offset
 *
 * Invariants checked at open: a contiguous log (MAX-MIN+1 = COUNT), terms
 * never decreasing along it and never above current_term, every entry's
 * checksum, first index <= snapshot.last_index + 1, last index >=
 * snapshot.last_index, the entry at snapshot.last_index (if kept) has the
 * snapshot's term, the snapshot payload is contiguous and of its recorded
 * size. Any violation refuses the open with -EBADMSG naming it.
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
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "store/crc32c.h"
#include "store/store_int.h"

/* PRAGMA application_id of raft.db: "PBRF". */
#define STORE_APPLICATION_ID  0x50425246
#define STORE_BUSY_TIMEOUT_MS 5000

static const char store_schema_v1[] = "CREATE TABLE raft_meta ("
                                      " id INTEGER PRIMARY KEY CHECK (id = 1),"
                                      " format INTEGER NOT NULL,"
                                      " cluster_id BLOB NOT NULL,"
                                      " node_id INTEGER NOT NULL,"
                                      " current_term INTEGER NOT NULL,"
                                      " voted_for INTEGER NOT NULL,"
                                      " barriers INTEGER NOT NULL DEFAULT 0) STRICT;"
                                      "CREATE TABLE raft_log ("
                                      " idx INTEGER PRIMARY KEY,"
                                      " term INTEGER NOT NULL,"
                                      " type INTEGER NOT NULL,"
                                      " data BLOB NOT NULL,"
                                      " crc INTEGER NOT NULL) STRICT;"
                                      "CREATE TABLE raft_snapshot ("
                                      " id INTEGER PRIMARY KEY,"
                                      " last_index INTEGER NOT NULL,"
                                      " last_term INTEGER NOT NULL,"
                                      " membership BLOB NOT NULL,"
                                      " size INTEGER NOT NULL,"
                                      " crc INTEGER NOT NULL,"
                                      " complete INTEGER NOT NULL) STRICT;"
                                      "CREATE TABLE raft_snapshot_chunk ("
                                      " snap_id INTEGER NOT NULL,"
                                      " off INTEGER NOT NULL,"
                                      " data BLOB NOT NULL,"
                                      " PRIMARY KEY (snap_id, off)) STRICT;";

/* Migrations from an older format to the next one, run in one transaction at
 * open. Format 1 is the first, so there is none yet; a v1 -> v2 step goes
 * here as {1, store_migrate_v1_v2}. */
struct store_migration {
    int64_t from;
    int (*fn)(sqlite3 *db, struct pb_error *err);
};
static const struct store_migration store_migrations[] = {
        {0, NULL},
};

int store_sqlite_errno(int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_ROW:
    case SQLITE_DONE:
        return 0;
    case SQLITE_FULL:
        return -ENOSPC;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return -EBADMSG;
    case SQLITE_NOMEM:
        return -ENOMEM;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return -EBUSY;
    case SQLITE_READONLY:
        return -EROFS;
    case SQLITE_PERM:
    case SQLITE_AUTH:
        return -EACCES;
    case SQLITE_CONSTRAINT:
    case SQLITE_MISMATCH:
    case SQLITE_RANGE:
        return -EINVAL;
    case SQLITE_TOOBIG:
        return -E2BIG;
    default: /* SQLITE_IOERR_*, SQLITE_CANTOPEN, SQLITE_PROTOCOL, ... */
        return -EIO;
    }
}

static int store_sql_error(sqlite3 *db, int rc, struct pb_error *err, const char *what)
{
    return pb_error_set(err, store_sqlite_errno(rc), "raft.db: %s: %s (%s)", what,
                        db ? sqlite3_errmsg(db) : "?", sqlite3_errstr(rc));
}

static int store_exec(sqlite3 *db, const char *sql, struct pb_error *err)
{
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return store_sql_error(db, rc, err, sql);
    return 0;
}

static int store_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st, struct pb_error *err)
{
    int rc = sqlite3_prepare_v2(db, sql, -1, st, NULL);
    if (rc != SQLITE_OK)
        return store_sql_error(db, rc, err, sql);
    return 0;
}

/* Runs a query whose result is one integer. */
static int store_query_i64(sqlite3 *db, const char *sql, int64_t *out, struct pb_error *err)
{
    sqlite3_stmt *st;
    int rc = store_prepare(db, sql, &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *out = sqlite3_column_int64(st, 0);
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        *out = 0;
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : store_sql_error(db, rc, err, sql);
}

uint32_t store_entry_crc(uint64_t index, uint64_t term, uint8_t type, const void *data, size_t len)
{
    uint8_t hdr[17];
    pb_store_u64(hdr, index);
    pb_store_u64(hdr + 8, term);
    hdr[16] = type;
    return pb_crc32c(pb_crc32c(0, hdr, sizeof(hdr)), data, len);
}

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
         * to 64 MiB after checkpoints (commit.c runs them, not autocheckpoint). */
        return store_exec(db,
                          "PRAGMA synchronous = FULL;"
                          "PRAGMA journal_size_limit = 67108864;",
                          err);
    return store_exec(db, "PRAGMA query_only = ON;", err);
}

/* Creates the schema in an empty database, in one transaction. */
static int store_create(sqlite3 *db, struct pb_error *err)
{
    uint64_t node_id = 0;
    while (node_id == 0) {
        if (getrandom(&node_id, sizeof(node_id), 0) != (ssize_t)sizeof(node_id))
            return pb_error_set(err, -errno, "raft.db: getrandom: %s", strerror(errno));
    }
    /* auto_vacuum must be chosen before the first table exists. */
    int rc = store_exec(db,
                        "PRAGMA page_size = 4096;"
                        "PRAGMA auto_vacuum = INCREMENTAL;",
                        err);
    if (rc < 0)
        return rc;
    rc = store_exec(db, "PRAGMA journal_mode = WAL;", err);
    if (rc < 0)
        return rc;
    rc = store_exec(db, "BEGIN IMMEDIATE", err);
    if (rc < 0)
        return rc;
    char *sql = pb_xasprintf("%s PRAGMA application_id = %d;"
                             "INSERT INTO raft_meta (id, format, cluster_id, node_id, current_term,"
                             " voted_for) VALUES (1, %d, x'', %" PRId64 ", 0, 0);"
                             "COMMIT;",
                             store_schema_v1, STORE_APPLICATION_ID, STORE_FORMAT, (int64_t)node_id);
    rc = store_exec(db, sql, err);
    free(sql);
    if (rc < 0) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    log_info("created raft.db node_id=%016" PRIx64 " format=%d", node_id, STORE_FORMAT);
    return 0;
}

/* Refuses a newer format, migrates an older one. */
static int store_check_format(sqlite3 *db, struct pb_error *err)
{
    int64_t format;
    int rc = store_query_i64(db, "SELECT format FROM raft_meta WHERE id = 1", &format, err);
    if (rc < 0)
        return rc;
    if (format == STORE_FORMAT)
        return 0;
    if (format > STORE_FORMAT)
        return pb_error_set(err, -EPROTONOSUPPORT,
                            "raft.db has format %" PRId64 ", newer than format %d that this "
                            "pickbox understands; refusing to open it (downgrades are not "
                            "supported: run the newer pickbox)",
                            format, STORE_FORMAT);
    rc = store_exec(db, "BEGIN IMMEDIATE", err);
    if (rc < 0)
        return rc;
    for (int64_t f = format; f < STORE_FORMAT; f++) {
        const struct store_migration *m = NULL;
        for (size_t i = 0; i < PB_ARRAY_SIZE(store_migrations); i++)
            if (store_migrations[i].fn != NULL && store_migrations[i].from == f)
                m = &store_migrations[i];
        if (m == NULL) {
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return pb_error_set(err, -EBADMSG,
                                "raft.db has format %" PRId64 " but format %d has no "
                                "migration from it; the file is damaged or not a raft.db",
                                format, STORE_FORMAT);
        }
        rc = m->fn(db, err);
        if (rc < 0) {
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
        log_notice("raft.db migrated from format %" PRId64 " to %" PRId64, f, f + 1);
    }
    char *sql =
            pb_xasprintf("UPDATE raft_meta SET format = %d WHERE id = 1; COMMIT;", STORE_FORMAT);
    rc = store_exec(db, sql, err);
    free(sql);
    if (rc < 0)
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

/* Creates or recognizes the schema; migrates. */
static int store_init_schema(sqlite3 *db, struct pb_error *err)
{
    int64_t appid, tables;
    int rc = store_query_i64(db, "PRAGMA application_id", &appid, err);
    if (rc < 0)
        return rc;
    rc = store_query_i64(db, "SELECT count(*) FROM sqlite_schema", &tables, err);
    if (rc < 0)
        return rc;
    if (appid == 0 && tables == 0)
        return store_create(db, err);
    if (appid != STORE_APPLICATION_ID)
        return pb_error_set(err, -EBADMSG,
                            "raft.db: not a pickbox raft database (application_id 0x%08" PRIx64
                            ", expected 0x%08x)",
                            (uint64_t)appid, STORE_APPLICATION_ID);
    rc = store_exec(db, "PRAGMA journal_mode = WAL;", err);
    if (rc < 0)
        return rc;
    return store_check_format(db, err);
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

/* Reads the durable view the storage thread starts from. */
int store_load_wstate(sqlite3 *db, struct store_wstate *ws, struct pb_error *err)
{
    memset(ws, 0, sizeof(*ws));
    sqlite3_stmt *st;
    int rc = store_prepare(db,
                           "SELECT current_term, voted_for, length(cluster_id) FROM raft_meta "
                           "WHERE id = 1",
                           &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        if (rc == SQLITE_DONE)
            return pb_error_set(err, -EBADMSG, "raft.db: the meta row is missing");
        return store_sql_error(db, rc, err, "read meta");
    }
    ws->term = (uint64_t)sqlite3_column_int64(st, 0);
    ws->vote = (uint64_t)sqlite3_column_int64(st, 1);
    ws->has_cluster_id = sqlite3_column_int64(st, 2) == STORE_CLUSTER_ID_LEN;
    sqlite3_finalize(st);

    rc = store_prepare(db,
                       "SELECT last_index, last_term FROM raft_snapshot WHERE complete = 1 "
                       "ORDER BY last_index DESC LIMIT 1",
                       &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        ws->has_snap = true;
        ws->snap_index = (uint64_t)sqlite3_column_int64(st, 0);
        ws->snap_term = (uint64_t)sqlite3_column_int64(st, 1);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return store_sql_error(db, rc, err, "read snapshot");

    rc = store_prepare(db,
                       "SELECT MIN(idx), MAX(idx), (SELECT term FROM raft_log ORDER BY idx DESC "
                       "LIMIT 1) FROM raft_log",
                       &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
        ws->first = (uint64_t)sqlite3_column_int64(st, 0);
        ws->last = (uint64_t)sqlite3_column_int64(st, 1);
        ws->last_term = (uint64_t)sqlite3_column_int64(st, 2);
    } else {
        ws->last = ws->snap_index;
        ws->first = ws->last + 1;
        ws->last_term = ws->snap_term;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return store_sql_error(db, rc, err, "read log bounds");
    return 0;
}

/* Drops staged (incomplete) snapshots and payload that belongs to no
 * snapshot: a transfer interrupted by a restart starts over. */
static int store_drop_incomplete(sqlite3 *db, struct pb_error *err)
{
    int rc = store_exec(db, "BEGIN IMMEDIATE", err);
    if (rc < 0)
        return rc;
    rc = store_exec(db,
                    "DELETE FROM raft_snapshot_chunk WHERE snap_id NOT IN "
                    "(SELECT id FROM raft_snapshot WHERE complete = 1);"
                    "DELETE FROM raft_snapshot WHERE complete = 0;",
                    err);
    int changed = sqlite3_total_changes(db);
    if (rc == 0)
        rc = store_exec(db, "COMMIT", err);
    if (rc < 0) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    if (changed > 0)
        log_notice("raft.db: dropped an incomplete snapshot left by an interrupted transfer");
    return 0;
}

/* Checks every invariant listed in the file header. */
static int store_validate(sqlite3 *db, const struct store_wstate *ws, struct pb_error *err)
{
    int64_t node_id, cid_len, nsnap;
    int rc = store_query_i64(db, "SELECT node_id FROM raft_meta WHERE id = 1", &node_id, err);
    if (rc == 0)
        rc = store_query_i64(db, "SELECT length(cluster_id) FROM raft_meta WHERE id = 1", &cid_len,
                             err);
    if (rc == 0)
        rc = store_query_i64(db, "SELECT count(*) FROM raft_snapshot", &nsnap, err);
    if (rc < 0)
        return rc;
    if (node_id == 0)
        return pb_error_set(err, -EBADMSG, "raft.db: node_id is 0");
    if (cid_len != 0 && cid_len != STORE_CLUSTER_ID_LEN)
        return pb_error_set(err, -EBADMSG, "raft.db: cluster_id has %" PRId64 " bytes, not %d",
                            cid_len, STORE_CLUSTER_ID_LEN);
    if (nsnap > 1)
        return pb_error_set(err, -EBADMSG,
                            "raft.db: %" PRId64 " complete snapshots (at most one may exist)",
                            nsnap);
    if (ws->has_snap && ws->snap_term > ws->term)
        return pb_error_set(err, -EBADMSG,
                            "raft.db: snapshot term %" PRIu64 " is above current_term %" PRIu64,
                            ws->snap_term, ws->term);

    /* Snapshot payload: contiguous chunks adding up to the recorded size. */
    sqlite3_stmt *st;
    if (ws->has_snap) {
        rc = store_prepare(db,
                           "SELECT c.off, length(c.data), s.size FROM raft_snapshot s "
                           "JOIN raft_snapshot_chunk c ON c.snap_id = s.id ORDER BY c.off",
                           &st, err);
        if (rc < 0)
            return rc;
        uint64_t expect = 0, size = 0;
        bool any = false;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            uint64_t off = (uint64_t)sqlite3_column_int64(st, 0);
            size = (uint64_t)sqlite3_column_int64(st, 2);
            any = true;
            if (off != expect) {
                sqlite3_finalize(st);
                return pb_error_set(err, -EBADMSG,
                                    "raft.db: snapshot %" PRIu64 " payload has a chunk at "
                                    "offset %" PRIu64 " where %" PRIu64 " was expected",
                                    ws->snap_index, off, expect);
            }
            expect += (uint64_t)sqlite3_column_int64(st, 1);
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            return store_sql_error(db, rc, err, "read snapshot payload");
        if (any && expect != size)
            return pb_error_set(err, -EBADMSG,
                                "raft.db: snapshot %" PRIu64 " payload holds %" PRIu64
                                " bytes but records %" PRIu64,
                                ws->snap_index, expect, size);
    }

    /* Log: contiguity and agreement with the snapshot. */
    int64_t count;
    rc = store_query_i64(db, "SELECT count(*) FROM raft_log", &count, err);
    if (rc < 0)
        return rc;
    if (count > 0) {
        uint64_t lo = ws->first, hi = ws->last;
        if (hi - lo + 1 != (uint64_t)count)
            return pb_error_set(err, -EBADMSG,
                                "raft.db: the log is not contiguous: %" PRId64
                                " entries between index %" PRIu64 " and %" PRIu64,
                                count, lo, hi);
        if (ws->has_snap && lo > ws->snap_index + 1)
            return pb_error_set(err, -EBADMSG,
                                "raft.db: the log starts at index %" PRIu64
                                ", after snapshot index %" PRIu64 " + 1: entries are missing",
                                lo, ws->snap_index);
        if (!ws->has_snap && lo != 1)
            return pb_error_set(err, -EBADMSG,
                                "raft.db: the log starts at index %" PRIu64
                                " but there is no snapshot: entries are missing",
                                lo);
        if (ws->has_snap && hi < ws->snap_index)
            return pb_error_set(err, -EBADMSG,
                                "raft.db: the log ends at index %" PRIu64
                                ", before snapshot index %" PRIu64,
                                hi, ws->snap_index);
    }

    /* Every entry: checksum, terms non-decreasing, none above current_term. */
    rc = store_prepare(db, "SELECT idx, term, type, data, crc FROM raft_log ORDER BY idx", &st,
                       err);
    if (rc < 0)
        return rc;
    uint64_t prev_term = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        uint64_t idx = (uint64_t)sqlite3_column_int64(st, 0);
        uint64_t term = (uint64_t)sqlite3_column_int64(st, 1);
        int64_t type = sqlite3_column_int64(st, 2);
        const void *data = sqlite3_column_blob(st, 3);
        size_t len = (size_t)sqlite3_column_bytes(st, 3);
        uint32_t crc = (uint32_t)sqlite3_column_int64(st, 4);
        const char *what = NULL;
        if (type < 0 || type > 255)
            what = "has a type outside 0..255";
        else if (store_entry_crc(idx, term, (uint8_t)type, data, len) != crc)
            what = "fails its checksum";
        else if (term < prev_term)
            what = "has a lower term than the entry before it";
        else if (term > ws->term)
            what = "has a term above current_term";
        else if (ws->has_snap && idx == ws->snap_index && term != ws->snap_term)
            what = "disagrees with the snapshot's last term";
        if (what != NULL) {
            sqlite3_finalize(st);
            return pb_error_set(err, -EBADMSG,
                                "raft.db: log entry %" PRIu64 " (term %" PRIu64 ") %s", idx, term,
                                what);
        }
        prev_term = term;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return store_sql_error(db, rc, err, "scan log");
    return 0;
}

static int store_quick_check(sqlite3 *db, struct pb_error *err)
{
    sqlite3_stmt *st;
    int rc = store_prepare(db, "PRAGMA quick_check(1)", &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const char *res = (const char *)sqlite3_column_text(st, 0);
        if (res == NULL || strcmp(res, "ok") != 0) {
            rc = pb_error_set(err, -EBADMSG, "raft.db: quick_check: %s", res ? res : "?");
            sqlite3_finalize(st);
            return rc;
        }
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : store_sql_error(db, rc, err, "quick_check");
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
    rc = store_thread_start(s);
    if (rc < 0) {
        pb_error_set(err, rc, "store: cannot start the storage thread: %s", strerror(-rc));
        goto fail;
    }
    log_info("opened %s first_index=%" PRIu64 " last_index=%" PRIu64 " term=%" PRIu64
             " snapshot_index=%" PRIu64,
             s->path, s->ws.first, s->ws.last, s->ws.term, s->ws.snap_index);
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

/* Reads one entry row (idx, term, type, data, crc) into e, verifying it. */
static int store_read_row(sqlite3_stmt *st, struct store_entry *e, struct pb_error *err)
{
    e->index = (uint64_t)sqlite3_column_int64(st, 0);
    e->term = (uint64_t)sqlite3_column_int64(st, 1);
    int64_t type = sqlite3_column_int64(st, 2);
    const void *data = sqlite3_column_blob(st, 3);
    e->len = (size_t)sqlite3_column_bytes(st, 3);
    uint32_t crc = (uint32_t)sqlite3_column_int64(st, 4);
    e->type = (uint8_t)type;
    e->data = NULL;
    if (type < 0 || type > 255 || store_entry_crc(e->index, e->term, e->type, data, e->len) != crc)
        return pb_error_set(err, -EBADMSG, "raft.db: log entry %" PRIu64 " fails its checksum",
                            e->index);
    e->data = pb_xmalloc(e->len);
    if (e->len > 0)
        memcpy(e->data, data, e->len);
    return 0;
}

/* Reads entries from lo to hi under the byte cap into out (appending). */
static int store_read_range(sqlite3 *db, uint64_t lo, uint64_t hi, size_t max_bytes,
                            struct store_entries *out, struct pb_error *err)
{
    sqlite3_stmt *st;
    int rc = store_prepare(db,
                           "SELECT idx, term, type, data, crc FROM raft_log "
                           "WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx",
                           &st, err);
    if (rc < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (int64_t)PB_MIN(lo, (uint64_t)INT64_MAX));
    sqlite3_bind_int64(st, 2, (int64_t)PB_MIN(hi, (uint64_t)INT64_MAX));
    size_t cap = 0;
    uint64_t expect = lo;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        size_t len = (size_t)sqlite3_column_bytes(st, 3);
        if (out->n > 0 && out->bytes + len > max_bytes)
            break;
        if (out->n == cap) {
            cap = cap ? cap * 2 : 16;
            out->v = pb_xreallocarray(out->v, cap, sizeof(*out->v));
        }
        struct store_entry *e = &out->v[out->n];
        rc = store_read_row(st, e, err);
        if (rc < 0) {
            sqlite3_finalize(st);
            return rc;
        }
        out->n++;
        out->bytes += e->len;
        if (e->index != expect) {
            sqlite3_finalize(st);
            return pb_error_set(err, -EBADMSG,
                                "raft.db: log entry %" PRIu64 " is missing (next is %" PRIu64 ")",
                                expect, e->index);
        }
        expect++;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return store_sql_error(db, rc, err, "read log");
    return 0;
}

void store_entries_free(struct store_entries *e)
{
    if (e == NULL)
        return;
    for (size_t i = 0; i < e->n; i++)
        free(e->v[i].data);
    free(e->v);
    memset(e, 0, sizeof(*e));
}

void store_state_free(struct store_state *st)
{
    if (st == NULL)
        return;
    free(st->snapshot.membership);
    store_entries_free(&st->entries);
    memset(st, 0, sizeof(*st));
}

static int store_load_locked(struct store *s, uint64_t lo, size_t max_bytes,
                             struct store_state *out, struct pb_error *err)
{
    sqlite3 *db = s->r;
    sqlite3_stmt *st;
    int rc = store_prepare(db,
                           "SELECT cluster_id, node_id, current_term, voted_for FROM raft_meta "
                           "WHERE id = 1",
                           &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? pb_error_set(err, -EBADMSG, "raft.db: the meta row is missing")
                                 : store_sql_error(db, rc, err, "read meta");
    }
    if (sqlite3_column_bytes(st, 0) == STORE_CLUSTER_ID_LEN) {
        memcpy(out->cluster_id, sqlite3_column_blob(st, 0), STORE_CLUSTER_ID_LEN);
        out->has_cluster_id = true;
    }
    out->node_id = (uint64_t)sqlite3_column_int64(st, 1);
    out->hard_state.term = (uint64_t)sqlite3_column_int64(st, 2);
    out->hard_state.vote = (uint64_t)sqlite3_column_int64(st, 3);
    sqlite3_finalize(st);

    rc = store_prepare(db,
                       "SELECT last_index, last_term, membership, size, crc FROM raft_snapshot "
                       "WHERE complete = 1 ORDER BY last_index DESC LIMIT 1",
                       &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        struct store_snapshot_meta *m = &out->snapshot;
        out->has_snapshot = true;
        m->last_index = (uint64_t)sqlite3_column_int64(st, 0);
        m->last_term = (uint64_t)sqlite3_column_int64(st, 1);
        m->membership_len = (size_t)sqlite3_column_bytes(st, 2);
        m->membership = pb_xmalloc(m->membership_len);
        if (m->membership_len > 0)
            memcpy(m->membership, sqlite3_column_blob(st, 2), m->membership_len);
        m->size = (uint64_t)sqlite3_column_int64(st, 3);
        m->crc = (uint32_t)sqlite3_column_int64(st, 4);
        rc = SQLITE_DONE;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return store_sql_error(db, rc, err, "read snapshot");

    rc = store_prepare(db,
                       "SELECT MIN(idx), MAX(idx), (SELECT term FROM raft_log ORDER BY idx DESC "
                       "LIMIT 1) FROM raft_log",
                       &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
        out->first_index = (uint64_t)sqlite3_column_int64(st, 0);
        out->last_index = (uint64_t)sqlite3_column_int64(st, 1);
        out->last_term = (uint64_t)sqlite3_column_int64(st, 2);
    } else {
        out->last_index = out->snapshot.last_index;
        out->first_index = out->last_index + 1;
        out->last_term = out->snapshot.last_term;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return store_sql_error(db, rc, err, "read log bounds");
    return store_read_range(db, PB_MAX(lo, out->first_index), out->last_index, max_bytes,
                            &out->entries, err);
}

/* Reads of the loop thread run in one read transaction of the reader
 * connection, so they see one consistent state. */
static int store_read_begin(struct store *s, struct pb_error *err)
{
    return store_exec(s->r, "BEGIN", err);
}

static void store_read_end(struct store *s)
{
    sqlite3_exec(s->r, "COMMIT", NULL, NULL, NULL);
}

int store_load(struct store *s, uint64_t lo, size_t max_bytes, struct store_state *out,
               struct pb_error *err)
{
    memset(out, 0, sizeof(*out));
    int rc = store_read_begin(s, err);
    if (rc < 0)
        return rc;
    rc = store_load_locked(s, lo, max_bytes, out, err);
    store_read_end(s);
    if (rc < 0)
        store_state_free(out);
    return rc;
}

int store_read_entries(struct store *s, uint64_t lo, uint64_t hi, size_t max_bytes,
                       struct store_entries *out, struct pb_error *err)
{
    memset(out, 0, sizeof(*out));
    if (lo == 0 || lo > hi)
        return pb_error_set(err, -EINVAL, "store: bad range %" PRIu64 "..%" PRIu64, lo, hi);
    int rc = store_read_begin(s, err);
    if (rc < 0)
        return rc;
    int64_t first = 0, snap = 0;
    rc = store_query_i64(s->r, "SELECT COALESCE(MIN(idx), 0) FROM raft_log", &first, err);
    if (rc == 0)
        rc = store_query_i64(s->r,
                             "SELECT COALESCE(MAX(last_index), 0) FROM raft_snapshot "
                             "WHERE complete = 1",
                             &snap, err);
    /* Below the first entry, or covered by the snapshot: compacted. */
    if (rc == 0 && ((first != 0 && lo < (uint64_t)first) || (first == 0 && lo <= (uint64_t)snap)))
        rc = pb_error_set(err, -ENOENT,
                          "raft.db: entry %" PRIu64 " was compacted (first is %" PRId64 ")", lo,
                          first);
    if (rc == 0)
        rc = store_read_range(s->r, lo, hi, max_bytes, out, err);
    store_read_end(s);
    if (rc < 0)
        store_entries_free(out);
    return rc;
}

int store_snapshot_staged(struct store *s, uint64_t last_index, uint64_t last_term, uint64_t *bytes)
{
    *bytes = 0;
    sqlite3_stmt *st;
    int rc = store_prepare(s->r,
                           "SELECT size FROM raft_snapshot WHERE complete = 0 AND "
                           "last_index = ?1 AND last_term = ?2",
                           &st, NULL);
    if (rc < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (int64_t)last_index);
    sqlite3_bind_int64(st, 2, (int64_t)last_term);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *bytes = (uint64_t)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : store_sqlite_errno(rc);
}

int store_snapshot_read(struct store *s, uint64_t last_index, uint64_t offset, void *buf,
                        size_t len, size_t *got, struct pb_error *err)
{
    *got = 0;
    int rc = store_read_begin(s, err);
    if (rc < 0)
        return rc;
    int64_t id;
    sqlite3_stmt *st = NULL;
    rc = store_prepare(s->r,
                       "SELECT id, size FROM raft_snapshot WHERE complete = 1 AND "
                       "last_index = ?1",
                       &st, err);
    if (rc < 0)
        goto out;
    sqlite3_bind_int64(st, 1, (int64_t)last_index);
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        rc = rc == SQLITE_DONE
                     ? pb_error_set(err, -ENOENT, "raft.db: no complete snapshot at index %" PRIu64,
                                    last_index)
                     : store_sql_error(s->r, rc, err, "read snapshot");
        goto out;
    }
    id = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    st = NULL;
    rc = store_prepare(s->r,
                       "SELECT off, data FROM raft_snapshot_chunk WHERE snap_id = ?1 AND "
                       "off >= (SELECT COALESCE(MAX(off), 0) FROM raft_snapshot_chunk "
                       "WHERE snap_id = ?1 AND off <= ?2) ORDER BY off",
                       &st, err);
    if (rc < 0)
        goto out;
    sqlite3_bind_int64(st, 1, id);
    sqlite3_bind_int64(st, 2, (int64_t)offset);
    uint64_t pos = offset;
    while (*got < len && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        uint64_t off = (uint64_t)sqlite3_column_int64(st, 0);
        const uint8_t *data = sqlite3_column_blob(st, 1);
        uint64_t n = (uint64_t)sqlite3_column_bytes(st, 1);
        if (off > pos) {
            rc = pb_error_set(err, -EBADMSG, "raft.db: snapshot payload has a hole at %" PRIu64,
                              pos);
            goto out;
        }
        if (off + n <= pos)
            continue;
        size_t take = (size_t)PB_MIN(off + n - pos, (uint64_t)(len - *got));
        memcpy((uint8_t *)buf + *got, data + (pos - off), take);
        *got += take;
        pos += take;
    }
    rc = (rc == SQLITE_ROW || rc == SQLITE_DONE || *got == len)
                 ? 0
                 : store_sql_error(s->r, rc, err, "read snapshot payload");
out:
    sqlite3_finalize(st);
    store_read_end(s);
    return rc;
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
