/*
 * pack.c: append-only pack files for chunk bytes (see pack.h).
 *
 * The writer holds the current pack open read-write and appends with
 * pwrite at its tail; every other pack (and every pack of a reader) is
 * opened on demand into a small cache of descriptors, least recently used
 * out. A pack that rolls over is fdatasync'ed before it is left, so only the
 * current one can hold unsynced bytes; pack_sync() syncs it (and the
 * directory when a pack was created since the last sync) and is called
 * before every state.db commit that indexes new bytes.
 */

#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/pack.h"

#define PACK_CACHE   8
#define PACK_NAME_SZ 32

struct pack_fd {
    uint32_t pack; /* 0: unused slot (packs are numbered from 1) */
    int fd;
    uint64_t used;
};

struct pack_set {
    char *dir;
    int dirfd; /* -1: a reader's directory that does not exist (yet) */
    bool writer;
    uint64_t roll;
    /* writer: the current pack */
    uint32_t cur;
    uint32_t above; /* pack_start(): numbers up to it were used before */
    int cur_fd;
    uint64_t tail;
    bool dirty, dir_dirty;
    /* writer: pack_mark() */
    uint32_t mark_pack;
    uint64_t mark_tail;
    bool mark_dirty;
    struct pack_fd cache[PACK_CACHE];
    uint64_t tick;
};

static void (*pack_punch_hook)(void);

void pack_test_after_punch(void (*fn)(void))
{
    pack_punch_hook = fn;
}

static int pack_fail_write, pack_fail_sync;
static unsigned pack_fail_n;

void pack_test_fail(int write_err, int sync_err, unsigned n)
{
    pack_fail_write = write_err;
    pack_fail_sync = sync_err;
    pack_fail_n = n;
}

/* The test hook's error for this append or sync (0: none). */
static int pack_fault(bool sync)
{
    int e = sync ? pack_fail_sync : pack_fail_write;
    if (pack_fail_n == 0 || e == 0)
        return 0;
    pack_fail_n--;
    return e;
}

static void pack_name(char out[PACK_NAME_SZ], uint32_t pack)
{
    snprintf(out, PACK_NAME_SZ, "%08" PRIu32 ".pack", pack);
}

static uint64_t align_up(uint64_t v)
{
    return (v + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
}

char *pack_dir_for(const char *db_path)
{
    const char *slash = strrchr(db_path, '/');
    const char *base = slash == NULL ? db_path : slash + 1;
    int dlen = slash == NULL ? 0 : (int)(slash - db_path + 1);
    /* "state.db" (every node) -> "chunks"; another name (tests keep several
     * databases in one directory) gets a directory of its own */
    if (strcmp(base, "state.db") == 0)
        return pb_xasprintf("%.*s%s", dlen, db_path, PACK_DIR_NAME);
    return pb_xasprintf("%s.%s", db_path, PACK_DIR_NAME);
}

/* fsync of the directory holding path (its new entry is durable). */
static int sync_parent(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *parent = slash == NULL   ? pb_xstrdup(".")
                   : slash == path ? pb_xstrdup("/")
                                   : pb_xasprintf("%.*s", (int)(slash - path), path);
    int fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || (fsync(fd) < 0 && errno != EINVAL))
        rc = -errno;
    if (fd >= 0)
        close(fd);
    free(parent);
    return rc;
}

int pack_set_open(const char *dir, bool writer, struct pack_set **out)
{
    *out = NULL;
    if (writer) {
        if (mkdir(dir, 0700) == 0) {
            int rc = sync_parent(dir);
            if (rc < 0)
                return rc;
        } else if (errno != EEXIST) {
            return -errno;
        }
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 && (writer || errno != ENOENT))
        return -errno;
    struct pack_set *ps = pb_xcalloc(1, sizeof(*ps));
    ps->dir = pb_xstrdup(dir);
    ps->dirfd = dfd;
    ps->writer = writer;
    ps->roll = PACK_ROLL_BYTES;
    ps->cur_fd = -1;
    *out = ps;
    return 0;
}

static void cache_drop(struct pack_set *ps, uint32_t pack)
{
    for (size_t i = 0; i < PACK_CACHE; i++) {
        if (ps->cache[i].pack == pack && pack != 0) {
            close(ps->cache[i].fd);
            ps->cache[i].pack = 0;
        }
    }
}

void pack_set_close(struct pack_set *ps)
{
    if (ps == NULL)
        return;
    for (size_t i = 0; i < PACK_CACHE; i++)
        if (ps->cache[i].pack != 0)
            close(ps->cache[i].fd);
    if (ps->cur_fd >= 0)
        close(ps->cur_fd);
    if (ps->dirfd >= 0)
        close(ps->dirfd);
    free(ps->dir);
    free(ps);
}

void pack_set_roll_bytes(struct pack_set *ps, uint64_t roll)
{
    ps->roll = roll > 0 ? roll : 1;
}

/* A descriptor of pack (the writer's are read-write), cached. */
static int pack_fd_get(struct pack_set *ps, uint32_t pack, int *fd)
{
    if (ps->writer && pack == ps->cur && ps->cur_fd >= 0) {
        *fd = ps->cur_fd;
        return 0;
    }
    size_t victim = 0;
    for (size_t i = 0; i < PACK_CACHE; i++) {
        if (ps->cache[i].pack == pack && pack != 0) {
            ps->cache[i].used = ++ps->tick;
            *fd = ps->cache[i].fd;
            return 0;
        }
    }
    for (size_t i = 0; i < PACK_CACHE; i++) { /* a free slot, else the oldest */
        if (ps->cache[i].pack == 0) {
            victim = i;
            break;
        }
        if (ps->cache[i].used < ps->cache[victim].used)
            victim = i;
    }
    if (ps->dirfd < 0) {
        ps->dirfd = open(ps->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (ps->dirfd < 0)
            return -errno;
    }
    char name[PACK_NAME_SZ];
    pack_name(name, pack);
    int f = openat(ps->dirfd, name, (ps->writer ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (f < 0)
        return -errno;
    struct pack_fd *c = &ps->cache[victim];
    if (c->pack != 0)
        close(c->fd);
    c->pack = pack;
    c->fd = f;
    c->used = ++ps->tick;
    *fd = f;
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* The pack numbers in the directory, sorted (*v malloc'ed). */
static int pack_list(struct pack_set *ps, uint32_t **v, size_t *n)
{
    *v = NULL;
    *n = 0;
    if (ps->dirfd < 0)
        return 0;
    int dfd = dup(ps->dirfd);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (d == NULL) {
        int e = -errno;
        if (dfd >= 0)
            close(dfd);
        return e;
    }
    rewinddir(d);
    size_t cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char *end;
        if (strlen(de->d_name) != 13 || strcmp(de->d_name + 8, ".pack") != 0)
            continue;
        unsigned long p = strtoul(de->d_name, &end, 10);
        if (end != de->d_name + 8 || p == 0 || p > UINT32_MAX)
            continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 8;
            *v = pb_xreallocarray(*v, cap, sizeof(**v));
        }
        (*v)[(*n)++] = (uint32_t)p;
    }
    closedir(d);
    if (*n > 1)
        qsort(*v, *n, sizeof(**v), cmp_u32);
    return 0;
}

int pack_foreach(struct pack_set *ps, int (*fn)(void *arg, uint32_t pack, uint64_t size), void *arg)
{
    uint32_t *v;
    size_t n;
    int rc = pack_list(ps, &v, &n);
    for (size_t i = 0; i < n && rc == 0; i++) {
        char name[PACK_NAME_SZ];
        struct stat st;
        pack_name(name, v[i]);
        if (fstatat(ps->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno == ENOENT)
                continue;
            rc = -errno;
            break;
        }
        rc = fn(arg, v[i], (uint64_t)st.st_size);
    }
    free(v);
    return rc;
}

/* Opens pack as the current one (created if missing). */
static int pack_open_current(struct pack_set *ps, uint32_t pack)
{
    char name[PACK_NAME_SZ];
    pack_name(name, pack);
    cache_drop(ps, pack);
    int f = openat(ps->dirfd, name, O_RDWR | O_CLOEXEC);
    if (f < 0 && errno == ENOENT) {
        f = openat(ps->dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (f >= 0)
            ps->dir_dirty = true;
    }
    if (f < 0)
        return -errno;
    struct stat st;
    if (fstat(f, &st) < 0) {
        int e = -errno;
        close(f);
        return e;
    }
    if (ps->cur_fd >= 0)
        close(ps->cur_fd);
    ps->cur = pack;
    ps->cur_fd = f;
    ps->tail = (uint64_t)st.st_size;
    return 0;
}

int pack_start(struct pack_set *ps, uint32_t above)
{
    uint32_t *v;
    size_t n;
    int rc = pack_list(ps, &v, &n);
    if (rc < 0)
        return rc;
    uint32_t high = n > 0 ? v[n - 1] : 0;
    free(v);
    ps->above = above;
    if (high > 0) {
        if ((rc = pack_open_current(ps, high)) < 0)
            return rc;
        if (ps->tail < ps->roll)
            return 0;
    }
    return pack_open_current(ps, (high > above ? high : above) + 1);
}

uint32_t pack_current(const struct pack_set *ps)
{
    return ps->cur;
}

int pack_size(struct pack_set *ps, uint32_t pack, uint64_t *size)
{
    char name[PACK_NAME_SZ];
    struct stat st;
    pack_name(name, pack);
    if (ps->dirfd < 0)
        return -ENOENT;
    if (fstatat(ps->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    *size = (uint64_t)st.st_size;
    return 0;
}

int pack_truncate(struct pack_set *ps, uint32_t pack, uint64_t size)
{
    int fd, rc = pack_fd_get(ps, pack, &fd);
    if (rc < 0)
        return rc;
    if (ftruncate(fd, (off_t)size) < 0)
        return -errno;
    if (pack == ps->cur && ps->cur_fd >= 0)
        ps->tail = size;
    return 0;
}

int pack_unlink(struct pack_set *ps, uint32_t pack)
{
    if (ps->writer && pack == ps->cur && ps->cur_fd >= 0)
        return -EBUSY;
    char name[PACK_NAME_SZ];
    pack_name(name, pack);
    cache_drop(ps, pack);
    if (unlinkat(ps->dirfd, name, 0) < 0 && errno != ENOENT)
        return -errno;
    ps->dir_dirty = true;
    return 0;
}

static int pwrite_all(int fd, const void *p, size_t n, uint64_t off)
{
    const uint8_t *b = p;
    while (n > 0) {
        ssize_t k = pwrite(fd, b, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        b += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

int pack_append(struct pack_set *ps, const void *data, uint32_t len, uint32_t *pack, uint64_t *off)
{
    if (!ps->writer || ps->cur_fd < 0)
        return -EROFS;
    int rc;
    if (ps->tail >= ps->roll) {
        /* leaving it: its bytes must be as durable as the next sync says */
        if (ps->dirty && fdatasync(ps->cur_fd) < 0)
            return -errno;
        /* never a number used before: a reader may still hold that
         * pack open (its descriptor cache) */
        if ((rc = pack_open_current(ps, PB_MAX(ps->cur, ps->above) + 1)) < 0)
            return rc;
    }
    uint64_t at = align_up(ps->tail);
    int fault = pack_fault(false);
    if (fault < 0) /* half written, as a disk that fills up leaves it */
        rc = pwrite_all(ps->cur_fd, data, len / 2, at) < 0 ? -EIO : fault;
    else
        rc = pwrite_all(ps->cur_fd, data, len, at);
    if (rc < 0) {
        /* what a partial write left past the tail goes (a rewind cuts
         * only from the tail it knows) */
        if (ftruncate(ps->cur_fd, (off_t)ps->tail) < 0)
            log_warning("state.db: cannot cut pack %" PRIu32 " in %s: %s", ps->cur, ps->dir,
                        strerror(errno));
        return rc;
    }
    ps->tail = at + len;
    ps->dirty = true;
    *pack = ps->cur;
    *off = at;
    return 0;
}

bool pack_dirty(const struct pack_set *ps)
{
    return ps->dirty || ps->dir_dirty;
}

int pack_sync(struct pack_set *ps)
{
    int fault = ps->dirty ? pack_fault(true) : 0;
    if (fault < 0)
        return fault;
    if (ps->dirty && ps->cur_fd >= 0 && fdatasync(ps->cur_fd) < 0)
        return -errno;
    ps->dirty = false;
    if (ps->dir_dirty && ps->dirfd >= 0 && fsync(ps->dirfd) < 0)
        return -errno;
    ps->dir_dirty = false;
    return 0;
}

void pack_mark(struct pack_set *ps)
{
    ps->mark_pack = ps->cur;
    ps->mark_tail = ps->tail;
    ps->mark_dirty = ps->dirty;
}

void pack_rewind(struct pack_set *ps)
{
    if (!ps->writer || ps->cur_fd < 0 || ps->mark_pack == 0)
        return;
    if (ps->cur != ps->mark_pack) {
        uint32_t last = ps->cur;
        if (pack_open_current(ps, ps->mark_pack) < 0) {
            log_warning("state.db: cannot reopen pack %" PRIu32 " in %s", ps->mark_pack, ps->dir);
            return;
        }
        uint32_t *v;
        size_t n;
        if (pack_list(ps, &v, &n) == 0) { /* numbers may skip (pack_start's above) */
            for (size_t i = 0; i < n; i++)
                if (v[i] > ps->mark_pack && v[i] <= last)
                    pack_unlink(ps, v[i]);
            free(v);
        }
        if (last > ps->above) /* not reused either */
            ps->above = last;
    }
    if (ps->tail > ps->mark_tail) {
        if (ftruncate(ps->cur_fd, (off_t)ps->mark_tail) < 0)
            log_warning("state.db: cannot cut pack %" PRIu32 " in %s: %s", ps->cur, ps->dir,
                        strerror(errno));
        else
            ps->tail = ps->mark_tail;
    }
    ps->dirty = ps->mark_dirty;
}

int pack_punch(struct pack_set *ps, uint32_t pack, uint64_t off, uint32_t len)
{
    int fd, rc = pack_fd_get(ps, pack, &fd);
    if (rc == -ENOENT)
        return 0;
    if (rc < 0)
        return rc;
    if (len == 0)
        return 0;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                  (off_t)align_up(len)) < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS)
            return 0; /* the filesystem keeps the space until the pack goes */
        return -errno;
    }
    if (pack_punch_hook != NULL)
        pack_punch_hook();
    return 0;
}

int pack_read(struct pack_set *ps, uint32_t pack, uint64_t off, void *buf, uint32_t len)
{
    int fd, rc = pack_fd_get(ps, pack, &fd);
    if (rc < 0)
        return rc;
    uint8_t *b = buf;
    while (len > 0) {
        ssize_t k = pread(fd, b, len, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        if (k == 0)
            return -ENODATA; /* the index points past the pack's end */
        b += k;
        len -= (uint32_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

/* The rest of a copy through a buffer. */
static int copy_slow(int fd, uint64_t off, uint32_t len, int out_fd)
{
    size_t cap = PB_MIN(len, 256u * 1024u);
    uint8_t *buf = pb_xmalloc(cap);
    int rc = 0;
    while (len > 0 && rc == 0) {
        uint32_t k = (uint32_t)PB_MIN((size_t)len, cap);
        ssize_t got = pread(fd, buf, k, (off_t)off);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            rc = got < 0 ? -errno : -ENODATA;
            break;
        }
        rc = pb_write_all(out_fd, buf, (size_t)got);
        off += (uint64_t)got;
        len -= (uint32_t)got;
    }
    free(buf);
    return rc;
}

int pack_copy(struct pack_set *ps, uint32_t pack, uint64_t off, uint32_t len, int out_fd)
{
    int fd, rc = pack_fd_get(ps, pack, &fd);
    if (rc < 0)
        return rc;
    loff_t in_off = (loff_t)off;
    while (len > 0) {
        ssize_t k = copy_file_range(fd, &in_off, out_fd, NULL, len, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP))
            return copy_slow(fd, (uint64_t)in_off, len, out_fd);
        if (k < 0)
            return -errno;
        if (k == 0)
            return -ENODATA;
        len -= (uint32_t)k;
    }
    return 0;
}
