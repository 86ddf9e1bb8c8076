/*
 * raft-sim.c: runs the deterministic Raft simulator over a range of seeds.
 *
 *   raft-sim --seed-start S --seeds N --nodes K [--steps M] [--trace]
 *            [--no-membership] [--liveness T] [--ci]
 *
 * Exits 0 when every run kept every invariant and settled after healing;
 * otherwise prints, for each failing seed, the violation and the exact
 * command that replays it with a step-by-step trace, and exits 1.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"
#include "sim/sim.h"

/* --ci: ticks per seed in `make check`; shorter under ASan (same seeds). */
#if defined(__SANITIZE_ADDRESS__)
#define RAFT_SIM_CI_STEPS 600
#else
#define RAFT_SIM_CI_STEPS 1000
#endif

static void usage(void)
{
    fprintf(stderr, "usage: raft-sim --seed-start S --seeds N --nodes K [--steps M] [--trace]\n"
                    "                [--no-membership] [--liveness T] [--ci]\n");
}

int main(int argc, char **argv)
{
    uint64_t seed_start = 1, seeds = 100, nodes = 3, steps = 1000, liveness = 600;
    bool trace = false, membership = true, ci = false, steps_given = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        uint64_t *dst = NULL, min = 0, max = UINT64_MAX;
        if (strcmp(a, "--trace") == 0) {
            trace = true;
            continue;
        }
        if (strcmp(a, "--ci") == 0) {
            ci = true;
            continue;
        }
        if (strcmp(a, "--no-membership") == 0) {
            membership = false;
            continue;
        }
        if (strcmp(a, "--seed-start") == 0)
            dst = &seed_start;
        else if (strcmp(a, "--seeds") == 0)
            dst = &seeds;
        else if (strcmp(a, "--nodes") == 0) {
            dst = &nodes;
            min = 1;
            max = SIM_MAX_SLOTS;
        } else if (strcmp(a, "--steps") == 0)
            dst = &steps, max = 10000000;
        else if (strcmp(a, "--liveness") == 0)
            dst = &liveness, min = 1, max = 10000000;
        if (dst == NULL || i + 1 >= argc || pb_parse_u64(argv[i + 1], min, max, dst) != 0) {
            usage();
            return 2;
        }
        i++;
    }
    if (ci && !steps_given)
        steps = RAFT_SIM_CI_STEPS;
    unsigned failures = 0;
    struct sim_stats tot;
    memset(&tot, 0, sizeof(tot));
    uint64_t ticks = 0;
    for (uint64_t seed = seed_start; seed < seed_start + seeds; seed++) {
        struct sim_opts o;
        sim_opts_init(&o, seed, (unsigned)nodes);
        o.steps = (unsigned)steps;
        o.trace = trace;
        o.membership = membership && nodes > 1;
        o.liveness_ticks = (unsigned)liveness;
        struct sim *s = sim_new(&o);
        if (sim_run(s) != 0) {
            failures++;
            printf("FAIL seed=%" PRIu64 " nodes=%" PRIu64 ": %s\n", seed, nodes, sim_error(s));
            printf("  replay: %s --seed-start %" PRIu64 " --seeds 1 --nodes %" PRIu64
                   " --steps %" PRIu64 "%s --liveness %" PRIu64 " --trace\n",
                   argv[0], seed, nodes, steps, membership ? "" : " --no-membership", liveness);
            fflush(stdout);
        }
        struct sim_stats st;
        sim_stats(s, &st);
        tot.msgs += st.msgs;
        tot.dropped += st.dropped;
        tot.duplicated += st.duplicated;
        tot.crashes += st.crashes;
        tot.elections += st.elections;
        tot.snapshots_sent += st.snapshots_sent;
        tot.snapshots_installed += st.snapshots_installed;
        tot.conf_changes += st.conf_changes;
        tot.transfers += st.transfers;
        tot.reads += st.reads;
        tot.dups += st.dups;
        tot.compactions += st.compactions;
        tot.acked += st.acked;
        tot.disk_failures += st.disk_failures;
        if (st.settle_ticks > tot.settle_ticks)
            tot.settle_ticks = st.settle_ticks;
        ticks += sim_now(s);
        sim_free(s);
        if (failures >= 10)
            break;
    }
    printf("raft-sim: %" PRIu64 " seeds from %" PRIu64 ", %" PRIu64 " nodes, %" PRIu64
           " ticks: %u failed\n"
           "  msgs=%" PRIu64 " dropped=%" PRIu64 " duplicated=%" PRIu64 " crashes=%" PRIu64
           " elections=%" PRIu64 " snapshots sent=%" PRIu64 " installed=%" PRIu64
           " compactions=%" PRIu64 " conf changes=%" PRIu64 " transfers=%" PRIu64 " reads=%" PRIu64
           " ops acknowledged=%" PRIu64 " retried ops deduplicated=%" PRIu64
           " failed persists=%" PRIu64 "\n  slowest settle after healing: %" PRIu64
           " ticks (bound %" PRIu64 ")\n",
           seeds, seed_start, nodes, ticks, failures, tot.msgs, tot.dropped, tot.duplicated,
           tot.crashes, tot.elections, tot.snapshots_sent, tot.snapshots_installed, tot.compactions,
           tot.conf_changes, tot.transfers, tot.reads, tot.acked, tot.dups, tot.disk_failures,
           tot.settle_ticks, liveness);
    return failures ? 1 : 0;
}
