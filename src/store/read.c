/*
 * read.c: the synchronous reads of raft.db on the loop thread: the startup
 * load, entries for lagging followers, snapshot staging and payload.
 *
 * They use the reader connection (query_only), each call inside one read
 * transaction so it sees one committed state; WAL lets them run beside the
 * storage thread's writes. Every entry read is checked against its CRC.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/store_int.h"

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

    rc = store_log_bounds(db, out->snapshot.last_index, out->snapshot.last_term, &out->first_index,
                          &out->last_index, &out->last_term, err);
    if (rc < 0)
        return rc;
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

int store_log_bounds(sqlite3 *db, uint64_t snap_index, uint64_t snap_term, uint64_t *first,
                     uint64_t *last, uint64_t *last_term, struct pb_error *err)
{
    sqlite3_stmt *st;
    int rc =
            store_prepare(db,
                          "SELECT MIN(idx), MAX(idx), (SELECT term FROM raft_log ORDER BY idx DESC "
                          "LIMIT 1) FROM raft_log",
                          &st, err);
    if (rc < 0)
        return rc;
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
        *first = (uint64_t)sqlite3_column_int64(st, 0);
        *last = (uint64_t)sqlite3_column_int64(st, 1);
        *last_term = (uint64_t)sqlite3_column_int64(st, 2);
    } else {
        /* An empty log continues right after the snapshot (or from 1). */
        *last = snap_index;
        *first = snap_index + 1;
        *last_term = snap_term;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW)
        return store_sql_error(db, rc, err, "read log bounds");
    return 0;
}
