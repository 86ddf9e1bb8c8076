/*
 * watch.h: the tree watcher. Turns what people do in a directory tree into a
 * stream of *candidate changes* for its owner (the daemon), which compares
 * each candidate with the replicated index and turns real differences into
 * ops. The watcher never decides what is replicated; it reports what it saw,
 * as exactly and as quietly as it can.
 *
 * How it sees: inotify on every directory of the tree (a new directory is
 * watched before it is read, so nothing created inside it in between is
 * missed), a short per-path debounce, rename pairing by cookie, and rescans
 * when events may have been lost (queue overflow, a watch that could not be
 * added, a periodic safety rescan).
 *
 * The watcher keeps a model of the tree: for every path, what it last
 * reported to the owner (its lstat). Candidates are emitted only when the
 * disk differs from that model, so a burst of events on one path becomes one
 * candidate, and a temp file that is born and renamed over its target inside
 * the debounce window is never seen by the owner (editor saves: vim's
 * rename-to-backup dance, gedit/GIO .goutputstream-XXXXXX, sed -i).
 *
 * Candidate semantics (struct watch_change, kinds below):
 * - UPSERT_FILE path st: a regular file exists at path with lstat st and its
 *   content may have changed (created, written, truncated, replaced by a
 *   rename over it, or found different by a rescan). The owner hashes it.
 *   st.nlink > 1 means hard links: pickbox does not preserve them; each
 *   name is reported as an independent file (the owner decides).
 * - ATTR path st: only metadata changed (chmod, chown, touch/utimensat of
 *   both times) of a file or directory already reported with the same inode
 *   and size; only IN_ATTRIB events were seen, so content is unchanged.
 *   (Setting mtime alone, `touch -m`, is reported by the kernel as IN_MODIFY,
 *   like a write, and so arrives as UPSERT_FILE.) A rename or link count
 *   change that moves only ctime is no candidate.
 * - MKDIR path st: a directory exists at path (created, moved in, or found by
 *   a rescan).
 * - SYMLINK path st target: a symlink exists at path (never followed); target
 *   is its readlink(2) value. Emitted again when the target changes.
 * - UNSUPPORTED path st: a device, FIFO or socket exists at path. Not
 *   replicated; counted in stats. A later REMOVE may follow.
 * - REMOVE path: nothing exists at path any more; if the owner knew a
 *   directory there, its whole subtree is gone too. (A REMOVE for a path the
 *   owner does not know is harmless and may happen.)
 * - RENAME from -> path st: what the owner knew at `from` (a file, symlink or
 *   a whole directory with its subtree) is now at `path`, replacing whatever
 *   was at `path`. One candidate per rename, also for directories; events
 *   later inside a renamed directory use the new paths. Renames are held for
 *   the debounce window so an editor's backup dance collapses: vim's
 *   "rename f f~; write f; unlink f~" yields one UPSERT_FILE f, no RENAME.
 *   A rename out of the tree is a REMOVE; a rename into the tree is a
 *   creation (MKDIR + its content, or UPSERT_FILE ...). Should the owner not
 *   know `from` (a race with its own applies), it treats the RENAME as a
 *   creation of `path` (for a directory: followed by nothing, so it should
 *   ask watch_rescan(path)).
 * - RESCAN_BEGIN path / RESCAN_END path: a full rescan of the subtree at path
 *   ("" = the whole tree). Between the two, every entry that exists at or
 *   below path is reported (UPSERT_FILE/MKDIR/SYMLINK/UNSUPPORTED with
 *   rescan = true, whether or not it changed). When RESCAN_END arrives,
 *   anything the owner knows at or below path that was not reported in
 *   between is gone. Full rescans happen at start (the first loop iteration
 *   after watch_new), after an inotify queue overflow, and on watch_rescan().
 *   The periodic safety rescan and the retry of a failed watch are diffs
 *   instead: they emit only what differs from what the watcher last reported
 *   (with explicit REMOVEs) and no RESCAN_BEGIN/END.
 *   Full and periodic rescans run in slices (scan_slice entries, at most
 *   ~5 ms, per loop turn) so a large tree does not hold the loop; meanwhile
 *   inotify is not read and nothing else is emitted (between BEGIN and END
 *   only the rescan's candidates arrive), and the owner may apply (suppress
 *   calls) between slices. Flushes of many due candidates are bounded per
 *   loop turn the same way.
 * - Timing: a path is reported debounce_ms after its last event. A regular
 *   file that was created or written (IN_CREATE, IN_MODIFY) but not yet
 *   closed (IN_CLOSE_WRITE) waits up to write_hold_ms for its writer; the
 *   close ends that wait early (then debounce_ms, so that a rename right
 *   after the close, as editors do, is paired first; settle_ms instead of
 *   debounce_ms when the close was the path's last event and no rename is
 *   pending, since such a rename follows the close at once). A path that
 *   never goes quiet is reported at least every max_delay_ms.
 * - Order: a directory's creation is emitted before anything inside it;
 *   pending renames are emitted before any other candidate, in the order they
 *   happened.
 *
 * Echo suppression (the owner's own applies): the owner compares every
 * candidate with its index, which is enough to be correct. To keep its own
 * writes from coming back at all, it brackets each materialization:
 *     watch_suppress_begin(w, "a/b");         // about to write a/b
 *     ... write .pickbox.tmp.X, fsync, rename over a/b ...
 *     lstat("a/b", &st); watch_suppress_end(w, "a/b", &st);
 * and for a rename op, watch_suppress_rename(w, from, to) after rename(2),
 * inside begin/end of both paths. While a path is held, the watcher does not
 * emit for it (events are still recorded). At end, the given stat becomes
 * what the watcher "last reported" for the path, so the events the apply
 * produced (read later from the inotify queue) match and emit nothing; a real
 * user edit that raced with the apply differs (inode, size, mtime, ctime) and
 * is emitted normally.
 *
 * Always ignored: `.pickbox/` at the tree root and any entry whose basename
 * starts with `.pickbox.tmp.`. Configured ignore patterns are fnmatch(3)
 * globs: a pattern without '/' is matched against the basename (so "*.swp"
 * matches ".f.swp" and "a/.f.swp"), a pattern with '/' against the whole
 * tree-relative path with FNM_PATHNAME ("build/ *.o" only at that depth). A
 * leading '/' anchors at the root and is stripped; a trailing '/' limits the
 * pattern to directories ("build/"). An ignored directory is neither watched
 * nor scanned. Renaming an ignored name onto a real one is a creation of the
 * real one (this is how the owner's own .pickbox.tmp.* files arrive when not
 * suppressed).
 *
 * Paths are tree-relative byte strings (no leading '/'; "" is the root),
 * possibly not UTF-8 and possibly containing newlines; they are valid only
 * during the callback.
 *
 * Threading: everything runs on the libevent loop of the base passed to
 * watch_new(); no function may be called from another thread. The callback
 * must not call watch_free(), watch_suppress_end() or watch_suppress_rename()
 * (those two return -EBUSY there); it may call watch_rescan() (deferred),
 * watch_get_stats() and watch_suppress_begin().
 *
 * Never fatal: overflow, a failed inotify_add_watch (ENOSPC: raise
 * fs.inotify.max_user_watches), unreadable directories and too long paths
 * are logged (once per episode), counted, and answered with a rescan or a
 * retry with backoff. Full rescans after repeated overflows are spaced out
 * (twice the last one's duration, at most 60 s) so they cannot loop.
 */
#ifndef PICKBOX_WATCH_WATCH_H
#define PICKBOX_WATCH_WATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "lib/error.h"

struct event_base;
struct watch;

enum watch_kind {
    WATCH_UPSERT_FILE = 1,
    WATCH_MKDIR,
    WATCH_SYMLINK,
    WATCH_UNSUPPORTED,
    WATCH_REMOVE,
    WATCH_RENAME,
    WATCH_ATTR,
    WATCH_RESCAN_BEGIN,
    WATCH_RESCAN_END,
};

enum watch_type {
    WATCH_TYPE_NONE = 0,
    WATCH_TYPE_FILE,
    WATCH_TYPE_DIR,
    WATCH_TYPE_SYMLINK,
    WATCH_TYPE_OTHER, /* device, FIFO, socket */
};

/* What lstat(2) said when the watcher looked. */
struct watch_stat {
    enum watch_type type;
    uint32_t mode; /* full st_mode */
    uint64_t size;
    uint64_t ino;
    uint64_t nlink;
    int64_t mtime_ns;
    int64_t ctime_ns;
};

struct watch_change {
    enum watch_kind kind;
    const char *path;     /* tree-relative; for RENAME the new path */
    const char *from;     /* RENAME only: the old path; NULL otherwise */
    const char *target;   /* SYMLINK only: readlink(2) value; NULL otherwise */
    struct watch_stat st; /* zeroed for REMOVE, RESCAN_BEGIN/END */
    bool rescan;          /* emitted by a full rescan (between BEGIN and END) */
};

typedef void (*watch_cb)(const struct watch_change *change, void *arg);

/* Test hook replacing inotify_add_watch(2); returns a wd or -1 with errno. */
typedef int (*watch_add_watch_fn)(int fd, const char *path, uint32_t mask, void *arg);

struct watch_options {
    uint32_t debounce_ms;        /* quiet time per path before it is reported; default 30 */
    uint32_t settle_ms;          /* same after a close of a written file, no rename pending; 5 */
    uint32_t write_hold_ms;      /* a file written but not yet closed waits this long; 1000 */
    uint32_t max_delay_ms;       /* a busy path is reported at least this often; 5000 */
    uint32_t rename_window_ms;   /* a MOVED_FROM waits this long for its MOVED_TO; 10 */
    uint32_t rescan_interval_ms; /* periodic safety rescan; 0 = off; default 600000 */
    uint32_t retry_min_ms;       /* first retry of failed watches; default 1000 */
    uint32_t retry_max_ms;       /* backoff cap; default 300000 */
    uint32_t scan_slice;         /* rescans and flushes: entries per loop turn (and at most
                                  * ~5 ms; the rest on the next turn); 1024 */
    const char *const *ignore;   /* n_ignore glob patterns (copied by watch_new) */
    size_t n_ignore;
    watch_add_watch_fn add_watch; /* tests only; NULL = inotify_add_watch */
    void *add_watch_arg;
};

/* Fills o with the defaults above (no ignore patterns, no hook). */
void watch_options_init(struct watch_options *o);

/*
 * Creates a watcher of the directory root (absolute or relative to the cwd;
 * it must exist and be a directory, not a symlink). Nothing is read before
 * the loop runs: the first iteration of base's loop performs the initial full
 * rescan (RESCAN_BEGIN "" ... RESCAN_END ""), adding a watch to every
 * directory. cb(change, arg) is then called from the loop for every
 * candidate. opts may be NULL for defaults; it and its strings are copied.
 * Returns NULL and fills err on failure (root missing, inotify unavailable,
 * a bad ignore pattern).
 */
struct watch *watch_new(struct event_base *base, const char *root, const struct watch_options *opts,
                        watch_cb cb, void *arg, struct pb_error *err);

/* Removes every watch, frees everything; pending candidates are dropped.
 * NULL is allowed. Not from inside the callback. */
void watch_free(struct watch *w);

/*
 * Requests a full rescan of the subtree at subpath ("" or NULL = the whole
 * tree). It runs from the loop soon after (never inside this call) and is
 * reported as RESCAN_BEGIN subpath ... RESCAN_END subpath. Returns 0, or
 * -EINVAL for a path that is absolute or contains empty, "." or ".."
 * components. An ignored subpath gives RESCAN_BEGIN/END with nothing in
 * between (the owner must not know anything there).
 */
int watch_rescan(struct watch *w, const char *subpath);

/*
 * Echo suppression, see the file comment. begin holds path (nested calls
 * count); end releases one hold and records st (the lstat of path after the
 * apply; NULL = the apply removed path) as what the owner knows. rename
 * tells the watcher that the owner renamed from -> to (already done), so the
 * watcher moves its model (and, for a directory, the whole subtree's watches)
 * without emitting a RENAME. Paths are the owner's (as it knows them from
 * the candidates so far). end(path, NULL) for a path the user has renamed
 * away meanwhile turns that pending rename into a creation at its new path.
 * Return 0 or -EINVAL for a bad path; end without begin returns -ENOENT (st
 * is still recorded).
 */
int watch_suppress_begin(struct watch *w, const char *path);
int watch_suppress_end(struct watch *w, const char *path, const struct watch_stat *st);
int watch_suppress_rename(struct watch *w, const char *from, const char *to);

/* Fills ws from a struct stat (for watch_suppress_end and tests). */
void watch_stat_from_stat(struct watch_stat *ws, const struct stat *st);

struct watch_stats {
    uint64_t watches;        /* directories currently watched */
    uint64_t nodes;          /* paths in the model */
    uint64_t pending;        /* paths, renames and moves waiting for their debounce,
                              * plus 1 while a rescan runs */
    uint64_t events;         /* inotify events read */
    uint64_t candidates;     /* candidates emitted */
    uint64_t overflows;      /* IN_Q_OVERFLOW seen */
    uint64_t rescans;        /* full + periodic + retry rescans run */
    uint64_t watch_failures; /* inotify_add_watch failures */
    uint64_t unwatched;      /* directories currently without a watch */
    uint64_t unsupported;    /* UNSUPPORTED candidates */
    uint64_t errors;         /* other failures (unreadable dir, too long path) */
    bool root_lost;          /* the root was deleted, moved or unmounted */
};

void watch_get_stats(const struct watch *w, struct watch_stats *out);

/* Test hooks (they go through the same code as the real thing). */
/* Handles a synthetic IN_Q_OVERFLOW as if the kernel had queued one. */
void watch_test_inject_overflow(struct watch *w);
/* Reads and discards every event queued right now (events lost silently). */
void watch_test_discard_events(struct watch *w);

#endif
