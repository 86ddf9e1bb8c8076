/*
 * statedb-pack-bench.c: storing and materializing one big file's chunk bytes
 * through state.db's chunk packs (format 3) against the SQLite BLOBs of
 * format 2, on the same machine in the same run.
 *
 *   tests/bench/statedb-pack-bench [DIR] [MiB]    (default /tmp, 256)
 *
 * The file is MiB of pseudo-random bytes in 64 KiB chunks (the chunker's
 * average), stored 64 chunks (4 MiB) per transaction with durable commits:
 *   packs: statedb_chunk_data_put_many() (append, one fdatasync, one FULL
 *          commit of the index rows per batch);
 *   blobs: format 2's table chunk_data(id, data BLOB) with state.db's
 *          pragmas (WAL, synchronous FULL, wal_autocheckpoint 4096), the
 *          bytes written to the WAL, then again by the checkpoints (the last
 *          checkpoint is counted).
 * Materializing writes the file as fsm_tree_put() does (sequential writes
 * into a new file, then fsync): packs with statedb_chunk_copy()
 * (copy_file_range), and for comparison statedb_chunk_get() + write();
 * blobs with SELECT data + write(). The page cache is warm for both. Last,
 * up to 1024 chunks stored one per statedb_chunk_data_put() call outside a
 * transaction (how fetched chunks are stored one by one): one fdatasync
 * each.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/util.h"
#include "store/statedb.h"

#define CHUNK (64u * 1024u)
#define BATCH 64u

static uint8_t *bytes_of(uint32_t i)
{
    static uint8_t buf[CHUNK];
    uint64_t x = 0x9e3779b97f4a7c15ull * (i + 1);
    for (uint32_t k = 0; k < CHUNK; k += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + k, &x, 8);
    }
    return buf;
}

static void id_of(uint32_t i, uint8_t id[STATEDB_ID_LEN])
{
    memset(id, 0, STATEDB_ID_LEN);
    memcpy(id, &i, sizeof(i));
    id[31] = 0xb5;
}

/* CPU time of the process so far (user + system), us. */
static uint64_t cpu_us(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
           (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static double mbps(uint64_t bytes, uint64_t us)
{
    return us ? (double)bytes / (double)us : 0.0; /* bytes/us = MB/s */
}

static int die(const char *what, const char *msg)
{
    fprintf(stderr, "statedb-pack-bench: %s: %s\n", what, msg);
    exit(1);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int out_file(const char *dir, const char *name)
{
    char *p = pb_xasprintf("%s/%s", dir, name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        die(p, strerror(errno));
    free(p);
    return fd;
}

static void finish_file(int fd)
{
    if (fsync(fd) < 0)
        die("fsync", strerror(errno));
    close(fd);
}

static void bench_packs(const char *dir, uint32_t n, uint64_t total)
{
    char *path = pb_xasprintf("%s/state.db", dir);
    struct statedb *db;
    struct pb_error err;
    if (statedb_open(path, &db, &err) < 0)
        die("open", err.msg);
    uint8_t(*ids)[STATEDB_ID_LEN] = pb_xcalloc(BATCH, STATEDB_ID_LEN);
    uint8_t *data = pb_xmalloc((size_t)BATCH * CHUNK);
    struct statedb_chunk_in in[BATCH];
    uint64_t t0 = pb_now_us(), c0 = cpu_us();
    for (uint32_t i = 0; i < n; i += BATCH) {
        uint32_t k = 0;
        for (; k < BATCH && i + k < n; k++) {
            id_of(i + k, ids[k]);
            memcpy(data + (size_t)k * CHUNK, bytes_of(i + k), CHUNK);
            in[k] = (struct statedb_chunk_in){ids[k], data + (size_t)k * CHUNK, CHUNK};
        }
        if (statedb_chunk_data_put_many(db, in, k) < 0)
            die("put_many", statedb_errmsg(db));
    }
    uint64_t store_us = pb_now_us() - t0, store_cpu = cpu_us() - c0;

    uint8_t id[STATEDB_ID_LEN];
    int fd = out_file(dir, "file.copy");
    t0 = pb_now_us();
    c0 = cpu_us();
    for (uint32_t i = 0; i < n; i++) {
        id_of(i, id);
        if (statedb_chunk_copy(db, id, CHUNK, fd) < 0)
            die("copy", statedb_errmsg(db));
    }
    finish_file(fd);
    uint64_t copy_us = pb_now_us() - t0, copy_cpu = cpu_us() - c0;

    fd = out_file(dir, "file.read");
    uint8_t *buf = pb_xmalloc(CHUNK);
    t0 = pb_now_us();
    c0 = cpu_us();
    for (uint32_t i = 0; i < n; i++) {
        id_of(i, id);
        if (statedb_chunk_get(db, id, buf, CHUNK) < 0 || pb_write_all(fd, buf, CHUNK) < 0)
            die("get", statedb_errmsg(db));
    }
    finish_file(fd);
    uint64_t read_us = pb_now_us() - t0, read_cpu = cpu_us() - c0;
    printf("packs: store %.0f MB/s (%.2f s, cpu %.2f s), materialize copy_file_range %.0f MB/s"
           " (%.2f s, cpu %.2f s), pread+write %.0f MB/s (%.2f s, cpu %.2f s)\n",
           mbps(total, store_us), store_us / 1e6, store_cpu / 1e6, mbps(total, copy_us),
           copy_us / 1e6, copy_cpu / 1e6, mbps(total, read_us), read_us / 1e6, read_cpu / 1e6);
    statedb_close(db);

    /* one chunk per call outside a transaction (statedb_chunk_data_put: how
     * sm_chunk_store() did before it took a whole reply): one fdatasync each */
    char *path1 = pb_xasprintf("%s/one/state.db", dir);
    char *dir1 = pb_xasprintf("%s/one", dir);
    if (mkdir(dir1, 0700) < 0 || statedb_open(path1, &db, &err) < 0)
        die("open", err.msg);
    uint32_t n1 = n < 1024 ? n : 1024;
    t0 = pb_now_us();
    c0 = cpu_us();
    for (uint32_t i = 0; i < n1; i++) {
        id_of(i, id);
        if (statedb_chunk_data_put(db, id, bytes_of(i), CHUNK) < 0)
            die("data_put", statedb_errmsg(db));
    }
    uint64_t one_us = pb_now_us() - t0, one_cpu = cpu_us() - c0;
    printf("packs: store one chunk per call (%" PRIu32 " calls): %.0f MB/s (%.2f ms per call,"
           " cpu %.2f s)\n",
           n1, mbps((uint64_t)n1 * CHUNK, one_us), one_us / 1e3 / n1, one_cpu / 1e6);
    statedb_close(db);
    free(path1);
    free(dir1);
    free(buf);
    free(data);
    free(ids);
    free(path);
}

static void bench_blobs(const char *dir, uint32_t n, uint64_t total)
{
    char *path = pb_xasprintf("%s/blobs.db", dir);
    sqlite3 *h;
    if (sqlite3_open(path, &h) != SQLITE_OK)
        die("open", sqlite3_errmsg(h));
    if (sqlite3_exec(h,
                     "PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL;"
                     "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
                     "PRAGMA cache_size = -16384; PRAGMA wal_autocheckpoint = 4096;"
                     "PRAGMA journal_size_limit = 67108864;"
                     "CREATE TABLE chunk_data (id BLOB PRIMARY KEY NOT NULL,"
                     " data BLOB NOT NULL) STRICT;",
                     NULL, NULL, NULL) != SQLITE_OK)
        die("schema", sqlite3_errmsg(h));
    sqlite3_stmt *ins, *sel;
    sqlite3_prepare_v2(h, "INSERT OR IGNORE INTO chunk_data (id, data) VALUES (?1, ?2)", -1, &ins,
                       NULL);
    sqlite3_prepare_v2(h, "SELECT data FROM chunk_data WHERE id = ?1", -1, &sel, NULL);
    uint8_t id[STATEDB_ID_LEN];
    uint64_t t0 = pb_now_us(), c0 = cpu_us();
    for (uint32_t i = 0; i < n; i += BATCH) {
        sqlite3_exec(h, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        for (uint32_t k = 0; k < BATCH && i + k < n; k++) {
            id_of(i + k, id);
            sqlite3_reset(ins);
            sqlite3_bind_blob(ins, 1, id, STATEDB_ID_LEN, SQLITE_TRANSIENT);
            sqlite3_bind_blob(ins, 2, bytes_of(i + k), CHUNK, SQLITE_TRANSIENT);
            if (sqlite3_step(ins) != SQLITE_DONE)
                die("insert", sqlite3_errmsg(h));
        }
        if (sqlite3_exec(h, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
            die("commit", sqlite3_errmsg(h));
    }
    /* the bytes still only in the WAL reach the file too */
    sqlite3_exec(h, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL);
    uint64_t store_us = pb_now_us() - t0, store_cpu = cpu_us() - c0;

    int fd = out_file(dir, "file.blob");
    t0 = pb_now_us();
    c0 = cpu_us();
    for (uint32_t i = 0; i < n; i++) {
        id_of(i, id);
        sqlite3_reset(sel);
        sqlite3_bind_blob(sel, 1, id, STATEDB_ID_LEN, SQLITE_TRANSIENT);
        if (sqlite3_step(sel) != SQLITE_ROW)
            die("select", sqlite3_errmsg(h));
        const void *p = sqlite3_column_blob(sel, 0);
        if (pb_write_all(fd, p, (size_t)sqlite3_column_bytes(sel, 0)) < 0)
            die("write", strerror(errno));
    }
    finish_file(fd);
    uint64_t read_us = pb_now_us() - t0, read_cpu = cpu_us() - c0;
    printf("blobs: store %.0f MB/s (%.2f s, cpu %.2f s), materialize SELECT+write %.0f MB/s"
           " (%.2f s, cpu %.2f s)\n",
           mbps(total, store_us), store_us / 1e6, store_cpu / 1e6, mbps(total, read_us),
           read_us / 1e6, read_cpu / 1e6);
    sqlite3_finalize(ins);
    sqlite3_finalize(sel);
    sqlite3_close(h);
    free(path);
}

int main(int argc, char **argv)
{
    const char *base = argc > 1 ? argv[1] : "/tmp";
    uint64_t mib = 256;
    if (argc > 2 && pb_parse_u64(argv[2], 1, 1u << 20, &mib) < 0) {
        fprintf(stderr, "usage: %s [DIR] [MiB]\n", argv[0]);
        return 2;
    }
    char *dir = pb_xasprintf("%s/statedb-pack-bench.XXXXXX", base);
    if (mkdtemp(dir) == NULL)
        die(dir, strerror(errno));
    uint32_t n = (uint32_t)(mib * 1024u * 1024u / CHUNK);
    uint64_t total = (uint64_t)n * CHUNK;
    printf("%" PRIu64 " MiB in %" PRIu32 " chunks of %u KiB, %u chunks per transaction, in %s\n",
           mib, n, CHUNK / 1024, BATCH, dir);
    bench_blobs(dir, n, total);
    bench_packs(dir, n, total);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
    return 0;
}
