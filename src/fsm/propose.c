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
    uint64_t carry_max;
    struct fsm_chunk_ref *refs;
    uint32_t n_refs, cap_refs;
    struct fsm_chunk_data *data;
    uint32_t n_data, cap_data;
    uint64_t carried, size, emitted;
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
    b->emitted += b->carried;
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
    if (b->carried >= b->carry_max)
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

/* Read size per read(2): one maximal chunk. */
#define READ_BLOCK FSM_CHUNK_MAX

struct fsm_propose {
    struct fsm_tree *t;
    char *path;
    char *origin;
    uint64_t base;
    int fd;
    struct fsm_tree_stat before;
    struct fsm_chunker chunker;
    uint8_t *rbuf;
    uint64_t offset; /* bytes read so far */
    bool done;
    struct build b;
};

int fsm_propose_begin(struct fsm_tree *t, const char *path, const char *origin, uint64_t base,
                      uint64_t carry_max, fsm_lacks_fn lacks, fsm_emit_fn emit, void *arg,
                      struct fsm_propose **out)
{
    struct fsm_tree_stat before, now;
    int fd = -1, rc;

    *out = NULL;
    if ((rc = fsm_tree_lstat(t, path, &before)) < 0)
        return rc;
    if (before.kind != FSM_KIND_FILE)
        return -EINVAL;
    if ((rc = fsm_tree_open_file(t, path, &fd)) < 0)
        return rc == -ELOOP ? -EAGAIN : rc; /* replaced by a symlink meanwhile */
    if ((rc = fstat_tree(fd, &now)) < 0 || !same_file(&before, &now)) {
        close(fd);
        return rc < 0 ? rc : -EAGAIN;
    }
    struct fsm_propose *p = pb_xcalloc(1, sizeof(*p));
    p->t = t;
    p->path = pb_xstrdup(path);
    p->origin = pb_xstrdup(origin);
    p->base = base;
    p->fd = fd;
    p->before = before;
    p->rbuf = pb_xmalloc(READ_BLOCK);
    p->b.origin = p->origin;
    p->b.lacks = lacks;
    p->b.emit = emit;
    p->b.arg = arg;
    p->b.carry_max = carry_max > 0 ? carry_max : FSM_PROPOSE_CARRY_MAX;
    fsm_chunker_init(&p->chunker, on_chunk, &p->b);
    *out = p;
    return 0;
}

/* The file is still the one begin saw: same inode, size and mtime through
 * the open fd and at its name. 0, -EAGAIN (rewritten, replaced or removed:
 * propose it again later) or -errno. */
static int propose_unchanged(const struct fsm_propose *p)
{
    struct fsm_tree_stat now;
    int rc = fstat_tree(p->fd, &now);
    if (rc < 0)
        return rc;
    if (!same_file(&p->before, &now))
        return -EAGAIN;
    if ((rc = fsm_tree_lstat(p->t, p->path, &now)) < 0)
        return rc == -ENOENT || rc == -ENOTDIR || rc == -ELOOP ? -EAGAIN : rc;
    return same_file(&p->before, &now) ? 0 : -EAGAIN;
}

/* Builds and emits the PUT once the whole file was read unchanged. */
static int propose_finish(struct fsm_propose *p, struct fsm_tree_stat *st)
{
    struct build *b = &p->b;
    int rc;
    /* Unchanged while we read it, and we read exactly its size. */
    if ((rc = propose_unchanged(p)) < 0)
        return rc;
    if (b->size != p->before.size)
        return -EAGAIN;
    uint64_t put_bytes = (uint64_t)b->n_refs * REF_WIRE + PUT_OVERHEAD;
    if (put_bytes > FSM_OP_MAX_BYTES)
        return -EFBIG;
    /* Carried bytes ride in the PUT only when they fit in it and under the
     * caller's per-entry bound. */
    if ((put_bytes + b->carried + (uint64_t)b->n_data * DATA_WIRE > FSM_OP_MAX_BYTES ||
         b->carried + put_bytes > b->carry_max) &&
        (rc = flush_chunks(b)) < 0)
        return rc;

    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_PUT;
    op.origin = pb_xstrdup(p->origin);
    op.path = pb_xstrdup(p->path);
    op.base = p->base;
    op.u.put.mode = p->before.mode;
    op.u.put.mtime_ns = p->before.mtime_ns;
    op.u.put.size = b->size;
    op.u.put.refs = b->refs;
    op.u.put.n_refs = b->n_refs;
    op.u.put.data = b->data;
    op.u.put.n_data = b->n_data;
    b->refs = NULL;
    b->n_refs = b->cap_refs = 0;
    b->data = NULL;
    b->n_data = b->cap_data = 0;
    b->emitted += b->carried;
    b->carried = 0;
    rc = fsm_op_validate(&op, NULL);
    if (rc == 0)
        rc = b->emit(b->arg, &op);
    fsm_op_free(&op);
    if (rc == 0 && st != NULL)
        *st = p->before;
    return rc;
}

int fsm_propose_step(struct fsm_propose *p, uint64_t max_bytes, struct fsm_tree_stat *st)
{
    if (p->done)
        return -EINVAL;
    uint64_t got = 0;
    int rc = 0;
    do {
        ssize_t n = read(p->fd, p->rbuf, READ_BLOCK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = -errno;
            break;
        }
        if (n == 0) {
            if ((rc = fsm_chunker_finish(&p->chunker)) == 0)
                rc = propose_finish(p, st);
            p->done = true;
            return rc;
        }
        if (p->offset + (uint64_t)n > p->before.size) {
            rc = -EAGAIN; /* grew while read: stop early */
            break;
        }
        p->offset += (uint64_t)n;
        got += (uint64_t)n;
        rc = fsm_chunker_feed(&p->chunker, p->rbuf, (size_t)n);
    } while (rc == 0 && got < max_bytes);
    /* A slice between two turns of the caller's loop: a file rewritten,
     * replaced or removed meanwhile is given up now rather than read to its
     * end. */
    if (rc == 0)
        rc = propose_unchanged(p);
    if (rc != 0) {
        p->done = true;
        return rc;
    }
    return 1;
}

uint64_t fsm_propose_offset(const struct fsm_propose *p)
{
    return p->offset;
}

uint64_t fsm_propose_carried(const struct fsm_propose *p)
{
    return p->b.emitted;
}

void fsm_propose_free(struct fsm_propose *p)
{
    if (p == NULL)
        return;
    close(p->fd);
    fsm_chunker_free(&p->chunker);
    free(p->rbuf);
    free(p->b.refs);
    for (uint32_t i = 0; i < p->b.n_data; i++)
        free(p->b.data[i].data);
    free(p->b.data);
    free(p->b.seen.v);
    free(p->b.seen.used);
    free(p->path);
    free(p->origin);
    free(p);
}
