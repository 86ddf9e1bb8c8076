/*
 * bigwrite.h: writing big files into the tree off the Raft ready cycle.
 *
 * A committed PUT of at least fsm_bigwrite_min_bytes() is committed to
 * state.db like any other (decision, index, applied index), but its WRITE
 * action becomes a job here instead of a fsm_tree_put() inside the apply:
 * one worker thread fills a temp file in the target's directory from the
 * chunks (read through its own read-only state.db connection, never the
 * applier's), sets mode and mtime, fsyncs it, and signals the owner through
 * an eventfd. The owner (the thread of the tree and the applier: the event
 * loop) then calls fsm_bigwrite_complete(), which does the fast part: the
 * expected-stat check right before the rename, the rename, the directory
 * fsync, and the disk record (disk->record_as: the row the PUT wrote).
 *
 * Ordering: every later action that touches a job's path, a parent of it or
 * something below it first settles the job (fsm_materialize() does, through
 * fsm_disk.big): a DELETE at or above the path and a WRITE of the path drop
 * the job (its temp is removed; the tree keeps the old file and its record,
 * which the action then replaces or deletes, as if the job had never been);
 * any other action waits for the worker and completes the job first, so it
 * sees the tree and record the synchronous write would have left. Waiting
 * is bounded by one file's write (a few seconds per GiB). Actions on other
 * paths go ahead while a job runs.
 *
 * A local edit of the target made while the job runs survives: the check at
 * rename time sees it, the temp is dropped, and the watcher proposes the
 * edit. A crash leaves the old file (or none), a leftover temp removed at the
 * next fsm_tree_open(), and a disk record older than the manifest, which
 * fsm_apply_repair() at startup writes. fsm_bigwrite_free() (shutdown) drops
 * every job the same way.
 *
 * Threading: every function runs on the owner's thread; the worker only
 * touches its job, the tree through fsm_tree_temp_write(), and its own
 * state.db connection.
 */
#ifndef PICKBOX_FSM_BIGWRITE_H
#define PICKBOX_FSM_BIGWRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fsm/materialize.h"
#include "fsm/tree.h"
#include "lib/error.h"

/* Files at least this large are written in the background: below it a
 * write takes a few ms and is cheaper inside the apply (staged, one barrier
 * for many). */
#define FSM_BIGWRITE_MIN_BYTES (8u * 1024u * 1024u)

struct fsm_bigwrite;

/* What the jobs settled since the last fsm_bigwrite_take_stats() ended in. */
struct fsm_bigwrite_stats {
    unsigned written; /* renamed into place and recorded */
    unsigned dropped; /* dropped for a later op on the path (or shutdown) */
    unsigned pending; /* not renamed: a local edit at the target, or its parent moved */
    unsigned nodata;  /* not written: chunk bytes not on this node (yet) */
    unsigned failed;  /* not written for an I/O error: the path is behind, repair it */
};

/* A writer for tree t (borrowed; it must outlive the writer), reading chunk
 * bytes from the state.db at db_path through a read-only connection of its
 * own; files of at least min_bytes go to it. Starts the worker thread.
 * 0 or -errno with err filled. */
int fsm_bigwrite_new(struct fsm_tree *t, const char *db_path, uint64_t min_bytes,
                     struct fsm_bigwrite **out, struct pb_error *err);

/* Stops the worker (a job being written stops at its next chunk), removes
 * every temp and frees; no record is written (the paths stay behind the
 * index until fsm_apply_repair()). NULL is fine. */
void fsm_bigwrite_free(struct fsm_bigwrite *w);

uint64_t fsm_bigwrite_min_bytes(const struct fsm_bigwrite *w);

/* A test hook (the daemon's $PICKBOX_TEST_BIGWRITE_HOLD): while a file
 * exists at path, the worker pauses after each chunk it writes, polling
 * every 10 ms (a drop or fsm_bigwrite_free() still stops it), so tests can
 * stop, kill or query a node while a temp is half written. NULL: none.
 * Call before the first job. */
void fsm_bigwrite_set_hold(struct fsm_bigwrite *w, const char *path);

/* Readable (an eventfd) when a job's background part ended: then call
 * fsm_bigwrite_complete(). */
int fsm_bigwrite_fd(const struct fsm_bigwrite *w);

/* Jobs submitted from now on belong to log index `index` (the first entry
 * of the batch being applied: fsm_bigwrite_oldest() under-reports, never
 * over-reports, what is materialized). */
void fsm_bigwrite_set_index(struct fsm_bigwrite *w, uint64_t index);

/* Queues a job: write a file of chunk list refs (copied), mode and mtime at
 * path, recorded as the manifest row of content hash `content`. Only from
 * fsm_materialize() (which settles older jobs on the path first). */
void fsm_bigwrite_submit(struct fsm_bigwrite *w, const char *path, const struct fsm_chunk_ref *refs,
                         uint32_t n_refs, uint32_t mode, int64_t mtime_ns, uint64_t size,
                         const uint8_t content[FSM_CHUNK_ID_LEN]);

/* Jobs not completed yet, and the log index of the oldest (0: none). */
size_t fsm_bigwrite_count(const struct fsm_bigwrite *w);
uint64_t fsm_bigwrite_oldest(const struct fsm_bigwrite *w);

/* Completes every job whose background part has ended (clears the fd),
 * recording through disk; never waits for the worker. The caller wraps it
 * in a state.db transaction (the records). Returns the number completed or
 * the first record error. */
int fsm_bigwrite_complete(struct fsm_bigwrite *w, const struct fsm_disk *disk);

/* Settles the jobs whose path is path, below it or above it: with drop,
 * the jobs at or below path are dropped; every other one is waited for and
 * completed. 0 or the first record error. */
int fsm_bigwrite_settle(struct fsm_bigwrite *w, const char *path, bool drop,
                        const struct fsm_disk *disk);

/* Waits for and completes every job (before a repair or a snapshot
 * install, and in tests). 0 or the first record error. */
int fsm_bigwrite_drain(struct fsm_bigwrite *w, const struct fsm_disk *disk);

/* The counts since the last call, then zeroes them. */
void fsm_bigwrite_take_stats(struct fsm_bigwrite *w, struct fsm_bigwrite_stats *st);

#endif
