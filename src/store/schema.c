/*
 * schema.c: raft.db's schema, its format version and migrations, and the
 * checks that run at every open.
 *
 * Schema (format 1):
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
 * The format lives in raft_meta.format (and PRAGMA application_id marks the
 * file as ours): a newer format is refused, an older one migrated in one
 * transaction through store_migrations[].
 *
 * Invariants checked at open: a contiguous log (MAX-MIN+1 = COUNT), terms
 * never decreasing along it and never above current_term, every entry's
 * checksum, first index <= snapshot.last_index + 1, last index >=
 * snapshot.last_index, the entry at snapshot.last_index (if kept) has the
 * snapshot's term, the snapshot payload is contiguous and of its recorded
 * size. Any violation refuses the open with -EBADMSG naming it.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "store/crc32c.h"
#include "store/store_int.h"

/* PRAGMA application_id of raft.db: "PBRF". */
#define STORE_APPLICATION_ID 0x50425246

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

int store_sql_error(sqlite3 *db, int rc, struct pb_error *err, const char *what)
{
    return pb_error_set(err, store_sqlite_errno(rc), "raft.db: %s: %s (%s)", what,
                        db ? sqlite3_errmsg(db) : "?", sqlite3_errstr(rc));
}

int store_exec(sqlite3 *db, const char *sql, struct pb_error *err)
{
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return store_sql_error(db, rc, err, sql);
    return 0;
}

int store_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st, struct pb_error *err)
{
    int rc = sqlite3_prepare_v2(db, sql, -1, st, NULL);
    if (rc != SQLITE_OK)
        return store_sql_error(db, rc, err, sql);
    return 0;
}

/* Runs a query whose result is one integer. */
int store_query_i64(sqlite3 *db, const char *sql, int64_t *out, struct pb_error *err)
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
int store_init_schema(sqlite3 *db, struct pb_error *err)
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

    return store_log_bounds(db, ws->snap_index, ws->snap_term, &ws->first, &ws->last,
                            &ws->last_term, err);
}

/* Drops staged (incomplete) snapshots and payload that belongs to no
 * snapshot: a transfer interrupted by a restart starts over. */
int store_drop_incomplete(sqlite3 *db, struct pb_error *err)
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
int store_validate(sqlite3 *db, const struct store_wstate *ws, struct pb_error *err)
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

int store_quick_check(sqlite3 *db, struct pb_error *err)
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
