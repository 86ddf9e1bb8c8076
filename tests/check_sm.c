/*
 * check_sm.c: unit tests for the daemon's state machine adapter (sm.c):
 * probes are counted no-ops, fsm ops apply exactly once into state.db and
 * the tree, the applied index survives a reopen, snapshots travel through
 * statedb's stream into another node's state.db and tree, and a tree that
 * lost its marker stops applying until it is back.
 */
#include <config.h>

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/sm.h"
#include "fsm/op.h"
#include "lib/buf.h"
#include "lib/util.h"
#include "raft/raft.h"

static char tmp[64];

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_sm.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
}

static int applied_count;

static void on_applied(void *arg, const struct raft_entry *e)
{
    (void)arg;
    (void)e;
    applied_count++;
}

static struct raft_entry ent(uint64_t index, uint8_t type, uint64_t cid, uint64_t seq)
{
    struct raft_entry e = {.term = 1, .index = index, .client_id = cid, .seq = seq, .type = type};
    return e;
}

/* An encoded MKDIR of path (the caller frees b). */
static struct raft_entry ent_mkdir(uint64_t index, uint64_t cid, uint64_t seq, const char *path,
                                   struct buf *b)
{
    struct fsm_op op;
    fsm_op_init(&op);
    op.type = FSM_OP_MKDIR;
    op.origin = pb_xstrdup("n1");
    op.path = pb_xstrdup(path);
    op.u.mkdir.mode = 0755;
    op.u.mkdir.mtime_ns = 1000000000;
    ck_assert_int_eq(fsm_op_encode(&op, b), 0);
    fsm_op_free(&op);
    struct raft_entry e = ent(index, RAFT_ENTRY_NORMAL, cid, seq);
    e.data = b->data;
    e.len = b->len;
    return e;
}

static char *mkdirs(const char *name)
{
    char *d = pb_xasprintf("%s/%s", tmp, name);
    ck_assert_int_eq(mkdir(d, 0700), 0);
    return d;
}

static bool is_dir(const char *tree, const char *path)
{
    char *p = pb_xasprintf("%s/%s", tree, path);
    struct stat st;
    bool ok = lstat(p, &st) == 0 && S_ISDIR(st.st_mode);
    free(p);
    return ok;
}

START_TEST(test_sm_apply_probes_and_ops)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_ptr_null(sm_tree_error(sm));
    ck_assert_uint_eq(sm_applied(sm), 0);
    struct buf b1 = BUF_INIT, b2 = BUF_INIT;
    static const uint8_t zeros[16];
    struct raft_entry e[] = {
            ent(1, RAFT_ENTRY_CONF, 0, 0),
            ent(2, RAFT_ENTRY_NORMAL, 7, 1), /* probe, empty */
            ent(3, RAFT_ENTRY_NORMAL, 7, 1), /* probe again: a no-op too */
            ent_mkdir(4, 9, 5, "d", &b1),
            ent_mkdir(5, 9, 5, "e", &b2), /* a retry of seq 5: skipped */
            ent(6, RAFT_ENTRY_NOOP, 0, 0),
            ent(7, RAFT_ENTRY_NORMAL, 8, 1), /* probe with zero bytes */
    };
    e[6].data = (uint8_t *)(uintptr_t)zeros;
    e[6].len = sizeof(zeros);
    applied_count = 0;
    ck_assert_int_eq(sm_apply(sm, e, 4, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 3);
    ck_assert_int_eq(sm_apply(sm, e + 4, 3, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 4); /* the duplicate is not reported */
    ck_assert_uint_eq(sm_applied(sm), 7);
    ck_assert_uint_eq(sm_session_seq(sm, 9), 5);
    ck_assert_uint_eq(sm_session_seq(sm, 7), 0); /* probes keep no session */
    ck_assert(is_dir(tree, "d"));
    ck_assert(!is_dir(tree, "e"));
    /* Already applied entries are ignored; a gap is refused. */
    ck_assert_int_eq(sm_apply(sm, e, 7, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 4);
    struct raft_entry gap = ent(9, RAFT_ENTRY_NOOP, 0, 0);
    ck_assert_int_eq(sm_apply(sm, &gap, 1, NULL, NULL, &err), -EINVAL);
    sm_close(sm);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_uint_eq(sm_applied(sm), 7);
    ck_assert_uint_eq(sm_session_seq(sm, 9), 5);
    sm_close(sm);
    buf_free(&b1);
    buf_free(&b2);
    free(state);
    free(tree);
}
END_TEST

START_TEST(test_sm_snapshot)
{
    struct pb_error err;
    char *sa = mkdirs("sa"), *ta = mkdirs("ta"), *sb = mkdirs("sb"), *tb = mkdirs("tb");
    struct sm *a, *b;
    ck_assert_int_eq(sm_open(&a, sa, ta, &err), 0);
    ck_assert_int_eq(sm_open(&b, sb, tb, &err), 0);
    struct buf b1 = BUF_INIT;
    struct raft_entry e[] = {ent(1, RAFT_ENTRY_NOOP, 0, 0), ent_mkdir(2, 6, 3, "x", &b1)};
    ck_assert_int_eq(sm_apply(a, e, 2, NULL, NULL, &err), 0);
    uint64_t size = 0;
    ck_assert_int_eq(sm_snapshot_take(a, 1, &size, &err), 0);
    ck_assert_uint_eq(sm_snapshot_index(a), 2);
    size_t len;
    const uint8_t *data = sm_snapshot_data(a, &len);
    ck_assert_uint_eq(len, size);

    uint8_t *bad = pb_xmalloc(len);
    memcpy(bad, data, len);
    bad[0] ^= 1;
    ck_assert_int_eq(sm_snapshot_install(b, 2, 1, bad, len, &err), -EINVAL);
    ck_assert_int_eq(sm_snapshot_install(b, 3, 1, data, len, &err), -EINVAL); /* wrong index */
    ck_assert_int_lt(sm_snapshot_install(b, 2, 1, data, len - 1, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 0);
    ck_assert(!is_dir(tb, "x"));
    free(bad);

    ck_assert_int_eq(sm_snapshot_install(b, 2, 1, data, len, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 2);
    ck_assert_uint_eq(sm_session_seq(b, 6), 3);
    ck_assert(is_dir(tb, "x"));
    sm_close(b);
    ck_assert_int_eq(sm_open(&b, sb, tb, &err), 0);
    ck_assert_uint_eq(sm_applied(b), 2);
    ck_assert_uint_eq(sm_snapshot_index(b), 2);
    size_t blen;
    const uint8_t *bdata = sm_snapshot_data(b, &blen);
    ck_assert_uint_eq(blen, len);
    ck_assert_int_eq(memcmp(bdata, data, len), 0);
    /* A retried op the snapshot covers stays applied once. */
    struct buf b2 = BUF_INIT;
    struct raft_entry retry = ent_mkdir(3, 6, 3, "y", &b2);
    applied_count = 0;
    ck_assert_int_eq(sm_apply(b, &retry, 1, on_applied, NULL, &err), 0);
    ck_assert_int_eq(applied_count, 0);
    ck_assert(!is_dir(tb, "y"));
    sm_close(a);
    sm_close(b);
    buf_free(&b1);
    buf_free(&b2);
    free(sa);
    free(ta);
    free(sb);
    free(tb);
}
END_TEST

START_TEST(test_sm_tree_lost_marker)
{
    struct pb_error err;
    char *state = mkdirs("state"), *tree = mkdirs("tree");
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    struct buf b1 = BUF_INIT, b2 = BUF_INIT;
    struct raft_entry e1 = ent_mkdir(1, 4, 1, "a", &b1);
    ck_assert_int_eq(sm_apply(sm, &e1, 1, NULL, NULL, &err), 0);
    sm_close(sm);
    /* The tree lost its marker (unmounted, replaced): the node opens,
     * says why, and applies nothing. */
    char *cmd = pb_xasprintf("rm -rf '%s/.pickbox'", tree);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_ptr_nonnull(sm_tree_error(sm));
    ck_assert_ptr_null(sm_tree(sm));
    struct raft_entry e2 = ent_mkdir(2, 4, 2, "b", &b2);
    ck_assert_int_eq(sm_apply(sm, &e2, 1, NULL, NULL, &err), -ENOMEDIUM);
    ck_assert_uint_eq(sm_applied(sm), 1);
    ck_assert(!is_dir(tree, "b"));
    /* The marker is back: it repairs and goes on. */
    char *marker = pb_xasprintf("%s/.pickbox", tree);
    ck_assert_int_eq(mkdir(marker, 0700), 0);
    free(marker);
    ck_assert_int_eq(sm_apply(sm, &e2, 1, NULL, NULL, &err), 0);
    ck_assert_ptr_null(sm_tree_error(sm));
    ck_assert(is_dir(tree, "a"));
    ck_assert(is_dir(tree, "b"));
    sm_close(sm);
    buf_free(&b1);
    buf_free(&b2);
    free(state);
    free(tree);
}
END_TEST

static Suite *sm_suite(void)
{
    Suite *s = suite_create("sm");
    TCase *tc = tcase_create("sm");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_sm_apply_probes_and_ops);
    tcase_add_test(tc, test_sm_snapshot);
    tcase_add_test(tc, test_sm_tree_lost_marker);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sm_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
