/*
 * hist.c: fixed-bucket latency histograms (see hist.h).
 */
#include "config.h"

#include "lib/hist.h"

const uint64_t pb_hist_bounds_us[PB_HIST_BUCKETS] = {
        100,   250,    500,    1000,   2500,    5000,    10000,   25000,
        50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
};

void pb_hist_observe_us(struct pb_hist *h, uint64_t us)
{
    unsigned i = 0;
    while (i < PB_HIST_BUCKETS && us > pb_hist_bounds_us[i])
        i++;
    h->bucket[i]++;
    h->count++;
    h->sum_us += us;
}
