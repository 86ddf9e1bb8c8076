/*
 * sm.h: the replicated state machine of this stage, in state.db.
 *
 * It applies committed Raft entries in order and keeps, durably, what every
 * node must agree on: the applied index and the client session table
 * {client_id -> highest seq applied} that makes retried proposals take
 * effect exactly once (raft.h, "Exactly-once"). NORMAL entries are no-op
 * probes for now; the file tree's state machine (src/fsm) will plug in at
 * sm_apply(). One SQLite file, state.db, in WAL mode with synchronous=NORMAL:
 * the applied index is written in the same transaction as the effects, so a
 * crash loses a suffix of applications that Raft replays from raft.db (which
 * is compacted only up to a snapshot, and a snapshot is written with a full
 * sync).
 *
 * Snapshots: sm_snapshot_take() serializes the state (applied index, term,
 * sessions) into a blob kept in memory and in state.db, from which chunks
 * are served to lagging peers; sm_snapshot_install() replaces the state with
 * a received blob (validated: it comes from the network).
 *
 * Threading: one thread (the event loop). Errors: 0 or a negative errno.
 */
#ifndef PICKBOX_DAEMON_SM_H
#define PICKBOX_DAEMON_SM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"

struct raft_entry;
struct sm;

#define SM_DB_NAME "state.db"

/* Called for each client entry applied for the first time (not for a
 * duplicate (client_id, seq), which is skipped). */
typedef void (*sm_applied_fn)(void *arg, const struct raft_entry *e);

/* Where the application's state machine (the file tree, src/fsm) plugs in.
 * Without hooks NORMAL entries are no-op probes. db is state.db's
 * connection: the hooks may create and use their own tables in it; apply
 * and snapshot_read run inside sm's transaction (never BEGIN/COMMIT). Every
 * function returns 0 or a negative errno, which aborts (rolls back) the
 * whole batch or install. */
struct sqlite3;
struct buf;
struct sm_hooks {
    void *arg;
    /* A NORMAL entry applied for the first time (at e->index). */
    int (*apply)(void *arg, struct sqlite3 *db, const struct raft_entry *e);
    /* Appends the application's state to b (nothing writes state.db
     * meanwhile: the view is consistent). */
    int (*snapshot_write)(void *arg, struct sqlite3 *db, struct buf *b);
    /* Replaces the application's state with p[0..len) from snapshot_write
     * (untrusted bytes: validate). */
    int (*snapshot_read)(void *arg, struct sqlite3 *db, const uint8_t *p, size_t len);
};

/* Installs hooks (copied; NULL removes them). Call before applying. */
void sm_set_hooks(struct sm *sm, const struct sm_hooks *hooks);

/* Opens (creating) dir/state.db. *out is freed with sm_close(). */
int sm_open(struct sm **out, const char *dir, struct pb_error *err);
void sm_close(struct sm *sm);

/* Index of the last applied entry (0 = none). */
uint64_t sm_applied(const struct sm *sm);
/* Number of client sessions. */
size_t sm_sessions(const struct sm *sm);
/* Highest seq applied for client_id (0 = none). */
uint64_t sm_session_seq(const struct sm *sm, uint64_t client_id);

/* Applies n committed entries (contiguous, starting at applied + 1; entries
 * at or below the applied index are ignored) in one transaction; cb (may be
 * NULL) is called for each first-time client entry after the commit. On an
 * error nothing is applied (in memory either). */
int sm_apply(struct sm *sm, const struct raft_entry *e, size_t n, sm_applied_fn cb, void *arg,
             struct pb_error *err);

/* Serializes the state at the applied index (whose term the caller passes)
 * and keeps it as the current snapshot, durably (full sync). *size gets its
 * length. */
int sm_snapshot_take(struct sm *sm, uint64_t term, uint64_t *size, struct pb_error *err);

/* The current snapshot's index (0 = none) and bytes (owned by sm, valid
 * until the next snapshot call). */
uint64_t sm_snapshot_index(const struct sm *sm);
const uint8_t *sm_snapshot_data(const struct sm *sm, size_t *len);

/* Replaces the whole state with the snapshot blob data (received at index,
 * term), durably, and keeps it as the current snapshot. -EINVAL when the
 * blob is malformed or does not say index/term. */
int sm_snapshot_install(struct sm *sm, uint64_t index, uint64_t term, const uint8_t *data,
                        size_t len, struct pb_error *err);

#endif
