/*
 * check_fsm_conflict.c: the apply decision (src/fsm/fsm) against the
 * in-memory reference index (src/fsm/memindex). The table below has one case
 * per row of doc/conflicts.md (same ids): a log of ops applied at indexes
 * 1, 2, 3, ..., the expected outcome and rule of each op, and the complete
 * set of live paths afterwards with their kind and content. Every plan is
 * also carried out in a real tree (src/fsm/materialize), which must then
 * hold exactly the index's live entries with their contents.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsm/chunker.h"
#include "fsm/fsm.h"
#include "fsm/materialize.h"
#include "fsm/memindex.h"
#include "fsm/propose.h"
#include "propose_file.h"
#include "lib/util.h"

/* ---- a node's disk records and chunk store, in memory -------------------- */

struct rec {
    char *path;
    struct fsm_tree_stat st;
};

struct memdisk {
    struct rec r[64];
    size_t n;
    struct {
        uint8_t id[FSM_CHUNK_ID_LEN];
        uint8_t *data;
        uint32_t len;
    } chunks[1024];
    size_t n_chunks;
};

static struct rec *rec_find(struct memdisk *m, const char *path)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->r[i].path, path) == 0)
            return &m->r[i];
    return NULL;
}

static void rec_drop(struct memdisk *m, struct rec *r)
{
    free(r->path);
    *r = m->r[--m->n];
}

static int md_expected(void *arg, const char *path, struct fsm_tree_stat *st)
{
    struct rec *r = rec_find(arg, path);
    if (r != NULL)
        *st = r->st;
    else
        memset(st, 0, sizeof(*st));
    return 0;
}

static int md_record(void *arg, const char *path, const struct fsm_tree_stat *st)
{
    struct memdisk *m = arg;
    struct rec *r = rec_find(m, path);
    if (st->kind == FSM_KIND_NONE) {
        if (r != NULL)
            rec_drop(m, r);
        return 0;
    }
    if (r == NULL) {
        ck_assert_uint_lt(m->n, PB_ARRAY_SIZE(m->r));
        r = &m->r[m->n++];
        r->path = pb_xstrdup(path);
    }
    r->st = *st;
    return 0;
}

static int md_record_move(void *arg, const char *from, const char *to)
{
    struct memdisk *m = arg;
    size_t fl = strlen(from);
    for (size_t i = 0; i < m->n; i++) {
        char *p = m->r[i].path;
        if (strcmp(p, from) != 0 && !(strncmp(p, from, fl) == 0 && p[fl] == '/'))
            continue;
        char *np = pb_xasprintf("%s%s", to, p + fl);
        struct rec *old = rec_find(m, np);
        if (old != NULL && old != &m->r[i]) {
            size_t oi = (size_t)(old - m->r);
            rec_drop(m, old);
            if (m->n == i) /* the moved record itself was swapped into old's slot */
                i = oi;
        }
        free(m->r[i].path);
        m->r[i].path = np;
    }
    return 0;
}

static int md_read_chunk(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN], uint8_t *buf, uint32_t len)
{
    struct memdisk *m = arg;
    for (size_t i = 0; i < m->n_chunks; i++) {
        if (memcmp(m->chunks[i].id, id, FSM_CHUNK_ID_LEN) == 0 && m->chunks[i].len == len) {
            memcpy(buf, m->chunks[i].data, len);
            return 0;
        }
    }
    return -ENOENT;
}

static void md_store(struct memdisk *m, const struct fsm_op *op)
{
    const struct fsm_chunk_data *d;
    uint32_t n;
    if (op->type == FSM_OP_PUT) {
        d = op->u.put.data;
        n = op->u.put.n_data;
    } else if (op->type == FSM_OP_CHUNKS) {
        d = op->u.chunks.data;
        n = op->u.chunks.n_data;
    } else {
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        ck_assert_uint_lt(m->n_chunks, PB_ARRAY_SIZE(m->chunks));
        memcpy(m->chunks[m->n_chunks].id, d[i].id, FSM_CHUNK_ID_LEN);
        m->chunks[m->n_chunks].len = d[i].len;
        m->chunks[m->n_chunks].data = pb_xmalloc(d[i].len);
        memcpy(m->chunks[m->n_chunks].data, d[i].data, d[i].len);
        m->n_chunks++;
    }
}

static void md_free(struct memdisk *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->r[i].path);
    for (size_t i = 0; i < m->n_chunks; i++)
        free(m->chunks[i].data);
}

static void md_bind(struct memdisk *m, struct fsm_disk *d)
{
    memset(d, 0, sizeof(*d)); /* the optional callbacks: none */
    d->arg = m;
    d->expected = md_expected;
    d->record = md_record;
    d->record_move = md_record_move;
    d->read_chunk = md_read_chunk;
}

/* ---- a real tree in a temp dir ------------------------------------------- */

static int rm_one(const char *p, const struct stat *s, int flag, struct FTW *f)
{
    (void)s;
    (void)flag;
    (void)f;
    return remove(p);
}

static int tree_entries;
static const char *tree_root_path;

static int count_one(const char *p, const struct stat *s, int flag, struct FTW *f)
{
    (void)s;
    (void)flag;
    (void)f;
    const char *rel = p + strlen(tree_root_path);
    if (*rel == '\0')
        return 0;
    if (strncmp(rel, "/.pickbox", 9) == 0 && (rel[9] == '\0' || rel[9] == '/'))
        return 0;
    tree_entries++;
    return 0;
}

/* A file's content hash, read through the proposing path: the PUT it
 * would propose (carrying nothing) names the chunks. */
static int lacks_none(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    (void)arg;
    (void)id;
    return 0;
}

static int content_of_put(void *arg, const struct fsm_op *op)
{
    ck_assert_int_eq(op->type, FSM_OP_PUT);
    return fsm_content_hash(op->u.put.refs, op->u.put.n_refs, arg);
}

/* The tree holds exactly the index's live entries, with their contents. */
static void assert_tree_matches(const char *id, struct fsm_tree *t, const char *root,
                                struct fsm_index *ix, const char *const *paths, size_t n_live)
{
    for (size_t i = 0; i < n_live; i++) {
        struct fsm_index_entry e;
        struct fsm_tree_stat st;
        ck_assert_int_eq(ix->get(ix->arg, paths[i], &e), 0);
        ck_assert_int_eq(fsm_tree_lstat(t, paths[i], &st), 0);
        ck_assert_msg(st.kind == e.kind, "%s: tree %s kind %d, index %d", id, paths[i], st.kind,
                      e.kind);
        uint8_t h[FSM_CHUNK_ID_LEN];
        if (e.kind == FSM_KIND_FILE) {
            ck_assert_int_eq(
                    propose_file(t, paths[i], "check", 0, lacks_none, content_of_put, h, NULL), 0);
            ck_assert_msg(memcmp(h, e.content, FSM_CHUNK_ID_LEN) == 0, "%s: tree %s content", id,
                          paths[i]);
            ck_assert_msg((st.mode & 0777) == (e.mode & 0777), "%s: tree %s mode %o index %o", id,
                          paths[i], st.mode, e.mode);
        } else if (e.kind == FSM_KIND_SYMLINK) {
            char *p = pb_xasprintf("%s/%s", root, paths[i]);
            char target[FSM_PATH_MAX + 1];
            ssize_t n = readlink(p, target, sizeof(target) - 1);
            free(p);
            ck_assert_int_gt(n, 0);
            ck_assert_int_eq(fsm_sha256(target, (size_t)n, h), 0);
            ck_assert_msg(memcmp(h, e.content, FSM_CHUNK_ID_LEN) == 0, "%s: link %s", id, paths[i]);
        }
    }
    tree_entries = 0;
    tree_root_path = root;
    ck_assert_int_eq(nftw(root, count_one, 16, FTW_PHYS), 0);
    ck_assert_msg((size_t)tree_entries == n_live, "%s: tree has %d entries, index %zu live", id,
                  tree_entries, n_live);
}

/* ---- building ops -------------------------------------------------------- */

struct step {
    enum fsm_op_type type;
    const char *origin;
    const char *path;
    uint64_t base;
    const char *arg; /* PUT: content; SYMLINK: target; RENAME: destination */
    uint64_t base_to;
    bool is_dir;   /* DELETE */
    bool no_data;  /* PUT: reference the chunk without carrying it */
    uint32_t mode; /* SETATTR (and PUT if nonzero) */
    enum fsm_outcome want;
    const char *rule;
};

struct expect {
    const char *path;
    enum fsm_kind kind;
    const char *content; /* files: the PUT content that must be there */
    uint32_t mode;       /* checked if nonzero */
};

struct ctable {
    const char *id;
    struct step steps[6];
    struct expect live[7]; /* every live path, nothing else */
};

static void build_op(const struct step *s, struct fsm_op *op)
{
    fsm_op_init(op);
    op->type = s->type;
    op->origin = pb_xstrdup(s->origin ? s->origin : "n1");
    op->path = pb_xstrdup(s->path);
    op->base = s->base;
    switch (s->type) {
    case FSM_OP_PUT: {
        size_t n = strlen(s->arg);
        op->u.put.mode = s->mode ? s->mode : 0644;
        op->u.put.mtime_ns = 1000;
        op->u.put.size = n;
        if (n == 0)
            break;
        op->u.put.n_refs = 1;
        op->u.put.refs = pb_xcalloc(1, sizeof(struct fsm_chunk_ref));
        op->u.put.refs[0].len = (uint32_t)n;
        ck_assert_int_eq(fsm_sha256(s->arg, n, op->u.put.refs[0].id), 0);
        if (s->no_data)
            break;
        op->u.put.n_data = 1;
        op->u.put.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
        memcpy(op->u.put.data[0].id, op->u.put.refs[0].id, FSM_CHUNK_ID_LEN);
        op->u.put.data[0].len = (uint32_t)n;
        op->u.put.data[0].data = pb_xmalloc(n);
        memcpy(op->u.put.data[0].data, s->arg, n);
        break;
    }
    case FSM_OP_SYMLINK:
        op->u.symlink.target = pb_xstrdup(s->arg);
        break;
    case FSM_OP_RENAME:
        op->u.rename.to = pb_xstrdup(s->arg);
        op->u.rename.base_to = s->base_to;
        break;
    case FSM_OP_DELETE:
        op->u.del.is_dir = s->is_dir;
        break;
    case FSM_OP_MKDIR:
        op->u.mkdir.mode = 0755;
        op->u.mkdir.mtime_ns = 2000;
        break;
    case FSM_OP_SETATTR:
        op->u.setattr.fields = FSM_ATTR_MODE;
        op->u.setattr.mode = s->mode;
        break;
    default:
        ck_abort_msg("unsupported step");
    }
    ck_assert_int_eq(fsm_op_validate(op, NULL), 0);
}

/* Content hash of a file holding text, as the index records it. */
static void text_hash(const char *text, uint8_t out[FSM_CHUNK_ID_LEN])
{
    struct fsm_chunk_ref r;
    size_t n = strlen(text);
    r.len = (uint32_t)n;
    ck_assert_int_eq(fsm_sha256(text, n, r.id), 0);
    ck_assert_int_eq(fsm_content_hash(&r, n ? 1 : 0, out), 0);
}

/* ---- the table (ids match doc/conflicts.md) ------------------------------ */

#define PUT(o, p, b, c, w, r)                                                                      \
    {                                                                                              \
        FSM_OP_PUT, o, p, b, c, 0, false, false, 0, w, r                                           \
    }
#define DEL(o, p, b, d, w, r)                                                                      \
    {                                                                                              \
        FSM_OP_DELETE, o, p, b, NULL, 0, d, false, 0, w, r                                         \
    }
#define MKDIR(o, p, b, w, r)                                                                       \
    {                                                                                              \
        FSM_OP_MKDIR, o, p, b, NULL, 0, false, false, 0, w, r                                      \
    }
#define RENAME(o, p, b, t, bt, w, r)                                                               \
    {                                                                                              \
        FSM_OP_RENAME, o, p, b, t, bt, false, false, 0, w, r                                       \
    }
#define CHMOD(o, p, b, m, w, r)                                                                    \
    {                                                                                              \
        FSM_OP_SETATTR, o, p, b, NULL, 0, false, false, m, w, r                                    \
    }
#define LINK(o, p, b, t, w, r)                                                                     \
    {                                                                                              \
        FSM_OP_SYMLINK, o, p, b, t, 0, false, false, 0, w, r                                       \
    }
#define A FSM_OUT_APPLIED
#define C FSM_OUT_CONFLICT
#define N FSM_OUT_NOOP
#define F FSM_KIND_FILE
#define D FSM_KIND_DIR
#define L FSM_KIND_SYMLINK

static const struct ctable table[] = {
        {"R0 missing chunk",
         {{FSM_OP_PUT, "n1", "a", 0, "bytes nobody has", 0, false, true, 0, FSM_OUT_MISSING_CHUNKS,
           "R0"}},
         {{NULL}}},
        {"R1 create", {PUT("n1", "a.txt", 0, "hello", A, "R1")}, {{"a.txt", F, "hello", 0644}}},
        {"R1 create symlink",
         {LINK("n1", "l", 0, "../../etc/passwd", A, "R1")},
         {{"l", L, NULL, 0}}},
        {"R2 sequential edits on three nodes",
         {PUT("n1", "a", 0, "v1", A, "R1"), PUT("n2", "a", 1, "v2", A, "R2"),
          PUT("n3", "a", 2, "v3", A, "R2")},
         {{"a", F, "v3", 0}}},
        {"R2 symlink replaces a file the proposer saw",
         {PUT("n1", "a", 0, "v1", A, "R1"), LINK("n2", "a", 1, "t", A, "R2")},
         {{"a", L, NULL, 0}}},
        {"R3 edit after a concurrent delete recreates",
         {PUT("n1", "a", 0, "v1", A, "R1"), DEL("n2", "a", 1, false, A, "R13"),
          PUT("n3", "a", 1, "v2", A, "R3")},
         {{"a", F, "v2", 0}}},
        {"R4 concurrent edits: first committed stays, later is a copy",
         {PUT("n1", "r.txt", 0, "v1", A, "R1"), PUT("n2", "r.txt", 1, "n2 edit", A, "R2"),
          PUT("n3", "r.txt", 1, "n3 edit", C, "R4")},
         {{"r.txt", F, "n2 edit", 0}, {"r.pickbox-conflict-n3-3.txt", F, "n3 edit", 0}}},
        {"R4 two nodes create the same new path",
         {PUT("n1", "new.md", 0, "A", A, "R1"), PUT("n2", "new.md", 0, "B", C, "R4")},
         {{"new.md", F, "A", 0}, {"new.pickbox-conflict-n2-2.md", F, "B", 0}}},
        {"R4 conflict name already taken: next sequence number",
         {PUT("n1", "a.txt", 0, "v1", A, "R1"),
          PUT("n2", "a.pickbox-conflict-n3-3.txt", 0, "squatter", A, "R1"),
          PUT("n3", "a.txt", 0, "v3", C, "R4")},
         {{"a.txt", F, "v1", 0},
          {"a.pickbox-conflict-n3-3.txt", F, "squatter", 0},
          {"a.pickbox-conflict-n3-3-1.txt", F, "v3", 0}}},
        {"R5 concurrent edits with identical content",
         {PUT("n1", "a", 0, "x", A, "R1"), PUT("n2", "a", 1, "same", A, "R2"),
          PUT("n3", "a", 1, "same", N, "R5")},
         {{"a", F, "same", 0}}},
        {"R5 the same PUT committed twice (a re-proposal) is harmless",
         {PUT("n1", "a", 0, "v1", A, "R1"), PUT("n2", "a", 1, "v2", A, "R2"),
          PUT("n2", "a", 1, "v2", N, "R5")},
         {{"a", F, "v2", 0}}},
        {"R6 empty directory replaced by a file (sequential)",
         {MKDIR("n1", "p", 0, A, "R8"), PUT("n1", "p", 1, "file", A, "R6")},
         {{"p", F, "file", 0}}},
        {"R7 file onto a directory with children",
         {MKDIR("n1", "p", 0, A, "R8"), PUT("n1", "p/c", 0, "c", A, "R1"),
          PUT("n2", "p", 1, "file", C, "R7")},
         {{"p", D, NULL, 0}, {"p/c", F, "c", 0}, {"p.pickbox-conflict-n2-3", F, "file", 0}}},
        {"R7 mkdir and file created concurrently, mkdir first",
         {MKDIR("n1", "p", 0, A, "R8"), PUT("n2", "p", 0, "f", C, "R7")},
         {{"p", D, NULL, 0}, {"p.pickbox-conflict-n2-2", F, "f", 0}}},
        {"R8 mkdir", {MKDIR("n1", "d", 0, A, "R8")}, {{"d", D, NULL, 0755}}},
        {"R9 directories merge",
         {MKDIR("n1", "d", 0, A, "R8"), MKDIR("n2", "d", 0, N, "R9"),
          PUT("n2", "d/x", 0, "x", A, "R1")},
         {{"d", D, NULL, 0}, {"d/x", F, "x", 0}}},
        {"R10 file replaced by a directory (sequential)",
         {PUT("n1", "p", 0, "f", A, "R1"), MKDIR("n1", "p", 1, A, "R10")},
         {{"p", D, NULL, 0}}},
        {"R11 file and mkdir created concurrently, file first",
         {PUT("n1", "p.txt", 0, "f", A, "R1"), MKDIR("n2", "p.txt", 0, C, "R11")},
         {{"p.txt", D, NULL, 0}, {"p.pickbox-conflict-n1-1.txt", F, "f", 0}}},
        {"R12 delete of an absent path", {DEL("n1", "nothing", 0, false, N, "R12")}, {{NULL}}},
        {"R13 sequential delete",
         {PUT("n1", "a", 0, "v1", A, "R1"), DEL("n2", "a", 1, false, A, "R13")},
         {{NULL}}},
        {"R14 edit beats a concurrent delete (edit first)",
         {PUT("n1", "a", 0, "v1", A, "R1"), PUT("n2", "a", 1, "v2", A, "R2"),
          DEL("n3", "a", 1, false, N, "R14")},
         {{"a", F, "v2", 0}}},
        {"R14 chmod beats a concurrent delete",
         {PUT("n1", "a", 0, "v1", A, "R1"), CHMOD("n2", "a", 1, 0600, A, "R17"),
          DEL("n3", "a", 1, false, N, "R14")},
         {{"a", F, "v1", 0600}}},
        {"R14 delete of a file where a directory now is",
         {MKDIR("n1", "a", 0, A, "R8"), DEL("n2", "a", 1, false, N, "R14")},
         {{"a", D, NULL, 0}}},
        {"R15 directory delete with a concurrently added child",
         {MKDIR("n1", "d", 0, A, "R8"), PUT("n2", "d/new", 0, "c", A, "R1"),
          DEL("n1", "d", 1, true, N, "R15")},
         {{"d", D, NULL, 0}, {"d/new", F, "c", 0}}},
        {"R15 rm -rf then the same directory delete: empty, deleted",
         {MKDIR("n1", "d", 0, A, "R8"), PUT("n1", "d/x", 0, "x", A, "R1"),
          DEL("n1", "d/x", 2, false, A, "R13"), DEL("n1", "d", 1, true, A, "R13")},
         {{NULL}}},
        {"R16 child added after its directory was deleted recreates it",
         {MKDIR("n1", "d", 0, A, "R8"), DEL("n1", "d", 1, true, A, "R13"),
          PUT("n2", "d/new", 0, "c", A, "R1")},
         {{"d", D, NULL, 0755}, {"d/new", F, "c", 0}}},
        {"R16 implicit parents",
         {PUT("n1", "a/b/c", 0, "c", A, "R1")},
         {{"a", D, NULL, 0755}, {"a/b", D, NULL, 0755}, {"a/b/c", F, "c", 0}}},
        {"R16 a file in the way of a new directory's child moves to a copy",
         {PUT("n1", "x", 0, "file", A, "R1"), PUT("n2", "x/y", 0, "c", C, "R1")},
         {{"x", D, NULL, 0}, {"x/y", F, "c", 0}, {"x.pickbox-conflict-n1-1", F, "file", 0}}},
        {"R17 chmod",
         {PUT("n1", "a", 0, "v1", A, "R1"), CHMOD("n2", "a", 1, 0600, A, "R17")},
         {{"a", F, "v1", 0600}}},
        {"R17 chmod concurrent with an edit is no conflict",
         {PUT("n1", "a", 0, "v1", A, "R1"), CHMOD("n2", "a", 1, 0600, A, "R17"),
          PUT("n3", "a", 1, "v2", A, "R2")},
         {{"a", F, "v2", 0}}},
        {"R17 chmod of a symlink sets nothing",
         {LINK("n1", "l", 0, "t", A, "R1"), CHMOD("n2", "l", 1, 0600, N, "R17")},
         {{"l", L, NULL, 0}}},
        {"R18 chmod of a deleted file",
         {PUT("n1", "a", 0, "v1", A, "R1"), DEL("n2", "a", 1, false, A, "R13"),
          CHMOD("n3", "a", 1, 0600, N, "R18")},
         {{NULL}}},
        {"R19 rename after a concurrent delete",
         {PUT("n1", "a", 0, "v1", A, "R1"), DEL("n2", "a", 1, false, A, "R13"),
          RENAME("n3", "a", 1, "b", 0, N, "R19")},
         {{NULL}}},
        {"R12 delete after a concurrent rename",
         {PUT("n1", "a", 0, "v1", A, "R1"), RENAME("n3", "a", 1, "b", 0, A, "R21"),
          DEL("n2", "a", 1, false, N, "R12")},
         {{"b", F, "v1", 0}}},
        {"R19 the same RENAME committed twice is harmless",
         {PUT("n1", "a", 0, "v1", A, "R1"), RENAME("n2", "a", 1, "b", 0, A, "R21"),
          RENAME("n2", "a", 1, "b", 0, N, "R19")},
         {{"b", F, "v1", 0}}},
        {"R20 rename a directory into itself",
         {MKDIR("n1", "d", 0, A, "R8"), RENAME("n1", "d", 1, "d/e", 0, N, "R20")},
         {{"d", D, NULL, 0}}},
        {"R21 rename",
         {PUT("n1", "a", 0, "v1", A, "R1"), RENAME("n2", "a", 1, "b", 0, A, "R21")},
         {{"b", F, "v1", 0}}},
        {"R21 directory rename carries its children, creates parents",
         {MKDIR("n1", "d", 0, A, "R8"), PUT("n1", "d/x", 0, "x", A, "R1"),
          RENAME("n2", "d", 1, "e/f", 0, A, "R21")},
         {{"e", D, NULL, 0}, {"e/f", D, NULL, 0}, {"e/f/x", F, "x", 0}}},
        {"R21 edit then concurrent rename: the edit moves",
         {PUT("n1", "a", 0, "v1", A, "R1"), PUT("n2", "a", 1, "v2", A, "R2"),
          RENAME("n3", "a", 1, "b", 0, A, "R21")},
         {{"b", F, "v2", 0}}},
        {"R21 rename then concurrent edit: the edit recreates the old name",
         {PUT("n1", "a", 0, "v1", A, "R1"), RENAME("n2", "a", 1, "b", 0, A, "R21"),
          PUT("n3", "a", 1, "v2", A, "R3")},
         {{"a", F, "v2", 0}, {"b", F, "v1", 0}}},
        {"R22 editor save: write a temp name, rename over the original",
         {PUT("n1", "doc", 0, "v1", A, "R1"), PUT("n1", ".doc.swp", 0, "v2", A, "R1"),
          RENAME("n1", ".doc.swp", 2, "doc", 1, A, "R22")},
         {{"doc", F, "v2", 0}}},
        {"R22 rename a directory over an empty one it saw",
         {MKDIR("n1", "a", 0, A, "R8"), MKDIR("n1", "b", 0, A, "R8"),
          PUT("n1", "a/x", 0, "x", A, "R1"), RENAME("n1", "a", 1, "b", 2, A, "R22")},
         {{"b", D, NULL, 0}, {"b/x", F, "x", 0}}},
        {"R23 rename onto a concurrently created target",
         {PUT("n1", "t.txt", 0, "mine", A, "R1"), PUT("n2", "s", 0, "theirs", A, "R1"),
          RENAME("n2", "s", 2, "t.txt", 0, C, "R23")},
         {{"t.txt", F, "mine", 0}, {"t.pickbox-conflict-n2-3.txt", F, "theirs", 0}}},
        {"R23 editor save over a concurrently edited original",
         {PUT("n1", "doc", 0, "v1", A, "R1"), PUT("n2", "doc", 1, "n2 edit", A, "R2"),
          PUT("n1", ".doc.swp", 0, "n1 edit", A, "R1"),
          RENAME("n1", ".doc.swp", 3, "doc", 1, C, "R23")},
         {{"doc", F, "n2 edit", 0}, {"doc.pickbox-conflict-n1-4", F, "n1 edit", 0}}},
};

static void run_row(const struct ctable *row)
{
    struct fsm_memindex *m = fsm_memindex_new();
    struct fsm_index ix;
    struct memdisk md;
    struct fsm_disk disk;
    struct fsm_tree *t = NULL;
    char base[] = "/tmp/check_fsm_conflict.XXXXXX";
    memset(&md, 0, sizeof(md));
    md_bind(&md, &disk);
    fsm_memindex_bind(m, &ix);
    ck_assert_ptr_nonnull(mkdtemp(base));
    ck_assert_int_eq(fsm_tree_init(base, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base, &t, NULL), 0);

    for (size_t i = 0; i < PB_ARRAY_SIZE(row->steps) && row->steps[i].path; i++) {
        const struct step *s = &row->steps[i];
        struct fsm_op op;
        struct fsm_decision d;
        build_op(s, &op);
        int rc = fsm_memindex_step(m, &op, i + 1, &d);
        ck_assert_msg(rc == 0, "%s: step %zu rc %d", row->id, i + 1, rc);
        ck_assert_msg(d.outcome == s->want, "%s: step %zu outcome %s, want %s (%s)", row->id, i + 1,
                      fsm_outcome_name(d.outcome), fsm_outcome_name(s->want),
                      d.reason ? d.reason : "");
        ck_assert_msg(d.rule && strcmp(d.rule, s->rule) == 0, "%s: step %zu rule %s, want %s",
                      row->id, i + 1, d.rule ? d.rule : "-", s->rule);
        /* the same plan, carried out in a real tree: nothing may be pending */
        unsigned pending = 99;
        md_store(&md, &op);
        rc = fsm_materialize(t, &op, &d, &disk, &pending);
        ck_assert_msg(rc == 0, "%s: step %zu materialize rc %d", row->id, i + 1, rc);
        ck_assert_msg(pending == 0, "%s: step %zu: %u actions pending", row->id, i + 1, pending);
        fsm_decision_free(&d);
        fsm_op_free(&op);
    }
    const char *paths[8];
    size_t want_live = 0;
    for (size_t i = 0; i < PB_ARRAY_SIZE(row->live) && row->live[i].path; i++) {
        const struct expect *x = &row->live[i];
        struct fsm_index_entry e;
        paths[want_live++] = x->path;
        ck_assert_msg(ix.get(ix.arg, x->path, &e) == 0 && !e.deleted, "%s: %s not live", row->id,
                      x->path);
        ck_assert_msg(e.kind == x->kind, "%s: %s kind %d want %d", row->id, x->path, e.kind,
                      x->kind);
        if (x->content) {
            uint8_t h[FSM_CHUNK_ID_LEN];
            text_hash(x->content, h);
            ck_assert_msg(memcmp(h, e.content, FSM_CHUNK_ID_LEN) == 0, "%s: %s content", row->id,
                          x->path);
        }
        if (x->mode)
            ck_assert_msg(e.mode == x->mode, "%s: %s mode %o want %o", row->id, x->path, e.mode,
                          x->mode);
    }
    /* nothing else is live: count the live rows of the dump */
    size_t live = 0;
    struct buf dump = BUF_INIT;
    fsm_memindex_dump(m, &dump);
    buf_put_u8(&dump, 0);
    for (char *line = (char *)dump.data; line && *line;) {
        char *nl = strchr(line, '\n');
        char path[256];
        int kind, deleted;
        unsigned long long v, cv;
        ck_assert_int_eq(sscanf(line, "%255s %d %llu %llu %d", path, &kind, &v, &cv, &deleted), 5);
        if (!deleted)
            live++;
        line = nl ? nl + 1 : NULL;
    }
    ck_assert_msg(live == want_live, "%s: %zu live entries, want %zu:\n%s", row->id, live,
                  want_live, (char *)dump.data);
    assert_tree_matches(row->id, t, base, &ix, paths, want_live);
    buf_free(&dump);
    fsm_tree_close(t);
    nftw(base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    md_free(&md);
    fsm_memindex_free(m);
}

START_TEST(test_conflict_table)
{
    run_row(&table[_i]);
}
END_TEST

/* The same log applied on two nodes gives byte-identical indexes, and the
 * decision for one op is the same every time it is asked. */
START_TEST(test_conflict_deterministic)
{
    struct fsm_memindex *a = fsm_memindex_new(), *b = fsm_memindex_new();
    struct buf da = BUF_INIT, db = BUF_INIT;
    for (size_t r = 0; r < PB_ARRAY_SIZE(table); r++) {
        uint64_t base_index = r * 10;
        for (size_t i = 0; i < PB_ARRAY_SIZE(table[r].steps) && table[r].steps[i].path; i++) {
            struct step s = table[r].steps[i];
            if (s.base)
                s.base += base_index;
            if (s.base_to)
                s.base_to += base_index;
            struct fsm_op op;
            build_op(&s, &op);
            ck_assert_int_eq(fsm_memindex_step(a, &op, base_index + i + 1, NULL), 0);
            ck_assert_int_eq(fsm_memindex_step(b, &op, base_index + i + 1, NULL), 0);
            fsm_op_free(&op);
        }
    }
    fsm_memindex_dump(a, &da);
    fsm_memindex_dump(b, &db);
    ck_assert_uint_gt(da.len, 0);
    ck_assert_uint_eq(da.len, db.len);
    ck_assert_mem_eq(da.data, db.data, da.len);
    buf_free(&da);
    buf_free(&db);
    fsm_memindex_free(a);
    fsm_memindex_free(b);
}
END_TEST

START_TEST(test_conflict_batch_and_errors)
{
    struct fsm_memindex *m = fsm_memindex_new();
    struct fsm_index ix;
    fsm_memindex_bind(m, &ix);
    /* a BATCH: mkdir, file inside, delete of something absent */
    struct step steps[3] = {MKDIR("n1", "d", 0, A, "R8"), PUT("n1", "d/f", 0, "f", A, "R1"),
                            DEL("n1", "zz", 0, false, N, "R12")};
    struct fsm_op batch;
    fsm_op_init(&batch);
    batch.type = FSM_OP_BATCH;
    batch.origin = pb_xstrdup("n1");
    batch.u.batch.n_ops = 3;
    batch.u.batch.ops = pb_xcalloc(3, sizeof(struct fsm_op));
    for (int i = 0; i < 3; i++)
        build_op(&steps[i], &batch.u.batch.ops[i]);
    struct fsm_decision d;
    fsm_decision_init(&d);
    ck_assert_int_eq(fsm_decide(&batch, 1, &ix, &d), -EINVAL);
    ck_assert_int_eq(fsm_memindex_step(m, &batch, 7, &d), 0);
    ck_assert_int_eq(d.outcome, FSM_OUT_NOOP);
    fsm_decision_free(&d);
    struct fsm_index_entry e;
    ck_assert_int_eq(ix.get(ix.arg, "d/f", &e), 0);
    ck_assert_uint_eq(e.version, 7);
    ck_assert_str_eq(e.origin, "n1");
    fsm_op_free(&batch);

    /* a chunk carried by CHUNKS makes a later PUT without bytes applicable */
    struct step put = {FSM_OP_PUT, "n2", "big", 0, "large content", 0, false, true, 0, A, "R1"};
    struct fsm_op op;
    build_op(&put, &op);
    ck_assert_int_eq(fsm_memindex_step(m, &op, 8, &d), 0);
    ck_assert_int_eq(d.outcome, FSM_OUT_MISSING_CHUNKS);
    ck_assert_uint_eq(d.n_acts, 0);
    fsm_decision_free(&d);
    struct fsm_op chunks;
    fsm_op_init(&chunks);
    chunks.type = FSM_OP_CHUNKS;
    chunks.origin = pb_xstrdup("n2");
    chunks.u.chunks.n_data = 1;
    chunks.u.chunks.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
    memcpy(chunks.u.chunks.data[0].id, op.u.put.refs[0].id, FSM_CHUNK_ID_LEN);
    chunks.u.chunks.data[0].len = 13;
    chunks.u.chunks.data[0].data = pb_xmalloc(13);
    memcpy(chunks.u.chunks.data[0].data, "large content", 13);
    ck_assert_int_eq(fsm_memindex_step(m, &chunks, 9, NULL), 0);
    ck_assert_int_eq(fsm_memindex_step(m, &op, 10, &d), 0);
    ck_assert_int_eq(d.outcome, FSM_OUT_APPLIED);
    fsm_decision_free(&d);
    fsm_op_free(&op);
    fsm_op_free(&chunks);
    fsm_memindex_free(m);
}
END_TEST

/* A local edit the watcher has not proposed yet is never overwritten or
 * deleted by an apply; a lost chunk and a missing marker stop the run. */
START_TEST(test_materialize_pending_and_errors)
{
    struct fsm_memindex *m = fsm_memindex_new();
    struct memdisk md;
    struct fsm_disk disk;
    struct fsm_tree *t = NULL;
    char base[] = "/tmp/check_fsm_conflict.XXXXXX";
    memset(&md, 0, sizeof(md));
    md_bind(&md, &disk);
    ck_assert_ptr_nonnull(mkdtemp(base));
    ck_assert_int_eq(fsm_tree_init(base, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base, &t, NULL), 0);

    struct step steps[] = {PUT("n1", "a", 0, "v1", A, "R1"), PUT("n2", "a", 1, "v2", A, "R2"),
                           MKDIR("n1", "d", 0, A, "R8"), DEL("n2", "d", 3, true, A, "R13"),
                           PUT("n1", "b", 0, "lost", A, "R1")};
    unsigned pending;
    for (size_t i = 0; i < PB_ARRAY_SIZE(steps); i++) {
        struct fsm_op op;
        struct fsm_decision d;
        build_op(&steps[i], &op);
        ck_assert_int_eq(fsm_memindex_step(m, &op, i + 1, &d), 0);
        ck_assert_int_eq(d.outcome, steps[i].want);
        if (i == 1) { /* someone edits a locally before the apply of v2 */
            char *p = pb_xasprintf("%s/a", base);
            FILE *f = fopen(p, "w");
            fputs("local edit", f);
            fclose(f);
            free(p);
        }
        if (i == 3) { /* a local file appears in d before its delete */
            char *p = pb_xasprintf("%s/d/new", base);
            FILE *f = fopen(p, "w");
            fclose(f);
            free(p);
        }
        if (i == 4) { /* the chunk store lost the bytes, the op does not carry them */
            free(op.u.put.data[0].data);
            free(op.u.put.data);
            op.u.put.data = NULL;
            op.u.put.n_data = 0;
        } else {
            md_store(&md, &op);
        }
        int rc = fsm_materialize(t, &op, &d, &disk, &pending);
        if (i == 4) {
            ck_assert_int_eq(rc, -ENODATA);
            ck_assert_uint_eq(pending, 0);
        } else {
            ck_assert_int_eq(rc, 0);
            ck_assert_uint_eq(pending, (i == 1 || i == 3) ? 1 : 0);
        }
        fsm_decision_free(&d);
        fsm_op_free(&op);
    }
    char *p = pb_xasprintf("%s/a", base);
    FILE *f = fopen(p, "r");
    char buf[32] = {0};
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_nonnull(fgets(buf, sizeof(buf), f));
    fclose(f);
    free(p);
    ck_assert_str_eq(buf, "local edit");
    struct fsm_tree_stat st;
    ck_assert_int_eq(fsm_tree_lstat(t, "d/new", &st), 0);
    ck_assert_int_eq(st.kind, FSM_KIND_FILE);
    ck_assert_int_eq(fsm_tree_lstat(t, "b", &st), 0);
    ck_assert_int_eq(st.kind, FSM_KIND_NONE);

    /* the marker vanishes: nothing is applied */
    char *marker = pb_xasprintf("%s/.pickbox/marker", base);
    char *mdir = pb_xasprintf("%s/.pickbox", base);
    ck_assert_int_eq(unlink(marker), 0);
    ck_assert_int_eq(rmdir(mdir), 0);
    free(marker);
    free(mdir);
    struct step put = PUT("n1", "c", 0, "c", A, "R1");
    struct fsm_op op;
    struct fsm_decision d;
    build_op(&put, &op);
    ck_assert_int_eq(fsm_memindex_step(m, &op, 9, &d), 0);
    ck_assert_int_eq(fsm_materialize(t, &op, &d, &disk, &pending), -FSM_TREE_ENOMARKER);
    ck_assert_int_eq(fsm_tree_lstat(t, "c", &st), 0);
    ck_assert_int_eq(st.kind, FSM_KIND_NONE);
    fsm_decision_free(&d);
    fsm_op_free(&op);

    fsm_tree_close(t);
    nftw(base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    md_free(&md);
    fsm_memindex_free(m);
}
END_TEST

/* ---- random logs: invariants after every op ------------------------------ */

static uint64_t rnd_state;

static uint32_t rnd(uint32_t n)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return (uint32_t)((rnd_state >> 11) % n);
}

/* Live paths of m (from its dump; test paths have no spaces). */
static size_t live_paths(struct fsm_memindex *m, char paths[][64], size_t max)
{
    struct buf dump = BUF_INIT;
    size_t n = 0;
    fsm_memindex_dump(m, &dump);
    buf_put_u8(&dump, 0);
    for (char *line = (char *)dump.data; line && *line;) {
        char *nl = strchr(line, '\n');
        char path[64];
        int kind, deleted;
        unsigned long long v, cv;
        ck_assert_int_eq(sscanf(line, "%63s %d %llu %llu %d", path, &kind, &v, &cv, &deleted), 5);
        if (!deleted) {
            ck_assert_uint_lt(n, max);
            strcpy(paths[n++], path);
        }
        line = nl ? nl + 1 : NULL;
    }
    buf_free(&dump);
    return n;
}

START_TEST(test_conflict_random_logs)
{
    static const char *names[] = {"a", "b", "a/x", "a/y", "b/x", "c.txt", "a/x/z", "b/x/z"};
    static const char *contents[] = {"", "one", "two", "three", "one"};
    static const char *nodes[] = {"n1", "n2", "n3"};
    rnd_state = 0x1234567ULL + (uint64_t)_i * 7919;
    struct fsm_memindex *m = fsm_memindex_new(), *twin = fsm_memindex_new();
    struct fsm_index ix;
    struct memdisk md;
    struct fsm_disk disk;
    struct fsm_tree *t = NULL;
    char base[] = "/tmp/check_fsm_random.XXXXXX";
    memset(&md, 0, sizeof(md));
    md_bind(&md, &disk);
    fsm_memindex_bind(m, &ix);
    ck_assert_ptr_nonnull(mkdtemp(base));
    ck_assert_int_eq(fsm_tree_init(base, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base, &t, NULL), 0);

    for (uint64_t index = 1; index <= 30; index++) {
        struct step s;
        memset(&s, 0, sizeof(s));
        static const enum fsm_op_type types[] = {FSM_OP_PUT,     FSM_OP_PUT,    FSM_OP_MKDIR,
                                                 FSM_OP_DELETE,  FSM_OP_RENAME, FSM_OP_SETATTR,
                                                 FSM_OP_SYMLINK, FSM_OP_DELETE};
        s.type = types[rnd(PB_ARRAY_SIZE(types))];
        s.origin = nodes[rnd(3)];
        s.path = names[rnd(PB_ARRAY_SIZE(names))];
        struct fsm_index_entry e;
        bool known = ix.get(ix.arg, s.path, &e) == 0;
        /* the base: what the proposer saw: current (sequential), nothing, or older */
        uint32_t pick = rnd(3);
        s.base = pick == 0 && known ? e.version : pick == 1 ? 0 : rnd((uint32_t)index);
        s.mode = 0600 + rnd(0100);
        switch (s.type) {
        case FSM_OP_PUT:
            s.arg = contents[rnd(PB_ARRAY_SIZE(contents))];
            break;
        case FSM_OP_SYMLINK:
            s.arg = "target";
            break;
        case FSM_OP_DELETE:
            s.is_dir = known && !e.deleted ? e.kind == FSM_KIND_DIR : rnd(2);
            break;
        case FSM_OP_RENAME:
            do {
                s.arg = names[rnd(PB_ARRAY_SIZE(names))];
            } while (strcmp(s.arg, s.path) == 0);
            if (ix.get(ix.arg, s.arg, &e) == 0 && rnd(2))
                s.base_to = e.content_version;
            break;
        default:
            break;
        }
        struct fsm_op op;
        struct fsm_decision d, d2;
        build_op(&s, &op);
        ck_assert_int_eq(fsm_memindex_step(m, &op, index, &d), 0);
        ck_assert_int_eq(fsm_memindex_step(twin, &op, index, &d2), 0);
        /* the same decision, asked twice */
        ck_assert_int_eq(d.outcome, d2.outcome);
        ck_assert_uint_eq(d.n_acts, d2.n_acts);
        for (size_t k = 0; k < d.n_acts; k++) {
            ck_assert_int_eq(d.acts[k].type, d2.acts[k].type);
            ck_assert_str_eq(d.acts[k].path, d2.acts[k].path);
        }
        unsigned pending = 9;
        md_store(&md, &op);
        ck_assert_int_eq(fsm_materialize(t, &op, &d, &disk, &pending), 0);
        ck_assert_msg(pending == 0, "seed %d index %llu: %u pending (%s %s)", _i,
                      (unsigned long long)index, pending, fsm_op_type_name(op.type), op.path);

        /* invariants: every live entry's parent is a live directory; a PUT
         * that took effect has its content live somewhere; the tree holds
         * exactly the live entries */
        char paths[64][64];
        size_t n = live_paths(m, paths, 64);
        const char *pp[64];
        bool content_found = false;
        uint8_t h[FSM_CHUNK_ID_LEN];
        if (op.type == FSM_OP_PUT)
            text_hash(s.arg, h);
        for (size_t k = 0; k < n; k++) {
            pp[k] = paths[k];
            char *slash = strrchr(paths[k], '/');
            ck_assert_int_eq(ix.get(ix.arg, paths[k], &e), 0);
            if (op.type == FSM_OP_PUT && e.kind == FSM_KIND_FILE &&
                memcmp(e.content, h, FSM_CHUNK_ID_LEN) == 0)
                content_found = true;
            if (slash == NULL)
                continue;
            char parent[64];
            memcpy(parent, paths[k], (size_t)(slash - paths[k]));
            parent[slash - paths[k]] = '\0';
            ck_assert_msg(ix.get(ix.arg, parent, &e) == 0 && !e.deleted && e.kind == FSM_KIND_DIR,
                          "seed %d index %llu: %s has no live parent directory", _i,
                          (unsigned long long)index, paths[k]);
        }
        if (op.type == FSM_OP_PUT && (d.outcome == FSM_OUT_APPLIED ||
                                      d.outcome == FSM_OUT_CONFLICT || d.outcome == FSM_OUT_NOOP))
            ck_assert_msg(content_found, "seed %d index %llu: PUT %s content lost (%s)", _i,
                          (unsigned long long)index, op.path, d.rule);
        assert_tree_matches("random", t, base, &ix, pp, n);
        fsm_decision_free(&d);
        fsm_decision_free(&d2);
        fsm_op_free(&op);
    }
    struct buf da = BUF_INIT, db = BUF_INIT;
    fsm_memindex_dump(m, &da);
    fsm_memindex_dump(twin, &db);
    ck_assert_uint_eq(da.len, db.len);
    ck_assert_mem_eq(da.data, db.data, da.len);
    buf_free(&da);
    buf_free(&db);
    fsm_tree_close(t);
    nftw(base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    md_free(&md);
    fsm_memindex_free(m);
    fsm_memindex_free(twin);
}
END_TEST

/* ---- the whole path of a change: propose on node A, apply on node B ------- */

struct pipeline {
    struct fsm_memindex *m; /* node B's index (and chunk store) */
    struct fsm_index ix;
    struct memdisk md;
    struct fsm_disk disk;
    struct fsm_tree *tree_b;
    uint64_t next_index;
    int n_ops, n_chunks_ops, n_puts;
    uint64_t max_chunks_bytes; /* of one CHUNKS op */
    uint32_t last_put_carried;
    uint64_t last_put_index;
    const char *poison_path; /* lacks() rewrites this file of tree A (race test) */
    const char *root_a;
};

static int pl_lacks(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    struct pipeline *p = arg;
    if (p->poison_path != NULL) {
        char *path = pb_xasprintf("%s/%s", p->root_a, p->poison_path);
        FILE *f = fopen(path, "a");
        fputs("changed while read", f);
        fclose(f);
        free(path);
        p->poison_path = NULL;
    }
    int rc = p->ix.has_chunk(p->ix.arg, id);
    return rc < 0 ? rc : !rc;
}

/* Each op goes over "the wire" (encode, decode, verify), is committed at the
 * next index on node B and materialized there. */
static int pl_emit(void *arg, const struct fsm_op *op)
{
    struct pipeline *p = arg;
    struct buf b = BUF_INIT;
    struct fsm_op in;
    struct fsm_decision d;
    unsigned pending = 9;
    ck_assert_int_eq(fsm_op_encode(op, &b), 0);
    ck_assert_uint_le(b.len, FSM_OP_MAX_BYTES);
    ck_assert_int_eq(fsm_op_decode(b.data, b.len, &in, NULL), 0);
    buf_free(&b);
    ck_assert_int_eq(fsm_op_verify_chunks(&in, NULL), 0);
    uint64_t index = p->next_index++;
    ck_assert_int_eq(fsm_memindex_step(p->m, &in, index, &d), 0);
    md_store(&p->md, &in);
    if (in.type == FSM_OP_PUT) {
        ck_assert_msg(d.outcome == FSM_OUT_APPLIED, "PUT %s: %s %s", in.path,
                      fsm_outcome_name(d.outcome), d.reason);
        ck_assert_int_eq(fsm_materialize(p->tree_b, &in, &d, &p->disk, &pending), 0);
        ck_assert_uint_eq(pending, 0);
        p->last_put_carried = in.u.put.n_data;
        p->last_put_index = index;
        p->n_puts++;
    } else {
        uint64_t bytes = 0;
        for (uint32_t i = 0; i < in.u.chunks.n_data; i++)
            bytes += in.u.chunks.data[i].len;
        if (bytes > p->max_chunks_bytes)
            p->max_chunks_bytes = bytes;
        p->n_chunks_ops++;
    }
    p->n_ops++;
    fsm_decision_free(&d);
    fsm_op_free(&in);
    return 0;
}

static void write_bytes(const char *root, const char *rel, const uint8_t *p, size_t n)
{
    char *path = pb_xasprintf("%s/%s", root, rel);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    fclose(f);
    free(path);
}

static void assert_same_file(const char *a, const char *b, const char *rel)
{
    char *cmd = pb_xasprintf("cmp -s '%s/%s' '%s/%s'", a, rel, b, rel);
    ck_assert_msg(system(cmd) == 0, "%s differs", rel);
    free(cmd);
}

/* Makes node A's tree (base_a, a mkdtemp template; *ta) and node B's (p). */
static void pipeline_open(struct pipeline *p, char *base_a, char *base_b, struct fsm_tree **ta)
{
    memset(p, 0, sizeof(*p));
    p->m = fsm_memindex_new();
    fsm_memindex_bind(p->m, &p->ix);
    md_bind(&p->md, &p->disk);
    p->next_index = 1;
    p->root_a = base_a;
    ck_assert_ptr_nonnull(mkdtemp(base_a));
    ck_assert_ptr_nonnull(mkdtemp(base_b));
    ck_assert_int_eq(fsm_tree_init(base_a, NULL), 0);
    ck_assert_int_eq(fsm_tree_init(base_b, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base_a, ta, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base_b, &p->tree_b, NULL), 0);
}

static void pipeline_close(struct pipeline *p, const char *base_a, const char *base_b,
                           struct fsm_tree *ta)
{
    fsm_tree_close(ta);
    fsm_tree_close(p->tree_b);
    nftw(base_a, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    nftw(base_b, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    md_free(&p->md);
    fsm_memindex_free(p->m);
}

static uint8_t *pseudo_random(size_t n, uint64_t x)
{
    uint8_t *data = pb_xmalloc(n);
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data[i] = (uint8_t)(x >> 29);
    }
    return data;
}

START_TEST(test_pipeline_propose_apply)
{
    char base_a[] = "/tmp/check_fsm_pipeA.XXXXXX", base_b[] = "/tmp/check_fsm_pipeB.XXXXXX";
    struct fsm_tree *ta = NULL;
    struct pipeline p;
    pipeline_open(&p, base_a, base_b, &ta);

    /* 20 MiB of pseudo-random bytes: more new bytes than one PUT carries */
    size_t n = 20u << 20;
    uint8_t *data = pseudo_random(n + 10, 88172645463325252ULL); /* room for an insert */
    write_bytes(base_a, "big.bin", data, n);
    struct fsm_tree_stat st;
    ck_assert_int_eq(propose_file(ta, "big.bin", "n1", 0, pl_lacks, pl_emit, &p, &st), 0);
    ck_assert_int_eq(p.n_chunks_ops, 1);
    ck_assert_int_eq(p.n_ops, 2);
    ck_assert_uint_eq(st.size, n);
    assert_same_file(base_a, base_b, "big.bin");

    /* an empty file and a small one */
    write_bytes(base_a, "empty", data, 0);
    write_bytes(base_a, "small.txt", (const uint8_t *)"hello", 5);
    ck_assert_int_eq(propose_file(ta, "empty", "n1", 0, pl_lacks, pl_emit, &p, NULL), 0);
    ck_assert_int_eq(propose_file(ta, "small.txt", "n1", 0, pl_lacks, pl_emit, &p, NULL), 0);
    assert_same_file(base_a, base_b, "empty");
    assert_same_file(base_a, base_b, "small.txt");

    /* 10 bytes inserted in the middle: a sequential edit carrying 1-2 chunks */
    uint64_t v = 0;
    struct fsm_index_entry e;
    ck_assert_int_eq(p.ix.get(p.ix.arg, "big.bin", &e), 0);
    v = e.version;
    memmove(data + n / 2 + 10, data + n / 2, n - n / 2);
    memcpy(data + n / 2, "INSERTED!!", 10);
    write_bytes(base_a, "big.bin", data, n + 10);
    int ops_before = p.n_ops;
    ck_assert_int_eq(propose_file(ta, "big.bin", "n1", v, pl_lacks, pl_emit, &p, NULL), 0);
    ck_assert_int_eq(p.n_ops, ops_before + 1);
    ck_assert_uint_ge(p.last_put_carried, 1);
    ck_assert_uint_le(p.last_put_carried, 2);
    assert_same_file(base_a, base_b, "big.bin");

    /* a file that changes while it is read is not proposed */
    ops_before = p.n_ops;
    p.poison_path = "small.txt";
    ck_assert_int_eq(propose_file(ta, "small.txt", "n1", 0, pl_lacks, pl_emit, &p, NULL), -EAGAIN);
    ck_assert_int_eq(p.n_ops, ops_before);
    /* not a regular file */
    char *dir = pb_xasprintf("%s/d", base_a);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    free(dir);
    ck_assert_int_eq(propose_file(ta, "d", "n1", 0, pl_lacks, pl_emit, &p, NULL), -EINVAL);
    ck_assert_int_eq(propose_file(ta, "nope", "n1", 0, pl_lacks, pl_emit, &p, NULL), -EINVAL);

    free(data);
    pipeline_close(&p, base_a, base_b, ta);
}
END_TEST

/* A file proposed a slice at a time: each step reads about max_bytes, the
 * CHUNKS ops carry at most carry_max (+ one chunk) each and go out as the
 * file is read, the PUT comes last; a file changed between two slices is
 * given up (-EAGAIN) without a PUT. */
START_TEST(test_propose_sliced)
{
    char base_a[] = "/tmp/check_fsm_sliceA.XXXXXX", base_b[] = "/tmp/check_fsm_sliceB.XXXXXX";
    struct fsm_tree *ta = NULL;
    struct fsm_propose *fp = NULL;
    struct pipeline p;
    pipeline_open(&p, base_a, base_b, &ta);

    const size_t n = 6u << 20, slice = 1u << 20, carry = 512u << 10;
    uint8_t *data = pseudo_random(n, 0x9E3779B97F4A7C15ULL);
    write_bytes(base_a, "big.bin", data, n);
    ck_assert_int_eq(fsm_propose_begin(ta, "big.bin", "n1", 0, carry, pl_lacks, pl_emit, &p, &fp),
                     0);
    struct fsm_tree_stat st;
    memset(&st, 0, sizeof(st));
    int rc, steps = 0;
    while ((rc = fsm_propose_step(fp, slice, &st)) == 1) {
        steps++;
        ck_assert_uint_eq(fsm_propose_offset(fp), (uint64_t)steps * slice);
        ck_assert_int_eq(p.n_puts, 0);
        /* what was read is on its way, less what a CHUNKS op still gathers */
        ck_assert_uint_le(fsm_propose_carried(fp), fsm_propose_offset(fp));
        ck_assert_uint_ge(fsm_propose_carried(fp) + carry + FSM_CHUNK_MAX, fsm_propose_offset(fp));
    }
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(steps, 6);
    ck_assert_int_eq(p.n_puts, 1);
    ck_assert_int_ge(p.n_chunks_ops, 8);
    ck_assert_uint_le(p.max_chunks_bytes, carry + FSM_CHUNK_MAX);
    ck_assert_uint_eq(fsm_propose_carried(fp), n);
    ck_assert_uint_eq(st.size, n);
    fsm_propose_free(fp);
    assert_same_file(base_a, base_b, "big.bin");

    /* The whole file is in B's store now: proposing it again carries no
     * bytes (lacks says the cluster has them). */
    int chunks_before = p.n_chunks_ops;
    ck_assert_int_eq(fsm_propose_begin(ta, "big.bin", "n1", p.last_put_index, carry, pl_lacks,
                                       pl_emit, &p, &fp),
                     0);
    while ((rc = fsm_propose_step(fp, slice, NULL)) == 1)
        ;
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_eq(fsm_propose_carried(fp), 0);
    ck_assert_int_eq(p.n_chunks_ops, chunks_before);
    ck_assert_uint_eq(p.last_put_carried, 0);
    fsm_propose_free(fp);

    /* Rewritten between two slices (same size, other bytes): given up at
     * the next step, no PUT. */
    uint8_t *other = pseudo_random(n, 42);
    write_bytes(base_a, "torn.bin", data, n);
    ck_assert_int_eq(fsm_propose_begin(ta, "torn.bin", "n1", 0, carry, pl_lacks, pl_emit, &p, &fp),
                     0);
    ck_assert_int_eq(fsm_propose_step(fp, slice, NULL), 1);
    struct timespec later[2] = {{0, UTIME_OMIT}, {12345, 0}};
    char *torn = pb_xasprintf("%s/torn.bin", base_a);
    write_bytes(base_a, "torn.bin", other, n);
    ck_assert_int_eq(utimensat(AT_FDCWD, torn, later, 0), 0); /* mtime surely moves */
    free(torn);
    int puts = p.n_puts;
    ck_assert_int_eq(fsm_propose_step(fp, slice, NULL), -EAGAIN);
    ck_assert_int_eq(fsm_propose_step(fp, slice, NULL), -EINVAL); /* ended */
    ck_assert_int_eq(p.n_puts, puts);
    fsm_propose_free(fp);

    /* Removed between two slices: given up at the next step, no PUT. */
    write_bytes(base_a, "gone.bin", data, n);
    ck_assert_int_eq(fsm_propose_begin(ta, "gone.bin", "n1", 0, carry, pl_lacks, pl_emit, &p, &fp),
                     0);
    ck_assert_int_eq(fsm_propose_step(fp, slice, NULL), 1);
    char *gone = pb_xasprintf("%s/gone.bin", base_a);
    ck_assert_int_eq(unlink(gone), 0);
    free(gone);
    ck_assert_int_eq(fsm_propose_step(fp, slice, NULL), -EAGAIN);
    ck_assert_uint_eq(fsm_propose_offset(fp), 2 * slice);
    ck_assert_int_eq(p.n_puts, puts);
    fsm_propose_free(fp);

    /* Grown while read: the bytes past the size seen at the start stop it. */
    write_bytes(base_a, "grow.bin", data, 2 * slice);
    ck_assert_int_eq(fsm_propose_begin(ta, "grow.bin", "n1", 0, carry, pl_lacks, pl_emit, &p, &fp),
                     0);
    write_bytes(base_a, "grow.bin", other, n);
    rc = fsm_propose_step(fp, UINT64_MAX, NULL);
    ck_assert_int_eq(rc, -EAGAIN);
    ck_assert_int_eq(p.n_puts, puts);
    fsm_propose_free(fp);

    /* Not a regular file, or gone */
    ck_assert_int_eq(fsm_propose_begin(ta, "nope", "n1", 0, carry, pl_lacks, pl_emit, &p, &fp),
                     -EINVAL);
    ck_assert_ptr_null(fp);
    fsm_propose_free(NULL);

    free(data);
    free(other);
    pipeline_close(&p, base_a, base_b, ta);
}
END_TEST

/* The node that loses a conflict: its local edit is proposed, a concurrent
 * edit from another node commits first (skipped here: pending), then its own
 * op commits as a conflict copy, and the original name is repaired to the
 * winner. Nothing is lost, and the tree ends equal to the index. */
static struct buf captured;

static int capture_op(void *arg, const struct fsm_op *op)
{
    (void)arg;
    buf_reset(&captured);
    return fsm_op_encode(op, &captured);
}

static int lacks_all(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    (void)arg;
    (void)id;
    return 1;
}

static char *slurp(const char *root, const char *rel)
{
    char *p = pb_xasprintf("%s/%s", root, rel);
    FILE *f = fopen(p, "r");
    free(p);
    if (f == NULL)
        return NULL;
    char *b = pb_xcalloc(1, 256);
    size_t n = fread(b, 1, 255, f);
    b[n] = '\0';
    fclose(f);
    return b;
}

START_TEST(test_loser_node_lifecycle)
{
    struct fsm_memindex *m = fsm_memindex_new();
    struct fsm_index ix;
    struct memdisk md;
    struct fsm_disk disk;
    struct fsm_tree *t = NULL;
    struct fsm_decision d;
    struct fsm_op op;
    unsigned pending;
    char base[] = "/tmp/check_fsm_loser.XXXXXX";
    memset(&md, 0, sizeof(md));
    md_bind(&md, &disk);
    fsm_memindex_bind(m, &ix);
    buf_init(&captured);
    ck_assert_ptr_nonnull(mkdtemp(base));
    ck_assert_int_eq(fsm_tree_init(base, NULL), 0);
    ck_assert_int_eq(fsm_tree_open(base, &t, NULL), 0);

    /* 1: the file as everyone has it */
    struct step s1 = PUT("n1", "doc.txt", 0, "v1", A, "R1");
    build_op(&s1, &op);
    ck_assert_int_eq(fsm_memindex_step(m, &op, 1, &d), 0);
    md_store(&md, &op);
    ck_assert_int_eq(fsm_materialize(t, &op, &d, &disk, &pending), 0);
    fsm_decision_free(&d);
    fsm_op_free(&op);

    /* a local edit on this node (nB), proposed; the record stays as it was */
    char *p = pb_xasprintf("%s/doc.txt", base);
    FILE *f = fopen(p, "w");
    fputs("local edit", f);
    fclose(f);
    free(p);
    struct fsm_tree_stat proposed;
    ck_assert_int_eq(propose_file(t, "doc.txt", "nB", 1, lacks_all, capture_op, NULL, &proposed),
                     0);

    /* 2: n2's concurrent edit commits first: skipped here, the edit stays */
    struct step s2 = PUT("n2", "doc.txt", 1, "winner", A, "R2");
    struct fsm_op winner;
    build_op(&s2, &winner);
    ck_assert_int_eq(fsm_memindex_step(m, &winner, 2, &d), 0);
    md_store(&md, &winner);
    ck_assert_int_eq(fsm_materialize(t, &winner, &d, &disk, &pending), 0);
    ck_assert_uint_eq(pending, 1);
    fsm_decision_free(&d);
    char *text = slurp(base, "doc.txt");
    ck_assert_str_eq(text, "local edit");
    free(text);

    /* 3: our own op commits: the record becomes what we proposed, the
     * decision is a conflict, the copy is written from the op's bytes */
    ck_assert_int_eq(fsm_op_decode(captured.data, captured.len, &op, NULL), 0);
    ck_assert_int_eq(md_record(&md, "doc.txt", &proposed), 0);
    ck_assert_int_eq(fsm_memindex_step(m, &op, 3, &d), 0);
    ck_assert_int_eq(d.outcome, FSM_OUT_CONFLICT);
    md_store(&md, &op);
    ck_assert_int_eq(fsm_materialize(t, &op, &d, &disk, &pending), 0);
    ck_assert_uint_eq(pending, 0);
    fsm_decision_free(&d);
    fsm_op_free(&op);

    /* repair the original name from the index (the winner) */
    struct fsm_index_entry e;
    ck_assert_int_eq(ix.get(ix.arg, "doc.txt", &e), 0);
    ck_assert_int_eq(fsm_materialize_entry(t, "doc.txt", &e, winner.u.put.refs, winner.u.put.n_refs,
                                           NULL, &disk),
                     0);
    text = slurp(base, "doc.txt");
    ck_assert_str_eq(text, "winner");
    free(text);
    text = slurp(base, "doc.pickbox-conflict-nB-3.txt");
    ck_assert_ptr_nonnull(text);
    ck_assert_str_eq(text, "local edit");
    free(text);
    const char *live[] = {"doc.txt", "doc.pickbox-conflict-nB-3.txt"};
    assert_tree_matches("loser", t, base, &ix, live, 2);

    /* repairing to "nothing" and to a directory */
    ck_assert_int_eq(fsm_materialize_entry(t, "doc.txt", NULL, NULL, 0, NULL, &disk), 0);
    struct fsm_tree_stat st;
    ck_assert_int_eq(fsm_tree_lstat(t, "doc.txt", &st), 0);
    ck_assert_int_eq(st.kind, FSM_KIND_NONE);
    struct fsm_index_entry dir = {.kind = FSM_KIND_DIR, .mode = 0750};
    ck_assert_int_eq(fsm_materialize_entry(t, "doc.txt", &dir, NULL, 0, NULL, &disk), 0);
    ck_assert_int_eq(fsm_tree_lstat(t, "doc.txt", &st), 0);
    ck_assert_int_eq(st.kind, FSM_KIND_DIR);
    ck_assert_uint_eq(st.mode, 0750);

    fsm_op_free(&winner);
    buf_free(&captured);
    fsm_tree_close(t);
    nftw(base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    md_free(&md);
    fsm_memindex_free(m);
}
END_TEST

/* ---- conflict names ------------------------------------------------------ */

START_TEST(test_conflict_names)
{
    static const struct {
        const char *path;
        unsigned seq;
        const char *want;
    } rows[] = {
            {"a.txt", 0, "a.pickbox-conflict-n1-5.txt"},
            {"dir/sub/report.pdf", 0, "dir/sub/report.pickbox-conflict-n1-5.pdf"},
            {"backup.tar.gz", 0, "backup.pickbox-conflict-n1-5.tar.gz"},
            {"B.TAR.XZ", 0, "B.pickbox-conflict-n1-5.TAR.XZ"},
            {".tar.gz", 0, ".tar.pickbox-conflict-n1-5.gz"},
            {"a.b.c", 0, "a.b.pickbox-conflict-n1-5.c"},
            {".bashrc", 0, ".bashrc.pickbox-conflict-n1-5"},
            {".config.json", 0, ".config.pickbox-conflict-n1-5.json"},
            {"Makefile", 0, "Makefile.pickbox-conflict-n1-5"},
            {"trailing.", 0, "trailing..pickbox-conflict-n1-5"},
            {"x.this-is-not-an-extension", 0, "x.this-is-not-an-extension.pickbox-conflict-n1-5"},
            {"d.dir/noext", 0, "d.dir/noext.pickbox-conflict-n1-5"},
            {"a.txt", 3, "a.pickbox-conflict-n1-5-3.txt"},
            {"a.pickbox-conflict-n2-4.txt", 0, "a.pickbox-conflict-n2-4.pickbox-conflict-n1-5.txt"},
    };
    char out[FSM_PATH_MAX + 1], again[FSM_PATH_MAX + 1];
    for (size_t i = 0; i < PB_ARRAY_SIZE(rows); i++) {
        ck_assert_int_eq(fsm_conflict_name(rows[i].path, "n1", 5, rows[i].seq, out), 0);
        ck_assert_str_eq(out, rows[i].want);
        ck_assert(fsm_path_valid(out));
        ck_assert_int_eq(fsm_conflict_name(rows[i].path, "n1", 5, rows[i].seq, again), 0);
        ck_assert_str_eq(out, again);
    }
    ck_assert_int_eq(fsm_conflict_name("a", "node-7", UINT64_MAX, 0, out), 0);
    ck_assert_str_eq(out, "a.pickbox-conflict-node-7-18446744073709551615");

    /* a 254-byte UTF-8 name: the stem is cut at a character boundary */
    char name[300];
    size_t n = 0;
    for (int i = 0; i < 125; i++) {
        name[n++] = '\xc3';
        name[n++] = '\xa9';
    }
    memcpy(name + n, ".txt", 5);
    ck_assert(fsm_path_valid(name));
    ck_assert_int_eq(fsm_conflict_name(name, "n1", 5, 0, out), 0);
    size_t len = strlen(out);
    ck_assert_uint_le(len, FSM_NAME_MAX);
    ck_assert(fsm_path_valid(out));
    ck_assert_str_eq(out + len - strlen(".pickbox-conflict-n1-5.txt"),
                     ".pickbox-conflict-n1-5.txt");
    size_t stem = len - strlen(".pickbox-conflict-n1-5.txt");
    ck_assert_uint_eq(stem % 2, 0);
    ck_assert_int_eq((unsigned char)out[0], 0xc3);

    /* a deep path: the whole result stays within FSM_PATH_MAX */
    char *deep = pb_xmalloc(FSM_PATH_MAX + 1);
    size_t k = 0;
    while (k + 201 < FSM_PATH_MAX - 40) {
        memset(deep + k, 'd', 200);
        k += 200;
        deep[k++] = '/';
    }
    memset(deep + k, 'f', 30);
    k += 30;
    memcpy(deep + k, ".dat", 5);
    ck_assert(fsm_path_valid(deep));
    ck_assert_int_eq(fsm_conflict_name(deep, "n1", 5, 0, out), 0);
    ck_assert_uint_le(strlen(out), FSM_PATH_MAX);
    ck_assert(fsm_path_valid(out));
    ck_assert_str_eq(out + strlen(out) - 4, ".dat");
    /* no room at all for even one stem byte */
    memset(deep, 'd', FSM_PATH_MAX);
    for (size_t i = 200; i < FSM_PATH_MAX - 2; i += 201)
        deep[i] = '/';
    deep[FSM_PATH_MAX - 2] = '/';
    deep[FSM_PATH_MAX] = '\0';
    ck_assert(fsm_path_valid(deep));
    ck_assert_int_eq(fsm_conflict_name(deep, "n1", 5, 0, out), -ENAMETOOLONG);
    free(deep);
}
END_TEST

static Suite *fsm_conflict_suite(void)
{
    Suite *s = suite_create("fsm_conflict");
    TCase *tc = tcase_create("rules");
    tcase_add_loop_test(tc, test_conflict_table, 0, (int)PB_ARRAY_SIZE(table));
    tcase_add_test(tc, test_conflict_deterministic);
    tcase_add_test(tc, test_conflict_batch_and_errors);
    tcase_add_test(tc, test_materialize_pending_and_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("random");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_conflict_random_logs, 0, 40);
    suite_add_tcase(s, tc);
    tc = tcase_create("pipeline");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_pipeline_propose_apply);
    tcase_add_test(tc, test_propose_sliced);
    tcase_add_test(tc, test_loser_node_lifecycle);
    suite_add_tcase(s, tc);
    tc = tcase_create("names");
    tcase_add_test(tc, test_conflict_names);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(fsm_conflict_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
