/*
 * memindex.c: the in-memory reference index (see memindex.h).
 */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsm/memindex.h"
#include "lib/util.h"

struct row {
    char *path;
    struct fsm_index_entry e;
};

struct fsm_memindex {
    struct row *rows;
    size_t n, cap;
    uint8_t (*chunks)[FSM_CHUNK_ID_LEN];
    size_t n_chunks, cap_chunks;
};

struct fsm_memindex *fsm_memindex_new(void)
{
    return pb_xcalloc(1, sizeof(struct fsm_memindex));
}

void fsm_memindex_free(struct fsm_memindex *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->n; i++)
        free(m->rows[i].path);
    free(m->rows);
    free(m->chunks);
    free(m);
}

static struct row *find(const struct fsm_memindex *m, const char *path)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->rows[i].path, path) == 0)
            return &m->rows[i];
    return NULL;
}

/* The row for path, created (zeroed) if missing. */
static struct row *upsert(struct fsm_memindex *m, const char *path)
{
    struct row *r = find(m, path);
    if (r != NULL)
        return r;
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 16;
        m->rows = pb_xreallocarray(m->rows, m->cap, sizeof(*m->rows));
    }
    r = &m->rows[m->n++];
    memset(r, 0, sizeof(*r));
    r->path = pb_xstrdup(path);
    return r;
}

static bool has_chunk(const struct fsm_memindex *m, const uint8_t *id)
{
    for (size_t i = 0; i < m->n_chunks; i++)
        if (memcmp(m->chunks[i], id, FSM_CHUNK_ID_LEN) == 0)
            return true;
    return false;
}

static void add_chunk_id(struct fsm_memindex *m, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    if (has_chunk(m, id))
        return;
    if (m->n_chunks == m->cap_chunks) {
        m->cap_chunks = m->cap_chunks ? 2 * m->cap_chunks : 16;
        m->chunks = pb_xreallocarray(m->chunks, m->cap_chunks, FSM_CHUNK_ID_LEN);
    }
    memcpy(m->chunks[m->n_chunks++], id, FSM_CHUNK_ID_LEN);
}

static void add_chunks(struct fsm_memindex *m, const struct fsm_chunk_data *d, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        add_chunk_id(m, d[i].id);
}

/* ---- struct fsm_index callbacks ------------------------------------------ */

static int cb_get(void *arg, const char *path, struct fsm_index_entry *e)
{
    const struct row *r = find(arg, path);
    if (r == NULL)
        return -ENOENT;
    *e = r->e;
    return 0;
}

static bool parent_is(const char *path, const char *dir)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        return false;
    size_t n = (size_t)(slash - path);
    return strlen(dir) == n && memcmp(path, dir, n) == 0;
}

static int cb_list_children(void *arg, const char *dir, int (*fn)(void *, const char *),
                            void *fnarg)
{
    const struct fsm_memindex *m = arg;
    for (size_t i = 0; i < m->n; i++) {
        const struct row *r = &m->rows[i];
        if (r->e.deleted || !parent_is(r->path, dir))
            continue;
        int rc = fn(fnarg, strrchr(r->path, '/') + 1);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int cb_has_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    return has_chunk(arg, id) ? 1 : 0;
}

void fsm_memindex_bind(struct fsm_memindex *m, struct fsm_index *ix)
{
    ix->arg = m;
    ix->get = cb_get;
    ix->list_children = cb_list_children;
    ix->has_chunk = cb_has_chunk;
}

/* ---- applying a decision ------------------------------------------------- */

static void set_origin(struct fsm_index_entry *e, const char *origin)
{
    snprintf(e->origin, sizeof(e->origin), "%s", origin);
}

static void apply_write(struct fsm_memindex *m, const struct fsm_op *op, uint64_t index,
                        const char *path)
{
    struct row *r = upsert(m, path);
    memset(&r->e, 0, sizeof(r->e));
    r->e.version = r->e.content_version = index;
    set_origin(&r->e, op->origin);
    if (op->type == FSM_OP_PUT) {
        r->e.kind = FSM_KIND_FILE;
        r->e.mode = op->u.put.mode;
        r->e.mtime_ns = op->u.put.mtime_ns;
        r->e.size = op->u.put.size;
        (void)fsm_content_hash(op->u.put.refs, op->u.put.n_refs, r->e.content);
        add_chunks(m, op->u.put.data, op->u.put.n_data);
    } else {
        r->e.kind = FSM_KIND_SYMLINK;
        r->e.mode = 0777;
        r->e.mtime_ns = op->u.symlink.mtime_ns;
        r->e.size = strlen(op->u.symlink.target);
        (void)fsm_sha256(op->u.symlink.target, r->e.size, r->e.content);
    }
}

static void apply_move(struct fsm_memindex *m, uint64_t index, const char *from, const char *to)
{
    size_t flen = strlen(from);
    const struct row *src = find(m, from);
    assert(src != NULL && !src->e.deleted); /* fsm_decide() moves only live entries */
    struct fsm_index_entry top = src->e;
    /* Collect first: renaming rows while scanning would revisit them. */
    size_t *idx = pb_xreallocarray(NULL, m->n ? m->n : 1, sizeof(*idx));
    size_t k = 0;
    for (size_t i = 0; i < m->n; i++) {
        const char *p = m->rows[i].path;
        if (m->rows[i].e.deleted)
            continue;
        if (strcmp(p, from) == 0 || (strncmp(p, from, flen) == 0 && p[flen] == '/'))
            idx[k++] = i;
    }
    /* New paths: to + the part below from. Rows already at those paths
     * (tombstones, or the replaced target) give way. */
    char **newp = pb_xreallocarray(NULL, k ? k : 1, sizeof(*newp));
    for (size_t j = 0; j < k; j++)
        newp[j] = pb_xasprintf("%s%s", to, m->rows[idx[j]].path + flen);
    for (size_t j = 0; j < k; j++) {
        struct row *old = find(m, newp[j]);
        if (old != NULL) {
            free(old->path);
            old->path = pb_xstrdup(""); /* unreachable; keeps indexes stable */
            old->e.deleted = true;
        }
    }
    for (size_t j = 0; j < k; j++) {
        struct row *r = &m->rows[idx[j]];
        free(r->path);
        r->path = newp[j];
        r->e.version = r->e.content_version = index;
    }
    free(newp);
    free(idx);
    /* drop the placeholders */
    size_t w = 0;
    for (size_t i = 0; i < m->n; i++) {
        if (m->rows[i].path[0] == '\0') {
            free(m->rows[i].path);
            continue;
        }
        m->rows[w++] = m->rows[i];
    }
    m->n = w;
    struct row *tomb = upsert(m, from);
    tomb->e = top;
    tomb->e.deleted = true;
    tomb->e.version = index;
}

void fsm_memindex_apply(struct fsm_memindex *m, const struct fsm_op *op, uint64_t index,
                        const struct fsm_decision *d)
{
    for (size_t i = 0; i < d->n_acts; i++) {
        const struct fsm_action *a = &d->acts[i];
        struct row *r;
        switch (a->type) {
        case FSM_ACT_WRITE:
            apply_write(m, op, index, a->path);
            break;
        case FSM_ACT_MKDIR:
            r = upsert(m, a->path);
            memset(&r->e, 0, sizeof(r->e));
            r->e.kind = FSM_KIND_DIR;
            r->e.version = r->e.content_version = index;
            r->e.mode = a->mode;
            r->e.mtime_ns = a->mtime_ns;
            set_origin(&r->e, op->origin);
            break;
        case FSM_ACT_SETATTR:
            r = find(m, a->path);
            if (a->fields & FSM_ATTR_MODE)
                r->e.mode = a->mode;
            if (a->fields & FSM_ATTR_MTIME)
                r->e.mtime_ns = a->mtime_ns;
            r->e.version = index;
            break;
        case FSM_ACT_DELETE:
            r = find(m, a->path);
            r->e.deleted = true;
            r->e.version = index;
            break;
        case FSM_ACT_MOVE:
            apply_move(m, index, a->path, a->path2);
            break;
        }
    }
}

int fsm_memindex_step(struct fsm_memindex *m, const struct fsm_op *op, uint64_t index,
                      struct fsm_decision *last)
{
    struct fsm_index ix;
    fsm_memindex_bind(m, &ix);
    if (last != NULL)
        fsm_decision_init(last);
    if (op->type == FSM_OP_CHUNKS) {
        add_chunks(m, op->u.chunks.data, op->u.chunks.n_data);
        return 0;
    }
    if (op->type == FSM_OP_REFS) { /* the rows, as CHUNKS adds them */
        for (uint32_t i = 0; i < op->u.refs.n_refs; i++)
            add_chunk_id(m, op->u.refs.refs[i].id);
        return 0;
    }
    const struct fsm_op *ops = op;
    uint32_t n = 1;
    if (op->type == FSM_OP_BATCH) {
        ops = op->u.batch.ops;
        n = op->u.batch.n_ops;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct fsm_decision d;
        fsm_decision_init(&d);
        int rc = fsm_decide(&ops[i], index, &ix, &d);
        if (rc < 0)
            return rc;
        fsm_memindex_apply(m, &ops[i], index, &d);
        if (last != NULL && i + 1 == n)
            *last = d;
        else
            fsm_decision_free(&d);
    }
    return 0;
}

static int cmp_row(const void *a, const void *b)
{
    const struct row *const *x = a, *const *y = b;
    return strcmp((*x)->path, (*y)->path);
}

void fsm_memindex_dump(const struct fsm_memindex *m, struct buf *out)
{
    const struct row **v = pb_xreallocarray(NULL, m->n ? m->n : 1, sizeof(*v));
    for (size_t i = 0; i < m->n; i++)
        v[i] = &m->rows[i];
    qsort(v, m->n, sizeof(*v), cmp_row);
    for (size_t i = 0; i < m->n; i++) {
        const struct fsm_index_entry *e = &v[i]->e;
        char *line = pb_xasprintf("%s %d %" PRIu64 " %" PRIu64 " %d %o %s ", v[i]->path,
                                  (int)e->kind, e->version, e->content_version, e->deleted ? 1 : 0,
                                  e->mode, e->origin);
        buf_put(out, line, strlen(line));
        free(line);
        for (int k = 0; k < 4; k++) {
            char hx[3];
            snprintf(hx, sizeof(hx), "%02x", e->content[k]);
            buf_put(out, hx, 2);
        }
        buf_put_u8(out, '\n');
    }
    free(v);
}
