/*
 * apply.h: applying committed log entries to state.db and the tree.
 *
 * The adapter between the pure decision (fsm.h), the tree (materialize.h)
 * and state.db (store/statedb.h). For each committed entry, in log order:
 *
 *   1. in ONE state.db transaction: check the applied index (an entry at or
 *      below it is a no-op: replay after a crash is harmless), decode the op,
 *      skip it if its (client_id, seq) is not above the session table's,
 *      verify and store carried chunks, fsm_decide() each op against the
 *      state.db-backed index and apply the plan exactly as memindex.c does,
 *      collect unreferenced chunks, set the applied index and term;
 *   2. after the commit, materialize the decision into the tree, using the
 *      node-local disk records as expectations and updating them.
 *
 * A malformed entry (it does not decode, or a carried chunk does not hash to
 * its id) is the same deterministic no-op on every node and is counted; an
 * entry of a newer op format (-EPROTONOSUPPORT) stops the applier, since
 * skipping it would fork the state machines.
 *
 * Crash between commit and materialize: the tree is a view of state.db. A
 * disk record remembers which manifest row (content hash, mode, mtime) it
 * materialized; fsm_apply_repair() re-materializes every path whose record
 * does not match the manifest (and removes paths the manifest no longer has),
 * always with the record as the expectation, so local edits are never
 * overwritten. Run it at startup, after a snapshot install, and after a
 * materialize error.
 *
 * Chunk collection: at the end of every entry (index i), inside its
 * transaction, the chunks that no file references and whose keep_until is
 * below i are removed, identically on every node. Chunks carried by an entry
 * at index c get keep_until = c + FSM_APPLY_CHUNK_KEEP, so a CHUNKS op's
 * bytes serve every entry up to the first one after that; a PUT relying on
 * them later fails alike everywhere (MISSING_CHUNKS) and is re-proposed.
 *
 * Threading: one thread at a time (the one that owns the statedb and tree).
 * Every call may block on fsync (state.db commits, tree writes): run the
 * applier on its own thread, not on the event loop (DESIGN.md §5), and give
 * the watcher's index lookups to that same thread (or a second, read-only
 * statedb connection; WAL allows it).
 *
 * How the daemon drives it: at startup statedb_open(<data>/state.db),
 * fsm_tree_open(), fsm_apply_new(), fsm_apply_repair(); Raft may then
 * compact raft.db up to statedb's applied index. For each group of committed
 * entries: fsm_apply_entries() (ops; Raft no-op and configuration entries
 * with data NULL), then act on each result: MISSING_CHUNKS for an own op
 * means re-propose it with the bytes; tree_rc < 0 means rescan/repair; a
 * negative return means stop acknowledging and retry (storage) or stop
 * (-EPROTONOSUPPORT). When the node's own op commits, first
 * fsm_apply_record_local() with the stat it proposed. Snapshots:
 * statedb_snapshot_begin() on the sender; statedb_install_*() then
 * fsm_apply_repair() on the receiver.
 */
#ifndef PICKBOX_FSM_APPLY_H
#define PICKBOX_FSM_APPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fsm/fsm.h"
#include "fsm/materialize.h"
#include "fsm/tree.h"
#include "lib/error.h"
#include "store/statedb.h"

/* Entries a carried chunk is kept without a reference. Part of the
 * replicated behaviour: changing it changes which chunks exist. 64 GiB of
 * CHUNKS ops at 16 MiB each is 4096 entries. */
#define FSM_APPLY_CHUNK_KEEP 8192u

enum fsm_apply_status {
    FSM_APPLY_DONE = 1,   /* applied (see outcome) */
    FSM_APPLY_ALREADY,    /* index <= applied index: nothing done */
    FSM_APPLY_DUPLICATE,  /* (client_id, seq) already applied: no-op */
    FSM_APPLY_MALFORMED,  /* undecodable or bad chunk bytes: no-op */
    FSM_APPLY_CHUNKS,     /* a CHUNKS op: chunks stored; a REFS op: chunk rows added */
    FSM_APPLY_INDEX_ONLY, /* not an op (fsm_apply_skip): the applied index moved */
};

struct fsm_apply_result {
    enum fsm_apply_status status;
    enum fsm_outcome outcome; /* DONE: of the last op (a BATCH: of its last op) */
    const char *rule;         /* static */
    unsigned n_ops;           /* ops decided */
    unsigned conflicts;       /* of them, conflicts */
    unsigned pending;         /* actions skipped in the tree: local edits pending */
    int tree_rc;              /* 0, or the materialize error: run fsm_apply_repair() */
    uint64_t collected;       /* chunks collected */
};

struct fsm_apply;

/* Binds db and tree (both borrowed; they must outlive the applier). */
struct fsm_apply *fsm_apply_new(struct statedb *db, struct fsm_tree *tree);
void fsm_apply_free(struct fsm_apply *ap);

/* Big files go to w (borrowed; NULL: every file is written during the
 * apply) from now on: see src/fsm/bigwrite.h. The disk bound by
 * fsm_apply_bind_disk() afterwards carries it. */
void fsm_apply_set_bigwrite(struct fsm_apply *ap, struct fsm_bigwrite *w);

/*
 * Applies the committed entry at index (term) whose payload is data/len (an
 * encoded op; client_id 0 means no session). Returns 0 once state.db holds
 * the entry's effects and applied index (then *out says what happened, and
 * out->tree_rc whether the tree is up to date); a negative errno means
 * the transaction was rolled back: -EPROTONOSUPPORT (newer op format:
 * stop), -EINVAL (index 0), -EIO / -ENOSPC (storage: a failed commit may
 * still have reached the disk, so stop acknowledging, reopen state.db, run
 * fsm_apply_repair() and retry; an entry that did land is then ALREADY).
 * err (may be NULL) says what went wrong.
 */
int fsm_apply_entry(struct fsm_apply *ap, uint64_t index, uint64_t term, uint64_t client_id,
                    uint64_t seq, const uint8_t *data, size_t len, struct fsm_apply_result *out,
                    struct pb_error *err);

/* One committed entry for fsm_apply_entries(); data NULL: not an op (a
 * no-op or configuration entry of Raft): only the applied index moves. */
struct fsm_apply_input {
    uint64_t index;
    uint64_t term;
    uint64_t client_id;
    uint64_t seq;
    const uint8_t *data;
    size_t len;
};

/*
 * Applies n committed entries (in log order) in ONE state.db transaction,
 * then materializes them in order; out[i] is entry i's result. The state
 * after it is exactly that of n fsm_apply_entry() calls (chunks are
 * collected after each entry at its index); one fsync instead of n. All n
 * decoded ops are held in memory until materialized: bound n by the bytes
 * of the entries. On error nothing is applied (as fsm_apply_entry()); after
 * -EPROTONOSUPPORT, apply the entries one by one to get as far as possible.
 */
int fsm_apply_entries(struct fsm_apply *ap, const struct fsm_apply_input *in, size_t n,
                      struct fsm_apply_result *out, struct pb_error *err);

/* Moves the applied index to index (term) for a committed entry that is
 * not an op, so snapshots and compaction can use Raft's applied index. */
int fsm_apply_skip(struct fsm_apply *ap, uint64_t index, uint64_t term, struct pb_error *err);

/* Re-materializes every path where the tree may be behind state.db (see
 * above). *repaired and *pending (may be NULL) get the number of paths
 * brought up to date and skipped for a pending local edit. A file whose
 * chunk bytes this node does not hold yet (after a snapshot install) is
 * skipped too, not an error: run the repair again once they are fetched.
 * Returns 0 or the first error that is not a pending edit. */
int fsm_apply_repair(struct fsm_apply *ap, unsigned *repaired, unsigned *pending);

/* Records that the tree holds st at path because of a local edit whose op
 * has committed (doc/fsm.md "Pending local edits", step 3): the record is
 * marked as not coming from the manifest, so fsm_apply_repair() brings the
 * path back to the index if the op lost. */
int fsm_apply_record_local(struct fsm_apply *ap, const char *path, const struct fsm_tree_stat *st);

/* The node's own PUT at index, about to be applied, left its content at path
 * in the tree with stat st (a file), after fsm_apply_record_local() of st:
 * if the entry's plan writes that path and the tree still holds st, the file
 * is recorded as written instead of being written again (struct fsm_disk
 * in_tree). Notes hold for the next fsm_apply_entries() only. 0 or -EINVAL. */
int fsm_apply_note_in_tree(struct fsm_apply *ap, uint64_t index, const char *path,
                           const struct fsm_tree_stat *st);

/* The state.db-backed index (for the watcher's base versions and tests) and
 * disk records (for fsm_materialize_entry()); valid while ap lives. */
void fsm_apply_bind_index(struct fsm_apply *ap, struct fsm_index *ix);
void fsm_apply_bind_disk(struct fsm_apply *ap, struct fsm_disk *disk);

/* Appends memindex.c's canonical dump format of state.db's manifest to out
 * (fsm_memindex_dump()), so the two can be compared op by op. 0 or -errno. */
int fsm_apply_dump(struct fsm_apply *ap, struct buf *out);

#endif
