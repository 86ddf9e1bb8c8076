/*
 * store_int.h: what the files of src/store share and nobody else sees: the
 * struct store itself, the storage thread's cached view of the log, the SQL
 * helpers and the fault-injection VFS. Not part of the module's contract.
 */
#ifndef PICKBOX_STORE_STORE_INT_H
#define PICKBOX_STORE_STORE_INT_H

#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "store/store.h"

/* The storage thread's view of what is durable (updated only on commit). An
 * empty log has first == last + 1 and last == snap_index (or 0). */
struct store_wstate {
    uint64_t term;
    uint64_t vote;
    bool has_cluster_id;
    bool has_snap;
    uint64_t snap_index;
    uint64_t snap_term;
    uint64_t first;
    uint64_t last;
    uint64_t last_term;
};

/* A submitted batch, deep-copied. */
struct store_pending {
    struct store_pending *next;
    uint64_t seq;
    bool has_cluster_id;
    uint8_t cluster_id[STORE_CLUSTER_ID_LEN];
    bool has_hard_state;
    struct store_hard_state hard_state;
    uint64_t truncate_from;
    struct store_entry *entries;
    size_t n_entries;
    bool has_chunk;
    struct store_snapshot_chunk chunk;
    bool has_local;
    struct store_local_snapshot local;
    uint8_t *mem; /* one allocation holding every copied byte */
};

struct store_fault_vfs;

struct store {
    char *path;
    int lock_fd;
    sqlite3 *w; /* writer: the storage thread's after open */
    sqlite3 *r; /* reader: the loop thread's */
    struct store_fault_vfs *fvfs;
    struct store_wstate ws;
    unsigned wal_frames;
    unsigned page_size; /* the writer's, read when its thread starts */
#define STORE_WSTMT_MAX 16
    sqlite3_stmt *wstmt[STORE_WSTMT_MAX]; /* the writer's cached statements */

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    /* Guarded by mu. */
    struct store_pending *q_head;
    struct store_pending **q_tail;
    uint64_t next_seq;
    uint64_t last_persisted_seq;
    uint64_t n_transactions;
    uint64_t n_batches;
    struct pb_hist commit_hist;
    bool stopping;
    bool reopen;
    uint64_t compact_target;
    bool degraded;
    int deg_code;
    char deg_msg[256];
    uint64_t deg_since_ms;
    struct store_completion *done;
    size_t n_done;
    size_t cap_done;

    int efd;
    struct event *ev;
    void (*on_complete)(void *arg, const struct store_completion *c);
    void *arg;
};

/* commit.c: the storage thread. */
int store_thread_start(struct store *s);
void store_thread_stop(struct store *s);

/* store.c */
int store_open_writer(struct store *s, struct pb_error *err);

/* schema.c: SQL helpers (errors name the statement and SQLite's message). */
int store_sqlite_errno(int rc);
int store_sql_error(sqlite3 *db, int rc, struct pb_error *err, const char *what);
int store_exec(sqlite3 *db, const char *sql, struct pb_error *err);
int store_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st, struct pb_error *err);
/* First and last log index and the last entry's term; an empty log
 * continues after the snapshot (snap_index, snap_term; 0 = none). */
int store_log_bounds(sqlite3 *db, uint64_t snap_index, uint64_t snap_term, uint64_t *first,
                     uint64_t *last, uint64_t *last_term, struct pb_error *err);
int store_query_i64(sqlite3 *db, const char *sql, int64_t *out, struct pb_error *err);
uint32_t store_entry_crc(uint64_t index, uint64_t term, uint8_t type, const void *data, size_t len);
/* schema.c: the open-time steps, in this order. */
int store_init_schema(sqlite3 *db, struct pb_error *err);
int store_drop_incomplete(sqlite3 *db, struct pb_error *err);
int store_load_wstate(sqlite3 *db, struct store_wstate *ws, struct pb_error *err);
int store_validate(sqlite3 *db, const struct store_wstate *ws, struct pb_error *err);
int store_quick_check(sqlite3 *db, struct pb_error *err);

/* faultvfs.c: a shim over the default VFS whose writes or syncs can be made to
 * fail for the next n write transactions. One per store, registered under a
 * unique name. */
struct store_fault_vfs *store_fault_vfs_new(void);
const char *store_fault_vfs_name(const struct store_fault_vfs *f);
void store_fault_vfs_free(struct store_fault_vfs *f);
void store_fault_vfs_arm(struct store_fault_vfs *f, enum store_fault kind, unsigned n);
/* Called by the thread that runs the transaction, around it. */
void store_fault_vfs_begin(struct store_fault_vfs *f);
void store_fault_vfs_end(struct store_fault_vfs *f);

#endif
