/*
 * apply.c: committed entries -> state.db (one transaction) -> the tree; the
 * state.db-backed struct fsm_index and struct fsm_disk (see apply.h).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsm/apply.h"
#include "lib/log.h"
#include "lib/util.h"

/* fsm_apply_note_in_tree(): an own PUT whose content the tree holds. */
struct in_tree_note {
    uint64_t index;
    char *path;
    struct fsm_tree_stat st;
};

struct fsm_apply {
    struct statedb *db;
    struct fsm_tree *tree;
    struct fsm_index ix;
    struct fsm_disk disk;
    struct in_tree_note *notes; /* for the next fsm_apply_entries() */
    size_t n_notes;
    uint64_t cur_index; /* the entry being materialized, 0 outside */
};

/* ---- conversions --------------------------------------------------------- */

static void row_to_entry(const struct statedb_row *r, struct fsm_index_entry *e)
{
    memset(e, 0, sizeof(*e));
    e->kind = (enum fsm_kind)r->kind;
    e->deleted = r->deleted;
    e->version = r->version;
    e->content_version = r->content_version;
    memcpy(e->content, r->content, FSM_CHUNK_ID_LEN);
    e->mode = r->mode;
    e->mtime_ns = r->mtime_ns;
    e->size = r->size;
    snprintf(e->origin, sizeof(e->origin), "%s", r->origin);
}

static void entry_to_row(const struct fsm_index_entry *e, struct statedb_row *r)
{
    memset(r, 0, sizeof(*r));
    r->kind = (uint8_t)e->kind;
    r->deleted = e->deleted;
    r->version = e->version;
    r->content_version = e->content_version;
    memcpy(r->content, e->content, STATEDB_ID_LEN);
    r->mode = e->mode;
    r->mtime_ns = e->mtime_ns;
    r->size = e->size;
    snprintf(r->origin, sizeof(r->origin), "%s", e->origin);
}

/* ---- struct fsm_index over state.db -------------------------------------- */

static int ix_get(void *arg, const char *path, struct fsm_index_entry *e)
{
    struct fsm_apply *ap = arg;
    struct statedb_row r;
    int rc = statedb_row_get(ap->db, path, &r, NULL);
    if (rc == 0)
        row_to_entry(&r, e);
    return rc;
}

static int ix_list_children(void *arg, const char *dir, int (*fn)(void *, const char *),
                            void *fnarg)
{
    struct fsm_apply *ap = arg;
    return statedb_list_children(ap->db, dir, fn, fnarg);
}

static int ix_has_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    struct fsm_apply *ap = arg;
    return statedb_chunk_has(ap->db, id);
}

/* ---- struct fsm_disk over state.db --------------------------------------- */

static int dk_expected(void *arg, const char *path, struct fsm_tree_stat *st)
{
    struct fsm_apply *ap = arg;
    struct statedb_disk d;
    int rc = statedb_disk_get(ap->db, path, &d);
    memset(st, 0, sizeof(*st));
    if (rc < 0)
        return rc;
    st->kind = (enum fsm_kind)d.kind;
    st->mode = d.mode;
    st->size = d.size;
    st->mtime_ns = d.mtime_ns;
    st->ino = d.ino;
    return 0;
}

/* A disk record of st, naming no manifest row. */
static void disk_of(const struct fsm_tree_stat *st, struct statedb_disk *d)
{
    memset(d, 0, sizeof(*d));
    d->kind = (uint8_t)st->kind;
    d->mode = st->mode;
    d->size = st->size;
    d->mtime_ns = st->mtime_ns;
    d->ino = st->ino;
}

static int record(struct fsm_apply *ap, const char *path, const struct fsm_tree_stat *st,
                  bool from_manifest)
{
    struct statedb_disk d;
    disk_of(st, &d);
    if (from_manifest && st->kind != FSM_KIND_NONE) {
        /* Which manifest row this is: what the repair compares with. */
        struct statedb_row r;
        int rc = statedb_row_get(ap->db, path, &r, NULL);
        if (rc < 0 && rc != -ENOENT)
            return rc;
        if (rc == 0 && !r.deleted) {
            memcpy(d.row_content, r.content, STATEDB_ID_LEN);
            d.row_mode = r.mode;
            d.row_mtime_ns = r.mtime_ns;
        }
    }
    return statedb_disk_set(ap->db, path, &d);
}

static int dk_record(void *arg, const char *path, const struct fsm_tree_stat *st)
{
    return record(arg, path, st, true);
}

/* record() with the manifest row named by the caller (a file written in
 * the background, whose row may have moved on since: bigwrite.h). */
static int dk_record_as(void *arg, const char *path, const struct fsm_tree_stat *st,
                        const uint8_t content[FSM_CHUNK_ID_LEN], uint32_t mode, int64_t mtime_ns)
{
    struct fsm_apply *ap = arg;
    struct statedb_disk d;
    disk_of(st, &d);
    memcpy(d.row_content, content, STATEDB_ID_LEN);
    d.row_mode = mode;
    d.row_mtime_ns = mtime_ns;
    return statedb_disk_set(ap->db, path, &d);
}

static int dk_record_move(void *arg, const char *from, const char *to)
{
    struct fsm_apply *ap = arg;
    return statedb_disk_move(ap->db, from, to);
}

static int dk_in_tree(void *arg, const char *path, struct fsm_tree_stat *st)
{
    struct fsm_apply *ap = arg;
    for (size_t i = 0; ap->cur_index != 0 && i < ap->n_notes; i++) {
        if (ap->notes[i].index == ap->cur_index && strcmp(ap->notes[i].path, path) == 0) {
            *st = ap->notes[i].st;
            return 1;
        }
    }
    return 0;
}

static int dk_read_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN], uint8_t *buf, uint32_t len)
{
    struct fsm_apply *ap = arg;
    return statedb_chunk_get(ap->db, id, buf, len);
}

/* Fills a file from a stored chunk without a user-space copy (the packs). */
static int dk_copy_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN], uint32_t len, int fd)
{
    struct fsm_apply *ap = arg;
    return statedb_chunk_copy(ap->db, id, len, fd);
}

struct fsm_apply *fsm_apply_new(struct statedb *db, struct fsm_tree *tree)
{
    struct fsm_apply *ap = pb_xcalloc(1, sizeof(*ap));
    ap->db = db;
    ap->tree = tree;
    ap->ix.arg = ap;
    ap->ix.get = ix_get;
    ap->ix.list_children = ix_list_children;
    ap->ix.has_chunk = ix_has_chunk;
    ap->disk.arg = ap;
    ap->disk.expected = dk_expected;
    ap->disk.record = dk_record;
    ap->disk.record_move = dk_record_move;
    ap->disk.read_chunk = dk_read_chunk;
    ap->disk.copy_chunk = dk_copy_chunk;
    ap->disk.in_tree = dk_in_tree;
    ap->disk.record_as = dk_record_as;
    return ap;
}

void fsm_apply_set_bigwrite(struct fsm_apply *ap, struct fsm_bigwrite *w)
{
    ap->disk.big = w;
}

static void notes_clear(struct fsm_apply *ap)
{
    for (size_t i = 0; i < ap->n_notes; i++)
        free(ap->notes[i].path);
    free(ap->notes);
    ap->notes = NULL;
    ap->n_notes = 0;
}

void fsm_apply_free(struct fsm_apply *ap)
{
    if (ap == NULL)
        return;
    notes_clear(ap);
    free(ap);
}

int fsm_apply_note_in_tree(struct fsm_apply *ap, uint64_t index, const char *path,
                           const struct fsm_tree_stat *st)
{
    if (index == 0 || path == NULL || st->kind != FSM_KIND_FILE)
        return -EINVAL;
    ap->notes = pb_xreallocarray(ap->notes, ap->n_notes + 1, sizeof(*ap->notes));
    ap->notes[ap->n_notes++] = (struct in_tree_note){index, pb_xstrdup(path), *st};
    return 0;
}

void fsm_apply_bind_index(struct fsm_apply *ap, struct fsm_index *ix)
{
    *ix = ap->ix;
}

void fsm_apply_bind_disk(struct fsm_apply *ap, struct fsm_disk *disk)
{
    *disk = ap->disk;
}

int fsm_apply_record_local(struct fsm_apply *ap, const char *path, const struct fsm_tree_stat *st)
{
    return record(ap, path, st, false);
}

/* ---- applying a plan to state.db (memindex.c's rules) -------------------- */

static int store_carried(struct statedb *db, const struct fsm_chunk_data *d, uint32_t n,
                         uint64_t keep_until)
{
    for (uint32_t i = 0; i < n; i++) {
        int rc = statedb_chunk_put(db, d[i].id, d[i].data, d[i].len, keep_until);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int put_chunklist(struct statedb *db, const char *path, const struct fsm_chunk_ref *refs,
                         uint32_t n)
{
    struct statedb_ref *v = pb_xreallocarray(NULL, n ? n : 1, sizeof(*v));
    for (uint32_t i = 0; i < n; i++) {
        memcpy(v[i].id, refs[i].id, STATEDB_ID_LEN);
        v[i].len = refs[i].len;
    }
    int rc = statedb_chunklist_put(db, path, v, n);
    free(v);
    return rc;
}

static int apply_write(struct statedb *db, const struct fsm_op *op, uint64_t index,
                       const char *path)
{
    struct fsm_index_entry e;
    memset(&e, 0, sizeof(e));
    e.version = e.content_version = index;
    snprintf(e.origin, sizeof(e.origin), "%s", op->origin);
    const char *target = NULL;
    int rc;
    if (op->type == FSM_OP_PUT) {
        e.kind = FSM_KIND_FILE;
        e.mode = op->u.put.mode;
        e.mtime_ns = op->u.put.mtime_ns;
        e.size = op->u.put.size;
        if ((rc = fsm_content_hash(op->u.put.refs, op->u.put.n_refs, e.content)) < 0)
            return rc;
    } else {
        e.kind = FSM_KIND_SYMLINK;
        e.mode = 0777;
        e.mtime_ns = op->u.symlink.mtime_ns;
        e.size = strlen(op->u.symlink.target);
        target = op->u.symlink.target;
        if ((rc = fsm_sha256(target, e.size, e.content)) < 0)
            return rc;
    }
    struct statedb_row r;
    entry_to_row(&e, &r);
    if ((rc = statedb_row_put(db, path, &r, target)) < 0)
        return rc;
    if (op->type == FSM_OP_PUT)
        return put_chunklist(db, path, op->u.put.refs, op->u.put.n_refs);
    return statedb_chunklist_put(db, path, NULL, 0);
}

/* The row at path, which fsm_decide() guarantees exists. */
static int must_get(struct statedb *db, const char *path, struct statedb_row *r, char **target)
{
    int rc = statedb_row_get(db, path, r, target);
    if (rc == -ENOENT) {
        log_err("apply: plan names %s, which the manifest lacks", path);
        return -EBADMSG;
    }
    return rc;
}

static int apply_plan(struct statedb *db, const struct fsm_op *op, uint64_t index,
                      const struct fsm_decision *d)
{
    int rc = 0;
    for (size_t i = 0; i < d->n_acts && rc == 0; i++) {
        const struct fsm_action *a = &d->acts[i];
        struct statedb_row r;
        char *target = NULL;
        switch (a->type) {
        case FSM_ACT_WRITE:
            rc = apply_write(db, op, index, a->path);
            break;
        case FSM_ACT_MKDIR:
            memset(&r, 0, sizeof(r));
            r.kind = FSM_KIND_DIR;
            r.version = r.content_version = index;
            r.mode = a->mode;
            r.mtime_ns = a->mtime_ns;
            snprintf(r.origin, sizeof(r.origin), "%s", op->origin);
            if ((rc = statedb_row_put(db, a->path, &r, NULL)) == 0)
                rc = statedb_chunklist_put(db, a->path, NULL, 0);
            break;
        case FSM_ACT_SETATTR:
            if ((rc = must_get(db, a->path, &r, &target)) < 0)
                break;
            if (a->fields & FSM_ATTR_MODE)
                r.mode = a->mode;
            if (a->fields & FSM_ATTR_MTIME)
                r.mtime_ns = a->mtime_ns;
            r.version = index;
            rc = statedb_row_put(db, a->path, &r, target);
            break;
        case FSM_ACT_DELETE:
            if ((rc = must_get(db, a->path, &r, &target)) < 0)
                break;
            r.deleted = true;
            r.version = index;
            /* a tombstone keeps its row but no content: its chunks unref */
            if ((rc = statedb_row_put(db, a->path, &r, target)) == 0)
                rc = statedb_chunklist_put(db, a->path, NULL, 0);
            break;
        case FSM_ACT_MOVE:
            if ((rc = must_get(db, a->path, &r, &target)) < 0)
                break;
            if ((rc = statedb_row_move(db, a->path, a->path2, index)) < 0)
                break;
            r.deleted = true;
            r.version = index;
            rc = statedb_row_put(db, a->path, &r, target);
            break;
        }
        free(target);
    }
    return rc;
}

/* ---- one entry ----------------------------------------------------------- */

struct plan {
    const struct fsm_op *ops; /* borrowed from the decoded op */
    uint32_t n;
    struct fsm_decision *d; /* n decisions */
};

static void plan_free(struct plan *p)
{
    for (uint32_t i = 0; p->d != NULL && i < p->n; i++)
        fsm_decision_free(&p->d[i]);
    free(p->d);
    p->d = NULL;
}

/* Everything inside the transaction after dedup: chunks, decisions, plans. */
static int apply_op(struct fsm_apply *ap, const struct fsm_op *op, uint64_t index,
                    struct statedb_applied *a, struct plan *p, struct fsm_apply_result *out,
                    struct pb_error *err)
{
    uint64_t keep = index + FSM_APPLY_CHUNK_KEEP;
    int rc;
    if (op->type == FSM_OP_CHUNKS) {
        out->status = FSM_APPLY_CHUNKS;
        return store_carried(ap->db, op->u.chunks.data, op->u.chunks.n_data, keep);
    }
    if (op->type == FSM_OP_REFS) {
        /* The rows only, whatever bytes this node holds (pushed beside the
         * log, or fetched later): the same on every node. */
        out->status = FSM_APPLY_CHUNKS;
        for (uint32_t i = 0; i < op->u.refs.n_refs; i++) {
            const struct fsm_chunk_ref *c = &op->u.refs.refs[i];
            rc = statedb_chunk_row_put(ap->db, c->id, c->len, keep);
            if (rc == -EINVAL) /* a row of another length: the same on every node */
                log_warning("apply %" PRIu64 ": REFS chunk %u has another length here: skipped",
                            index, i);
            else if (rc < 0)
                return pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
        }
        return 0;
    }
    p->ops = op;
    p->n = 1;
    if (op->type == FSM_OP_BATCH) {
        p->ops = op->u.batch.ops;
        p->n = op->u.batch.n_ops;
    }
    p->d = pb_xcalloc(p->n ? p->n : 1, sizeof(*p->d));
    for (uint32_t i = 0; i < p->n; i++)
        fsm_decision_init(&p->d[i]);
    out->status = FSM_APPLY_DONE;
    for (uint32_t i = 0; i < p->n; i++) {
        const struct fsm_op *o = &p->ops[i];
        if (o->type == FSM_OP_PUT &&
            (rc = store_carried(ap->db, o->u.put.data, o->u.put.n_data, keep)) < 0)
            return pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
        rc = fsm_decide(o, index, &ap->ix, &p->d[i]);
        if (rc == -ENAMETOOLONG) {
            /* deterministic: no conflict-copy name fits; the op does nothing */
            log_warning("apply %" PRIu64 ": %s %s: no conflict-copy name fits", index,
                        fsm_op_type_name(o->type), o->path);
            fsm_decision_free(&p->d[i]);
            p->d[i].outcome = FSM_OUT_NOOP;
            p->d[i].rule = "-";
            p->d[i].reason = "conflict-copy name too long";
            continue;
        }
        if (rc < 0)
            return pb_error_set(err, rc, "decide: %s", statedb_errmsg(ap->db));
        if ((rc = apply_plan(ap->db, o, index, &p->d[i])) < 0)
            return pb_error_set(err, rc, "apply: %s", statedb_errmsg(ap->db));
        out->n_ops++;
        out->outcome = p->d[i].outcome;
        out->rule = p->d[i].rule;
        if (p->d[i].outcome == FSM_OUT_CONFLICT) {
            out->conflicts++;
            a->conflicts++;
        }
    }
    return 0;
}

/* One entry inside the open transaction: updates *a, fills *out, leaves the
 * decoded op and its plan in *op / *p for materializing after the commit. */
static int apply_in_txn(struct fsm_apply *ap, const struct fsm_apply_input *in,
                        struct statedb_applied *a, struct fsm_op *op, struct plan *p,
                        struct fsm_apply_result *out, struct pb_error *err)
{
    struct pb_error derr;
    int rc;
    if (in->index == 0)
        return pb_error_set(err, -EINVAL, "apply: index 0");
    if (in->index <= a->index) {
        out->status = FSM_APPLY_ALREADY;
        return 0;
    }
    if (in->data == NULL) {
        out->status = FSM_APPLY_INDEX_ONLY;
    } else {
        pb_error_clear(&derr);
        rc = fsm_op_decode(in->data, in->len, op, &derr);
        if (rc == -EPROTONOSUPPORT)
            return pb_error_set(err, rc, "apply %" PRIu64 ": %s", in->index, derr.msg);
        if (rc == 0 && (rc = fsm_op_verify_chunks(op, &derr)) == -EIO)
            return pb_error_set(err, rc, "apply %" PRIu64 ": %s", in->index, derr.msg);
        uint64_t last = 0;
        if (rc < 0) {
            log_warning("apply %" PRIu64 ": malformed entry ignored: %s", in->index, derr.msg);
            out->status = FSM_APPLY_MALFORMED;
            a->malformed++;
        } else if (in->client_id != 0 &&
                   (rc = statedb_session_get(ap->db, in->client_id, &last)) < 0) {
            return pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
        } else if (in->client_id != 0 && in->seq <= last) {
            out->status = FSM_APPLY_DUPLICATE;
            a->duplicates++;
        } else {
            if (in->client_id != 0 &&
                (rc = statedb_session_set(ap->db, in->client_id, in->seq)) < 0)
                return pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
            if ((rc = apply_op(ap, op, in->index, a, p, out, err)) < 0)
                return rc;
        }
    }
    /* collected after every entry, at its index: the same chunks exist
     * before each entry however entries are grouped into transactions */
    if ((rc = statedb_chunk_collect(ap->db, in->index, &out->collected)) < 0)
        return pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
    a->index = in->index;
    a->term = in->term;
    return 0;
}

/* One action group of materialize_all(): plan k, decision i. */
struct step {
    size_t k;
    uint32_t i;
};

/*
 * The tree after the commit, in groups with one durability barrier each
 * (fsm_materialize_batch: temps of the group's small files, one sync, the
 * renames in log order with their expected-stat checks, one fsync per
 * directory). The disk records of the whole run go into one transaction
 * committed after the last directory fsync, so a record is never durable
 * before the rename it describes (an autocommitted record could be, through
 * a WAL checkpoint); it costs one WAL sync per batch and saves one commit
 * per record. The first tree error stops the run; it is reported for its
 * entry and every later one.
 */
static void materialize_all(struct fsm_apply *ap, const struct fsm_apply_input *in,
                            const struct plan *plans, size_t n, struct fsm_apply_result *out)
{
    size_t total = 0;
    for (size_t k = 0; k < n; k++)
        total += plans[k].n;
    if (total == 0)
        return;
    struct step *steps = pb_xreallocarray(NULL, total, sizeof(*steps));
    size_t m = 0;
    for (size_t k = 0; k < n; k++)
        for (uint32_t i = 0; i < plans[k].n; i++)
            steps[m++] = (struct step){k, i};
    bool txn = statedb_begin(ap->db) == 0;
    struct fsm_materialize_batch *b = fsm_materialize_batch_new(ap->tree, &ap->disk);
    int tree_rc = 0;
    size_t err_k = n;
    for (size_t start = 0; start < total && tree_rc == 0;) {
        size_t end = start;
        while (end < total) {
            const struct plan *p = &plans[steps[end].k];
            ap->cur_index = in[steps[end].k].index;
            int src = fsm_materialize_stage(b, &p->ops[steps[end].i], &p->d[steps[end].i]);
            ap->cur_index = 0;
            if (src < 0)
                break;
            end++;
        }
        if (end == start) /* cannot happen: an empty group takes any step */
            end++;
        fsm_materialize_sync(b);
        for (size_t x = start; x < end && tree_rc == 0; x++) {
            const struct plan *p = &plans[steps[x].k];
            unsigned pending = 0;
            ap->cur_index = in[steps[x].k].index;
            tree_rc = fsm_materialize_staged(b, &p->ops[steps[x].i], &p->d[steps[x].i], &pending);
            ap->cur_index = 0;
            out[steps[x].k].pending += pending;
            if (tree_rc < 0)
                err_k = steps[x].k;
        }
        int frc = fsm_materialize_finish(b);
        if (tree_rc == 0 && frc < 0) {
            tree_rc = frc;
            err_k = steps[end - 1].k;
        }
        start = end;
    }
    fsm_materialize_batch_free(b);
    free(steps);
    if (txn && statedb_commit(ap->db) < 0)
        log_warning("state.db: disk records: %s", statedb_errmsg(ap->db));
    if (err_k < n) {
        for (size_t k = err_k; k < n; k++)
            out[k].tree_rc = tree_rc;
        log_err("apply %" PRIu64 ": the tree could not be updated (%s); it will be "
                "repaired from state.db",
                in[err_k].index, strerror(-tree_rc));
    }
}

int fsm_apply_entries(struct fsm_apply *ap, const struct fsm_apply_input *in, size_t n,
                      struct fsm_apply_result *out, struct pb_error *err)
{
    struct statedb_applied a;
    struct fsm_op *ops = pb_xcalloc(n ? n : 1, sizeof(*ops));
    struct plan *plans = pb_xcalloc(n ? n : 1, sizeof(*plans));
    for (size_t i = 0; i < n; i++) {
        fsm_op_init(&ops[i]);
        memset(&out[i], 0, sizeof(out[i]));
    }
    int rc = statedb_begin(ap->db);
    if (rc < 0) {
        pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
        goto done;
    }
    if ((rc = statedb_applied_get(ap->db, &a)) < 0) {
        pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
        goto done;
    }
    uint64_t before = a.index;
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = apply_in_txn(ap, &in[i], &a, &ops[i], &plans[i], &out[i], err);
    if (rc == 0 && a.index == before) { /* nothing new: leave the file alone */
        statedb_rollback(ap->db);
        goto done;
    }
    if (rc == 0 &&
        ((rc = statedb_applied_set(ap->db, &a)) < 0 || (rc = statedb_commit(ap->db)) < 0))
        pb_error_set(err, rc, "%s", statedb_errmsg(ap->db));
    if (rc < 0)
        goto done;
    /* Committed. Now the tree, in log order; its errors do not undo the
     * entries: the repair catches the tree up later. */
    materialize_all(ap, in, plans, n, out);
done:
    if (rc < 0) {
        statedb_rollback(ap->db);
        for (size_t i = 0; i < n; i++)
            memset(&out[i], 0, sizeof(out[i]));
    }
    for (size_t i = 0; i < n; i++) {
        plan_free(&plans[i]);
        fsm_op_free(&ops[i]);
    }
    free(plans);
    free(ops);
    if (rc == 0) /* kept for a batch that is applied again after an error */
        notes_clear(ap);
    return rc;
}

int fsm_apply_entry(struct fsm_apply *ap, uint64_t index, uint64_t term, uint64_t client_id,
                    uint64_t seq, const uint8_t *data, size_t len, struct fsm_apply_result *out,
                    struct pb_error *err)
{
    struct fsm_apply_input in = {index, term, client_id, seq, data, len};
    if (data == NULL) /* a payload, even empty, is an op; NULL is for index-only */
        in.data = (const uint8_t *)"";
    return fsm_apply_entries(ap, &in, 1, out, err);
}

int fsm_apply_skip(struct fsm_apply *ap, uint64_t index, uint64_t term, struct pb_error *err)
{
    struct fsm_apply_input in = {index, term, 0, 0, NULL, 0};
    struct fsm_apply_result out;
    return fsm_apply_entries(ap, &in, 1, &out, err);
}

/* ---- repair -------------------------------------------------------------- */

struct repair {
    struct fsm_apply *ap;
    unsigned repaired, pending;
    unsigned waiting; /* files whose chunk bytes are not on this node yet */
};

static bool pending_rc(int rc)
{
    return rc == -FSM_TREE_EPENDING || rc == -ENOENT || rc == -ENOTDIR || rc == -ELOOP;
}

static int repair_one(void *arg, const char *path, bool remove)
{
    struct repair *r = arg;
    struct fsm_apply *ap = r->ap;
    struct statedb_row row;
    struct fsm_index_entry e;
    char *target = NULL;
    struct statedb_ref *sref = NULL;
    struct fsm_chunk_ref *refs = NULL;
    uint32_t n = 0;
    int rc = 0;
    if (!remove) {
        if ((rc = statedb_row_get(ap->db, path, &row, &target)) < 0)
            return rc;
        row_to_entry(&row, &e);
        if ((rc = statedb_chunklist_get(ap->db, path, &sref, &n)) < 0) {
            free(target);
            return rc;
        }
        refs = pb_xreallocarray(NULL, n ? n : 1, sizeof(*refs));
        for (uint32_t i = 0; i < n; i++) {
            memcpy(refs[i].id, sref[i].id, FSM_CHUNK_ID_LEN);
            refs[i].len = sref[i].len;
        }
    }
    rc = fsm_materialize_entry(ap->tree, path, remove ? NULL : &e, refs, n, target, &ap->disk);
    free(target);
    free(sref);
    free(refs);
    if (rc == 0) {
        r->repaired++;
        return 0;
    }
    if (pending_rc(rc)) {
        r->pending++;
        return 0;
    }
    if (rc == -ENODATA) {
        /* bytes still to be fetched from a peer: skipped, not a failure;
         * the repair after the fetch materializes it */
        log_debug("repair %s: waiting for chunk bytes", path);
        r->waiting++;
        return 0;
    }
    log_err("repair %s: %s", path, strerror(-rc));
    return rc;
}

int fsm_apply_repair(struct fsm_apply *ap, unsigned *repaired, unsigned *pending)
{
    struct repair r = {ap, 0, 0, 0};
    int rc = fsm_tree_check_marker(ap->tree);
    if (rc == 0)
        rc = statedb_disk_mismatches(ap->db, repair_one, &r);
    if (repaired != NULL)
        *repaired = r.repaired;
    if (pending != NULL)
        *pending = r.pending;
    if (r.repaired > 0 || r.pending > 0)
        log_notice("tree repair: %u paths repaired, %u left for pending local edits", r.repaired,
                   r.pending);
    if (r.waiting > 0)
        log_notice("tree repair: %u file(s) wait for chunk bytes from peers", r.waiting);
    return rc;
}

/* ---- dump ---------------------------------------------------------------- */

static int dump_row(void *arg, const char *path, const struct statedb_row *r)
{
    struct buf *out = arg;
    char *line =
            pb_xasprintf("%s %d %" PRIu64 " %" PRIu64 " %d %o %s ", path, (int)r->kind, r->version,
                         r->content_version, r->deleted ? 1 : 0, r->mode, r->origin);
    buf_put(out, line, strlen(line));
    free(line);
    for (int k = 0; k < 4; k++) {
        char hx[3];
        snprintf(hx, sizeof(hx), "%02x", r->content[k]);
        buf_put(out, hx, 2);
    }
    buf_put_u8(out, '\n');
    return 0;
}

int fsm_apply_dump(struct fsm_apply *ap, struct buf *out)
{
    return statedb_row_foreach(ap->db, dump_row, out);
}
