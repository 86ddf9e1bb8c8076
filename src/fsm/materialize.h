/*
 * materialize.h: carrying out an apply decision in a node's tree.
 *
 * After fsm_decide() and after the decision is committed to state.db (in the
 * same transaction as the applied index), fsm_materialize() makes the tree
 * match: each action becomes a safe, atomic, conditional tree operation
 * (src/fsm/tree.h). What the node believes its tree holds at each path (the
 * stat it recorded when it last wrote the path, or when its watcher proposed
 * a local edit there) comes from the caller through struct fsm_disk; those
 * records are node-local columns of state.db, not replicated state.
 *
 * Where the tree does not hold what the node recorded, a local edit is
 * pending: that action is skipped and counted, the edit stays, and the watcher
 * proposes it (it then meets the conflict rules like any other op). Only
 * I/O errors stop the run: then the tree's state is unknown and the caller
 * must rescan before going on.
 */
#ifndef PICKBOX_FSM_MATERIALIZE_H
#define PICKBOX_FSM_MATERIALIZE_H

#include <stdint.h>

#include "fsm/fsm.h"
#include "fsm/tree.h"

struct fsm_bigwrite;

struct fsm_disk {
    void *arg;
    /* The stat this node last recorded for path; kind NONE if none. 0 or -errno. */
    int (*expected)(void *arg, const char *path, struct fsm_tree_stat *st);
    /* path now holds st (kind NONE: nothing). 0 or -errno. */
    int (*record)(void *arg, const char *path, const struct fsm_tree_stat *st);
    /* The entry at from, and everything recorded below it, is now at to. */
    int (*record_move)(void *arg, const char *from, const char *to);
    /* Copies the len bytes of chunk id into buf. 0, -ENOENT, or -errno. */
    int (*read_chunk)(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN], uint8_t *buf, uint32_t len);
    /* Optional (NULL: read_chunk, then write): appends the len bytes of
     * chunk id to fd at its current offset without passing them through
     * user space (statedb_chunk_copy). 0, -ENOENT, or -errno. */
    int (*copy_chunk)(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN], uint32_t len, int fd);
    /* Optional (NULL: never). 1 and *st when the PUT being materialized is
     * this node's own edit and its tree held the op's content at path with
     * stat *st when the op committed; else 0. Such a file is recorded, not
     * written again: rewriting it (a new inode) would take the file from
     * under a program that still has it open, and its later writes would
     * go to the replaced inode. */
    int (*in_tree)(void *arg, const char *path, struct fsm_tree_stat *st);
    /* Optional (NULL: record() is used). path now holds st, which is the
     * manifest row (content, mode, mtime) named here: for a file written in
     * the background, recorded after later entries may have changed the
     * row at path (src/fsm/bigwrite.h). 0 or -errno. */
    int (*record_as)(void *arg, const char *path, const struct fsm_tree_stat *st,
                     const uint8_t content[FSM_CHUNK_ID_LEN], uint32_t mode, int64_t mtime_ns);
    /* Optional (NULL: every file is written in place): the background
     * writer that files of at least fsm_bigwrite_min_bytes() go to. Every
     * action first waits for or drops the jobs on its paths (bigwrite.h). */
    struct fsm_bigwrite *big;
};

/*
 * Carries out decision d (made for op) in tree t, action by action. Chunks
 * the op carries are taken from the op, others from disk->copy_chunk (or
 * disk->read_chunk without it).
 * *pending (may be NULL) gets the number of actions skipped because a local
 * edit is pending (the target or a parent differs from the record). Returns
 * 0, or the first error that is not a pending edit (-EIO, -ENOSPC, a
 * callback's error, -FSM_TREE_ENOMARKER ...), after which the remaining
 * actions are not attempted.
 */
int fsm_materialize(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_decision *d,
                    const struct fsm_disk *disk, unsigned *pending);

/*
 * Materializing a group of decisions with one durability barrier for their
 * small files (doc/fsm.md, "Durability sequence"). For a group, in log
 * order: fsm_materialize_stage() on each (op, decision) until it returns
 * -ENOSPC (that one starts the next group); fsm_materialize_sync() once;
 * fsm_materialize_staged() on each of the group, in the same order, with the
 * same pointers (it is fsm_materialize(), but a staged file is only renamed
 * into place, with the same expected-stat check right before the rename);
 * fsm_materialize_finish() (one fsync per directory renamed into). Nothing
 * is renamed before the barrier, so a crash anywhere leaves each file old
 * or new. A file whose staging failed is written by fsm_tree_put() at its
 * turn. The caller must make the disk records durable only after
 * fsm_materialize_finish() (one transaction around the group). The batch
 * borrows t and disk, which must outlive it.
 */
struct fsm_materialize_batch;

/* A new batch (never NULL); freed with fsm_materialize_batch_free(). */
struct fsm_materialize_batch *fsm_materialize_batch_new(struct fsm_tree *t,
                                                        const struct fsm_disk *disk);
/* Removes temps not renamed and frees; NULL is fine. */
void fsm_materialize_batch_free(struct fsm_materialize_batch *b);
/* Writes the temps of d's small-file WRITE actions. 0, or -ENOSPC (nothing
 * staged) when the group is full. Staging errors are not reported here. */
int fsm_materialize_stage(struct fsm_materialize_batch *b, const struct fsm_op *op,
                          const struct fsm_decision *d);
/* The barrier for everything staged; returns the number of durable temps. */
int fsm_materialize_sync(struct fsm_materialize_batch *b);
/* fsm_materialize() using the staged temps; same results. */
int fsm_materialize_staged(struct fsm_materialize_batch *b, const struct fsm_op *op,
                           const struct fsm_decision *d, unsigned *pending);
/* Ends the group: fsyncs the directories renamed into, removes unused
 * temps; the batch can take the next group. 0 or the first fsync error. */
int fsm_materialize_finish(struct fsm_materialize_batch *b);

/*
 * Repairs one path: makes the tree at path hold the index's entry e (NULL or
 * a tombstone: nothing; a file with chunk list refs; a symlink to target; a
 * directory), replacing what the disk record says is there. Used when a
 * node's own pending edit has committed (see doc/fsm.md, "Pending local
 * edits") and after a rescan finds the tree behind the index. A disk that
 * does not match the record is -FSM_TREE_EPENDING, as everywhere.
 */
int fsm_materialize_entry(struct fsm_tree *t, const char *path, const struct fsm_index_entry *e,
                          const struct fsm_chunk_ref *refs, uint32_t n_refs, const char *target,
                          const struct fsm_disk *disk);

#endif
