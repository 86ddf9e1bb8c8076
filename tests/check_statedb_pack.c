/*
 * check_statedb_pack.c: state.db's chunk bytes in pack files (format 3):
 * put/get/copy round trips, the durability order of put_many (a failed or
 * interrupted commit leaves no index row, and the bytes it appended are cut),
 * bytes without a row and their collection by age, freed ranges punched out
 * (st_blocks drops) and emptied old packs removed only after the commit (a
 * durable one: not after a lazy commit), the
 * read-only handle's reads beside the writer, packs lost or cut by someone
 * else (at open and while running), and the kept missing counts against a
 * recount through many random operations. Crash and fault cases: a failed
 * COMMIT that comes back from the WAL, a crash then a power loss (emulated
 * by a VFS that keeps the WAL as of its last sync), damaged index rows,
 * pack numbers never reused under a reader, ENOSPC / EIO under the pack.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/util.h"
#include "store/pack.h"
#include "store/statedb.h"

static char tmpdir[64];

static void setup(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/check_statedb_pack.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static void teardown(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static char *dbpath(const char *name)
{
    return pb_xasprintf("%s/%s", tmpdir, name);
}

static struct statedb *open_db(const char *name)
{
    char *p = dbpath(name);
    struct statedb *db = NULL;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = statedb_open(p, &db, &err);
    ck_assert_msg(rc == 0, "open %s: %s", p, err.msg);
    free(p);
    return db;
}

/* The path of pack n of the database named name ("state.db": chunks/). */
static char *pack_path(const char *name, unsigned n)
{
    if (strcmp(name, "state.db") == 0)
        return pb_xasprintf("%s/chunks/%08u.pack", tmpdir, n);
    return pb_xasprintf("%s/%s.chunks/%08u.pack", tmpdir, name, n);
}

/* Size (or -1 if absent) and allocated bytes of pack n. */
static int64_t pack_file_size(const char *name, unsigned n, int64_t *alloc)
{
    char *p = pack_path(name, n);
    struct stat st;
    int rc = stat(p, &st);
    free(p);
    if (alloc != NULL)
        *alloc = rc == 0 ? (int64_t)st.st_blocks * 512 : -1;
    return rc == 0 ? (int64_t)st.st_size : -1;
}

static void fill_id(uint8_t id[STATEDB_ID_LEN], uint32_t seed)
{
    for (int i = 0; i < STATEDB_ID_LEN; i++)
        id[i] = (uint8_t)(seed * 31u + (uint32_t)i * 7u + (seed >> 8));
}

/* len bytes that depend on seed. */
static uint8_t *mkbytes(uint32_t seed, uint32_t len)
{
    uint8_t *b = pb_xmalloc(len ? len : 1);
    uint32_t x = seed * 2654435761u + 1;
    for (uint32_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        b[i] = (uint8_t)(x >> 16);
    }
    return b;
}

/* The chunk's bytes equal mkbytes(seed, len). */
static void assert_bytes(struct statedb *db, const uint8_t *id, uint32_t seed, uint32_t len)
{
    uint8_t *want = mkbytes(seed, len), *got = pb_xmalloc(len ? len : 1);
    ck_assert_int_eq(statedb_chunk_get(db, id, got, len), 0);
    ck_assert_int_eq(memcmp(want, got, len), 0);
    free(want);
    free(got);
}

/* The writer's kept status counts equal a reader's recount. */
static void assert_counts_exact(struct statedb *db, const char *name)
{
    char *p = dbpath(name);
    struct statedb *rd;
    struct pb_error err;
    ck_assert_int_eq(statedb_open_reader(p, &rd, &err), 0);
    struct statedb_status kept, counted;
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &kept), 0);
    ck_assert_int_eq(statedb_status_get(rd, 1, 2, &counted), 0);
    ck_assert_uint_eq(kept.chunks, counted.chunks);
    ck_assert_uint_eq(kept.chunk_bytes, counted.chunk_bytes);
    ck_assert_uint_eq(kept.missing, counted.missing);
    ck_assert_uint_eq(kept.missing_bytes, counted.missing_bytes);
    statedb_close(rd);
    free(p);
}

START_TEST(test_pack_put_get_copy)
{
    struct statedb *db = open_db("state.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN], c[STATEDB_ID_LEN], d[STATEDB_ID_LEN];
    fill_id(a, 1);
    fill_id(b, 2);
    fill_id(c, 3);
    fill_id(d, 4);
    uint8_t *ba = mkbytes(1, 100000), *bb = mkbytes(2, 5000), *bc = mkbytes(3, 70000),
            *bd = mkbytes(4, 1);
    /* a row with its bytes (a CHUNKS entry being applied) */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, a, ba, 100000, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    /* bytes without a row, one and many (a repeat of a is skipped) */
    ck_assert_int_eq(statedb_chunk_data_put(db, b, bb, 5000), 0);
    struct statedb_chunk_in in[3] = {{c, bc, 70000}, {d, bd, 1}, {a, ba, 100000}};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, in, 3), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, a), 1);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 1);
    ck_assert_int_eq(statedb_chunk_has(db, b), 0);
    assert_bytes(db, a, 1, 100000);
    assert_bytes(db, b, 2, 5000);
    assert_bytes(db, c, 3, 70000);
    assert_bytes(db, d, 4, 1);
    uint8_t tmp[16];
    uint8_t none[STATEDB_ID_LEN];
    fill_id(none, 99);
    ck_assert_int_eq(statedb_chunk_get(db, a, tmp, 16), -EBADMSG);
    ck_assert_int_eq(statedb_chunk_get(db, none, tmp, 16), -ENOENT);
    /* one pack, beside state.db, holding every byte once */
    int64_t size = pack_file_size("state.db", 1, NULL);
    ck_assert_int_ge(size, 100000 + 5000 + 70000 + 1);
    ck_assert_int_lt(size, 100000 + 5000 + 70000 + 1 + 4 * 4096);

    /* copy: appended at the file's offset, in order */
    char *out = dbpath("out.bin");
    int fd = open(out, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "hdr", 3), 3);
    ck_assert_int_eq(statedb_chunk_copy(db, a, 100000, fd), 0);
    ck_assert_int_eq(statedb_chunk_copy(db, c, 70000, fd), 0);
    ck_assert_int_eq(statedb_chunk_copy(db, none, 10, fd), -ENOENT);
    ck_assert_int_eq(statedb_chunk_copy(db, c, 69999, fd), -EBADMSG);
    ck_assert_int_eq(lseek(fd, 0, SEEK_CUR), 3 + 100000 + 70000);
    uint8_t *all = pb_xmalloc(3 + 100000 + 70000);
    ck_assert_int_eq(pread(fd, all, 3 + 100000 + 70000, 0), 3 + 100000 + 70000);
    ck_assert_int_eq(memcmp(all, "hdr", 3), 0);
    ck_assert_int_eq(memcmp(all + 3, ba, 100000), 0);
    ck_assert_int_eq(memcmp(all + 3 + 100000, bc, 70000), 0);
    close(fd);
    free(all);
    free(out);

    /* after a restart: all still there, and the pack keeps its size */
    statedb_close(db);
    db = open_db("state.db");
    assert_bytes(db, a, 1, 100000);
    assert_bytes(db, d, 4, 1);
    ck_assert_int_eq(pack_file_size("state.db", 1, NULL), size);
    statedb_close(db);
    free(ba);
    free(bb);
    free(bc);
    free(bd);
}
END_TEST

START_TEST(test_pack_durability_order)
{
    struct statedb *db = open_db("d.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN], c[STATEDB_ID_LEN], e[STATEDB_ID_LEN];
    fill_id(a, 10);
    fill_id(b, 11);
    fill_id(c, 12);
    fill_id(e, 13);
    uint8_t *ba = mkbytes(10, 30000), *bb = mkbytes(11, 40000);
    struct statedb_chunk_in ia = {a, ba, 30000}, ib = {b, bb, 40000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ia, 1), 0);
    int64_t size0 = pack_file_size("d.db", 1, NULL);

    /* the commit fails after the pack was written and synced: no index
     * row, and the appended bytes stay (the failed commit may come back
     * after a crash: test_pack_failed_commit_comes_back) */
    statedb_fault_inject(db, STORE_FAULT_IOERR_FSYNC, 1);
    ck_assert_int_lt(statedb_chunk_data_put_many(db, &ib, 1), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0);
    int64_t size1 = pack_file_size("d.db", 1, NULL);
    ck_assert_int_ge(size1, size0 + 40000);
    /* inside a caller's transaction that rolls back: the bytes are cut */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ib, 1), 0);
    ck_assert_int_gt(pack_file_size("d.db", 1, NULL), size1);
    statedb_rollback(db);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0);
    ck_assert_int_eq(pack_file_size("d.db", 1, NULL), size1);

    /* a row of another length refuses the whole batch */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, c, 10, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    uint8_t twenty[20] = {0};
    struct statedb_chunk_in two[2] = {{b, bb, 40000}, {c, twenty, 20}};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two, 2), -EINVAL);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, c), 0);
    ck_assert_int_eq(statedb_chunk_data_put(db, c, twenty, 20), -EINVAL);
    ck_assert_int_eq(pack_file_size("d.db", 1, NULL), size1);

    /* a crash between the append and the commit (the process dies with
     * its transaction open): the next open cuts the tail */
    statedb_close(db);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        char *p = dbpath("d.db");
        struct statedb *cdb;
        struct pb_error err;
        int rc = statedb_open(p, &cdb, &err);
        free(p);
        if (rc < 0 || statedb_begin(cdb) < 0)
            _exit(2);
        uint8_t *be = mkbytes(13, 50000);
        struct statedb_chunk_in ie = {e, be, 50000};
        if (statedb_chunk_data_put_many(cdb, &ie, 1) < 0)
            _exit(3);
        kill(getpid(), SIGKILL); /* no commit, no close */
        _exit(4);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child status %d", status);
    ck_assert_int_ge(pack_file_size("d.db", 1, NULL), size0 + 50000);
    db = open_db("d.db");
    ck_assert_int_eq(pack_file_size("d.db", 1, NULL), size0); /* nothing past a's is indexed */
    ck_assert_int_eq(statedb_chunk_data_has(db, e), 0);
    assert_bytes(db, a, 10, 30000);
    /* and appending goes on from there */
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ib, 1), 0);
    assert_bytes(db, b, 11, 40000);
    statedb_close(db);
    free(ba);
    free(bb);
}
END_TEST

/* A COMMIT whose WAL sync fails may still be in the WAL file, and a crash
 * before the next commit lets recovery bring its index rows back: they must
 * not point at bytes that were cut and then reused by a later append. */
START_TEST(test_pack_failed_commit_comes_back)
{
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN], c[STATEDB_ID_LEN], d[STATEDB_ID_LEN];
    fill_id(a, 40);
    fill_id(b, 41);
    fill_id(c, 42);
    fill_id(d, 43);
    struct statedb *db = open_db("f.db");
    uint8_t *ba = mkbytes(40, 30000);
    struct statedb_chunk_in ia = {a, ba, 30000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ia, 1), 0);
    statedb_close(db);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        char *p = dbpath("f.db");
        struct statedb *cdb;
        struct pb_error err;
        if (statedb_open(p, &cdb, &err) < 0)
            _exit(2);
        free(p);
        uint8_t *bb = mkbytes(41, 40000), *bc = mkbytes(42, 40000);
        struct statedb_chunk_in ib = {b, bb, 40000}, ic = {c, bc, 40000};
        /* a commit first: the WAL exists, so the failing sync is the
         * commit's own, after its frames were written */
        uint8_t *bd = mkbytes(43, 20000);
        struct statedb_chunk_in id = {d, bd, 20000};
        if (statedb_chunk_data_put_many(cdb, &id, 1) < 0)
            _exit(6);
        statedb_fault_inject(cdb, STORE_FAULT_IOERR_FSYNC, 1);
        if (statedb_chunk_data_put_many(cdb, &ib, 1) == 0)
            _exit(3);
        /* the next append, its commit cut short by the crash */
        if (statedb_begin(cdb) < 0 || statedb_chunk_data_put_many(cdb, &ic, 1) < 0)
            _exit(4);
        kill(getpid(), SIGKILL);
        _exit(5);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child status %d", status);
    db = open_db("f.db");
    assert_bytes(db, a, 40, 30000);
    assert_bytes(db, d, 43, 20000);
    ck_assert_int_eq(statedb_chunk_data_has(db, c), 0);
    /* b is back or not (either is fine), but never as other bytes */
    if (statedb_chunk_data_has(db, b) == 1)
        assert_bytes(db, b, 41, 40000);
    statedb_close(db);
    free(ba);
}
END_TEST

/*
 * A power loss, emulated: a VFS registered as SQLite's default (statedb's
 * fault VFS wraps it) that, while crash_record is set, copies a WAL file to
 * NAME.durable after every successful sync, unless crash_frozen (the power
 * went out). crash_power_loss() then puts the durable copy in place of the
 * WAL (none: no WAL) and drops the -shm: what a machine that lost power
 * keeps of state.db when no checkpoint ran meanwhile. Pack files are kept
 * as they are (a hole punch counts as durable: the worst case).
 */
#define CRASH_FILES 16
static sqlite3_vfs crash_vfs, *crash_real;
static bool crash_record, crash_frozen;
static struct {
    sqlite3_file *f;
    const sqlite3_io_methods *real;
    char path[512];
} crash_files[CRASH_FILES];
static sqlite3_io_methods crash_methods[4];
static const sqlite3_io_methods *crash_methods_of[4];

static int crash_slot(sqlite3_file *f)
{
    for (int i = 0; i < CRASH_FILES; i++)
        if (crash_files[i].f == f)
            return i;
    return -1;
}

static void crash_copy(const char *from)
{
    char *to = pb_xasprintf("%s.durable", from), *tmp = pb_xasprintf("%s.tmp", to);
    int in = open(from, O_RDONLY), out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert(in >= 0 && out >= 0);
    char buf[65536];
    ssize_t k;
    while ((k = read(in, buf, sizeof(buf))) > 0)
        ck_assert_int_eq(write(out, buf, (size_t)k), k);
    close(in);
    close(out);
    ck_assert_int_eq(rename(tmp, to), 0);
    free(to);
    free(tmp);
}

static int crash_sync(sqlite3_file *f, int flags)
{
    int i = crash_slot(f);
    int rc = crash_files[i].real->xSync(f, flags);
    if (rc == SQLITE_OK && crash_record && !crash_frozen)
        crash_copy(crash_files[i].path);
    return rc;
}

static int crash_close(sqlite3_file *f)
{
    int i = crash_slot(f);
    const sqlite3_io_methods *real = crash_files[i].real;
    crash_files[i].f = NULL;
    return real->xClose(f);
}

/* Opens through the real VFS; a WAL's methods are the real ones with
 * xSync and xClose wrapped (the file object is the real VFS's). */
static int crash_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags,
                      int *out_flags)
{
    (void)vfs;
    int rc = crash_real->xOpen(crash_real, name, f, flags, out_flags);
    if (rc != SQLITE_OK || f->pMethods == NULL || !(flags & SQLITE_OPEN_WAL))
        return rc;
    int slot = crash_slot(NULL), m;
    ck_assert_int_ge(slot, 0);
    for (m = 0; m < 4 && crash_methods_of[m] != NULL && crash_methods_of[m] != f->pMethods; m++)
        ;
    ck_assert_int_lt(m, 4);
    if (crash_methods_of[m] == NULL) {
        crash_methods_of[m] = f->pMethods;
        crash_methods[m] = *f->pMethods;
        crash_methods[m].xSync = crash_sync;
        crash_methods[m].xClose = crash_close;
    }
    crash_files[slot].f = f;
    crash_files[slot].real = f->pMethods;
    snprintf(crash_files[slot].path, sizeof(crash_files[slot].path), "%s", name);
    f->pMethods = &crash_methods[m];
    return rc;
}

static void crash_vfs_register(void)
{
    crash_real = sqlite3_vfs_find(NULL);
    crash_vfs = *crash_real;
    crash_vfs.zName = "check-statedb-crash";
    crash_vfs.xOpen = crash_open;
    ck_assert_int_eq(sqlite3_vfs_register(&crash_vfs, 1), SQLITE_OK);
}

static void crash_freeze(void)
{
    crash_frozen = true;
}

/* The power went out: state.db as of its last durable sync. */
static void crash_power_loss(const char *name)
{
    char *wal = pb_xasprintf("%s/%s-wal", tmpdir, name),
         *dur = pb_xasprintf("%s/%s-wal.durable", tmpdir, name),
         *shm = pb_xasprintf("%s/%s-shm", tmpdir, name);
    if (rename(dur, wal) < 0) {
        ck_assert_int_eq(errno, ENOENT);
        unlink(wal);
    }
    unlink(shm);
    free(wal);
    free(dur);
    free(shm);
}

/* Runs fn(name) in a child that then dies by SIGKILL (no close). */
static void crash_child(void (*fn)(const char *name), const char *name)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        fn(name);
        kill(getpid(), SIGKILL);
        _exit(9);
    }
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child status %d", status);
}

static void lazy_collect_child(const char *name)
{
    char *p = dbpath(name);
    struct statedb *db;
    struct pb_error err;
    uint64_t n = 0;
    crash_record = true;
    if (statedb_open(p, &db, &err) < 0)
        _exit(2);
    statedb_set_lazy(db, true);
    if (statedb_begin(db) < 0 || statedb_chunk_collect(db, 2, &n) < 0 || n != 1 ||
        statedb_commit(db) < 0)
        _exit(3);
    free(p);
}

static void reopen_child(const char *name)
{
    char *p = dbpath(name);
    struct statedb *db;
    struct pb_error err;
    crash_record = true;
    pack_test_after_punch(crash_freeze); /* the power goes out right after */
    if (statedb_open(p, &db, &err) < 0)
        _exit(2);
    free(p);
}

/* A lazy commit deleted a chunk, the process crashed, the next open punched
 * the chunk's range, and then the power went out: the lazy commit must not
 * come undone under the punched range (its row back, its bytes zeroes). */
START_TEST(test_pack_crash_then_power_loss)
{
    crash_vfs_register();
    struct statedb *db = open_db("p.db");
    uint8_t r[STATEDB_ID_LEN], k[STATEDB_ID_LEN];
    fill_id(r, 60);
    fill_id(k, 61);
    uint8_t *br = mkbytes(60, 50000), *bk = mkbytes(61, 50000);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, r, br, 50000, 1), 0);
    ck_assert_int_eq(statedb_chunk_put(db, k, bk, 50000, 100), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    statedb_close(db);
    crash_child(lazy_collect_child, "p.db");
    crash_child(reopen_child, "p.db");
    crash_power_loss("p.db");
    db = open_db("p.db");
    assert_bytes(db, k, 61, 50000);
    if (statedb_chunk_data_has(db, r) == 1)
        assert_bytes(db, r, 60, 50000);
    statedb_close(db);
    sqlite3_vfs_unregister(&crash_vfs);
    free(br);
    free(bk);
}
END_TEST

/* Index rows that cannot be right (a damaged state.db: negative or
 * unaligned offset, negative or oversized length) never make the open-time
 * tail cut reach into the bytes of good chunks, and read as damaged. */
START_TEST(test_pack_bad_index_rows)
{
    struct statedb *db = open_db("x.db");
    uint8_t a[STATEDB_ID_LEN], bad[4][STATEDB_ID_LEN];
    fill_id(a, 70);
    uint8_t *ba = mkbytes(70, 30000);
    struct statedb_chunk_in ia = {a, ba, 30000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ia, 1), 0);
    statedb_close(db);
    int64_t size0 = pack_file_size("x.db", 1, NULL);
    /* rows as a damaged file could hold them */
    const char *rows[4] = {"1, 32768, -30000", "1, 12345, 10", "1, -4096, 100", "1, 0, 1000000000"};
    char *p = dbpath("x.db");
    sqlite3 *h;
    ck_assert_int_eq(sqlite3_open(p, &h), SQLITE_OK);
    for (int i = 0; i < 4; i++) {
        fill_id(bad[i], 71 + (uint32_t)i);
        char *sql = pb_xasprintf("INSERT INTO chunk_data VALUES (?1, %s, 0, 0)", rows[i]);
        sqlite3_stmt *st;
        ck_assert_int_eq(sqlite3_prepare_v2(h, sql, -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_blob(st, 1, bad[i], STATEDB_ID_LEN, SQLITE_STATIC);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
        sqlite3_finalize(st);
        free(sql);
    }
    ck_assert_int_eq(sqlite3_close(h), SQLITE_OK);
    free(p);
    db = open_db("x.db");
    assert_bytes(db, a, 70, 30000);
    ck_assert_int_eq(pack_file_size("x.db", 1, NULL), size0);
    /* each is gone (the tail cut met it) or reads as damaged */
    for (int i = 0; i < 4; i++) {
        uint8_t buf[100];
        int rc = statedb_chunk_get(db, bad[i], buf, sizeof(buf));
        ck_assert_msg(rc == -ENOENT || rc == -EIO, "bad row %d: %d", i, rc);
    }
    statedb_close(db);
    free(ba);
}
END_TEST

/* A pack number is never used twice, not even after a restart that
 * removed the pack: a reader that still holds the old pack open (its
 * descriptor cache) would read the new pack's offsets from the old file. */
START_TEST(test_pack_number_not_reused)
{
    const uint32_t big = 70000, small = 10000;
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN], c[STATEDB_ID_LEN], d[STATEDB_ID_LEN];
    fill_id(a, 80);
    fill_id(b, 81);
    fill_id(c, 82);
    fill_id(d, 83);
    uint8_t *ba = mkbytes(80, big), *bb = mkbytes(81, small), *bc = mkbytes(82, big),
            *bd = mkbytes(83, big);
    struct statedb *db = open_db("n.db");
    statedb_pack_roll_bytes(db, 64 * 1024);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, a, ba, big, 100), 0);   /* pack 1, full */
    ck_assert_int_eq(statedb_chunk_put(db, b, bb, small, 100), 0); /* pack 2 */
    statedb_pack_roll_bytes(db, 8 * 1024);
    ck_assert_int_eq(statedb_chunk_put(db, c, bc, big, 1), 0); /* pack 3 */
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_gt(pack_file_size("n.db", 3, NULL), 0);
    char *p = dbpath("n.db");
    struct statedb *rd;
    struct pb_error err;
    ck_assert_int_eq(statedb_open_reader(p, &rd, &err), 0);
    free(p);
    assert_bytes(rd, c, 82, big); /* the reader holds pack 3 open */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 2, NULL), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    statedb_close(db);
    db = open_db("n.db"); /* pack 3 is empty: removed; pack 2 goes on */
    ck_assert_int_eq(pack_file_size("n.db", 3, NULL), -1);
    statedb_pack_roll_bytes(db, 8 * 1024);
    struct statedb_chunk_in in = {d, bd, big};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &in, 1), 0);
    assert_bytes(db, d, 83, big);
    assert_bytes(rd, d, 83, big);
    assert_bytes(rd, a, 80, big);
    ck_assert_int_gt(pack_file_size("n.db", 4, NULL), 0);
    /* a rollback removes the pack its transaction made; that number is
     * not used again either */
    struct statedb_chunk_in ic = {c, bc, big};
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ic, 1), 0);
    ck_assert_int_gt(pack_file_size("n.db", 5, NULL), 0);
    statedb_rollback(db);
    ck_assert_int_eq(pack_file_size("n.db", 5, NULL), -1);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ic, 1), 0);
    ck_assert_int_eq(pack_file_size("n.db", 5, NULL), -1);
    ck_assert_int_gt(pack_file_size("n.db", 6, NULL), 0);
    assert_bytes(rd, c, 82, big);
    statedb_close(rd);
    statedb_close(db);
    free(ba);
    free(bb);
    free(bc);
    free(bd);
}
END_TEST

/* A disk that fills up or fails under the pack (ENOSPC on the append, EIO
 * on its sync): the store reports it, indexes nothing, cuts what it
 * appended, keeps every committed chunk, and goes on once the disk is
 * fine again. */
START_TEST(test_pack_write_errors)
{
    struct statedb *db = open_db("e.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN], c[STATEDB_ID_LEN];
    fill_id(a, 90);
    fill_id(b, 91);
    fill_id(c, 92);
    uint8_t *ba = mkbytes(90, 30000), *bb = mkbytes(91, 30000), *bc = mkbytes(92, 30000);
    struct statedb_chunk_in ia = {a, ba, 30000}, two[2] = {{b, bb, 30000}, {c, bc, 30000}};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ia, 1), 0);
    int64_t size0 = pack_file_size("e.db", 1, NULL);

    /* a batch of two, the second append fails: neither is indexed */
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two, 0), 0);
    pack_test_fail(-ENOSPC, 0, 1);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two, 2), -ENOSPC);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, c), 0);
    ck_assert_int_eq(pack_file_size("e.db", 1, NULL), size0);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two, 1), 0);
    size0 = pack_file_size("e.db", 1, NULL);
    /* the same inside an apply transaction: the caller rolls back */
    pack_test_fail(-ENOSPC, 0, 1);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, c, bc, 30000, 1), -ENOSPC);
    statedb_rollback(db);
    ck_assert_int_eq(statedb_chunk_has(db, c), 0);
    ck_assert_int_eq(pack_file_size("e.db", 1, NULL), size0);

    pack_test_fail(0, -EIO, 1); /* the sync before the commit */
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two + 1, 1), -EIO);
    ck_assert_int_eq(statedb_chunk_data_has(db, c), 0);
    ck_assert_int_eq(pack_file_size("e.db", 1, NULL), size0);
    pack_test_fail(0, -EIO, 1);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, c, bc, 30000, 1), 0);
    ck_assert_int_eq(statedb_commit(db), -EIO);
    ck_assert(!statedb_in_txn(db));
    ck_assert_int_eq(statedb_chunk_has(db, c), 0);
    ck_assert_int_eq(pack_file_size("e.db", 1, NULL), size0);

    /* the disk is fine again */
    ck_assert_int_eq(statedb_chunk_data_put_many(db, two + 1, 1), 0);
    statedb_close(db);
    db = open_db("e.db");
    assert_bytes(db, a, 90, 30000);
    assert_bytes(db, b, 91, 30000);
    assert_bytes(db, c, 92, 30000);
    statedb_close(db);
    free(ba);
    free(bb);
    free(bc);
}
END_TEST

/* More lost packs than one pass of the open-time check takes: every one of
 * their chunks counts as missing (none reads as "here" but damaged). */
START_TEST(test_pack_many_lost)
{
    struct statedb *db = open_db("m.db");
    statedb_pack_roll_bytes(db, 4096);
    uint8_t id[40][STATEDB_ID_LEN];
    ck_assert_int_eq(statedb_begin(db), 0);
    for (uint32_t i = 0; i < 40; i++) {
        uint8_t *b = mkbytes(300 + i, 5000);
        fill_id(id[i], 300 + i);
        ck_assert_int_eq(statedb_chunk_put(db, id[i], b, 5000, 100), 0);
        free(b);
    }
    ck_assert_int_eq(statedb_commit(db), 0);
    statedb_close(db);
    for (unsigned n = 1; n <= 39; n++) { /* all but the last */
        char *p = pack_path("m.db", n);
        ck_assert_msg(unlink(p) == 0, "%s", p);
        free(p);
    }
    db = open_db("m.db");
    for (uint32_t i = 0; i < 39; i++)
        ck_assert_int_eq(statedb_chunk_data_has(db, id[i]), 0);
    assert_bytes(db, id[39], 339, 5000);
    assert_counts_exact(db, "m.db");
    statedb_close(db);
}
END_TEST

/* A pack cut by someone else while the store runs: the chunks it no longer
 * holds count as missing from the first read that finds them gone (so the
 * fetcher gets them again), not only after a restart; the others read. */
START_TEST(test_pack_cut_while_running)
{
    struct statedb *db = open_db("w.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN];
    fill_id(a, 95);
    fill_id(b, 96);
    uint8_t *ba = mkbytes(95, 30000), *bb = mkbytes(96, 30000);
    struct statedb_ref refs[2] = {{.len = 30000}, {.len = 30000}};
    memcpy(refs[0].id, a, STATEDB_ID_LEN);
    memcpy(refs[1].id, b, STATEDB_ID_LEN);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, a, ba, 30000, 1), 0);
    ck_assert_int_eq(statedb_chunk_put(db, b, bb, 30000, 1), 0);
    ck_assert_int_eq(statedb_chunklist_put(db, "f", refs, 2), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    char *p = pack_path("w.db", 1);
    ck_assert_int_eq(truncate(p, 32768 + 100), 0); /* inside b */
    free(p);
    uint8_t *got = pb_xmalloc(30000);
    ck_assert_int_eq(statedb_chunk_get(db, b, got, 30000), -ENOENT);
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0);
    struct statedb_ref miss[4];
    size_t n;
    ck_assert_int_eq(statedb_chunk_missing(db, NULL, miss, 4, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(memcmp(miss[0].id, b, STATEDB_ID_LEN), 0);
    assert_bytes(db, a, 95, 30000);
    /* fetched again: stored at the tail, read back */
    struct statedb_chunk_in ib = {b, bb, 30000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ib, 1), 0);
    assert_bytes(db, b, 96, 30000);
    assert_counts_exact(db, "w.db");
    statedb_close(db);
    free(got);
    free(ba);
    free(bb);
}
END_TEST

/* A chunk deleted and stored again in one transaction: the freed range is
 * the old one; the new bytes (appended elsewhere) survive the punch. */
START_TEST(test_pack_delete_readd_one_txn)
{
    struct statedb *db = open_db("y.db");
    uint8_t x[STATEDB_ID_LEN];
    fill_id(x, 97);
    uint8_t *bx = mkbytes(97, 40000);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, x, bx, 40000, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_begin(db), 0);
    uint64_t n;
    ck_assert_int_eq(statedb_chunk_collect(db, 2, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(statedb_chunk_put(db, x, bx, 40000, 100), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    assert_bytes(db, x, 97, 40000);
    /* bytes pushed ahead, collected as never named, pushed again, then
     * named: one transaction each way */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 200, &n), 0);
    struct statedb_chunk_in ix = {x, bx, 40000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ix, 1), 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, pb_now_ms() + 1000, 0, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ix, 1), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, x, 40000, 300), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    assert_bytes(db, x, 97, 40000);
    statedb_close(db);
    db = open_db("y.db");
    assert_bytes(db, x, 97, 40000);
    assert_counts_exact(db, "y.db");
    statedb_close(db);
    free(bx);
}
END_TEST

START_TEST(test_pack_unrowed)
{
    struct statedb *db = open_db("u.db");
    uint8_t x[STATEDB_ID_LEN], y[STATEDB_ID_LEN], z[STATEDB_ID_LEN], w[STATEDB_ID_LEN];
    fill_id(x, 20);
    fill_id(y, 21);
    fill_id(z, 22);
    fill_id(w, 23);
    uint8_t *bx = mkbytes(20, 9000);
    uint64_t now = pb_now_ms(), n = 99;
    ck_assert_int_eq(statedb_chunk_data_put(db, x, bx, 9000), 0);
    struct statedb_status st;
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &st), 0);
    ck_assert_uint_eq(st.chunks, 0); /* bytes without a row count nowhere */
    ck_assert_uint_eq(st.missing, 0);
    /* young: kept; old: removed (and the space goes back) */
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now, 60000, &n), 0);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, x), 1);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now + 120000, 60000, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(statedb_chunk_data_has(db, x), 0);

    /* a row names them: kept whatever their age; the row is raised */
    struct statedb_chunk_in iy = {y, bx, 9000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &iy, 1), 0);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, y, 9000, 5), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, y, 9001, 5), -EINVAL);
    ck_assert_int_eq(statedb_chunk_row_put(db, y, 9000, 9), 0); /* keep_until 9 */
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now + 1000000000, 1, &n), 0);
    ck_assert_uint_eq(n, 0);
    assert_bytes(db, y, 20, 9000);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 9, &n), 0);
    ck_assert_uint_eq(n, 0); /* keep_until 9 is not < 9 */
    ck_assert_int_eq(statedb_chunk_collect(db, 10, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, y), 0); /* with its row */

    /* a time stored under an earlier boot of the clock (ahead of now)
     * counts as stored now */
    ck_assert_int_eq(statedb_chunk_data_put(db, z, bx, 9000), 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, 5, 1000, &n), 0);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, 1006, 1000, &n), 0);
    ck_assert_uint_eq(n, 1);

    /* bytes of another length than the row that comes: dropped */
    ck_assert_int_eq(statedb_chunk_data_put(db, w, bx, 10), 0);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, w, 11, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, w), 0);
    ck_assert_int_eq(statedb_chunk_has(db, w), 1);

    /* a row without bytes, then referenced: missing until they come */
    uint8_t v[STATEDB_ID_LEN];
    fill_id(v, 24);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, v, 9000, 1), 0);
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &st), 0);
    ck_assert_uint_eq(st.missing, 0); /* not referenced yet */
    struct statedb_ref ref;
    memcpy(ref.id, v, STATEDB_ID_LEN);
    ref.len = 9000;
    ck_assert_int_eq(statedb_chunklist_put(db, "f", &ref, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &st), 0);
    ck_assert_uint_eq(st.missing, 1);
    ck_assert_uint_eq(st.missing_bytes, 9000);
    assert_counts_exact(db, "u.db");
    ck_assert_int_eq(statedb_chunk_data_put(db, v, bx, 9000), 0);
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &st), 0);
    ck_assert_uint_eq(st.missing, 0);
    assert_counts_exact(db, "u.db");
    statedb_close(db);
    free(bx);
}
END_TEST

/* A lagging node acknowledges a push of bytes it holds under an old,
 * unreferenced row; applying the collection of that row (before the entry
 * naming the chunk again) must not take the bytes it acknowledged. Without
 * the push, the same collection takes them with the row. */
START_TEST(test_pack_pushed_outlives_row)
{
    struct statedb *db = open_db("pin.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN];
    fill_id(a, 40);
    fill_id(b, 41);
    uint8_t *ba = mkbytes(40, 7000), *bb = mkbytes(41, 7000);
    uint64_t n = 0;
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, a, ba, 7000, 5), 0);
    ck_assert_int_eq(statedb_chunk_put(db, b, bb, 7000, 5), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    /* a is pushed again (already here: kept, not written twice) */
    struct statedb_chunk_in ia = {a, ba, 7000};
    int64_t size0 = pack_file_size("pin.db", 1, NULL);
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ia, 1), 0);
    ck_assert_int_eq(pack_file_size("pin.db", 1, NULL), size0);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 10, &n), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(statedb_chunk_has(db, a), 0);
    ck_assert_int_eq(statedb_chunk_has(db, b), 0);
    assert_bytes(db, a, 40, 7000);                      /* acknowledged: still here */
    ck_assert_int_eq(statedb_chunk_data_has(db, b), 0); /* not pushed: gone with its row */
    assert_counts_exact(db, "pin.db");
    /* the REFS entry naming a applies: its row is back, with the bytes */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_row_put(db, a, 7000, 20), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    uint64_t now = pb_now_ms();
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now + 7200000, 3600000, &n), 0);
    ck_assert_uint_eq(n, 0);
    assert_bytes(db, a, 40, 7000);
    /* never named again: bytes without a row, removed by age */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 30, &n), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, a), 1);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now, 3600000, &n), 0);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now + 7200000, 3600000, &n), 0);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(statedb_chunk_data_has(db, a), 0);
    assert_counts_exact(db, "pin.db");
    statedb_close(db);
    free(ba);
    free(bb);
}
END_TEST

#define CHUNK_128K (128u * 1024u)

START_TEST(test_pack_free_punch_unlink)
{
    struct statedb *db = open_db("f.db");
    statedb_pack_roll_bytes(db, 4 * CHUNK_128K);
    uint8_t id[16][STATEDB_ID_LEN];
    ck_assert_int_eq(statedb_begin(db), 0);
    for (uint32_t i = 0; i < 16; i++) {
        uint8_t *b = mkbytes(100 + i, CHUNK_128K);
        fill_id(id[i], 100 + i);
        /* 0..5 may go at index 2, the others not before 100 */
        ck_assert_int_eq(statedb_chunk_put(db, id[i], b, CHUNK_128K, i < 6 ? 1 : 100), 0);
        free(b);
    }
    ck_assert_int_eq(statedb_commit(db), 0);
    /* four packs of four chunks */
    int64_t alloc1, alloc2, alloc2b;
    for (unsigned p = 1; p <= 4; p++)
        ck_assert_int_eq(pack_file_size("f.db", p, NULL), 4 * CHUNK_128K);
    ck_assert_int_eq(pack_file_size("f.db", 5, NULL), -1);
    pack_file_size("f.db", 1, &alloc1);
    pack_file_size("f.db", 2, &alloc2);
    ck_assert_int_ge(alloc1, 4 * CHUNK_128K);
    ck_assert_int_ge(alloc2, 4 * CHUNK_128K);

    /* a rollback gives nothing back */
    ck_assert_int_eq(statedb_begin(db), 0);
    uint64_t n;
    ck_assert_int_eq(statedb_chunk_collect(db, 1000, &n), 0);
    ck_assert_uint_eq(n, 16);
    statedb_rollback(db);
    for (uint32_t i = 0; i < 16; i++)
        assert_bytes(db, id[i], 100 + i, CHUNK_128K);
    pack_file_size("f.db", 2, &alloc2b);
    ck_assert_int_eq(alloc2b, alloc2);

    /* collecting 0..5 after the commit: pack 1 (0..3) is removed, pack 2
     * loses the blocks of 4 and 5 and keeps 6 and 7 intact */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 2, &n), 0);
    ck_assert_uint_eq(n, 6);
    ck_assert_int_eq(pack_file_size("f.db", 1, NULL), 4 * CHUNK_128K); /* not before the commit */
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(pack_file_size("f.db", 1, NULL), -1);
    ck_assert_int_eq(pack_file_size("f.db", 2, &alloc2b), 4 * CHUNK_128K);
    ck_assert_int_le(alloc2b, alloc2 - 2 * (int64_t)CHUNK_128K);
    for (uint32_t i = 6; i < 16; i++)
        assert_bytes(db, id[i], 100 + i, CHUNK_128K);
    for (uint32_t i = 0; i < 6; i++)
        ck_assert_int_eq(statedb_chunk_data_has(db, id[i]), 0);

    /* the current pack is never removed, even emptied */
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_collect(db, 1000, &n), 0);
    ck_assert_uint_eq(n, 10);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert_int_eq(pack_file_size("f.db", 2, NULL), -1);
    ck_assert_int_eq(pack_file_size("f.db", 3, NULL), -1);
    ck_assert_int_eq(pack_file_size("f.db", 4, NULL), 4 * CHUNK_128K);
    statedb_close(db);
    /* and at the next open a pack without a chunk goes */
    db = open_db("f.db");
    ck_assert_int_eq(pack_file_size("f.db", 4, NULL), -1);
    uint8_t *b = mkbytes(7, 1000);
    ck_assert_int_eq(statedb_chunk_data_put(db, id[0], b, 1000), 0);
    assert_bytes(db, id[0], 7, 1000);
    free(b);
    statedb_close(db);
}
END_TEST

/* After a lazy commit (which a power loss may undo) nothing is punched:
 * the next FULL commit frees what it deleted. */
START_TEST(test_pack_lazy_free)
{
    struct statedb *db = open_db("z.db");
    statedb_pack_roll_bytes(db, 2 * CHUNK_128K);
    uint8_t id[4][STATEDB_ID_LEN];
    ck_assert_int_eq(statedb_begin(db), 0);
    for (uint32_t i = 0; i < 4; i++) {
        uint8_t *b = mkbytes(200 + i, CHUNK_128K);
        fill_id(id[i], 200 + i);
        ck_assert_int_eq(statedb_chunk_put(db, id[i], b, CHUNK_128K, i < 2 ? 1 : 100), 0);
        free(b);
    }
    ck_assert_int_eq(statedb_commit(db), 0);
    int64_t alloc;
    ck_assert_int_eq(pack_file_size("z.db", 1, &alloc), 2 * CHUNK_128K);
    ck_assert_int_ge(alloc, 2 * CHUNK_128K);
    statedb_set_lazy(db, true);
    ck_assert_int_eq(statedb_begin(db), 0);
    uint64_t n;
    ck_assert_int_eq(statedb_chunk_collect(db, 2, &n), 0);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(statedb_commit(db), 0);
    ck_assert(statedb_lazy_pending(db));
    ck_assert_int_eq(pack_file_size("z.db", 1, NULL), 2 * CHUNK_128K); /* still there */
    ck_assert_int_eq(statedb_sync(db), 0);
    ck_assert_int_eq(pack_file_size("z.db", 1, NULL), -1); /* emptied, not current: gone */
    assert_bytes(db, id[2], 202, CHUNK_128K);
    statedb_close(db);
}
END_TEST

START_TEST(test_pack_reader)
{
    struct statedb *db = open_db("r.db");
    uint8_t a[STATEDB_ID_LEN], b[STATEDB_ID_LEN];
    fill_id(a, 30);
    fill_id(b, 31);
    uint8_t *ba = mkbytes(30, 60000), *bb = mkbytes(31, 20000);
    ck_assert_int_eq(statedb_begin(db), 0);
    ck_assert_int_eq(statedb_chunk_put(db, a, ba, 60000, 1), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    char *p = dbpath("r.db");
    struct statedb *rd;
    struct pb_error err;
    ck_assert_int_eq(statedb_open_reader(p, &rd, &err), 0);
    assert_bytes(rd, a, 30, 60000);
    /* bytes the writer adds later are read too */
    struct statedb_chunk_in ib = {b, bb, 20000};
    ck_assert_int_eq(statedb_chunk_data_put_many(db, &ib, 1), 0);
    assert_bytes(rd, b, 31, 20000);
    char *out = dbpath("copy.bin");
    int fd = open(out, O_RDWR | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(statedb_chunk_copy(rd, a, 60000, fd), 0);
    uint8_t *got = pb_xmalloc(60000);
    ck_assert_int_eq(pread(fd, got, 60000, 0), 60000);
    ck_assert_int_eq(memcmp(got, ba, 60000), 0);
    close(fd);
    free(got);
    free(out);
    /* writes are refused */
    ck_assert_int_eq(statedb_chunk_data_put_many(rd, &ib, 1), -EROFS);
    ck_assert_int_eq(statedb_chunk_data_put(rd, b, bb, 20000), -EROFS);
    ck_assert_int_eq(statedb_chunk_data_collect_unrowed(rd, 0, 0, NULL), -EROFS);
    /* collected by the writer: the reader says absent, never zeroes */
    ck_assert_int_eq(statedb_begin(db), 0);
    uint64_t n;
    ck_assert_int_eq(statedb_chunk_collect(db, 2, &n), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    uint8_t tmp[60000];
    ck_assert_int_eq(statedb_chunk_get(rd, a, tmp, 60000), -ENOENT);
    statedb_close(rd);
    statedb_close(db);
    free(p);
    free(ba);
    free(bb);
}
END_TEST

/* A pack removed or cut by someone else: its chunks count as missing (and
 * are fetched again), never read as garbage. */
START_TEST(test_pack_lost)
{
    struct statedb *db = open_db("l.db");
    statedb_pack_roll_bytes(db, 50000);
    uint8_t id[4][STATEDB_ID_LEN];
    struct statedb_ref refs[4];
    ck_assert_int_eq(statedb_begin(db), 0);
    for (uint32_t i = 0; i < 4; i++) {
        uint8_t *b = mkbytes(40 + i, 30000);
        fill_id(id[i], 40 + i);
        ck_assert_int_eq(statedb_chunk_put(db, id[i], b, 30000, 1), 0);
        memcpy(refs[i].id, id[i], STATEDB_ID_LEN);
        refs[i].len = 30000;
        free(b);
    }
    ck_assert_int_eq(statedb_chunklist_put(db, "f", refs, 4), 0);
    ck_assert_int_eq(statedb_commit(db), 0);
    statedb_close(db);
    /* packs 1 (chunks 0, 1) and 2 (2, 3): 1 goes, 2 is cut inside chunk 3 */
    char *p1 = pack_path("l.db", 1), *p2 = pack_path("l.db", 2);
    ck_assert_int_eq(unlink(p1), 0);
    ck_assert_int_eq(truncate(p2, 4096 + 30000 + 100), 0);
    db = open_db("l.db");
    struct statedb_status st;
    ck_assert_int_eq(statedb_status_get(db, 1, 2, &st), 0);
    ck_assert_uint_eq(st.missing, 3);
    ck_assert_int_eq(statedb_chunk_data_has(db, id[0]), 0);
    ck_assert_int_eq(statedb_chunk_data_has(db, id[3]), 0);
    assert_bytes(db, id[2], 42, 30000);
    assert_counts_exact(db, "l.db");
    statedb_close(db);
    free(p1);
    free(p2);
}
END_TEST

/* Many random operations (rows, bytes with and without rows, chunk lists,
 * collection of both kinds, rollbacks): the kept counts equal a recount
 * after every commit, and every byte read back is right. */
START_TEST(test_pack_counts_random)
{
    struct statedb *db = open_db("c.db");
    statedb_pack_roll_bytes(db, 256 * 1024);
    uint32_t seed = 12345;
    uint64_t index = 10, now = 1000000;
    for (int round = 0; round < 150; round++) {
        seed = seed * 1103515245u + 12345u;
        uint32_t r = seed >> 8;
        uint32_t k = r % 24, len = 100 + k * 997;
        uint8_t id[STATEDB_ID_LEN];
        fill_id(id, 1000 + k);
        uint8_t *b = mkbytes(1000 + k, len);
        bool txn = (r >> 5) % 3 != 0;
        if (txn)
            ck_assert_int_eq(statedb_begin(db), 0);
        switch ((r >> 7) % 6) {
        case 0:
            ck_assert_int_eq(statedb_chunk_data_put(db, id, b, len), 0);
            break;
        case 1:
            if (txn)
                ck_assert_int_eq(statedb_chunk_row_put(db, id, len, index + (r >> 12) % 5), 0);
            break;
        case 2: {
            if (!txn)
                break;
            /* a list of the chunks that have a row */
            struct statedb_ref refs[24];
            uint32_t n = 0;
            for (uint32_t j = (r >> 12) % 3; j < 24; j += 1 + (r >> 14) % 4) {
                fill_id(refs[n].id, 1000 + j);
                refs[n].len = 100 + j * 997;
                if (statedb_chunk_has(db, refs[n].id) == 1)
                    n++;
            }
            char path[16];
            snprintf(path, sizeof(path), "p%u", (r >> 16) % 4);
            ck_assert_int_eq(statedb_chunklist_put(db, path, refs, n), 0);
            break;
        }
        case 3:
            if (txn) {
                uint64_t n;
                ck_assert_int_eq(statedb_chunk_collect(db, index++, &n), 0);
            }
            break;
        case 4:
            ck_assert_int_eq(statedb_chunk_data_collect_unrowed(db, now, 500, NULL), 0);
            break;
        default: {
            struct statedb_chunk_in in = {id, b, len};
            ck_assert_int_eq(statedb_chunk_data_put_many(db, &in, 1), 0);
            break;
        }
        }
        now += 100;
        if (txn && (r >> 20) % 5 == 0)
            statedb_rollback(db);
        else if (txn)
            ck_assert_int_eq(statedb_commit(db), 0);
        free(b);
        if (round % 10 == 9)
            assert_counts_exact(db, "c.db");
    }
    /* every byte here is right */
    for (uint32_t k = 0; k < 24; k++) {
        uint8_t id[STATEDB_ID_LEN];
        fill_id(id, 1000 + k);
        if (statedb_chunk_data_has(db, id) == 1)
            assert_bytes(db, id, 1000 + k, 100 + k * 997);
    }
    assert_counts_exact(db, "c.db");
    statedb_close(db);
    db = open_db("c.db");
    assert_counts_exact(db, "c.db");
    statedb_close(db);
}
END_TEST

static Suite *pack_suite(void)
{
    Suite *s = suite_create("statedb_pack");
    TCase *tc = tcase_create("pack");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_pack_put_get_copy);
    tcase_add_test(tc, test_pack_durability_order);
    tcase_add_test(tc, test_pack_failed_commit_comes_back);
    tcase_add_test(tc, test_pack_crash_then_power_loss);
    tcase_add_test(tc, test_pack_bad_index_rows);
    tcase_add_test(tc, test_pack_number_not_reused);
    tcase_add_test(tc, test_pack_write_errors);
    tcase_add_test(tc, test_pack_many_lost);
    tcase_add_test(tc, test_pack_cut_while_running);
    tcase_add_test(tc, test_pack_delete_readd_one_txn);
    tcase_add_test(tc, test_pack_unrowed);
    tcase_add_test(tc, test_pack_pushed_outlives_row);
    tcase_add_test(tc, test_pack_free_punch_unlink);
    tcase_add_test(tc, test_pack_lazy_free);
    tcase_add_test(tc, test_pack_reader);
    tcase_add_test(tc, test_pack_lost);
    tcase_add_test(tc, test_pack_counts_random);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(pack_suite());
    srunner_run_all(sr, CK_ENV);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
