/*
 * cluster_int.h: what cluster.c (the driver) and cluster_req.c (control and
 * admin requests) share. Not a public header: the daemon uses cluster.h.
 */
#ifndef PICKBOX_DAEMON_CLUSTER_INT_H
#define PICKBOX_DAEMON_CLUSTER_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "daemon/cluster.h"
#include "daemon/fetch.h"
#include "daemon/push.h"
#include "daemon/sm.h"
#include "lib/buf.h"
#include "net/net.h"
#include "raft/raft.h"
#include "store/store.h"

struct event;

/* A member of the configuration in effect, decoded. */
struct cluster_member {
    uint64_t id;
    bool voter;
    uint8_t *ctx;
    size_t ctx_len;
    char name[65];
    char addr[CLUSTER_ADDR_MAX];
};

/* What a peer last reported of its progress (cluster_applied.c). */
struct cluster_applied_report {
    uint64_t id;
    uint64_t applied; /* its applied index */
    uint64_t commit;  /* the highest commit index it reported */
    uint64_t at_ms;   /* pb_now_ms() of the report */
};

enum creq_kind {
    CREQ_PROBE = 1,
    CREQ_REMOVE,   /* also leave (target = self) */
    CREQ_TRANSFER, /* local, or on the leader for a remote origin */
    CREQ_JOIN,     /* on the leader for a remote joiner: add it as a learner */
    CREQ_RESET_JOIN,
};

/* One request in flight: from the control socket (req != NULL) or from a
 * peer's ADMIN message (origin != 0, answered with ADMIN_RESP). */
struct creq {
    struct creq *prev, *next;
    enum creq_kind kind;
    struct ctl_request *req;
    uint64_t origin;    /* peer that asked (remote requests) */
    uint64_t origin_id; /* its request id */
    uint64_t id;        /* our id for ADMIN round trips */
    uint64_t deadline_ms;
    uint64_t retry_at_ms; /* redo the action at this time (0 = not scheduled) */
    bool need_action;
    bool leave;
    /* probe */
    size_t slot;
    uint64_t seq;
    size_t size;
    /* membership */
    uint64_t target;
    uint64_t index;       /* leader: the conf entry to wait for */
    uint64_t from_leader; /* transfer: leader when it began */
    bool forwarded;       /* follower: the leader took it, waiting for its answer */
    uint8_t *ctx;
    size_t ctx_len;
    char name[65];
};

/* Client sessions of this process: client_id = prefix << 32 | (slot + 1);
 * one op in flight per slot, seq = last + 1 (raft.h, Exactly-once). */
struct cluster_slot {
    uint64_t seq;
    struct creq *req; /* NULL = free */
};
#define CLUSTER_MAX_SLOTS 4096

/* A proposal made while the core was frozen, fed to it before the next
 * ready (cluster_on_process). */
struct cluster_prop {
    uint64_t client_id, seq;
    uint8_t *data; /* owned */
    size_t len;
};

struct cluster {
    struct cluster_options opts;
    const struct pb_config *cfg;
    struct event_base *base;
    struct raft *raft;
    struct store *store;
    struct net *net;
    struct sm *sm;
    struct fetch *fetch; /* chunk bytes this node lacks, from peers */
    struct push *push;   /* big files' chunk bytes pushed beside the log */
    bool push_repair;    /* pushed bytes came after their PUT: repair at the tick */
    uint64_t id;
    uint8_t cluster_id[16];
    bool has_cluster_id;
    bool pending_cluster_id; /* to persist with the next batch */
    bool batch_cluster_id;   /* the batch in flight carries it */
    uint8_t *secret;
    size_t secret_len;
    unsigned election_tick;
    unsigned snapshot_every;
    uint64_t bytes_since_snapshot; /* entry bytes applied since the last snapshot */
    bool joining;
    char *join_addr; /* where joining goes through (cfg->join or `pickboxctl join`) */
    int listen_fd;   /* a dup of the peer listener, for a transport started anew */
    uint64_t join_next_ms;
    unsigned join_attempt;
    char join_last_msg[200];
    bool closing;

    struct event *tick_ev, *process_ev;
    bool scheduled;

    /* The ready in flight. */
    bool frozen;
    struct raft_ready rd;
    uint64_t ready_seq; /* store batch of rd, 0 = none */
    bool rd_persisted, rd_installed;
    bool verify_overlap;  /* after a failure: skip entries already on disk */
    uint64_t stored_snap; /* raft.db's snapshot index as last reloaded */
    size_t rx_undo_len;
    struct store_hard_state stored_hs;
    uint64_t stored_last;
    struct buf txbuf, entbuf;
    struct buf rx; /* incoming snapshot, staged */
    uint64_t rx_index, rx_term;

    /* Inputs queued while frozen. */
    struct raft_msg *inq;
    size_t inq_n, inq_cap, inq_bytes;
    unsigned ticks_pending;
    /* Local proposals queued while frozen (cluster_propose), in order. */
    struct cluster_prop *propq;
    size_t propq_n, propq_cap, propq_bytes;
    uint64_t props_dropped; /* queued proposals the core then refused */

    /* Storage errors. */
    bool storage_error;
    int storage_code;
    char storage_msg[256];
    uint64_t storage_since_ms;
    uint64_t storage_retry_at;
    unsigned storage_attempt;
    uint64_t probe_seq;

    /* Membership as last seen. */
    struct cluster_member *members;
    size_t n_members;
    enum raft_role seen_role;
    uint64_t seen_leader, seen_term;
    bool changed;
    uint64_t promote_next_ms;
    /* Peers dropped from the configuration keep their link a little longer,
     * so that the answer to their `leave` reaches them. */
    struct {
        uint64_t id;
        uint64_t at_ms;
    } gone[RAFT_MAX_MEMBERS];
    size_t n_gone;

    /* Requests. */
    struct creq *reqs; /* doubly linked list head */
    size_t n_reqs;
    uint64_t next_req_id;
    uint32_t client_prefix;
    struct cluster_slot *slots;
    size_t n_slots;
    size_t *free_slots;
    size_t n_free;

    /* Applied indexes: ours as last sent, the peers' as reported. */
    uint64_t applied_sent, commit_sent, applied_sent_ms;
    struct cluster_applied_report reports[RAFT_MAX_MEMBERS];
    size_t n_reports;

    /* Counters. */
    uint64_t stats_malformed, stats_inq_dropped, stats_batches, stats_batch_entries;
    uint64_t malformed_warned_ms;
    uint64_t leader_changes;
    /* When commit indexes were first seen (oldest first), for the apply
     * lag in seconds; the last mark absorbs newer ones when full. */
#define CLUSTER_LAG_MARKS 32
    struct {
        uint64_t index, at_ms;
    } lag_marks[CLUSTER_LAG_MARKS];
    size_t n_lag_marks;
    bool exit_pending;
    char name_buf[65];
};

/* cluster.c */
void cluster_schedule(struct cluster *c);
void cluster_sync_conf(struct cluster *c);
void cluster_after_advance(struct cluster *c);
void cluster_storage_failed(struct cluster *c, int code, const char *msg);
void cluster_storage_recovered(struct cluster *c);
const struct cluster_member *cluster_member_by_id(const struct cluster *c, uint64_t id);
const struct cluster_member *cluster_member_by_name(const struct cluster *c, const char *name);
/* Name of member id (or, outside the configuration, the name the peer
 * gave in its handshake); NULL if unknown. Valid until the next call. */
const char *cluster_name_of(struct cluster *c, uint64_t id);
int cluster_reset_for_join(struct cluster *c, const char *addr, struct pb_error *err);
bool cluster_is_lone(struct cluster *c);
void cluster_gone_tick(struct cluster *c, uint64_t now);
void cluster_hex(const uint8_t *p, size_t n, char *out);
uint64_t cluster_random_u64(void);

/* cluster_req.c */
void cluster_req_applied(struct cluster *c, const struct raft_entry *e);
/* A snapshot was installed: waiting probes are proposed again at once. */
void cluster_req_snapshot_installed(struct cluster *c);
void cluster_req_actions(struct cluster *c);
void cluster_req_check(struct cluster *c);
void cluster_req_leader_changed(struct cluster *c);
void cluster_req_tick(struct cluster *c, uint64_t now);
void cluster_req_close_all(struct cluster *c);
void cluster_admin_on_request(struct cluster *c, uint64_t from, const uint8_t *p, size_t len);
void cluster_admin_on_response(struct cluster *c, uint64_t from, const uint8_t *p, size_t len);

/* cluster_applied.c */
/* Sends our applied and commit index to every member when they changed
 * (or every second); called from the tick. */
void cluster_applied_tick(struct cluster *c, uint64_t now);
/* Sends them with the next tick whatever they are (a link came up). */
void cluster_applied_resend(struct cluster *c);
void cluster_applied_on_frame(struct cluster *c, uint64_t from, const uint8_t *p, size_t len);

#endif
