/*
 * metrics.h: the daemon's metrics in the Prometheus text exposition format
 * (version 0.0.4), for `pickboxctl metrics` (the `metrics` control method)
 * and the optional HTTP listener (metrics_http.h).
 *
 * Two layers: a small writer that knows the format (HELP/TYPE lines, label
 * escaping, histograms with cumulative _bucket{le=...}, _sum and _count in
 * seconds) and metrics_render(), which reads the modules' stats accessors
 * (cluster_metrics_get, replica_metrics_get) and writes every pickbox_*
 * family. Names are prefixed pickbox_, counters end in _total, units are
 * seconds and bytes. The families are listed in pickboxd(8), METRICS.
 *
 * Threading: event loop thread only (the accessors are).
 */
#ifndef PICKBOX_DAEMON_METRICS_H
#define PICKBOX_DAEMON_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"
#include "lib/hist.h"

struct daemon;

/* The Content-Type of the exposition (HTTP). */
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

enum metrics_type {
    METRICS_COUNTER,
    METRICS_GAUGE,
    METRICS_HISTOGRAM,
};

struct metrics_label {
    const char *name;  /* a valid label name (not checked at run time beyond assert) */
    const char *value; /* any bytes but NUL; escaped on output */
};

struct metrics_writer {
    struct buf out;
};

/* true if s matches [a-zA-Z_:][a-zA-Z0-9_:]* (a metric name). */
bool metrics_name_valid(const char *s);

void metrics_writer_init(struct metrics_writer *w);
/* Releases what was written (after metrics_writer_finish: nothing). */
void metrics_writer_free(struct metrics_writer *w);

/* Starts a family: "# HELP name help" (help escaped: \ and newline) and
 * "# TYPE name type". Write a family's samples right after it. name must be
 * valid (assert: names are constants of the program). */
void metrics_family(struct metrics_writer *w, const char *name, enum metrics_type type,
                    const char *help);

/* One sample line "name{labels} value". labels may be NULL when n is 0. */
void metrics_sample_u64(struct metrics_writer *w, const char *name,
                        const struct metrics_label *labels, size_t n, uint64_t v);
/* As above for a float: NaN, +Inf and -Inf are spelt as the format wants. */
void metrics_sample_double(struct metrics_writer *w, const char *name,
                           const struct metrics_label *labels, size_t n, double v);

/* The samples of histogram family name (after metrics_family(...,
 * METRICS_HISTOGRAM, ...)): name_bucket with le="<bound in seconds>" per
 * pb_hist bucket, cumulative, then le="+Inf", name_sum (seconds) and
 * name_count; _count always equals the +Inf bucket. */
void metrics_sample_hist(struct metrics_writer *w, const char *name,
                         const struct metrics_label *labels, size_t n, const struct pb_hist *h);

/* Shorthands: a family with one unlabelled sample. */
void metrics_counter(struct metrics_writer *w, const char *name, const char *help, uint64_t v);
void metrics_gauge(struct metrics_writer *w, const char *name, const char *help, double v);

/* The text written so far, NUL-terminated (*len excludes the NUL); the
 * caller frees it; w is empty again. */
char *metrics_writer_finish(struct metrics_writer *w, size_t *len);

/* Every pickbox_* family of the running daemon d. Returns a malloc'ed,
 * NUL-terminated string (*len bytes); never fails (out of memory aborts). */
char *metrics_render(struct daemon *d, size_t *len);

#endif
