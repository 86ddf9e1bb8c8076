/*
 * check_fsm_apply.c: applying committed entries to state.db and the tree.
 *
 * Two nodes A and B, each with its own state.db and tree, apply the same log
 * (ops proposed from real files with fsm_propose_begin/step(), encoded
 * as Raft entry payloads). After every entry: both trees are identical, both
 * replicated states are identical (the snapshot streams are equal byte for
 * byte), and state.db's manifest equals memindex.c's reference for the same
 * ops. Then: dedup by session, replay of an applied index, malformed entries,
 * deterministic chunk collection, a crash between commit and materialize
 * repaired on reopen, and a pending local edit that the repair leaves alone.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsm/apply.h"
#include "fsm/memindex.h"
#include "fsm/propose.h"
#include "propose_file.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "store/statedb.h"

struct node {
    char base[64];
    char *tree_dir;
    char *db_path;
    struct statedb *db;
    struct fsm_tree *t;
    struct fsm_apply *ap;
};

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static void node_start(struct node *n)
{
    struct pb_error err;
    ck_assert_int_eq(statedb_open(n->db_path, &n->db, &err), 0);
    ck_assert_int_eq(fsm_tree_open(n->tree_dir, &n->t, &err), 0);
    n->ap = fsm_apply_new(n->db, n->t);
}

static void node_stop(struct node *n)
{
    fsm_apply_free(n->ap);
    fsm_tree_close(n->t);
    statedb_close(n->db);
    n->ap = NULL;
    n->t = NULL;
    n->db = NULL;
}

static void node_init(struct node *n, const char *name)
{
    snprintf(n->base, sizeof(n->base), "/tmp/check_fsm_apply_%s.XXXXXX", name);
    ck_assert_ptr_nonnull(mkdtemp(n->base));
    n->tree_dir = pb_xasprintf("%s/tree", n->base);
    n->db_path = pb_xasprintf("%s/%s", n->base, STATEDB_NAME);
    ck_assert_int_eq(mkdir(n->tree_dir, 0755), 0);
    ck_assert_int_eq(fsm_tree_init(n->tree_dir, NULL), 0);
    node_start(n);
}

static void node_free(struct node *n)
{
    node_stop(n);
    nftw(n->base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(n->tree_dir);
    free(n->db_path);
}

/* ---- the cluster: two nodes and a reference index ------------------------ */

struct cluster {
    struct node a, b;
    struct fsm_memindex *m;
    uint64_t next_index;
    struct buf last; /* the last entry's bytes */
    uint64_t last_index;
};

static void write_file(const char *root, const char *rel, const void *p, size_t n)
{
    char *path = pb_xasprintf("%s/%s", root, rel);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    fclose(f);
    free(path);
}

static uint8_t *random_bytes(size_t n, uint64_t seed)
{
    uint8_t *d = pb_xmalloc(n ? n : 1);
    uint64_t x = seed | 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d[i] = (uint8_t)(x >> 29);
    }
    return d;
}

static void snapshot_bytes(struct statedb *db, struct buf *out)
{
    struct statedb_snapshot *s;
    struct pb_error err;
    ck_assert_int_eq(statedb_snapshot_begin(db, &s, &err), 0);
    uint8_t tmp[65536];
    for (;;) {
        size_t n;
        ck_assert_int_eq(statedb_snapshot_read(s, out->len, tmp, sizeof(tmp), &n, &err), 0);
        buf_put(out, tmp, n);
        if (n < sizeof(tmp))
            break;
    }
    statedb_snapshot_end(s);
}

static void assert_trees_equal(const struct node *a, const struct node *b)
{
    char *cmd = pb_xasprintf("diff -r --no-dereference -x .pickbox '%s' '%s' >&2", a->tree_dir,
                             b->tree_dir);
    ck_assert_msg(system(cmd) == 0, "trees differ: %s", cmd);
    free(cmd);
}

/* Every live manifest row is in the tree with its kind (and size for files). */
struct tree_check {
    struct fsm_tree *t;
    unsigned live;
};

static int check_row(void *arg, const char *path, const struct statedb_row *r)
{
    struct tree_check *c = arg;
    struct fsm_tree_stat st;
    int rc = fsm_tree_lstat(c->t, path, &st);
    if (r->deleted) { /* nothing there (or no parent to hold it) */
        ck_assert_msg(rc == -ELOOP || rc == -ENOTDIR || rc == -ENOENT ||
                              (rc == 0 && st.kind == FSM_KIND_NONE),
                      "%s: a tombstone, yet %d/%d on disk", path, rc, (int)st.kind);
        return 0;
    }
    ck_assert_int_eq(rc, 0);
    c->live++;
    ck_assert_msg(st.kind == (enum fsm_kind)r->kind, "%s: kind %d on disk, %d in manifest", path,
                  (int)st.kind, (int)r->kind);
    if (r->kind == FSM_KIND_FILE)
        ck_assert_uint_eq(st.size, r->size);
    if (r->kind == FSM_KIND_FILE)
        ck_assert_uint_eq(st.mode, r->mode & FSM_TREE_MODE_MASK);
    if (r->kind == FSM_KIND_DIR) /* the owner's rwx stay on disk */
        ck_assert_uint_eq(st.mode, (r->mode & FSM_TREE_MODE_MASK) | 0700);
    return 0;
}

static unsigned assert_tree_matches_manifest(struct node *n)
{
    struct tree_check c = {n->t, 0};
    ck_assert_int_eq(statedb_row_foreach(n->db, check_row, &c), 0);
    return c.live;
}

static void assert_same_state(struct cluster *c)
{
    struct buf sa = BUF_INIT, sb = BUF_INIT, da = BUF_INIT, db = BUF_INIT, dm = BUF_INIT;
    snapshot_bytes(c->a.db, &sa);
    snapshot_bytes(c->b.db, &sb);
    ck_assert_uint_eq(sa.len, sb.len);
    ck_assert_int_eq(memcmp(sa.data, sb.data, sa.len), 0);
    ck_assert_int_eq(fsm_apply_dump(c->a.ap, &da), 0);
    ck_assert_int_eq(fsm_apply_dump(c->b.ap, &db), 0);
    fsm_memindex_dump(c->m, &dm);
    buf_put_u8(&da, 0);
    buf_put_u8(&dm, 0);
    ck_assert_str_eq((char *)da.data, (char *)dm.data);
    assert_trees_equal(&c->a, &c->b);
    assert_tree_matches_manifest(&c->a);
    assert_tree_matches_manifest(&c->b);
    buf_free(&sa);
    buf_free(&sb);
    buf_free(&da);
    buf_free(&db);
    buf_free(&dm);
}

/* Commits one entry at index on both nodes (and the reference index when it
 * takes effect); returns A's result. */
static struct fsm_apply_result commit_at(struct cluster *c, uint64_t index, uint64_t client,
                                         uint64_t seq, const uint8_t *data, size_t len,
                                         enum fsm_apply_status want)
{
    struct fsm_apply_result ra, rb;
    struct pb_error err;
    int rc = fsm_apply_entry(c->a.ap, index, 2, client, seq, data, len, &ra, &err);
    ck_assert_msg(rc == 0, "apply on A: %s", err.msg);
    rc = fsm_apply_entry(c->b.ap, index, 2, client, seq, data, len, &rb, &err);
    ck_assert_msg(rc == 0, "apply on B: %s", err.msg);
    ck_assert_int_eq(ra.status, want);
    ck_assert_int_eq(rb.status, want);
    ck_assert_int_eq(ra.outcome, rb.outcome);
    ck_assert_int_eq(ra.tree_rc, 0);
    ck_assert_int_eq(rb.tree_rc, 0);
    ck_assert_uint_eq(ra.collected, rb.collected);
    if (want == FSM_APPLY_DONE || want == FSM_APPLY_CHUNKS) {
        struct fsm_op op;
        ck_assert_int_eq(fsm_op_decode(data, len, &op, NULL), 0);
        ck_assert_int_eq(fsm_memindex_step(c->m, &op, index, NULL), 0);
        fsm_op_free(&op);
    }
    buf_reset(&c->last);
    buf_put(&c->last, data, len);
    c->last_index = index;
    if (index >= c->next_index)
        c->next_index = index + 1;
    return ra;
}

static struct fsm_apply_result commit(struct cluster *c, uint64_t client, uint64_t seq,
                                      const uint8_t *data, size_t len, enum fsm_apply_status want)
{
    return commit_at(c, c->next_index, client, seq, data, len, want);
}

static struct fsm_apply_result commit_op(struct cluster *c, const struct fsm_op *op,
                                         enum fsm_apply_status want)
{
    struct buf b = BUF_INIT;
    ck_assert_int_eq(fsm_op_encode(op, &b), 0);
    struct fsm_apply_result r = commit(c, 0, 0, b.data, b.len, want);
    buf_free(&b);
    return r;
}

/* Proposals: propose_file's ops, encoded, collected in order. */
struct proposal {
    struct buf ops[16];
    int n;
    struct statedb *db; /* what "the cluster has" is judged by */
};

static int pr_lacks(void *arg, const uint8_t id[FSM_CHUNK_ID_LEN])
{
    struct proposal *p = arg;
    int rc = statedb_chunk_has(p->db, id);
    return rc < 0 ? rc : !rc;
}

static int pr_emit(void *arg, const struct fsm_op *op)
{
    struct proposal *p = arg;
    ck_assert_int_lt(p->n, 16);
    buf_init(&p->ops[p->n]);
    ck_assert_int_eq(fsm_op_encode(op, &p->ops[p->n]), 0);
    p->n++;
    return 0;
}

static void proposal_free(struct proposal *p)
{
    for (int i = 0; i < p->n; i++)
        buf_free(&p->ops[i]);
    p->n = 0;
}

static uint64_t version_of(struct node *n, const char *path)
{
    struct statedb_row r;
    ck_assert_int_eq(statedb_row_get(n->db, path, &r, NULL), 0);
    return r.version;
}

/* Proposes the file at path of node n's tree (n's own edit) and commits it:
 * as the daemon does, the record becomes the proposed stat when the op
 * commits (doc/fsm.md, pending local edits, step 3). */
static struct fsm_apply_result propose_commit(struct cluster *c, struct node *n, const char *origin,
                                              const char *path, uint64_t base, uint64_t client,
                                              uint64_t *seq, int want_ops)
{
    struct proposal p = {.n = 0, .db = n->db};
    struct fsm_tree_stat st;
    ck_assert_int_eq(propose_file(n->t, path, origin, base, pr_lacks, pr_emit, &p, &st), 0);
    ck_assert_int_eq(p.n, want_ops);
    struct fsm_apply_result r;
    memset(&r, 0, sizeof(r));
    for (int i = 0; i < p.n; i++) {
        if (i + 1 == p.n)
            ck_assert_int_eq(fsm_apply_record_local(n->ap, path, &st), 0);
        (*seq)++;
        r = commit(c, client, *seq, p.ops[i].data, p.ops[i].len,
                   i + 1 < p.n ? FSM_APPLY_CHUNKS : FSM_APPLY_DONE);
    }
    proposal_free(&p);
    return r;
}

static void simple_op(struct fsm_op *op, enum fsm_op_type t, const char *origin, const char *path,
                      uint64_t base)
{
    fsm_op_init(op);
    op->type = t;
    op->origin = pb_xstrdup(origin);
    op->path = pb_xstrdup(path);
    op->base = base;
}

static void cluster_init(struct cluster *c)
{
    memset(c, 0, sizeof(*c));
    node_init(&c->a, "A");
    node_init(&c->b, "B");
    c->m = fsm_memindex_new();
    c->next_index = 1;
    buf_init(&c->last);
}

static void cluster_free(struct cluster *c)
{
    node_free(&c->a);
    node_free(&c->b);
    fsm_memindex_free(c->m);
    buf_free(&c->last);
}

static int file_exists(const struct node *n, const char *rel)
{
    char *p = pb_xasprintf("%s/%s", n->tree_dir, rel);
    struct stat st;
    int rc = lstat(p, &st);
    free(p);
    return rc == 0;
}

START_TEST(test_two_nodes_same_log)
{
    struct cluster c;
    struct fsm_op op;
    struct fsm_apply_result r;
    uint64_t seq_a = 0;
    const uint64_t client_a = 0xA11CE;
    cluster_init(&c);

    /* a directory, a small file proposed from A's tree */
    simple_op(&op, FSM_OP_MKDIR, "nA", "docs", 0);
    op.u.mkdir.mode = 0750;
    op.u.mkdir.mtime_ns = 1000000000;
    r = commit_op(&c, &op, FSM_APPLY_DONE);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    fsm_op_free(&op);
    assert_same_state(&c);

    uint8_t *small = random_bytes(5000, 1);
    write_file(c.a.tree_dir, "docs/a.txt", small, 5000);
    r = propose_commit(&c, &c.a, "nA", "docs/a.txt", 0, client_a, &seq_a, 1);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    ck_assert_uint_eq(r.pending, 0); /* A's own file was adopted, not skipped */
    assert_same_state(&c);
    uint64_t v_a1 = version_of(&c.a, "docs/a.txt");

    /* a 20 MiB file: CHUNKS + PUT */
    size_t big_n = 20u << 20;
    uint8_t *big = random_bytes(big_n, 2);
    write_file(c.a.tree_dir, "docs/big.bin", big, big_n);
    r = propose_commit(&c, &c.a, "nA", "docs/big.bin", 0, client_a, &seq_a, 2);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    assert_same_state(&c);

    /* a sequential edit of a.txt on A */
    memcpy(small + 100, "EDITED BY A", 11);
    write_file(c.a.tree_dir, "docs/a.txt", small, 5000);
    r = propose_commit(&c, &c.a, "nA", "docs/a.txt", v_a1, client_a, &seq_a, 1);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    assert_same_state(&c);

    /* a concurrent edit from node nB (made on a scratch copy, based on the
     * older version): a conflict copy on both nodes */
    struct node scratch;
    node_init(&scratch, "S");
    memcpy(small + 200, "EDITED BY B", 11);
    char *sdocs = pb_xasprintf("%s/docs", scratch.tree_dir);
    ck_assert_int_eq(mkdir(sdocs, 0755), 0);
    free(sdocs);
    write_file(scratch.tree_dir, "docs/a.txt", small, 5000);
    struct proposal p = {.n = 0, .db = c.b.db};
    ck_assert_int_eq(propose_file(scratch.t, "docs/a.txt", "nB", v_a1, pr_lacks, pr_emit, &p, NULL),
                     0);
    ck_assert_int_eq(p.n, 1);
    uint64_t conflict_index = c.next_index;
    r = commit(&c, 0xB0B, 1, p.ops[0].data, p.ops[0].len, FSM_APPLY_DONE);
    ck_assert_int_eq(r.outcome, FSM_OUT_CONFLICT);
    ck_assert_uint_eq(r.conflicts, 1);
    char *copy =
            pb_xasprintf("docs/a.pickbox-conflict-nB-%llu.txt", (unsigned long long)conflict_index);
    ck_assert(file_exists(&c.a, copy));
    ck_assert(file_exists(&c.b, copy));
    assert_same_state(&c);

    /* dedup: the same (client, seq) again at a new index is a no-op */
    struct statedb_applied ap;
    r = commit(&c, 0xB0B, 1, p.ops[0].data, p.ops[0].len, FSM_APPLY_DUPLICATE);
    proposal_free(&p);
    ck_assert_int_eq(statedb_applied_get(c.b.db, &ap), 0);
    ck_assert_uint_eq(ap.duplicates, 1);
    ck_assert_uint_eq(ap.conflicts, 1);
    ck_assert_uint_eq(ap.index, c.next_index - 1);
    assert_same_state(&c);

    /* replay of an applied index: nothing happens */
    struct fsm_apply_result rr;
    struct pb_error err;
    ck_assert_int_eq(
            fsm_apply_entry(c.a.ap, conflict_index, 2, 0, 0, c.last.data, c.last.len, &rr, &err),
            0);
    ck_assert_int_eq(rr.status, FSM_APPLY_ALREADY);
    assert_same_state(&c);

    /* symlink, setattr, rename of the directory, a batch */
    simple_op(&op, FSM_OP_SYMLINK, "nA", "docs/link", 0);
    op.u.symlink.target = pb_xstrdup("a.txt");
    op.u.symlink.mtime_ns = 5;
    commit_op(&c, &op, FSM_APPLY_DONE);
    fsm_op_free(&op);
    simple_op(&op, FSM_OP_SETATTR, "nA", "docs/big.bin", version_of(&c.a, "docs/big.bin"));
    op.u.setattr.fields = FSM_ATTR_MODE;
    op.u.setattr.mode = 0600;
    commit_op(&c, &op, FSM_APPLY_DONE);
    fsm_op_free(&op);
    assert_same_state(&c);
    simple_op(&op, FSM_OP_RENAME, "nA", "docs", version_of(&c.a, "docs"));
    op.u.rename.to = pb_xstrdup("papers");
    r = commit_op(&c, &op, FSM_APPLY_DONE);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    fsm_op_free(&op);
    ck_assert(file_exists(&c.b, "papers/big.bin"));
    ck_assert(!file_exists(&c.b, "docs"));
    assert_same_state(&c);

    fsm_op_init(&op);
    op.type = FSM_OP_BATCH;
    op.origin = pb_xstrdup("nB");
    op.u.batch.n_ops = 2;
    op.u.batch.ops = pb_xcalloc(2, sizeof(struct fsm_op));
    simple_op(&op.u.batch.ops[0], FSM_OP_MKDIR, "nB", "x", 0);
    op.u.batch.ops[0].u.mkdir.mode = 0755;
    simple_op(&op.u.batch.ops[1], FSM_OP_MKDIR, "nB", "x/y", 0);
    op.u.batch.ops[1].u.mkdir.mode = 0700;
    r = commit_op(&c, &op, FSM_APPLY_DONE);
    ck_assert_uint_eq(r.n_ops, 2);
    fsm_op_free(&op);
    assert_same_state(&c);

    /* malformed entries: a deterministic, counted no-op */
    static const uint8_t junk[] = {1, 99, 0, 0};
    commit(&c, 0, 0, junk, sizeof(junk), FSM_APPLY_MALFORMED);
    ck_assert_int_eq(statedb_applied_get(c.a.db, &ap), 0);
    ck_assert_uint_eq(ap.malformed, 1);
    /* an op of a newer format stops the applier; state.db is unchanged */
    static const uint8_t newer[] = {FSM_OP_FORMAT_VERSION + 1, 1, 0, 0};
    ck_assert_int_eq(
            fsm_apply_entry(c.a.ap, c.next_index, 2, 0, 0, newer, sizeof(newer), &rr, &err),
            -EPROTONOSUPPORT);
    struct statedb_applied ap2;
    ck_assert_int_eq(statedb_applied_get(c.a.db, &ap2), 0);
    ck_assert_uint_eq(ap2.index, ap.index);
    assert_same_state(&c);

    /* delete the big file: its chunks lose their references, and are
     * collected once the keep window has passed, on both nodes alike */
    struct statedb_status s0, s1, s2;
    ck_assert_int_eq(statedb_status_get(c.a.db, FSM_KIND_FILE, FSM_KIND_DIR, &s0), 0);
    simple_op(&op, FSM_OP_DELETE, "nA", "papers/big.bin", version_of(&c.a, "papers/big.bin"));
    r = commit_op(&c, &op, FSM_APPLY_DONE);
    fsm_op_free(&op);
    ck_assert_uint_eq(r.collected, 0); /* still inside the keep window */
    ck_assert_int_eq(statedb_status_get(c.a.db, FSM_KIND_FILE, FSM_KIND_DIR, &s1), 0);
    ck_assert_uint_eq(s1.chunks, s0.chunks);
    ck_assert_uint_eq(s1.bytes + big_n, s0.bytes);
    assert_same_state(&c);
    simple_op(&op, FSM_OP_MKDIR, "nA", "later", 0);
    op.u.mkdir.mode = 0755;
    struct buf b = BUF_INIT;
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    fsm_op_free(&op);
    r = commit_at(&c, c.next_index + FSM_APPLY_CHUNK_KEEP, 0, 0, b.data, b.len, FSM_APPLY_DONE);
    buf_free(&b);
    ck_assert_uint_gt(r.collected, 100); /* ~20 MiB of ~64 KiB chunks */
    ck_assert_int_eq(statedb_status_get(c.b.db, FSM_KIND_FILE, FSM_KIND_DIR, &s2), 0);
    ck_assert_uint_eq(s2.chunks + r.collected, s1.chunks);
    ck_assert_uint_lt(s2.chunk_bytes, 100000);
    assert_same_state(&c);
    unsigned live = assert_tree_matches_manifest(&c.a);
    ck_assert_uint_ge(live, 6);

    free(copy);
    free(small);
    free(big);
    node_free(&scratch);
    cluster_free(&c);
}
END_TEST

/* A crash after state.db committed an entry but before the tree changed
 * (simulated by hiding the tree's marker: fsm_materialize refuses to touch
 * it), then a restart: fsm_apply_repair() brings the tree to the manifest. A
 * pending local edit survives the repair. */
START_TEST(test_crash_between_commit_and_materialize)
{
    struct cluster c;
    struct fsm_op op;
    uint64_t seq = 0;
    cluster_init(&c);
    simple_op(&op, FSM_OP_MKDIR, "nA", "d", 0);
    op.u.mkdir.mode = 0755;
    commit_op(&c, &op, FSM_APPLY_DONE);
    fsm_op_free(&op);
    uint8_t *data = random_bytes(300000, 3);
    write_file(c.a.tree_dir, "d/f1", data, 300000);
    propose_commit(&c, &c.a, "nA", "d/f1", 0, 7, &seq, 1);
    write_file(c.a.tree_dir, "d/keep", data, 1000);
    propose_commit(&c, &c.a, "nA", "d/keep", 0, 7, &seq, 1);
    write_file(c.a.tree_dir, "gone", data, 10);
    propose_commit(&c, &c.a, "nA", "gone", 0, 7, &seq, 1);
    assert_same_state(&c);

    /* B's local edit of d/keep, not proposed yet */
    write_file(c.b.tree_dir, "d/keep", "local edit", 10);

    /* the next entries commit on B, but B "crashes" before its tree changes */
    char *marker = pb_xasprintf("%s/.pickbox", c.b.tree_dir);
    char *hidden = pb_xasprintf("%s/.pickbox-hidden", c.b.tree_dir);
    ck_assert_int_eq(rename(marker, hidden), 0);
    struct fsm_apply_result ra, rb;
    struct pb_error err;
    struct buf e1 = BUF_INIT, e2 = BUF_INIT, e3 = BUF_INIT;
    simple_op(&op, FSM_OP_RENAME, "nA", "d", version_of(&c.a, "d"));
    op.u.rename.to = pb_xstrdup("moved");
    ck_assert_int_eq(fsm_op_encode(&op, &e1), 0);
    fsm_op_free(&op);
    simple_op(&op, FSM_OP_DELETE, "nA", "gone", version_of(&c.a, "gone"));
    ck_assert_int_eq(fsm_op_encode(&op, &e2), 0);
    fsm_op_free(&op);
    simple_op(&op, FSM_OP_SYMLINK, "nA", "ln", 0);
    op.u.symlink.target = pb_xstrdup("moved/f1");
    ck_assert_int_eq(fsm_op_encode(&op, &e3), 0);
    fsm_op_free(&op);
    struct buf *es[3] = {&e1, &e2, &e3};
    for (int i = 0; i < 3; i++) {
        uint64_t idx = c.next_index++;
        ck_assert_int_eq(fsm_apply_entry(c.a.ap, idx, 2, 0, 0, es[i]->data, es[i]->len, &ra, &err),
                         0);
        ck_assert_int_eq(ra.tree_rc, 0);
        ck_assert_int_eq(fsm_apply_entry(c.b.ap, idx, 2, 0, 0, es[i]->data, es[i]->len, &rb, &err),
                         0);
        ck_assert_int_eq(rb.status, FSM_APPLY_DONE);
        ck_assert_int_eq(rb.tree_rc, -FSM_TREE_ENOMARKER);
        struct fsm_op dop;
        ck_assert_int_eq(fsm_op_decode(es[i]->data, es[i]->len, &dop, NULL), 0);
        ck_assert_int_eq(fsm_memindex_step(c.m, &dop, idx, NULL), 0);
        fsm_op_free(&dop);
    }
    ck_assert_int_eq(rename(hidden, marker), 0);
    ck_assert(file_exists(&c.b, "d/f1")); /* B's tree is behind */
    ck_assert(file_exists(&c.b, "gone"));

    /* restart B: replaying the committed entries is a no-op... */
    node_stop(&c.b);
    node_start(&c.b);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(fsm_apply_entry(c.b.ap, c.next_index - 3 + (uint64_t)i, 2, 0, 0,
                                         es[i]->data, es[i]->len, &rb, &err),
                         0);
        ck_assert_int_eq(rb.status, FSM_APPLY_ALREADY);
    }
    ck_assert(file_exists(&c.b, "d/f1"));
    /* ...and the repair brings the tree to state.db, except the local edit */
    unsigned repaired = 0, pending = 0;
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &repaired, &pending), 0);
    ck_assert_uint_ge(repaired, 4); /* moved, moved/f1, ln, gone, d/f1 ... */
    ck_assert_uint_ge(pending, 1);  /* d/keep (and so d, which is not empty) */
    ck_assert(!file_exists(&c.b, "gone"));
    ck_assert(file_exists(&c.b, "moved/f1"));
    ck_assert(file_exists(&c.b, "ln"));
    char *kept = pb_xasprintf("%s/d/keep", c.b.tree_dir);
    FILE *f = fopen(kept, "r");
    free(kept);
    ck_assert_ptr_nonnull(f);
    char txt[32] = {0};
    ck_assert_uint_eq(fread(txt, 1, sizeof(txt) - 1, f), 10);
    fclose(f);
    ck_assert_str_eq(txt, "local edit");
    /* a second repair changes nothing more */
    unsigned again = 0, pending2 = 0;
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &again, &pending2), 0);
    ck_assert_uint_eq(again, 0);
    ck_assert_uint_eq(pending2, pending);

    /* once the local edit is gone (the watcher would propose it; here it
     * is undone), the repair completes and the trees are equal */
    char *keep = pb_xasprintf("%s/d/keep", c.b.tree_dir);
    ck_assert_int_eq(unlink(keep), 0);
    free(keep);
    struct statedb_disk none = {.kind = 0};
    ck_assert_int_eq(statedb_disk_set(c.b.db, "d/keep", &none), 0);
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &again, &pending2), 0);
    ck_assert_uint_eq(pending2, 0);
    assert_same_state(&c);

    buf_free(&e1);
    buf_free(&e2);
    buf_free(&e3);
    free(marker);
    free(hidden);
    free(data);
    cluster_free(&c);
}
END_TEST

/* A node that installs A's snapshot (instead of the log) and repairs its
 * tree ends with A's state and tree; its own tree's extra paths go. */
START_TEST(test_snapshot_install_then_repair)
{
    struct cluster c;
    struct fsm_op op;
    uint64_t seq = 0;
    cluster_init(&c);
    simple_op(&op, FSM_OP_MKDIR, "nA", "s", 0);
    op.u.mkdir.mode = 0755;
    commit_op(&c, &op, FSM_APPLY_DONE);
    fsm_op_free(&op);
    uint8_t *data = random_bytes(100000, 4);
    write_file(c.a.tree_dir, "s/one", data, 100000);
    propose_commit(&c, &c.a, "nA", "s/one", 0, 9, &seq, 1);
    assert_same_state(&c);

    struct node n;
    node_init(&n, "N");
    write_file(n.tree_dir, "stray", "x", 1); /* not in any manifest, no record */
    struct buf s = BUF_INIT;
    snapshot_bytes(c.a.db, &s);
    struct statedb_install *in;
    struct pb_error err;
    ck_assert_int_eq(statedb_install_begin(n.db, &in, &err), 0);
    ck_assert_int_eq(statedb_install_write(in, s.data, s.len, &err), 0);
    ck_assert_int_eq(statedb_install_finish(in, NULL, NULL, &err), 0);
    statedb_install_abort(in);
    /* the snapshot carries no chunk bytes: the file waits for them (skipped,
     * not an error), and appears once they are here (as the fetcher does) */
    unsigned repaired = 0;
    ck_assert_int_eq(fsm_apply_repair(n.ap, &repaired, NULL), 0);
    ck_assert_uint_eq(repaired, 1);
    ck_assert(!file_exists(&n, "s/one"));
    struct statedb_ref miss[16];
    size_t nm = 0;
    ck_assert_int_eq(statedb_chunk_missing(n.db, NULL, miss, 16, &nm), 0);
    ck_assert_uint_gt(nm, 0);
    uint8_t *cb = pb_xmalloc(FSM_CHUNK_MAX_LEN);
    for (size_t i = 0; i < nm; i++) {
        ck_assert_int_eq(statedb_chunk_get(c.a.db, miss[i].id, cb, miss[i].len), 0);
        ck_assert_int_eq(statedb_chunk_data_put(n.db, miss[i].id, cb, miss[i].len), 0);
    }
    free(cb);
    ck_assert_int_eq(fsm_apply_repair(n.ap, &repaired, NULL), 0);
    ck_assert_uint_eq(repaired, 1);
    ck_assert(file_exists(&n, "stray")); /* unknown local files are left alone */
    char *p = pb_xasprintf("%s/stray", n.tree_dir);
    unlink(p);
    free(p);
    assert_trees_equal(&c.a, &n);
    /* and it continues with the log like the others */
    write_file(c.a.tree_dir, "s/two", data, 5000);
    struct proposal pr = {.n = 0, .db = c.a.db};
    ck_assert_int_eq(propose_file(c.a.t, "s/two", "nA", 0, pr_lacks, pr_emit, &pr, NULL), 0);
    struct fsm_apply_result r;
    ck_assert_int_eq(
            fsm_apply_entry(n.ap, c.next_index, 2, 0, 0, pr.ops[0].data, pr.ops[0].len, &r, &err),
            0);
    ck_assert_int_eq(r.status, FSM_APPLY_DONE);
    ck_assert_int_eq(r.tree_rc, 0);
    char *cmd = pb_xasprintf("cmp -s '%s/s/two' '%s/s/two'", c.a.tree_dir, n.tree_dir);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    proposal_free(&pr);
    buf_free(&s);
    free(data);
    node_free(&n);
    cluster_free(&c);
}
END_TEST

/* A storage failure inside the apply transaction leaves state.db as it was
 * (applied index included), and the same entry applies cleanly afterwards. */
START_TEST(test_apply_storage_failure)
{
    struct cluster c;
    struct fsm_op op;
    cluster_init(&c);
    simple_op(&op, FSM_OP_MKDIR, "nA", "m", 0);
    op.u.mkdir.mode = 0755;
    struct buf b = BUF_INIT;
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    fsm_op_free(&op);
    struct fsm_apply_result r;
    struct pb_error err;
    statedb_fault_inject(c.a.db, STORE_FAULT_IOERR_FSYNC, 1);
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, 1, 1, 5, 1, b.data, b.len, &r, &err), -EIO);
    struct statedb_applied ap;
    ck_assert_int_eq(statedb_applied_get(c.a.db, &ap), 0);
    ck_assert_uint_eq(ap.index, 0);
    uint64_t sseq = 9;
    ck_assert_int_eq(statedb_session_get(c.a.db, 5, &sseq), 0);
    ck_assert_uint_eq(sseq, 0);
    ck_assert(!file_exists(&c.a, "m"));
    statedb_fault_inject(c.a.db, STORE_FAULT_FULL, 1);
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, 1, 1, 5, 1, b.data, b.len, &r, &err), -ENOSPC);
    /* retried: applies once */
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, 1, 1, 5, 1, b.data, b.len, &r, &err), 0);
    ck_assert_int_eq(r.status, FSM_APPLY_DONE);
    ck_assert(file_exists(&c.a, "m"));
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, 2, 1, 5, 1, b.data, b.len, &r, &err), 0);
    ck_assert_int_eq(r.status, FSM_APPLY_DUPLICATE);
    buf_free(&b);
    cluster_free(&c);
}
END_TEST

/* A CHUNKS op's bytes serve a PUT committed within FSM_APPLY_CHUNK_KEEP
 * entries; after that they are collected and a PUT relying on them fails
 * alike everywhere (MISSING_CHUNKS). Carried bytes that do not hash to
 * their id make the entry a counted no-op. */
static void encode_chunks(struct buf *b, const char *text)
{
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_CHUNKS;
    op.origin = pb_xstrdup("nA");
    op.u.chunks.n_data = 1;
    op.u.chunks.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
    op.u.chunks.data[0].len = (uint32_t)strlen(text);
    op.u.chunks.data[0].data = (uint8_t *)pb_xstrdup(text);
    ck_assert_int_eq(fsm_sha256(text, strlen(text), op.u.chunks.data[0].id), 0);
    ck_assert_int_eq(fsm_op_encode(&op, b), 0);
    fsm_op_free(&op);
}

static void put_relying_on(struct fsm_op *op, const char *path, const char *text)
{
    simple_op(op, FSM_OP_PUT, "nA", path, 0);
    op->u.put.mode = 0644;
    op->u.put.size = strlen(text);
    op->u.put.n_refs = 1;
    op->u.put.refs = pb_xcalloc(1, sizeof(struct fsm_chunk_ref));
    op->u.put.refs[0].len = (uint32_t)strlen(text);
    ck_assert_int_eq(fsm_sha256(text, strlen(text), op->u.put.refs[0].id), 0);
}

START_TEST(test_chunk_window_and_bad_bytes)
{
    struct cluster c;
    struct fsm_op op;
    struct buf b = BUF_INIT;
    cluster_init(&c);
    /* within the window */
    encode_chunks(&b, "carried ahead of its PUT");
    commit(&c, 0, 0, b.data, b.len, FSM_APPLY_CHUNKS);
    buf_reset(&b);
    put_relying_on(&op, "in-time", "carried ahead of its PUT");
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    struct fsm_apply_result r = commit_at(&c, c.next_index + FSM_APPLY_CHUNK_KEEP - 2, 0, 0, b.data,
                                          b.len, FSM_APPLY_DONE);
    ck_assert_int_eq(r.outcome, FSM_OUT_APPLIED);
    fsm_op_free(&op);
    buf_reset(&b);
    assert_same_state(&c);

    /* too late: collected before the PUT applies */
    encode_chunks(&b, "carried but never used in time");
    uint64_t at = c.next_index;
    struct fsm_apply_result ra, rb;
    struct pb_error err;
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, at, 2, 0, 0, b.data, b.len, &ra, &err), 0);
    ck_assert_int_eq(fsm_apply_entry(c.b.ap, at, 2, 0, 0, b.data, b.len, &rb, &err), 0);
    buf_reset(&b);
    put_relying_on(&op, "too-late", "carried but never used in time");
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    fsm_op_free(&op);
    /* an entry past the window (a Raft no-op) collects them at its end */
    struct fsm_apply_input noop = {at + FSM_APPLY_CHUNK_KEEP + 1, 2, 0, 0, NULL, 0};
    ck_assert_int_eq(fsm_apply_entries(c.a.ap, &noop, 1, &ra, &err), 0);
    ck_assert_int_eq(fsm_apply_entries(c.b.ap, &noop, 1, &rb, &err), 0);
    ck_assert_int_eq(ra.status, FSM_APPLY_INDEX_ONLY);
    ck_assert_uint_eq(ra.collected, 1);
    ck_assert_uint_eq(rb.collected, 1);
    uint64_t late = noop.index + 1;
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, late, 2, 0, 0, b.data, b.len, &ra, &err), 0);
    ck_assert_int_eq(fsm_apply_entry(c.b.ap, late, 2, 0, 0, b.data, b.len, &rb, &err), 0);
    ck_assert_int_eq(ra.outcome, FSM_OUT_MISSING_CHUNKS);
    ck_assert_int_eq(rb.outcome, FSM_OUT_MISSING_CHUNKS);
    ck_assert(!file_exists(&c.a, "too-late"));
    buf_reset(&b);
    c.next_index = late + 1;

    /* carried bytes that do not match their id */
    struct fsm_op bad;
    put_relying_on(&bad, "bad", "right bytes");
    bad.u.put.n_data = 1;
    bad.u.put.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
    memcpy(bad.u.put.data[0].id, bad.u.put.refs[0].id, FSM_CHUNK_ID_LEN);
    bad.u.put.data[0].len = 11;
    bad.u.put.data[0].data = (uint8_t *)pb_xstrdup("wrong bytes");
    ck_assert_int_eq(fsm_op_encode(&bad, &b), 0);
    fsm_op_free(&bad);
    commit(&c, 0, 0, b.data, b.len, FSM_APPLY_MALFORMED);
    ck_assert(!file_exists(&c.b, "bad"));
    struct statedb_applied ap;
    ck_assert_int_eq(statedb_applied_get(c.b.db, &ap), 0);
    ck_assert_uint_eq(ap.malformed, 1);
    uint8_t id[FSM_CHUNK_ID_LEN];
    ck_assert_int_eq(fsm_sha256("right bytes", 11, id), 0);
    ck_assert_int_eq(statedb_chunk_has(c.b.db, id), 0); /* never stored */
    buf_free(&b);
    cluster_free(&c);
}
END_TEST

/* REFS (D13): the chunk rows, whatever bytes each node holds. A holds the
 * pushed bytes (no row yet), B none; after REFS both have the same rows, the
 * PUT relying on them applies on both, A writes the file, B waits for the
 * bytes (fetched) and its repair writes it. A REFS naming a known chunk with
 * another length is skipped alike everywhere. */
START_TEST(test_refs_rows_without_bytes)
{
    struct cluster c;
    struct buf b = BUF_INIT;
    struct fsm_op op;
    struct pb_error err;
    cluster_init(&c);
    const char *text = "pushed beside the log";
    uint32_t len = (uint32_t)strlen(text);
    uint8_t id[FSM_CHUNK_ID_LEN];
    ck_assert_int_eq(fsm_sha256(text, len, id), 0);
    struct statedb_chunk_in in = {id, text, len};
    ck_assert_int_eq(statedb_chunk_data_put_many(c.a.db, &in, 1), 0);
    ck_assert_int_eq(statedb_chunk_has(c.a.db, id), 0);
    ck_assert_int_eq(statedb_chunk_data_has(c.a.db, id), 1);

    fsm_op_init(&op);
    op.type = FSM_OP_REFS;
    op.origin = pb_xstrdup("nA");
    op.u.refs.n_refs = 1;
    op.u.refs.refs = pb_xcalloc(1, sizeof(struct fsm_chunk_ref));
    memcpy(op.u.refs.refs[0].id, id, FSM_CHUNK_ID_LEN);
    op.u.refs.refs[0].len = len;
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    commit(&c, 0, 0, b.data, b.len, FSM_APPLY_CHUNKS);
    ck_assert_int_eq(statedb_chunk_has(c.a.db, id), 1);
    ck_assert_int_eq(statedb_chunk_has(c.b.db, id), 1);
    ck_assert_int_eq(statedb_chunk_data_has(c.a.db, id), 1);
    ck_assert_int_eq(statedb_chunk_data_has(c.b.db, id), 0);
    assert_same_state(&c);
    buf_reset(&b);

    /* the same chunk with another length: skipped on both, rows unchanged */
    op.u.refs.refs[0].len = len + 1;
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    commit(&c, 0, 0, b.data, b.len, FSM_APPLY_CHUNKS);
    buf_reset(&b);
    fsm_op_free(&op);

    put_relying_on(&op, "pushed", text);
    ck_assert_int_eq(fsm_op_encode(&op, &b), 0);
    fsm_op_free(&op);
    struct fsm_apply_result ra, rb;
    uint64_t at = c.next_index++;
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, at, 2, 0, 0, b.data, b.len, &ra, &err), 0);
    ck_assert_int_eq(fsm_apply_entry(c.b.ap, at, 2, 0, 0, b.data, b.len, &rb, &err), 0);
    ck_assert_int_eq(ra.outcome, FSM_OUT_APPLIED);
    ck_assert_int_eq(rb.outcome, FSM_OUT_APPLIED);
    ck_assert(file_exists(&c.a, "pushed"));
    ck_assert(!file_exists(&c.b, "pushed"));
    struct buf sa = BUF_INIT, sb = BUF_INIT;
    snapshot_bytes(c.a.db, &sa);
    snapshot_bytes(c.b.db, &sb);
    ck_assert_uint_eq(sa.len, sb.len);
    ck_assert_int_eq(memcmp(sa.data, sb.data, sa.len), 0);
    buf_free(&sa);
    buf_free(&sb);
    /* B gets the bytes (as fetch.c stores them) and repairs */
    ck_assert_int_eq(statedb_chunk_data_put(c.b.db, id, text, len), 0);
    unsigned repaired = 0;
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &repaired, NULL), 0);
    ck_assert_uint_eq(repaired, 1);
    ck_assert(file_exists(&c.b, "pushed"));
    buf_free(&b);
    cluster_free(&c);
}
END_TEST

/* The node that loses a conflict (doc/fsm.md, pending local edits): B's
 * local edit is proposed; A's concurrent edit commits first and is skipped
 * on B (pending); B's op commits as a conflict copy, its record is set to
 * the proposed stat, and the repair puts the winner back at the name. */
START_TEST(test_loser_node_with_statedb)
{
    struct cluster c;
    uint64_t seq_a = 0;
    cluster_init(&c);
    write_file(c.a.tree_dir, "doc.txt", "v1", 2);
    propose_commit(&c, &c.a, "nA", "doc.txt", 0, 1, &seq_a, 1);
    assert_same_state(&c);
    uint64_t v1 = version_of(&c.a, "doc.txt");

    /* B's local edit, proposed (not committed yet) */
    write_file(c.b.tree_dir, "doc.txt", "local edit", 10);
    struct proposal pb = {.n = 0, .db = c.b.db};
    struct fsm_tree_stat proposed;
    ck_assert_int_eq(propose_file(c.b.t, "doc.txt", "nB", v1, pr_lacks, pr_emit, &pb, &proposed),
                     0);
    /* A's edit commits first: B skips it, its local edit stays */
    write_file(c.a.tree_dir, "doc.txt", "winner", 6);
    struct proposal pa = {.n = 0, .db = c.a.db};
    struct fsm_tree_stat sta;
    ck_assert_int_eq(propose_file(c.a.t, "doc.txt", "nA", v1, pr_lacks, pr_emit, &pa, &sta), 0);
    ck_assert_int_eq(fsm_apply_record_local(c.a.ap, "doc.txt", &sta), 0);
    struct fsm_apply_result ra, rb;
    struct pb_error err;
    uint64_t i1 = c.next_index++;
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, i1, 2, 0, 0, pa.ops[0].data, pa.ops[0].len, &ra, &err),
                     0);
    ck_assert_int_eq(fsm_apply_entry(c.b.ap, i1, 2, 0, 0, pa.ops[0].data, pa.ops[0].len, &rb, &err),
                     0);
    ck_assert_int_eq(ra.outcome, FSM_OUT_APPLIED);
    ck_assert_uint_eq(rb.pending, 1);
    /* B's op commits: a conflict copy on both nodes */
    ck_assert_int_eq(fsm_apply_record_local(c.b.ap, "doc.txt", &proposed), 0);
    uint64_t i2 = c.next_index++;
    ck_assert_int_eq(fsm_apply_entry(c.a.ap, i2, 2, 0, 0, pb.ops[0].data, pb.ops[0].len, &ra, &err),
                     0);
    ck_assert_int_eq(fsm_apply_entry(c.b.ap, i2, 2, 0, 0, pb.ops[0].data, pb.ops[0].len, &rb, &err),
                     0);
    ck_assert_int_eq(ra.outcome, FSM_OUT_CONFLICT);
    ck_assert_int_eq(rb.outcome, FSM_OUT_CONFLICT);
    ck_assert_uint_eq(rb.pending, 0);
    /* the repair puts the winner at the name on B; nothing to do on A */
    unsigned repaired = 0, pending = 9;
    ck_assert_int_eq(fsm_apply_repair(c.a.ap, &repaired, &pending), 0);
    ck_assert_uint_eq(repaired, 0);
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &repaired, &pending), 0);
    ck_assert_uint_eq(repaired, 1);
    ck_assert_uint_eq(pending, 0);
    assert_trees_equal(&c.a, &c.b);
    char *copy = pb_xasprintf("%s/doc.pickbox-conflict-nB-%llu.txt", c.b.tree_dir,
                              (unsigned long long)i2);
    FILE *f = fopen(copy, "r");
    ck_assert_ptr_nonnull(f);
    char txt[32] = {0};
    ck_assert_uint_eq(fread(txt, 1, sizeof(txt) - 1, f), 10);
    fclose(f);
    ck_assert_str_eq(txt, "local edit");
    free(copy);
    proposal_free(&pa);
    proposal_free(&pb);
    cluster_free(&c);
}
END_TEST

/* ---- random logs --------------------------------------------------------- */

static uint64_t rnd_state;

static uint32_t rnd(uint32_t n)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return (uint32_t)(rnd_state % n);
}

/* A random op over a few paths: bases current, absent or stale, so every
 * conflict rule gets its turn. */
static void random_op(struct cluster *c, uint64_t index, struct fsm_op *op)
{
    static const char *names[] = {"a", "b", "a/x", "a/y", "b/x", "c.txt", "a/x/z", "b/x/z"};
    static const char *contents[] = {"", "one", "two", "three", "one"};
    static const char *nodes[] = {"n1", "n2", "n3"};
    static const enum fsm_op_type types[] = {FSM_OP_PUT,     FSM_OP_PUT,    FSM_OP_MKDIR,
                                             FSM_OP_DELETE,  FSM_OP_RENAME, FSM_OP_SETATTR,
                                             FSM_OP_SYMLINK, FSM_OP_DELETE, FSM_OP_BATCH};
    enum fsm_op_type t = types[rnd(PB_ARRAY_SIZE(types))];
    fsm_op_init(op);
    op->type = t;
    op->origin = pb_xstrdup(nodes[rnd(3)]);
    if (t == FSM_OP_BATCH) { /* two MKDIRs of distinct paths */
        op->u.batch.n_ops = 2;
        op->u.batch.ops = pb_xcalloc(2, sizeof(struct fsm_op));
        uint32_t k = rnd(PB_ARRAY_SIZE(names));
        for (int i = 0; i < 2; i++) {
            simple_op(&op->u.batch.ops[i], FSM_OP_MKDIR, op->origin,
                      names[(k + (uint32_t)i) % PB_ARRAY_SIZE(names)], 0);
            op->u.batch.ops[i].u.mkdir.mode = 0750;
        }
        return;
    }
    const char *path = names[rnd(PB_ARRAY_SIZE(names))];
    op->path = pb_xstrdup(path);
    struct statedb_row r;
    bool known = statedb_row_get(c->a.db, path, &r, NULL) == 0;
    uint32_t pick = rnd(3);
    op->base = pick == 0 && known ? r.version : pick == 1 ? 0 : rnd((uint32_t)index);
    switch (t) {
    case FSM_OP_PUT: {
        const char *text = contents[rnd(PB_ARRAY_SIZE(contents))];
        size_t n = strlen(text);
        op->u.put.mode = 0600 + rnd(0100);
        op->u.put.mtime_ns = (int64_t)rnd(1000000) * 1000;
        op->u.put.size = n;
        if (n == 0)
            break;
        op->u.put.n_refs = 1;
        op->u.put.refs = pb_xcalloc(1, sizeof(struct fsm_chunk_ref));
        op->u.put.refs[0].len = (uint32_t)n;
        ck_assert_int_eq(fsm_sha256(text, n, op->u.put.refs[0].id), 0);
        if (rnd(4) == 0) /* relies on the cluster holding it */
            break;
        op->u.put.n_data = 1;
        op->u.put.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
        memcpy(op->u.put.data[0].id, op->u.put.refs[0].id, FSM_CHUNK_ID_LEN);
        op->u.put.data[0].len = (uint32_t)n;
        op->u.put.data[0].data = pb_xmalloc(n);
        memcpy(op->u.put.data[0].data, text, n);
        break;
    }
    case FSM_OP_SYMLINK:
        op->u.symlink.target = pb_xstrdup(rnd(2) ? "target" : "../up");
        op->u.symlink.mtime_ns = 77;
        break;
    case FSM_OP_RENAME: {
        const char *to;
        do {
            to = names[rnd(PB_ARRAY_SIZE(names))];
        } while (strcmp(to, path) == 0);
        op->u.rename.to = pb_xstrdup(to);
        if (statedb_row_get(c->a.db, to, &r, NULL) == 0 && rnd(2))
            op->u.rename.base_to = r.content_version;
        break;
    }
    case FSM_OP_DELETE:
        op->u.del.is_dir = known && !r.deleted ? r.kind == FSM_KIND_DIR : rnd(2);
        break;
    case FSM_OP_MKDIR:
        op->u.mkdir.mode = 0700 + rnd(0100);
        op->u.mkdir.mtime_ns = 2000;
        break;
    case FSM_OP_SETATTR:
        op->u.setattr.fields = FSM_ATTR_MODE | (rnd(2) ? FSM_ATTR_MTIME : 0);
        op->u.setattr.mode = 0700 + rnd(0100);
        op->u.setattr.mtime_ns = 5000;
        break;
    default:
        break;
    }
    ck_assert_int_eq(fsm_op_validate(op, NULL), 0);
}

/* 40 random ops on two nodes: after every op both nodes and the reference
 * agree, the trees match; at the end B's tree and records are wiped and the
 * repair rebuilds the tree from state.db alone. */
START_TEST(test_random_logs)
{
    struct cluster c;
    cluster_init(&c);
    rnd_state = 0x9E3779B97F4A7C15ULL + (uint64_t)_i * 104729;
    unsigned outcomes[8] = {0};
    for (int k = 0; k < 40; k++) {
        struct fsm_op op;
        random_op(&c, c.next_index, &op);
        struct fsm_apply_result r = commit_op(&c, &op, FSM_APPLY_DONE);
        outcomes[r.outcome & 7]++;
        ck_assert_uint_eq(r.pending, 0);
        fsm_op_free(&op);
        assert_same_state(&c);
    }
    /* the rules were exercised, not just the happy path */
    ck_assert_uint_gt(outcomes[FSM_OUT_APPLIED], 0);
    ck_assert_uint_gt(outcomes[FSM_OUT_NOOP] + outcomes[FSM_OUT_CONFLICT], 0);

    /* rebuild B's tree from nothing */
    node_stop(&c.b);
    char *cmd = pb_xasprintf("cd '%s' && find . -mindepth 1 -maxdepth 1 ! -name .pickbox "
                             "-exec rm -rf {} +",
                             c.b.tree_dir);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    sqlite3 *h;
    ck_assert_int_eq(sqlite3_open(c.b.db_path, &h), SQLITE_OK);
    ck_assert_int_eq(sqlite3_exec(h, "DELETE FROM disk", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(h);
    node_start(&c.b);
    unsigned repaired = 0, pending = 9;
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &repaired, &pending), 0);
    ck_assert_uint_eq(pending, 0);
    assert_same_state(&c);
    unsigned again = 9;
    ck_assert_int_eq(fsm_apply_repair(c.b.ap, &again, &pending), 0);
    ck_assert_uint_eq(again, 0);
    cluster_free(&c);
}
END_TEST

/* B applies the same log as A, but in groups of 1..8 entries per
 * transaction (with Raft no-op entries in between, and a repeated client
 * op): the replicated state and the tree end the same. */
START_TEST(test_batched_equals_single)
{
    struct cluster c;
    cluster_init(&c);
    rnd_state = 0xC0FFEEULL + (uint64_t)_i * 7919;
    struct fsm_apply_input in[8];
    struct buf bufs[8];
    struct fsm_apply_result ra, rb[8];
    struct pb_error err;
    size_t n = 0;
    for (int k = 0; k < 60; k++) {
        uint64_t index = c.next_index++;
        buf_init(&bufs[n]);
        in[n] = (struct fsm_apply_input){index, 3, 0, 0, NULL, 0};
        if (rnd(6) == 0) { /* a Raft no-op entry */
            ck_assert_int_eq(fsm_apply_skip(c.a.ap, index, 3, &err), 0);
        } else {
            struct fsm_op op;
            random_op(&c, index, &op);
            ck_assert_int_eq(fsm_op_encode(&op, &bufs[n]), 0);
            fsm_op_free(&op);
            in[n].client_id = 77;
            in[n].seq = rnd(5) == 0 ? (uint64_t)k : (uint64_t)k + 1; /* some repeat */
            in[n].data = bufs[n].data;
            in[n].len = bufs[n].len;
            ck_assert_int_eq(fsm_apply_entry(c.a.ap, index, 3, 77, in[n].seq, in[n].data, in[n].len,
                                             &ra, &err),
                             0);
            ck_assert_int_eq(ra.tree_rc, 0);
        }
        n++;
        if (n == 8 || rnd(3) == 0 || k == 59) {
            ck_assert_int_eq(fsm_apply_entries(c.b.ap, in, n, rb, &err), 0);
            for (size_t i = 0; i < n; i++) {
                ck_assert_int_eq(rb[i].tree_rc, 0);
                ck_assert_int_ne(rb[i].status, FSM_APPLY_ALREADY);
            }
            /* the whole group again (a replay after a restart): no-ops */
            ck_assert_int_eq(fsm_apply_entries(c.b.ap, in, n, rb, &err), 0);
            for (size_t i = 0; i < n; i++) {
                ck_assert_int_eq(rb[i].status, FSM_APPLY_ALREADY);
                buf_free(&bufs[i]);
            }
            n = 0;
        }
    }
    struct buf sa = BUF_INIT, sb = BUF_INIT;
    snapshot_bytes(c.a.db, &sa);
    snapshot_bytes(c.b.db, &sb);
    ck_assert_uint_eq(sa.len, sb.len);
    ck_assert_int_eq(memcmp(sa.data, sb.data, sa.len), 0);
    assert_trees_equal(&c.a, &c.b);
    assert_tree_matches_manifest(&c.b);
    struct statedb_applied aa;
    ck_assert_int_eq(statedb_applied_get(c.b.db, &aa), 0);
    ck_assert_uint_eq(aa.index, c.next_index - 1);
    ck_assert_uint_gt(aa.duplicates, 0);
    buf_free(&sa);
    buf_free(&sb);
    cluster_free(&c);
}
END_TEST

/* A PUT of text at path on base, carrying its one chunk. */
static void put_text_op(struct fsm_op *op, const char *path, const char *text, uint64_t base)
{
    size_t n = strlen(text);
    simple_op(op, FSM_OP_PUT, "n1", path, base);
    op->u.put.mode = 0644;
    op->u.put.mtime_ns = 1600000000LL * 1000000000LL;
    op->u.put.size = n;
    op->u.put.n_refs = 1;
    op->u.put.refs = pb_xcalloc(1, sizeof(struct fsm_chunk_ref));
    op->u.put.refs[0].len = (uint32_t)n;
    ck_assert_int_eq(fsm_sha256(text, n, op->u.put.refs[0].id), 0);
    op->u.put.n_data = 1;
    op->u.put.data = pb_xcalloc(1, sizeof(struct fsm_chunk_data));
    memcpy(op->u.put.data[0].id, op->u.put.refs[0].id, FSM_CHUNK_ID_LEN);
    op->u.put.data[0].len = (uint32_t)n;
    op->u.put.data[0].data = pb_xmalloc(n);
    memcpy(op->u.put.data[0].data, text, n);
}

#define BATCH_FILES 70 /* more than one staging group (FSM_TREE_STAGE_MAX) */

/* Applies bufs[0..n) at first.. as one batch; every result is checked. */
static void apply_batch(struct node *nd, struct buf *bufs, size_t n, uint64_t first,
                        struct fsm_apply_result *res)
{
    struct fsm_apply_input in[BATCH_FILES + 1];
    struct pb_error err;
    for (size_t i = 0; i < n; i++)
        in[i] = (struct fsm_apply_input){first + i, 2, 0, 0, bufs[i].data, bufs[i].len};
    ck_assert_msg(fsm_apply_entries(nd->ap, in, n, res, &err) == 0, "%s", err.msg);
    for (size_t i = 0; i < n; i++) {
        ck_assert_int_eq(res[i].status, FSM_APPLY_DONE);
        ck_assert_int_eq(res[i].tree_rc, 0);
    }
}

static char *read_text(const struct node *nd, const char *rel)
{
    char *p = pb_xasprintf("%s/%s", nd->tree_dir, rel);
    FILE *f = fopen(p, "r");
    free(p);
    ck_assert_ptr_nonnull(f);
    char *b = pb_xcalloc(1, 256);
    ck_assert_uint_gt(fread(b, 1, 255, f), 0);
    fclose(f);
    return b;
}

/* Many small files in batches (the staged path: temps, one barrier,
 * renames): a mkdir and the files into it in one batch (the files cannot be
 * staged before their directory exists and are written at their turn),
 * then a batch replacing them all while one of them holds a local edit:
 * that one is skipped as pending and keeps the edit, the others apply,
 * every record matches its file, no temp is left. */
START_TEST(test_batch_many_files_one_pending)
{
    struct node nd;
    node_init(&nd, "S");
    struct buf bufs[BATCH_FILES + 1];
    struct fsm_apply_result res[BATCH_FILES + 1];
    struct fsm_op op;
    char path[32], text[32];
    simple_op(&op, FSM_OP_MKDIR, "n1", "d", 0);
    op.u.mkdir.mode = 0755;
    buf_init(&bufs[0]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[0]), 0);
    fsm_op_free(&op);
    for (int i = 0; i < BATCH_FILES; i++) {
        snprintf(path, sizeof(path), "d/f%02d", i);
        snprintf(text, sizeof(text), "v1 of %02d", i);
        put_text_op(&op, path, text, 0);
        buf_init(&bufs[i + 1]);
        ck_assert_int_eq(fsm_op_encode(&op, &bufs[i + 1]), 0);
        fsm_op_free(&op);
    }
    apply_batch(&nd, bufs, BATCH_FILES + 1, 1, res);
    for (int i = 0; i <= BATCH_FILES; i++) {
        ck_assert_uint_eq(res[i].pending, 0);
        buf_free(&bufs[i]);
    }
    char *c = read_text(&nd, "d/f42");
    ck_assert_str_eq(c, "v1 of 42");
    free(c);

    /* the second batch, with a local edit at d/f03 */
    write_file(nd.tree_dir, "d/f03", "local", 5);
    for (int i = 0; i < BATCH_FILES; i++) {
        snprintf(path, sizeof(path), "d/f%02d", i);
        snprintf(text, sizeof(text), "v2 of %02d", i);
        put_text_op(&op, path, text, version_of(&nd, path));
        buf_init(&bufs[i]);
        ck_assert_int_eq(fsm_op_encode(&op, &bufs[i]), 0);
        fsm_op_free(&op);
    }
    apply_batch(&nd, bufs, BATCH_FILES, BATCH_FILES + 2, res);
    struct fsm_disk disk;
    fsm_apply_bind_disk(nd.ap, &disk);
    for (int i = 0; i < BATCH_FILES; i++) {
        buf_free(&bufs[i]);
        snprintf(path, sizeof(path), "d/f%02d", i);
        snprintf(text, sizeof(text), "v2 of %02d", i);
        ck_assert_uint_eq(res[i].pending, i == 3 ? 1 : 0);
        c = read_text(&nd, path);
        ck_assert_str_eq(c, i == 3 ? "local" : text);
        free(c);
        struct fsm_tree_stat rec, now;
        ck_assert_int_eq(disk.expected(disk.arg, path, &rec), 0);
        ck_assert_int_eq(fsm_tree_lstat(nd.t, path, &now), 0);
        /* the record is what was written; the edit is not recorded */
        ck_assert(fsm_tree_stat_matches(&rec, &now) == (i != 3));
    }
    char *cmd = pb_xasprintf("find '%s' -name '.pickbox.tmp.*' | grep -q .", nd.tree_dir);
    ck_assert_msg(system(cmd) != 0, "temp files left");
    free(cmd);
    node_free(&nd);
}
END_TEST

/* One batch deletes directory d (with its file) and then creates d/y: the
 * temp staged for d/y sits in the old d when d is to be removed, which must
 * not make d look like it holds a local edit. */
START_TEST(test_batch_rmdir_then_recreate)
{
    struct node nd;
    node_init(&nd, "R");
    struct buf bufs[BATCH_FILES + 1];
    struct fsm_apply_result res[BATCH_FILES + 1];
    struct fsm_op op;
    simple_op(&op, FSM_OP_MKDIR, "n1", "d", 0);
    op.u.mkdir.mode = 0755;
    buf_init(&bufs[0]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[0]), 0);
    fsm_op_free(&op);
    put_text_op(&op, "d/x", "x", 0);
    buf_init(&bufs[1]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[1]), 0);
    fsm_op_free(&op);
    apply_batch(&nd, bufs, 2, 1, res);
    buf_free(&bufs[0]);
    buf_free(&bufs[1]);

    simple_op(&op, FSM_OP_DELETE, "n1", "d/x", version_of(&nd, "d/x"));
    buf_init(&bufs[0]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[0]), 0);
    fsm_op_free(&op);
    simple_op(&op, FSM_OP_DELETE, "n1", "d", version_of(&nd, "d"));
    op.u.del.is_dir = true;
    buf_init(&bufs[1]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[1]), 0);
    fsm_op_free(&op);
    simple_op(&op, FSM_OP_MKDIR, "n1", "d", 0);
    op.u.mkdir.mode = 0700;
    buf_init(&bufs[2]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[2]), 0);
    fsm_op_free(&op);
    put_text_op(&op, "d/y", "y", 0);
    buf_init(&bufs[3]);
    ck_assert_int_eq(fsm_op_encode(&op, &bufs[3]), 0);
    fsm_op_free(&op);
    apply_batch(&nd, bufs, 4, 3, res);
    for (int i = 0; i < 4; i++) {
        ck_assert_msg(res[i].pending == 0, "entry %d: %u pending", i, res[i].pending);
        buf_free(&bufs[i]);
    }
    ck_assert(!file_exists(&nd, "d/x"));
    char *c = read_text(&nd, "d/y");
    ck_assert_str_eq(c, "y");
    free(c);
    struct stat st;
    char *d = pb_xasprintf("%s/d", nd.tree_dir);
    ck_assert_int_eq(lstat(d, &st), 0);
    free(d);
    ck_assert_uint_eq(st.st_mode & 0777, 0700); /* the new directory */
    assert_tree_matches_manifest(&nd);
    char *cmd = pb_xasprintf("find '%s' -name '.pickbox.tmp.*' | grep -q .", nd.tree_dir);
    ck_assert_msg(system(cmd) != 0, "temp files left");
    free(cmd);
    node_free(&nd);
}
END_TEST

static Suite *fsm_apply_suite(void)
{
    Suite *s = suite_create("fsm_apply");
    TCase *tc = tcase_create("apply");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_two_nodes_same_log);
    tcase_add_test(tc, test_crash_between_commit_and_materialize);
    tcase_add_test(tc, test_snapshot_install_then_repair);
    tcase_add_test(tc, test_apply_storage_failure);
    tcase_add_test(tc, test_chunk_window_and_bad_bytes);
    tcase_add_test(tc, test_refs_rows_without_bytes);
    tcase_add_test(tc, test_loser_node_with_statedb);
    tcase_add_test(tc, test_batch_many_files_one_pending);
    tcase_add_test(tc, test_batch_rmdir_then_recreate);
    suite_add_tcase(s, tc);
    tc = tcase_create("random");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_random_logs, 0, 20);
    tcase_add_loop_test(tc, test_batched_equals_single, 0, 10);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(fsm_apply_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
