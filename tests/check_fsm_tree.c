/*
 * check_fsm_tree.c: unit tests for src/fsm/tree (safe tree I/O): escapes via
 * "..", absolute paths and real symlinks; atomic replace seen as old-or-new by
 * a concurrent reader; pending-local-edit detection; the root marker; temp
 * file cleanup.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fsm/tree.h"
#include "lib/util.h"

static char base_dir[256]; /* private temp dir of one test */
static char root[300];     /* the tree: base/tree */
static char outside[300];  /* a directory next to the tree: base/outside */

static int rm_one(const char *p, const struct stat *s, int flag, struct FTW *f)
{
    (void)s;
    (void)flag;
    (void)f;
    return remove(p);
}

static void setup(void)
{
    snprintf(base_dir, sizeof(base_dir), "/tmp/check_fsm_tree.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(base_dir));
    snprintf(root, sizeof(root), "%s/tree", base_dir);
    snprintf(outside, sizeof(outside), "%s/outside", base_dir);
    ck_assert_int_eq(mkdir(root, 0755), 0);
    ck_assert_int_eq(mkdir(outside, 0755), 0);
}

static void teardown(void)
{
    nftw(base_dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static char *at(const char *dir, const char *rel)
{
    return pb_xasprintf("%s/%s", dir, rel);
}

static void write_file(const char *dir, const char *rel, const char *text)
{
    char *p = at(dir, rel);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    free(p);
}

static char *read_file(const char *dir, const char *rel)
{
    char *p = at(dir, rel);
    FILE *f = fopen(p, "r");
    free(p);
    if (f == NULL)
        return NULL;
    char *buf = pb_xcalloc(1, 4096);
    size_t n = fread(buf, 1, 4095, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static bool exists(const char *dir, const char *rel)
{
    char *p = at(dir, rel);
    struct stat s;
    bool r = lstat(p, &s) == 0;
    free(p);
    return r;
}

struct text {
    const char *s;
    size_t len;
};

static int fill_text(void *arg, int fd)
{
    const struct text *t = arg;
    return write(fd, t->s, t->len) == (ssize_t)t->len ? 0 : -EIO;
}

static int fill_fail(void *arg, int fd)
{
    (void)arg;
    (void)write(fd, "partial", 7);
    return -ENOSPC;
}

static const struct fsm_tree_stat NONE = {.kind = FSM_KIND_NONE};

static struct fsm_tree *open_tree(void)
{
    struct fsm_tree *t = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(fsm_tree_init(root, &err), 0);
    ck_assert_msg(fsm_tree_open(root, &t, &err) == 0, "%s", err.msg);
    return t;
}

static void put_text(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                     const char *s, int want, struct fsm_tree_stat *out)
{
    struct text tx = {s, strlen(s)};
    int rc = fsm_tree_put(t, path, expect, 0640, 1000000000LL * 1600000000 + 123, fill_text, &tx,
                          out);
    ck_assert_msg(rc == want, "put %s: rc %d want %d", path, rc, want);
}

/* No temp file may be left next to the entries of dir. */
static void assert_no_temps(const char *dir)
{
    char *cmd = pb_xasprintf("find '%s' -name '.pickbox.tmp.*' | grep -q .", dir);
    ck_assert_msg(system(cmd) != 0, "temp files left in %s", dir);
    free(cmd);
}

/* ---- marker -------------------------------------------------------------- */

START_TEST(test_tree_marker_required)
{
    struct fsm_tree *t = (struct fsm_tree *)1;
    struct pb_error err;
    pb_error_clear(&err);
    ck_assert_int_eq(fsm_tree_open(root, &t, &err), -FSM_TREE_ENOMARKER);
    ck_assert_ptr_null(t);
    ck_assert_ptr_nonnull(strstr(err.msg, ".pickbox"));

    /* a file named .pickbox is not the marker */
    write_file(root, ".pickbox", "x");
    ck_assert_int_eq(fsm_tree_open(root, &t, NULL), -FSM_TREE_ENOMARKER);
    char *p = at(root, ".pickbox");
    unlink(p);
    free(p);

    t = open_tree();
    ck_assert(exists(root, ".pickbox/marker"));
    ck_assert_int_eq(fsm_tree_check_marker(t), 0);
    /* the tree is "unmounted" under us */
    char *cmd = pb_xasprintf("rm -rf '%s/.pickbox'", root);
    ck_assert_int_eq(system(cmd), 0);
    free(cmd);
    ck_assert_int_eq(fsm_tree_check_marker(t), -FSM_TREE_ENOMARKER);
    fsm_tree_close(t);
    ck_assert_int_eq(fsm_tree_open("/nonexistent/pickbox/tree", &t, NULL), -ENOENT);
}
END_TEST

/* ---- files --------------------------------------------------------------- */

START_TEST(test_tree_put_create_and_replace)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat st, st2, now;

    put_text(t, "a.txt", &NONE, "one", 0, &st);
    char *s = read_file(root, "a.txt");
    ck_assert_str_eq(s, "one");
    free(s);
    ck_assert_int_eq(st.kind, FSM_KIND_FILE);
    ck_assert_uint_eq(st.size, 3);
    ck_assert_uint_eq(st.mode, 0640);
    ck_assert(st.mtime_ns == 1000000000LL * 1600000000 + 123);
    ck_assert_int_eq(fsm_tree_lstat(t, "a.txt", &now), 0);
    ck_assert(fsm_tree_stat_matches(&st, &now));

    /* "must not exist" but it does: a local creation is pending */
    put_text(t, "a.txt", &NONE, "two", -FSM_TREE_EPENDING, NULL);
    s = read_file(root, "a.txt");
    ck_assert_str_eq(s, "one");
    free(s);

    /* replace when the disk matches the index */
    put_text(t, "a.txt", &st, "two!", 0, &st2);
    s = read_file(root, "a.txt");
    ck_assert_str_eq(s, "two!");
    free(s);
    ck_assert_uint_ne(st.ino, st2.ino);

    /* a local edit (same inode, other size) is never overwritten */
    write_file(root, "a.txt", "local edit");
    put_text(t, "a.txt", &st2, "three", -FSM_TREE_EPENDING, NULL);
    s = read_file(root, "a.txt");
    ck_assert_str_eq(s, "local edit");
    free(s);
    /* a local chmod is a pending edit too */
    ck_assert_int_eq(fsm_tree_lstat(t, "a.txt", &now), 0);
    char *p = at(root, "a.txt");
    ck_assert_int_eq(chmod(p, 0600), 0);
    free(p);
    put_text(t, "a.txt", &now, "three", -FSM_TREE_EPENDING, NULL);

    /* a failing fill leaves nothing behind */
    struct fsm_tree_stat cur;
    ck_assert_int_eq(fsm_tree_lstat(t, "a.txt", &cur), 0);
    ck_assert_int_eq(fsm_tree_put(t, "a.txt", &cur, 0644, 0, fill_fail, NULL, NULL), -ENOSPC);
    s = read_file(root, "a.txt");
    ck_assert_str_eq(s, "local edit");
    free(s);
    /* parent missing; expect a directory */
    put_text(t, "no/such/dir/f", &NONE, "x", -ENOENT, NULL);
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, &st), 0);
    put_text(t, "d", &st, "x", -EISDIR, NULL);
    /* times before the epoch round-trip */
    struct text tx = {"old", 3};
    ck_assert_int_eq(fsm_tree_put(t, "old", &NONE, 0644, -1500000000LL, fill_text, &tx, &st), 0);
    ck_assert(st.mtime_ns == -1500000000LL);
    assert_no_temps(root);
    fsm_tree_close(t);
}
END_TEST

/* A reader that opens and reads the file in a loop must only ever see the
 * complete old content or the complete new content. */
#define ATOMIC_SIZE   (64 * 1024)
#define ATOMIC_ROUNDS 60

struct reader {
    atomic_bool stop;
    long reads;
    long bad;
};

static void *reader_main(void *arg)
{
    struct reader *r = arg;
    char *p = at(root, "big.bin");
    char *buf = pb_xmalloc(ATOMIC_SIZE + 16);
    while (!atomic_load(&r->stop)) {
        int fd = open(p, O_RDONLY);
        if (fd < 0) {
            r->bad++; /* the name must never be missing */
            continue;
        }
        ssize_t n, total = 0;
        while ((n = read(fd, buf + total, (size_t)(ATOMIC_SIZE + 16 - total))) > 0)
            total += n;
        close(fd);
        bool ok = total == ATOMIC_SIZE;
        for (ssize_t i = 1; ok && i < total; i++)
            ok = buf[i] == buf[0];
        if (!ok)
            r->bad++;
        r->reads++;
    }
    free(buf);
    free(p);
    return NULL;
}

START_TEST(test_tree_put_atomic_for_readers)
{
    struct fsm_tree *t = open_tree();
    char *content = pb_xmalloc(ATOMIC_SIZE);
    struct fsm_tree_stat st;
    memset(content, 'A', ATOMIC_SIZE);
    struct text tx = {content, ATOMIC_SIZE};
    ck_assert_int_eq(fsm_tree_put(t, "big.bin", &NONE, 0644, 0, fill_text, &tx, &st), 0);

    struct reader r;
    atomic_init(&r.stop, false);
    r.reads = 0;
    r.bad = 0;
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, reader_main, &r), 0);
    for (int i = 0; i < ATOMIC_ROUNDS; i++) {
        memset(content, 'A' + (i % 26), ATOMIC_SIZE);
        ck_assert_int_eq(fsm_tree_put(t, "big.bin", &st, 0644, i, fill_text, &tx, &st), 0);
    }
    /* let the reader make progress at least once after the last replace */
    long seen = r.reads;
    uint64_t deadline = pb_now_ms() + 5000;
    while (r.reads < seen + 2 && pb_now_ms() < deadline)
        sched_yield();
    atomic_store(&r.stop, true);
    pthread_join(th, NULL);
    ck_assert_int_gt(r.reads, 0);
    ck_assert_int_eq(r.bad, 0);
    free(content);
    assert_no_temps(root);
    fsm_tree_close(t);
}
END_TEST

/* ---- escapes ------------------------------------------------------------- */

START_TEST(test_tree_escape_attempts)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat st;
    write_file(outside, "secret", "outside data");

    /* by name: refused before any system call */
    put_text(t, "../outside/pwned", &NONE, "x", -EINVAL, NULL);
    put_text(t, "/tmp/pwned", &NONE, "x", -EINVAL, NULL);
    put_text(t, "a/../../outside/pwned", &NONE, "x", -EINVAL, NULL);
    put_text(t, ".pickbox/marker", &NONE, "x", -EINVAL, NULL);
    ck_assert_int_eq(fsm_tree_lstat(t, "../outside/secret", &st), -EINVAL);

    /* a symlinked parent directory pointing out of the tree */
    char *link = at(root, "link");
    ck_assert_int_eq(symlink(outside, link), 0);
    free(link);
    put_text(t, "link/pwned", &NONE, "x", -ELOOP, NULL);
    ck_assert(!exists(outside, "pwned"));
    ck_assert_int_eq(fsm_tree_lstat(t, "link/secret", &st), -ELOOP);
    ck_assert_int_eq(fsm_tree_mkdir(t, "link/d", &NONE, 0755, 0, NULL), -ELOOP);
    ck_assert_int_eq(fsm_tree_symlink(t, "link/s", &NONE, "x", 0, NULL), -ELOOP);
    int fd = -1;
    ck_assert_int_eq(fsm_tree_open_file(t, "link/secret", &fd), -ELOOP);

    /* a symlink deeper in the path, even one pointing inside the tree */
    ck_assert_int_eq(fsm_tree_mkdir(t, "a", &NONE, 0755, 0, NULL), 0);
    ck_assert_int_eq(fsm_tree_mkdir(t, "a/real", &NONE, 0755, 0, NULL), 0);
    char *inner = at(root, "a/b");
    ck_assert_int_eq(symlink("real", inner), 0);
    free(inner);
    put_text(t, "a/b/f", &NONE, "x", -ELOOP, NULL);
    ck_assert(!exists(root, "a/real/f"));
    char *up = at(root, "a/up");
    ck_assert_int_eq(symlink("../..", up), 0);
    free(up);
    put_text(t, "a/up/outside/pwned", &NONE, "x", -ELOOP, NULL);
    ck_assert(!exists(outside, "pwned"));

    /* a symlink at the target is an entry, never followed */
    char *target = at(root, "t");
    char *secret = at(outside, "secret");
    ck_assert_int_eq(symlink(secret, target), 0);
    put_text(t, "t", &NONE, "x", -FSM_TREE_EPENDING, NULL); /* exists, not recorded */
    struct fsm_tree_stat file_like = {.kind = FSM_KIND_FILE, .size = 12};
    put_text(t, "t", &file_like, "x", -FSM_TREE_EPENDING, NULL);
    ck_assert_int_eq(fsm_tree_setattr(t, "t", &file_like, FSM_ATTR_MODE, 0777, 0, NULL),
                     -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_delete(t, "t", &file_like), -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_open_file(t, "t", &fd), -ELOOP);
    struct fsm_tree_stat lst;
    ck_assert_int_eq(fsm_tree_lstat(t, "t", &lst), 0);
    ck_assert_int_eq(lst.kind, FSM_KIND_SYMLINK);
    /* replacing the symlink (as recorded) replaces the link, not its target */
    put_text(t, "t", &lst, "new", 0, &st);
    char *s = read_file(outside, "secret");
    ck_assert_str_eq(s, "outside data");
    free(s);
    s = read_file(root, "t");
    ck_assert_str_eq(s, "new");
    free(s);
    /* setattr of a recorded symlink leaves the pointed-to file alone */
    free(target);
    target = at(root, "t2");
    ck_assert_int_eq(symlink(secret, target), 0);
    ck_assert_int_eq(fsm_tree_lstat(t, "t2", &lst), 0);
    struct stat before, after;
    ck_assert_int_eq(stat(secret, &before), 0);
    ck_assert_int_eq(fsm_tree_setattr(t, "t2", &lst, FSM_ATTR_MODE | FSM_ATTR_MTIME, 0777, 5, &st),
                     0);
    ck_assert_int_eq(stat(secret, &after), 0);
    ck_assert_uint_eq(before.st_mode, after.st_mode);
    ck_assert(before.st_mtim.tv_sec == after.st_mtim.tv_sec);
    ck_assert(st.mtime_ns == 5);
    /* deleting it removes the link only */
    ck_assert_int_eq(fsm_tree_delete(t, "t2", &st), 0);
    ck_assert(!exists(root, "t2"));
    ck_assert(exists(outside, "secret"));
    free(target);
    free(secret);

    /* rename into or out of a symlinked directory */
    put_text(t, "f", &NONE, "f", 0, &st);
    ck_assert_int_eq(fsm_tree_rename(t, "f", &st, "link/f", &NONE, NULL), -ELOOP);
    ck_assert_int_eq(fsm_tree_rename(t, "link/secret", &st, "g", &NONE, NULL), -ELOOP);
    ck_assert(exists(root, "f"));
    ck_assert(!exists(outside, "f"));
    fsm_tree_close(t);
}
END_TEST

/* ---- directories, symlinks, attributes, delete, rename ------------------- */

START_TEST(test_tree_mkdir_and_symlink)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat d, d2, l;
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0750, 77, &d), 0);
    ck_assert_int_eq(d.kind, FSM_KIND_DIR);
    ck_assert_uint_eq(d.mode, 0750);
    ck_assert(d.mtime_ns == 77);
    /* the same directory created again is adopted, not an error */
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 78, &d2), 0);
    ck_assert_uint_eq(d.ino, d2.ino);
    ck_assert_uint_eq(d2.mode, 0755);
    /* a file there is a pending local edit */
    write_file(root, "f", "x");
    ck_assert_int_eq(fsm_tree_mkdir(t, "f", &NONE, 0755, 0, NULL), -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_mkdir(t, "x/y", &NONE, 0755, 0, NULL), -ENOENT);
    ck_assert_int_eq(fsm_tree_mkdir(t, "e", &d, 0755, 0, NULL), -EINVAL);

    /* symlinks keep their target bytes and are never followed */
    ck_assert_int_eq(fsm_tree_symlink(t, "d/l", &NONE, "../../../etc/passwd", 9, &l), 0);
    ck_assert_int_eq(l.kind, FSM_KIND_SYMLINK);
    ck_assert_uint_eq(l.size, strlen("../../../etc/passwd"));
    ck_assert(l.mtime_ns == 9);
    char buf[64];
    char *p = at(root, "d/l");
    ssize_t n = readlink(p, buf, sizeof(buf));
    free(p);
    ck_assert_int_eq(n, (ssize_t)strlen("../../../etc/passwd"));
    ck_assert_int_eq(memcmp(buf, "../../../etc/passwd", (size_t)n), 0);
    ck_assert_int_eq(fsm_tree_symlink(t, "d/l", &NONE, "x", 0, NULL), -FSM_TREE_EPENDING);
    struct fsm_tree_stat l2;
    ck_assert_int_eq(fsm_tree_symlink(t, "d/l", &l, "elsewhere", 0, &l2), 0);
    ck_assert_uint_eq(l2.size, strlen("elsewhere"));
    ck_assert_int_eq(fsm_tree_symlink(t, "d/m", &NONE, "", 0, NULL), -EINVAL);
    assert_no_temps(root);
    fsm_tree_close(t);
}
END_TEST

START_TEST(test_tree_setattr)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat st, st2, d;
    put_text(t, "f", &NONE, "data", 0, &st);
    ck_assert_int_eq(fsm_tree_setattr(t, "f", &st, FSM_ATTR_MODE, 04755, 0, &st2), 0);
    ck_assert_uint_eq(st2.mode, 0755); /* setuid is never materialized */
    ck_assert(st2.mtime_ns == st.mtime_ns);
    ck_assert_int_eq(fsm_tree_setattr(t, "f", &st2, FSM_ATTR_MTIME, 0, 424242, &st), 0);
    ck_assert(st.mtime_ns == 424242);
    ck_assert_uint_eq(st.mode, 0755);
    /* stale expectation (the old stat) */
    ck_assert_int_eq(fsm_tree_setattr(t, "f", &st2, FSM_ATTR_MODE, 0600, 0, NULL),
                     -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_setattr(t, "f", &NONE, FSM_ATTR_MODE, 0600, 0, NULL), -EINVAL);
    /* directories */
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, &d), 0);
    ck_assert_int_eq(fsm_tree_setattr(t, "d", &d, FSM_ATTR_MODE | FSM_ATTR_MTIME, 0700, 5, &d), 0);
    ck_assert_uint_eq(d.mode, 0700);
    /* a FIFO is never opened (would block) and never matches */
    char *p = at(root, "fifo");
    ck_assert_int_eq(mkfifo(p, 0644), 0);
    free(p);
    struct fsm_tree_stat fifo;
    ck_assert_int_eq(fsm_tree_lstat(t, "fifo", &fifo), 0);
    ck_assert_int_eq(fifo.kind, FSM_KIND_OTHER);
    ck_assert_int_eq(fsm_tree_setattr(t, "fifo", &st, FSM_ATTR_MODE, 0600, 0, NULL),
                     -FSM_TREE_EPENDING);
    int fd = -1;
    ck_assert_int_eq(fsm_tree_open_file(t, "fifo", &fd), -EINVAL);
    ck_assert_int_eq(fsm_tree_open_file(t, "f", &fd), 0);
    ck_assert_int_ge(fd, 0);
    close(fd);
    fsm_tree_close(t);
}
END_TEST

START_TEST(test_tree_delete)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat f, d, child;
    put_text(t, "f", &NONE, "data", 0, &f);
    /* a local edit is pending: the delete leaves it */
    write_file(root, "f", "edited locally");
    ck_assert_int_eq(fsm_tree_delete(t, "f", &f), -FSM_TREE_EPENDING);
    ck_assert(exists(root, "f"));
    ck_assert_int_eq(fsm_tree_lstat(t, "f", &f), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "f", &f), 0);
    ck_assert(!exists(root, "f"));
    /* deleting what is gone is done */
    ck_assert_int_eq(fsm_tree_delete(t, "f", &f), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "gone/f", &f), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "f", &NONE), -EINVAL);

    /* a directory with a child the index does not know is kept */
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, &d), 0);
    write_file(root, "d/new-local-file", "x");
    ck_assert_int_eq(fsm_tree_lstat(t, "d", &d), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "d", &d), -FSM_TREE_EPENDING);
    ck_assert(exists(root, "d/new-local-file"));
    ck_assert_int_eq(fsm_tree_lstat(t, "d/new-local-file", &child), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "d/new-local-file", &child), 0);
    ck_assert_int_eq(fsm_tree_lstat(t, "d", &d), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "d", &d), 0);
    ck_assert(!exists(root, "d"));
    /* a directory where a file was recorded */
    ck_assert_int_eq(fsm_tree_mkdir(t, "x", &NONE, 0755, 0, NULL), 0);
    ck_assert_int_eq(fsm_tree_delete(t, "x", &f), -FSM_TREE_EPENDING);
    fsm_tree_close(t);
}
END_TEST

START_TEST(test_tree_rename)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat a, b, d, moved, now;
    put_text(t, "a", &NONE, "aaa", 0, &a);
    put_text(t, "b", &NONE, "bbb", 0, &b);
    /* onto an existing name that was expected absent: never clobbered */
    ck_assert_int_eq(fsm_tree_rename(t, "a", &a, "b", &NONE, NULL), -FSM_TREE_EPENDING);
    char *s = read_file(root, "b");
    ck_assert_str_eq(s, "bbb");
    free(s);
    /* replace b as recorded */
    ck_assert_int_eq(fsm_tree_rename(t, "a", &a, "b", &b, &moved), 0);
    ck_assert(!exists(root, "a"));
    s = read_file(root, "b");
    ck_assert_str_eq(s, "aaa");
    free(s);
    ck_assert_int_eq(fsm_tree_lstat(t, "b", &now), 0);
    ck_assert(fsm_tree_stat_matches(&moved, &now));
    /* stale source expectation */
    ck_assert_int_eq(fsm_tree_rename(t, "b", &a, "c", &NONE, NULL), 0); /* same inode: fine */
    ck_assert_int_eq(fsm_tree_lstat(t, "c", &now), 0);
    write_file(root, "c", "changed");
    ck_assert_int_eq(fsm_tree_rename(t, "c", &moved, "e", &NONE, NULL), -FSM_TREE_EPENDING);
    ck_assert(exists(root, "c"));

    /* a whole directory moves with its children, into another directory */
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, &d), 0);
    ck_assert_int_eq(fsm_tree_mkdir(t, "dst", &NONE, 0755, 0, NULL), 0);
    put_text(t, "d/child", &NONE, "kid", 0, NULL);
    ck_assert_int_eq(fsm_tree_lstat(t, "d", &d), 0);
    ck_assert_int_eq(fsm_tree_rename(t, "d", &d, "dst/d2", &NONE, &moved), 0);
    s = read_file(root, "dst/d2/child");
    ck_assert_str_eq(s, "kid");
    free(s);
    ck_assert_uint_eq(moved.ino, d.ino);
    /* missing source */
    ck_assert_int_eq(fsm_tree_rename(t, "nope", &a, "x", &NONE, NULL), -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_rename(t, "c", &NONE, "x", &NONE, NULL), -EINVAL);
    fsm_tree_close(t);
}
END_TEST

/* ---- staged files (one barrier for many) -------------------------------- */

static int stage_text(struct fsm_tree_stage *s, const char *path, const char *text)
{
    struct text tx = {text, strlen(text)};
    return fsm_tree_stage_add(s, path, 0640, 1000000000LL * 1600000000 + 7, fill_text, &tx);
}

/* Many files (more than TREE_SYNCFS_MIN: one syncfs) and a few (fsync each):
 * every commit leaves the new content with the staged stat; one target with
 * a local edit stays as it is while the others apply; no temp is left. */
static void stage_many(unsigned n)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat old[16], edit, now, out;
    int slot[16];
    ck_assert_uint_le(n, 16);
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, NULL), 0);
    for (unsigned i = 0; i < n; i++) {
        char *p = pb_xasprintf("d/f%u", i);
        put_text(t, p, &NONE, "old", 0, &old[i]);
        free(p);
    }
    write_file(root, "d/f1", "local edit"); /* not proposed yet */
    struct fsm_tree_stage *s = fsm_tree_stage_new(t);
    for (unsigned i = 0; i < n; i++) {
        char *p = pb_xasprintf("d/f%u", i);
        slot[i] = stage_text(s, p, "new");
        ck_assert_int_ge(slot[i], 0);
        free(p);
    }
    /* staged, not renamed: readers still see the old files */
    char *c = read_file(root, "d/f0");
    ck_assert_str_eq(c, "old");
    free(c);
    ck_assert_int_eq(fsm_tree_stage_sync(s), (int)n);
    for (unsigned i = 0; i < n; i++) {
        char *p = pb_xasprintf("d/f%u", i);
        int rc = fsm_tree_stage_commit(s, slot[i], p, &old[i], &out);
        ck_assert_int_eq(rc, i == 1 ? -FSM_TREE_EPENDING : 0);
        if (rc == 0) {
            ck_assert_int_eq(fsm_tree_lstat(t, p, &now), 0);
            ck_assert(fsm_tree_stat_matches(&out, &now));
            ck_assert_uint_eq(now.mode & 0777, 0640);
            c = read_file(root, p);
            ck_assert_str_eq(c, "new");
            free(c);
        }
        /* a slot is used once */
        ck_assert_int_eq(fsm_tree_stage_commit(s, slot[i], p, &old[i], NULL), -EAGAIN);
        free(p);
    }
    ck_assert_int_eq(fsm_tree_stage_finish(s), 0);
    c = read_file(root, "d/f1");
    ck_assert_str_eq(c, "local edit");
    free(c);
    ck_assert_int_eq(fsm_tree_lstat(t, "d/f1", &edit), 0);
    ck_assert(!fsm_tree_stat_matches(&old[1], &edit));
    assert_no_temps(root);
    /* the set is reusable after finish; an unknown slot is not committable */
    ck_assert_int_eq(fsm_tree_stage_commit(s, 0, "d/f0", &NONE, NULL), -EAGAIN);
    ck_assert_int_eq(stage_text(s, "missing/x", "x"), -ENOENT);
    ck_assert_int_eq(stage_text(s, "../x", "x"), -EINVAL);
    fsm_tree_stage_free(s);
    assert_no_temps(root);
    fsm_tree_close(t);
}

START_TEST(test_tree_stage_many)
{
    stage_many(12);
}
END_TEST

START_TEST(test_tree_stage_few)
{
    stage_many(3);
}
END_TEST

/* A temp that was staged but never committed (the run stopped) is removed
 * by finish; one whose fill failed leaves nothing; a full set says so. */
START_TEST(test_tree_stage_unused_and_full)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stage *s = fsm_tree_stage_new(t);
    ck_assert_int_ge(stage_text(s, "a", "a"), 0);
    ck_assert_int_eq(fsm_tree_stage_add(s, "b", 0644, 0, fill_fail, NULL), -ENOSPC);
    ck_assert_int_eq(fsm_tree_stage_sync(s), 1);
    ck_assert_int_eq(fsm_tree_stage_finish(s), 0);
    ck_assert(!exists(root, "a"));
    ck_assert(!exists(root, "b"));
    assert_no_temps(root);
    for (int i = 0; i < FSM_TREE_STAGE_MAX; i++)
        ck_assert_int_eq(stage_text(s, "a", "a"), i);
    ck_assert_int_eq(stage_text(s, "a", "a"), -ENOSPC);
    /* not synced: not committable */
    ck_assert_int_eq(fsm_tree_stage_commit(s, 0, "a", &NONE, NULL), -EAGAIN);
    fsm_tree_stage_free(s);
    ck_assert(!exists(root, "a"));
    assert_no_temps(root);
    fsm_tree_close(t);
}
END_TEST

/* The parent directory is moved between staging and commit (an earlier op
 * of the batch): the temp is not renamed into the moved directory nor
 * anywhere else (-EAGAIN: the caller writes the file anew). */
START_TEST(test_tree_stage_parent_moved)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat d, out;
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, &d), 0);
    struct fsm_tree_stage *s = fsm_tree_stage_new(t);
    int slot = stage_text(s, "d/f", "new");
    ck_assert_int_ge(slot, 0);
    ck_assert_int_eq(fsm_tree_stage_sync(s), 1);
    ck_assert_int_eq(fsm_tree_rename(t, "d", &d, "e", &NONE, NULL), 0);
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, NULL), 0);
    ck_assert_int_eq(fsm_tree_stage_commit(s, slot, "d/f", &NONE, &out), -EAGAIN);
    ck_assert_int_eq(fsm_tree_stage_finish(s), 0);
    ck_assert(!exists(root, "d/f"));
    ck_assert(!exists(root, "e/f"));
    assert_no_temps(root);
    fsm_tree_stage_free(s);
    fsm_tree_close(t);
}
END_TEST

/* Deletes whose directory fsync waits for the finish: same results as
 * fsm_tree_delete() (a pending edit kept, absent is fine). */
START_TEST(test_tree_stage_delete)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat a, b, c, d;
    ck_assert_int_eq(fsm_tree_mkdir(t, "d", &NONE, 0755, 0, NULL), 0);
    put_text(t, "d/a", &NONE, "a", 0, &a);
    put_text(t, "d/b", &NONE, "b", 0, &b);
    put_text(t, "c", &NONE, "c", 0, &c);
    write_file(root, "d/b", "edited");
    struct fsm_tree_stage *s = fsm_tree_stage_new(t);
    ck_assert_int_eq(fsm_tree_stage_delete(s, "d/a", &a), 0);
    ck_assert_int_eq(fsm_tree_stage_delete(s, "d/b", &b), -FSM_TREE_EPENDING);
    ck_assert_int_eq(fsm_tree_stage_delete(s, "c", &c), 0);
    ck_assert_int_eq(fsm_tree_stage_delete(s, "c", &c), 0); /* absent already */
    ck_assert_int_eq(fsm_tree_stage_delete(s, "gone/x", &c), 0);
    ck_assert(!exists(root, "d/a"));
    ck_assert(!exists(root, "c"));
    ck_assert(exists(root, "d/b"));
    ck_assert_int_eq(fsm_tree_lstat(t, "d", &d), 0);
    ck_assert_int_eq(fsm_tree_stage_delete(s, "d", &d), -FSM_TREE_EPENDING); /* not empty */
    ck_assert_int_eq(fsm_tree_stage_finish(s), 0);
    fsm_tree_stage_free(s);
    fsm_tree_close(t);
}
END_TEST

/* A crash between the barrier and the renames: a child stages and syncs
 * new content over existing files and dies without renaming. The targets
 * hold their old content (never empty or torn); the next open removes the
 * durable temps. */
START_TEST(test_tree_stage_crash_before_renames)
{
    struct fsm_tree *t = open_tree();
    struct fsm_tree_stat st;
    for (int i = 0; i < 10; i++) {
        char *p = pb_xasprintf("f%d", i);
        put_text(t, p, &NONE, "old content", 0, &st);
        free(p);
    }
    fsm_tree_close(t);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        struct fsm_tree *ct = NULL;
        if (fsm_tree_open(root, &ct, NULL) < 0)
            _exit(2);
        struct fsm_tree_stage *s = fsm_tree_stage_new(ct);
        for (int i = 0; i < 10; i++) {
            char *p = pb_xasprintf("f%d", i);
            if (stage_text(s, p, "new content, longer") < 0)
                _exit(3);
            free(p);
        }
        _exit(fsm_tree_stage_sync(s) == 10 ? 0 : 4); /* dies here */
    }
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    char *cmd = pb_xasprintf("find '%s' -name '.pickbox.tmp.*' | grep -c . | grep -qx 10", root);
    ck_assert_msg(system(cmd) == 0, "the 10 staged temps are there");
    free(cmd);
    for (int i = 0; i < 10; i++) {
        char *p = pb_xasprintf("f%d", i);
        char *c = read_file(root, p);
        ck_assert_str_eq(c, "old content");
        free(c);
        free(p);
    }
    t = open_tree(); /* cleans the temps */
    assert_no_temps(root);
    fsm_tree_close(t);
}
END_TEST

/* ---- modes that would lock an unprivileged daemon out -------------------- */

#define TRY(cond)                                                                                  \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return __LINE__;                                                                       \
    } while (0)

/* Runs as an unprivileged user (root bypasses permission checks). Returns 0,
 * or the line of the first failed check. */
static int unprivileged_body(void)
{
    struct fsm_tree *t = NULL;
    struct fsm_tree_stat f, f2, d, x;
    struct text tx = {"data", 4};
    TRY(fsm_tree_init(root, NULL) == 0);
    TRY(fsm_tree_open(root, &t, NULL) == 0);
    /* a file nobody may read or write, then made readable again */
    TRY(fsm_tree_put(t, "f", &NONE, 0000, 5, fill_text, &tx, &f) == 0);
    TRY(f.mode == 0000);
    TRY(fsm_tree_setattr(t, "f", &f, FSM_ATTR_MODE | FSM_ATTR_MTIME, 0644, 6, &f2) == 0);
    TRY(f2.mode == 0644 && f2.mtime_ns == 6 && f2.ino == f.ino);
    /* a pending edit is still detected on the by-name path */
    TRY(fsm_tree_setattr(t, "f", &f2, FSM_ATTR_MODE, 0000, 0, &f) == 0);
    TRY(fsm_tree_setattr(t, "f", &f2, FSM_ATTR_MODE, 0644, 0, NULL) == -FSM_TREE_EPENDING);
    /* directories keep the owner's rwx, so their contents stay reachable */
    TRY(fsm_tree_mkdir(t, "d", &NONE, 0000, 0, &d) == 0);
    TRY(d.mode == 0700);
    TRY(fsm_tree_put(t, "d/x", &NONE, 0644, 0, fill_text, &tx, &x) == 0);
    TRY(fsm_tree_setattr(t, "d", &d, FSM_ATTR_MODE, 0111, 0, &d) == 0);
    TRY(d.mode == 0711);
    TRY(fsm_tree_delete(t, "d/x", &x) == 0);
    TRY(fsm_tree_delete(t, "d", &d) == 0);
    TRY(fsm_tree_delete(t, "f", &f) == 0);
    fsm_tree_close(t);
    return 0;
}

START_TEST(test_tree_unprivileged_modes)
{
    if (geteuid() != 0) {
        ck_assert_int_eq(unprivileged_body(), 0);
        return;
    }
    ck_assert_int_eq(chmod(base_dir, 0755), 0);
    ck_assert_int_eq(chown(root, 65534, 65534), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        if (setgid(65534) < 0 || setuid(65534) < 0)
            _exit(255);
        _exit(unprivileged_body() & 0xff);
    }
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_msg(WEXITSTATUS(status) == 0, "unprivileged check failed at line %d (mod 256)",
                  WEXITSTATUS(status));
}
END_TEST

/* ---- temp cleanup -------------------------------------------------------- */

START_TEST(test_tree_temp_cleanup)
{
    struct fsm_tree *t = open_tree();
    fsm_tree_close(t);
    char *sub = at(root, "sub");
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    free(sub);
    write_file(root, ".pickbox.tmp.0011223344556677", "stale");
    write_file(root, "sub/.pickbox.tmp.deadbeefdeadbeef", "stale");
    write_file(root, "sub/keep.txt", "keep");
    write_file(root, "sub/.pickbox.tmpx", "not ours"); /* no trailing dot */
    /* a temp-named file outside, reachable only through a symlink: kept */
    write_file(outside, ".pickbox.tmp.outside", "not in the tree");
    char *link = at(root, "sub/link");
    ck_assert_int_eq(symlink(outside, link), 0);
    free(link);

    t = open_tree();
    ck_assert(!exists(root, ".pickbox.tmp.0011223344556677"));
    ck_assert(!exists(root, "sub/.pickbox.tmp.deadbeefdeadbeef"));
    ck_assert(exists(root, "sub/keep.txt"));
    ck_assert(exists(root, "sub/.pickbox.tmpx"));
    ck_assert(exists(outside, ".pickbox.tmp.outside"));
    ck_assert(exists(root, ".pickbox/marker"));
    unsigned removed = 99;
    ck_assert_int_eq(fsm_tree_clean_temps(t, &removed), 0);
    ck_assert_uint_eq(removed, 0);
    fsm_tree_close(t);
}
END_TEST

static Suite *fsm_tree_suite(void)
{
    Suite *s = suite_create("fsm_tree");
    TCase *tc = tcase_create("tree");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_tree_marker_required);
    tcase_add_test(tc, test_tree_put_create_and_replace);
    tcase_add_test(tc, test_tree_put_atomic_for_readers);
    tcase_add_test(tc, test_tree_escape_attempts);
    tcase_add_test(tc, test_tree_mkdir_and_symlink);
    tcase_add_test(tc, test_tree_setattr);
    tcase_add_test(tc, test_tree_delete);
    tcase_add_test(tc, test_tree_rename);
    tcase_add_test(tc, test_tree_temp_cleanup);
    tcase_add_test(tc, test_tree_unprivileged_modes);
    tcase_add_test(tc, test_tree_stage_many);
    tcase_add_test(tc, test_tree_stage_few);
    tcase_add_test(tc, test_tree_stage_unused_and_full);
    tcase_add_test(tc, test_tree_stage_parent_moved);
    tcase_add_test(tc, test_tree_stage_delete);
    tcase_add_test(tc, test_tree_stage_crash_before_renames);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(fsm_tree_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
