/*
 * sm.h: the node's replicated state machine, a thin adapter from the Raft
 * driver (cluster.c) to the file tree's state machine (src/fsm/apply.h over
 * store/statedb.h): ONE state.db holds the applied index, the client session
 * table (exactly-once), the manifest, chunks and the node-local disk records.
 *
 * Entries: a NORMAL entry whose payload is an fsm op (it starts with the op
 * format version byte, never 0) goes to fsm_apply_entries(), which skips a
 * (client_id, seq) that is not above the session table's. A NORMAL entry
 * with an empty payload or one starting with byte 0 is a probe (cluster
 * `probe`, pickboxctl bench): a counted no-op on every node (only the
 * applied index moves, no session). NOOP and CONF entries likewise.
 *
 * The tree: sm_open() opens the data directory (fsm_tree_open), marking it
 * (fsm_tree_init) only when state.db is fresh. An existing node whose tree
 * lost its `.pickbox/` marker (unmounted, replaced) does not apply: every
 * sm_apply() fails with -ENOMEDIUM (the driver reports a storage error and
 * retries with backoff), so nothing is replicated into or out of a tree that
 * is not the one state.db describes; when the marker is back it resumes
 * (after fsm_apply_repair()). sm_tree_error() says why.
 *
 * Snapshots: sm_snapshot_take() reads statedb's snapshot stream (the
 * replicated tables at the applied index: manifest, chunk lists, chunk
 * metadata, sessions; no chunk bytes, so its size follows the manifest)
 * into <state_dir>/snapshot.pbs ("PBS2", u64 index, u64 term, stream; full
 * sync), streamed: memory stays bounded, and the file is read back with
 * sm_snapshot_read() to send it; sm_snapshot_install() validates and
 * installs a received blob through statedb_install_*() and repairs the tree
 * as far as the chunk bytes on this node allow. The bytes it lacks are
 * fetched from peers by the fetcher (fetch.h), which asks sm_chunks_wanted(),
 * stores them with sm_chunk_store() and then calls sm_repair().
 *
 * The observer (the replica, replica.h) sees the node's own entries: before
 * (ahead of the batch's transaction: the moment to fsm_apply_record_local(),
 * doc/fsm.md step 3) and after (with the result).
 *
 * Threading: one thread (the event loop). Errors: 0 or a negative errno.
 */
#ifndef PICKBOX_DAEMON_SM_H
#define PICKBOX_DAEMON_SM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fsm/apply.h"
#include "lib/error.h"

struct event_base;
struct raft_entry;
struct sm;

#define SM_DB_NAME   "state.db"
#define SM_SNAP_NAME "snapshot.pbs"

/* Called for each client entry applied for the first time (not for a
 * duplicate (client_id, seq) of an fsm op, which is skipped; probes are
 * no-ops and reported every time). */
typedef void (*sm_applied_fn)(void *arg, const struct raft_entry *e);

/* Watches the entries of one client id (the node's own proposals). */
struct sm_observer {
    void *arg;
    uint64_t client_id;
    /* An own op entry about to be applied (after older ones are durable). */
    void (*before)(void *arg, const struct raft_entry *e);
    /* An own op entry applied (r: its result; DUPLICATE: not applied). */
    void (*after)(void *arg, const struct raft_entry *e, const struct fsm_apply_result *r);
    /* Every batch of entries, before anything of it is applied and after
     * (res[i]: entry e[i]'s result; NULL when the batch failed). Any may be
     * NULL. */
    void (*batch_before)(void *arg, const struct raft_entry *e, size_t n);
    void (*batch_after)(void *arg, const struct raft_entry *e, size_t n,
                        const struct fsm_apply_result *res);
};

/* Opens (creating) state_dir/state.db and the tree at data_dir. *out is
 * freed with sm_close(). A tree without its marker on an existing node is
 * not an error here (see above). */
int sm_open(struct sm **out, const char *state_dir, const char *data_dir, struct pb_error *err);
void sm_close(struct sm *sm);

/* Installs (copied) or removes (NULL) the observer. */
void sm_set_observer(struct sm *sm, const struct sm_observer *obs);

/* Index of the last applied entry (0 = none). */
uint64_t sm_applied(const struct sm *sm);

/* The loop the node runs on (idempotent; the replica sets it). With one,
 * PUTs of at least FSM_BIGWRITE_MIN_BYTES (or $PICKBOX_TEST_BIGWRITE_BYTES;
 * 0: never) are written into the tree by a worker thread after their
 * apply, and completed on this loop (src/fsm/bigwrite.h): sm_apply() no
 * longer holds the Raft core frozen for their writes. */
void sm_set_loop(struct sm *sm, struct event_base *base);

/* The highest index whose effects are all in the tree: the applied index,
 * or just below the oldest big file still being written. What the node
 * reports to `sync` (every reachable node applied AND materialized). */
uint64_t sm_materialized(const struct sm *sm);

/* Big files being written in the background (status: tree.writing). */
size_t sm_writing(const struct sm *sm);
/* Highest seq applied for client_id (0 = none). */
uint64_t sm_session_seq(const struct sm *sm, uint64_t client_id);

/* Applies n committed entries (contiguous, starting at applied + 1; entries
 * at or below the applied index are ignored) in one state.db transaction,
 * then materializes them; cb (may be NULL) is called for each first-time
 * client entry after the commit. On an error nothing is applied. */
int sm_apply(struct sm *sm, const struct raft_entry *e, size_t n, sm_applied_fn cb, void *arg,
             struct pb_error *err);

/* Takes a snapshot at the applied index (whose term the caller passes; it
 * must be state.db's) and keeps it as the current one, durably. */
int sm_snapshot_take(struct sm *sm, uint64_t term, uint64_t *size, struct pb_error *err);

/* The current snapshot's index and size in bytes (0 = none). */
uint64_t sm_snapshot_index(const struct sm *sm);
uint64_t sm_snapshot_size(const struct sm *sm);
/* Copies up to len bytes of the current snapshot at offset into buf; *n
 * gets how many (fewer only at its end). -ENOENT without a snapshot, or
 * -errno of the read. */
int sm_snapshot_read(const struct sm *sm, uint64_t offset, void *buf, size_t len, size_t *n);

/* Replaces the replicated state with the blob (received at index, term),
 * durably, repairs the tree and keeps the blob (in snapshot.pbs) as the
 * current snapshot.
 * -EINVAL when the blob is malformed or does not say index/term. */
int sm_snapshot_install(struct sm *sm, uint64_t index, uint64_t term, const uint8_t *data,
                        size_t len, struct pb_error *err);

/* The tree side, for the replica (borrowed; NULL while the tree is in
 * error). */
struct statedb *sm_statedb(struct sm *sm);
struct fsm_tree *sm_tree(struct sm *sm);
struct fsm_apply *sm_fsm(struct sm *sm);
/* Why the tree is not replicated (static until the next call), or NULL. */
const char *sm_tree_error(const struct sm *sm);
/* Brings the tree up to state.db (fsm_apply_repair); logs what it did. */
int sm_repair(struct sm *sm);
/* Tree materialization errors and conflicts seen since open. */
uint64_t sm_tree_failures(const struct sm *sm);

/* True (once; the flag is cleared) if chunk bytes may be missing on this
 * node: after open, after a snapshot install, after a materialization that
 * lacked bytes. */
bool sm_chunks_wanted(struct sm *sm);
/* Stores the bytes of n fetched chunks (node-local; the caller verified
 * each hash) durably, with one sync for the batch, and counts those this
 * node lacked as fetched. 0, -EINVAL (a length differs from its chunk row:
 * nothing stored), or a statedb error. Not inside sm_apply(). */
int sm_chunk_store(struct sm *sm, const struct statedb_chunk_in *in, size_t n);
/* Chunks and bytes stored by sm_chunk_store() since open. */
void sm_fetch_counters(const struct sm *sm, uint64_t *chunks, uint64_t *bytes);

#endif
