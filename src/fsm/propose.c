/*
 * propose.c: build CHUNKS + PUT ops from a file of the tree (see propose.h).
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsm/chunker.h"
#include "fsm/propose.h"
#include "lib/util.h"

/* Room kept in a PUT for everything but its chunk list and carried bytes. */
#define PUT_OVERHEAD (FSM_PATH_MAX + FSM_NODE_MAX + 1024)
#define REF_WIRE     (FSM_CHUNK_ID_LEN + 4)
#define DATA_WIRE    (FSM_CHUNK_ID_LEN + 4)

/* A set of chunk ids (open addressing), so a chunk repeated inside one file
 * travels once. */
struct idset {
    uint8_t (*v)[FSM_CHUNK_ID_LEN];
    uint8_t *used;
    size_t cap, n;
};

static uint64_t id_key(const uint8_t *id)
{
    uint64_t k;
    memcpy(&k, id, sizeof(k)); /* SHA-256 bytes are uniform already */
    return k;
}

static void idset_grow(struct idset *s);

/* True if id was not in the set (and is now). */
static bool idset_add(struct idset *s, const uint8_t *id)
{
    if (2 * (s->n + 1) > s->cap)
        idset_grow(s);
    size_t i = (size_t)(id_key(id) & (s->cap - 1));
    while (s->used[i]) {
        if (memcmp(s->v[i], id, FSM_CHUNK_ID_LEN) == 0)
            return false;
        i = (i + 1) & (s->cap - 1);
    }
    s->used[i] = 1;
    memcpy(s->v[i], id, FSM_CHUNK_ID_LEN);
    s->n++;
    return true;
}

static void idset_grow(struct idset *s)
{
    struct idset old = *s;
    s->cap = old.cap ? 2 * old.cap : 64;
    s->v = pb_xreallocarray(NULL, s->cap, FSM_CHUNK_ID_LEN);
    s->used = pb_xcalloc(s->cap, 1);
    s->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.used[i])
            idset_add(s, old.v[i]);
    free(old.v);
    free(old.used);
}

struct build {
    const char *origin;
    fsm_lacks_fn lacks;
    fsm_emit_fn emit;
    void *arg;
    struct fsm_chunk_ref *refs;
    uint32_t n_refs, cap_refs;
    struct fsm_chunk_data *data;
    uint32_t n_data, cap_data;
    uint64_t carried, size;
    struct idset seen;
};

/* Sends the carried chunks as one CHUNKS op. */
static int flush_chunks(struct build *b)
{
    if (b->n_data == 0)
        return 0;
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_CHUNKS;
    op.origin = pb_xstrdup(b->origin);
    op.u.chunks.data = b->data;
    op.u.chunks.n_data = b->n_data;
    b->data = NULL;
    b->n_data = b->cap_data = 0;
    b->carried = 0;
    int rc = fsm_op_validate(&op, NULL);
    if (rc == 0)
        rc = b->emit(b->arg, &op);
    fsm_op_free(&op);
    return rc;
}

static int on_chunk(void *arg, const struct fsm_chunk *c)
{
    struct build *b = arg;
    if (b->n_refs == FSM_OP_MAX_CHUNKS)
        return -EFBIG;
    if (b->n_refs == b->cap_refs) {
        b->cap_refs = b->cap_refs ? 2 * b->cap_refs : 64;
        b->refs = pb_xreallocarray(b->refs, b->cap_refs, sizeof(*b->refs));
    }
    memcpy(b->refs[b->n_refs].id, c->id, FSM_CHUNK_ID_LEN);
    b->refs[b->n_refs].len = c->len;
    b->n_refs++;
    b->size += c->len;

    int rc = b->lacks(b->arg, c->id);
    if (rc < 0)
        return rc;
    if (rc == 0 || !idset_add(&b->seen, c->id))
        return 0;
    if (b->n_data == b->cap_data) {
        b->cap_data = b->cap_data ? 2 * b->cap_data : 16;
        b->data = pb_xreallocarray(b->data, b->cap_data, sizeof(*b->data));
    }
    struct fsm_chunk_data *d = &b->data[b->n_data++];
    memcpy(d->id, c->id, FSM_CHUNK_ID_LEN);
    d->len = c->len;
    d->data = pb_xmalloc(c->len);
    memcpy(d->data, c->data, c->len);
    b->carried += c->len;
    if (b->carried >= FSM_PROPOSE_CARRY_MAX)
        return flush_chunks(b);
    return 0;
}

static bool same_file(const struct fsm_tree_stat *a, const struct fsm_tree_stat *b)
{
    return a->kind == b->kind && a->ino == b->ino && a->size == b->size &&
           a->mtime_ns == b->mtime_ns;
}

static int fstat_tree(int fd, struct fsm_tree_stat *st)
{
    struct stat s;
    if (fstat(fd, &s) < 0)
        return -errno;
    memset(st, 0, sizeof(*st));
    st->kind = S_ISREG(s.st_mode) ? FSM_KIND_FILE : FSM_KIND_OTHER;
    st->mode = (uint32_t)s.st_mode & 07777u;
    st->size = (uint64_t)s.st_size;
    st->mtime_ns = (int64_t)s.st_mtim.tv_sec * 1000000000LL + s.st_mtim.tv_nsec;
    st->ino = (uint64_t)s.st_ino;
    return 0;
}

int fsm_propose_put(struct fsm_tree *t, const char *path, const char *origin, uint64_t base,
                    fsm_lacks_fn lacks, fsm_emit_fn emit, void *arg, struct fsm_tree_stat *st)
{
    struct fsm_tree_stat before, now;
    struct build b;
    int fd = -1, rc;

    memset(&b, 0, sizeof(b));
    b.origin = origin;
    b.lacks = lacks;
    b.emit = emit;
    b.arg = arg;
    if ((rc = fsm_tree_lstat(t, path, &before)) < 0)
        return rc;
    if (before.kind != FSM_KIND_FILE)
        return -EINVAL;
    if ((rc = fsm_tree_open_file(t, path, &fd)) < 0)
        return rc == -ELOOP ? -EAGAIN : rc; /* replaced by a symlink meanwhile */
    if ((rc = fstat_tree(fd, &now)) < 0)
        goto out;
    if (!same_file(&before, &now)) {
        rc = -EAGAIN;
        goto out;
    }
    if ((rc = fsm_chunk_fd(fd, on_chunk, &b)) != 0)
        goto out;
    /* Unchanged while we read it: same inode at the name, same size and
     * mtime, and we read exactly that many bytes. */
    if ((rc = fstat_tree(fd, &now)) < 0)
        goto out;
    if (!same_file(&before, &now) || b.size != before.size) {
        rc = -EAGAIN;
        goto out;
    }
    if ((rc = fsm_tree_lstat(t, path, &now)) < 0)
        goto out;
    if (!same_file(&before, &now)) {
        rc = -EAGAIN;
        goto out;
    }
    uint64_t put_bytes = (uint64_t)b.n_refs * REF_WIRE + PUT_OVERHEAD;
    if (put_bytes > FSM_OP_MAX_BYTES) {
        rc = -EFBIG;
        goto out;
    }
    if (put_bytes + b.carried + (uint64_t)b.n_data * DATA_WIRE > FSM_OP_MAX_BYTES &&
        (rc = flush_chunks(&b)) < 0)
        goto out;

    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    op.origin = pb_xstrdup(origin);
    op.path = pb_xstrdup(path);
    op.base = base;
    op.u.put.mode = before.mode;
    op.u.put.mtime_ns = before.mtime_ns;
    op.u.put.size = b.size;
    op.u.put.refs = b.refs;
    op.u.put.n_refs = b.n_refs;
    op.u.put.data = b.data;
    op.u.put.n_data = b.n_data;
    b.refs = NULL;
    b.data = NULL;
    b.n_data = 0;
    rc = fsm_op_validate(&op, NULL);
    if (rc == 0)
        rc = emit(arg, &op);
    fsm_op_free(&op);
    if (rc == 0 && st != NULL)
        *st = before;
out:
    if (fd >= 0)
        close(fd);
    free(b.refs);
    for (uint32_t i = 0; i < b.n_data; i++)
        free(b.data[i].data);
    free(b.data);
    free(b.seen.v);
    free(b.seen.used);
    return rc;
}
