/*
 * check_sm_powerloss.c: state.db after a simulated power loss (doc/decisions.md
 * D8). Apply batches without fsm ops commit lazily (synchronous = NORMAL), so
 * a power loss may roll state.db back to an earlier applied index; the
 * cluster then applies the same entries again from raft.db's log. These tests
 * keep a copy of state.db's files at applied index X (what the disk held at
 * the last durable commit), apply more, put the copy back as a power loss
 * would, reopen and re-apply: the index, the counters, the session table and
 * the tree must end exactly as without the rollback, with no conflict copy.
 * The second test rolls back even over entries whose effects are already in
 * the tree (which lazy commits never allow: batches with ops stay durable) to
 * show that re-applying them is harmless too.
 */
#include <config.h>

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
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
#include "store/statedb.h"

#define CLIENT 9 /* the client id of every op here */

static char tmp[64];
static char *state, *tree, *saved;

static void setup(void)
{
    snprintf(tmp, sizeof(tmp), "/tmp/check_sm_pl.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmp));
    state = pb_xasprintf("%s/state", tmp);
    tree = pb_xasprintf("%s/tree", tmp);
    saved = pb_xasprintf("%s/saved", tmp);
    ck_assert_int_eq(mkdir(state, 0700), 0);
    ck_assert_int_eq(mkdir(tree, 0700), 0);
    ck_assert_int_eq(mkdir(saved, 0700), 0);
}

static void teardown(void)
{
    char *cmd = pb_xasprintf("rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    free(state);
    free(tree);
    free(saved);
}

/* ---- entries ---- */

/* An entry list that owns the encodings. */
struct log {
    struct raft_entry e[64];
    struct buf b[64];
    size_t n;
};

static void log_free(struct log *l)
{
    for (size_t i = 0; i < l->n; i++)
        buf_free(&l->b[i]);
    l->n = 0;
}

static struct raft_entry *log_add(struct log *l, uint8_t type, uint64_t cid, uint64_t seq)
{
    ck_assert_uint_lt(l->n, PB_ARRAY_SIZE(l->e));
    struct raft_entry *e = &l->e[l->n];
    memset(e, 0, sizeof(*e));
    buf_init(&l->b[l->n]);
    e->term = 1;
    e->index = l->n + 1;
    e->type = type;
    e->client_id = cid;
    e->seq = seq;
    l->n++;
    return e;
}

static void log_probe(struct log *l, uint64_t cid, uint64_t seq)
{
    log_add(l, RAFT_ENTRY_NORMAL, cid, seq);
}

/* Adds op (consumed) as CLIENT's entry seq. */
static void log_op(struct log *l, struct fsm_op *op, uint64_t seq)
{
    struct raft_entry *e = log_add(l, RAFT_ENTRY_NORMAL, CLIENT, seq);
    struct buf *b = &l->b[l->n - 1];
    ck_assert_int_eq(fsm_op_encode(op, b), 0);
    fsm_op_free(op);
    e->data = b->data;
    e->len = b->len;
}

static void op_start(struct fsm_op *op, enum fsm_op_type t, const char *path, uint64_t base)
{
    fsm_op_init(op);
    op->type = t;
    op->origin = pb_xstrdup("n1");
    op->path = pb_xstrdup(path);
    op->base = base;
}

static void log_put(struct log *l, uint64_t seq, const char *path, uint64_t base, const char *text)
{
    struct fsm_op op;
    op_start(&op, FSM_OP_PUT, path, base);
    size_t n = strlen(text);
    op.u.put.mode = 0644;
    op.u.put.mtime_ns = 1500000000LL * 1000000000LL;
    op.u.put.size = n;
    op.u.put.n_refs = 1;
    op.u.put.refs = pb_xcalloc(1, sizeof(*op.u.put.refs));
    op.u.put.refs[0].len = (uint32_t)n;
    ck_assert_int_eq(fsm_sha256(text, n, op.u.put.refs[0].id), 0);
    op.u.put.n_data = 1;
    op.u.put.data = pb_xcalloc(1, sizeof(*op.u.put.data));
    memcpy(op.u.put.data[0].id, op.u.put.refs[0].id, FSM_CHUNK_ID_LEN);
    op.u.put.data[0].len = (uint32_t)n;
    op.u.put.data[0].data = pb_xmalloc(n);
    memcpy(op.u.put.data[0].data, text, n);
    log_op(l, &op, seq);
}

static void log_mkdir(struct log *l, uint64_t seq, const char *path)
{
    struct fsm_op op;
    op_start(&op, FSM_OP_MKDIR, path, 0);
    op.u.mkdir.mode = 0755;
    op.u.mkdir.mtime_ns = 1000000000;
    log_op(l, &op, seq);
}

static void log_symlink(struct log *l, uint64_t seq, const char *path, const char *target)
{
    struct fsm_op op;
    op_start(&op, FSM_OP_SYMLINK, path, 0);
    op.u.symlink.target = pb_xstrdup(target);
    op.u.symlink.mtime_ns = 2000000000;
    log_op(l, &op, seq);
}

static void log_rename(struct log *l, uint64_t seq, const char *from, uint64_t base, const char *to)
{
    struct fsm_op op;
    op_start(&op, FSM_OP_RENAME, from, base);
    op.u.rename.to = pb_xstrdup(to);
    log_op(l, &op, seq);
}

static void log_delete(struct log *l, uint64_t seq, const char *path, uint64_t base)
{
    struct fsm_op op;
    op_start(&op, FSM_OP_DELETE, path, base);
    log_op(l, &op, seq);
}

/* Applies entries [from, to) of l the way the driver does: a run of probes
 * (no fsm op) in one batch, each op in a batch of its own. */
static void apply_range(struct sm *sm, const struct log *l, size_t from, size_t to)
{
    struct pb_error err;
    size_t i = from;
    while (i < to) {
        size_t j = i + 1;
        bool op = l->e[i].len > 0;
        while (!op && j < to && l->e[j].len == 0)
            j++;
        ck_assert_msg(sm_apply(sm, &l->e[i], j - i, NULL, NULL, &err) == 0, "apply %zu: %s", i,
                      err.msg);
        i = j;
    }
    ck_assert_uint_eq(sm_applied(sm), to);
}

/* ---- what must converge ---- */

static int dump_row(void *arg, const char *path, const struct statedb_row *r)
{
    struct buf *b = arg;
    char line[512];
    int n = snprintf(line, sizeof(line),
                     "row %s kind=%u del=%d v=%" PRIu64 " cv=%" PRIu64 " mode=%o size=%" PRIu64
                     " mtime=%" PRId64 " origin=%s content=",
                     path, r->kind, r->deleted, r->version, r->content_version, r->mode, r->size,
                     r->mtime_ns, r->origin);
    buf_put(b, line, (size_t)n);
    for (int i = 0; i < STATEDB_ID_LEN; i++) {
        n = snprintf(line, sizeof(line), "%02x", r->content[i]);
        buf_put(b, line, (size_t)n);
    }
    buf_put(b, "\n", 1);
    return 0;
}

static int no_dot(const struct dirent *d)
{
    return strcmp(d->d_name, ".") != 0 && strcmp(d->d_name, "..") != 0 &&
           strcmp(d->d_name, ".pickbox") != 0;
}

static void dump_tree(struct buf *b, const char *root, const char *rel)
{
    char *dir = pb_xasprintf("%s%s%s", root, rel[0] ? "/" : "", rel);
    struct dirent **names;
    int n = scandir(dir, &names, no_dot, alphasort);
    ck_assert_int_ge(n, 0);
    for (int i = 0; i < n; i++) {
        char *r = pb_xasprintf("%s%s%s", rel, rel[0] ? "/" : "", names[i]->d_name);
        char *p = pb_xasprintf("%s/%s", root, r);
        struct stat st;
        ck_assert_int_eq(lstat(p, &st), 0);
        char line[600];
        int m;
        if (S_ISDIR(st.st_mode)) {
            m = snprintf(line, sizeof(line), "dir %s mode=%o\n", r, st.st_mode & 07777);
            buf_put(b, line, (size_t)m);
            dump_tree(b, root, r);
        } else if (S_ISLNK(st.st_mode)) {
            char t[256];
            ssize_t k = readlink(p, t, sizeof(t) - 1);
            ck_assert_int_ge(k, 0);
            t[k] = '\0';
            m = snprintf(line, sizeof(line), "link %s -> %s\n", r, t);
            buf_put(b, line, (size_t)m);
        } else {
            char c[256];
            int fd = open(p, O_RDONLY | O_CLOEXEC);
            ck_assert_int_ge(fd, 0);
            ssize_t k = read(fd, c, sizeof(c) - 1);
            close(fd);
            ck_assert_int_ge(k, 0);
            c[k] = '\0';
            m = snprintf(line, sizeof(line), "file %s mode=%o mtime=%lld '%s'\n", r,
                         st.st_mode & 07777, (long long)st.st_mtim.tv_sec, c);
            buf_put(b, line, (size_t)m);
        }
        free(p);
        free(r);
        free(names[i]);
    }
    free(names);
    free(dir);
}

/* Everything replicated (index, counters, sessions) and the tree, as text. */
static char *dump(struct sm *sm)
{
    struct buf b = BUF_INIT;
    struct statedb_applied a;
    ck_assert_int_eq(statedb_applied_get(sm_statedb(sm), &a), 0);
    char line[256];
    int n = snprintf(line, sizeof(line),
                     "applied %" PRIu64 " term %" PRIu64 " malformed %" PRIu64 " conflicts %" PRIu64
                     " duplicates %" PRIu64 " session %" PRIu64 "\n",
                     a.index, a.term, a.malformed, a.conflicts, a.duplicates,
                     sm_session_seq(sm, CLIENT));
    buf_put(&b, line, (size_t)n);
    ck_assert_int_eq(statedb_row_foreach(sm_statedb(sm), dump_row, &b), 0);
    dump_tree(&b, tree, "");
    buf_put(&b, "", 1);
    size_t len;
    return (char *)buf_steal(&b, &len);
}

/* ---- the power loss ---- */

static void copy_file(const char *from, const char *to)
{
    unlink(to);
    int in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        ck_assert_int_eq(errno, ENOENT);
        return; /* nothing there: nothing there after the copy either */
    }
    int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_int_ge(out, 0);
    char b[65536];
    ssize_t n;
    while ((n = read(in, b, sizeof(b))) > 0)
        ck_assert_int_eq(write(out, b, (size_t)n), n);
    ck_assert_int_eq(n, 0);
    close(in);
    close(out);
}

static const char *const db_files[] = {SM_DB_NAME, SM_DB_NAME "-wal"};

/* What the disk holds of state.db now (taken between transactions of the
 * only writer, so the files are consistent). */
static void save_statedb(void)
{
    for (size_t i = 0; i < PB_ARRAY_SIZE(db_files); i++) {
        char *from = pb_xasprintf("%s/%s", state, db_files[i]);
        char *to = pb_xasprintf("%s/%s", saved, db_files[i]);
        copy_file(from, to);
        free(from);
        free(to);
    }
}

/* The power loss: state.db goes back to the saved files (the tree, whose
 * files were fsynced as they were written, stays); the shared-memory index
 * does not survive a reboot. */
static void restore_statedb(void)
{
    for (size_t i = 0; i < PB_ARRAY_SIZE(db_files); i++) {
        char *from = pb_xasprintf("%s/%s", saved, db_files[i]);
        char *to = pb_xasprintf("%s/%s", state, db_files[i]);
        copy_file(from, to);
        free(from);
        free(to);
    }
    char *shm = pb_xasprintf("%s/%s-shm", state, SM_DB_NAME);
    unlink(shm);
    free(shm);
}

/* No conflict copy anywhere (tree or index). */
static void assert_no_conflict(const char *d)
{
    ck_assert_msg(strstr(d, "pickbox-conflict") == NULL, "conflict copy:\n%s", d);
}

/* The realistic case: only lazily committed batches (probes, NOOP and CONF
 * entries) are lost; the ops before them were committed durably. */
START_TEST(test_powerloss_lazy_batches)
{
    struct pb_error err;
    struct log l = {.n = 0};
    log_put(&l, 1, "a", 0, "hello");
    log_mkdir(&l, 2, "d");
    log_symlink(&l, 3, "d/l", "../a");
    size_t x = l.n;
    for (uint64_t s = 1; s <= 8; s++)
        log_probe(&l, 7, s);
    log_add(&l, RAFT_ENTRY_NOOP, 0, 0);
    log_add(&l, RAFT_ENTRY_CONF, 0, 0);
    log_probe(&l, 7, 9);

    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    apply_range(sm, &l, 0, x);
    save_statedb();
    apply_range(sm, &l, x, l.n);
    char *want = dump(sm);
    sm_close(sm);

    restore_statedb();
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_uint_eq(sm_applied(sm), x); /* the lazy batches are gone */
    apply_range(sm, &l, x, l.n);          /* raft.db's log has them */
    char *got = dump(sm);
    ck_assert_str_eq(got, want);
    assert_no_conflict(got);
    sm_close(sm);
    free(got);
    free(want);
    log_free(&l);
}
END_TEST

/* Rolled back over entries whose effects are already in the tree: their
 * files, a rename, a delete and a retried op (exactly-once) are applied again
 * and everything converges, with no conflict copy and nothing lost. */
START_TEST(test_powerloss_over_tree_effects)
{
    struct pb_error err;
    struct log l = {.n = 0};
    log_put(&l, 1, "a", 0, "hello");      /* 1 */
    log_mkdir(&l, 2, "d");                /* 2 */
    log_put(&l, 3, "d/gone", 0, "bye");   /* 3 */
    log_symlink(&l, 4, "l", "a");         /* 4 */
    size_t x = l.n;                       /* state.db saved here */
    log_probe(&l, 7, 1);                  /* 5 */
    log_put(&l, 5, "a", 1, "world");      /* 6: sequential edit */
    log_put(&l, 6, "d/f", 0, "new file"); /* 7 */
    log_rename(&l, 7, "l", 4, "m");       /* 8 */
    log_delete(&l, 8, "d/gone", 3);       /* 9 */
    log_put(&l, 2, "retry", 0, "never");  /* 10: an old seq again */
    log_put(&l, 6, "d/f", 0, "retried");  /* 11: a retry after X */
    log_probe(&l, 7, 2);                  /* 12 */
    log_put(&l, 9, "b", 0, "last");       /* 13 */

    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    apply_range(sm, &l, 0, x);
    save_statedb();
    apply_range(sm, &l, x, l.n);
    char *want = dump(sm);
    ck_assert_ptr_nonnull(strstr(want, "file a mode=644 mtime=1500000000 'world'"));
    ck_assert_ptr_nonnull(strstr(want, "file d/f mode=644 mtime=1500000000 'new file'"));
    ck_assert_ptr_nonnull(strstr(want, "link m -> a"));
    ck_assert_ptr_null(strstr(want, "file d/gone"));
    ck_assert_ptr_null(strstr(want, "retry"));
    ck_assert_ptr_nonnull(strstr(want, "duplicates 2 session 9"));
    sm_close(sm);

    restore_statedb();
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    ck_assert_uint_eq(sm_applied(sm), x);
    apply_range(sm, &l, x, l.n);
    ck_assert_int_eq(sm_repair(sm), 0); /* what the driver runs after a restart */
    char *got = dump(sm);
    ck_assert_str_eq(got, want);
    assert_no_conflict(got);
    sm_close(sm);

    /* and once more from scratch: a reopen finds the same */
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    free(got);
    got = dump(sm);
    ck_assert_str_eq(got, want);
    sm_close(sm);
    free(got);
    free(want);
    log_free(&l);
}
END_TEST

/* Which commits are lazy: batches without ops are; a batch with an op is
 * durable (and makes the lazy ones before it durable); a snapshot, which lets
 * raft.db's log be compacted, and closing sync first. */
START_TEST(test_lazy_only_without_ops)
{
    struct pb_error err;
    struct log l = {.n = 0};
    log_probe(&l, 7, 1);                 /* 1 */
    log_add(&l, RAFT_ENTRY_NOOP, 0, 0);  /* 2 */
    log_mkdir(&l, 1, "d");               /* 3 */
    log_probe(&l, 7, 2);                 /* 4 */
    log_add(&l, RAFT_ENTRY_CONF, 0, 0);  /* 5 */
    log_put(&l, 1, "dup", 0, "skipped"); /* 6: a duplicate op */
    log_probe(&l, 7, 3);                 /* 7 */
    struct sm *sm;
    ck_assert_int_eq(sm_open(&sm, state, tree, &err), 0);
    struct statedb *db = sm_statedb(sm);
    ck_assert(!statedb_lazy_pending(db));
    apply_range(sm, &l, 0, 2);
    ck_assert(statedb_lazy_pending(db));
    apply_range(sm, &l, 2, 3);
    ck_assert(!statedb_lazy_pending(db));
    apply_range(sm, &l, 3, 5);
    ck_assert(statedb_lazy_pending(db));
    apply_range(sm, &l, 5, 6); /* ops, even skipped ones, stay durable */
    ck_assert(!statedb_lazy_pending(db));
    apply_range(sm, &l, 6, 7);
    ck_assert(statedb_lazy_pending(db));
    uint64_t size = 0;
    ck_assert_int_eq(sm_snapshot_take(sm, 1, &size, &err), 0);
    ck_assert_uint_eq(sm_snapshot_index(sm), 7);
    ck_assert(!statedb_lazy_pending(db));
    ck_assert_int_eq(statedb_sync(db), 0); /* nothing to do */
    log_probe(&l, 7, 4);
    apply_range(sm, &l, 7, 8);
    ck_assert(statedb_lazy_pending(db));
    ck_assert_int_eq(statedb_sync(db), 0);
    ck_assert(!statedb_lazy_pending(db));
    /* the barrier leaves the replicated state as it was */
    struct statedb_applied a;
    ck_assert_int_eq(statedb_applied_get(db, &a), 0);
    ck_assert_uint_eq(a.index, 8);
    ck_assert_uint_eq(a.term, 1);
    ck_assert_uint_eq(a.duplicates, 1);
    sm_close(sm);
    log_free(&l);
}
END_TEST

static Suite *sm_powerloss_suite(void)
{
    Suite *s = suite_create("sm_powerloss");
    TCase *tc = tcase_create("powerloss");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_powerloss_lazy_batches);
    tcase_add_test(tc, test_powerloss_over_tree_effects);
    tcase_add_test(tc, test_lazy_only_without_ops);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sm_powerloss_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
