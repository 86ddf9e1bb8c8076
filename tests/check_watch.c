/*
 * check_watch.c: unit tests for src/watch against real inotify in private
 * temp directories. The event loop is driven in short slices until the
 * expected candidates arrived or a deadline passed (never a bare sleep);
 * "exactly one change" checks wait until the watcher has nothing pending.
 */
#include "config.h"

#include <check.h>
#include <dirent.h>
#include <inttypes.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "watch/watch.h"

#define DEBOUNCE_MS 20
#define DEADLINE_MS 3000

struct rec {
    enum watch_kind kind;
    char *path;
    char *from;
    char *target;
    struct watch_stat st;
    bool rescan;
};

static struct event_base *base;
static struct watch *w;
static char top[256];  /* private temp dir */
static char root[512]; /* top/tree: the watched tree */
static char out[512];  /* top/outside: not watched */
static struct rec recs[20000];
static size_t nrecs;
static int fail_watch_left;        /* add_watch hook: fail this many times ... */
static char fail_watch_suffix[64]; /* ... for paths ending in this */

static void on_change(const struct watch_change *c, void *arg)
{
    (void)arg;
    if (nrecs == PB_ARRAY_SIZE(recs))
        return;
    struct rec *r = &recs[nrecs++];
    r->kind = c->kind;
    r->path = pb_xstrdup(c->path);
    r->from = c->from ? pb_xstrdup(c->from) : NULL;
    r->target = c->target ? pb_xstrdup(c->target) : NULL;
    r->st = c->st;
    r->rescan = c->rescan;
}

static void recs_clear(void)
{
    for (size_t i = 0; i < nrecs; i++) {
        free(recs[i].path);
        free(recs[i].from);
        free(recs[i].target);
    }
    nrecs = 0;
}

static const char *kind_name(enum watch_kind k)
{
    switch (k) {
    case WATCH_UPSERT_FILE:
        return "UPSERT";
    case WATCH_MKDIR:
        return "MKDIR";
    case WATCH_SYMLINK:
        return "SYMLINK";
    case WATCH_UNSUPPORTED:
        return "UNSUPPORTED";
    case WATCH_REMOVE:
        return "REMOVE";
    case WATCH_RENAME:
        return "RENAME";
    case WATCH_ATTR:
        return "ATTR";
    case WATCH_RESCAN_BEGIN:
        return "BEGIN";
    case WATCH_RESCAN_END:
        return "END";
    }
    return "?";
}

static void recs_dump(const char *title)
{
    fprintf(stderr, "# %s: %zu candidates\n", title, nrecs);
    for (size_t i = 0; i < nrecs && i < 50; i++)
        fprintf(stderr, "#   %s %s%s%s\n", kind_name(recs[i].kind),
                recs[i].from ? recs[i].from : "", recs[i].from ? " -> " : "", recs[i].path);
}

static int count(enum watch_kind k, const char *path)
{
    int n = 0;
    for (size_t i = 0; i < nrecs; i++)
        if (recs[i].kind == k && (!path || strcmp(recs[i].path, path) == 0))
            n++;
    return n;
}

static const struct rec *find(enum watch_kind k, const char *path)
{
    for (size_t i = 0; i < nrecs; i++)
        if (recs[i].kind == k && strcmp(recs[i].path, path) == 0)
            return &recs[i];
    return NULL;
}

static ptrdiff_t index_of(enum watch_kind k, const char *path)
{
    for (size_t i = 0; i < nrecs; i++)
        if (recs[i].kind == k && strcmp(recs[i].path, path) == 0)
            return (ptrdiff_t)i;
    return -1;
}

/* Runs the loop for one short slice. */
static void slice(void)
{
    struct timeval tv = {0, 5000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

/* Drives the loop until a candidate (kind, path) arrived; false at deadline. */
static bool wait_for(enum watch_kind k, const char *path)
{
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    while (pb_now_ms() < end) {
        if (find(k, path))
            return true;
        slice();
    }
    return find(k, path) != NULL;
}

/* Drives the loop until the watcher has nothing pending and nothing new
 * arrived for a few debounce periods. */
static void quiesce(void)
{
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    uint64_t quiet_since = pb_now_ms();
    size_t seen = nrecs;
    while (pb_now_ms() < end) {
        slice();
        struct watch_stats s;
        watch_get_stats(w, &s);
        if (s.pending || nrecs != seen) {
            quiet_since = pb_now_ms();
            seen = nrecs;
            continue;
        }
        if (pb_now_ms() - quiet_since >= 4 * DEBOUNCE_MS)
            return;
    }
}

static const char *P(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *P(const char *fmt, ...)
{
    static char bufs[4][PATH_MAX + 600];
    static int i;
    char rel[PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof(rel), fmt, ap);
    va_end(ap);
    char *b = bufs[i++ % 4];
    snprintf(b, sizeof(bufs[0]), "%s/%s", root, rel);
    return b;
}

static void write_file(const char *path, const char *data, int flags)
{
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, data, strlen(data)), (ssize_t)strlen(data));
    ck_assert_int_eq(close(fd), 0);
}

static int run(const char *cmd)
{
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static int run_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run_fmt(const char *fmt, ...)
{
    char cmd[PATH_MAX + 600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return run(cmd);
}

static int hook_add_watch(int fd, const char *path, uint32_t mask, void *arg)
{
    (void)arg;
    size_t pl = strlen(path), sl = strlen(fail_watch_suffix);
    if (fail_watch_left > 0 && sl && pl >= sl && strcmp(path + pl - sl, fail_watch_suffix) == 0) {
        fail_watch_left--;
        errno = ENOSPC;
        return -1;
    }
    return inotify_add_watch(fd, path, mask);
}

static void start_opts(struct watch_options *o)
{
    struct pb_error err;
    pb_error_clear(&err);
    w = watch_new(base, root, o, on_change, NULL, &err);
    ck_assert_msg(w != NULL, "watch_new: %s", err.msg);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    quiesce();
}

static void default_opts(struct watch_options *o)
{
    watch_options_init(o);
    o->debounce_ms = DEBOUNCE_MS;
    o->write_hold_ms = 300;
    o->rename_window_ms = 5;
}

static void start(void)
{
    struct watch_options o;
    default_opts(&o);
    start_opts(&o);
    recs_clear();
}

static void setup(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(top, sizeof(top), "%s/check_watch.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(top));
    snprintf(root, sizeof(root), "%s/tree", top);
    snprintf(out, sizeof(out), "%s/outside", top);
    ck_assert_int_eq(mkdir(root, 0755), 0);
    ck_assert_int_eq(mkdir(out, 0755), 0);
    base = event_base_new();
    ck_assert_ptr_nonnull(base);
    nrecs = 0;
    fail_watch_left = 0;
    fail_watch_suffix[0] = '\0';
}

static void teardown(void)
{
    watch_free(w);
    w = NULL;
    event_base_free(base);
    recs_clear();
    (void)umount2(P("m"), MNT_DETACH); /* test_unmount_inside, if it failed */
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
    (void)run(cmd);
}

/* ---- tests ------------------------------------------------------------ */

START_TEST(test_initial_scan)
{
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    ck_assert_int_eq(mkdir(P("d/e"), 0755), 0);
    write_file(P("d/e/f"), "hello", 0);
    write_file(P("top"), "x", 0);
    ck_assert_int_eq(symlink("d", P("ln")), 0);
    ck_assert_int_eq(mkdir(P(".pickbox"), 0755), 0);
    write_file(P(".pickbox/id"), "n1", 0);
    write_file(P("d/.pickbox.tmp.123"), "tmp", 0);
    struct watch_options o;
    default_opts(&o);
    start_opts(&o);
    recs_dump("initial");
    ck_assert_int_eq(recs[0].kind, WATCH_RESCAN_BEGIN);
    ck_assert_str_eq(recs[0].path, "");
    ck_assert_int_eq(recs[nrecs - 1].kind, WATCH_RESCAN_END);
    ck_assert_int_eq(nrecs, 2 + 5);
    ck_assert_int_eq(count(WATCH_MKDIR, "d"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "d/e"), 1);
    const struct rec *f = find(WATCH_UPSERT_FILE, "d/e/f");
    ck_assert_ptr_nonnull(f);
    ck_assert(f->rescan);
    ck_assert_int_eq(f->st.size, 5);
    ck_assert_int_eq(f->st.type, WATCH_TYPE_FILE);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "top"), 1);
    const struct rec *l = find(WATCH_SYMLINK, "ln");
    ck_assert_ptr_nonnull(l);
    ck_assert_str_eq(l->target, "d");
    ck_assert_int_lt(index_of(WATCH_MKDIR, "d"), index_of(WATCH_MKDIR, "d/e"));
    ck_assert_int_lt(index_of(WATCH_MKDIR, "d/e"), index_of(WATCH_UPSERT_FILE, "d/e/f"));
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 3); /* root, d, d/e: not .pickbox, not the symlink */
    ck_assert_int_eq(s.rescans, 1);
}
END_TEST

START_TEST(test_file_lifecycle)
{
    start();
    write_file(P("f"), "one", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.size, 3);
    ck_assert(!recs[0].rescan);
    recs_clear();

    write_file(P("f"), "two2", O_APPEND);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.size, 7);
    recs_clear();

    ck_assert_int_eq(truncate(P("f"), 2), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.size, 2);
    recs_clear();

    /* A burst of writes is one candidate. */
    int fd = open(P("f"), O_WRONLY | O_TRUNC);
    ck_assert_int_ge(fd, 0);
    for (int i = 0; i < 100; i++)
        ck_assert_int_eq(write(fd, "0123456789", 10), 10);
    close(fd);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.size, 1000);
    recs_clear();

    ck_assert_int_eq(unlink(P("f")), 0);
    ck_assert(wait_for(WATCH_REMOVE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    recs_clear();

    /* Created and deleted inside the debounce window: never seen. */
    write_file(P("g"), "short-lived", 0);
    ck_assert_int_eq(unlink(P("g")), 0);
    quiesce();
    ck_assert_int_eq(nrecs, 0);
}
END_TEST

/* Drives the loop for ms milliseconds (to show that nothing happens). */
static void drive(uint64_t ms)
{
    uint64_t end = pb_now_ms() + ms;
    while (pb_now_ms() < end)
        slice();
}

START_TEST(test_write_hold)
{
    struct watch_options o;
    default_opts(&o);
    o.write_hold_ms = 2000;
    o.max_delay_ms = 2500;
    start_opts(&o);
    recs_clear();
    /* A writer that keeps the file open is waited for ... */
    int fd = open(P("slow"), O_WRONLY | O_CREAT, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "part1", 5), 5);
    drive(10 * DEBOUNCE_MS);
    ck_assert_int_eq(nrecs, 0);
    ck_assert_int_eq(write(fd, "part2", 5), 5);
    drive(5 * DEBOUNCE_MS);
    ck_assert_int_eq(nrecs, 0);
    /* ... and its close ends the wait early. */
    uint64_t t0 = pb_now_ms();
    close(fd);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "slow"));
    ck_assert_int_lt(pb_now_ms() - t0, 1000);
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.size, 10);
    recs_clear();
    /* A file that is written all the time is still reported (max delay). */
    fd = open(P("log"), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ck_assert_int_ge(fd, 0);
    t0 = pb_now_ms();
    while (!find(WATCH_UPSERT_FILE, "log") && pb_now_ms() - t0 < DEADLINE_MS + 2000) {
        ck_assert_int_eq(write(fd, "line\n", 5), 5);
        slice();
    }
    close(fd);
    ck_assert_ptr_nonnull(find(WATCH_UPSERT_FILE, "log"));
    ck_assert_int_ge(pb_now_ms() - t0, 2000);
}
END_TEST

START_TEST(test_mkdir_race_and_rmdir)
{
    start();
    /* Files created right after mkdir, before the watcher could add a watch
     * on the new directories: the scan after the watch finds them. */
    ck_assert_int_eq(mkdir(P("a"), 0755), 0);
    ck_assert_int_eq(mkdir(P("a/b"), 0755), 0);
    ck_assert_int_eq(mkdir(P("a/b/c"), 0755), 0);
    write_file(P("a/b/c/f1"), "1", 0);
    write_file(P("a/f0"), "0", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "a/b/c/f1"));
    ck_assert(wait_for(WATCH_UPSERT_FILE, "a/f0"));
    /* A file created once the watches exist. */
    write_file(P("a/b/c/f2"), "2", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "a/b/c/f2"));
    quiesce();
    recs_dump("mkdir -p");
    ck_assert_int_eq(count(WATCH_MKDIR, "a"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "a/b"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "a/b/c"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "a/b/c/f1"), 1);
    ck_assert_int_eq(nrecs, 6);
    ck_assert_int_lt(index_of(WATCH_MKDIR, "a"), index_of(WATCH_MKDIR, "a/b"));
    ck_assert_int_lt(index_of(WATCH_MKDIR, "a/b"), index_of(WATCH_MKDIR, "a/b/c"));
    ck_assert_int_lt(index_of(WATCH_MKDIR, "a/b/c"), index_of(WATCH_UPSERT_FILE, "a/b/c/f1"));
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 4);
    recs_clear();

    ck_assert_int_eq(unlink(P("a/b/c/f1")), 0);
    ck_assert_int_eq(unlink(P("a/b/c/f2")), 0);
    ck_assert_int_eq(rmdir(P("a/b/c")), 0);
    ck_assert(wait_for(WATCH_REMOVE, "a/b/c"));
    quiesce();
    ck_assert_int_eq(count(WATCH_REMOVE, "a/b/c"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, NULL) + count(WATCH_UPSERT_FILE, NULL), 0);
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 3);
}
END_TEST

START_TEST(test_rename_file)
{
    write_file(P("a"), "content", 0);
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    start();
    ck_assert_int_eq(rename(P("a"), P("d/b")), 0);
    ck_assert(wait_for(WATCH_RENAME, "d/b"));
    quiesce();
    recs_dump("rename");
    ck_assert_int_eq(nrecs, 1);
    ck_assert_str_eq(recs[0].from, "a");
    ck_assert_int_eq(recs[0].st.size, 7);
    recs_clear();

    /* Rename over an existing file: still one RENAME. */
    write_file(P("c"), "other", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "c"));
    quiesce();
    recs_clear();
    ck_assert_int_eq(rename(P("d/b"), P("c")), 0);
    ck_assert(wait_for(WATCH_RENAME, "c"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_str_eq(recs[0].from, "d/b");
    recs_clear();

    /* a -> b -> c inside the window: one RENAME a -> c. */
    ck_assert_int_eq(rename(P("c"), P("x1")), 0);
    ck_assert_int_eq(rename(P("x1"), P("x2")), 0);
    ck_assert(wait_for(WATCH_RENAME, "x2"));
    quiesce();
    recs_dump("chain");
    ck_assert_int_eq(nrecs, 1);
    ck_assert_str_eq(recs[0].from, "c");
}
END_TEST

START_TEST(test_rename_dir)
{
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    ck_assert_int_eq(mkdir(P("d/sub"), 0755), 0);
    write_file(P("d/sub/f"), "f", 0);
    write_file(P("d/g"), "g", 0);
    start();
    ck_assert_int_eq(rename(P("d"), P("e")), 0);
    ck_assert(wait_for(WATCH_RENAME, "e"));
    quiesce();
    recs_dump("rename dir");
    ck_assert_int_eq(nrecs, 1);
    ck_assert_str_eq(recs[0].from, "d");
    ck_assert_int_eq(recs[0].st.type, WATCH_TYPE_DIR);
    recs_clear();
    /* Events inside the renamed directory use the new paths. */
    write_file(P("e/sub/new"), "n", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "e/sub/new"));
    ck_assert_int_eq(unlink(P("e/g")), 0);
    ck_assert(wait_for(WATCH_REMOVE, "e/g"));
    quiesce();
    ck_assert_int_eq(nrecs, 2);
    recs_clear();

    /* Rename the dir, then immediately create inside: RENAME comes first. */
    ck_assert_int_eq(rename(P("e"), P("f")), 0);
    write_file(P("f/sub/later"), "l", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f/sub/later"));
    quiesce();
    recs_dump("rename dir then create");
    ck_assert_int_eq(nrecs, 2);
    ck_assert_int_eq(recs[0].kind, WATCH_RENAME);
    ck_assert_str_eq(recs[0].from, "e");
    ck_assert_str_eq(recs[0].path, "f");
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 3);
}
END_TEST

START_TEST(test_move_out_and_in)
{
    write_file(P("f"), "f", 0);
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    write_file(P("d/x"), "x", 0);
    start();
    char dst[PATH_MAX + 8];
    snprintf(dst, sizeof(dst), "%s/f", out);
    ck_assert_int_eq(rename(P("f"), dst), 0);
    snprintf(dst, sizeof(dst), "%s/d", out);
    ck_assert_int_eq(rename(P("d"), dst), 0);
    ck_assert(wait_for(WATCH_REMOVE, "f"));
    ck_assert(wait_for(WATCH_REMOVE, "d"));
    quiesce();
    ck_assert_int_eq(nrecs, 2);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 1); /* the moved-out d is no longer watched */
    recs_clear();
    /* Changes in the moved-out directory are not reported. */
    snprintf(dst, sizeof(dst), "%s/d/y", out);
    write_file(dst, "y", 0);

    /* Move a directory with content in from outside. */
    ck_assert_int_eq(mkdir(P("in"), 0755), 0);
    snprintf(dst, sizeof(dst), "%s/d", out);
    ck_assert_int_eq(rename(dst, P("in/d")), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "in/d/y"));
    quiesce();
    recs_dump("move in");
    ck_assert_int_eq(count(WATCH_MKDIR, "in"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "in/d"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "in/d/x"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "in/d/y"), 1);
    ck_assert_int_eq(nrecs, 4);
    write_file(P("in/d/z"), "z", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "in/d/z"));
    quiesce();
    recs_clear();

    /* Move a directory in over an existing empty one: its content is
     * reported and it is watched (not the replaced directory's watch). */
    ck_assert_int_eq(mkdir(P("in/e"), 0755), 0);
    ck_assert(wait_for(WATCH_MKDIR, "in/e"));
    quiesce();
    recs_clear();
    snprintf(dst, sizeof(dst), "%s/e2", out);
    ck_assert_int_eq(mkdir(dst, 0755), 0);
    snprintf(dst, sizeof(dst), "%s/e2/inside", out);
    write_file(dst, "i", 0);
    snprintf(dst, sizeof(dst), "%s/e2", out);
    ck_assert_int_eq(rename(dst, P("in/e")), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "in/e/inside"));
    write_file(P("in/e/after"), "a", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "in/e/after"));
    quiesce();
    struct watch_stats s2;
    watch_get_stats(w, &s2);
    ck_assert_int_eq(s2.watches, 4); /* root, in, in/d, in/e */
}
END_TEST

START_TEST(test_chmod_touch)
{
    write_file(P("f"), "f", 0);
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    start();
    ck_assert_int_eq(chmod(P("f"), 0600), 0);
    ck_assert(wait_for(WATCH_ATTR, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.mode & 07777, 0600);
    recs_clear();

    /* touch (atime and mtime): IN_ATTRIB -> ATTR. */
    struct timespec ts[2] = {{1000000, 0}, {1000000, 5}};
    ck_assert_int_eq(utimensat(AT_FDCWD, P("f"), ts, 0), 0);
    ck_assert(wait_for(WATCH_ATTR, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.mtime_ns, 1000000 * 1000000000ll + 5);
    recs_clear();

    /* touch -m (mtime only): the kernel says IN_MODIFY, indistinguishable
     * from a write, so this is one UPSERT_FILE with the new mtime. */
    struct timespec tm[2] = {{0, UTIME_OMIT}, {2000000, 7}};
    ck_assert_int_eq(utimensat(AT_FDCWD, P("f"), tm, 0), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].st.mtime_ns, 2000000 * 1000000000ll + 7);
    recs_clear();

    ck_assert_int_eq(chmod(P("d"), 0700), 0);
    ck_assert(wait_for(WATCH_ATTR, "d"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    recs_clear();

    /* chmod to the same mode changes nothing the owner cares about... but
     * ctime moves, so an ATTR is allowed; never an UPSERT. */
    ck_assert_int_eq(chmod(P("f"), 0600), 0);
    quiesce();
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, NULL), 0);
}
END_TEST

START_TEST(test_symlink_not_followed)
{
    ck_assert_int_eq(mkdir(P("dir"), 0755), 0);
    write_file(P("dir/inside"), "i", 0);
    start();
    ck_assert_int_eq(symlink("dir", P("ln")), 0);
    ck_assert_int_eq(symlink("/etc", P("abs")), 0);
    ck_assert(wait_for(WATCH_SYMLINK, "ln"));
    ck_assert(wait_for(WATCH_SYMLINK, "abs"));
    quiesce();
    ck_assert_int_eq(nrecs, 2);
    ck_assert_str_eq(find(WATCH_SYMLINK, "ln")->target, "dir");
    ck_assert_str_eq(find(WATCH_SYMLINK, "abs")->target, "/etc");
    ck_assert_int_eq(find(WATCH_SYMLINK, "ln")->st.type, WATCH_TYPE_SYMLINK);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 2); /* root and dir; never through the links */
    recs_clear();
    /* A directory swapped for a symlink to the outside: nothing outside is
     * ever reported. */
    char cmd[PATH_MAX + 64];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", P("dir"));
    ck_assert_int_eq(run(cmd), 0);
    ck_assert_int_eq(symlink(out, P("dir")), 0);
    char o[PATH_MAX + 8];
    snprintf(o, sizeof(o), "%s/secret", out);
    write_file(o, "s", 0);
    ck_assert(wait_for(WATCH_SYMLINK, "dir"));
    quiesce();
    for (size_t i = 0; i < nrecs; i++)
        ck_assert_msg(strncmp(recs[i].path, "dir/", 4) != 0, "reported %s", recs[i].path);
    ck_assert_int_eq(count(WATCH_REMOVE, "dir"), 1);
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 1);
    recs_clear();
    /* Retarget. */
    ck_assert_int_eq(unlink(P("ln")), 0);
    ck_assert_int_eq(symlink("elsewhere", P("ln")), 0);
    ck_assert(wait_for(WATCH_SYMLINK, "ln"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    ck_assert_str_eq(recs[0].target, "elsewhere");
}
END_TEST

/* vim :w with backupcopy=no, writebackup (strace of vim 9.0):
 * rename(f, f~); open(f, O_WRONLY|O_CREAT); write; fchmod; close; unlink(f~),
 * preceded by vim's "4913" probe file. */
static void vim_save_sequence(const char *f, const char *data)
{
    char bak[PATH_MAX + 2], probe[PATH_MAX];
    snprintf(bak, sizeof(bak), "%s~", f);
    snprintf(probe, sizeof(probe), "%s", f);
    char *slash = strrchr(probe, '/');
    snprintf(slash + 1, sizeof(probe) - (size_t)(slash + 1 - probe), "4913");
    int fd = open(probe, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW, 0600);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(unlink(probe), 0);
    ck_assert_int_eq(rename(f, bak), 0);
    fd = open(f, O_WRONLY | O_CREAT, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, data, strlen(data)), (ssize_t)strlen(data));
    ck_assert_int_eq(fchmod(fd, 0644), 0);
    ck_assert_int_eq(fsync(fd), 0);
    close(fd);
    ck_assert_int_eq(unlink(bak), 0);
}

/* GIO g_file_replace (gedit, gio save): write .goutputstream-XXXXXX, rename
 * it over the target. sed -i: the same with ./sedXXXXXX. */
static void temp_rename_sequence(const char *f, const char *tmpname, const char *data)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof(tmp), "%s", f);
    char *slash = strrchr(tmp, '/');
    snprintf(slash + 1, sizeof(tmp) - (size_t)(slash + 1 - tmp), "%s", tmpname);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, data, strlen(data)), (ssize_t)strlen(data));
    ck_assert_int_eq(fchmod(fd, 0644), 0);
    close(fd);
    ck_assert_int_eq(rename(tmp, f), 0);
}

static void assert_one_update(const char *path, uint64_t size)
{
    ck_assert(wait_for(WATCH_UPSERT_FILE, path));
    quiesce();
    if (nrecs != 1)
        recs_dump("editor save");
    ck_assert_int_eq(nrecs, 1);
    ck_assert_int_eq(recs[0].kind, WATCH_UPSERT_FILE);
    ck_assert_str_eq(recs[0].path, path);
    struct stat st;
    ck_assert_int_eq(lstat(P("%s", path), &st), 0);
    ck_assert_int_eq(recs[0].st.ino, st.st_ino);
    if (size != UINT64_MAX)
        ck_assert_int_eq(recs[0].st.size, size);
    recs_clear();
}

START_TEST(test_editor_saves)
{
    ck_assert_int_eq(mkdir(P("doc"), 0755), 0);
    write_file(P("doc/f.txt"), "hello\n", 0);
    start();
    vim_save_sequence(P("doc/f.txt"), "hello vim\n");
    assert_one_update("doc/f.txt", 10);
    temp_rename_sequence(P("doc/f.txt"), ".goutputstream-AB12CD", "hello gedit\n");
    assert_one_update("doc/f.txt", 12);
    temp_rename_sequence(P("doc/f.txt"), "sedXy12Zq", "hello sed\n");
    assert_one_update("doc/f.txt", 10);
}
END_TEST

START_TEST(test_backup_kept_and_rm_rf)
{
    write_file(P("f"), "v1", 0);
    ck_assert_int_eq(mkdir(P("big"), 0755), 0);
    ck_assert_int_eq(mkdir(P("big/sub"), 0755), 0);
    for (int i = 0; i < 50; i++)
        write_file(P("big/sub/%d", i), "x", 0);
    start();
    /* emacs-style save keeping the backup: the owner sees the rename, then
     * the new file. */
    ck_assert_int_eq(rename(P("f"), P("f~")), 0);
    write_file(P("f"), "v2!", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    quiesce();
    recs_dump("backup kept");
    ck_assert_int_eq(nrecs, 2);
    ck_assert_int_eq(recs[0].kind, WATCH_RENAME);
    ck_assert_str_eq(recs[0].from, "f");
    ck_assert_str_eq(recs[0].path, "f~");
    ck_assert_int_eq(recs[1].kind, WATCH_UPSERT_FILE);
    ck_assert_int_eq(recs[1].st.size, 3);
    recs_clear();
    /* rm -rf inside one debounce window: one REMOVE for the top. */
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", P("big"));
    ck_assert_int_eq(run(cmd), 0);
    ck_assert(wait_for(WATCH_REMOVE, "big"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 1);
    ck_assert_int_eq(s.nodes, 2); /* f and f~ */
}
END_TEST

START_TEST(test_real_editors)
{
    write_file(P("f.txt"), "hello\n", 0);
    start();
    char cmd[3 * PATH_MAX];
    if (access("/usr/bin/vim", X_OK) == 0) {
        snprintf(cmd, sizeof(cmd),
                 "cd '%s' && vim -N -u NONE -i NONE -n -c 'set backupcopy=no writebackup "
                 "nobackup backupskip=' -c 'normal! Goby vim' -c wq f.txt </dev/null "
                 ">/dev/null 2>&1",
                 root);
        ck_assert_int_eq(run(cmd), 0);
        assert_one_update("f.txt", UINT64_MAX);
    }
    if (access("/usr/bin/gio", X_OK) == 0) {
        snprintf(cmd, sizeof(cmd), "echo by gio | gio save '%s/f.txt' 2>/dev/null", root);
        if (run(cmd) == 0)
            assert_one_update("f.txt", 7);
    }
    snprintf(cmd, sizeof(cmd), "sed -i s/by/BY/ '%s/f.txt'", root);
    ck_assert_int_eq(run(cmd), 0);
    assert_one_update("f.txt", UINT64_MAX);
}
END_TEST

START_TEST(test_ignore)
{
    static const char *const pats[] = {"*.swp", "*~", "build/", "cache/*.o"};
    struct watch_options o;
    default_opts(&o);
    o.ignore = pats;
    o.n_ignore = PB_ARRAY_SIZE(pats);
    ck_assert_int_eq(mkdir(P("cache"), 0755), 0);
    start_opts(&o);
    recs_clear();
    write_file(P(".f.swp"), "s", 0);
    write_file(P("f~"), "b", 0);
    ck_assert_int_eq(mkdir(P("build"), 0755), 0);
    write_file(P("build/x"), "x", 0);
    write_file(P("cache/a.o"), "o", 0);
    write_file(P("a.o"), "o", 0); /* the cache pattern has a slash: anchored */
    write_file(P(".pickbox.tmp.42"), "t", 0);
    ck_assert_int_eq(mkdir(P(".pickbox"), 0755), 0);
    write_file(P(".pickbox/state"), "s", 0);
    ck_assert_int_eq(mkdir(P("cache/.pickbox"), 0755), 0); /* only the root one is special */
    write_file(P("ok"), "ok", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "ok"));
    quiesce();
    recs_dump("ignore");
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "a.o"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "cache/.pickbox"), 1);
    ck_assert_int_eq(nrecs, 3);
    /* A temp renamed onto a real name is a creation of that name. */
    recs_clear();
    write_file(P(".pickbox.tmp.7"), "applied", 0);
    ck_assert_int_eq(rename(P(".pickbox.tmp.7"), P("applied")), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "applied"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
    /* Bad paths for the API. */
    ck_assert_int_eq(watch_rescan(w, "/abs"), -EINVAL);
    ck_assert_int_eq(watch_rescan(w, "a/../b"), -EINVAL);
    ck_assert_int_eq(watch_suppress_begin(w, ""), -EINVAL);
}
END_TEST

START_TEST(test_overflow_injected)
{
    write_file(P("f"), "f", 0);
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    write_file(P("d/g"), "g", 0);
    start();
    /* Lose an event (a rename we never hear about), then overflow. */
    ck_assert_int_eq(rename(P("d"), P("e")), 0);
    watch_test_discard_events(w);
    watch_test_inject_overflow(w);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    quiesce();
    recs_dump("overflow");
    ck_assert_int_eq(recs[0].kind, WATCH_RESCAN_BEGIN);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "f"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "e"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "e/g"), 1);
    ck_assert_int_eq(nrecs, 5);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.overflows, 1);
    ck_assert_int_eq(s.watches, 2);
    recs_clear();
    /* The watch of the renamed directory now reports its new path. */
    write_file(P("e/h"), "h", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "e/h"));
}
END_TEST

START_TEST(test_overflow_real)
{
    FILE *f = fopen("/proc/sys/fs/inotify/max_queued_events", "r");
    long maxq = 16384;
    if (f) {
        if (fscanf(f, "%ld", &maxq) != 1)
            maxq = 16384;
        fclose(f);
    }
    if (maxq > 200000) {
        fprintf(stderr, "# max_queued_events=%ld too large, skipping the real overflow\n", maxq);
        return;
    }
    write_file(P("f"), "f", 0);
    start();
    /* Without running the loop, queue more events than the kernel keeps:
     * alternate chmods of two files (identical consecutive events merge). */
    write_file(P("g"), "g", 0);
    for (long i = 0; i < maxq / 2 + 100; i++) {
        ck_assert_int_eq(chmod(P("f"), (i & 1) ? 0600 : 0644), 0);
        ck_assert_int_eq(chmod(P("g"), (i & 1) ? 0600 : 0644), 0);
    }
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    quiesce();
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_ge(s.overflows, 1);
    ck_assert_int_eq(count(WATCH_RESCAN_BEGIN, ""), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "g"), 1);
}
END_TEST

START_TEST(test_watch_limit)
{
    struct watch_options o;
    default_opts(&o);
    o.add_watch = hook_add_watch;
    o.retry_min_ms = 50;
    o.retry_max_ms = 200;
    start_opts(&o);
    recs_clear();
    snprintf(fail_watch_suffix, sizeof(fail_watch_suffix), "/full");
    fail_watch_left = 2;
    ck_assert_int_eq(mkdir(P("full"), 0755), 0);
    write_file(P("full/early"), "e", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "full/early"));
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_ge(s.watch_failures, 1);
    /* Made while the directory may be unwatched: found by the retry's rescan
     * (or by the watch once it exists). */
    write_file(P("full/late"), "l", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "full/late"));
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    do {
        slice();
        watch_get_stats(w, &s);
    } while (s.unwatched && pb_now_ms() < end);
    ck_assert_int_eq(s.unwatched, 0);
    ck_assert_int_eq(s.watch_failures, 2);
    ck_assert_int_eq(s.watches, 2);
    write_file(P("full/watched"), "w", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "full/watched"));
    quiesce();
    ck_assert_int_eq(count(WATCH_MKDIR, "full"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "full/late"), 1);
}
END_TEST

START_TEST(test_periodic_rescan)
{
    write_file(P("f"), "f", 0);
    write_file(P("gone"), "g", 0);
    struct watch_options o;
    default_opts(&o);
    o.rescan_interval_ms = 150;
    start_opts(&o);
    recs_clear();
    write_file(P("f"), "changed!", O_TRUNC);
    write_file(P("new"), "n", 0);
    ck_assert_int_eq(unlink(P("gone")), 0);
    watch_test_discard_events(w); /* lost without an overflow */
    ck_assert(wait_for(WATCH_UPSERT_FILE, "new"));
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    ck_assert(wait_for(WATCH_REMOVE, "gone"));
    quiesce();
    recs_dump("periodic");
    ck_assert_int_eq(nrecs, 3);
    ck_assert_int_eq(count(WATCH_RESCAN_BEGIN, NULL), 0);
    ck_assert_int_eq(find(WATCH_UPSERT_FILE, "f")->st.size, 8);
    /* Nothing changed: the next periodic rescans emit nothing. */
    recs_clear();
    struct watch_stats s0, s1;
    watch_get_stats(w, &s0);
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    do {
        slice();
        watch_get_stats(w, &s1);
    } while (s1.rescans < s0.rescans + 2 && pb_now_ms() < end);
    ck_assert_int_ge(s1.rescans, s0.rescans + 2);
    ck_assert_int_eq(nrecs, 0);
}
END_TEST

START_TEST(test_rescan_subtree)
{
    ck_assert_int_eq(mkdir(P("a"), 0755), 0);
    write_file(P("a/x"), "x", 0);
    write_file(P("y"), "y", 0);
    start();
    ck_assert_int_eq(watch_rescan(w, "a"), 0);
    ck_assert(wait_for(WATCH_RESCAN_END, "a"));
    quiesce();
    recs_dump("rescan a");
    ck_assert_int_eq(nrecs, 4);
    ck_assert_int_eq(recs[0].kind, WATCH_RESCAN_BEGIN);
    ck_assert_str_eq(recs[0].path, "a");
    ck_assert_int_eq(count(WATCH_MKDIR, "a"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "a/x"), 1);
    ck_assert(find(WATCH_UPSERT_FILE, "a/x")->rescan);
}
END_TEST

START_TEST(test_suppression)
{
    write_file(P("f"), "old", 0);
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    start();
    /* The owner materializes f: temp, rename over, lstat, end. */
    ck_assert_int_eq(watch_suppress_begin(w, "f"), 0);
    write_file(P(".pickbox.tmp.1"), "new content", 0);
    ck_assert_int_eq(rename(P(".pickbox.tmp.1"), P("f")), 0);
    struct stat st;
    ck_assert_int_eq(lstat(P("f"), &st), 0);
    struct watch_stat ws;
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "f", &ws), 0);
    /* The owner creates a directory with a file, and removes nothing. */
    ck_assert_int_eq(watch_suppress_begin(w, "d/n"), 0);
    ck_assert_int_eq(mkdir(P("d/n"), 0755), 0);
    ck_assert_int_eq(lstat(P("d/n"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "d/n", &ws), 0);
    ck_assert_int_eq(watch_suppress_begin(w, "d/n/g"), 0);
    write_file(P("d/n/.pickbox.tmp.2"), "g", 0);
    ck_assert_int_eq(rename(P("d/n/.pickbox.tmp.2"), P("d/n/g")), 0);
    ck_assert_int_eq(lstat(P("d/n/g"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "d/n/g", &ws), 0);
    /* A rename op. */
    ck_assert_int_eq(watch_suppress_begin(w, "d"), 0);
    ck_assert_int_eq(watch_suppress_begin(w, "e"), 0);
    ck_assert_int_eq(rename(P("d"), P("e")), 0);
    ck_assert_int_eq(watch_suppress_rename(w, "d", "e"), 0);
    ck_assert_int_eq(lstat(P("e"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "e", &ws), 0);
    ck_assert_int_eq(watch_suppress_end(w, "d", NULL), 0);
    /* A delete op. */
    ck_assert_int_eq(watch_suppress_begin(w, "f"), 0);
    ck_assert_int_eq(unlink(P("f")), 0);
    ck_assert_int_eq(watch_suppress_end(w, "f", NULL), 0);
    quiesce();
    recs_dump("suppressed");
    ck_assert_int_eq(nrecs, 0);
    ck_assert_int_eq(watch_suppress_end(w, "f", NULL), -ENOENT);

    /* A user's edit after the apply is reported, with the new paths. */
    write_file(P("e/n/g"), "user edit", O_APPEND);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "e/n/g"));
    quiesce();
    ck_assert_int_eq(nrecs, 1);
}
END_TEST

START_TEST(test_odd_files)
{
    start();
    ck_assert_int_eq(mkfifo(P("fifo"), 0644), 0);
    ck_assert(wait_for(WATCH_UNSUPPORTED, "fifo"));
    write_file(P("h1"), "h", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "h1"));
    quiesce();
    recs_clear();
    ck_assert_int_eq(link(P("h1"), P("h2")), 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "h2"));
    quiesce();
    ck_assert_int_eq(find(WATCH_UPSERT_FILE, "h2")->st.nlink, 2);
    recs_clear();
    /* Names are byte strings: newline, invalid UTF-8, 255 bytes. */
    write_file(P("new\nline"), "1", 0);
    write_file(P("bad\xff\xfe"), "2", 0);
    char longname[256];
    memset(longname, 'L', 255);
    longname[255] = '\0';
    write_file(P("%s", longname), "3", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "new\nline"));
    ck_assert(wait_for(WATCH_UPSERT_FILE, "bad\xff\xfe"));
    ck_assert(wait_for(WATCH_UPSERT_FILE, longname));
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.unsupported, 1);
}
END_TEST

START_TEST(test_type_change)
{
    write_file(P("x"), "file", 0);
    start();
    ck_assert_int_eq(unlink(P("x")), 0);
    ck_assert_int_eq(mkdir(P("x"), 0755), 0);
    write_file(P("x/in"), "i", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "x/in"));
    quiesce();
    recs_dump("file -> dir");
    ck_assert_int_eq(nrecs, 3);
    ck_assert_int_eq(index_of(WATCH_REMOVE, "x"), 0);
    ck_assert_int_eq(index_of(WATCH_MKDIR, "x"), 1);
}
END_TEST

START_TEST(test_unmount_inside)
{
    ck_assert_int_eq(mkdir(P("m"), 0755), 0);
    if (mount("pickbox-test", P("m"), "tmpfs", 0, "size=1m") < 0) {
        fprintf(stderr, "# mount: %s, skipping the unmount test\n", strerror(errno));
        return;
    }
    write_file(P("m/before"), "b", 0);
    start();
    write_file(P("m/x"), "x", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "m/x"));
    quiesce();
    recs_clear();
    ck_assert_int_eq(umount(P("m")), 0);
    ck_assert(wait_for(WATCH_RESCAN_END, "m"));
    quiesce();
    recs_dump("unmount");
    ck_assert_int_eq(count(WATCH_RESCAN_BEGIN, "m"), 1);
    ck_assert_int_eq(count(WATCH_MKDIR, "m"), 1);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, NULL), 0);
    /* The directory under the mount point is watched again. */
    write_file(P("m/y"), "y", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "m/y"));
}
END_TEST

START_TEST(test_bad_root)
{
    struct pb_error err;
    pb_error_clear(&err);
    char path[PATH_MAX + 16];
    snprintf(path, sizeof(path), "%s/missing", top);
    ck_assert_ptr_null(watch_new(base, path, NULL, on_change, NULL, &err));
    ck_assert_int_eq(err.code, -ENOENT);
    snprintf(path, sizeof(path), "%s/link", top);
    ck_assert_int_eq(symlink(root, path), 0);
    ck_assert_ptr_null(watch_new(base, path, NULL, on_change, NULL, &err));
    ck_assert(strstr(err.msg, "symlink") != NULL);
    static const char *const bad[] = {"/"};
    struct watch_options o;
    watch_options_init(&o);
    o.ignore = bad;
    o.n_ignore = 1;
    ck_assert_ptr_null(watch_new(base, root, &o, on_change, NULL, &err));
    ck_assert_int_eq(err.code, -EINVAL);
}
END_TEST

/* ---- an owner model: applies candidates like the daemon would --------- */

struct oentry {
    char *path;
    enum watch_type type;
    bool seen; /* reported during the current full rescan */
};

static struct oentry owner[4096];
static size_t nowner;
static int owner_errors;
static bool owner_in_rescan;
static char owner_rescan_top[PATH_MAX];

static ptrdiff_t owner_find(const char *p)
{
    for (size_t i = 0; i < nowner; i++)
        if (strcmp(owner[i].path, p) == 0)
            return (ptrdiff_t)i;
    return -1;
}

static bool under(const char *p, const char *top_)
{
    size_t l = strlen(top_);
    if (l == 0)
        return true;
    return strncmp(p, top_, l) == 0 && (p[l] == '\0' || p[l] == '/');
}

static void owner_remove_tree(const char *p)
{
    for (size_t i = 0; i < nowner;) {
        if (under(owner[i].path, p)) {
            free(owner[i].path);
            owner[i] = owner[--nowner];
        } else {
            i++;
        }
    }
}

static void owner_error(const char *what, const char *p)
{
    fprintf(stderr, "# owner: %s: %s\n", what, p);
    owner_errors++;
}

static void owner_put(const char *p, enum watch_type t)
{
    const char *slash = strrchr(p, '/');
    if (slash) {
        char parent[PATH_MAX];
        snprintf(parent, sizeof(parent), "%.*s", (int)(slash - p), p);
        ptrdiff_t i = owner_find(parent);
        if (i < 0 || owner[i].type != WATCH_TYPE_DIR)
            owner_error("parent not a known directory", p);
    }
    ptrdiff_t i = owner_find(p);
    if (i >= 0 && owner[i].type != t) {
        owner_remove_tree(p); /* type change */
        i = -1;
    }
    if (i < 0) {
        ck_assert_int_lt(nowner, PB_ARRAY_SIZE(owner));
        owner[nowner].path = pb_xstrdup(p);
        owner[nowner].type = t;
        i = (ptrdiff_t)nowner++;
    }
    owner[i].seen = true;
}

static void owner_apply(const struct watch_change *c)
{
    switch (c->kind) {
    case WATCH_UPSERT_FILE:
    case WATCH_MKDIR:
    case WATCH_SYMLINK:
    case WATCH_UNSUPPORTED:
        owner_put(c->path, c->st.type);
        break;
    case WATCH_ATTR:
        if (owner_find(c->path) < 0)
            owner_error("ATTR of unknown", c->path);
        break;
    case WATCH_REMOVE:
        owner_remove_tree(c->path);
        break;
    case WATCH_RENAME: {
        ptrdiff_t i = owner_find(c->from);
        if (i < 0) {
            owner_error("RENAME of unknown", c->from);
            break;
        }
        owner_remove_tree(c->path);
        size_t fl = strlen(c->from);
        for (size_t k = 0; k < nowner; k++) {
            if (!under(owner[k].path, c->from))
                continue;
            char *np = pb_xasprintf("%s%s", c->path, owner[k].path + fl);
            free(owner[k].path);
            owner[k].path = np;
        }
        i = owner_find(c->path);
        if (i < 0 || owner[i].type != c->st.type)
            owner_error("RENAME type mismatch", c->path);
        break;
    }
    case WATCH_RESCAN_BEGIN:
        owner_in_rescan = true;
        snprintf(owner_rescan_top, sizeof(owner_rescan_top), "%s", c->path);
        for (size_t k = 0; k < nowner; k++)
            owner[k].seen = false;
        break;
    case WATCH_RESCAN_END:
        for (size_t k = 0; k < nowner;) {
            if (under(owner[k].path, owner_rescan_top) && !owner[k].seen) {
                free(owner[k].path);
                owner[k] = owner[--nowner];
            } else {
                k++;
            }
        }
        owner_in_rescan = false;
        break;
    }
}

static void on_change_owner(const struct watch_change *c, void *arg)
{
    if (getenv("CHECK_WATCH_TRACE"))
        fprintf(stderr, "#   -> %s %s%s%s\n", kind_name(c->kind), c->from ? c->from : "",
                c->from ? " -> " : "", c->path);
    on_change(c, arg);
    owner_apply(c);
}

static void owner_clear(void)
{
    for (size_t i = 0; i < nowner; i++)
        free(owner[i].path);
    nowner = 0;
    owner_errors = 0;
}

/* Compares the owner model with the disk; returns the number of mismatches. */
static int owner_compare_dir(const char *rel, int *seen)
{
    char abs[PATH_MAX + 600];
    snprintf(abs, sizeof(abs), "%s%s%s", root, *rel ? "/" : "", rel);
    DIR *d = opendir(abs);
    ck_assert_ptr_nonnull(d);
    int bad = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        if (!*rel && !strcmp(de->d_name, ".pickbox"))
            continue;
        if (!strncmp(de->d_name, ".pickbox.tmp.", 13))
            continue;
        char p[PATH_MAX];
        snprintf(p, sizeof(p), "%s%s%s", rel, *rel ? "/" : "", de->d_name);
        struct stat st;
        ck_assert_int_eq(fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW), 0);
        struct watch_stat ws;
        watch_stat_from_stat(&ws, &st);
        ptrdiff_t i = owner_find(p);
        (*seen)++;
        if (i < 0 || owner[i].type != ws.type) {
            fprintf(stderr, "# disk has %s (type %d), owner %s\n", p, ws.type,
                    i < 0 ? "does not" : "has another type");
            bad++;
        }
        if (S_ISDIR(st.st_mode))
            bad += owner_compare_dir(p, seen);
    }
    closedir(d);
    return bad;
}

static int owner_compare(void)
{
    int seen = 0;
    int bad = owner_compare_dir("", &seen);
    if ((size_t)seen != nowner) {
        fprintf(stderr, "# owner knows %zu paths, disk has %d\n", nowner, seen);
        for (size_t i = 0; i < nowner; i++) {
            struct stat st;
            if (lstat(P("%s", owner[i].path), &st) < 0)
                fprintf(stderr, "#   stale in owner: %s\n", owner[i].path);
        }
        bad++;
    }
    return bad;
}

/* ---- randomized: the owner's view converges to the disk --------------- */

static uint64_t rng_state;

static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

static void rand_rel(char *buf, size_t len)
{
    static const char *const names[] = {"a", "b", "c", "d"};
    int depth = 1 + (int)rnd(3);
    buf[0] = '\0';
    for (int i = 0; i < depth; i++) {
        size_t l = strlen(buf);
        snprintf(buf + l, len - l, "%s%s", i ? "/" : "", names[rnd(PB_ARRAY_SIZE(names))]);
    }
}

static void random_op(void)
{
    char a[64], b[64], cmd[4 * PATH_MAX];
    rand_rel(a, sizeof(a));
    rand_rel(b, sizeof(b));
    const char *pa = P("%s", a), *pb = P("%s", b);
    uint32_t op = rnd(12);
    if (getenv("CHECK_WATCH_TRACE"))
        fprintf(stderr, "# op %u %s %s\n", op, a, b);
    switch (op) {
    case 0:
    case 1: {
        int fd = open(pa, O_WRONLY | O_CREAT | (rnd(2) ? O_APPEND : O_TRUNC), 0644);
        if (fd >= 0) {
            (void)!write(fd, "data", 1 + rnd(4));
            close(fd);
        }
        break;
    }
    case 2:
        (void)mkdir(pa, 0755);
        break;
    case 3:
        (void)unlink(pa);
        break;
    case 4:
        (void)rmdir(pa);
        break;
    case 5:
    case 6:
        (void)rename(pa, pb);
        break;
    case 7: { /* editor save: temp + rename over */
        char tmp[PATH_MAX + 600];
        snprintf(tmp, sizeof(tmp), "%s.goutputstream-X", pa);
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            (void)!write(fd, "saved", 5);
            close(fd);
            if (rename(tmp, pa) < 0)
                (void)unlink(tmp);
        }
        break;
    }
    case 8: { /* vim: rename to backup, write, unlink backup */
        char bak[PATH_MAX + 600];
        snprintf(bak, sizeof(bak), "%s~", pa);
        struct stat st;
        if (lstat(pa, &st) == 0 && S_ISREG(st.st_mode) && rename(pa, bak) == 0) {
            int fd = open(pa, O_WRONLY | O_CREAT, 0644);
            if (fd >= 0) {
                (void)!write(fd, "vim", 3);
                close(fd);
            }
            (void)unlink(bak);
        }
        break;
    }
    case 9: /* move out, or in */
        snprintf(cmd, sizeof(cmd), "%s/%s", out, rnd(2) ? "x" : "y");
        if (rnd(2))
            (void)rename(pa, cmd);
        else
            (void)rename(cmd, pa);
        break;
    case 10:
        (void)chmod(pa, rnd(2) ? 0600 : 0755);
        break;
    case 11:
        (void)symlink("target", pa);
        break;
    }
}

/* The owner applies an op the way the daemon does, inside
 * watch_suppress_begin/end, and records in its model what it told the
 * watcher it knows. */
static void owner_end(const char *rel)
{
    struct stat st;
    if (lstat(P("%s", rel), &st) == 0) {
        struct watch_stat ws;
        watch_stat_from_stat(&ws, &st);
        ck_assert_int_eq(watch_suppress_end(w, rel, &ws), 0);
        owner_put(rel, ws.type);
    } else {
        ck_assert_int_eq(watch_suppress_end(w, rel, NULL), 0);
        owner_remove_tree(rel);
    }
}

static void owner_random_op(void)
{
    /* A known directory (or the root) as the parent, a random leaf. */
    const char *parent = "";
    size_t tries = nowner;
    while (tries--) {
        const struct oentry *e = &owner[rnd((uint32_t)nowner)];
        if (e->type == WATCH_TYPE_DIR && strlen(e->path) < 40) {
            parent = e->path;
            break;
        }
    }
    static const char *const leaves[] = {"a", "b", "c", "d"};
    char rel[64];
    snprintf(rel, sizeof(rel), "%s%s%s", parent, *parent ? "/" : "",
             leaves[rnd(PB_ARRAY_SIZE(leaves))]);
    char par[64];
    snprintf(par, sizeof(par), "%s", parent);
    ck_assert_int_eq(watch_suppress_begin(w, rel), 0);
    uint32_t op = rnd(3);
    if (getenv("CHECK_WATCH_TRACE"))
        fprintf(stderr, "# owner op %u %s\n", op, rel);
    switch (op) {
    case 0: { /* PUT: temp, rename over */
        char tmp[PATH_MAX + 600];
        snprintf(tmp, sizeof(tmp), "%s%s%s/.pickbox.tmp.%u", root, *par ? "/" : "", par, rnd(1000));
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            (void)!write(fd, "applied", 1 + rnd(7));
            close(fd);
            if (rename(tmp, P("%s", rel)) < 0)
                (void)unlink(tmp);
        }
        break;
    }
    case 1:
        (void)mkdir(P("%s", rel), 0755);
        break;
    case 2: {
        struct stat st;
        if (owner_find(rel) >= 0 && lstat(P("%s", rel), &st) == 0 && !S_ISDIR(st.st_mode))
            (void)unlink(P("%s", rel));
        break;
    }
    }
    owner_end(rel);
}

static void random_run(uint64_t seed, int ops)
{
    rng_state = seed * 2654435761u + 1;
    owner_clear();
    struct pb_error err;
    struct watch_options o;
    default_opts(&o);
    if (seed % 4 == 3)
        o.scan_slice = 3; /* rescans in many steps, with the owner applying between them */
    w = watch_new(base, root, &o, on_change_owner, NULL, &err);
    ck_assert_ptr_nonnull(w);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    for (int i = 0; i < ops; i++) {
        if (seed % 2 == 0 && rnd(3) == 0)
            owner_random_op();
        else
            random_op();
        /* Now and then lose track on purpose. */
        if (rnd(100) == 0)
            watch_test_inject_overflow(w);
        else if (rnd(100) == 0)
            ck_assert_int_eq(watch_rescan(w, rnd(2) ? "a" : "b/c"), 0);
        /* Vary how much happens between two looks at the queue. */
        uint32_t r = rnd(10);
        if (seed % 3 == 0)
            continue;
        if (r < 3)
            event_base_loop(base, EVLOOP_NONBLOCK);
        else if (r < (seed % 3 == 1 ? 4u : 8u))
            slice();
    }
    quiesce();
    int bad = owner_compare();
    if (bad || owner_errors)
        recs_dump("random");
    ck_assert_msg(bad == 0 && owner_errors == 0, "seed %" PRIu64 ": %d mismatches, %d errors", seed,
                  bad, owner_errors);
    /* A full rescan agrees. */
    recs_clear();
    ck_assert_int_eq(watch_rescan(w, ""), 0);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    quiesce();
    ck_assert_int_eq(owner_compare(), 0);
    watch_free(w);
    w = NULL;
    owner_clear();
}

/* A file written and closed is reported settle_ms after the close, not
 * debounce_ms (huge here); a chmod still waits the debounce. */
START_TEST(test_settle_after_close)
{
    write_file(P("g"), "g", 0);
    struct watch_options o;
    default_opts(&o);
    o.debounce_ms = 60000;
    o.max_delay_ms = 120000;
    o.write_hold_ms = 120000;
    o.rename_window_ms = 5;
    struct pb_error err;
    w = watch_new(base, root, &o, on_change, NULL, &err);
    ck_assert_ptr_nonnull(w);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    recs_clear();
    ck_assert_int_eq(chmod(P("g"), 0600), 0);
    write_file(P("f"), "new", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "f"));
    ck_assert_int_eq(count(WATCH_ATTR, "g"), 0);
    ck_assert_int_eq(nrecs, 1);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.pending, 1); /* g */
}
END_TEST

/* ---- sliced rescans ---------------------------------------------------- */

static bool zero_timer_fired;

static void on_zero_timer(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    zero_timer_fired = true;
}

/* Makes n directories d0..d<n-1> of per files each. */
static void make_dirs(int n, int per)
{
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq(mkdir(P("d%d", i), 0755), 0);
        for (int k = 0; k < per; k++)
            write_file(P("d%d/f%d", i, k), "x", 0);
    }
}

/* One loop turn; true when RESCAN_END "" has arrived. */
static bool turn_until_end(void)
{
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    return find(WATCH_RESCAN_END, "") != NULL;
}

START_TEST(test_scan_sliced)
{
    make_dirs(10, 30);
    struct watch_options o;
    default_opts(&o);
    o.scan_slice = 16;
    struct pb_error err;
    w = watch_new(base, root, &o, on_change, NULL, &err);
    ck_assert_ptr_nonnull(w);
    /* The first turn begins the rescan; other events run between its steps. */
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    ck_assert_int_eq(count(WATCH_RESCAN_BEGIN, ""), 1);
    ck_assert_ptr_null(find(WATCH_RESCAN_END, ""));
    struct event *zt = evtimer_new(base, on_zero_timer, NULL);
    struct timeval zero = {0, 0};
    evtimer_add(zt, &zero);
    int turns = 1;
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    while (!turn_until_end() && pb_now_ms() < end)
        turns++;
    ck_assert_ptr_nonnull(find(WATCH_RESCAN_END, ""));
    ck_assert_msg(turns >= 310 / 16, "the scan took %d turns", turns);
    ck_assert(zero_timer_fired);
    event_free(zt);
    quiesce();
    /* Everything exactly once, inside BEGIN ... END, flagged rescan. */
    ck_assert_int_eq(nrecs, 2 + 10 + 300);
    ck_assert_int_eq(recs[0].kind, WATCH_RESCAN_BEGIN);
    ck_assert_int_eq(recs[nrecs - 1].kind, WATCH_RESCAN_END);
    for (int i = 0; i < 10; i++) {
        char d[16], f[24];
        snprintf(d, sizeof(d), "d%d", i);
        snprintf(f, sizeof(f), "d%d/f0", i);
        ck_assert_int_eq(count(WATCH_MKDIR, d), 1);
        ck_assert_int_lt(index_of(WATCH_MKDIR, d), index_of(WATCH_UPSERT_FILE, f));
    }
    for (size_t i = 1; i + 1 < nrecs; i++)
        ck_assert(recs[i].rescan);
    struct watch_stats s;
    watch_get_stats(w, &s);
    ck_assert_int_eq(s.watches, 11);
    /* Events that waited in the queue meanwhile are read afterwards. */
    recs_clear();
    write_file(P("d3/new"), "n", 0);
    ck_assert(wait_for(WATCH_UPSERT_FILE, "d3/new"));
}
END_TEST

/* Candidates due at once are emitted at most scan_slice per loop turn,
 * parents first, and a path the owner holds meanwhile waits for its end. */
START_TEST(test_flush_sliced)
{
    struct watch_options o;
    default_opts(&o);
    o.scan_slice = 4;
    start_opts(&o);
    recs_clear();
    ck_assert_int_eq(mkdir(P("d"), 0755), 0);
    for (int i = 0; i < 40; i++)
        write_file(P("d/f%02d", i), "x", 0);
    int turns = 0;
    bool held = false;
    uint64_t end = pb_now_ms() + DEADLINE_MS;
    while (count(WATCH_UPSERT_FILE, NULL) < 39 && pb_now_ms() < end) {
        size_t before = nrecs;
        event_base_loop(base, EVLOOP_ONCE);
        ck_assert_int_le(nrecs - before, 4);
        if (nrecs > before)
            turns++;
        if (nrecs && !held) {
            /* The flush has begun: the owner takes d/f39 (not reported yet:
             * the first turns report d and the low numbers). */
            ck_assert_int_eq(count(WATCH_UPSERT_FILE, "d/f39"), 0);
            ck_assert_int_eq(watch_suppress_begin(w, "d/f39"), 0);
            held = true;
        }
    }
    ck_assert_int_ge(turns, 10);
    ck_assert_int_eq(count(WATCH_MKDIR, "d"), 1);
    ck_assert_int_eq(index_of(WATCH_MKDIR, "d"), 0);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, NULL), 39);
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "d/f39"), 0);
    /* Released with what the owner says is there: nothing to report. */
    struct stat st;
    struct watch_stat ws;
    ck_assert_int_eq(lstat(P("d/f39"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "d/f39", &ws), 0);
    quiesce();
    ck_assert_int_eq(count(WATCH_UPSERT_FILE, "d/f39"), 0);
    ck_assert_int_eq(nrecs, 40);
}
END_TEST

/* The owner applies while a sliced scan is half done: a queued directory is
 * renamed, another is replaced (its node freed while queued), one becomes a
 * file. The owner's view still ends equal to the disk. */
START_TEST(test_scan_sliced_owner)
{
    make_dirs(10, 20);
    ck_assert_int_eq(run_fmt("rm -rf '%s/d6'/*", root), 0);
    owner_clear();
    struct watch_options o;
    default_opts(&o);
    o.scan_slice = 8;
    struct pb_error err;
    w = watch_new(base, root, &o, on_change_owner, NULL, &err);
    ck_assert_ptr_nonnull(w);
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    ck_assert_int_eq(count(WATCH_RESCAN_BEGIN, ""), 1);
    ck_assert_ptr_null(find(WATCH_RESCAN_END, ""));
    struct stat st;
    struct watch_stat ws;
    /* d9 -> x */
    ck_assert_int_eq(watch_suppress_begin(w, "d9"), 0);
    ck_assert_int_eq(watch_suppress_begin(w, "x"), 0);
    ck_assert_int_eq(rename(P("d9"), P("x")), 0);
    ck_assert_int_eq(watch_suppress_rename(w, "d9", "x"), 0);
    ck_assert_int_eq(lstat(P("x"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "x", &ws), 0);
    ck_assert_int_eq(watch_suppress_end(w, "d9", NULL), 0);
    owner_remove_tree("d9");
    owner_put("x", WATCH_TYPE_DIR);
    /* d7 over the empty d6 */
    ck_assert_int_eq(watch_suppress_begin(w, "d7"), 0);
    ck_assert_int_eq(watch_suppress_begin(w, "d6"), 0);
    ck_assert_int_eq(rename(P("d7"), P("d6")), 0);
    ck_assert_int_eq(watch_suppress_rename(w, "d7", "d6"), 0);
    ck_assert_int_eq(lstat(P("d6"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "d6", &ws), 0);
    ck_assert_int_eq(watch_suppress_end(w, "d7", NULL), 0);
    owner_remove_tree("d7");
    owner_remove_tree("d6");
    owner_put("d6", WATCH_TYPE_DIR);
    /* d8 becomes a file */
    ck_assert_int_eq(watch_suppress_begin(w, "d8"), 0);
    ck_assert_int_eq(run_fmt("rm -rf '%s/d8'", root), 0);
    write_file(P("d8"), "file now", 0);
    ck_assert_int_eq(lstat(P("d8"), &st), 0);
    watch_stat_from_stat(&ws, &st);
    ck_assert_int_eq(watch_suppress_end(w, "d8", &ws), 0);
    owner_remove_tree("d8");
    owner_put("d8", WATCH_TYPE_FILE);
    /* and the user removes a directory the scan has not read yet */
    ck_assert_int_eq(run_fmt("rm -rf '%s/d5'", root), 0);
    ck_assert(wait_for(WATCH_RESCAN_END, ""));
    quiesce();
    int bad = owner_compare();
    if (bad || owner_errors)
        recs_dump("sliced owner");
    ck_assert_int_eq(bad, 0);
    ck_assert_int_eq(owner_errors, 0);
    owner_clear();
}
END_TEST

START_TEST(test_random_ops)
{
    const char *env = getenv("CHECK_WATCH_SEEDS");
    int seeds = env ? atoi(env) : 8;
    const char *first = getenv("CHECK_WATCH_SEED");
    if (getenv("CHECK_WATCH_TRACE"))
        log_set_level(LOG_LEVEL_DEBUG);
    for (int s = first ? atoi(first) : 1; s <= seeds; s++) {
        char cmd[PATH_MAX + 600];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'/* '%s'/*", root, out);
        ck_assert_int_eq(run(cmd), 0);
        recs_clear();
        random_run((uint64_t)s + (uint64_t)_i * 1000, 300);
    }
}
END_TEST

static const struct {
    const char *name;
    const TTest *const *test;
} tests[] = {
        {"test_initial_scan", &test_initial_scan},
        {"test_file_lifecycle", &test_file_lifecycle},
        {"test_write_hold", &test_write_hold},
        {"test_mkdir_race_and_rmdir", &test_mkdir_race_and_rmdir},
        {"test_rename_file", &test_rename_file},
        {"test_rename_dir", &test_rename_dir},
        {"test_move_out_and_in", &test_move_out_and_in},
        {"test_chmod_touch", &test_chmod_touch},
        {"test_symlink_not_followed", &test_symlink_not_followed},
        {"test_editor_saves", &test_editor_saves},
        {"test_backup_kept_and_rm_rf", &test_backup_kept_and_rm_rf},
        {"test_real_editors", &test_real_editors},
        {"test_ignore", &test_ignore},
        {"test_overflow_injected", &test_overflow_injected},
        {"test_overflow_real", &test_overflow_real},
        {"test_watch_limit", &test_watch_limit},
        {"test_periodic_rescan", &test_periodic_rescan},
        {"test_rescan_subtree", &test_rescan_subtree},
        {"test_suppression", &test_suppression},
        {"test_odd_files", &test_odd_files},
        {"test_type_change", &test_type_change},
        {"test_unmount_inside", &test_unmount_inside},
        {"test_bad_root", &test_bad_root},
        {"test_random_ops", &test_random_ops},
        {"test_settle_after_close", &test_settle_after_close},
        {"test_scan_sliced", &test_scan_sliced},
        {"test_flush_sliced", &test_flush_sliced},
        {"test_scan_sliced_owner", &test_scan_sliced_owner},
};

/* CHECK_WATCH_ONLY=test_name runs one test (debugging). */
static Suite *watch_suite(void)
{
    Suite *s = suite_create("watch");
    TCase *tc = tcase_create("inotify");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    const char *only = getenv("CHECK_WATCH_ONLY");
    for (size_t i = 0; i < PB_ARRAY_SIZE(tests); i++)
        if (!only || strcmp(only, tests[i].name) == 0)
            tcase_add_test(tc, *tests[i].test);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(watch_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
