/*
 * materialize.c: apply decisions to the tree (see materialize.h).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fsm/materialize.h"
#include "fsm/bigwrite.h"
#include "lib/log.h"
#include "lib/util.h"

/* Files at least this large say how long writing them took when they are
 * written on the applying thread (no background writer, or a repair). */
#define MATERIALIZE_LOG_BYTES (64u * 1024u * 1024u)
/* Files up to this size are staged by fsm_materialize_stage(): the temps of
 * a whole group are written before its one barrier, so they should be small. */
#define MATERIALIZE_STAGE_BYTES (1024u * 1024u)

/* One staged WRITE action: which action, which slot of the tree's set. */
struct staged {
    const struct fsm_action *a;
    int slot; /* < 0: staging failed, fall back to fsm_tree_put() */
};

struct fsm_materialize_batch {
    struct fsm_tree *t;
    const struct fsm_disk *disk;
    struct fsm_tree_stage *stage;
    struct staged st[FSM_TREE_STAGE_MAX];
    size_t n;
};

/* What fill_chunks() writes: the chunk list, bytes from the op when it
 * carries them (op may be NULL), else from the store. */
struct content {
    const struct fsm_chunk_ref *refs;
    uint32_t n_refs;
    const struct fsm_op *op;
    const struct fsm_disk *disk;
};

static const struct fsm_chunk_data *carried(const struct fsm_op *op, const uint8_t *id)
{
    if (op == NULL)
        return NULL;
    for (uint32_t i = 0; i < op->u.put.n_data; i++)
        if (memcmp(op->u.put.data[i].id, id, FSM_CHUNK_ID_LEN) == 0)
            return &op->u.put.data[i];
    return NULL;
}

/* fsm_tree_fill_fn: the file's chunks in order. Stored chunks are copied
 * from the store into fd (disk->copy_chunk: no user-space copy), or read into
 * one FSM_CHUNK_MAX_LEN buffer, so memory stays bounded. */
static int fill_chunks(void *arg, int fd)
{
    const struct content *c = arg;
    uint8_t *buf = NULL;
    int rc = 0;
    for (uint32_t i = 0; i < c->n_refs && rc == 0; i++) {
        const struct fsm_chunk_ref *r = &c->refs[i];
        const struct fsm_chunk_data *d = carried(c->op, r->id);
        if (d != NULL) {
            rc = pb_write_all(fd, d->data, d->len);
            continue;
        }
        if (c->disk->copy_chunk != NULL) {
            rc = c->disk->copy_chunk(c->disk->arg, r->id, r->len, fd);
        } else {
            if (buf == NULL)
                buf = pb_xmalloc(FSM_CHUNK_MAX_LEN);
            rc = c->disk->read_chunk(c->disk->arg, r->id, buf, r->len);
            if (rc == 0)
                rc = pb_write_all(fd, buf, r->len);
        }
        if (rc == -ENOENT) /* not "a parent is missing": a store that lost data */
            rc = -ENODATA;
    }
    free(buf);
    return rc;
}

/* Tree errors that mean "the tree differs from the record here": the target
 * itself (EPENDING), or a parent that is missing, not a directory, or a
 * symlink (ENOENT, ENOTDIR, ELOOP) because of a local edit or an earlier
 * skipped action. */
static bool is_pending(int rc)
{
    return rc == -FSM_TREE_EPENDING || rc == -ENOENT || rc == -ENOTDIR || rc == -ELOOP;
}

/* The slot staged for action a, or -1. */
static int staged_slot(const struct fsm_materialize_batch *b, const struct fsm_action *a)
{
    for (size_t i = 0; b != NULL && i < b->n; i++)
        if (b->st[i].a == a)
            return b->st[i].slot;
    return -1;
}

/* The tree already holds what action a of op would write (in_tree): the
 * node's own edit, unchanged since it was proposed. *held gets its stat. */
static bool already_there(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_action *a,
                          const struct fsm_disk *disk, struct fsm_tree_stat *held)
{
    struct fsm_tree_stat now;
    return a->type == FSM_ACT_WRITE && op->type == FSM_OP_PUT && op->path != NULL &&
           disk->in_tree != NULL && strcmp(a->path, op->path) == 0 &&
           disk->in_tree(disk->arg, a->path, held) == 1 && fsm_tree_lstat(t, a->path, &now) == 0 &&
           fsm_tree_stat_matches(held, &now);
}

/* A PUT whose WRITE goes to the background writer. */
static bool deferred(const struct fsm_op *op, const struct fsm_disk *disk)
{
    return op->type == FSM_OP_PUT && disk->big != NULL &&
           op->u.put.size >= fsm_bigwrite_min_bytes(disk->big);
}

static bool stageable(const struct fsm_materialize_batch *b, const struct fsm_op *op,
                      const struct fsm_action *a)
{
    struct fsm_tree_stat held;
    return a->type == FSM_ACT_WRITE && op->type == FSM_OP_PUT &&
           op->u.put.size <= MATERIALIZE_STAGE_BYTES && !deferred(op, b->disk) &&
           !already_there(b->t, op, a, b->disk, &held);
}

/* A big file's WRITE becomes a background job (bigwrite.h); what can be
 * told now is told now: a pending local edit, a missing parent. */
static int defer_write(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_action *a,
                       const struct fsm_disk *disk, const struct fsm_tree_stat *exp)
{
    struct fsm_tree_stat now;
    uint8_t content[FSM_CHUNK_ID_LEN];
    if (exp->kind == FSM_KIND_DIR)
        return -EISDIR;
    int rc = fsm_tree_lstat(t, a->path, &now);
    if (rc < 0)
        return rc;
    if (!fsm_tree_stat_matches(exp, &now))
        return -FSM_TREE_EPENDING;
    if ((rc = fsm_content_hash(op->u.put.refs, op->u.put.n_refs, content)) < 0)
        return rc;
    fsm_bigwrite_submit(disk->big, a->path, op->u.put.refs, op->u.put.n_refs, op->u.put.mode,
                        op->u.put.mtime_ns, op->u.put.size, content);
    return 0;
}

/* Before action a: the background jobs on its paths are dropped (a new
 * write of the path, a delete at or above it) or finished first. */
static int settle_jobs(const struct fsm_action *a, const struct fsm_disk *disk)
{
    if (disk->big == NULL || fsm_bigwrite_count(disk->big) == 0)
        return 0;
    bool drop = a->type == FSM_ACT_WRITE || a->type == FSM_ACT_DELETE;
    int rc = fsm_bigwrite_settle(disk->big, a->path, drop, disk);
    if (rc == 0 && a->path2 != NULL)
        rc = fsm_bigwrite_settle(disk->big, a->path2, false, disk);
    return rc;
}

static int do_write(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_action *a,
                    const struct fsm_disk *disk, struct fsm_materialize_batch *b)
{
    struct fsm_tree_stat exp, out, held;
    int rc = disk->expected(disk->arg, a->path, &exp);
    if (rc < 0)
        return rc;
    if (already_there(t, op, a, disk, &held) && fsm_tree_stat_matches(&exp, &held))
        return disk->record(disk->arg, a->path, &held);
    int slot = staged_slot(b, a);
    if (slot >= 0) {
        rc = fsm_tree_stage_commit(b->stage, slot, a->path, &exp, &out);
        if (rc == 0)
            return disk->record(disk->arg, a->path, &out);
        if (rc != -EAGAIN)
            return rc;
        /* not durable, or its directory moved since: written anew */
    }
    if (deferred(op, disk))
        return defer_write(t, op, a, disk, &exp);
    if (op->type == FSM_OP_PUT) {
        struct content c = {op->u.put.refs, op->u.put.n_refs, op, disk};
        uint64_t t0 = pb_now_ms();
        rc = fsm_tree_put(t, a->path, &exp, op->u.put.mode, op->u.put.mtime_ns, fill_chunks, &c,
                          &out);
        if (rc == 0 && op->u.put.size >= MATERIALIZE_LOG_BYTES)
            log_info("materialized %s: %" PRIu64 " bytes in %" PRIu64 " ms", a->path,
                     op->u.put.size, pb_now_ms() - t0);
    } else {
        rc = fsm_tree_symlink(t, a->path, &exp, op->u.symlink.target, op->u.symlink.mtime_ns, &out);
    }
    if (rc < 0)
        return rc;
    return disk->record(disk->arg, a->path, &out);
}

static int do_action(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_action *a,
                     const struct fsm_disk *disk, struct fsm_materialize_batch *b)
{
    static const struct fsm_tree_stat none = {.kind = FSM_KIND_NONE};
    struct fsm_tree_stat exp, exp2, out;
    int rc;
    switch (a->type) {
    case FSM_ACT_WRITE:
        return do_write(t, op, a, disk, b);
    case FSM_ACT_MKDIR:
        if ((rc = fsm_tree_mkdir(t, a->path, &none, a->mode, a->mtime_ns, &out)) < 0)
            return rc;
        return disk->record(disk->arg, a->path, &out);
    case FSM_ACT_SETATTR:
        if ((rc = disk->expected(disk->arg, a->path, &exp)) < 0)
            return rc;
        if (exp.kind == FSM_KIND_NONE) /* never materialized here */
            return -FSM_TREE_EPENDING;
        rc = fsm_tree_setattr(t, a->path, &exp, a->fields, a->mode, a->mtime_ns, &out);
        if (rc < 0)
            return rc;
        return disk->record(disk->arg, a->path, &out);
    case FSM_ACT_DELETE:
        if ((rc = disk->expected(disk->arg, a->path, &exp)) < 0)
            return rc;
        if (exp.kind != FSM_KIND_NONE) {
            rc = b != NULL ? fsm_tree_stage_delete(b->stage, a->path, &exp)
                           : fsm_tree_delete(t, a->path, &exp);
            if (rc < 0)
                return rc;
        }
        return disk->record(disk->arg, a->path, &none);
    case FSM_ACT_MOVE:
        if ((rc = disk->expected(disk->arg, a->path, &exp)) < 0 ||
            (rc = disk->expected(disk->arg, a->path2, &exp2)) < 0)
            return rc;
        if (exp.kind == FSM_KIND_NONE)
            return -FSM_TREE_EPENDING;
        if (!a->replace)
            exp2 = none;
        if ((rc = fsm_tree_rename(t, a->path, &exp, a->path2, &exp2, &out)) < 0)
            return rc;
        return disk->record_move(disk->arg, a->path, a->path2);
    }
    return -EINVAL;
}

static int materialize(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_decision *d,
                       const struct fsm_disk *disk, struct fsm_materialize_batch *b,
                       unsigned *pending)
{
    unsigned skipped = 0;
    int rc = fsm_tree_check_marker(t);
    if (pending != NULL)
        *pending = 0;
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < d->n_acts; i++) {
        if ((rc = settle_jobs(&d->acts[i], disk)) < 0)
            break;
        rc = do_action(t, op, &d->acts[i], disk, b);
        /* A directory to remove or replace may only look non-empty because
         * it holds a temp staged for a later file: without the staged
         * temps (those files are then written at their turn), again. */
        if (b != NULL && is_pending(rc) &&
            (d->acts[i].type == FSM_ACT_DELETE || d->acts[i].type == FSM_ACT_MOVE) &&
            fsm_tree_stage_drop(b->stage) > 0)
            rc = do_action(t, op, &d->acts[i], disk, b);
        if (rc < 0 && is_pending(rc)) {
            skipped++;
            continue;
        }
        if (rc < 0)
            break;
    }
    if (pending != NULL)
        *pending = skipped;
    return rc < 0 && !is_pending(rc) ? rc : 0;
}

int fsm_materialize(struct fsm_tree *t, const struct fsm_op *op, const struct fsm_decision *d,
                    const struct fsm_disk *disk, unsigned *pending)
{
    return materialize(t, op, d, disk, NULL, pending);
}

struct fsm_materialize_batch *fsm_materialize_batch_new(struct fsm_tree *t,
                                                        const struct fsm_disk *disk)
{
    struct fsm_materialize_batch *b = pb_xcalloc(1, sizeof(*b));
    b->t = t;
    b->disk = disk;
    b->stage = fsm_tree_stage_new(t);
    return b;
}

void fsm_materialize_batch_free(struct fsm_materialize_batch *b)
{
    if (b == NULL)
        return;
    fsm_tree_stage_free(b->stage);
    free(b);
}

int fsm_materialize_stage(struct fsm_materialize_batch *b, const struct fsm_op *op,
                          const struct fsm_decision *d)
{
    size_t want = 0;
    for (size_t i = 0; i < d->n_acts; i++)
        want += stageable(b, op, &d->acts[i]);
    if (want == 0)
        return 0;
    if (b->n > 0 && b->n + want > FSM_TREE_STAGE_MAX)
        return -ENOSPC;
    for (size_t i = 0; i < d->n_acts && b->n < FSM_TREE_STAGE_MAX; i++) {
        const struct fsm_action *a = &d->acts[i];
        if (!stageable(b, op, a))
            continue;
        struct content c = {op->u.put.refs, op->u.put.n_refs, op, b->disk};
        struct staged *st = &b->st[b->n++];
        st->a = a;
        st->slot = fsm_tree_stage_add(b->stage, a->path, op->u.put.mode, op->u.put.mtime_ns,
                                      fill_chunks, &c);
        /* a parent made earlier in the batch, a chunk not here: written at
         * its turn by fsm_tree_put(), which reports what is wrong */
    }
    return 0;
}

int fsm_materialize_sync(struct fsm_materialize_batch *b)
{
    return fsm_tree_stage_sync(b->stage);
}

int fsm_materialize_staged(struct fsm_materialize_batch *b, const struct fsm_op *op,
                           const struct fsm_decision *d, unsigned *pending)
{
    return materialize(b->t, op, d, b->disk, b, pending);
}

int fsm_materialize_finish(struct fsm_materialize_batch *b)
{
    b->n = 0;
    return fsm_tree_stage_finish(b->stage);
}

int fsm_materialize_entry(struct fsm_tree *t, const char *path, const struct fsm_index_entry *e,
                          const struct fsm_chunk_ref *refs, uint32_t n_refs, const char *target,
                          const struct fsm_disk *disk)
{
    static const struct fsm_tree_stat none = {.kind = FSM_KIND_NONE};
    struct fsm_tree_stat exp, out;
    int rc = fsm_tree_check_marker(t);
    if (rc == 0 && disk->big != NULL)
        rc = fsm_bigwrite_settle(disk->big, path, false, disk);
    if (rc < 0 || (rc = disk->expected(disk->arg, path, &exp)) < 0)
        return rc;
    bool want_none = e == NULL || e->deleted;
    /* Anything of another kind than wanted goes first (a directory only if
     * empty: a directory with unknown entries is a pending edit). */
    if (exp.kind != FSM_KIND_NONE && (want_none || exp.kind != e->kind ||
                                      (e->kind != FSM_KIND_DIR && exp.kind == FSM_KIND_DIR))) {
        if ((rc = fsm_tree_delete(t, path, &exp)) < 0)
            return rc;
        if ((rc = disk->record(disk->arg, path, &none)) < 0)
            return rc;
        exp = none;
    }
    if (want_none)
        return 0;
    switch (e->kind) {
    case FSM_KIND_FILE: {
        struct content c = {refs, n_refs, NULL, disk};
        rc = fsm_tree_put(t, path, &exp, e->mode, e->mtime_ns, fill_chunks, &c, &out);
        break;
    }
    case FSM_KIND_SYMLINK:
        if (target == NULL)
            return -EINVAL;
        rc = fsm_tree_symlink(t, path, &exp, target, e->mtime_ns, &out);
        break;
    case FSM_KIND_DIR:
        if (exp.kind == FSM_KIND_DIR)
            rc = fsm_tree_setattr(t, path, &exp, FSM_ATTR_MODE | FSM_ATTR_MTIME, e->mode,
                                  e->mtime_ns, &out);
        else
            rc = fsm_tree_mkdir(t, path, &none, e->mode, e->mtime_ns, &out);
        break;
    default:
        return -EINVAL;
    }
    if (rc < 0)
        return rc;
    return disk->record(disk->arg, path, &out);
}
