/*
 * node.h: what this node is in its cluster (role, term, leader, indexes,
 * members), held in one place so that `status`, sd_notify STATUS= and,
 * later, the Raft wiring all read and write the same struct.
 *
 * The cluster driver (cluster.h) refreshes role, term, leader and indexes
 * on every role or leader change (consensus_running is then true), and
 * `status` takes the rest (members, ids, storage) from the driver. Before
 * the driver starts, a node reports what is true of a Raft server that has
 * started but not yet run consensus (Raft paper §5.2): role follower, term
 * 0, no known leader, indexes 0, consensus_running false, and as members
 * the configuration it would start with (itself when bootstrapping, none
 * when joining).
 *
 * Threading: event loop thread only.
 */
#ifndef PICKBOX_DAEMON_NODE_H
#define PICKBOX_DAEMON_NODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct pb_config;

enum node_role {
    NODE_ROLE_FOLLOWER,
    NODE_ROLE_CANDIDATE,
    NODE_ROLE_LEADER,
    NODE_ROLE_LEARNER,
};

struct node_member {
    char *id;
    char *address; /* "host:port" the other members dial */
    bool voter;
};

struct node_state {
    char *node_id;
    char *advertise; /* NULL when the peer port comes from systemd and is unknown */
    char *join;      /* address to join through, NULL when bootstrapping */
    char *data_dir;
    char *state_dir;
    enum node_role role;
    uint64_t term;
    char *leader_id; /* NULL: no known leader */
    uint64_t commit_index;
    uint64_t applied_index;
    struct node_member *members;
    size_t n_members;
    bool consensus_running; /* false until src/raft drives this struct */
    uint64_t started_ms;    /* pb_now_ms() at startup, for uptime */
};

/* Fills st for a node that has just started (see the rules above); strings
 * are copied from cfg. now_ms is the monotonic start time. */
void node_state_init(struct node_state *st, const struct pb_config *cfg, uint64_t now_ms);

/* Frees what st owns and zeroes it. NULL is allowed. */
void node_state_free(struct node_state *st);

/* "follower", "candidate", "leader", "learner". */
const char *node_role_name(enum node_role role);

/*
 * The `status` result: node_id, role, term, leader_id (null when unknown),
 * commit_index, applied_index, members [{id, address, voter}], consensus_running,
 * join (null when bootstrapping), advertise, data_dir, state_dir, uptime_s
 * (from now_ms), version. Returns a new reference.
 */
json_t *node_status_json(const struct node_state *st, uint64_t now_ms);

/* One line for sd_notify STATUS= ("follower, term 0, no leader ..."), into
 * buf of size len (always terminated). */
void node_status_line(const struct node_state *st, char *buf, size_t len);

#endif
