/*
 * fsm-chunk-bench.c: throughput of content-defined chunking + SHA-256 (what a
 * node pays to hash a changed file), with the two parts measured apart.
 *
 *   tests/bench/fsm-chunk-bench [MiB]     (default 256)
 *
 * The input is pseudo-random (no dedup, realistic cut points), generated into
 * a 64 MiB buffer that is fed repeatedly, so the figure is CPU, not disk.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fsm/chunker.h"
#include "lib/util.h"

#define BENCH_BUF (64u << 20)

struct count {
    uint64_t chunks;
    uint64_t bytes;
};

static int count_chunk(void *arg, const struct fsm_chunk *c)
{
    struct count *k = arg;
    k->chunks++;
    k->bytes += c->len;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t mib = 256;
    if (argc > 1 && pb_parse_u64(argv[1], 1, 1u << 20, &mib) < 0) {
        fprintf(stderr, "usage: %s [MiB]\n", argv[0]);
        return 2;
    }
    uint8_t *buf = pb_xmalloc(BENCH_BUF);
    uint64_t x = 0x2545f4914f6cdd1dULL;
    for (size_t i = 0; i < BENCH_BUF; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    uint64_t total = mib << 20;

    /* Each measurement runs 3 times, the best counts: the machine is shared. */
    struct count k = {0, 0};
    uint64_t best = UINT64_MAX, hbest = UINT64_MAX;
    for (int round = 0; round < 3; round++) {
        struct fsm_chunker c;
        k.chunks = k.bytes = 0;
        fsm_chunker_init(&c, count_chunk, &k);
        uint64_t t0 = pb_now_us();
        for (uint64_t done = 0; done < total;) {
            size_t n = (size_t)PB_MIN((uint64_t)BENCH_BUF, total - done);
            if (fsm_chunker_feed(&c, buf, n) != 0)
                return 1;
            done += n;
        }
        if (fsm_chunker_finish(&c) != 0)
            return 1;
        best = PB_MIN(best, pb_now_us() - t0);
        fsm_chunker_free(&c);

        /* SHA-256 alone over the same bytes, in average-size pieces */
        uint8_t id[FSM_CHUNK_ID_LEN];
        uint64_t t2 = pb_now_us();
        for (uint64_t done = 0; done < total; done += FSM_CHUNK_AVG)
            if (fsm_sha256(buf + done % BENCH_BUF, FSM_CHUNK_AVG, id) < 0)
                return 1;
        hbest = PB_MIN(hbest, pb_now_us() - t2);
    }

    double secs = (double)best / 1e6, hsecs = (double)hbest / 1e6;
    double mb = (double)total / 1e6;
    printf("input            %llu MiB pseudo-random\n", (unsigned long long)mib);
    printf("chunks           %llu (average %.1f KiB; min/avg/max %u/%u/%u KiB)\n",
           (unsigned long long)k.chunks, (double)k.bytes / (double)k.chunks / 1024.0,
           FSM_CHUNK_MIN / 1024, FSM_CHUNK_AVG / 1024, FSM_CHUNK_MAX / 1024);
    printf("chunk + SHA-256  %.0f MB/s (%.2f s)\n", mb / secs, secs);
    printf("SHA-256 alone    %.0f MB/s\n", mb / hsecs);
    if (secs > hsecs) /* noise on a shared machine can invert the two */
        printf("chunking alone   ~%.0f MB/s (derived: total minus hashing)\n", mb / (secs - hsecs));
    free(buf);
    return 0;
}
