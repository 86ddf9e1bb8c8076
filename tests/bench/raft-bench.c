/*
 * raft-bench.c: micro-benchmark of the Raft core alone.
 *
 * Three cores in one process, a perfect in-memory network (each ready's
 * messages are stepped straight into their targets) and an instant disk.
 * Reports proposals committed (and applied on the leader) per second, and
 * heap allocations per proposal, counted by wrapping malloc/calloc/realloc
 * at link time (-Wl,--wrap=...): every allocation made by the core (and the
 * harness, which allocates nothing per proposal) goes through the counters.
 *
 *   raft-bench [--proposals N] [--size BYTES]
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"
#include "raft/raft.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t m);
void *__wrap_realloc(void *p, size_t n);

static uint64_t n_allocs;

void *__wrap_malloc(size_t n)
{
    n_allocs++;
    return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t m)
{
    n_allocs++;
    return __real_calloc(n, m);
}

void *__wrap_realloc(void *p, size_t n)
{
    n_allocs++;
    return __real_realloc(p, n);
}

#define NODES 3

struct bench {
    struct raft *r[NODES + 1];
    uint64_t applied[NODES + 1];
    uint64_t applied_ops; /* NORMAL entries applied on the leader */
};

/* Drains every node's output until the cluster is quiet. */
static void pump(struct bench *b, uint64_t leader)
{
    bool any = true;
    while (any) {
        any = false;
        for (uint64_t id = 1; id <= NODES; id++) {
            struct raft_ready rd;
            while (raft_ready(b->r[id], &rd)) {
                any = true;
                for (size_t i = 0; i < rd.n_msgs; i++)
                    raft_step(b->r[rd.msgs[i].to], &rd.msgs[i]);
                for (size_t i = 0; i < rd.n_msgs_after_persist; i++)
                    raft_step(b->r[rd.msgs_after_persist[i].to], &rd.msgs_after_persist[i]);
                for (size_t i = 0; i < rd.n_committed; i++)
                    if (id == leader && rd.committed[i].type == RAFT_ENTRY_NORMAL)
                        b->applied_ops++;
                if (rd.n_committed)
                    b->applied[id] = rd.committed[rd.n_committed - 1].index;
                raft_advance(b->r[id], &rd);
            }
        }
    }
}

static uint64_t setup(struct bench *b)
{
    struct raft_conf conf;
    memset(&conf, 0, sizeof(conf));
    memset(b, 0, sizeof(*b));
    for (unsigned i = 0; i < NODES; i++) {
        conf.members[i].id = i + 1;
        conf.members[i].role = RAFT_VOTER;
    }
    conf.n = NODES;
    for (uint64_t id = 1; id <= NODES; id++) {
        struct raft_config cfg;
        raft_config_init(&cfg, id);
        cfg.seed = id;
        b->r[id] = raft_new(&cfg);
        raft_bootstrap(b->r[id], &conf);
    }
    for (int t = 0; t < 100; t++) {
        for (uint64_t id = 1; id <= NODES; id++) {
            raft_tick(b->r[id]);
            pump(b, 0);
            if (raft_role(b->r[id]) == RAFT_LEADER)
                return id;
        }
    }
    return 0;
}

static void compact(struct bench *b)
{
    for (uint64_t id = 1; id <= NODES; id++)
        raft_snapshot_taken(b->r[id], b->applied[id], 1, NULL, NULL);
}

static int run(uint64_t proposals, unsigned batch, size_t size)
{
    struct bench b;
    uint64_t leader = setup(&b);
    if (leader == 0) {
        fprintf(stderr, "raft-bench: no leader\n");
        return 1;
    }
    uint8_t *payload = calloc(1, size ? size : 1);
    pump(&b, leader);
    b.applied_ops = 0;
    uint64_t allocs0 = n_allocs, t0 = pb_now_us(), proposed = 0, next_compact = 8192;
    while (b.applied_ops < proposals) {
        for (unsigned i = 0; i < batch && proposed < proposals; i++, proposed++)
            if (raft_propose(b.r[leader], 1, proposed + 1, payload, size, NULL) != 0)
                break;
        pump(&b, leader);
        if (b.applied_ops >= next_compact) {
            compact(&b);
            next_compact += 8192;
        }
    }
    uint64_t us = pb_now_us() - t0, allocs = n_allocs - allocs0;
    printf("batch %4u, %5zu-byte entries: %10.0f proposals/s committed, %.2f allocations/proposal"
           " (%" PRIu64 " proposals in %.3f s)\n",
           batch, size, (double)proposals * 1e6 / (double)(us ? us : 1),
           (double)allocs / (double)proposals, proposals, (double)us / 1e6);
    free(payload);
    for (uint64_t id = 1; id <= NODES; id++)
        raft_free(b.r[id]);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t proposals = 1000000, size = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        uint64_t *dst = strcmp(argv[i], "--proposals") == 0 ? &proposals
                        : strcmp(argv[i], "--size") == 0    ? &size
                                                            : NULL;
        if (dst == NULL || pb_parse_u64(argv[i + 1], 1, 1u << 30, dst) != 0) {
            fprintf(stderr, "usage: raft-bench [--proposals N] [--size BYTES]\n");
            return 2;
        }
    }
    printf("raft-bench: 3 in-process cores, perfect network, instant disk\n");
    const unsigned batches[] = {1, 16, 256};
    for (size_t i = 0; i < PB_ARRAY_SIZE(batches); i++) {
        uint64_t n = batches[i] == 1 ? proposals / 4 : proposals;
        if (run(n ? n : 1, batches[i], (size_t)size) != 0)
            return 1;
    }
    return 0;
}
