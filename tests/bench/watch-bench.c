/*
 * watch-bench.c: throughput and latency of src/watch on this machine.
 *
 *   tests/bench/watch-bench [files [rounds [debounce_ms]]]
 *
 * 1. Creates `files` files (default 10000) in a fresh directory of a watched
 *    temp tree as fast as it can, then runs the loop until every one was
 *    reported; prints inotify events/s and candidates/s (from the first
 *    create to the last candidate), and the watcher's memory model size.
 * 2. `rounds` times (default 50): rewrites one file and measures the time
 *    from its close(2) to its UPSERT_FILE candidate (median, p90, max). With
 *    the default settle time of 5 ms after a close the floor is that.
 * 3. A full rescan of the tree: its total time and the longest single loop
 *    turn meanwhile (rescans run in slices, so that is what the rest of the
 *    daemon waits at most).
 */
#include "config.h"

#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lib/util.h"
#include "watch/watch.h"

static uint64_t n_upserts, n_end;
static uint64_t loop_us;         /* time spent inside the event loop (the watcher's work) */
static uint64_t max_turn_us;     /* the longest single loop turn (wall clock) */
static uint64_t max_turn_cpu_us; /* ... in CPU time (a shared machine preempts) */

static uint64_t cpu_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void loop_once(struct event_base *base, int flags)
{
    uint64_t t = pb_now_us(), c = cpu_us();
    event_base_loop(base, flags);
    uint64_t d = pb_now_us() - t, dc = cpu_us() - c;
    loop_us += d;
    if (d > max_turn_us)
        max_turn_us = d;
    if (dc > max_turn_cpu_us)
        max_turn_cpu_us = dc;
}
static uint64_t last_us;

static void on_change(const struct watch_change *c, void *arg)
{
    (void)arg;
    if (c->kind == WATCH_UPSERT_FILE) {
        n_upserts++;
        last_us = pb_now_us();
    } else if (c->kind == WATCH_RESCAN_END) {
        n_end++;
    }
}

static void run_until(struct event_base *base, uint64_t *counter, uint64_t want,
                      uint64_t timeout_ms)
{
    uint64_t end = pb_now_ms() + timeout_ms;
    while (*counter < want && pb_now_ms() < end)
        loop_once(base, EVLOOP_ONCE);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    unsigned files = argc > 1 ? (unsigned)atoi(argv[1]) : 10000;
    unsigned rounds = argc > 2 ? (unsigned)atoi(argv[2]) : 50;
    unsigned debounce = argc > 3 ? (unsigned)atoi(argv[3]) : 30;
    char top[] = "/tmp/watch-bench.XXXXXX";
    if (!mkdtemp(top)) {
        perror("mkdtemp");
        return 1;
    }
    struct event_base *base = event_base_new();
    struct watch_options o;
    watch_options_init(&o);
    o.debounce_ms = debounce;
    o.rescan_interval_ms = 0;
    struct pb_error err;
    struct watch *w = watch_new(base, top, &o, on_change, NULL, &err);
    if (!w) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    /* A timer keeps EVLOOP_ONCE from blocking forever. */
    struct event *tick = event_new(base, -1, EV_PERSIST, on_tick, NULL);
    struct timeval tv = {0, 2000};
    event_add(tick, &tv);
    run_until(base, &n_end, 1, 5000);

    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/many", top);
    mkdir(path, 0755);
    run_until(base, &n_upserts, 0, 100);
    struct watch_stats s0, s1;
    watch_get_stats(w, &s0);
    uint64_t t0 = pb_now_us();
    n_upserts = 0;
    loop_us = 0;
    for (unsigned i = 0; i < files; i++) {
        snprintf(path, sizeof(path), "%s/many/f%06u", top, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1) {
            perror(path);
            return 1;
        }
        close(fd);
        /* Let the loop read now and then, as it would in the daemon. */
        if (i % 64 == 0)
            loop_once(base, EVLOOP_NONBLOCK);
    }
    uint64_t t_created = pb_now_us();
    run_until(base, &n_upserts, files, 60000);
    watch_get_stats(w, &s1);
    double secs = (double)(last_us - t0) / 1e6;
    printf("create %u files: %.3f s to create, %.3f s until the last candidate\n", files,
           (double)(t_created - t0) / 1e6, secs);
    printf("  candidates %" PRIu64 " (%.0f/s), inotify events %" PRIu64
           " (%.0f/s), overflows %" PRIu64 "\n",
           n_upserts, (double)n_upserts / secs, s1.events - s0.events,
           (double)(s1.events - s0.events) / secs, s1.overflows - s0.overflows);
    printf("  model: %" PRIu64 " nodes, %" PRIu64 " watches\n", s1.nodes, s1.watches);
    /* The loop also waits for debounce timers; this is an upper bound of
     * the watcher's own time. */
    printf("  time inside the event loop: %.3f s -> >= %.0f events/s, >= %.0f candidates/s\n",
           (double)loop_us / 1e6, (double)(s1.events - s0.events) / ((double)loop_us / 1e6),
           (double)n_upserts / ((double)loop_us / 1e6));

    /* A full rescan runs in slices: how long does the loop wait at most? */
    uint64_t ends = n_end;
    uint64_t tr = pb_now_us();
    max_turn_us = max_turn_cpu_us = 0;
    uint64_t up0 = n_upserts;
    watch_rescan(w, "");
    run_until(base, &n_end, ends + 1, 60000);
    printf("full rescan of %" PRIu64 " paths (%" PRIu64 " files reported): %.3f s, longest loop "
           "turn %.1f ms (%.1f ms CPU)\n",
           s1.nodes, n_upserts - up0, (double)(pb_now_us() - tr) / 1e6,
           (double)max_turn_us / 1000.0, (double)max_turn_cpu_us / 1000.0);

    /* A directory of `files` files in 100 subdirectories moved into the
     * tree: it is walked (watched, listed) inside one event callback. */
    char outside[64], moved[64];
    snprintf(outside, sizeof(outside), "%s.out", top);
    mkdir(outside, 0755);
    for (unsigned i = 0; i < files; i++) {
        snprintf(path, sizeof(path), "%s/s%02u", outside, i % 100);
        mkdir(path, 0755);
        snprintf(path, sizeof(path), "%s/s%02u/f%06u", outside, i % 100, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) {
            perror(path);
            return 1;
        }
        close(fd);
    }
    snprintf(moved, sizeof(moved), "%s/moved", top);
    uint64_t before_mv = n_upserts;
    max_turn_us = max_turn_cpu_us = 0;
    uint64_t tm = pb_now_us();
    if (rename(outside, moved) < 0) {
        perror(moved);
        return 1;
    }
    run_until(base, &n_upserts, before_mv + files, 60000);
    printf("move in a directory of %u files: %.3f s until the last candidate, longest loop turn "
           "%.1f ms (%.1f ms CPU)\n",
           files, (double)(last_us - tm) / 1e6, (double)max_turn_us / 1000.0,
           (double)max_turn_cpu_us / 1000.0);

    uint64_t *lat = calloc(rounds ? rounds : 1, sizeof(*lat));
    snprintf(path, sizeof(path), "%s/lat", top);
    for (unsigned r = 0; r < rounds; r++) {
        uint64_t before = n_upserts;
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "latency", 1 + r % 7) < 0) {
            perror(path);
            return 1;
        }
        close(fd);
        uint64_t tw = pb_now_us();
        run_until(base, &n_upserts, before + 1, 5000);
        lat[r] = last_us - tw;
        /* Let the next write be a new burst. */
        uint64_t pause = pb_now_ms() + 2 * debounce;
        while (pb_now_ms() < pause)
            event_base_loop(base, EVLOOP_ONCE);
    }
    if (rounds) {
        qsort(lat, rounds, sizeof(*lat), cmp_u64);
        printf("write->candidate latency over %u writes (debounce %u ms): median %.1f ms, "
               "p90 %.1f ms, max %.1f ms\n",
               rounds, debounce, lat[rounds / 2] / 1000.0, lat[rounds * 9 / 10] / 1000.0,
               lat[rounds - 1] / 1000.0);
    }
    free(lat);
    event_free(tick);
    watch_free(w);
    event_base_free(base);
    char cmd[PATH_MAX];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
    return system(cmd) == 0 ? 0 : 1;
}
