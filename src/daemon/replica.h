/*
 * replica.h: the tree side of a node. Watches the data directory
 * (src/watch), turns every candidate that differs from what the node last
 * recorded there (state.db's disk records: what we materialized ourselves
 * produces no op) into fsm ops (PUT via fsm_propose_begin/step, MKDIR, SYMLINK,
 * SETATTR, DELETE, RENAME), and proposes them through the cluster with
 * client_id = this node's Raft id and an increasing seq (started from the
 * wall clock in microseconds, above the session table's, so a restart never
 * reuses one). Each proposal is kept aside with the stat it proposed
 * (doc/fsm.md, "Pending local edits"): retried with the same (client_id,
 * seq) until it is applied (a follower forwards; a leader change may lose
 * it), its disk record set (fsm_apply_record_local) right before its entry
 * applies, and built again from the disk if a later seq of ours applied
 * first (then it can never apply).
 *
 * Hard links (nlink > 1), devices, FIFOs and sockets are skipped with a log
 * line. Files present at the first start are proposed by the watcher's
 * initial rescan; at the end of a full rescan, paths the node had recorded
 * that are no longer on disk are proposed as deletions.
 *
 * Threading: event loop thread only.
 */
#ifndef PICKBOX_DAEMON_REPLICA_H
#define PICKBOX_DAEMON_REPLICA_H

#include <jansson.h>

#include "lib/error.h"
#include "lib/hist.h"
#include "watch/watch.h"

struct cluster;
struct event_base;
struct pb_config;
struct replica;

/* Starts watching cfg->data_dir (ignore patterns from cfg->ignore) and
 * proposing through c (borrowed; it must outlive the replica). */
int replica_new(struct replica **out, const struct pb_config *cfg, struct event_base *base,
                struct cluster *c, struct pb_error *err);
void replica_free(struct replica *r);

/* Local changes proposed and not yet applied (a big file still being read
 * counts as one). */
size_t replica_pending(const struct replica *r);

/* Sets "tree": {files, dirs, bytes, pending, conflicts, tree_error,
 * last_error} in obj. */
void replica_status_fill(struct replica *r, json_t *obj);

/* What `metrics` shows of the tree side (metrics.h). */
struct replica_metrics {
    uint64_t files, dirs, bytes;      /* live in the manifest (state.db) */
    uint64_t chunks_missing;          /* referenced chunks whose bytes this node lacks */
    uint64_t chunk_bytes_missing;     /* their bytes */
    uint64_t writing;                 /* big files being written in the background */
    uint64_t conflicts;               /* applied ops that made a conflict copy */
    uint64_t pending;                 /* own ops proposed or queued, not applied yet */
    uint64_t proposed, applied, lost; /* own ops: first proposals, applied, lost */
    uint64_t chunks_sent, chunks_dedup;
    struct pb_hist latency; /* own ops: first proposal -> applied on this node */
    struct watch_stats watch;
};
void replica_metrics_get(struct replica *r, struct replica_metrics *m);

/* Answers req once this node and every reachable member (voters and
 * learners; a member whose link is down is not waited for) have applied
 * the highest commit index known at call time (cluster_commit_known()), as
 * the members report it (cluster_member_applied()), with a leader known;
 * or TIMEOUT after timeout_ms, naming the nodes that had not caught up (or
 * saying no leader is known). Result {"index": n}.
 * Pending replies are answered UNAVAILABLE by replica_free(). */
struct ctl_request;
void replica_sync(struct replica *r, struct ctl_request *req, unsigned timeout_ms);

/* {"conflicts": [{"path", "node", "index"}...]}: live conflict copies in
 * the manifest (new reference). */
json_t *replica_conflicts_json(struct replica *r);

#endif
