/*
 * tree.h: safe I/O on a node's tree (the materialized view of state.db).
 *
 * Every path is relative to the tree root and is resolved with openat2()
 * (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) for its
 * parent directory; the last component is then used with *at() calls that
 * never follow it. So no operation can reach outside the tree: not by "..",
 * not by an absolute path, not by a symlink anywhere in the path (a symlink
 * in the tree is only ever an entry of its own, never followed).
 *
 * Every mutation is conditional: the caller passes what the index recorded
 * for the target (`expect`: its kind, size, mtime, inode and mode, or
 * FSM_KIND_NONE for "must not exist"). If the disk disagrees, a local edit
 * that the watcher has not proposed yet is pending there, and the function
 * leaves the tree as it was and returns -FSM_TREE_EPENDING. The check runs
 * right before the rename/unlink; the window between check and act cannot be
 * closed on POSIX (Unison says the same) but is a few system calls wide.
 *
 * Files are materialized atomically: content goes to `.pickbox.tmp.<random>`
 * in the target's directory, gets its mode and mtime, is fsync'ed, and is
 * renamed over the target; then the directory is fsync'ed (for many files,
 * see "Staged files" below: one barrier for all). A reader sees the
 * old file or the new one, never a mix. Mode bits other than 0777 (setuid,
 * setgid, sticky) are never materialized, and a directory always keeps its
 * owner's rwx on disk (else the daemon would lock itself out of it).
 *
 * The tree root must contain the `.pickbox/` marker directory, so that an
 * unmounted or replaced tree stops the node instead of looking like "every
 * file was deleted". Hard links, devices, FIFOs and sockets are never created.
 *
 * Threading: a struct fsm_tree may be used by one thread at a time.
 * Uses openat2 (Linux >= 5.6); without it, parents are opened one component
 * at a time with O_NOFOLLOW | O_DIRECTORY, which refuses the same paths.
 */
#ifndef PICKBOX_FSM_TREE_H
#define PICKBOX_FSM_TREE_H

#include <stdint.h>

#include "fsm/op.h"
#include "lib/error.h"

/* The target differs from what the index recorded: a local edit is pending,
 * the tree was left alone. Returned negated (-FSM_TREE_EPENDING). */
#define FSM_TREE_EPENDING ESTALE
/* The tree root has no `.pickbox/` marker directory (unmounted, replaced,
 * never initialised). Returned negated. The node must stop, not replicate. */
#define FSM_TREE_ENOMARKER ENOMEDIUM

/* Only these permission bits reach the disk; comparisons use them too. */
#define FSM_TREE_MODE_MASK 0777u

struct fsm_tree;

/* What is on disk at a path (lstat, never following a symlink). */
struct fsm_tree_stat {
    enum fsm_kind kind; /* FSM_KIND_NONE if nothing is there */
    uint32_t mode;      /* permission bits (& 07777) */
    uint64_t size;      /* files: bytes; symlinks: target length */
    int64_t mtime_ns;
    uint64_t ino;
};

/* Writes a file's content into fd (a new, empty, writable temp file);
 * returns 0 or a negative errno. Must not close fd. */
typedef int (*fsm_tree_fill_fn)(void *arg, int fd);

/* Creates the `.pickbox/` marker (with a small file inside, so tools that
 * prune empty directories leave it) in the existing directory root. For the
 * first start of a node; idempotent. Returns 0 or a negative errno. */
int fsm_tree_init(const char *root, struct pb_error *err);

/* Opens the tree rooted at root. Refuses with -FSM_TREE_ENOMARKER if
 * root/.pickbox/ is not a directory.
 * Removes stale `.pickbox.tmp.*` files left by a crash anywhere in the tree
 * (never following symlinks). On success *out is owned by the caller
 * (fsm_tree_close()). */
int fsm_tree_open(const char *root, struct fsm_tree **out, struct pb_error *err);

/* Closes the tree's descriptors and frees it; NULL is fine. */
void fsm_tree_close(struct fsm_tree *t);

/* Re-checks the marker (call before applying a batch: the root may have been
 * unmounted under a lazily detached fd). 0 or -FSM_TREE_ENOMARKER. */
int fsm_tree_check_marker(struct fsm_tree *t);

/* Removes `.pickbox.tmp.*` entries that are not directories, in the whole
 * tree; *removed (may be NULL) gets their number. 0 or a negative errno. */
int fsm_tree_clean_temps(struct fsm_tree *t, unsigned *removed);

/* lstat of path: 0 with st->kind == FSM_KIND_NONE when absent. Errors:
 * -EINVAL invalid path, -ELOOP a symlink in the parent path, -EXDEV an
 * escape attempt, -ENOTDIR a parent is not a directory, other -errno. */
int fsm_tree_lstat(struct fsm_tree *t, const char *path, struct fsm_tree_stat *st);

/* True if the disk state `actual` is what the index recorded (`expect`):
 * NONE matches NONE; files compare kind, size, mtime, inode and mode;
 * symlinks kind, size, mtime, inode; directories kind, inode and mode (a
 * directory's mtime and size change with its children). */
bool fsm_tree_stat_matches(const struct fsm_tree_stat *expect, const struct fsm_tree_stat *actual);

/* Opens a regular file of the tree read-only (for hashing/chunking) without
 * following symlinks or blocking on FIFOs; -EINVAL if it is not a regular
 * file. *fd is the caller's to close. */
int fsm_tree_open_file(struct fsm_tree *t, const char *path, int *fd);

/* Materializes a regular file at path atomically: fill() writes the content
 * into a temp file in the same directory, which is given mode and mtime,
 * fsync'ed once, and renamed over path if path still matches expect (a file or
 * symlink, or NONE: then the rename refuses to replace anything). The parent
 * directory must exist. *out (may be NULL) gets the new file's stat, which the
 * caller records in the index. Errors: -FSM_TREE_EPENDING, -EISDIR if expect
 * is a directory (delete it first), fill()'s error, or -errno; the temp file
 * is removed on every error. */
int fsm_tree_put(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                 uint32_t mode, int64_t mtime_ns, fsm_tree_fill_fn fill, void *arg,
                 struct fsm_tree_stat *out);

/*
 * Temp files written on another thread (a big file written off the event
 * loop, src/fsm/bigwrite.h): fsm_tree_temp_write() does everything
 * fsm_tree_put() does before the rename (temp in the target's directory,
 * fill(), mode, mtime, fsync) and keeps the temp; fsm_tree_temp_commit()
 * then does the rest on the tree's owning thread: the expected-stat check
 * right before the rename, the rename, the directory fsync.
 * Threading: fsm_tree_temp_write() and fsm_tree_temp_discard() may run on
 * any thread, concurrently with the owner's calls on the same tree (they
 * only read the root descriptor, which does not change while the tree is
 * open); fsm_tree_temp_commit() runs on the owning thread. The tree must
 * outlive every temp. A crash leaves the temp for fsm_tree_open() to remove.
 */
struct fsm_tree_temp;

/* *out gets the durable temp (never before it is complete). Errors as
 * fsm_tree_put()'s (fill()'s own, -ENOENT for a missing parent, -errno);
 * nothing is left on error. */
int fsm_tree_temp_write(struct fsm_tree *t, const char *path, uint32_t mode, int64_t mtime_ns,
                        fsm_tree_fill_fn fill, void *arg, struct fsm_tree_temp **out);

/* Renames tp over path if path still matches expect and its parent is
 * still the directory the temp was made in, then fsyncs that directory.
 * Always consumes tp (a temp not renamed is removed). 0, -FSM_TREE_EPENDING
 * (a local edit), -EAGAIN (the parent was moved or replaced meanwhile),
 * -EISDIR or -errno. *out (may be NULL) gets the new file's stat. */
int fsm_tree_temp_commit(struct fsm_tree *t, struct fsm_tree_temp *tp, const char *path,
                         const struct fsm_tree_stat *expect, struct fsm_tree_stat *out);

/* Removes the temp and frees tp; NULL is fine. */
void fsm_tree_temp_discard(struct fsm_tree_temp *tp);

/*
 * Staged files: many small files with one durability barrier instead of one
 * fsync per file. fsm_tree_stage_add() writes a file's content into a temp
 * file in its target's directory and gives it mode and mtime (no fsync);
 * fsm_tree_stage_sync() makes every staged temp durable at once (syncfs of
 * the tree's filesystem for many files, else fsync of each, after starting
 * the writeback of all); fsm_tree_stage_commit() then checks the target
 * against expect and renames the durable temp over it, exactly as
 * fsm_tree_put() would, except that the directory fsync is deferred to
 * fsm_tree_stage_finish(), which fsyncs each directory renamed into once
 * (fsm_tree_stage_delete() defers a delete's the same way). The caller
 * must not make anything durable that describes these entries (disk
 * records) before fsm_tree_stage_finish().
 * A crash at any point leaves each target old or new, never torn or empty:
 * no rename happens before the barrier. Staging is only an optimisation:
 * a file that could not be staged or synced is not committable (-EAGAIN)
 * and the caller falls back to fsm_tree_put(). The set holds descriptors:
 * at most FSM_TREE_STAGE_MAX files. One thread, like the tree.
 */
#define FSM_TREE_STAGE_MAX 64

struct fsm_tree_stage;

/* A new, empty set on tree t (which must outlive it). Never NULL. */
struct fsm_tree_stage *fsm_tree_stage_new(struct fsm_tree *t);

/* Stages a file for path (its parent must exist). Returns the slot (>= 0)
 * to commit, or -ENOSPC when the set is full, -ENOENT etc. when the parent
 * cannot be opened, fill()'s error or -errno; nothing is left on error. */
int fsm_tree_stage_add(struct fsm_tree_stage *s, const char *path, uint32_t mode, int64_t mtime_ns,
                       fsm_tree_fill_fn fill, void *arg);

/* The barrier: makes every staged temp durable. Slots whose sync failed
 * are dropped (their temps removed). Returns how many slots are durable. */
int fsm_tree_stage_sync(struct fsm_tree_stage *s);

/* Renames slot's temp over path if path matches expect (see
 * fsm_tree_put()). -EAGAIN: the slot is not durable or already used (fall
 * back to fsm_tree_put()); -FSM_TREE_EPENDING or -errno as fsm_tree_put(),
 * after which the slot's temp is removed. *out (may be NULL) gets the new
 * file's stat. */
int fsm_tree_stage_commit(struct fsm_tree_stage *s, int slot, const char *path,
                          const struct fsm_tree_stat *expect, struct fsm_tree_stat *out);

/* Removes every temp not committed yet (their commits become -EAGAIN);
 * returns how many. For a directory that must be empty to be removed or
 * replaced and holds a temp staged for a later file. */
int fsm_tree_stage_drop(struct fsm_tree_stage *s);

/* fsm_tree_delete(), except that the parent directory's fsync is left to
 * fsm_tree_stage_finish() (once per directory). Same results. */
int fsm_tree_stage_delete(struct fsm_tree_stage *s, const char *path,
                          const struct fsm_tree_stat *expect);

/* Fsyncs each directory a commit renamed into or a delete removed from (once each) and removes the
 * temps not committed. Returns 0 or the first fsync error. The set is empty
 * afterwards and may be reused. */
int fsm_tree_stage_finish(struct fsm_tree_stage *s);

/* fsm_tree_stage_finish() without its result, then frees; NULL is fine. */
void fsm_tree_stage_free(struct fsm_tree_stage *s);

/* Creates directory path (not its parents: ops are explicit) with mode and
 * mtime. expect must be NONE. A directory already there is adopted (two
 * creations of one directory merge; its mode and mtime are set); anything
 * else there is -FSM_TREE_EPENDING. -ENOENT if the parent is missing. */
int fsm_tree_mkdir(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                   uint32_t mode, int64_t mtime_ns, struct fsm_tree_stat *out);

/* Creates (or atomically replaces, like fsm_tree_put) a symlink at path
 * pointing to target, which is stored as given and never followed. */
int fsm_tree_symlink(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                     const char *target, int64_t mtime_ns, struct fsm_tree_stat *out);

/* Sets the mode (FSM_ATTR_MODE) and/or mtime (FSM_ATTR_MTIME) of the file,
 * directory or symlink at path (a symlink's mode is ignored), if it matches
 * expect (which must not be NONE). */
int fsm_tree_setattr(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                     uint32_t fields, uint32_t mode, int64_t mtime_ns, struct fsm_tree_stat *out);

/* Removes the file, symlink or empty directory at path if it matches expect.
 * Absent already: 0 (the goal holds). A directory with entries the index
 * does not know: -FSM_TREE_EPENDING. */
int fsm_tree_delete(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect);

/* Renames from -> to (a file, symlink or whole directory) if from matches
 * from_expect and to matches to_expect. to_expect NONE: renameat2 with
 * RENAME_NOREPLACE, so a concurrently created local entry is never
 * clobbered. Otherwise to is replaced (a directory only if empty). Both
 * parent directories are fsync'ed. *out gets the moved entry's stat. */
int fsm_tree_rename(struct fsm_tree *t, const char *from, const struct fsm_tree_stat *from_expect,
                    const char *to, const struct fsm_tree_stat *to_expect,
                    struct fsm_tree_stat *out);

#endif
