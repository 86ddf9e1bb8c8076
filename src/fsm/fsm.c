/*
 * fsm.c: the apply decision and conflict rules (see fsm.h and doc/conflicts.md).
 *
 * Each decide_* function below implements one op type's rows of the table in
 * doc/conflicts.md; the row ids (R1, R2, ...) are returned in
 * fsm_decision.rule and appear in comments here and in the tests.
 *
 * Why "first committed wins" (not "last writer wins"): the entry already in
 * the index may have been read, copied and built upon by every node since it
 * was committed; replacing it under them because a concurrent edit committed
 * later would turn one conflict into a cascade (Syncthing's copy storms). The
 * later edit is never dropped: its bytes go to a conflict copy named after its
 * origin node and log index, next to the original, where its author finds it.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsm/fsm.h"
#include "lib/util.h"

#define FSM_IMPLICIT_DIR_MODE 0755u
#define FSM_EXT_MAX           16  /* bytes after the dot */
#define FSM_CONFLICT_SEQ_MAX  100 /* name collisions tried before giving up */

const char *fsm_outcome_name(enum fsm_outcome o)
{
    switch (o) {
    case FSM_OUT_APPLIED:
        return "applied";
    case FSM_OUT_CONFLICT:
        return "conflict";
    case FSM_OUT_NOOP:
        return "noop";
    case FSM_OUT_MISSING_CHUNKS:
        return "missing-chunks";
    }
    return "?";
}

void fsm_decision_init(struct fsm_decision *d)
{
    memset(d, 0, sizeof(*d));
}

void fsm_decision_free(struct fsm_decision *d)
{
    for (size_t i = 0; i < d->n_acts; i++) {
        free(d->acts[i].path);
        free(d->acts[i].path2);
    }
    free(d->acts);
    fsm_decision_init(d);
}

static struct fsm_action *act_push(struct fsm_decision *d, enum fsm_action_type type,
                                   const char *path, const char *path2)
{
    if (d->n_acts == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 4;
        d->acts = pb_xreallocarray(d->acts, d->cap, sizeof(*d->acts));
    }
    struct fsm_action *a = &d->acts[d->n_acts++];
    memset(a, 0, sizeof(*a));
    a->type = type;
    a->path = pb_xstrdup(path);
    a->path2 = path2 ? pb_xstrdup(path2) : NULL;
    return a;
}

static void set_outcome(struct fsm_decision *d, enum fsm_outcome o, const char *rule,
                        const char *reason)
{
    d->outcome = o;
    d->rule = rule;
    d->reason = reason;
}

/* ---- conflict names ------------------------------------------------------ */

static bool ascii_ieq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char x = a[i], y = b[i];
        if (x >= 'A' && x <= 'Z')
            x = (char)(x - 'A' + 'a');
        if (y >= 'A' && y <= 'Z')
            y = (char)(y - 'A' + 'a');
        if (x != y)
            return false;
    }
    return true;
}

/* Length of the extension of name (len bytes), including its dot; 0 if none. */
static size_t ext_len(const char *name, size_t len)
{
    const char *dot = NULL;
    for (size_t i = len; i-- > 1;) { /* a dot at 0 starts a dotfile, not an extension */
        if (name[i] == '.') {
            dot = name + i;
            break;
        }
    }
    if (dot == NULL)
        return 0;
    size_t e = len - (size_t)(dot - name);
    if (e < 2 || e - 1 > FSM_EXT_MAX)
        return 0;
    /* "x.tar.gz": keep ".tar.gz" together so the copy still unpacks by name */
    size_t stem = len - e;
    if (stem > 4 && ascii_ieq(name + stem - 4, ".tar", 4))
        e += 4;
    return e;
}

int fsm_conflict_name(const char *path, const char *node, uint64_t index, unsigned seq,
                      char out[FSM_PATH_MAX + 1])
{
    char tag[FSM_NODE_MAX + 64];
    int tl;
    if (seq == 0)
        tl = snprintf(tag, sizeof(tag), "%s%s-%" PRIu64, FSM_CONFLICT_TAG, node, index);
    else
        tl = snprintf(tag, sizeof(tag), "%s%s-%" PRIu64 "-%u", FSM_CONFLICT_TAG, node, index, seq);
    if (tl < 0 || (size_t)tl >= sizeof(tag))
        return -ENAMETOOLONG;

    size_t plen = strlen(path);
    const char *slash = strrchr(path, '/');
    size_t dir_len = slash ? (size_t)(slash - path) + 1 : 0; /* including the '/' */
    const char *name = path + dir_len;
    size_t name_len = plen - dir_len;
    size_t e = ext_len(name, name_len);
    size_t stem = name_len - e;

    /* Room for the stem inside one name and inside the whole path. */
    size_t fixed = (size_t)tl + e;
    if (fixed >= FSM_NAME_MAX || dir_len + fixed >= FSM_PATH_MAX)
        return -ENAMETOOLONG;
    size_t room = FSM_NAME_MAX - fixed;
    if (room > FSM_PATH_MAX - dir_len - fixed)
        room = FSM_PATH_MAX - dir_len - fixed;
    if (stem > room) {
        stem = room;
        /* do not cut a UTF-8 sequence: back up to its lead byte */
        while (stem > 0 && ((unsigned char)name[stem] & 0xC0) == 0x80)
            stem--;
        if (stem == 0)
            return -ENAMETOOLONG;
    }
    memcpy(out, path, dir_len);
    memcpy(out + dir_len, name, stem);
    memcpy(out + dir_len + stem, tag, (size_t)tl);
    memcpy(out + dir_len + stem + (size_t)tl, name + name_len - e, e);
    out[dir_len + stem + (size_t)tl + e] = '\0';
    return 0;
}

/* ---- index access -------------------------------------------------------- */

/* *live: a live entry is at path (e filled); *known: a row exists at all. */
static int lookup(const struct fsm_index *ix, const char *path, struct fsm_index_entry *e,
                  bool *live)
{
    memset(e, 0, sizeof(*e));
    int rc = ix->get(ix->arg, path, e);
    if (rc == -ENOENT) {
        memset(e, 0, sizeof(*e));
        *live = false;
        return 0;
    }
    if (rc < 0)
        return rc;
    *live = !e->deleted;
    return 0;
}

static int stop_at_first(void *arg, const char *name)
{
    (void)arg;
    (void)name;
    return 1;
}

static int has_children(const struct fsm_index *ix, const char *dir, bool *any)
{
    int rc = ix->list_children(ix->arg, dir, stop_at_first, NULL);
    if (rc < 0)
        return rc;
    *any = rc > 0;
    return 0;
}

/* The first conflict name for path that is not live in the index. */
static int free_conflict_name(const struct fsm_index *ix, const char *path, const char *node,
                              uint64_t index, char out[FSM_PATH_MAX + 1])
{
    for (unsigned seq = 0; seq < FSM_CONFLICT_SEQ_MAX; seq++) {
        struct fsm_index_entry e;
        bool live;
        int rc = fsm_conflict_name(path, node, index, seq, out);
        if (rc < 0)
            return rc;
        if ((rc = lookup(ix, out, &e, &live)) < 0)
            return rc;
        if (!live)
            return 0;
    }
    return -ENAMETOOLONG;
}

static bool is_leaf(enum fsm_kind k)
{
    return k == FSM_KIND_FILE || k == FSM_KIND_SYMLINK;
}

static int64_t op_mtime(const struct fsm_op *op)
{
    switch (op->type) {
    case FSM_OP_PUT:
        return op->u.put.mtime_ns;
    case FSM_OP_MKDIR:
        return op->u.mkdir.mtime_ns;
    case FSM_OP_SYMLINK:
        return op->u.symlink.mtime_ns;
    case FSM_OP_SETATTR:
        return op->u.setattr.mtime_ns;
    default:
        return 0;
    }
}

/*
 * Makes every ancestor of path a live directory (R16): an absent or
 * deleted ancestor is created (children survive a concurrent delete of their
 * directory); a file or symlink in the way is moved to a conflict copy named
 * after the op that wrote it (a directory beats a file). *conflict is set if
 * something was moved.
 */
static int ensure_parents(const struct fsm_op *op, const char *path, const struct fsm_index *ix,
                          struct fsm_decision *d, bool *conflict)
{
    char anc[FSM_PATH_MAX + 1];
    char cname[FSM_PATH_MAX + 1];
    size_t len = strlen(path);
    bool creating = false;
    memcpy(anc, path, len + 1);
    for (size_t i = 0; i < len; i++) {
        if (path[i] != '/')
            continue;
        anc[i] = '\0';
        if (!creating) {
            struct fsm_index_entry e;
            bool live;
            int rc = lookup(ix, anc, &e, &live);
            if (rc < 0)
                return rc;
            if (live && e.kind == FSM_KIND_DIR) {
                anc[i] = '/';
                continue;
            }
            if (live) {
                rc = free_conflict_name(ix, anc, e.origin, e.content_version, cname);
                if (rc < 0)
                    return rc;
                act_push(d, FSM_ACT_MOVE, anc, cname)->conflict_copy = true;
                *conflict = true;
            }
            creating = true; /* below a new directory everything is new */
        }
        struct fsm_action *a = act_push(d, FSM_ACT_MKDIR, anc, NULL);
        a->mode = FSM_IMPLICIT_DIR_MODE;
        a->mtime_ns = op_mtime(op);
        anc[i] = '/';
    }
    return 0;
}

/* ---- per-type decisions -------------------------------------------------- */

static int leaf_content(const struct fsm_op *op, enum fsm_kind *kind, uint8_t h[FSM_CHUNK_ID_LEN])
{
    if (op->type == FSM_OP_PUT) {
        *kind = FSM_KIND_FILE;
        return fsm_content_hash(op->u.put.refs, op->u.put.n_refs, h);
    }
    *kind = FSM_KIND_SYMLINK;
    return fsm_sha256(op->u.symlink.target, strlen(op->u.symlink.target), h);
}

static int cmp_id(const void *a, const void *b)
{
    return memcmp(a, b, FSM_CHUNK_ID_LEN);
}

static int chunks_present(const struct fsm_op *op, const struct fsm_index *ix, bool *ok)
{
    uint32_t nd = op->u.put.n_data;
    uint8_t(*carried)[FSM_CHUNK_ID_LEN] = NULL;
    int rc = 0;
    *ok = true;
    if (nd > 0) { /* sorted once: a big PUT may carry thousands of chunks */
        carried = pb_xreallocarray(NULL, nd, FSM_CHUNK_ID_LEN);
        for (uint32_t k = 0; k < nd; k++)
            memcpy(carried[k], op->u.put.data[k].id, FSM_CHUNK_ID_LEN);
        qsort(carried, nd, FSM_CHUNK_ID_LEN, cmp_id);
    }
    for (uint32_t i = 0; i < op->u.put.n_refs; i++) {
        const uint8_t *id = op->u.put.refs[i].id;
        if (nd > 0 && bsearch(id, carried, nd, FSM_CHUNK_ID_LEN, cmp_id) != NULL)
            continue;
        rc = ix->has_chunk(ix->arg, id);
        if (rc < 0)
            break;
        if (rc == 0) {
            *ok = false;
            break;
        }
        rc = 0;
    }
    free(carried);
    return rc < 0 ? rc : 0;
}

/* PUT and SYMLINK: write a leaf. */
static int decide_leaf(const struct fsm_op *op, uint64_t index, const struct fsm_index *ix,
                       struct fsm_decision *d)
{
    struct fsm_index_entry e;
    bool live, moved = false, ok;
    enum fsm_kind kind;
    uint8_t h[FSM_CHUNK_ID_LEN];
    char cname[FSM_PATH_MAX + 1];
    int rc;

    if (op->type == FSM_OP_PUT) {
        if ((rc = chunks_present(op, ix, &ok)) < 0)
            return rc;
        if (!ok) {
            set_outcome(d, FSM_OUT_MISSING_CHUNKS, "R0",
                        "references a chunk neither carried nor stored");
            return 0;
        }
    }
    if ((rc = leaf_content(op, &kind, h)) < 0)
        return rc;
    if ((rc = lookup(ix, op->path, &e, &live)) < 0)
        return rc;

    if (!live) {
        if ((rc = ensure_parents(op, op->path, ix, d, &moved)) < 0)
            return rc;
        act_push(d, FSM_ACT_WRITE, op->path, NULL);
        if (e.deleted && op->base < e.version)
            set_outcome(d, moved ? FSM_OUT_CONFLICT : FSM_OUT_APPLIED, "R3",
                        "edit beats a concurrent delete: recreated");
        else
            set_outcome(d, moved ? FSM_OUT_CONFLICT : FSM_OUT_APPLIED, "R1", "created");
        return 0;
    }
    if (is_leaf(e.kind)) {
        if (op->base >= e.content_version) {
            act_push(d, FSM_ACT_WRITE, op->path, NULL)->replace = true;
            set_outcome(d, FSM_OUT_APPLIED, "R2", "sequential edit");
            return 0;
        }
        if (e.kind == kind && memcmp(e.content, h, FSM_CHUNK_ID_LEN) == 0) {
            set_outcome(d, FSM_OUT_NOOP, "R5", "concurrent edit with identical content");
            return 0;
        }
        if ((rc = free_conflict_name(ix, op->path, op->origin, index, cname)) < 0)
            return rc;
        act_push(d, FSM_ACT_WRITE, cname, NULL)->conflict_copy = true;
        set_outcome(d, FSM_OUT_CONFLICT, "R4",
                    "concurrent edit: first committed stays, this one becomes a conflict copy");
        return 0;
    }
    /* a directory is there */
    bool children = false;
    if (op->base >= e.content_version && (rc = has_children(ix, op->path, &children)) < 0)
        return rc;
    if (op->base >= e.content_version && !children) {
        act_push(d, FSM_ACT_DELETE, op->path, NULL);
        act_push(d, FSM_ACT_WRITE, op->path, NULL);
        set_outcome(d, FSM_OUT_APPLIED, "R6", "empty directory replaced by a file (sequential)");
        return 0;
    }
    if ((rc = free_conflict_name(ix, op->path, op->origin, index, cname)) < 0)
        return rc;
    act_push(d, FSM_ACT_WRITE, cname, NULL)->conflict_copy = true;
    set_outcome(d, FSM_OUT_CONFLICT, "R7", "a directory beats a file: the file becomes a copy");
    return 0;
}

static int decide_mkdir(const struct fsm_op *op, uint64_t index, const struct fsm_index *ix,
                        struct fsm_decision *d)
{
    struct fsm_index_entry e;
    bool live, moved = false;
    char cname[FSM_PATH_MAX + 1];
    int rc = lookup(ix, op->path, &e, &live);
    (void)index;
    if (rc < 0)
        return rc;
    if (live && e.kind == FSM_KIND_DIR) {
        set_outcome(d, FSM_OUT_NOOP, "R9", "directory exists: directories merge");
        return 0;
    }
    if (live) {
        if (op->base >= e.content_version) {
            act_push(d, FSM_ACT_DELETE, op->path, NULL);
            set_outcome(d, FSM_OUT_APPLIED, "R10", "file replaced by a directory (sequential)");
        } else {
            rc = free_conflict_name(ix, op->path, e.origin, e.content_version, cname);
            if (rc < 0)
                return rc;
            act_push(d, FSM_ACT_MOVE, op->path, cname)->conflict_copy = true;
            set_outcome(d, FSM_OUT_CONFLICT, "R11",
                        "a directory beats a file: the file moves to a conflict copy");
        }
    } else {
        if ((rc = ensure_parents(op, op->path, ix, d, &moved)) < 0)
            return rc;
        set_outcome(d, moved ? FSM_OUT_CONFLICT : FSM_OUT_APPLIED, "R8", "directory created");
    }
    struct fsm_action *a = act_push(d, FSM_ACT_MKDIR, op->path, NULL);
    a->mode = op->u.mkdir.mode;
    a->mtime_ns = op->u.mkdir.mtime_ns;
    return 0;
}

static int decide_delete(const struct fsm_op *op, const struct fsm_index *ix,
                         struct fsm_decision *d)
{
    struct fsm_index_entry e;
    bool live, children = false;
    int rc = lookup(ix, op->path, &e, &live);
    if (rc < 0)
        return rc;
    if (!live) {
        set_outcome(d, FSM_OUT_NOOP, "R12", "already absent");
        return 0;
    }
    bool want_dir = op->u.del.is_dir;
    if (want_dir != (e.kind == FSM_KIND_DIR) || op->base < e.version) {
        set_outcome(d, FSM_OUT_NOOP, "R14", "edit beats a concurrent delete: kept");
        return 0;
    }
    if (e.kind == FSM_KIND_DIR && (rc = has_children(ix, op->path, &children)) < 0)
        return rc;
    if (children) {
        set_outcome(d, FSM_OUT_NOOP, "R15",
                    "directory has children the delete did not remove: they survive");
        return 0;
    }
    act_push(d, FSM_ACT_DELETE, op->path, NULL);
    set_outcome(d, FSM_OUT_APPLIED, "R13", "deleted");
    return 0;
}

static int decide_setattr(const struct fsm_op *op, const struct fsm_index *ix,
                          struct fsm_decision *d)
{
    struct fsm_index_entry e;
    bool live;
    int rc = lookup(ix, op->path, &e, &live);
    if (rc < 0)
        return rc;
    if (!live) {
        set_outcome(d, FSM_OUT_NOOP, "R18", "target absent: metadata alone does not resurrect");
        return 0;
    }
    uint32_t fields = op->u.setattr.fields;
    if (e.kind == FSM_KIND_SYMLINK)
        fields &= ~FSM_ATTR_MODE; /* a symlink has no mode of its own */
    if (fields == 0) {
        set_outcome(d, FSM_OUT_NOOP, "R17", "nothing to set on a symlink");
        return 0;
    }
    struct fsm_action *a = act_push(d, FSM_ACT_SETATTR, op->path, NULL);
    a->fields = fields;
    a->mode = op->u.setattr.mode;
    a->mtime_ns = op->u.setattr.mtime_ns;
    set_outcome(d, FSM_OUT_APPLIED, "R17", "attributes set (last in log order wins)");
    return 0;
}

static bool is_under(const char *path, const char *dir)
{
    size_t n = strlen(dir);
    return strncmp(path, dir, n) == 0 && path[n] == '/';
}

static int decide_rename(const struct fsm_op *op, uint64_t index, const struct fsm_index *ix,
                         struct fsm_decision *d)
{
    struct fsm_index_entry src, dst;
    bool src_live, dst_live, moved = false, children = false;
    char cname[FSM_PATH_MAX + 1];
    const char *to = op->u.rename.to;
    int rc;

    if ((rc = lookup(ix, op->path, &src, &src_live)) < 0)
        return rc;
    if (!src_live) {
        set_outcome(d, FSM_OUT_NOOP, "R19",
                    "source gone (concurrent delete or rename won); the renaming node's "
                    "watcher re-proposes what it holds");
        return 0;
    }
    if (is_under(to, op->path)) {
        set_outcome(d, FSM_OUT_NOOP, "R20", "cannot move a directory into itself");
        return 0;
    }
    if ((rc = lookup(ix, to, &dst, &dst_live)) < 0)
        return rc;
    if (!dst_live) {
        if ((rc = ensure_parents(op, to, ix, d, &moved)) < 0)
            return rc;
        act_push(d, FSM_ACT_MOVE, op->path, to);
        set_outcome(d, moved ? FSM_OUT_CONFLICT : FSM_OUT_APPLIED, "R21", "renamed");
        return 0;
    }
    bool saw_dst = op->u.rename.base_to >= dst.content_version;
    if (saw_dst && src.kind == FSM_KIND_DIR && dst.kind == FSM_KIND_DIR &&
        (rc = has_children(ix, to, &children)) < 0)
        return rc;
    if (saw_dst && ((is_leaf(src.kind) && is_leaf(dst.kind)) ||
                    (src.kind == FSM_KIND_DIR && dst.kind == FSM_KIND_DIR && !children))) {
        act_push(d, FSM_ACT_MOVE, op->path, to)->replace = true;
        set_outcome(d, FSM_OUT_APPLIED, "R22", "renamed over the target it had seen");
        return 0;
    }
    if ((rc = free_conflict_name(ix, to, op->origin, index, cname)) < 0)
        return rc;
    act_push(d, FSM_ACT_MOVE, op->path, cname)->conflict_copy = true;
    set_outcome(d, FSM_OUT_CONFLICT, "R23",
                "target changed concurrently: it stays, the moved entry becomes a conflict copy");
    return 0;
}

int fsm_decide(const struct fsm_op *op, uint64_t index, const struct fsm_index *ix,
               struct fsm_decision *d)
{
    int rc;
    switch (op->type) {
    case FSM_OP_PUT:
    case FSM_OP_SYMLINK:
        rc = decide_leaf(op, index, ix, d);
        break;
    case FSM_OP_MKDIR:
        rc = decide_mkdir(op, index, ix, d);
        break;
    case FSM_OP_DELETE:
        rc = decide_delete(op, ix, d);
        break;
    case FSM_OP_SETATTR:
        rc = decide_setattr(op, ix, d);
        break;
    case FSM_OP_RENAME:
        rc = decide_rename(op, index, ix, d);
        break;
    case FSM_OP_BATCH:
    case FSM_OP_CHUNKS:
    default:
        return -EINVAL;
    }
    if (rc < 0)
        fsm_decision_free(d);
    return rc;
}
