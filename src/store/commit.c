/*
 * commit.c: the write path of raft.db: batches, group commit, the storage
 * thread, degraded state, compaction and checkpoints.
 *
 * The loop thread queues deep-copied batches (store_submit). The storage
 * thread takes everything queued while its previous commit ran and writes it
 * as ONE transaction (BEGIN IMMEDIATE ... COMMIT; the COMMIT is the WAL fsync
 * under synchronous=FULL), then posts ONE completion (last seq, status) and
 * wakes the loop through an eventfd. Batches apply in seq order. If anything
 * fails, SQLite has rolled the transaction back (or we do): every batch in it,
 * and every batch queued behind it, fails with the same code and the store
 * turns degraded, so nothing later is applied on top of a write that did not
 * happen. Only store_retry() leaves that state.
 *
 * Each batch is checked against the log's invariants before it is written
 * (the thread keeps a cached view, struct store_wstate, that changes only
 * when a commit succeeds): entries continue the log, truncation only on a
 * real conflict and never into the snapshot, terms never decrease, no second
 * vote in a term, no entry or snapshot term above current_term.
 *
 * Between batch transactions the thread deletes compacted entries in slices
 * of STORE_COMPACT_SLICE rows and runs a PASSIVE checkpoint after the WAL
 * reaches STORE_CHECKPOINT_FRAMES frames, after posting the completion, so
 * neither sits in front of an acknowledgement for long.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/crc32c.h"
#include "store/store_int.h"

#define STORE_COMPACT_SLICE 2048

/* 16 MiB of WAL between checkpoints: a big file's entries (hundreds of
 * MiB) are checkpointed in few rounds, each one WAL and one database fsync
 * on this thread in front of the next batch. In bytes: the page size of
 * raft.db depends on when it was created. */
#define STORE_CHECKPOINT_BYTES (16u << 20)
/* Reclaim free pages when more than this many bytes are free, this many
 * at a time. */
#define STORE_VACUUM_FREE_BYTES (16u << 20)
#define STORE_VACUUM_STEP_BYTES (4u << 20)

/* What a failed transaction reports: the code and one line. */
struct txn_error {
    int code;
    char msg[256];
};

static int txn_fail(struct txn_error *te, int code, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static int txn_fail(struct txn_error *te, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(te->msg, sizeof(te->msg), fmt, ap);
    va_end(ap);
    te->code = code;
    return code;
}

static int txn_sql(struct store *s, struct txn_error *te, int rc, const char *what)
{
    return txn_fail(te, store_sqlite_errno(rc), "%s: %s (%s)", what, sqlite3_errmsg(s->w),
                    sqlite3_errstr(rc));
}

/* The hot statements, prepared once per writer connection. */
enum {
    ST_SET_HS,
    ST_SET_CLUSTER,
    ST_TERM_AT,
    ST_DEL_FROM,
    ST_DEL_UPTO,
    ST_DEL_BELOW,
    ST_INSERT,
    ST_TOUCH,
    ST_COUNT
};
static const char *const stmt_sql[ST_COUNT] = {
        [ST_SET_HS] = "UPDATE raft_meta SET current_term = ?1, voted_for = ?2 WHERE id = 1",
        [ST_SET_CLUSTER] = "UPDATE raft_meta SET cluster_id = ?1 WHERE id = 1",
        [ST_TERM_AT] = "SELECT term FROM raft_log WHERE idx = ?1",
        [ST_DEL_FROM] = "DELETE FROM raft_log WHERE idx >= ?1",
        [ST_DEL_UPTO] = "DELETE FROM raft_log WHERE idx <= ?1",
        [ST_DEL_BELOW] = "DELETE FROM raft_log WHERE idx < ?1",
        [ST_INSERT] =
                "INSERT INTO raft_log (idx, term, type, data, crc) VALUES (?1, ?2, ?3, ?4, ?5)",
        /* SQLite skips rewriting an identical row, so the probe counts. */
        [ST_TOUCH] = "UPDATE raft_meta SET barriers = barriers + 1 WHERE id = 1",
};
_Static_assert(ST_COUNT <= STORE_WSTMT_MAX, "grow STORE_WSTMT_MAX");

static void stmt_cache_clear(struct store *s)
{
    for (int i = 0; i < ST_COUNT; i++) {
        sqlite3_finalize(s->wstmt[i]);
        s->wstmt[i] = NULL;
    }
}

static sqlite3_stmt *stmt_get(struct store *s, int which, struct txn_error *te)
{
    if (s->wstmt[which] == NULL) {
        int rc = sqlite3_prepare_v3(s->w, stmt_sql[which], -1, SQLITE_PREPARE_PERSISTENT,
                                    &s->wstmt[which], NULL);
        if (rc != SQLITE_OK) {
            txn_sql(s, te, rc, stmt_sql[which]);
            return NULL;
        }
    }
    return s->wstmt[which];
}

/* Steps a write statement to completion and resets it. */
static int stmt_run(struct store *s, sqlite3_stmt *st, struct txn_error *te, const char *what)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE)
        return txn_sql(s, te, rc, what);
    return 0;
}

static int exec_sql(struct store *s, const char *sql, struct txn_error *te)
{
    int rc = sqlite3_exec(s->w, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? 0 : txn_sql(s, te, rc, sql);
}

/* Term of the stored entry at idx, or 0 (and *found false) if none. */
static int term_at(struct store *s, uint64_t idx, uint64_t *term, bool *found, struct txn_error *te)
{
    sqlite3_stmt *st = stmt_get(s, ST_TERM_AT, te);
    if (st == NULL)
        return te->code;
    sqlite3_bind_int64(st, 1, (int64_t)idx);
    int rc = sqlite3_step(st);
    *found = rc == SQLITE_ROW;
    *term = *found ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
    sqlite3_reset(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return txn_sql(s, te, rc, "read term");
    return 0;
}

static int apply_hard_state(struct store *s, struct store_wstate *t,
                            const struct store_hard_state *hs, struct txn_error *te)
{
    if (hs->term < t->term)
        return txn_fail(te, -EINVAL, "current term would go back from %" PRIu64 " to %" PRIu64,
                        t->term, hs->term);
    /* One vote per term (§5.2): a vote may be cast once, never changed. */
    if (hs->term == t->term && t->vote != 0 && hs->vote != t->vote)
        return txn_fail(te, -EINVAL,
                        "second vote in term %" PRIu64 ": voted for %" PRIu64 ", now %" PRIu64,
                        t->term, t->vote, hs->vote);
    sqlite3_stmt *st = stmt_get(s, ST_SET_HS, te);
    if (st == NULL)
        return te->code;
    sqlite3_bind_int64(st, 1, (int64_t)hs->term);
    sqlite3_bind_int64(st, 2, (int64_t)hs->vote);
    int rc = stmt_run(s, st, te, "write hard state");
    if (rc == 0) {
        t->term = hs->term;
        t->vote = hs->vote;
    }
    return rc;
}

static int apply_cluster_id(struct store *s, struct store_wstate *t, const uint8_t *id,
                            struct txn_error *te)
{
    if (t->has_cluster_id)
        return txn_fail(te, -EEXIST, "the cluster id is already set");
    sqlite3_stmt *st = stmt_get(s, ST_SET_CLUSTER, te);
    if (st == NULL)
        return te->code;
    sqlite3_bind_blob(st, 1, id, STORE_CLUSTER_ID_LEN, SQLITE_STATIC);
    int rc = stmt_run(s, st, te, "write cluster id");
    if (rc == 0)
        t->has_cluster_id = true;
    return rc;
}

/* After deleting entries >= from: last entry and its term. */
static int set_last_below(struct store *s, struct store_wstate *t, uint64_t from,
                          struct txn_error *te)
{
    t->last = from - 1;
    if (t->last < t->first) { /* log now empty */
        t->last_term = t->has_snap && t->snap_index == t->last ? t->snap_term : 0;
        return 0;
    }
    bool found;
    int rc = term_at(s, t->last, &t->last_term, &found, te);
    if (rc == 0 && !found)
        return txn_fail(te, -EBADMSG, "log entry %" PRIu64 " is missing", t->last);
    return rc;
}

static int apply_truncate(struct store *s, struct store_wstate *t, const struct store_pending *p,
                          struct txn_error *te)
{
    uint64_t x = p->truncate_from;
    if (p->n_entries == 0 || p->entries[0].index != x)
        return txn_fail(te, -EINVAL,
                        "truncation from %" PRIu64 " without a new entry at that index", x);
    if (x <= t->snap_index)
        return txn_fail(te, -EINVAL,
                        "truncation from %" PRIu64 " reaches into snapshot (last index %" PRIu64
                        ")",
                        x, t->snap_index);
    if (x > t->last)
        return txn_fail(te, -EINVAL, "truncation from %" PRIu64 " but the log ends at %" PRIu64, x,
                        t->last);
    uint64_t term;
    bool found;
    int rc = term_at(s, x, &term, &found, te);
    if (rc < 0)
        return rc;
    /* §5.3: only a conflict (same index, different term) removes entries; a
     * matching entry may be committed and must never be truncated. */
    if (found && term == p->entries[0].term)
        return txn_fail(te, -EINVAL,
                        "refusing to truncate matching entry %" PRIu64 " (term %" PRIu64 ")", x,
                        term);
    sqlite3_stmt *st = stmt_get(s, ST_DEL_FROM, te);
    if (st == NULL)
        return te->code;
    sqlite3_bind_int64(st, 1, (int64_t)x);
    rc = stmt_run(s, st, te, "truncate log");
    if (rc < 0)
        return rc;
    return set_last_below(s, t, x, te);
}

static int apply_entries(struct store *s, struct store_wstate *t, const struct store_pending *p,
                         struct txn_error *te)
{
    sqlite3_stmt *st = stmt_get(s, ST_INSERT, te);
    if (st == NULL)
        return te->code;
    for (size_t i = 0; i < p->n_entries; i++) {
        const struct store_entry *e = &p->entries[i];
        if (e->index != t->last + 1)
            return txn_fail(te, -EINVAL,
                            "entry %" PRIu64 " does not continue the log (last index %" PRIu64 ")",
                            e->index, t->last);
        if (e->term < t->last_term)
            return txn_fail(te, -EINVAL,
                            "entry %" PRIu64 " has term %" PRIu64 " below the previous %" PRIu64,
                            e->index, e->term, t->last_term);
        sqlite3_bind_int64(st, 1, (int64_t)e->index);
        sqlite3_bind_int64(st, 2, (int64_t)e->term);
        sqlite3_bind_int(st, 3, e->type);
        int rc = sqlite3_bind_blob(st, 4, e->len ? e->data : "", (int)e->len, SQLITE_STATIC);
        if (rc != SQLITE_OK) {
            sqlite3_clear_bindings(st);
            return txn_sql(s, te, rc, "bind entry");
        }
        sqlite3_bind_int64(st, 5, store_entry_crc(e->index, e->term, e->type, e->data, e->len));
        rc = stmt_run(s, st, te, "append entry");
        if (rc < 0)
            return rc;
        t->last = e->index;
        t->last_term = e->term;
    }
    return 0;
}

/* Deletes every snapshot (and payload) except keep_id (0: none). */
static int drop_snapshots_except(struct store *s, int64_t keep_id, struct txn_error *te)
{
    char sql[256];
    snprintf(sql, sizeof(sql),
             "DELETE FROM raft_snapshot_chunk WHERE snap_id != %" PRId64 ";"
             "DELETE FROM raft_snapshot WHERE id != %" PRId64 ";",
             keep_id, keep_id);
    return exec_sql(s, sql, te);
}

/* Figure 13 rules 6-7 once the snapshot (index, term) is complete. */
static int install_snapshot(struct store *s, struct store_wstate *t, int64_t id, uint64_t index,
                            uint64_t term, struct txn_error *te)
{
    int rc = drop_snapshots_except(s, id, te);
    if (rc < 0)
        return rc;
    char sql[128];
    snprintf(sql, sizeof(sql), "UPDATE raft_snapshot SET complete = 1 WHERE id = %" PRId64, id);
    rc = exec_sql(s, sql, te);
    if (rc < 0)
        return rc;
    uint64_t have;
    bool found;
    rc = term_at(s, index, &have, &found, te);
    if (rc < 0)
        return rc;
    sqlite3_stmt *st = stmt_get(s, ST_DEL_UPTO, te);
    if (st == NULL)
        return te->code;
    if (found && have == term) {
        /* Rule 6: the log holds the snapshot's last entry: keep what follows. */
        sqlite3_bind_int64(st, 1, (int64_t)index);
    } else {
        /* Rule 7: discard the entire log. */
        sqlite3_bind_int64(st, 1, INT64_MAX);
        t->last = index;
        t->last_term = term;
    }
    rc = stmt_run(s, st, te, "discard log covered by snapshot");
    if (rc < 0)
        return rc;
    t->first = index + 1;
    t->has_snap = true;
    t->snap_index = index;
    t->snap_term = term;
    return 0;
}

static int apply_chunk(struct store *s, struct store_wstate *t,
                       const struct store_snapshot_chunk *c, struct txn_error *te)
{
    if (t->has_snap && c->last_index <= t->snap_index)
        return txn_fail(te, -EINVAL,
                        "incoming snapshot %" PRIu64 " is not newer than snapshot %" PRIu64,
                        c->last_index, t->snap_index);
    sqlite3_stmt *st = NULL;
    int64_t id = 0;
    uint64_t size = 0;
    uint32_t crc = 0;
    int rc = sqlite3_prepare_v2(s->w,
                                "SELECT id, size, crc FROM raft_snapshot WHERE complete = 0 AND "
                                "last_index = ?1 AND last_term = ?2",
                                -1, &st, NULL);
    if (rc != SQLITE_OK)
        return txn_sql(s, te, rc, "prepare staged snapshot");
    sqlite3_bind_int64(st, 1, (int64_t)c->last_index);
    sqlite3_bind_int64(st, 2, (int64_t)c->last_term);
    rc = sqlite3_step(st);
    bool staged = rc == SQLITE_ROW;
    if (staged) {
        id = sqlite3_column_int64(st, 0);
        size = (uint64_t)sqlite3_column_int64(st, 1);
        crc = (uint32_t)sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return txn_sql(s, te, rc, "read staged snapshot");

    if (!staged) {
        if (c->offset != 0)
            return txn_fail(te, -EINVAL,
                            "snapshot chunk at offset %" PRIu64 " but snapshot %" PRIu64 "/%" PRIu64
                            " is not staged",
                            c->offset, c->last_index, c->last_term);
        /* A new transfer replaces any other incomplete one. */
        rc = exec_sql(s,
                      "DELETE FROM raft_snapshot_chunk WHERE snap_id IN "
                      "(SELECT id FROM raft_snapshot WHERE complete = 0);"
                      "DELETE FROM raft_snapshot WHERE complete = 0;",
                      te);
        if (rc < 0)
            return rc;
        rc = sqlite3_prepare_v2(s->w,
                                "INSERT INTO raft_snapshot (last_index, last_term, membership, "
                                "size, crc, complete) VALUES (?1, ?2, ?3, 0, 0, 0)",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
            return txn_sql(s, te, rc, "prepare snapshot row");
        sqlite3_bind_int64(st, 1, (int64_t)c->last_index);
        sqlite3_bind_int64(st, 2, (int64_t)c->last_term);
        sqlite3_bind_blob(st, 3, c->membership_len ? c->membership : "", (int)c->membership_len,
                          SQLITE_STATIC);
        rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            return txn_sql(s, te, rc, "stage snapshot");
        id = sqlite3_last_insert_rowid(s->w);
    } else if (c->offset > size) {
        return txn_fail(te, -EINVAL,
                        "snapshot chunk at offset %" PRIu64 " but only %" PRIu64
                        " bytes are staged (a gap)",
                        c->offset, size);
    }
    /* A retransmission repeats bytes already staged (the same snapshot has
     * the same bytes): keep only what extends the staged prefix. */
    const uint8_t *data = c->data;
    size_t len = c->len;
    uint64_t dup = size - c->offset;
    data += PB_MIN(dup, (uint64_t)len);
    len -= (size_t)PB_MIN(dup, (uint64_t)len);
    if (len > 0) {
        rc = sqlite3_prepare_v2(s->w,
                                "INSERT INTO raft_snapshot_chunk (snap_id, off, data) "
                                "VALUES (?1, ?2, ?3)",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
            return txn_sql(s, te, rc, "prepare snapshot chunk");
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_int64(st, 2, (int64_t)size);
        rc = sqlite3_bind_blob(st, 3, data, (int)len, SQLITE_STATIC);
        if (rc == SQLITE_OK)
            rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            return txn_sql(s, te, rc, "write snapshot chunk");
        crc = pb_crc32c(crc, data, len);
        char sql[160];
        snprintf(sql, sizeof(sql),
                 "UPDATE raft_snapshot SET size = %" PRIu64 ", crc = %" PRIu32
                 " WHERE id = %" PRId64,
                 size + len, crc, id);
        rc = exec_sql(s, sql, te);
        if (rc < 0)
            return rc;
    }
    if (c->done) {
        if (c->last_term > t->term)
            return txn_fail(te, -EINVAL, "snapshot term %" PRIu64 " is above current term %" PRIu64,
                            c->last_term, t->term);
        return install_snapshot(s, t, id, c->last_index, c->last_term, te);
    }
    return 0;
}

static int apply_local_snapshot(struct store *s, struct store_wstate *t,
                                const struct store_local_snapshot *l, struct txn_error *te)
{
    if (t->has_snap && l->last_index <= t->snap_index)
        return txn_fail(te, -EINVAL,
                        "local snapshot %" PRIu64 " is not newer than snapshot %" PRIu64,
                        l->last_index, t->snap_index);
    uint64_t term;
    bool found;
    int rc = term_at(s, l->last_index, &term, &found, te);
    if (rc < 0)
        return rc;
    if (!found || term != l->last_term)
        return txn_fail(te, -EINVAL, "local snapshot %" PRIu64 "/%" PRIu64 " is not in the log",
                        l->last_index, l->last_term);
    /* Drops the older snapshot and any staged one it supersedes. */
    char sql[256];
    snprintf(sql, sizeof(sql),
             "DELETE FROM raft_snapshot_chunk WHERE snap_id IN (SELECT id FROM raft_snapshot "
             "WHERE complete = 1 OR last_index <= %" PRIu64 ");"
             "DELETE FROM raft_snapshot WHERE complete = 1 OR last_index <= %" PRIu64 ";",
             l->last_index, l->last_index);
    rc = exec_sql(s, sql, te);
    if (rc < 0)
        return rc;
    sqlite3_stmt *st;
    rc = sqlite3_prepare_v2(s->w,
                            "INSERT INTO raft_snapshot (last_index, last_term, membership, size, "
                            "crc, complete) VALUES (?1, ?2, ?3, 0, 0, 1)",
                            -1, &st, NULL);
    if (rc != SQLITE_OK)
        return txn_sql(s, te, rc, "prepare local snapshot");
    sqlite3_bind_int64(st, 1, (int64_t)l->last_index);
    sqlite3_bind_int64(st, 2, (int64_t)l->last_term);
    sqlite3_bind_blob(st, 3, l->membership_len ? l->membership : "", (int)l->membership_len,
                      SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return txn_sql(s, te, rc, "record local snapshot");
    t->has_snap = true;
    t->snap_index = l->last_index;
    t->snap_term = l->last_term;
    return 0;
}

static int apply_batch(struct store *s, struct store_wstate *t, const struct store_pending *p,
                       struct txn_error *te)
{
    int rc = 0;
    bool wrote = false;
    if (p->has_cluster_id) {
        rc = apply_cluster_id(s, t, p->cluster_id, te);
        wrote = true;
    }
    if (rc == 0 && p->has_hard_state) {
        rc = apply_hard_state(s, t, &p->hard_state, te);
        wrote = true;
    }
    if (rc == 0 && p->has_chunk) {
        rc = apply_chunk(s, t, &p->chunk, te);
        wrote = true;
    }
    if (rc == 0 && p->truncate_from != 0)
        rc = apply_truncate(s, t, p, te);
    if (rc == 0 && p->n_entries > 0) {
        rc = apply_entries(s, t, p, te);
        wrote = true;
    }
    if (rc == 0 && p->has_local) {
        rc = apply_local_snapshot(s, t, &p->local, te);
        wrote = true;
    }
    if (rc == 0 && !wrote) {
        /* An empty batch is a barrier/probe: make it a real write + sync. */
        sqlite3_stmt *st = stmt_get(s, ST_TOUCH, te);
        rc = st ? stmt_run(s, st, te, "probe write") : te->code;
    }
    if (rc < 0)
        return rc;
    /* A node's log never holds a term it has not adopted (§5.1: terms are
     * persisted before acting on them). */
    if (t->last_term > t->term || t->snap_term > t->term)
        return txn_fail(te, -EINVAL,
                        "batch %" PRIu64 " leaves log term %" PRIu64 " above current term %" PRIu64,
                        p->seq, PB_MAX(t->last_term, t->snap_term), t->term);
    return 0;
}

/* One transaction for a list of batches. On failure the transaction is rolled
 * back and nothing of it is visible. */
static int commit_batches(struct store *s, struct store_pending *list, struct txn_error *te,
                          uint64_t *commit_us)
{
    struct store_wstate t = s->ws;
    store_fault_vfs_begin(s->fvfs);
    int rc = exec_sql(s, "BEGIN IMMEDIATE", te);
    for (struct store_pending *p = list; rc == 0 && p != NULL; p = p->next)
        rc = apply_batch(s, &t, p, te);
    if (rc == 0) {
        uint64_t t0 = pb_now_us();
        int src = sqlite3_exec(s->w, "COMMIT", NULL, NULL, NULL);
        *commit_us = pb_now_us() - t0;
        if (src != SQLITE_OK)
            rc = txn_sql(s, te, src, "commit");
    }
    if (rc < 0 && !sqlite3_get_autocommit(s->w))
        sqlite3_exec(s->w, "ROLLBACK", NULL, NULL, NULL);
    store_fault_vfs_end(s->fvfs);
    if (rc == 0)
        s->ws = t;
    return rc;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void notify_loop(struct store *s)
{
    uint64_t one = 1;
    if (write(s->efd, &one, sizeof(one)) < 0)
        log_warning("store: eventfd write: %s", strerror(errno));
}

/* Queues a completion (caller holds mu). Successive successes merge. */
static void push_completion(struct store *s, uint64_t first, uint64_t last, int status)
{
    if (s->n_done > 0) {
        struct store_completion *prev = &s->done[s->n_done - 1];
        if (status == 0 && prev->status == 0 && prev->last_seq + 1 == first) {
            prev->last_seq = last;
            return;
        }
    }
    if (s->n_done == s->cap_done) {
        s->cap_done = s->cap_done ? s->cap_done * 2 : 8;
        s->done = pb_xreallocarray(s->done, s->cap_done, sizeof(*s->done));
    }
    s->done[s->n_done++] = (struct store_completion){first, last, status};
}

static void free_list(struct store_pending *p)
{
    while (p != NULL) {
        struct store_pending *next = p->next;
        free(p->mem);
        free(p);
        p = next;
    }
}

/* Enters the degraded state and fails list plus everything queued. */
static void fail_all(struct store *s, struct store_pending *list, const struct txn_error *te)
{
    log_err("raft.db write failed, not acknowledging until retried: %s code=%d", te->msg, te->code);
    pthread_mutex_lock(&s->mu);
    s->degraded = true;
    s->deg_code = te->code;
    snprintf(s->deg_msg, sizeof(s->deg_msg), "%s", te->msg);
    s->deg_since_ms = wall_ms();
    uint64_t first = list ? list->seq : 0, last = 0;
    for (struct store_pending *p = list; p != NULL; p = p->next)
        last = p->seq;
    struct store_pending *queued = s->q_head;
    s->q_head = NULL;
    s->q_tail = &s->q_head;
    for (struct store_pending *p = queued; p != NULL; p = p->next) {
        if (first == 0)
            first = p->seq;
        last = p->seq;
    }
    push_completion(s, first, last, te->code);
    pthread_mutex_unlock(&s->mu);
    free_list(queued);
    notify_loop(s);
}

static int wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    struct store *s = arg;
    (void)db;
    (void)name;
    s->wal_frames = (unsigned)frames;
    return SQLITE_OK;
}

static int reopen_writer(struct store *s, struct txn_error *te)
{
    struct pb_error err;
    pb_error_clear(&err);
    stmt_cache_clear(s);
    sqlite3_close(s->w);
    s->w = NULL;
    int rc = store_open_writer(s, &err);
    if (rc == 0)
        rc = store_load_wstate(s->w, &s->ws, &err);
    if (rc < 0)
        return txn_fail(te, rc, "reopen: %s", err.msg);
    sqlite3_wal_hook(s->w, wal_hook, s);
    log_notice("raft.db reopened after a failure last_index=%" PRIu64, s->ws.last);
    return 0;
}

/* Compaction target clamped to what a snapshot covers (caller holds mu). */
static uint64_t compact_goal(const struct store *s)
{
    if (!s->ws.has_snap)
        return 0;
    return PB_MIN(s->compact_target, s->ws.snap_index + 1);
}

static int compact_slice(struct store *s, uint64_t goal, struct txn_error *te)
{
    uint64_t upto = PB_MIN(goal, s->ws.first + STORE_COMPACT_SLICE);
    store_fault_vfs_begin(s->fvfs);
    int rc = exec_sql(s, "BEGIN IMMEDIATE", te);
    if (rc == 0) {
        sqlite3_stmt *st = stmt_get(s, ST_DEL_BELOW, te);
        if (st == NULL) {
            rc = te->code;
        } else {
            sqlite3_bind_int64(st, 1, (int64_t)upto);
            rc = stmt_run(s, st, te, "compact log");
        }
    }
    if (rc == 0) {
        int src = sqlite3_exec(s->w, "COMMIT", NULL, NULL, NULL);
        if (src != SQLITE_OK)
            rc = txn_sql(s, te, src, "commit compaction");
    }
    if (rc < 0 && !sqlite3_get_autocommit(s->w))
        sqlite3_exec(s->w, "ROLLBACK", NULL, NULL, NULL);
    store_fault_vfs_end(s->fvfs);
    if (rc == 0)
        s->ws.first = upto;
    return rc;
}

/* Housekeeping after a commit: checkpoint a grown WAL, give back free pages
 * after large compactions. Failures here lose nothing (the WAL keeps the
 * data), so they are only logged. */
static void housekeeping(struct store *s, bool compacted)
{
    bool checkpointed = false;
    unsigned page = s->page_size ? s->page_size : 4096;
    if (s->wal_frames >= STORE_CHECKPOINT_BYTES / page) {
        int nlog = 0, nckpt = 0;
        int rc = sqlite3_wal_checkpoint_v2(s->w, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY)
            log_warning("raft.db checkpoint failed: %s", sqlite3_errmsg(s->w));
        s->wal_frames = 0;
        checkpointed = true;
    }
    /* Pages are freed by compaction (and by the rarer truncations and
     * snapshot replacements, which the next checkpoint's look catches):
     * not worth a statement after every commit at one entry per commit. */
    if (!compacted && !checkpointed)
        return;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(s->w, "PRAGMA freelist_count", -1, &st, NULL) != SQLITE_OK)
        return;
    int64_t free_pages = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    if (free_pages > (int64_t)(STORE_VACUUM_FREE_BYTES / page)) {
        char sql[64];
        snprintf(sql, sizeof(sql), "PRAGMA incremental_vacuum(%u)", STORE_VACUUM_STEP_BYTES / page);
        if (sqlite3_exec(s->w, sql, NULL, NULL, NULL) != SQLITE_OK)
            log_warning("raft.db incremental_vacuum failed: %s", sqlite3_errmsg(s->w));
    }
}

static void *storage_thread(void *arg)
{
    struct store *s = arg;
    sqlite3_wal_hook(s->w, wal_hook, s);
    sqlite3_stmt *ps;
    if (sqlite3_prepare_v2(s->w, "PRAGMA page_size", -1, &ps, NULL) == SQLITE_OK) {
        if (sqlite3_step(ps) == SQLITE_ROW && sqlite3_column_int64(ps, 0) >= 512)
            s->page_size = (unsigned)sqlite3_column_int64(ps, 0);
        sqlite3_finalize(ps);
    }
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->q_head == NULL && !s->stopping && !s->reopen &&
               (s->degraded || compact_goal(s) <= s->ws.first))
            pthread_cond_wait(&s->cond, &s->mu);
        if (s->q_head == NULL && s->stopping)
            break;
        struct store_pending *list = s->q_head;
        s->q_head = NULL;
        s->q_tail = &s->q_head;
        bool reopen = s->reopen;
        s->reopen = false;
        uint64_t goal = s->degraded || s->stopping ? 0 : compact_goal(s);
        pthread_mutex_unlock(&s->mu);

        struct txn_error te = {0, ""};
        int rc = reopen ? reopen_writer(s, &te) : 0;
        if (rc < 0) {
            fail_all(s, list, &te);
            free_list(list);
        } else if (list != NULL) {
            uint64_t commit_us = 0;
            rc = commit_batches(s, list, &te, &commit_us);
            if (rc == 0) {
                uint64_t last = list->seq;
                for (struct store_pending *p = list; p != NULL; p = p->next)
                    last = p->seq;
                pthread_mutex_lock(&s->mu);
                s->last_persisted_seq = last;
                s->n_transactions++;
                s->n_batches += last - list->seq + 1;
                pb_hist_observe_us(&s->commit_hist, commit_us);
                push_completion(s, list->seq, last, 0);
                pthread_mutex_unlock(&s->mu);
                notify_loop(s);
            } else {
                fail_all(s, list, &te);
            }
            free_list(list);
        }
        /* One compaction slice between batch transactions. */
        bool compacted = false;
        if (rc == 0 && goal > s->ws.first) {
            rc = compact_slice(s, goal, &te);
            if (rc < 0)
                fail_all(s, NULL, &te);
            compacted = true;
        }
        if (rc == 0)
            housekeeping(s, compacted);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    stmt_cache_clear(s);
    return NULL;
}

int store_thread_start(struct store *s)
{
    /* The thread blocks every signal so that the daemon's handlers (SIGTERM,
     * SIGHUP) run on the loop thread; it inherits the mask at creation. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&s->thread, NULL, storage_thread, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    pthread_setname_np(s->thread, "pb-store");
    s->thread_started = true;
    return 0;
}

void store_thread_stop(struct store *s)
{
    if (!s->thread_started)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->thread_started = false;
}

static bool too_big(uint64_t v)
{
    return v > (uint64_t)INT64_MAX;
}

int store_submit(struct store *s, const struct store_batch *b, uint64_t *seq)
{
    *seq = 0;
    size_t bytes = 0;
    for (size_t i = 0; i < b->n_entries; i++) {
        const struct store_entry *e = &b->entries[i];
        if (too_big(e->index) || too_big(e->term) || e->index == 0)
            return -EINVAL;
        if (e->len > STORE_MAX_BLOB)
            return -E2BIG;
        if (!b->borrow_entries)
            bytes += e->len;
    }
    if (b->hard_state && too_big(b->hard_state->term))
        return -EINVAL;
    if (too_big(b->truncate_from))
        return -EINVAL;
    const struct store_snapshot_chunk *c = b->snapshot_chunk;
    if (c != NULL) {
        if (too_big(c->last_index) || too_big(c->last_term) || too_big(c->offset) ||
            c->last_index == 0)
            return -EINVAL;
        if (c->len > STORE_MAX_BLOB || c->membership_len > STORE_MAX_BLOB)
            return -E2BIG;
        bytes += c->len + (c->offset == 0 ? c->membership_len : 0);
    }
    const struct store_local_snapshot *l = b->local_snapshot;
    if (l != NULL) {
        if (too_big(l->last_index) || too_big(l->last_term) || l->last_index == 0)
            return -EINVAL;
        if (l->membership_len > STORE_MAX_BLOB)
            return -E2BIG;
        bytes += l->membership_len;
    }

    struct store_pending *p = pb_xcalloc(1, sizeof(*p));
    p->mem = pb_xmalloc(bytes + b->n_entries * sizeof(struct store_entry));
    uint8_t *m = p->mem;
    if (b->n_entries > 0) {
        p->entries = (struct store_entry *)(void *)m;
        m += b->n_entries * sizeof(struct store_entry);
        p->n_entries = b->n_entries;
        for (size_t i = 0; i < b->n_entries; i++) {
            p->entries[i] = b->entries[i];
            if (b->borrow_entries)
                continue; /* the owner keeps them until the completion */
            p->entries[i].data = m;
            if (b->entries[i].len)
                memcpy(m, b->entries[i].data, b->entries[i].len);
            m += b->entries[i].len;
        }
    }
    if (b->cluster_id != NULL) {
        p->has_cluster_id = true;
        memcpy(p->cluster_id, b->cluster_id, STORE_CLUSTER_ID_LEN);
    }
    if (b->hard_state != NULL) {
        p->has_hard_state = true;
        p->hard_state = *b->hard_state;
    }
    p->truncate_from = b->truncate_from;
    if (c != NULL) {
        p->has_chunk = true;
        p->chunk = *c;
        p->chunk.membership_len = c->offset == 0 ? c->membership_len : 0;
        p->chunk.membership = m;
        if (p->chunk.membership_len)
            memcpy(m, c->membership, p->chunk.membership_len);
        m += p->chunk.membership_len;
        p->chunk.data = m;
        if (c->len)
            memcpy(m, c->data, c->len);
        m += c->len;
    }
    if (l != NULL) {
        p->has_local = true;
        p->local = *l;
        p->local.membership = m;
        if (l->membership_len)
            memcpy(m, l->membership, l->membership_len);
        m += l->membership_len;
    }

    pthread_mutex_lock(&s->mu);
    if (s->degraded) {
        int code = s->deg_code;
        pthread_mutex_unlock(&s->mu);
        free(p->mem);
        free(p);
        return code;
    }
    p->seq = s->next_seq++;
    *seq = p->seq; /* p belongs to the storage thread once unlocked */
    *s->q_tail = p;
    s->q_tail = &p->next;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int store_compact(struct store *s, uint64_t below_index)
{
    pthread_mutex_lock(&s->mu);
    if (below_index > s->compact_target) {
        s->compact_target = below_index;
        pthread_cond_signal(&s->cond);
    }
    pthread_mutex_unlock(&s->mu);
    return 0;
}
