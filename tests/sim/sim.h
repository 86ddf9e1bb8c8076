/*
 * sim.h: deterministic in-process Raft cluster simulator (test fixture).
 *
 * Up to SIM_MAX_SLOTS nodes run the pure core from src/raft in one process.
 * A seeded scheduler owns time (one sim_tick() = one raft tick on every live
 * node), the network (per-message delay, drop, duplication, reordering,
 * symmetric and one-way partitions), each node's "disk" (which only receives
 * what a ready batch said to persist, once the simulated persist completes)
 * and crash/restart (a crash loses everything not yet on disk). A toy state
 * machine with client sessions applies committed entries.
 *
 * After every tick the simulator checks the Raft invariants: election safety,
 * log matching, leader completeness, state machine safety, no double vote,
 * no acknowledgement or vote sent before it was persisted, exactly-once
 * application of client ops, ReadIndex linearizability, and (sim_run) no
 * acknowledged op lost plus liveness once the network heals.
 *
 * Used by tests/sim/raft-sim.c (randomized runs) and tests/check_raft.c
 * (scripted scenarios with chaos off).
 */
#ifndef PICKBOX_TESTS_SIM_H
#define PICKBOX_TESTS_SIM_H

#include <stdbool.h>
#include <stdint.h>

#include "raft/raft.h"

#define SIM_MAX_SLOTS   7
#define SIM_MAX_CLIENTS 4

struct sim_opts {
    uint64_t seed;
    unsigned nodes;          /* initial voters, 1..SIM_MAX_SLOTS */
    unsigned steps;          /* chaos ticks for sim_run() */
    bool trace;              /* print every event to stdout */
    bool chaos;              /* random faults and workload in sim_tick() */
    bool membership;         /* chaos includes membership changes */
    unsigned liveness_ticks; /* bound after healing (sim_run) */
};

struct sim;

void sim_opts_init(struct sim_opts *o, uint64_t seed, unsigned nodes);
struct sim *sim_new(const struct sim_opts *o);
void sim_free(struct sim *s);

/* Chaos phase, then heal and check liveness. 0 = pass; else see sim_error(). */
int sim_run(struct sim *s);
/* One tick: chaos (if on), deliveries, ticks, readies, invariant checks.
 * Returns 0 or -1 once an invariant failed. */
int sim_tick(struct sim *s);
/* Runs up to max ticks until a leader exists that committed in its term. */
int sim_wait_leader(struct sim *s, unsigned max, unsigned *slot);
const char *sim_error(const struct sim *s);
bool sim_failed(const struct sim *s);

/* Scripted control (for tests). Slots are 0-based; founders have id slot + 1. */
struct raft *sim_raft(struct sim *s, unsigned slot); /* NULL if down */
uint64_t sim_id(const struct sim *s, unsigned slot);
void sim_crash(struct sim *s, unsigned slot);
void sim_restart(struct sim *s, unsigned slot);
void sim_block(struct sim *s, unsigned from, unsigned to, bool blocked);
void sim_isolate(struct sim *s, unsigned slot, bool isolated);
void sim_heal(struct sim *s);
void sim_set_drop(struct sim *s, unsigned per_mille);
/* Proposes a client op through slot; returns the raft_propose() result. */
int sim_propose(struct sim *s, unsigned slot, unsigned client);
/* Highest seq of client acknowledged (applied somewhere). */
uint64_t sim_acked(const struct sim *s, unsigned client);
/* Entries applied by slot's state machine (effective ops, dups skipped). */
uint64_t sim_applied_ops(const struct sim *s, unsigned slot);
uint64_t sim_dups_skipped(const struct sim *s);
uint64_t sim_now(const struct sim *s);
/* Adds a brand new empty node as a learner through the leader in slot;
 * returns the new slot or -errno. */
int sim_add_learner(struct sim *s, unsigned leader_slot);
/* Counters for reports. */
struct sim_stats {
    uint64_t msgs, dropped, duplicated, crashes, elections, snapshots_sent, snapshots_installed;
    uint64_t conf_changes, transfers, reads, dups, compactions, acked;
    uint64_t settle_ticks; /* ticks from healing to settled (sim_run) */
    uint64_t disk_failures;
};
void sim_stats(const struct sim *s, struct sim_stats *st);

#endif
