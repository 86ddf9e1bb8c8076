/*
 * bench.h: `pickboxctl bench`, a closed-loop load generator over the control
 * socket (cluster spec, method "probe").
 *
 * It opens `concurrency` connections to one node's control socket, each with
 * exactly one {"method":"probe","params":{"size":N}} request in flight, for a
 * warm-up and then `duration`; it counts the replies that complete inside the
 * measuring window (commits, and errors by code) and records their latency in
 * a log-linear histogram of fixed size (bounded memory whatever the rate).
 *
 * Threading: none; one poll() loop on the calling thread.
 */
#ifndef PICKBOX_PICKBOXCTL_BENCH_H
#define PICKBOX_PICKBOXCTL_BENCH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "lib/error.h"

struct pbctl_options;
struct pbctl_env;

/*
 * Histogram of microsecond values: exact below 128 us, then 64 sub-buckets per
 * power of two (relative error under 1/64); values above PBCTL_HIST_MAX_US
 * count in the last bucket. min and max are exact.
 */
#define PBCTL_HIST_SUB_BITS 6
#define PBCTL_HIST_MAX_US   ((UINT64_C(1) << 40) - 1)
#define PBCTL_HIST_BUCKETS  2240

struct pbctl_hist {
    uint64_t count;
    uint64_t min_us, max_us;
    uint64_t sum_us;
    uint64_t buckets[PBCTL_HIST_BUCKETS];
};

/* Empties h. */
void pbctl_hist_init(struct pbctl_hist *h);
/* Adds one value. */
void pbctl_hist_record(struct pbctl_hist *h, uint64_t us);
/*
 * The nearest-rank percentile p (0 < p <= 100): the highest value of the
 * bucket holding the ceil(p/100 * count)-th smallest value, capped at max_us
 * (so p = 100 is exactly max_us). 0 when h is empty.
 */
uint64_t pbctl_hist_percentile(const struct pbctl_hist *h, double p);

#define PBCTL_BENCH_DEFAULT_SIZE        256u
#define PBCTL_BENCH_DEFAULT_CONCURRENCY 64u
#define PBCTL_BENCH_DEFAULT_DURATION_MS 10000u
#define PBCTL_BENCH_WARMUP_MS           1000u
#define PBCTL_BENCH_MAX_CODES           16

struct pbctl_bench_config {
    unsigned size;        /* params.size of every probe */
    unsigned concurrency; /* connections, 1..PBCTL_CONCURRENCY_MAX */
    unsigned duration_ms; /* measuring window */
    unsigned warmup_ms;   /* before it; replies then are not counted */
};

/* Error replies count when they arrive inside the window; the connection's
 * own failures (CLOSED: the daemon hung up, BAD_REPLY: not a reply to our
 * probe, CONNECT: a reconnection failed and the connection is given up)
 * count whenever they happen. */
struct pbctl_bench_error_count {
    char code[32]; /* the reply's error code, or CLOSED / BAD_REPLY / CONNECT */
    uint64_t n;
};

struct pbctl_bench_result {
    uint64_t commits;          /* successful probes completed inside the window */
    double elapsed_s;          /* the window actually measured */
    struct pbctl_hist latency; /* of those commits */
    struct pbctl_bench_error_count errors[PBCTL_BENCH_MAX_CODES];
    int n_errors; /* used entries of errors[]; further codes count as "OTHER" */
};

/*
 * Fills cfg from the parsed options (defaults for what was not given).
 * Returns 0, or -EINVAL with err set when the options do not make a run
 * (e.g. a duration below 100 ms).
 */
int pbctl_bench_config_from_options(const struct pbctl_options *opts,
                                    struct pbctl_bench_config *cfg, struct pb_error *err);

/* Counts one error of code (truncated to 31 bytes) in r. */
void pbctl_bench_count_error(struct pbctl_bench_result *r, const char *code);

/*
 * Runs the benchmark against the control socket at path. Returns 0 with r
 * filled (r is initialised here), or a negative errno with err set when not a
 * single connection could be opened or every connection was lost for good.
 */
int pbctl_bench_run(const char *path, const struct pbctl_bench_config *cfg,
                    struct pbctl_bench_result *r, struct pb_error *err);

/* Prints r: a few human lines, or (json) one JSON object on one line:
 * {"size":,"concurrency":,"duration_s":,"commits":,"commits_per_s":,
 *  "latency_ms":{"p50":,"p90":,"p99":,"max":},"errors":{"CODE":n,...}}. */
void pbctl_bench_print(const struct pbctl_bench_config *cfg, const struct pbctl_bench_result *r,
                       bool json, FILE *out);

/* The `bench` command row's run function (pickboxctl.h): exit 0 when at
 * least one probe committed, 1 when none did, 3 when it cannot connect. */
int pbctl_bench_command(const struct pbctl_options *opts, const char *path,
                        const struct pbctl_env *env);

#endif
