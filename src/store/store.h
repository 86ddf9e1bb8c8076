/*
 * store.h: raft.db, the durable half of Raft (hard state, log, snapshots).
 *
 * One SQLite database in WAL mode with synchronous=FULL. The store knows
 * nothing about the Raft core: it persists what it is told in the order it is
 * told and refuses what would break the log's invariants (gaps, overlaps
 * without an explicit truncation, truncating matching entries, terms going
 * backwards, a second vote in one term). The daemon translates Raft's types.
 *
 * Threading. store_open() starts one storage thread that owns the writer
 * connection. The owner (the event-loop thread) submits write batches with
 * store_submit(); the storage thread takes everything queued while its
 * previous commit ran, writes ONE transaction, commits (the fsync), and posts
 * ONE completion back through an eventfd watched on the owner's event_base, so
 * the completion callback runs on the loop thread and fsync never does.
 * Reads (store_load, store_read_entries, store_snapshot_*) are synchronous and
 * use a second, read-only connection: WAL lets them run beside the writer.
 * Every function here must be called from the owner's (loop) thread, except
 * store_fault_inject() which may be called from any thread.
 *
 * Errors: 0 or a negative errno. -ENOSPC (disk full), -EIO (any I/O error),
 * -EBADMSG (corruption: checksum, contiguity, snapshot/log disagreement),
 * -EPROTONOSUPPORT (raft.db written by a newer pickbox), -EBUSY (another
 * process has raft.db open), -EINVAL (a batch breaks a log invariant),
 * -EEXIST (the cluster id is already set), -E2BIG (a blob over
 * STORE_MAX_BLOB), -ENOENT (reads: compacted away / no such snapshot).
 * After any failed write the store is DEGRADED: durable state is unknown, every
 * later submission fails fast with the same code until store_retry().
 *
 * How the daemon drives it: at startup store_open() + store_load() rebuild the
 * Raft core's state. For each Raft "ready", one store_submit() carries the new
 * hard state, the conflict truncation, the new entries and/or the snapshot
 * piece; messages that depend on them (votes, append acks) are sent only when
 * the completion covering that seq reports 0. On a failed completion: stop
 * acknowledging, step down, store_retry() after store_retry_backoff_ms(), probe
 * with an empty batch, then reload with store_load() (a failed batch may or may
 * not have reached the disk) before the core runs again.
 */
#ifndef PICKBOX_STORE_STORE_H
#define PICKBOX_STORE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"
#include "lib/hist.h"

struct event_base;
struct store;

/* On-disk format of raft.db written by this build (the meta row's format). */
#define STORE_FORMAT         1
#define STORE_CLUSTER_ID_LEN 16
#define STORE_DB_NAME        "raft.db"
/* Largest entry, snapshot chunk or membership blob one batch may carry. */
#define STORE_MAX_BLOB (64u << 20)

/* A log entry. For store_submit() data is read-only and only borrowed for the
 * duration of the call (the store copies it; but see borrow_entries in struct
 * store_batch). In results it is owned by the
 * enclosing struct store_entries / struct store_state. */
struct store_entry {
    uint64_t index;
    uint64_t term;
    uint8_t type; /* opaque to the store */
    void *data;
    size_t len;
};

struct store_entries {
    struct store_entry *v;
    size_t n;
    size_t bytes; /* sum of data lengths */
};

struct store_hard_state {
    uint64_t term;
    uint64_t vote; /* node id voted for in term; 0 = none */
};

/* Metadata of the latest complete snapshot. */
struct store_snapshot_meta {
    uint64_t last_index;
    uint64_t last_term;
    uint8_t *membership; /* owned by the enclosing struct; opaque to the store */
    size_t membership_len;
    uint64_t size; /* payload bytes held in raft.db (0 for a local snapshot) */
    uint32_t crc;  /* CRC-32C of that payload */
};

/* One piece of an incoming snapshot (InstallSnapshot). offset 0 starts staging
 * (last_index, last_term) and replaces any other incomplete snapshot; a later
 * chunk must not start after the staged bytes end (ask with
 * store_snapshot_staged(); a gap fails the batch). Bytes already staged are
 * taken as a retransmission and skipped. done installs it in the same
 * transaction: mark it
 * complete, drop the older snapshot and its payload, and drop log entries
 * <= last_index if the log holds (last_index, last_term), else the whole log
 * (Raft Figure 13, rules 6-7). */
struct store_snapshot_chunk {
    uint64_t last_index;
    uint64_t last_term;
    const void *membership; /* read at offset 0 only */
    size_t membership_len;
    uint64_t offset;
    const void *data;
    size_t len;
    bool done;
};

/* A snapshot this node took of its own state machine (its payload lives in
 * state.db): records it as the complete snapshot and drops the older one. The
 * log must hold (last_index, last_term). Log entries are NOT removed: call
 * store_compact() for that. */
struct store_local_snapshot {
    uint64_t last_index;
    uint64_t last_term;
    const void *membership;
    size_t membership_len;
};

/* One write batch; any combination of parts, all optional. Within the one
 * transaction they are applied in this order: cluster id, hard state, snapshot
 * chunk, truncation, entries, local snapshot. An empty batch is a barrier that
 * still writes and syncs (a probe after store_retry()). */
struct store_batch {
    const uint8_t *cluster_id; /* STORE_CLUSTER_ID_LEN bytes; set once (bootstrap) */
    const struct store_hard_state *hard_state;
    /* Conflict truncation (§5.3): delete entries >= truncate_from, then append.
     * Requires entries[0].index == truncate_from and a stored entry there with
     * a DIFFERENT term: matching entries are never truncated. 0 = none. */
    uint64_t truncate_from;
    const struct store_entry *entries; /* contiguous, continuing the log */
    size_t n_entries;
    /* The entries' data is not copied: the owner promises it stays valid and
     * unchanged until the completion covering this batch has been delivered
     * (or store_close() returned), whatever its status. Saves a copy of every
     * byte logged; the struct store_entry array itself is still copied. */
    bool borrow_entries;
    const struct store_snapshot_chunk *snapshot_chunk;
    const struct store_local_snapshot *local_snapshot;
};

/* Batches first_seq..last_seq (inclusive) finished with status (0: durable;
 * else the negative errno that failed them, none of their effects applied).
 * last_seq == 0 reports a failure of background work (compaction) that
 * covered no batch. Completions arrive in seq order. */
struct store_completion {
    uint64_t first_seq;
    uint64_t last_seq;
    int status;
};

struct store_options {
    const char *dir;         /* state directory; raft.db is created inside */
    struct event_base *base; /* the owner's loop; completions run on it */
    void (*on_complete)(void *arg, const struct store_completion *c);
    void *arg;
    bool quick_check; /* also run PRAGMA quick_check at open (slow on big files) */
};

/* Everything the owner needs at startup. */
struct store_state {
    uint8_t cluster_id[STORE_CLUSTER_ID_LEN];
    bool has_cluster_id;
    uint64_t node_id; /* random, nonzero, fixed at the first start */
    struct store_hard_state hard_state;
    bool has_snapshot;
    struct store_snapshot_meta snapshot;
    /* Log bounds. An empty log has first_index == last_index + 1, where
     * last_index is the snapshot's last index (or 0). last_term is the term of
     * last_index (from the log or the snapshot; 0 if neither). */
    uint64_t first_index;
    uint64_t last_index;
    uint64_t last_term;
    struct store_entries entries; /* those asked for by store_load() */
};

/* Opens (creating if needed) dir/raft.db, validates it and starts the storage
 * thread. Validation refuses, with a message naming what is wrong: a newer
 * format, another process holding it, a gap in the log, an entry failing its
 * checksum, terms going backwards, a log that disagrees with the snapshot. An
 * incomplete (staged) snapshot is dropped. On success *out owns everything;
 * close it with store_close(). */
int store_open(struct store **out, const struct store_options *opts, struct pb_error *err);

/* Persists everything already submitted, stops the thread, closes raft.db.
 * Completions not yet delivered are dropped (the callback is not called).
 * Must not be called from the completion callback. NULL is a no-op. */
void store_close(struct store *s);

/* Queues a batch (deep-copied) and returns its sequence number in *seq
 * (1, 2, 3, ...). Returns the degraded code without queueing while the store
 * is degraded, -EINVAL for a malformed batch (index 0, values over
 * INT64_MAX), -E2BIG for a blob over STORE_MAX_BLOB. Log-invariant violations are found by the
 * storage thread and reported (and degrade the store) through the completion. */
int store_submit(struct store *s, const struct store_batch *b, uint64_t *seq);

/* Asks the storage thread to delete log entries < below_index in bounded
 * slices, between batch transactions. Never deletes past the latest complete
 * snapshot (the target is clamped to its last_index + 1). Returns 0. */
int store_compact(struct store *s, uint64_t below_index);

/* Reads meta, the latest complete snapshot, the log bounds and up to
 * max_bytes of entries from index lo on (at least one entry if any exist at
 * or after lo) in one read transaction. Free with store_state_free(). */
int store_load(struct store *s, uint64_t lo, size_t max_bytes, struct store_state *out,
               struct pb_error *err);
void store_state_free(struct store_state *st);

/* Reads entries lo..hi (inclusive) for a lagging follower: stops before the
 * entry that would exceed max_bytes, but returns at least one entry; stops at
 * the end of the log. -ENOENT if lo was compacted away (send a snapshot),
 * -EBADMSG if an entry fails its checksum. Free with store_entries_free(). */
int store_read_entries(struct store *s, uint64_t lo, uint64_t hi, size_t max_bytes,
                       struct store_entries *out, struct pb_error *err);
void store_entries_free(struct store_entries *e);

/* Durable bytes staged for the incoming snapshot (last_index, last_term): the
 * offset from which the sender must resume; 0 if another or none is staged. */
int store_snapshot_staged(struct store *s, uint64_t last_index, uint64_t last_term,
                          uint64_t *bytes);

/* Copies up to len bytes of the complete snapshot's payload from offset into
 * buf; *got is 0 at the end. -ENOENT if no complete snapshot with that index. */
int store_snapshot_read(struct store *s, uint64_t last_index, uint64_t offset, void *buf,
                        size_t len, size_t *got, struct pb_error *err);

/* Health. */
struct store_health {
    bool degraded;
    int code;          /* negative errno of the failure */
    char msg[256];     /* what failed, one line */
    uint64_t since_ms; /* wall clock (ms since the epoch) of the failure */
    uint64_t last_persisted_seq;
    uint64_t transactions; /* committed batch transactions since open */
    uint64_t batches;      /* batches they carried */
    /* Durations of their COMMIT (WAL write + fsync), timed on the storage thread. */
    struct pb_hist commit_time;
};
void store_health(struct store *s, struct store_health *h);

/* Leaves the degraded state: the storage thread reopens its connection before
 * the next transaction. Batches that failed may or may not be on disk (an
 * fsync error leaves that unknown); the owner must rebuild its view with
 * store_load() once a probe (an empty batch) has succeeded. */
int store_retry(struct store *s);

/* Backoff policy helper: 100 ms doubling per attempt, capped at 30 s. */
uint64_t store_retry_backoff_ms(unsigned attempt);

/* Fault injection for tests: the next n write transactions fail inside
 * SQLite's VFS (a shim over the "unix" VFS), so SQLite's own rollback path
 * runs. FULL: every write returns SQLITE_FULL; IOERR_WRITE: writes return
 * SQLITE_IOERR_WRITE; IOERR_FSYNC: writes succeed but the commit's fsync
 * returns SQLITE_IOERR_FSYNC. Any thread. */
enum store_fault {
    STORE_FAULT_NONE = 0,
    STORE_FAULT_FULL,
    STORE_FAULT_IOERR_WRITE,
    STORE_FAULT_IOERR_FSYNC,
};
void store_fault_inject(struct store *s, enum store_fault kind, unsigned n);

#endif
