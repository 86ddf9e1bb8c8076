/*
 * hist.h: a latency histogram with fixed buckets (upper bounds from 100 us to
 * 10 s, Prometheus style), cheap to observe and to copy by value.
 *
 * Not thread-safe: the owner guards it (store's mutex for fsync times, the
 * loop thread for everything else) and hands out copies.
 */
#ifndef PICKBOX_LIB_HIST_H
#define PICKBOX_LIB_HIST_H

#include <stdint.h>

#define PB_HIST_BUCKETS 16

/* Upper bounds of the buckets in microseconds, increasing. */
extern const uint64_t pb_hist_bounds_us[PB_HIST_BUCKETS];

struct pb_hist {
    /* Observations per bucket (not cumulative): bucket[i] counts values
     * <= pb_hist_bounds_us[i] and above the previous bound;
     * bucket[PB_HIST_BUCKETS] counts values above the last bound. */
    uint64_t bucket[PB_HIST_BUCKETS + 1];
    uint64_t count;
    uint64_t sum_us;
};

/* Counts one observation of us microseconds. A zeroed struct is empty. */
void pb_hist_observe_us(struct pb_hist *h, uint64_t us);

#endif
