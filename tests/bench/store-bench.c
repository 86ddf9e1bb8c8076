/*
 * store-bench.c: throughput and latency of raft.db group commit, fsync on.
 *
 * usage: store-bench [-t seconds] [dir]
 *
 * For batch sizes 1, 16, 64 and 256 of 256-byte entries, two runs each:
 * "serial" keeps one batch in flight (every batch waits for its own fsync),
 * "pipelined" keeps up to 64 in flight (the storage thread folds what queued
 * during one commit into the next). Prints batches/s, entries/s, MB/s, the
 * number of completions, and p50/p99 submit-to-completion latency. The
 * database lives in a fresh directory under dir (default "."), removed after.
 */
#include "config.h"

#include <errno.h>
#include <event2/event.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/util.h"
#include "store/store.h"

#define ENTRY_BYTES   256
#define MAX_BATCH     256
#define MAX_LATENCIES (1u << 20)

struct bench {
    struct event_base *base;
    struct store *s;
    unsigned batch;
    unsigned depth;
    unsigned inflight;
    uint64_t next_index;
    uint64_t first_seq;
    uint64_t *submit_us; /* by seq - first_seq */
    uint64_t *lat_us;
    size_t n_lat;
    uint64_t completions;
    uint64_t deadline_us;
    bool failed;
    struct store_entry e[MAX_BATCH];
    uint8_t data[ENTRY_BYTES];
};

static void bench_submit(struct bench *b)
{
    while (b->inflight < b->depth && pb_now_us() < b->deadline_us &&
           b->n_lat + b->inflight < MAX_LATENCIES) {
        for (unsigned i = 0; i < b->batch; i++) {
            b->e[i] = (struct store_entry){b->next_index + i, 1, 0, b->data, ENTRY_BYTES};
        }
        struct store_batch batch = {.entries = b->e, .n_entries = b->batch};
        uint64_t seq;
        if (store_submit(b->s, &batch, &seq) < 0) {
            b->failed = true;
            return;
        }
        if (b->first_seq == 0)
            b->first_seq = seq;
        b->submit_us[seq - b->first_seq] = pb_now_us();
        b->next_index += b->batch;
        b->inflight++;
    }
}

static void bench_on_complete(void *arg, const struct store_completion *c)
{
    struct bench *b = arg;
    uint64_t now = pb_now_us();
    if (c->status != 0) {
        fprintf(stderr, "store-bench: batch failed: %s\n", strerror(-c->status));
        b->failed = true;
        return;
    }
    b->completions++;
    for (uint64_t seq = c->first_seq; seq <= c->last_seq; seq++) {
        if (seq < b->first_seq)
            continue; /* the hard-state batch */
        b->lat_us[b->n_lat++] = now - b->submit_us[seq - b->first_seq];
        b->inflight--;
    }
    bench_submit(b);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int run(const char *parent, const char *mode, unsigned batch, unsigned depth, double seconds)
{
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/store-bench.XXXXXX", parent);
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "store-bench: mkdtemp %s: %s\n", dir, strerror(errno));
        return -1;
    }
    static struct bench b;
    memset(&b, 0, sizeof(b));
    memset(b.data, 'x', sizeof(b.data));
    b.batch = batch;
    b.depth = depth;
    b.next_index = 1;
    b.submit_us = pb_xcalloc(MAX_LATENCIES, sizeof(uint64_t));
    b.lat_us = pb_xcalloc(MAX_LATENCIES, sizeof(uint64_t));
    b.base = event_base_new();
    struct store_options o = {
            .dir = dir, .base = b.base, .on_complete = bench_on_complete, .arg = &b};
    struct pb_error err;
    int rc = store_open(&b.s, &o, &err);
    if (rc < 0) {
        fprintf(stderr, "store-bench: %s\n", err.msg);
        goto out;
    }
    /* Term 1 first, in its own batch (not measured). */
    struct store_hard_state hs = {1, 0};
    struct store_batch first = {.hard_state = &hs};
    uint64_t seq;
    store_submit(b.s, &first, &seq);
    b.first_seq = seq + 1;

    uint64_t start = pb_now_us();
    b.deadline_us = start + (uint64_t)(seconds * 1e6);
    bench_submit(&b);
    while (!b.failed && (b.inflight > 0 || pb_now_us() < b.deadline_us))
        event_base_loop(b.base, EVLOOP_ONCE);
    uint64_t elapsed = pb_now_us() - start;
    if (b.failed || b.n_lat == 0) {
        rc = -1;
        goto out;
    }
    qsort(b.lat_us, b.n_lat, sizeof(uint64_t), cmp_u64);
    double secs = (double)elapsed / 1e6;
    double bps = (double)b.n_lat / secs;
    printf("%-9s %5u %5u %10.0f %11.0f %7.2f %11" PRIu64 " %8.2f %8.2f\n", mode, batch, depth, bps,
           bps * batch, bps * batch * ENTRY_BYTES / 1e6, b.completions,
           (double)b.lat_us[b.n_lat / 2] / 1000.0,
           (double)b.lat_us[(size_t)((double)b.n_lat * 0.99)] / 1000.0);
    fflush(stdout);
    rc = 0;
out:
    store_close(b.s);
    event_base_free(b.base);
    free(b.submit_us);
    free(b.lat_us);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}

int main(int argc, char **argv)
{
    double seconds = 1.5;
    int opt;
    while ((opt = getopt(argc, argv, "t:")) != -1) {
        if (opt == 't') {
            seconds = atof(optarg);
        } else {
            fprintf(stderr, "usage: store-bench [-t seconds] [dir]\n");
            return 2;
        }
    }
    const char *dir = optind < argc ? argv[optind] : ".";
    log_set_level(LOG_LEVEL_WARNING);
    printf("raft.db group commit, %d-byte entries, synchronous=FULL, %.1f s per run, in %s\n",
           ENTRY_BYTES, seconds, dir);
    printf("%-9s %5s %5s %10s %11s %7s %11s %8s %8s\n", "mode", "batch", "depth", "batches/s",
           "entries/s", "MB/s", "completions", "p50_ms", "p99_ms");
    static const unsigned sizes[] = {1, 16, 64, 256};
    int failed = 0;
    for (size_t i = 0; i < PB_ARRAY_SIZE(sizes); i++) {
        failed |= run(dir, "serial", sizes[i], 1, seconds) < 0;
        failed |= run(dir, "pipelined", sizes[i], 64, seconds) < 0;
    }
    return failed ? 1 : 0;
}
