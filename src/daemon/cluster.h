/*
 * cluster.h: the Raft driver of pickboxd. Wires the pure Raft core
 * (src/raft) to raft.db (src/store), the peer transport (src/net) and the
 * state machine (sm.c) on the daemon's event loop, and serves the cluster's
 * control requests (probe, join, leave, remove, transfer).
 *
 * The loop (raft.h): a tick timer (heartbeat_ms) feeds raft_tick(); every
 * event that fed the core activates one "process" event, so work is batched
 * per loop iteration. Processing takes raft_ready(), sends rd.msgs, submits
 * ONE store batch (the storage thread fsyncs off the loop); its completion
 * sends rd.msgs_after_persist, applies rd.committed and calls raft_advance().
 * While the core is frozen, peer messages, ticks and requests queue (bounded)
 * and go in after the advance: everything that arrived during one fsync is
 * persisted by the next batch (group commit). Committed entries already
 * durable in the local raft.db are applied before the next batch is written,
 * so a reply never waits for the fsync of later proposals.
 *
 * Storage errors (a failed batch, SQLITE_FULL, I/O): raft_persist_failed()
 * (the core steps down and acknowledges nothing), `status` shows
 * storage_error, the core is not driven, and an empty probe batch is retried
 * with store_retry_backoff_ms(); once it succeeds the view of raft.db is
 * reloaded and the core resumes (entries a failed batch did write are not
 * written twice).
 *
 * Snapshots: every CLUSTER_SNAPSHOT_EVERY applied entries the state machine
 * writes one (state.db), the core is told (raft_snapshot_taken) and raft.db
 * records it and compacts behind it. A lagging peer gets the state machine's
 * snapshot in chunks; a received one is staged in memory, written to raft.db
 * whole in the batch that installs it, then installed into state.db (a crash
 * in between is repaired at startup from raft.db's copy).
 *
 * Identity: the Raft id is raft.db's random node id; the member context in
 * the Raft configuration carries name and advertise address (versioned).
 * Life cycle and methods follow the shared cluster spec.
 *
 * Threading: event loop thread only.
 */
#ifndef PICKBOX_DAEMON_CLUSTER_H
#define PICKBOX_DAEMON_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "daemon/push.h"
#include "lib/error.h"
#include "lib/hist.h"

struct cluster;
struct ctl_request;
struct event_base;
struct pb_config;
struct sm;

/* Net frame types (owner range of src/net). */
#define CLUSTER_MSG_RAFT       16 /* a Raft message (raft codec) */
#define CLUSTER_MSG_ADMIN      17 /* join / remove / transfer request to the leader */
#define CLUSTER_MSG_ADMIN_RESP 18
#define CLUSTER_MSG_APPLIED    21 /* a node's applied and commit index, to every peer */
#define CLUSTER_MSG_CHUNK_REQ  19 /* chunk bytes wanted (fetch.h), bulk class */
#define CLUSTER_MSG_CHUNK_RESP 20
#define CLUSTER_MSG_PUSH       22 /* a big file's chunk bytes, pushed (push.h), bulk class */
#define CLUSTER_MSG_PUSH_ACK   23 /* their acknowledgement, control class */

/* Take a snapshot every this many applied entries (env
 * PICKBOX_TEST_SNAPSHOT_EVERY overrides it, for tests). */
#define CLUSTER_SNAPSHOT_EVERY 10000
/* ... or once this many bytes of entries were applied since the last one
 * (the core keeps the log since the last snapshot in memory). */
#define CLUSTER_SNAPSHOT_BYTES (64u << 20)

struct cluster_options {
    const struct pb_config *cfg;
    struct event_base *base;
    int peer_fd; /* listening TCP socket; owned by the cluster from now on (even on error) */
    void (*on_change)(void *arg); /* role, leader, term or membership changed */
    void (*on_exit)(void *arg);   /* this node left the cluster: stop the daemon */
    void *arg;
};

/* Member context (the opaque bytes in a Raft configuration): name and
 * advertise address. encode allocates *out (free()); decode validates
 * untrusted bytes (-EINVAL) and fills name/addr (NUL-terminated). */
#define CLUSTER_ADDR_MAX 128
int cluster_ctx_encode(const char *name, const char *addr, uint8_t **out, size_t *len);
int cluster_ctx_decode(const uint8_t *p, size_t len, char name[65], char addr[CLUSTER_ADDR_MAX]);

/* Opens raft.db and state.db under cfg->state_dir, loads the secret
 * (generating one on bootstrap), then restarts from persisted state,
 * bootstraps a one-voter cluster, or starts joining through cfg->join. */
int cluster_open(struct cluster **out, const struct cluster_options *opts, struct pb_error *err);

/* Answers pending requests with UNAVAILABLE, persists what was submitted
 * and frees everything. NULL is a no-op. */
void cluster_close(struct cluster *c);

/* A short view for node.h / sd_notify. role is "leader", "follower",
 * "candidate" or "learner". leader is a name or NULL. */
struct cluster_view {
    const char *role;
    uint64_t term;
    const char *leader; /* valid until the next call on c */
    uint64_t commit;
    uint64_t applied;
};
void cluster_view(struct cluster *c, struct cluster_view *v);

/* The applied index member id last reported (this node's own for
 * c's id): false when it has reported nothing yet. Reports arrive within a
 * heartbeat of a change (cluster_applied.c). */
bool cluster_member_applied(struct cluster *c, uint64_t id, uint64_t *applied);
/* The highest commit index this node knows: its own, or one a member
 * reported (a follower's own commit index may lag the leader's by a
 * heartbeat). Everything up to it is committed. */
uint64_t cluster_commit_known(struct cluster *c);

/* The state machine (valid until the next cluster call that may reset it:
 * join). */
struct sm *cluster_sm(struct cluster *c);
/* This node's Raft id. */
uint64_t cluster_id_self(const struct cluster *c);
/* Proposes an application entry (data copied) as raft_propose(): on a
 * follower it is forwarded and may be lost (retry with the same
 * client_id/seq). While the core is frozen (a persist in progress) the
 * entry is queued, in order, up to CLUSTER_PROPQ_MAX_BYTES, and fed to the
 * core before its next ready: 0 with *index 0 (not known yet); if the core
 * then refuses it, it and the rest of the queue are dropped and
 * cluster_props_dropped() grows (propose them again). -EBUSY when the queue
 * is full, joining or in storage error (try again soon), -EAGAIN no leader,
 * -ENOBUFS the leader refuses. */
int cluster_propose(struct cluster *c, uint64_t client_id, uint64_t seq, const void *data,
                    size_t len, uint64_t *index);
/* How many queued proposals the core refused so far (see cluster_propose). */
uint64_t cluster_props_dropped(const struct cluster *c);

/* The pusher of big files' chunk bytes (push.h; borrowed), or NULL. */
struct push *cluster_push(struct cluster *c);
/* Whether a big file's chunks may be pushed beside the log (D13): only while
 * every other member of the configuration (voters and learners) last
 * connected at protocol version >= 2 (so it decodes REFS), and this node is
 * a member. Then 0: out gets the members whose link is up (at most max),
 * *n how many, *voters the voters of the configuration (this node
 * included), *self_voter whether this node is one. Otherwise -EAGAIN (use
 * CHUNKS entries). $PICKBOX_TEST_PUSH=0 disables pushing on this node. */
int cluster_push_targets(struct cluster *c, struct push_peer *out, size_t max, size_t *n,
                         size_t *voters, bool *self_voter);

/* Sets the cluster fields of the `status` result in obj, and "members". */
void cluster_status_fill(struct cluster *c, json_t *obj);
/* {"members": [...]} (new reference). */
json_t *cluster_members_json(struct cluster *c);

/* What `metrics` shows of the cluster (metrics.h). Peers are the other
 * members of the configuration that the transport knows. */
#define CLUSTER_METRICS_PEERS 32
struct cluster_peer_metrics {
    char name[65];
    bool connected;
    uint64_t bytes_sent, bytes_recv; /* frame bytes on the link since startup */
};
struct cluster_metrics {
    uint64_t term, commit, applied, last_index, snapshot_index;
    bool leader, storage_error;
    uint64_t leader_changes; /* times a new leader was seen (this node included) */
    uint64_t apply_lag;      /* commit - applied */
    double apply_lag_s;      /* age of the oldest committed entry not applied yet, 0: none */
    uint64_t batches, batch_entries; /* raft.db batches submitted, entries in them */
    struct pb_hist fsync;            /* raft.db COMMIT times (store_health) */
    size_t n_peers;
    struct cluster_peer_metrics peers[CLUSTER_METRICS_PEERS];
    struct push_stats push; /* chunk bytes pushed beside the log (push.h) */
};
/* Reads only: calling it changes nothing (a scrape cannot alter what the
 * next one sees). */
void cluster_metrics_get(const struct cluster *c, struct cluster_metrics *m);

/* Control requests: each answers req exactly once, now or later. */
void cluster_probe(struct cluster *c, struct ctl_request *req, size_t size, unsigned timeout_ms);
void cluster_join(struct cluster *c, struct ctl_request *req, const char *addr,
                  unsigned timeout_ms);
void cluster_leave(struct cluster *c, struct ctl_request *req, unsigned timeout_ms);
void cluster_remove(struct cluster *c, struct ctl_request *req, const char *name,
                    unsigned timeout_ms);
void cluster_transfer(struct cluster *c, struct ctl_request *req, const char *name,
                      unsigned timeout_ms);
/* Test hook: cut or heal the link to member name. */
void cluster_partition(struct cluster *c, struct ctl_request *req, const char *name, bool on);

#endif
