/*
 * tree.c: safe, atomic, conditional I/O on the tree (see tree.h).
 *
 * The one rule of this file: a path from an op is never handed to a system
 * call that resolves it from "/" or follows links. It is validated with
 * fsm_path_valid(), its parent is opened with openat2() beneath the root
 * without symlinks, and its last component is used with *at() calls that do
 * not follow it (AT_SYMLINK_NOFOLLOW, O_NOFOLLOW, unlinkat, renameat2).
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fsm/tree.h"
#include "lib/log.h"
#include "lib/util.h"

#define TREE_MARKER_FILE  "marker"
#define TREE_TMP_NAME_LEN (sizeof(FSM_TMP_PREFIX) - 1 + 16)
/* openat2 returns EAGAIN when a concurrent rename might have let the walk
 * escape; retrying is the documented answer. */
#define TREE_OPENAT2_RETRIES 16

struct fsm_tree {
    int root_fd;
    char *root;
    bool walk; /* no openat2 (old kernel, valgrind): resolve component by component */
};

/* ---- small helpers ------------------------------------------------------- */

static int sys_openat2(int dirfd, const char *path, int flags, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = (uint64_t)flags;
    how.resolve = resolve;
    for (int i = 0; i < TREE_OPENAT2_RETRIES; i++) {
        long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
        if (fd >= 0)
            return (int)fd;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
    }
    return -EAGAIN;
}

#define TREE_RESOLVE (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)

/*
 * The fallback when the kernel has no openat2: open each component of a
 * validated relative path (no "", ".", "..", no leading '/') with
 * O_NOFOLLOW | O_DIRECTORY from the previous one. A symlink anywhere fails
 * with ELOOP, a non-directory with ENOTDIR, as openat2 does with
 * RESOLVE_NO_SYMLINKS; ".." cannot occur, so nothing resolves above the root.
 */
static int walk_beneath(int root_fd, const char *rel)
{
    char comp[FSM_NAME_MAX + 1];
    int cur = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cur < 0)
        return -errno;
    if (strcmp(rel, ".") == 0)
        return cur;
    for (const char *p = rel; *p != '\0';) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n == 0 || n > FSM_NAME_MAX) {
            close(cur);
            return -EINVAL;
        }
        memcpy(comp, p, n);
        comp[n] = '\0';
        int next = openat(cur, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        int e = errno;
        struct stat st;
        /* O_DIRECTORY wins over O_NOFOLLOW (ENOTDIR); report a symlink as
         * openat2 would. */
        if (next < 0 && e == ENOTDIR && fstatat(cur, comp, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            S_ISLNK(st.st_mode))
            e = ELOOP;
        close(cur);
        if (next < 0)
            return -e;
        cur = next;
        p += n + (slash ? 1 : 0);
    }
    return cur;
}

/* Opens directory rel (a validated relative path or ".") beneath the root. */
static int open_beneath(const struct fsm_tree *t, const char *rel)
{
    if (t->walk)
        return walk_beneath(t->root_fd, rel);
    return sys_openat2(t->root_fd, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC, TREE_RESOLVE);
}

static void close_keep_errno(int fd)
{
    int e = errno;
    if (fd >= 0)
        close(fd);
    errno = e;
}

static int64_t ts_to_ns(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static struct timespec ns_to_ts(int64_t ns)
{
    struct timespec ts;
    int64_t sec = ns / 1000000000LL, rem = ns % 1000000000LL;
    if (rem < 0) { /* floor division for times before the epoch */
        rem += 1000000000LL;
        sec -= 1;
    }
    ts.tv_sec = (time_t)sec;
    ts.tv_nsec = (long)rem;
    return ts;
}

static void stat_from(const struct stat *s, struct fsm_tree_stat *st)
{
    memset(st, 0, sizeof(*st));
    if (S_ISREG(s->st_mode))
        st->kind = FSM_KIND_FILE;
    else if (S_ISDIR(s->st_mode))
        st->kind = FSM_KIND_DIR;
    else if (S_ISLNK(s->st_mode))
        st->kind = FSM_KIND_SYMLINK;
    else
        st->kind = FSM_KIND_OTHER;
    st->mode = (uint32_t)s->st_mode & 07777u;
    st->size = (uint64_t)s->st_size;
    st->mtime_ns = ts_to_ns(&s->st_mtim);
    st->ino = (uint64_t)s->st_ino;
}

/* lstat of name in dirfd; kind NONE when absent. */
static int stat_at(int dirfd, const char *name, struct fsm_tree_stat *st)
{
    struct stat s;
    if (fstatat(dirfd, name, &s, AT_SYMLINK_NOFOLLOW) < 0) {
        if (errno == ENOENT) {
            memset(st, 0, sizeof(*st));
            return 0;
        }
        return -errno;
    }
    stat_from(&s, st);
    return 0;
}

bool fsm_tree_stat_matches(const struct fsm_tree_stat *expect, const struct fsm_tree_stat *actual)
{
    if (expect->kind != actual->kind)
        return false;
    switch (expect->kind) {
    case FSM_KIND_NONE:
        return true;
    case FSM_KIND_FILE:
        return expect->size == actual->size && expect->mtime_ns == actual->mtime_ns &&
               expect->ino == actual->ino &&
               (expect->mode & FSM_TREE_MODE_MASK) == (actual->mode & FSM_TREE_MODE_MASK);
    case FSM_KIND_SYMLINK:
        return expect->size == actual->size && expect->mtime_ns == actual->mtime_ns &&
               expect->ino == actual->ino;
    case FSM_KIND_DIR:
        return expect->ino == actual->ino &&
               (expect->mode & FSM_TREE_MODE_MASK) == (actual->mode & FSM_TREE_MODE_MASK);
    case FSM_KIND_OTHER:
        return false; /* never an expectation */
    }
    return false;
}

/*
 * Opens the parent directory of a validated path beneath the root (O_RDONLY,
 * so it can be fsync'ed) and points *name at the last component inside path.
 */
static int open_parent(struct fsm_tree *t, const char *path, int *dirfd, const char **name)
{
    char parent[FSM_PATH_MAX + 1];
    if (!fsm_path_valid(path))
        return -EINVAL;
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        parent[0] = '.';
        parent[1] = '\0';
        *name = path;
    } else {
        size_t n = (size_t)(slash - path);
        memcpy(parent, path, n);
        parent[n] = '\0';
        *name = slash + 1;
    }
    int fd = open_beneath(t, parent);
    if (fd < 0)
        return fd;
    *dirfd = fd;
    return 0;
}

static int check_expect(int dirfd, const char *name, const struct fsm_tree_stat *expect)
{
    struct fsm_tree_stat now;
    int rc = stat_at(dirfd, name, &now);
    if (rc < 0)
        return rc;
    return fsm_tree_stat_matches(expect, &now) ? 0 : -FSM_TREE_EPENDING;
}

static int tmp_name(char out[TREE_TMP_NAME_LEN + 1])
{
    uint8_t r[8];
    ssize_t n;
    do {
        n = getrandom(r, sizeof(r), 0);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(r))
        return -EIO;
    int len = snprintf(out, TREE_TMP_NAME_LEN + 1, "%s%02x%02x%02x%02x%02x%02x%02x%02x",
                       FSM_TMP_PREFIX, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
    return len == (int)TREE_TMP_NAME_LEN ? 0 : -EIO;
}

static int set_times_fd(int fd, int64_t mtime_ns)
{
    struct timespec ts[2];
    ts[0].tv_sec = 0;
    ts[0].tv_nsec = UTIME_OMIT;
    ts[1] = ns_to_ts(mtime_ns);
    return futimens(fd, ts) < 0 ? -errno : 0;
}

/* A directory always keeps its owner's rwx on disk: without them the daemon
 * could neither apply nor watch anything below it (the index keeps the mode
 * as replicated). */
static uint32_t dir_mode(uint32_t mode)
{
    return (mode & FSM_TREE_MODE_MASK) | 0700u;
}

static int fsync_dir(int dirfd)
{
    /* EINVAL: the filesystem cannot sync directories; nothing more to do. */
    if (fsync(dirfd) < 0 && errno != EINVAL)
        return -errno;
    return 0;
}

/* ---- open, close, marker, temp cleanup ----------------------------------- */

int fsm_tree_init(const char *root, struct pb_error *err)
{
    int fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return pb_error_set(err, -errno, "tree %s: %s", root, strerror(errno));
    int rc = 0;
    if (mkdirat(fd, FSM_MARKER_NAME, 0700) < 0 && errno != EEXIST) {
        rc = pb_error_set(err, -errno, "tree %s: mkdir %s: %s", root, FSM_MARKER_NAME,
                          strerror(errno));
        goto out;
    }
    int mfd = openat(fd, FSM_MARKER_NAME, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (mfd < 0) {
        rc = pb_error_set(err, -errno, "tree %s: %s is not a directory", root, FSM_MARKER_NAME);
        goto out;
    }
    int ffd = openat(mfd, TREE_MARKER_FILE, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (ffd < 0) {
        rc = pb_error_set(err, -errno, "tree %s: marker file: %s", root, strerror(errno));
    } else {
        static const char text[] = "pickbox tree marker: do not delete this directory\n";
        if (pwrite(ffd, text, sizeof(text) - 1, 0) != (ssize_t)(sizeof(text) - 1) || fsync(ffd) < 0)
            rc = pb_error_set(err, -EIO, "tree %s: cannot write the marker", root);
        close(ffd);
    }
    if (rc == 0 && (fsync_dir(mfd) < 0 || fsync_dir(fd) < 0))
        rc = pb_error_set(err, -EIO, "tree %s: fsync failed", root);
    close(mfd);
out:
    close(fd);
    return rc;
}

int fsm_tree_check_marker(struct fsm_tree *t)
{
    struct stat s;
    if (fstatat(t->root_fd, FSM_MARKER_NAME, &s, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(s.st_mode))
        return -FSM_TREE_ENOMARKER;
    return 0;
}

static bool is_tmp_name(const char *name)
{
    return strncmp(name, FSM_TMP_PREFIX, sizeof(FSM_TMP_PREFIX) - 1) == 0;
}

int fsm_tree_clean_temps(struct fsm_tree *t, unsigned *removed)
{
    /* Depth-first over an explicit stack of relative paths: no recursion and
     * no pile of open descriptors, however deep the tree is. */
    char **stack = NULL;
    size_t n = 0, cap = 0;
    unsigned count = 0;
    int rc = 0;
    stack = pb_xreallocarray(NULL, 8, sizeof(*stack));
    cap = 8;
    stack[n++] = pb_xstrdup(".");
    while (n > 0) {
        char *dir = stack[--n];
        int fd = open_beneath(t, dir);
        if (fd < 0) {
            /* Vanished or replaced meanwhile: nothing of ours to clean. */
            if (fd != -ENOENT && fd != -ENOTDIR && fd != -ELOOP)
                log_warning("tree %s: cannot scan %s for temp files: %s", t->root, dir,
                            strerror(-fd));
            free(dir);
            continue;
        }
        DIR *d = fdopendir(fd);
        if (d == NULL) {
            rc = -errno;
            close(fd);
            free(dir);
            break;
        }
        bool at_root = strcmp(dir, ".") == 0;
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            const char *nm = de->d_name;
            if (strcmp(nm, ".") == 0 || strcmp(nm, "..") == 0)
                continue;
            if (at_root && strcmp(nm, FSM_MARKER_NAME) == 0)
                continue;
            unsigned char type = de->d_type;
            if (type == DT_UNKNOWN) {
                struct stat s;
                if (fstatat(dirfd(d), nm, &s, AT_SYMLINK_NOFOLLOW) < 0)
                    continue;
                type = S_ISDIR(s.st_mode) ? DT_DIR : DT_REG;
            }
            if (type == DT_DIR) {
                size_t need = strlen(dir) + 1 + strlen(nm);
                if (need > FSM_PATH_MAX)
                    continue;
                if (n == cap) {
                    cap *= 2;
                    stack = pb_xreallocarray(stack, cap, sizeof(*stack));
                }
                stack[n++] = at_root ? pb_xstrdup(nm) : pb_xasprintf("%s/%s", dir, nm);
            } else if (is_tmp_name(nm)) {
                if (unlinkat(dirfd(d), nm, 0) == 0)
                    count++;
                else if (errno != ENOENT)
                    log_warning("tree %s: cannot remove %s/%s: %s", t->root, dir, nm,
                                strerror(errno));
            }
        }
        closedir(d);
        free(dir);
    }
    while (n > 0)
        free(stack[--n]);
    free(stack);
    if (removed != NULL)
        *removed = count;
    return rc;
}

int fsm_tree_open(const char *root, struct fsm_tree **out, struct pb_error *err)
{
    *out = NULL;
    int fd = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return pb_error_set(err, -errno, "tree %s: %s", root, strerror(errno));
    /* Probe openat2 once: without it (Linux < 5.6, or valgrind < 3.21 which
     * does not know the system call) paths are walked component by
     * component, which is as strict but costs one open per component. */
    bool walk = false;
    int probe = sys_openat2(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC, TREE_RESOLVE);
    if (probe == -ENOSYS) {
        /* Expected under systemd's RestrictSUIDSGID= (its seccomp filter
         * cannot see openat2's mode), so said once per process, as info. */
        static bool said;
        if (!said)
            log_info("tree %s: openat2 is not available (old kernel or a seccomp filter); "
                     "resolving paths component by component",
                     root);
        said = true;
        walk = true;
    } else if (probe < 0) {
        close(fd);
        return pb_error_set(err, probe, "tree %s: openat2: %s", root, strerror(-probe));
    } else {
        close(probe);
    }
    struct fsm_tree *t = pb_xcalloc(1, sizeof(*t));
    t->root_fd = fd;
    t->root = pb_xstrdup(root);
    t->walk = walk;
    if (fsm_tree_check_marker(t) < 0) {
        fsm_tree_close(t);
        return pb_error_set(err, -FSM_TREE_ENOMARKER,
                            "tree %s has no %s/ marker directory: not mounted, replaced or never "
                            "initialised; refusing to use it",
                            root, FSM_MARKER_NAME);
    }
    unsigned removed = 0;
    int rc = fsm_tree_clean_temps(t, &removed);
    if (rc < 0) {
        fsm_tree_close(t);
        return pb_error_set(err, rc, "tree %s: temp cleanup: %s", root, strerror(-rc));
    }
    if (removed > 0)
        log_notice("tree %s: removed %u stale temp files", root, removed);
    *out = t;
    return 0;
}

void fsm_tree_close(struct fsm_tree *t)
{
    if (t == NULL)
        return;
    if (t->root_fd >= 0)
        close(t->root_fd);
    free(t->root);
    free(t);
}

/* ---- reading ------------------------------------------------------------- */

int fsm_tree_lstat(struct fsm_tree *t, const char *path, struct fsm_tree_stat *st)
{
    int dfd;
    const char *name;
    int rc = open_parent(t, path, &dfd, &name);
    if (rc == -ENOENT) { /* no parent, no entry */
        memset(st, 0, sizeof(*st));
        return 0;
    }
    if (rc < 0)
        return rc;
    rc = stat_at(dfd, name, st);
    close(dfd);
    return rc;
}

int fsm_tree_open_file(struct fsm_tree *t, const char *path, int *fd)
{
    int dfd;
    const char *name;
    int rc = open_parent(t, path, &dfd, &name);
    if (rc < 0)
        return rc;
    int f = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    rc = f < 0 ? -errno : 0;
    close(dfd);
    if (rc < 0)
        return rc;
    struct stat s;
    if (fstat(f, &s) < 0 || !S_ISREG(s.st_mode)) {
        close(f);
        return -EINVAL;
    }
    *fd = f;
    return 0;
}

/* ---- writing ------------------------------------------------------------- */

/* Renames tmp over name in dirfd: without replacing when expect is NONE. */
static int rename_into_place(int dirfd, const char *tmp, const char *name,
                             const struct fsm_tree_stat *expect)
{
    int rc = check_expect(dirfd, name, expect);
    if (rc < 0)
        return rc;
    if (expect->kind == FSM_KIND_NONE) {
        if (renameat2(dirfd, tmp, dirfd, name, RENAME_NOREPLACE) < 0)
            return errno == EEXIST ? -FSM_TREE_EPENDING : -errno;
    } else if (renameat(dirfd, tmp, dirfd, name) < 0) {
        return -errno;
    }
    return 0;
}

static int put_expect_ok(const struct fsm_tree_stat *expect)
{
    if (expect->kind == FSM_KIND_DIR)
        return -EISDIR;
    if (expect->kind == FSM_KIND_OTHER)
        return -EINVAL;
    return 0;
}

/*
 * The one way a file's content reaches the tree: a new temp file in dfd
 * (*tmp gets its name), filled by fill(), given mode and mtime, fsync'ed
 * when sync (content and attributes together: nothing sees the temp before
 * its rename), and stat'ed into *st. On success *fd is the open temp (the
 * caller's to close); on error nothing is left.
 */
static int temp_make(int dfd, char tmp[TREE_TMP_NAME_LEN + 1], uint32_t mode, int64_t mtime_ns,
                     fsm_tree_fill_fn fill, void *arg, bool sync, int *fd, struct stat *st)
{
    int rc = tmp_name(tmp);
    if (rc < 0)
        return rc;
    int f = openat(dfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (f < 0)
        return -errno;
    if ((rc = fill(arg, f)) < 0)
        goto fail;
    if (fchmod(f, mode & FSM_TREE_MODE_MASK) < 0) {
        rc = -errno;
        goto fail;
    }
    if ((rc = set_times_fd(f, mtime_ns)) < 0)
        goto fail;
    if ((sync && fsync(f) < 0) || fstat(f, st) < 0) {
        rc = -errno;
        goto fail;
    }
    *fd = f;
    return 0;
fail:
    unlinkat(dfd, tmp, 0);
    close(f);
    return rc;
}

int fsm_tree_put(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                 uint32_t mode, int64_t mtime_ns, fsm_tree_fill_fn fill, void *arg,
                 struct fsm_tree_stat *out)
{
    int dfd, fd, rc;
    const char *name;
    char tmp[TREE_TMP_NAME_LEN + 1];
    struct stat s;

    if ((rc = put_expect_ok(expect)) < 0)
        return rc;
    if ((rc = open_parent(t, path, &dfd, &name)) < 0)
        return rc;
    /* Fail early, before writing megabytes, if a local edit is pending. */
    if ((rc = check_expect(dfd, name, expect)) < 0)
        goto out;
    if ((rc = temp_make(dfd, tmp, mode, mtime_ns, fill, arg, true, &fd, &s)) < 0)
        goto out;
    close(fd);
    if ((rc = rename_into_place(dfd, tmp, name, expect)) < 0) {
        unlinkat(dfd, tmp, 0);
        goto out;
    }
    rc = fsync_dir(dfd);
    if (rc == 0 && out != NULL)
        stat_from(&s, out);
out:
    close(dfd);
    return rc;
}

/* ---- temp files written off the owning thread ----------------------------- */

struct fsm_tree_temp {
    int dirfd; /* the target's parent as opened when the temp was made */
    char tmp[TREE_TMP_NAME_LEN + 1];
    struct stat st;
};

int fsm_tree_temp_write(struct fsm_tree *t, const char *path, uint32_t mode, int64_t mtime_ns,
                        fsm_tree_fill_fn fill, void *arg, struct fsm_tree_temp **out)
{
    /* Only reads t (root_fd, walk), which never change while t is open. */
    struct fsm_tree_temp *tp = pb_xcalloc(1, sizeof(*tp));
    const char *name;
    int fd;
    *out = NULL;
    int rc = open_parent(t, path, &tp->dirfd, &name);
    if (rc < 0) {
        free(tp);
        return rc;
    }
    if ((rc = temp_make(tp->dirfd, tp->tmp, mode, mtime_ns, fill, arg, true, &fd, &tp->st)) < 0) {
        close(tp->dirfd);
        free(tp);
        return rc;
    }
    close(fd);
    *out = tp;
    return 0;
}

/* The directory path names now is the one dirfd was opened as: 0, -EAGAIN
 * if not, or -errno. */
static int same_parent(struct fsm_tree *t, const char *path, int dirfd, int *dfd, const char **name)
{
    struct stat now, then;
    int rc = open_parent(t, path, dfd, name);
    if (rc < 0)
        return rc;
    if (fstat(*dfd, &now) < 0 || fstat(dirfd, &then) < 0)
        rc = -errno;
    else if (now.st_dev != then.st_dev || now.st_ino != then.st_ino)
        rc = -EAGAIN;
    if (rc < 0)
        close(*dfd);
    return rc;
}

int fsm_tree_temp_commit(struct fsm_tree *t, struct fsm_tree_temp *tp, const char *path,
                         const struct fsm_tree_stat *expect, struct fsm_tree_stat *out)
{
    int dfd, rc;
    const char *name;
    if ((rc = put_expect_ok(expect)) == 0 &&
        (rc = same_parent(t, path, tp->dirfd, &dfd, &name)) == 0) {
        rc = rename_into_place(tp->dirfd, tp->tmp, name, expect);
        if (rc == 0) {
            tp->tmp[0] = '\0'; /* renamed: nothing to remove */
            rc = fsync_dir(tp->dirfd);
            if (rc == 0 && out != NULL)
                stat_from(&tp->st, out);
        }
        close(dfd);
    }
    fsm_tree_temp_discard(tp);
    return rc;
}

void fsm_tree_temp_discard(struct fsm_tree_temp *tp)
{
    if (tp == NULL)
        return;
    if (tp->tmp[0] != '\0')
        unlinkat(tp->dirfd, tp->tmp, 0);
    close(tp->dirfd);
    free(tp);
}

/* ---- staged files -------------------------------------------------------- */

/* From this many staged files on, the barrier is one syncfs() of the tree's
 * filesystem (one journal commit for all of them) instead of one fsync each.
 * syncfs also flushes whatever else is dirty on that filesystem, so a few
 * files keep their own fsyncs. */
#define TREE_SYNCFS_MIN 8

struct stage_slot {
    int dirfd; /* the target's parent as opened at staging */
    int fd;    /* the temp file, -1 once closed */
    char tmp[TREE_TMP_NAME_LEN + 1];
    struct stat st; /* the temp's stat after mode and mtime */
    bool durable;   /* synced by fsm_tree_stage_sync() */
    bool covered;   /* on the filesystem the last syncfs synced */
    bool done;      /* committed or given up: no temp left to remove */
    bool renamed;   /* its directory needs an fsync */
    dev_t dir_dev;  /* renamed: the directory's identity, to fsync each once */
    ino_t dir_ino;
};

struct fsm_tree_stage {
    struct fsm_tree *t;
    size_t n;
    struct stage_slot slot[FSM_TREE_STAGE_MAX];
    size_t n_dirs;
    int dirs[FSM_TREE_STAGE_MAX]; /* deletes' parents, distinct, to fsync */
};

struct fsm_tree_stage *fsm_tree_stage_new(struct fsm_tree *t)
{
    struct fsm_tree_stage *s = pb_xcalloc(1, sizeof(*s));
    s->t = t;
    return s;
}

int fsm_tree_stage_add(struct fsm_tree_stage *s, const char *path, uint32_t mode, int64_t mtime_ns,
                       fsm_tree_fill_fn fill, void *arg)
{
    if (s->n == FSM_TREE_STAGE_MAX)
        return -ENOSPC;
    struct stage_slot *sl = &s->slot[s->n];
    const char *name;
    memset(sl, 0, sizeof(*sl));
    sl->fd = -1;
    int rc = open_parent(s->t, path, &sl->dirfd, &name);
    if (rc < 0)
        return rc;
    rc = temp_make(sl->dirfd, sl->tmp, mode, mtime_ns, fill, arg, false, &sl->fd, &sl->st);
    if (rc < 0) {
        close(sl->dirfd);
        return rc;
    }
    return (int)s->n++;
}

int fsm_tree_stage_sync(struct fsm_tree_stage *s)
{
    size_t live = 0;
    for (size_t i = 0; i < s->n; i++)
        live += !s->slot[i].done && !s->slot[i].durable;
    /* syncfs covers the root's filesystem only (a directory of the tree may
     * be another mount); it reports a writeback error of any file of that
     * filesystem (Linux >= 5.8), and then each file's own fsync says which
     * of ours failed. */
    struct stat root;
    bool all = live >= TREE_SYNCFS_MIN && fstat(s->t->root_fd, &root) == 0 &&
               syncfs(s->t->root_fd) == 0;
    for (size_t i = 0; i < s->n; i++) {
        struct stage_slot *sl = &s->slot[i];
        sl->covered = all && sl->st.st_dev == root.st_dev;
        if (!sl->done && !sl->durable && !sl->covered) /* start every writeback first */
            sync_file_range(sl->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    }
    int n = 0;
    for (size_t i = 0; i < s->n; i++) {
        struct stage_slot *sl = &s->slot[i];
        if (!sl->done && !sl->durable) {
            if (sl->covered || fsync(sl->fd) == 0) {
                sl->durable = true;
            } else {
                log_warning("tree %s: fsync of a staged file: %s", s->t->root, strerror(errno));
                unlinkat(sl->dirfd, sl->tmp, 0);
                sl->done = true;
            }
            close(sl->fd);
            sl->fd = -1;
        }
        n += sl->durable && !sl->done;
    }
    return n;
}

int fsm_tree_stage_commit(struct fsm_tree_stage *s, int slot, const char *path,
                          const struct fsm_tree_stat *expect, struct fsm_tree_stat *out)
{
    if (slot < 0 || (size_t)slot >= s->n || !s->slot[slot].durable || s->slot[slot].done)
        return -EAGAIN;
    struct stage_slot *sl = &s->slot[slot];
    int rc = put_expect_ok(expect);
    if (rc < 0)
        return rc;
    int dfd;
    const char *name;
    /* The parent may have been moved or replaced since the staging (an
     * earlier op of the batch): the temp must be renamed within the
     * directory the path names now, or not at all. */
    if ((rc = same_parent(s->t, path, sl->dirfd, &dfd, &name)) == -EAGAIN) {
        unlinkat(sl->dirfd, sl->tmp, 0);
        sl->done = true;
    }
    if (rc < 0)
        return rc;
    struct stat then;
    if (fstat(sl->dirfd, &then) < 0)
        rc = -errno;
    else
        rc = rename_into_place(sl->dirfd, sl->tmp, name, expect);
    if (rc == 0) {
        sl->renamed = true;
        sl->dir_dev = then.st_dev;
        sl->dir_ino = then.st_ino;
        if (out != NULL)
            stat_from(&sl->st, out);
    } else {
        unlinkat(sl->dirfd, sl->tmp, 0);
    }
    sl->done = true;
    close(dfd);
    return rc;
}

int fsm_tree_stage_drop(struct fsm_tree_stage *s)
{
    int n = 0;
    for (size_t i = 0; i < s->n; i++) {
        struct stage_slot *sl = &s->slot[i];
        if (sl->done)
            continue;
        unlinkat(sl->dirfd, sl->tmp, 0);
        if (sl->fd >= 0)
            close(sl->fd);
        sl->fd = -1;
        sl->done = true;
        n++;
    }
    return n;
}

int fsm_tree_stage_finish(struct fsm_tree_stage *s)
{
    int ret = 0;
    for (size_t i = 0; i < s->n; i++) {
        struct stage_slot *sl = &s->slot[i];
        if (sl->renamed) {
            bool seen = false;
            for (size_t j = 0; j < i && !seen; j++)
                seen = s->slot[j].renamed && s->slot[j].dir_dev == sl->dir_dev &&
                       s->slot[j].dir_ino == sl->dir_ino;
            int rc = seen ? 0 : fsync_dir(sl->dirfd);
            if (rc < 0 && ret == 0)
                ret = rc;
        } else if (!sl->done) {
            unlinkat(sl->dirfd, sl->tmp, 0);
        }
    }
    for (size_t i = 0; i < s->n_dirs; i++) {
        int rc = fsync_dir(s->dirs[i]);
        if (rc < 0 && ret == 0)
            ret = rc;
        close(s->dirs[i]);
    }
    for (size_t i = 0; i < s->n; i++) { /* after the fsyncs above, which use them */
        if (s->slot[i].fd >= 0)
            close(s->slot[i].fd);
        close(s->slot[i].dirfd);
    }
    s->n = 0;
    s->n_dirs = 0;
    return ret;
}

void fsm_tree_stage_free(struct fsm_tree_stage *s)
{
    if (s == NULL)
        return;
    fsm_tree_stage_finish(s);
    free(s);
}

int fsm_tree_symlink(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                     const char *target, int64_t mtime_ns, struct fsm_tree_stat *out)
{
    int dfd, rc;
    const char *name;
    char tmp[TREE_TMP_NAME_LEN + 1];
    bool tmp_made = false;

    if (target == NULL || target[0] == '\0' || strnlen(target, FSM_PATH_MAX + 1) > FSM_PATH_MAX)
        return -EINVAL;
    if ((rc = put_expect_ok(expect)) < 0)
        return rc;
    if ((rc = open_parent(t, path, &dfd, &name)) < 0)
        return rc;
    if ((rc = tmp_name(tmp)) < 0)
        goto out;
    if (symlinkat(target, dfd, tmp) < 0) {
        rc = -errno;
        goto out;
    }
    tmp_made = true;
    struct timespec ts[2];
    ts[0].tv_sec = 0;
    ts[0].tv_nsec = UTIME_OMIT;
    ts[1] = ns_to_ts(mtime_ns);
    if (utimensat(dfd, tmp, ts, AT_SYMLINK_NOFOLLOW) < 0) {
        rc = -errno;
        goto out;
    }
    struct fsm_tree_stat st;
    if ((rc = stat_at(dfd, tmp, &st)) < 0)
        goto out;
    if ((rc = rename_into_place(dfd, tmp, name, expect)) < 0)
        goto out;
    tmp_made = false;
    rc = fsync_dir(dfd);
    if (rc == 0 && out != NULL)
        *out = st;
out:
    if (tmp_made)
        unlinkat(dfd, tmp, 0);
    close(dfd);
    return rc;
}

/* Opens name (a file or directory, never a link or a device) and checks that
 * it is the inode expect describes. */
static int open_expected(int dfd, const char *name, const struct fsm_tree_stat *expect, int *fd)
{
    int rc = check_expect(dfd, name, expect);
    if (rc < 0)
        return rc;
    int flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
    if (expect->kind == FSM_KIND_DIR)
        flags |= O_DIRECTORY;
    int f = openat(dfd, name, flags);
    if (f < 0)
        return errno == ENOENT || errno == ELOOP || errno == ENOTDIR ? -FSM_TREE_EPENDING : -errno;
    struct stat s;
    struct fsm_tree_stat now;
    if (fstat(f, &s) < 0) {
        rc = -errno;
        close(f);
        return rc;
    }
    stat_from(&s, &now);
    if (!fsm_tree_stat_matches(expect, &now)) { /* swapped between the checks */
        close(f);
        return -FSM_TREE_EPENDING;
    }
    *fd = f;
    return 0;
}

int fsm_tree_mkdir(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                   uint32_t mode, int64_t mtime_ns, struct fsm_tree_stat *out)
{
    int dfd, fd = -1, rc;
    const char *name;
    struct stat s;

    if (expect->kind != FSM_KIND_NONE)
        return -EINVAL;
    if ((rc = open_parent(t, path, &dfd, &name)) < 0)
        return rc;
    if (mkdirat(dfd, name, 0700) < 0 && errno != EEXIST) {
        rc = -errno;
        goto out;
    }
    /* Ours or adopted: O_NOFOLLOW|O_DIRECTORY refuses anything but a real
     * directory (a file or symlink there is a pending local edit). */
    fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        rc = errno == ENOTDIR || errno == ELOOP ? -FSM_TREE_EPENDING : -errno;
        goto out;
    }
    if (fchmod(fd, dir_mode(mode)) < 0) {
        rc = -errno;
        goto out;
    }
    if ((rc = set_times_fd(fd, mtime_ns)) < 0)
        goto out;
    if (fsync(fd) < 0 || fstat(fd, &s) < 0) {
        rc = -errno;
        goto out;
    }
    rc = fsync_dir(dfd);
    if (rc == 0 && out != NULL)
        stat_from(&s, out);
out:
    close_keep_errno(fd);
    close(dfd);
    return rc;
}

/*
 * setattr of a file the daemon may not open (mode 0 or write-only, daemon
 * not root): by name, never following a symlink (glibc implements
 * fchmodat(AT_SYMLINK_NOFOLLOW) with an O_PATH descriptor). The kind and inode
 * were checked just before, as everywhere else. No fsync of the inode is
 * possible without a descriptor; the directory is synced.
 */
static int setattr_unreadable(int dfd, const char *name, const struct fsm_tree_stat *expect,
                              uint32_t fields, uint32_t mode, int64_t mtime_ns,
                              struct fsm_tree_stat *out)
{
    int rc = check_expect(dfd, name, expect);
    if (rc < 0)
        return rc;
    if ((fields & FSM_ATTR_MODE) &&
        fchmodat(dfd, name, mode & FSM_TREE_MODE_MASK, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    if (fields & FSM_ATTR_MTIME) {
        struct timespec ts[2];
        ts[0].tv_sec = 0;
        ts[0].tv_nsec = UTIME_OMIT;
        ts[1] = ns_to_ts(mtime_ns);
        if (utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW) < 0)
            return -errno;
    }
    if ((rc = fsync_dir(dfd)) < 0)
        return rc;
    return out != NULL ? stat_at(dfd, name, out) : 0;
}

int fsm_tree_setattr(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect,
                     uint32_t fields, uint32_t mode, int64_t mtime_ns, struct fsm_tree_stat *out)
{
    int dfd, fd = -1, rc;
    const char *name;

    if (expect->kind != FSM_KIND_FILE && expect->kind != FSM_KIND_DIR &&
        expect->kind != FSM_KIND_SYMLINK)
        return -EINVAL;
    if ((rc = open_parent(t, path, &dfd, &name)) < 0)
        return rc;
    if (expect->kind == FSM_KIND_SYMLINK) {
        /* A symlink has no mode of its own on Linux; only its mtime. */
        if ((rc = check_expect(dfd, name, expect)) < 0)
            goto out;
        if (fields & FSM_ATTR_MTIME) {
            struct timespec ts[2];
            ts[0].tv_sec = 0;
            ts[0].tv_nsec = UTIME_OMIT;
            ts[1] = ns_to_ts(mtime_ns);
            if (utimensat(dfd, name, ts, AT_SYMLINK_NOFOLLOW) < 0) {
                rc = -errno;
                goto out;
            }
        }
        if ((rc = fsync_dir(dfd)) == 0 && out != NULL)
            rc = stat_at(dfd, name, out);
        goto out;
    }
    rc = open_expected(dfd, name, expect, &fd);
    if (rc == -EACCES && expect->kind == FSM_KIND_FILE) {
        rc = setattr_unreadable(dfd, name, expect, fields, mode, mtime_ns, out);
        goto out;
    }
    if (rc < 0)
        goto out;
    if (expect->kind == FSM_KIND_DIR)
        mode = dir_mode(mode);
    if ((fields & FSM_ATTR_MODE) && fchmod(fd, mode & FSM_TREE_MODE_MASK) < 0) {
        rc = -errno;
        goto out;
    }
    if ((fields & FSM_ATTR_MTIME) && (rc = set_times_fd(fd, mtime_ns)) < 0)
        goto out;
    struct stat s;
    if (fsync(fd) < 0 || fstat(fd, &s) < 0) {
        rc = -errno;
        goto out;
    }
    if (out != NULL)
        stat_from(&s, out);
out:
    close_keep_errno(fd);
    close(dfd);
    return rc;
}

/* Keeps dfd's directory for the one fsync in fsm_tree_stage_finish(); false
 * if the set has no room for another directory (then fsync it now). */
static bool stage_defer_dir(struct fsm_tree_stage *s, int dfd)
{
    struct stat a, b;
    if (fstat(dfd, &a) < 0)
        return false;
    for (size_t i = 0; i < s->n_dirs; i++)
        if (fstat(s->dirs[i], &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
            return true;
    if (s->n_dirs == FSM_TREE_STAGE_MAX)
        return false;
    int fd = dup(dfd);
    if (fd < 0)
        return false;
    s->dirs[s->n_dirs++] = fd;
    return true;
}

/* fsm_tree_delete(); with s, the parent's fsync waits for the set's finish. */
static int delete_entry(struct fsm_tree *t, struct fsm_tree_stage *s, const char *path,
                        const struct fsm_tree_stat *expect)
{
    int dfd, rc;
    const char *name;
    struct fsm_tree_stat now;

    if (expect->kind == FSM_KIND_NONE || expect->kind == FSM_KIND_OTHER)
        return -EINVAL;
    rc = open_parent(t, path, &dfd, &name);
    if (rc == -ENOENT)
        return 0; /* the parent is gone, so is the entry */
    if (rc < 0)
        return rc;
    if ((rc = stat_at(dfd, name, &now)) < 0)
        goto out;
    if (now.kind == FSM_KIND_NONE)
        goto out; /* already absent: the goal holds */
    if (!fsm_tree_stat_matches(expect, &now)) {
        rc = -FSM_TREE_EPENDING;
        goto out;
    }
    if (unlinkat(dfd, name, expect->kind == FSM_KIND_DIR ? AT_REMOVEDIR : 0) < 0) {
        /* A directory with entries the index does not know holds local
         * creations not yet proposed: keep them. */
        rc = errno == ENOTEMPTY || errno == EEXIST ? -FSM_TREE_EPENDING
             : errno == ENOENT                     ? 0
                                                   : -errno;
        goto out;
    }
    if (s == NULL || !stage_defer_dir(s, dfd))
        rc = fsync_dir(dfd);
out:
    close(dfd);
    return rc;
}

int fsm_tree_delete(struct fsm_tree *t, const char *path, const struct fsm_tree_stat *expect)
{
    return delete_entry(t, NULL, path, expect);
}

int fsm_tree_stage_delete(struct fsm_tree_stage *s, const char *path,
                          const struct fsm_tree_stat *expect)
{
    return delete_entry(s->t, s, path, expect);
}

int fsm_tree_rename(struct fsm_tree *t, const char *from, const struct fsm_tree_stat *from_expect,
                    const char *to, const struct fsm_tree_stat *to_expect,
                    struct fsm_tree_stat *out)
{
    int fdir = -1, tdir = -1, rc;
    const char *fname, *tname;
    struct fsm_tree_stat moved;

    if (from_expect->kind == FSM_KIND_NONE || from_expect->kind == FSM_KIND_OTHER ||
        to_expect->kind == FSM_KIND_OTHER)
        return -EINVAL;
    if ((rc = open_parent(t, from, &fdir, &fname)) < 0)
        return rc;
    if ((rc = open_parent(t, to, &tdir, &tname)) < 0)
        goto out;
    if ((rc = stat_at(fdir, fname, &moved)) < 0)
        goto out;
    if (!fsm_tree_stat_matches(from_expect, &moved)) {
        rc = -FSM_TREE_EPENDING;
        goto out;
    }
    if ((rc = check_expect(tdir, tname, to_expect)) < 0)
        goto out;
    if (to_expect->kind == FSM_KIND_NONE) {
        if (renameat2(fdir, fname, tdir, tname, RENAME_NOREPLACE) < 0) {
            rc = errno == EEXIST ? -FSM_TREE_EPENDING : -errno;
            goto out;
        }
    } else if (renameat(fdir, fname, tdir, tname) < 0) {
        rc = errno == ENOTEMPTY || errno == EEXIST ? -FSM_TREE_EPENDING : -errno;
        goto out;
    }
    if ((rc = fsync_dir(tdir)) < 0 || (rc = fsync_dir(fdir)) < 0)
        goto out;
    if (out != NULL)
        *out = moved; /* rename keeps the inode and its times */
out:
    if (tdir >= 0)
        close(tdir);
    close(fdir);
    return rc;
}
