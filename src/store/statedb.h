/*
 * statedb.h: state.db, the replicated tree's state machine (DESIGN.md §5).
 *
 * One SQLite database (WAL, STRICT tables; transactions commit with
 * synchronous=FULL unless lazy (statedb_set_lazy), node-local autocommit
 * writes with NORMAL) holding:
 *   - replicated tables, identical on every node and changed only by applying
 *     the log: the manifest (one row per path, live or tombstone), each
 *     file's chunk list, the content-addressed chunks, the applied index and
 *     term with a few counters, and the client session table (exactly-once);
 *   - node-local tables, never replicated nor part of a snapshot: the disk
 *     records (what this node last wrote at each path of its tree).
 * It knows SQLite and the schema, nothing of fsm types: paths are C strings
 * (bytes without NUL, stored as BLOBs), chunk ids are 32 bytes, kinds are
 * small integers it does not interpret. src/fsm/apply.c is the adapter.
 *
 * Chunks: a chunk row (id, length, reference count, keep_until) is
 * replicated state; its bytes are node-local (a node that installed a
 * snapshot may lack them until it fetched them from a peer). Every decision
 * made while applying (statedb_chunk_has: "does the cluster hold this
 * chunk?") looks at chunk rows only, never at whether the bytes are here.
 * The bytes live in append-only pack files in STATE_DIR/chunks (beside
 * state.db; doc/decisions.md D14), indexed by state.db; bytes may also be
 * here without a row (pushed ahead of the entry naming them, D13).
 *
 * Chunk collection is deterministic: a chunk's reference count is the number
 * of chunk-list rows naming it (kept by triggers, so it cannot drift), and a
 * chunk also carries keep_until (a log index): statedb_chunk_collect(index)
 * removes exactly the chunks with refs = 0 and keep_until < index. The same
 * log therefore leaves the same chunks on every node.
 *
 * Transactions: the writer calls statedb_begin(), any number of changes, then
 * statedb_commit() (which rolls back itself if the commit fails) or
 * statedb_rollback(). Writes outside a transaction (disk records) are single
 * autocommit statements. Snapshots read through a second connection.
 *
 * Chunk bytes are durable no later than the index rows naming them (the pack
 * is fdatasync'ed before every commit that adds rows); the space of deleted
 * bytes is given back after the commit (hole punch; an emptied old pack is
 * removed).
 *
 * Errors: 0 or a negative errno; the SQLite message of the last failure is in
 * statedb_errmsg(). -ENOSPC (disk full), -EIO (I/O error: durable state
 * unknown, the open transaction was rolled back), -EBADMSG (corrupt file or
 * snapshot stream), -EPROTONOSUPPORT (state.db of a newer format), -ENOENT
 * (no such row), -EINVAL (bad argument or a schema constraint), -EBUSY.
 *
 * Threading: a struct statedb is used by one thread at a time; a snapshot
 * reader (struct statedb_snapshot) and a statedb_open_reader() handle may
 * be used by other threads. Calls that commit block on fsync.
 */
#ifndef PICKBOX_STORE_STATEDB_H
#define PICKBOX_STORE_STATEDB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"
#include "store/store.h"

#define STATEDB_FORMAT   3 /* schema format written by this build (1 and 2 are migrated) */
#define STATEDB_NAME     "state.db"
#define STATEDB_ID_LEN   32 /* chunk id / content hash (SHA-256) */
#define STATEDB_NODE_MAX 64
/* Snapshot stream format (statedb_snapshot_read / statedb_install_write). */
#define STATEDB_SNAP_FORMAT 2
/* Largest single record of a snapshot stream (a manifest row). */
#define STATEDB_SNAP_RECORD_MAX (512u * 1024u)
/* Largest chunk length a snapshot's chunk record may state. */
#define STATEDB_CHUNK_MAX (16u * 1024u * 1024u)

struct statedb;
struct statedb_snapshot;
struct statedb_install;

/* One manifest row (replicated). */
struct statedb_row {
    uint8_t kind; /* opaque to the store (fsm_kind) */
    bool deleted; /* tombstone */
    uint64_t version;
    uint64_t content_version;
    uint8_t content[STATEDB_ID_LEN];
    uint32_t mode;
    int64_t mtime_ns;
    uint64_t size;
    char origin[STATEDB_NODE_MAX + 1];
};

/* One chunk of a file's chunk list. */
struct statedb_ref {
    uint8_t id[STATEDB_ID_LEN];
    uint32_t len;
};

/* A node-local disk record: the stat this node last wrote/recorded at a path
 * (kind .. ino), and which manifest row that was (its content hash, mode and
 * mtime; zero if none): a record whose row differs from the manifest's now
 * marks a path where the tree may be behind (statedb_disk_mismatches). */
struct statedb_disk {
    uint8_t kind; /* 0: none */
    uint32_t mode;
    uint64_t size;
    int64_t mtime_ns;
    uint64_t ino;
    uint8_t row_content[STATEDB_ID_LEN];
    uint32_t row_mode;
    int64_t row_mtime_ns;
};

/* Counters kept in the replicated state. */
struct statedb_applied {
    uint64_t index;
    uint64_t term;
    uint64_t malformed;  /* entries that decoded to nothing (deterministic no-ops) */
    uint64_t conflicts;  /* ops that created a conflict copy */
    uint64_t duplicates; /* client ops skipped by the session table */
};

struct statedb_status {
    uint64_t files;       /* live manifest rows of kind `file_kind` */
    uint64_t dirs;        /* live rows of kind `dir_kind` */
    uint64_t bytes;       /* sum of the live files' sizes */
    uint64_t chunks;      /* rows of the chunk table (replicated metadata) */
    uint64_t chunk_bytes; /* the sum of their lengths */
    uint64_t tombstones;
    uint64_t missing;       /* referenced chunks whose bytes this node lacks */
    uint64_t missing_bytes; /* and their length */
};

/* Opens (creating if missing, mode 0600) the state.db file at path. Refuses
 * a newer format with -EPROTONOSUPPORT naming both versions, a file that is
 * not a state.db with -EBADMSG, a file another statedb has open (this or
 * another process; flock) with -EBUSY. *out is the caller's
 * (statedb_close()). */
int statedb_open(const char *path, struct statedb **out, struct pb_error *err);
/* A second, read-only handle on an existing state.db (for another thread,
 * e.g. the watcher's index lookups and the disk records it compares with,
 * beside the applier; WAL lets it read while the applier writes). Every
 * read function works on it; statedb_begin() and writes fail (-EROFS). No
 * flock: any number of readers. */
int statedb_open_reader(const char *path, struct statedb **out, struct pb_error *err);
/* Closes db (rolling back an open transaction); NULL is fine. */
void statedb_close(struct statedb *db);
/* The message of the last failure (never NULL). */
const char *statedb_errmsg(const struct statedb *db);

/* Starts the write transaction (BEGIN IMMEDIATE). -EBUSY if one is open. */
int statedb_begin(struct statedb *db);
/* Commits it; on failure it is rolled back and the error returned. */
int statedb_commit(struct statedb *db);
/* Rolls it back (no-op without one). */
void statedb_rollback(struct statedb *db);
bool statedb_in_txn(const struct statedb *db);
/* Lazy commits: while lazy is set, write transactions begun afterwards commit
 * with synchronous = NORMAL (no fsync: they survive a process crash, but a
 * power loss may roll state.db back to an earlier commit) instead of FULL.
 * Only for changes that can be redone from elsewhere (entries still in
 * raft.db's log) and that nothing durable outside state.db depends on yet;
 * see doc/decisions.md D8. */
void statedb_set_lazy(struct statedb *db, bool lazy);
/* Makes every commit so far durable (one FULL commit; nothing to do when no
 * lazy commit happened since the last FULL one). Not inside a transaction
 * (-EBUSY). Call it before anything durable outside state.db relies on the
 * applied state: a snapshot, compacting raft.db's log. 0 or -errno. */
int statedb_sync(struct statedb *db);
/* True when a lazy commit may not be durable yet (statedb_sync() has work). */
bool statedb_lazy_pending(const struct statedb *db);

/* Test hook: chunk packs roll over past bytes instead of 1 GiB. */
void statedb_pack_roll_bytes(struct statedb *db, uint64_t bytes);
/* Test hook: the next n write transactions fail (see enum store_fault) through
 * a fault-injection VFS, so SQLite's own error and rollback paths run. */
void statedb_fault_inject(struct statedb *db, enum store_fault kind, unsigned n);

/* Applied index, term and counters (a fresh db: all 0). */
int statedb_applied_get(struct statedb *db, struct statedb_applied *a);
/* Sets them (inside a transaction). */
int statedb_applied_set(struct statedb *db, const struct statedb_applied *a);

/* Manifest. get: 0 or -ENOENT; *target (may be NULL) gets the symlink target
 * (malloc'ed, NULL if none; the caller frees). */
int statedb_row_get(struct statedb *db, const char *path, struct statedb_row *r, char **target);
/* Inserts or replaces path's row (its chunk list is untouched). */
int statedb_row_put(struct statedb *db, const char *path, const struct statedb_row *r,
                    const char *target);
/* Removes path's row and its chunk list. */
int statedb_row_delete(struct statedb *db, const char *path);
/* Moves the live rows of the subtree at from (from itself and from/...) to
 * to/..., with their chunk lists; rows already at the new paths (tombstones,
 * a replaced target) are removed first. Moved rows get version =
 * content_version = version. Tombstones below from stay. The caller writes
 * the tombstone at from. -EINVAL if one path is inside the other. */
int statedb_row_move(struct statedb *db, const char *from, const char *to, uint64_t version);
/* Calls fn(arg, path, row) for every manifest row (tombstones too) in byte
 * order of path; stops when fn returns nonzero (returned). fn must not write
 * db. */
int statedb_row_foreach(struct statedb *db,
                        int (*fn)(void *arg, const char *path, const struct statedb_row *r),
                        void *arg);
/* Calls fn(arg, name) for each live row directly inside dir ("" = the root),
 * in byte order of the name; stops when fn returns nonzero (returned). fn may
 * use db. */
int statedb_list_children(struct statedb *db, const char *dir,
                          int (*fn)(void *arg, const char *name), void *arg);

/* Chunks. has: 1 if the chunk row exists (replicated: the same answer on
 * every node), 0, or -errno. get: copies exactly len bytes of this node's
 * copy (-ENOENT if the bytes are not here, -EBADMSG if the stored length
 * differs). put: adds the chunk row if absent (len = its length), raises its
 * keep_until to at least keep_until, and stores the bytes if this node lacks
 * them (they are not hashed here: verify them first). collect: removes
 * chunks with no reference and keep_until < index, bytes included; *n (may
 * be NULL) gets how many. */
int statedb_chunk_has(struct statedb *db, const uint8_t id[STATEDB_ID_LEN]);
int statedb_chunk_get(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], void *buf,
                      uint32_t len);
int statedb_chunk_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], const void *data,
                      uint32_t len, uint64_t keep_until);
int statedb_chunk_collect(struct statedb *db, uint64_t index, uint64_t *n);
/* Copies exactly len bytes of this node's copy of chunk id into out_fd at
 * its current offset (copy_file_range from the pack: no user-space copy;
 * pread + write where the kernel cannot), errors as statedb_chunk_get; on an
 * error some bytes may have been written. Works on a reader handle. */
int statedb_chunk_copy(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t len,
                       int out_fd);
/* Node-local bytes. data_put: stores the bytes of chunk id (verify the hash
 * first; no-op if already here), with or without a chunk row (bytes without
 * a row: see statedb_chunk_data_put_many()); -EINVAL if a row exists with
 * another length or len > STATEDB_CHUNK_MAX. Outside a transaction it commits
 * its own with synchronous NORMAL (a power loss may drop it, and it is
 * fetched again; one fdatasync of the pack). data_has: 1, 0, -errno.
 * missing: up to max referenced chunks (refs > 0) whose bytes are not here,
 * in id order, with id greater than after (NULL: from the start); *n gets
 * how many. */
int statedb_chunk_data_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], const void *data,
                           uint32_t len);
int statedb_chunk_data_has(struct statedb *db, const uint8_t id[STATEDB_ID_LEN]);
int statedb_chunk_missing(struct statedb *db, const uint8_t *after, struct statedb_ref *out,
                          size_t max, size_t *n);
/* Adds chunk id's row without bytes if absent (refs 0, len, keep_until), or
 * raises an existing row's keep_until to at least keep_until; -EINVAL if the
 * row exists with another length. Replicated state: called while applying
 * (REFS op). The bytes may already be here (pushed earlier) or be fetched
 * later (fetch.c), exactly as after a snapshot install (D10); bytes here of
 * another length are dropped (the row wins). */
int statedb_chunk_row_put(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint32_t len,
                          uint64_t keep_until);

/* One chunk's bytes for statedb_chunk_data_put_many(); the caller has
 * verified len <= 256 KiB and SHA-256(data) == id. */
struct statedb_chunk_in {
    const uint8_t *id; /* STATEDB_ID_LEN bytes */
    const void *data;
    uint32_t len;
};
/* Stores node-local bytes of n chunks, with or without a chunk row: bytes
 * without a row are "pushed" (kept until a row names them, or until
 * statedb_chunk_data_collect_unrowed() removes them). Chunks already here are
 * not written again but kept: from then on their bytes outlive their row
 * (a collection turns them into bytes without a row, removed by age from
 * this call on), because the caller is about to tell a peer that this node
 * holds them (D13: a lagging node must not acknowledge a push and then drop
 * the bytes with an old row before the entry naming them applies). -EINVAL if a row exists with another length (nothing stored).
 * DURABLE when it returns 0 outside a transaction (bytes fdatasync'ed, then
 * the index committed with synchronous FULL: one fdatasync + one WAL fsync
 * per call); inside a statedb_begin() transaction they become durable with
 * its statedb_commit(). Writer handle only (-EROFS on a reader). */
int statedb_chunk_data_put_many(struct statedb *db, const struct statedb_chunk_in *in, size_t n);
/* Tests of crashes: fn() (process-wide; NULL: none) is called by
 * statedb_chunk_data_put_many() outside a transaction once the bytes are
 * appended to the pack and before their index commits. */
void statedb_test_before_data_commit(void (*fn)(void));
/* Removes the bytes of chunks that have no row and were stored more than
 * max_age_ms before now_ms; *n (may be NULL) gets how many. now_ms is
 * pb_now_ms() (the clock the bytes' store time was taken from; a store time
 * ahead of now_ms, from before a reboot, counts as now). Inside or outside
 * a transaction. */
int statedb_chunk_data_collect_unrowed(struct statedb *db, uint64_t now_ms, uint64_t max_age_ms,
                                       uint64_t *n);
/* References to chunk id (chunk-list rows naming it); -ENOENT if absent. */
int statedb_chunk_refs(struct statedb *db, const uint8_t id[STATEDB_ID_LEN], uint64_t *refs);

/* Chunk lists. get: *refs malloc'ed (NULL when empty), *n entries. put:
 * replaces path's list; every chunk must be stored (-EINVAL otherwise). */
int statedb_chunklist_get(struct statedb *db, const char *path, struct statedb_ref **refs,
                          uint32_t *n);
int statedb_chunklist_put(struct statedb *db, const char *path, const struct statedb_ref *refs,
                          uint32_t n);

/* Sessions: the highest seq applied for client_id (0 if none). */
int statedb_session_get(struct statedb *db, uint64_t client_id, uint64_t *seq);
int statedb_session_set(struct statedb *db, uint64_t client_id, uint64_t seq);

/* Node-local disk records. get: kind 0 when none. set: kind 0 removes. move:
 * the records of from and below become to's (replacing records there). */
int statedb_disk_get(struct statedb *db, const char *path, struct statedb_disk *d);
int statedb_disk_set(struct statedb *db, const char *path, const struct statedb_disk *d);
int statedb_disk_move(struct statedb *db, const char *from, const char *to);

/* Paths where the tree may be behind the manifest: first every live row
 * without a disk record of the same kind, content, mode and mtime (byte
 * order, so parents
 * come first: remove = false), then every disk record whose row is absent or
 * a tombstone (reverse byte order, children first: remove = true). The list
 * is collected before fn runs, so fn may write db. Stops when fn returns
 * nonzero (returned). */
int statedb_disk_mismatches(struct statedb *db, int (*fn)(void *arg, const char *path, bool remove),
                            void *arg);

/* Counts for status; file_kind / dir_kind say which kinds count as such.
 * Exact and O(1) on the writer handle (kept by triggers as rows change; see
 * statedb.c); a statedb_open_reader() handle counts them (O(rows)). */
int statedb_status_get(struct statedb *db, uint8_t file_kind, uint8_t dir_kind,
                       struct statedb_status *s);

/*
 * Snapshots. statedb_snapshot_begin() opens a read transaction on a second
 * connection: what it streams is the replicated state as of that moment,
 * whatever is applied meanwhile. The stream is deterministic (equal
 * replicated state gives equal bytes; see statedb.c for the format). It
 * carries the manifest, chunk lists, chunk metadata (id, keep_until, length)
 * and sessions, never chunk bytes: its size follows the manifest, not the
 * tree's bytes.
 * read: copies up to len bytes at offset into buf, *n gets how many; *n < len
 * means the end of the stream. Reading sequentially is cheap; an earlier
 * offset re-generates the stream from the start. end: closes it.
 */
int statedb_snapshot_begin(struct statedb *db, struct statedb_snapshot **out, struct pb_error *err);
void statedb_snapshot_info(const struct statedb_snapshot *s, uint64_t *index, uint64_t *term);
int statedb_snapshot_read(struct statedb_snapshot *s, uint64_t offset, void *buf, size_t len,
                          size_t *n, struct pb_error *err);
void statedb_snapshot_end(struct statedb_snapshot *s);

/*
 * Receiving a snapshot: begin empties the staging tables; write takes the
 * stream's bytes in order (any split), parses them and stages the records
 * (one transaction per call); finish checks the trailer (record count,
 * CRC-32C) and, in ONE transaction, replaces the replicated tables with the
 * staged ones and sets the applied index and term, keeping node-local
 * tables and the bytes of chunks that stay (new chunks arrive without bytes:
 * statedb_chunk_missing() lists them). *index and *term (may be NULL) get
 * the snapshot's. Any error
 * leaves the replicated tables as they were, and after a failed write the
 * stream cannot go on (start again with begin); free with
 * statedb_install_abort() (also after finish). Not inside an apply
 * transaction. Staging needs about the stream's size in free disk space.
 */
int statedb_install_begin(struct statedb *db, struct statedb_install **out, struct pb_error *err);
int statedb_install_write(struct statedb_install *in, const void *data, size_t len,
                          struct pb_error *err);
int statedb_install_finish(struct statedb_install *in, uint64_t *index, uint64_t *term,
                           struct pb_error *err);
void statedb_install_abort(struct statedb_install *in);

#endif
