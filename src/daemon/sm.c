/*
 * sm.c: applied index, client sessions and snapshots in state.db (see sm.h).
 */
#include <config.h>

#include "daemon/sm.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"

#define SM_FORMAT     1
#define SM_SNAP_MAGIC 0x50425353u /* "PBSS" */
#define SM_SNAP_VER   1

/* Open addressing, linear probing; key 0 is "empty" (client_id 0 is never a
 * session). */
struct sm_sessions {
    uint64_t *keys;
    uint64_t *vals;
    size_t cap; /* power of two */
    size_t n;
};

struct sm {
    sqlite3 *db;
    sqlite3_stmt *st_session; /* INSERT OR REPLACE INTO sessions */
    sqlite3_stmt *st_applied; /* UPDATE meta SET applied */
    uint64_t applied;
    struct sm_sessions sess;
    struct sm_hooks hooks;
    bool has_hooks;
    const uint8_t *install_app; /* during sm_snapshot_install() */
    size_t install_app_len;
    uint8_t *snap; /* current snapshot blob */
    size_t snap_len;
    uint64_t snap_index;
};

/* ---- session table ---- */

static size_t sess_slot(const struct sm_sessions *t, uint64_t key)
{
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (t->cap - 1);
}

static uint64_t *sess_find(struct sm_sessions *t, uint64_t key)
{
    if (t->cap == 0)
        return NULL;
    for (size_t i = sess_slot(t, key);; i = (i + 1) & (t->cap - 1)) {
        if (t->keys[i] == key)
            return &t->vals[i];
        if (t->keys[i] == 0)
            return NULL;
    }
}

static void sess_put(struct sm_sessions *t, uint64_t key, uint64_t val);

static void sess_grow(struct sm_sessions *t)
{
    struct sm_sessions old = *t;
    t->cap = old.cap ? old.cap * 2 : 64;
    t->keys = pb_xcalloc(t->cap, sizeof(*t->keys));
    t->vals = pb_xcalloc(t->cap, sizeof(*t->vals));
    t->n = 0;
    for (size_t i = 0; i < old.cap; i++) {
        if (old.keys[i] != 0)
            sess_put(t, old.keys[i], old.vals[i]);
    }
    free(old.keys);
    free(old.vals);
}

static void sess_put(struct sm_sessions *t, uint64_t key, uint64_t val)
{
    uint64_t *v = sess_find(t, key);
    if (v != NULL) {
        *v = val;
        return;
    }
    if ((t->n + 1) * 4 > t->cap * 3)
        sess_grow(t);
    size_t i = sess_slot(t, key);
    while (t->keys[i] != 0)
        i = (i + 1) & (t->cap - 1);
    t->keys[i] = key;
    t->vals[i] = val;
    t->n++;
}

static void sess_clear(struct sm_sessions *t)
{
    free(t->keys);
    free(t->vals);
    memset(t, 0, sizeof(*t));
}

/* ---- SQLite helpers ---- */

static int sm_sql_error(struct sm *sm, struct pb_error *err, const char *what)
{
    int ext = sqlite3_extended_errcode(sm->db);
    int prim = ext & 0xff;
    int code = prim == SQLITE_FULL ? -ENOSPC : prim == SQLITE_NOMEM ? -ENOMEM : -EIO;
    return pb_error_set(err, code, "state.db: %s: %s", what, sqlite3_errmsg(sm->db));
}

static int sm_exec(struct sm *sm, const char *sql, struct pb_error *err)
{
    char *msg = NULL;
    int rc = sqlite3_exec(sm->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        int code = (rc & 0xff) == SQLITE_FULL ? -ENOSPC : -EIO;
        pb_error_set(err, code, "state.db: %s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        return code;
    }
    return 0;
}

static void sm_rollback(struct sm *sm)
{
    if (!sqlite3_get_autocommit(sm->db))
        sqlite3_exec(sm->db, "ROLLBACK", NULL, NULL, NULL);
}

static int sm_load(struct sm *sm, struct pb_error *err)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(sm->db, "SELECT format, applied FROM meta WHERE id = 1", -1, &st,
                           NULL) != SQLITE_OK)
        return sm_sql_error(sm, err, "read meta");
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        int64_t format = sqlite3_column_int64(st, 0);
        sm->applied = (uint64_t)sqlite3_column_int64(st, 1);
        sqlite3_finalize(st);
        if (format > SM_FORMAT)
            return pb_error_set(err, -EPROTONOSUPPORT,
                                "state.db has format %" PRId64
                                ", written by a newer pickbox (this one knows %d)",
                                format, SM_FORMAT);
    } else {
        sqlite3_finalize(st);
        return sm_sql_error(sm, err, "meta row missing");
    }
    if (sqlite3_prepare_v2(sm->db, "SELECT client_id, seq FROM sessions", -1, &st, NULL) !=
        SQLITE_OK)
        return sm_sql_error(sm, err, "read sessions");
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        uint64_t k = (uint64_t)sqlite3_column_int64(st, 0);
        if (k != 0)
            sess_put(&sm->sess, k, (uint64_t)sqlite3_column_int64(st, 1));
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return sm_sql_error(sm, err, "read sessions");
    if (sqlite3_prepare_v2(sm->db, "SELECT idx, data FROM snapshot WHERE id = 1", -1, &st, NULL) !=
        SQLITE_OK)
        return sm_sql_error(sm, err, "read snapshot");
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        sm->snap_index = (uint64_t)sqlite3_column_int64(st, 0);
        sm->snap_len = (size_t)sqlite3_column_bytes(st, 1);
        sm->snap = pb_xmalloc(sm->snap_len ? sm->snap_len : 1);
        if (sm->snap_len)
            memcpy(sm->snap, sqlite3_column_blob(st, 1), sm->snap_len);
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return sm_sql_error(sm, err, "read snapshot");
    return 0;
}

int sm_open(struct sm **out, const char *dir, struct pb_error *err)
{
    *out = NULL;
    struct sm *sm = pb_xcalloc(1, sizeof(*sm));
    char *path = pb_xasprintf("%s/%s", dir, SM_DB_NAME);
    int rc = sqlite3_open_v2(
            path, &sm->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        rc = pb_error_set(err, -EIO, "cannot open %s: %s", path,
                          sm->db ? sqlite3_errmsg(sm->db) : sqlite3_errstr(rc));
        goto fail;
    }
    sqlite3_busy_timeout(sm->db, 1000);
    rc = sm_exec(sm,
                 "PRAGMA journal_mode = WAL;"
                 "PRAGMA synchronous = NORMAL;"
                 "CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), "
                 "  format INTEGER NOT NULL, applied INTEGER NOT NULL);"
                 "CREATE TABLE IF NOT EXISTS sessions (client_id INTEGER PRIMARY KEY, "
                 "  seq INTEGER NOT NULL);"
                 "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), "
                 "  idx INTEGER NOT NULL, term INTEGER NOT NULL, data BLOB NOT NULL);"
                 "INSERT OR IGNORE INTO meta (id, format, applied) VALUES (1, 1, 0);",
                 err);
    if (rc < 0) {
        pb_error_prefix(err, "%s: ", path);
        goto fail;
    }
    if ((rc = sm_load(sm, err)) < 0)
        goto fail;
    if (sqlite3_prepare_v2(sm->db,
                           "INSERT OR REPLACE INTO sessions (client_id, seq) VALUES (?1, ?2)", -1,
                           &sm->st_session, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(sm->db, "UPDATE meta SET applied = ?1 WHERE id = 1", -1, &sm->st_applied,
                           NULL) != SQLITE_OK) {
        rc = sm_sql_error(sm, err, "prepare");
        goto fail;
    }
    free(path);
    *out = sm;
    return 0;
fail:
    free(path);
    sm_close(sm);
    return rc;
}

void sm_close(struct sm *sm)
{
    if (sm == NULL)
        return;
    sqlite3_finalize(sm->st_session);
    sqlite3_finalize(sm->st_applied);
    sqlite3_close(sm->db);
    sess_clear(&sm->sess);
    free(sm->snap);
    free(sm);
}

void sm_set_hooks(struct sm *sm, const struct sm_hooks *hooks)
{
    sm->has_hooks = hooks != NULL;
    if (hooks != NULL)
        sm->hooks = *hooks;
    else
        memset(&sm->hooks, 0, sizeof(sm->hooks));
}

uint64_t sm_applied(const struct sm *sm)
{
    return sm->applied;
}

size_t sm_sessions(const struct sm *sm)
{
    return sm->sess.n;
}

uint64_t sm_session_seq(const struct sm *sm, uint64_t client_id)
{
    uint64_t *v = sess_find((struct sm_sessions *)(uintptr_t)&sm->sess, client_id);
    return v ? *v : 0;
}

static int sm_step_stmt(struct sm *sm, sqlite3_stmt *st, struct pb_error *err, const char *what)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE)
        return sm_sql_error(sm, err, what);
    return 0;
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
    /* Sessions first in a scratch list, so that a failed transaction leaves
     * memory untouched. Within one batch a client appears in order. */
    bool *fresh = pb_xcalloc(n, sizeof(*fresh));
    int rc = sm_exec(sm, "BEGIN", err);
    if (rc < 0)
        goto out;
    for (size_t i = i0; i < n; i++) {
        const struct raft_entry *x = &e[i];
        if (x->type != RAFT_ENTRY_NORMAL || x->client_id == 0)
            continue;
        uint64_t seen = sm_session_seq(sm, x->client_id);
        for (size_t j = i0; j < i; j++) {
            if (fresh[j] && e[j].client_id == x->client_id && e[j].seq > seen)
                seen = e[j].seq;
        }
        if (x->seq <= seen)
            continue; /* a retry of an op already applied */
        fresh[i] = true;
        /* Without hooks, client entries are probes: no effect beyond the
         * session. */
        if (sm->has_hooks && sm->hooks.apply != NULL &&
            (rc = sm->hooks.apply(sm->hooks.arg, sm->db, x)) < 0) {
            pb_error_set(err, rc, "state machine: applying entry %" PRIu64 " failed: %s", x->index,
                         strerror(-rc));
            goto out;
        }
        sqlite3_bind_int64(sm->st_session, 1, (int64_t)x->client_id);
        sqlite3_bind_int64(sm->st_session, 2, (int64_t)x->seq);
        if ((rc = sm_step_stmt(sm, sm->st_session, err, "write session")) < 0)
            goto out;
    }
    sqlite3_bind_int64(sm->st_applied, 1, (int64_t)e[n - 1].index);
    if ((rc = sm_step_stmt(sm, sm->st_applied, err, "write applied index")) < 0)
        goto out;
    rc = sm_exec(sm, "COMMIT", err);
    if (rc < 0)
        goto out;
    sm->applied = e[n - 1].index;
    for (size_t i = i0; i < n; i++) {
        if (fresh[i])
            sess_put(&sm->sess, e[i].client_id, e[i].seq);
    }
    for (size_t i = i0; i < n && cb != NULL; i++) {
        if (fresh[i])
            cb(arg, &e[i]);
    }
out:
    if (rc < 0)
        sm_rollback(sm);
    free(fresh);
    return rc;
}

/* Writes the snapshot row and (for an install) the sessions and applied
 * index, with a full sync: compaction of raft.db relies on it. */
static int sm_snapshot_store(struct sm *sm, uint64_t index, uint64_t term, const uint8_t *data,
                             size_t len, bool install, struct pb_error *err)
{
    int rc = sm_exec(sm, "PRAGMA synchronous = FULL; BEGIN", err);
    if (rc < 0)
        goto out;
    if (install) {
        rc = sm_exec(sm, "DELETE FROM sessions", err);
        if (rc < 0)
            goto out;
        for (size_t i = 0; i < sm->sess.cap; i++) {
            if (sm->sess.keys[i] == 0)
                continue;
            sqlite3_bind_int64(sm->st_session, 1, (int64_t)sm->sess.keys[i]);
            sqlite3_bind_int64(sm->st_session, 2, (int64_t)sm->sess.vals[i]);
            if ((rc = sm_step_stmt(sm, sm->st_session, err, "write session")) < 0)
                goto out;
        }
        sqlite3_bind_int64(sm->st_applied, 1, (int64_t)index);
        if ((rc = sm_step_stmt(sm, sm->st_applied, err, "write applied index")) < 0)
            goto out;
        if (sm->has_hooks && sm->hooks.snapshot_read != NULL) {
            rc = sm->hooks.snapshot_read(sm->hooks.arg, sm->db, sm->install_app,
                                         sm->install_app_len);
            if (rc < 0) {
                pb_error_set(err, rc, "state machine: installing the application's state: %s",
                             strerror(-rc));
                goto out;
            }
        }
    }
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(sm->db,
                           "INSERT OR REPLACE INTO snapshot (id, idx, term, data) "
                           "VALUES (1, ?1, ?2, ?3)",
                           -1, &st, NULL) != SQLITE_OK) {
        rc = sm_sql_error(sm, err, "prepare snapshot");
        goto out;
    }
    sqlite3_bind_int64(st, 1, (int64_t)index);
    sqlite3_bind_int64(st, 2, (int64_t)term);
    sqlite3_bind_blob(st, 3, len ? (const void *)data : "", (int)len, SQLITE_STATIC);
    rc = sm_step_stmt(sm, st, err, "write snapshot");
    sqlite3_finalize(st);
    if (rc < 0)
        goto out;
    rc = sm_exec(sm, "COMMIT", err);
out:
    if (rc < 0)
        sm_rollback(sm);
    sqlite3_exec(sm->db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    return rc;
}

int sm_snapshot_take(struct sm *sm, uint64_t term, uint64_t *size, struct pb_error *err)
{
    struct buf b = BUF_INIT;
    buf_put_u32(&b, SM_SNAP_MAGIC);
    buf_put_u8(&b, SM_SNAP_VER);
    buf_put_u64(&b, sm->applied);
    buf_put_u64(&b, term);
    buf_put_u32(&b, (uint32_t)sm->sess.n);
    for (size_t i = 0; i < sm->sess.cap; i++) {
        if (sm->sess.keys[i] == 0)
            continue;
        buf_put_u64(&b, sm->sess.keys[i]);
        buf_put_u64(&b, sm->sess.vals[i]);
    }
    /* The application's state follows, length-prefixed. */
    size_t at = b.len;
    buf_put_u32(&b, 0);
    if (sm->has_hooks && sm->hooks.snapshot_write != NULL) {
        int hrc = sm->hooks.snapshot_write(sm->hooks.arg, sm->db, &b);
        if (hrc < 0) {
            buf_free(&b);
            return pb_error_set(err, hrc, "state machine: snapshot of the application failed: %s",
                                strerror(-hrc));
        }
    }
    pb_store_u32(b.data + at, (uint32_t)(b.len - at - 4));
    int rc = sm_snapshot_store(sm, sm->applied, term, b.data, b.len, false, err);
    if (rc < 0) {
        buf_free(&b);
        return rc;
    }
    free(sm->snap);
    sm->snap = buf_steal(&b, &sm->snap_len);
    sm->snap_index = sm->applied;
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
    struct cursor c;
    cursor_init(&c, data, len);
    uint32_t magic = cursor_u32(&c);
    uint8_t ver = cursor_u8(&c);
    uint64_t s_index = cursor_u64(&c);
    uint64_t s_term = cursor_u64(&c);
    uint32_t n = cursor_u32(&c);
    if (!cursor_ok(&c) || magic != SM_SNAP_MAGIC || ver != SM_SNAP_VER || s_index != index ||
        s_term != term || (uint64_t)n * 16 > cursor_remaining(&c))
        return pb_error_set(err, -EINVAL, "snapshot %" PRIu64 "/%" PRIu64 " is malformed", index,
                            term);
    struct sm_sessions fresh = {0};
    for (uint32_t i = 0; i < n; i++) {
        uint64_t k = cursor_u64(&c), v = cursor_u64(&c);
        if (k != 0)
            sess_put(&fresh, k, v);
    }
    size_t app_len = 0;
    const uint8_t *app = cursor_bytes(&c, len, &app_len);
    if (!cursor_ok(&c) || cursor_remaining(&c) != 0) {
        sess_clear(&fresh);
        return pb_error_set(err, -EINVAL, "snapshot %" PRIu64 "/%" PRIu64 " is malformed", index,
                            term);
    }
    struct sm_sessions old = sm->sess;
    uint64_t old_applied = sm->applied;
    sm->sess = fresh;
    sm->install_app = app;
    sm->install_app_len = app_len;
    int rc = sm_snapshot_store(sm, index, term, data, len, true, err);
    sm->install_app = NULL;
    if (rc < 0) {
        sm->sess = old;
        sm->applied = old_applied;
        sess_clear(&fresh);
        return rc;
    }
    sess_clear(&old);
    sm->applied = index;
    free(sm->snap);
    sm->snap = pb_xmalloc(len ? len : 1);
    memcpy(sm->snap, data, len);
    sm->snap_len = len;
    sm->snap_index = index;
    return 0;
}
