/*
 * check_fsm_bigwrite.c: big files written into the tree off the apply
 * (src/fsm/bigwrite.h) and the temp files of the tree they use.
 *
 * One node (state.db, tree, applier) with a background writer whose
 * threshold is lowered to 1000 bytes. The ordering is injected by what the
 * test calls when: a job's file reaches the tree only when the owner
 * completes it (fsm_bigwrite_complete(), settle, drain), so "right after
 * the apply" is observable without timing. Each case checks the tree, the
 * disk records (a repair afterwards finds nothing to do, or does the write
 * a crash or a shutdown left undone) and that no temp file is left.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsm/apply.h"
#include "fsm/bigwrite.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "store/statedb.h"

#define BIG_MIN    1000u
#define BIG_CHUNKS 5u
#define BIG_CHUNK  (64u * 1024u)
#define BIG_LEN    (BIG_CHUNKS * BIG_CHUNK)

struct node {
    char base[64];
    char *tree_dir;
    char *db_path;
    struct statedb *db;
    struct fsm_tree *t;
    struct fsm_apply *ap;
    struct fsm_bigwrite *w;
    struct fsm_disk disk;
    uint64_t next_index;
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
    ck_assert_msg(fsm_bigwrite_new(n->t, n->db_path, BIG_MIN, &n->w, &err) == 0, "%s", err.msg);
    fsm_apply_set_bigwrite(n->ap, n->w);
    fsm_apply_bind_disk(n->ap, &n->disk);
}

/* Stops like the daemon does: the writer first (its temps go). */
static void node_stop(struct node *n)
{
    fsm_apply_set_bigwrite(n->ap, NULL);
    fsm_bigwrite_free(n->w);
    fsm_apply_free(n->ap);
    fsm_tree_close(n->t);
    statedb_close(n->db);
    n->w = NULL;
    n->ap = NULL;
    n->t = NULL;
    n->db = NULL;
}

static void node_init(struct node *n)
{
    snprintf(n->base, sizeof(n->base), "/tmp/check_fsm_bigwrite.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(n->base));
    n->tree_dir = pb_xasprintf("%s/tree", n->base);
    n->db_path = pb_xasprintf("%s/%s", n->base, STATEDB_NAME);
    ck_assert_int_eq(mkdir(n->tree_dir, 0755), 0);
    ck_assert_int_eq(fsm_tree_init(n->tree_dir, NULL), 0);
    n->next_index = 1;
    node_start(n);
}

static void node_free(struct node *n)
{
    node_stop(n);
    nftw(n->base, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(n->tree_dir);
    free(n->db_path);
}

static uint8_t *random_bytes(size_t len, uint64_t seed)
{
    uint8_t *d = pb_xmalloc(len);
    uint64_t x = seed | 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d[i] = (uint8_t)(x >> 29);
    }
    return d;
}

static void simple_op(struct fsm_op *op, enum fsm_op_type t, const char *path, uint64_t base)
{
    fsm_op_init(op);
    op->type = t;
    op->origin = pb_xstrdup("n1");
    op->path = pb_xstrdup(path);
    op->base = base;
}

/* A PUT of content (len bytes, in chunks of at most BIG_CHUNK), carrying
 * its chunks. */
static void put_op(struct fsm_op *op, const char *path, const uint8_t *content, size_t len,
                   uint64_t base)
{
    uint32_t n = (uint32_t)((len + BIG_CHUNK - 1) / BIG_CHUNK);
    simple_op(op, FSM_OP_PUT, path, base);
    op->u.put.mode = 0644;
    op->u.put.mtime_ns = 1600000000LL * 1000000000LL;
    op->u.put.size = len;
    op->u.put.n_refs = op->u.put.n_data = n;
    op->u.put.refs = pb_xcalloc(n, sizeof(struct fsm_chunk_ref));
    op->u.put.data = pb_xcalloc(n, sizeof(struct fsm_chunk_data));
    for (uint32_t i = 0; i < n; i++) {
        size_t off = (size_t)i * BIG_CHUNK, l = PB_MIN((size_t)BIG_CHUNK, len - off);
        op->u.put.refs[i].len = (uint32_t)l;
        ck_assert_int_eq(fsm_sha256(content + off, l, op->u.put.refs[i].id), 0);
        memcpy(op->u.put.data[i].id, op->u.put.refs[i].id, FSM_CHUNK_ID_LEN);
        op->u.put.data[i].len = (uint32_t)l;
        op->u.put.data[i].data = pb_xmalloc(l);
        memcpy(op->u.put.data[i].data, content + off, l);
    }
}

static uint64_t version_of(struct node *n, const char *path)
{
    struct statedb_row r;
    return statedb_row_get(n->db, path, &r, NULL) == 0 && !r.deleted ? r.version : 0;
}

/* Applies ops[0..k) as one batch (one state.db transaction, as sm_apply()
 * does); every entry must apply with the tree following. */
static void apply_ops(struct node *n, struct fsm_op *ops, size_t k)
{
    struct buf b[4];
    struct fsm_apply_input in[4];
    struct fsm_apply_result res[4];
    struct pb_error err;
    ck_assert_uint_le(k, 4);
    fsm_bigwrite_set_index(n->w, n->next_index);
    for (size_t i = 0; i < k; i++) {
        buf_init(&b[i]);
        ck_assert_int_eq(fsm_op_encode(&ops[i], &b[i]), 0);
        in[i] = (struct fsm_apply_input){n->next_index++, 2, 0, 0, b[i].data, b[i].len};
    }
    ck_assert_msg(fsm_apply_entries(n->ap, in, k, res, &err) == 0, "%s", err.msg);
    for (size_t i = 0; i < k; i++) {
        ck_assert_int_eq(res[i].status, FSM_APPLY_DONE);
        ck_assert_int_eq(res[i].tree_rc, 0);
        buf_free(&b[i]);
        fsm_op_free(&ops[i]);
    }
}

static void apply_one(struct node *n, struct fsm_op *op)
{
    apply_ops(n, op, 1);
}

/* Waits (poll with a deadline) until the worker signals, then completes
 * what is done; returns once every job is completed. */
static void complete_all(struct node *n)
{
    uint64_t deadline = pb_now_ms() + 60000;
    while (fsm_bigwrite_count(n->w) > 0) {
        ck_assert_msg(pb_now_ms() < deadline, "the background write did not end");
        struct pollfd p = {.fd = fsm_bigwrite_fd(n->w), .events = POLLIN};
        ck_assert_int_ge(poll(&p, 1, 1000), 0);
        ck_assert_int_eq(statedb_begin(n->db), 0);
        ck_assert_int_ge(fsm_bigwrite_complete(n->w, &n->disk), 0);
        ck_assert_int_eq(statedb_commit(n->db), 0);
    }
}

/* The file's bytes are exactly want (len), or it is absent (want NULL). */
static void assert_file(struct node *n, const char *rel, const uint8_t *want, size_t len)
{
    char *p = pb_xasprintf("%s/%s", n->tree_dir, rel);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    free(p);
    if (want == NULL) {
        ck_assert_msg(fd < 0 && errno == ENOENT, "%s should not exist", rel);
        return;
    }
    ck_assert_msg(fd >= 0, "%s missing", rel);
    uint8_t *got = pb_xmalloc(len + 1);
    size_t have = 0;
    ssize_t r;
    while ((r = read(fd, got + have, len + 1 - have)) > 0)
        have += (size_t)r;
    close(fd);
    ck_assert_uint_eq(have, len);
    ck_assert_msg(memcmp(got, want, len) == 0, "%s: wrong bytes", rel);
    free(got);
}

static unsigned temps_seen;

static int count_temp(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    if (strncmp(p + ftw->base, FSM_TMP_PREFIX, strlen(FSM_TMP_PREFIX)) == 0)
        temps_seen++;
    return 0;
}

static unsigned count_temps(struct node *n)
{
    temps_seen = 0;
    nftw(n->tree_dir, count_temp, 16, FTW_PHYS);
    return temps_seen;
}

/* The record of path describes what the tree holds there. */
static void assert_recorded(struct node *n, const char *rel)
{
    struct fsm_tree_stat rec, now;
    ck_assert_int_eq(n->disk.expected(n->disk.arg, rel, &rec), 0);
    ck_assert_int_eq(fsm_tree_lstat(n->t, rel, &now), 0);
    ck_assert_msg(fsm_tree_stat_matches(&rec, &now), "%s: record differs from the tree", rel);
}

/* A repair finds nothing to do: every record names its manifest row. */
static void assert_nothing_to_repair(struct node *n)
{
    unsigned repaired = 99, pending = 99;
    ck_assert_int_eq(fsm_apply_repair(n->ap, &repaired, &pending), 0);
    ck_assert_uint_eq(repaired, 0);
    ck_assert_uint_eq(pending, 0);
}

static void mkdir_op(struct node *n, const char *path)
{
    struct fsm_op op;
    simple_op(&op, FSM_OP_MKDIR, path, 0);
    op.u.mkdir.mode = 0755;
    op.u.mkdir.mtime_ns = 1600000000LL * 1000000000LL;
    apply_one(n, &op);
}

/* ---- cases ---------------------------------------------------------------- */

/* A big PUT is committed but its file reaches the tree only when the owner
 * completes the job; a small PUT of the same batch is written at once.
 * The oldest job's index is what sync may count as materialized. */
START_TEST(test_bigwrite_completes_on_owner)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 1);
    struct fsm_op ops[2];
    put_op(&ops[0], "big", big, BIG_LEN, 0);
    put_op(&ops[1], "small", (const uint8_t *)"tiny", 4, 0);
    apply_ops(&n, ops, 2);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 1);
    ck_assert_uint_eq(fsm_bigwrite_oldest(n.w), 1);
    assert_file(&n, "small", (const uint8_t *)"tiny", 4);
    assert_file(&n, "big", NULL, 0); /* not before the owner completes it */
    complete_all(&n);
    ck_assert_uint_eq(fsm_bigwrite_oldest(n.w), 0);
    assert_file(&n, "big", big, BIG_LEN);
    assert_recorded(&n, "big");
    struct fsm_bigwrite_stats st;
    fsm_bigwrite_take_stats(n.w, &st);
    ck_assert_uint_eq(st.written, 1);
    ck_assert_uint_eq(st.dropped + st.pending + st.failed + st.nodata, 0);
    ck_assert_uint_eq(count_temps(&n), 0);
    assert_nothing_to_repair(&n);
    /* a second version replaces the first the same way */
    uint8_t *big2 = random_bytes(BIG_LEN - 7, 2);
    put_op(&ops[0], "big", big2, BIG_LEN - 7, version_of(&n, "big"));
    apply_one(&n, &ops[0]);
    assert_file(&n, "big", big, BIG_LEN);
    complete_all(&n);
    assert_file(&n, "big", big2, BIG_LEN - 7);
    assert_recorded(&n, "big");
    assert_nothing_to_repair(&n);
    free(big);
    free(big2);
    node_free(&n);
}
END_TEST

/* A rename of the file, or of its directory, committed while the job runs
 * (in the same batch or the next one) waits for it: the file arrives at
 * the new name, and its record says so (nothing to repair). */
START_TEST(test_bigwrite_rename_waits)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 3);
    struct fsm_op ops[2];
    /* the next batch */
    put_op(&ops[0], "big", big, BIG_LEN, 0);
    apply_one(&n, &ops[0]);
    simple_op(&ops[0], FSM_OP_RENAME, "big", version_of(&n, "big"));
    ops[0].u.rename.to = pb_xstrdup("moved");
    apply_one(&n, &ops[0]);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 0);
    assert_file(&n, "big", NULL, 0);
    assert_file(&n, "moved", big, BIG_LEN);
    assert_recorded(&n, "moved");
    assert_nothing_to_repair(&n);
    /* the same batch, a directory rename */
    mkdir_op(&n, "d");
    put_op(&ops[0], "d/big", big, BIG_LEN, 0);
    simple_op(&ops[1], FSM_OP_RENAME, "d", version_of(&n, "d"));
    ops[1].u.rename.to = pb_xstrdup("e");
    apply_ops(&n, ops, 2);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 0);
    assert_file(&n, "d/big", NULL, 0);
    assert_file(&n, "e/big", big, BIG_LEN);
    assert_recorded(&n, "e/big");
    assert_nothing_to_repair(&n);
    ck_assert_uint_eq(count_temps(&n), 0);
    free(big);
    node_free(&n);
}
END_TEST

/* A delete of the file or of its directory, or a newer PUT of it, drops
 * the job: its temp goes, the op applies to what the tree held before. */
START_TEST(test_bigwrite_delete_and_overwrite_drop)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 4), *big2 = random_bytes(BIG_LEN, 5);
    struct fsm_op ops[2];
    /* an old small version, then a big one, then a delete */
    put_op(&ops[0], "f", (const uint8_t *)"old", 3, 0);
    apply_one(&n, &ops[0]);
    put_op(&ops[0], "f", big, BIG_LEN, version_of(&n, "f"));
    apply_one(&n, &ops[0]);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 1);
    assert_file(&n, "f", (const uint8_t *)"old", 3);
    simple_op(&ops[0], FSM_OP_DELETE, "f", version_of(&n, "f"));
    apply_one(&n, &ops[0]);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 0);
    assert_file(&n, "f", NULL, 0);
    /* two big versions in one batch: only the second is written */
    put_op(&ops[0], "g", big, BIG_LEN, 0);
    put_op(&ops[1], "g", big2, BIG_LEN, 0);
    ops[1].base = n.next_index; /* the first one's index: no conflict */
    apply_ops(&n, ops, 2);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 1);
    complete_all(&n);
    assert_file(&n, "g", big2, BIG_LEN);
    assert_recorded(&n, "g");
    /* a directory emptied and deleted while a file in it is being written
     * (its temp would keep the directory from being removed) */
    mkdir_op(&n, "d");
    put_op(&ops[0], "d/x", big, BIG_LEN, 0);
    apply_one(&n, &ops[0]);
    simple_op(&ops[0], FSM_OP_DELETE, "d/x", version_of(&n, "d/x"));
    simple_op(&ops[1], FSM_OP_DELETE, "d", version_of(&n, "d"));
    ops[1].u.del.is_dir = true;
    apply_ops(&n, ops, 2);
    assert_file(&n, "d", NULL, 0);
    struct fsm_bigwrite_stats st;
    fsm_bigwrite_take_stats(n.w, &st);
    ck_assert_uint_eq(st.dropped, 3);
    ck_assert_uint_eq(st.written, 1);
    ck_assert_uint_eq(count_temps(&n), 0);
    assert_nothing_to_repair(&n);
    free(big);
    free(big2);
    node_free(&n);
}
END_TEST

/* A local edit made while the job runs survives: the check at rename time
 * sees it, the temp is dropped, the record stays what it was. */
START_TEST(test_bigwrite_local_edit_survives)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 6);
    struct fsm_op op;
    put_op(&op, "f", big, BIG_LEN, 0);
    apply_one(&n, &op);
    char *p = pb_xasprintf("%s/f", n.tree_dir);
    FILE *f = fopen(p, "w");
    free(p);
    ck_assert_ptr_nonnull(f);
    fputs("mine", f);
    fclose(f);
    complete_all(&n);
    assert_file(&n, "f", (const uint8_t *)"mine", 4);
    struct fsm_bigwrite_stats st;
    fsm_bigwrite_take_stats(n.w, &st);
    ck_assert_uint_eq(st.pending, 1);
    ck_assert_uint_eq(st.written, 0);
    struct fsm_tree_stat rec;
    ck_assert_int_eq(n.disk.expected(n.disk.arg, "f", &rec), 0);
    ck_assert_int_eq(rec.kind, FSM_KIND_NONE);
    ck_assert_uint_eq(count_temps(&n), 0);
    free(big);
    node_free(&n);
}
END_TEST

/* A setattr waits for the job and applies to the new file. */
START_TEST(test_bigwrite_setattr_waits)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 7);
    struct fsm_op op;
    put_op(&op, "f", big, BIG_LEN, 0);
    apply_one(&n, &op);
    simple_op(&op, FSM_OP_SETATTR, "f", version_of(&n, "f"));
    op.u.setattr.fields = FSM_ATTR_MODE;
    op.u.setattr.mode = 0600;
    apply_one(&n, &op);
    ck_assert_uint_eq(fsm_bigwrite_count(n.w), 0);
    assert_file(&n, "f", big, BIG_LEN);
    struct fsm_tree_stat now;
    ck_assert_int_eq(fsm_tree_lstat(n.t, "f", &now), 0);
    ck_assert_uint_eq(now.mode & 0777, 0600);
    assert_recorded(&n, "f");
    assert_nothing_to_repair(&n);
    free(big);
    node_free(&n);
}
END_TEST

/* A stop (SIGTERM) or a crash while the job runs: the tree keeps the old
 * file, a crash's temp is removed at the next open, and the startup repair
 * writes the file. */
START_TEST(test_bigwrite_stop_and_crash_then_repair)
{
    struct node n;
    node_init(&n);
    uint8_t *big = random_bytes(BIG_LEN, 8);
    struct fsm_op op;
    put_op(&op, "f", (const uint8_t *)"old", 3, 0);
    apply_one(&n, &op);
    put_op(&op, "f", big, BIG_LEN, version_of(&n, "f"));
    apply_one(&n, &op);
    put_op(&op, "g", big, BIG_LEN, 0);
    apply_one(&n, &op);
    node_stop(&n); /* the shutdown: jobs dropped, temps removed */
    ck_assert_uint_eq(count_temps(&n), 0);
    assert_file(&n, "f", (const uint8_t *)"old", 3);
    assert_file(&n, "g", NULL, 0);
    /* what a kill -9 in the middle of the write leaves: a partial temp */
    char *p = pb_xasprintf("%s/%s0123456789abcdef", n.tree_dir, FSM_TMP_PREFIX);
    FILE *f = fopen(p, "w");
    free(p);
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(big, 1, BIG_LEN / 2, f), BIG_LEN / 2);
    fclose(f);
    node_start(&n);
    ck_assert_uint_eq(count_temps(&n), 0);
    unsigned repaired = 0, pending = 0;
    ck_assert_int_eq(fsm_apply_repair(n.ap, &repaired, &pending), 0);
    ck_assert_uint_eq(repaired, 2);
    ck_assert_uint_eq(pending, 0);
    assert_file(&n, "f", big, BIG_LEN);
    assert_file(&n, "g", big, BIG_LEN);
    assert_recorded(&n, "f");
    assert_nothing_to_repair(&n);
    free(big);
    node_free(&n);
}
END_TEST

static int fill_text(void *arg, int fd)
{
    const char *s = arg;
    return write(fd, s, strlen(s)) == (ssize_t)strlen(s) ? 0 : -EIO;
}

/* The tree's temp files: a temp is renamed only into the directory it was
 * made in, and only over what was expected; every failure removes it. */
START_TEST(test_tree_temp_commit_checks)
{
    struct node n;
    node_init(&n);
    mkdir_op(&n, "d");
    struct fsm_tree_stat none = {.kind = FSM_KIND_NONE}, out;
    struct fsm_tree_temp *tp = NULL;
    char one[] = "one", two[] = "two", three[] = "three", four[] = "four";
    ck_assert_int_eq(fsm_tree_temp_write(n.t, "d/a", 0640, 0, fill_text, one, &tp), 0);
    ck_assert_uint_eq(count_temps(&n), 1);
    ck_assert_int_eq(fsm_tree_temp_commit(n.t, tp, "d/a", &none, &out), 0);
    assert_file(&n, "d/a", (const uint8_t *)"one", 3);
    ck_assert_uint_eq(out.mode & 0777, 0640);
    /* a local edit at the target */
    ck_assert_int_eq(fsm_tree_temp_write(n.t, "d/a", 0640, 0, fill_text, two, &tp), 0);
    ck_assert_int_eq(fsm_tree_temp_commit(n.t, tp, "d/a", &none, NULL), -FSM_TREE_EPENDING);
    assert_file(&n, "d/a", (const uint8_t *)"one", 3);
    /* the parent moved away and was made anew */
    ck_assert_int_eq(fsm_tree_temp_write(n.t, "d/b", 0640, 0, fill_text, three, &tp), 0);
    char *from = pb_xasprintf("%s/d", n.tree_dir), *to = pb_xasprintf("%s/e", n.tree_dir);
    ck_assert_int_eq(rename(from, to), 0);
    ck_assert_int_eq(mkdir(from, 0755), 0);
    ck_assert_int_eq(fsm_tree_temp_commit(n.t, tp, "d/b", &none, NULL), -EAGAIN);
    assert_file(&n, "d/b", NULL, 0);
    /* a missing parent, and a discarded temp */
    ck_assert_int_eq(fsm_tree_temp_write(n.t, "nodir/x", 0640, 0, fill_text, one, &tp), -ENOENT);
    ck_assert_ptr_null(tp);
    ck_assert_int_eq(fsm_tree_temp_write(n.t, "d/c", 0640, 0, fill_text, four, &tp), 0);
    fsm_tree_temp_discard(tp);
    ck_assert_uint_eq(count_temps(&n), 0);
    free(from);
    free(to);
    node_free(&n);
}
END_TEST

static Suite *bigwrite_suite(void)
{
    Suite *s = suite_create("fsm_bigwrite");
    TCase *tc = tcase_create("bigwrite");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_bigwrite_completes_on_owner);
    tcase_add_test(tc, test_bigwrite_rename_waits);
    tcase_add_test(tc, test_bigwrite_delete_and_overwrite_drop);
    tcase_add_test(tc, test_bigwrite_local_edit_survives);
    tcase_add_test(tc, test_bigwrite_setattr_waits);
    tcase_add_test(tc, test_bigwrite_stop_and_crash_then_repair);
    tcase_add_test(tc, test_tree_temp_commit_checks);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(bigwrite_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
