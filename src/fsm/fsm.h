/*
 * fsm.h: the deterministic apply decision of the replicated tree.
 *
 * Every node applies the committed log in order. For each op, fsm_decide()
 * looks at the op (its base version, its origin, its content) and at the
 * index (state.db's manifest: for each path its kind, version, content hash,
 * or a tombstone) and returns a plan: the list of changes to make to the index
 * and then to the tree, and whether this was a plain apply, a conflict (with
 * the conflict copy it creates) or a no-op. The function is pure: it reads the
 * index through the small struct fsm_index interface and never writes, so it
 * is unit-tested without SQLite and runs against state.db inside the apply
 * transaction. Its inputs are replicated state only (the op, its log index,
 * the index), so every node reaches the same plan. The rules, with a table,
 * are in doc/conflicts.md; in short: sequential edits never conflict; of two
 * concurrent edits the first committed stays and the later one's bytes become
 * `name.pickbox-conflict-<node>-<index>.ext`; an edit beats a concurrent
 * delete; a directory beats a file at the same path; directories merge.
 *
 * A BATCH is decided op by op: decide sub-op k, apply its plan to the index,
 * then decide sub-op k+1 (all at the batch's log index). A batch should not
 * change one path twice: the second change would see the first as concurrent
 * (its base is older than the batch's index). CHUNKS ops change
 * no path and need no decision.
 */
#ifndef PICKBOX_FSM_FSM_H
#define PICKBOX_FSM_FSM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fsm/op.h"

/* One path's row of the index (state.db manifest). */
struct fsm_index_entry {
    enum fsm_kind kind; /* FILE, DIR or SYMLINK (for a tombstone: what was deleted) */
    bool deleted;       /* tombstone: version is the index of the delete */
    uint64_t version;   /* log index of the last op that changed this path at all */
    /* log index of the last op that changed what the path holds (content,
     * kind, or the entry itself by create/move); SETATTR leaves it */
    uint64_t content_version;
    uint8_t content[FSM_CHUNK_ID_LEN]; /* FILE: fsm_content_hash(); SYMLINK: SHA-256 of
                                          the target; DIR: zero */
    uint32_t mode;
    int64_t mtime_ns;
    uint64_t size;
    char origin[FSM_NODE_MAX + 1]; /* node whose op last wrote the content */
};

/* Read access to the index; all callbacks return 0 or a negative errno (a
 * storage error aborts the decision with that code). */
struct fsm_index {
    void *arg;
    /* Fills *e for path (live or tombstone) and returns 0; -ENOENT if the
     * index has no row for path. */
    int (*get)(void *arg, const char *path, struct fsm_index_entry *e);
    /* Calls fn(fnarg, name) for each live entry directly inside directory
     * dir, stopping early (and returning that value) when fn returns
     * nonzero; 0 when done. */
    int (*list_children)(void *arg, const char *dir, int (*fn)(void *fnarg, const char *name),
                         void *fnarg);
    /* 1 if the chunk store holds chunk id, 0 if not. */
    int (*has_chunk)(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN]);
};

enum fsm_outcome {
    FSM_OUT_APPLIED = 1,    /* the op takes effect as proposed */
    FSM_OUT_CONFLICT,       /* concurrent change: a conflict copy is created */
    FSM_OUT_NOOP,           /* nothing changes (see reason) */
    FSM_OUT_MISSING_CHUNKS, /* PUT references chunks neither carried nor stored: the op
                               fails alike on every node; the proposer re-proposes it */
};

enum fsm_action_type {
    /* path := the op's leaf (PUT: a file with its chunks, mode, mtime, size;
     * SYMLINK: a symlink). replace: a live leaf is there and is replaced. */
    FSM_ACT_WRITE = 1,
    /* a directory at path with mode, mtime (explicit MKDIR, or implicit
     * parent of a path being created: mode 0755). */
    FSM_ACT_MKDIR,
    /* mode and/or mtime (fields) of the live entry at path. */
    FSM_ACT_SETATTR,
    /* path (a leaf or an empty directory) becomes a tombstone. */
    FSM_ACT_DELETE,
    /* the entry at path and everything below it moves to path2; path becomes
     * a tombstone. replace: a live leaf or empty directory at path2 is
     * replaced. */
    FSM_ACT_MOVE,
};

/*
 * One change. Applying it to the index sets, for every path it creates or
 * changes, version = the op's log index; content_version too, except for
 * SETATTR; origin = the op's origin for WRITE and MKDIR (MOVE keeps the moved
 * entries' origins). Moved descendants get the new paths and both versions.
 */
struct fsm_action {
    enum fsm_action_type type;
    char *path;  /* owned */
    char *path2; /* MOVE: owned destination; NULL otherwise */
    bool replace;
    bool conflict_copy; /* path (WRITE) or path2 (MOVE) is a conflict copy */
    uint32_t fields;    /* SETATTR: FSM_ATTR_* */
    uint32_t mode;      /* MKDIR, SETATTR */
    int64_t mtime_ns;   /* MKDIR, SETATTR */
};

struct fsm_decision {
    enum fsm_outcome outcome;
    const char *rule;   /* static: the doc/conflicts.md rule id, e.g. "R5" */
    const char *reason; /* static: one line for logs */
    struct fsm_action *acts;
    size_t n_acts;
    size_t cap;
};

/* Empties d (no allocation). */
void fsm_decision_init(struct fsm_decision *d);
/* Frees the actions and re-initialises d. */
void fsm_decision_free(struct fsm_decision *d);

/*
 * Decides what op (not a BATCH or CHUNKS; must have passed fsm_op_validate())
 * committed at log index `index` does to the index described by ix. d must
 * be initialised; on success it holds the plan, to be applied in order.
 * Returns 0, -EINVAL for a BATCH/CHUNKS op, -ENAMETOOLONG if a needed
 * conflict-copy name cannot be formed within FSM_PATH_MAX, or an ix error.
 * Deterministic: the same op, index and index contents give the same plan.
 */
int fsm_decide(const struct fsm_op *op, uint64_t index, const struct fsm_index *ix,
               struct fsm_decision *d);

/*
 * Writes the conflict-copy path for path into out (FSM_PATH_MAX + 1 bytes):
 * the same directory, the basename split into stem and extension, and
 * "<stem>.pickbox-conflict-<node>-<index>[-<seq>]<ext>" (seq only when
 * seq > 0). The extension is the last ".xyz" of the basename (1..16 bytes
 * after the dot, not a leading dot: ".bashrc" has none), or ".tar.<x>" for a
 * compressed tarball. A stem too long for FSM_NAME_MAX or FSM_PATH_MAX is
 * cut (never inside a UTF-8 sequence). Returns 0 or -ENAMETOOLONG.
 */
int fsm_conflict_name(const char *path, const char *node, uint64_t index, unsigned seq,
                      char out[FSM_PATH_MAX + 1]);

const char *fsm_outcome_name(enum fsm_outcome o);

#endif
