/*
 * cluster_req.c: control requests served by the cluster (probe, leave,
 * remove, transfer), the ADMIN messages that carry membership requests to
 * the leader, joining, and automatic promotion of caught-up learners.
 *
 * Every request is a struct creq in one list. Actions that need the Raft core
 * unfrozen (propose, change_conf, transfer) run from cluster_req_actions(),
 * called by the driver right before raft_ready(); completions are noticed by
 * cluster_req_applied() (a probe applied) and cluster_req_check() (after each
 * advance); cluster_req_tick() handles retries and deadlines.
 */
#include <config.h>

#include "daemon/cluster_int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl.h"
#include "daemon/nodeconf.h"
#include "lib/util.h"

#define ADMIN_VERSION     1
#define ADMIN_OP_JOIN     1
#define ADMIN_OP_REMOVE   2
#define ADMIN_OP_TRANSFER 3
#define ADMIN_MAX_HOPS    2

#define PROBE_RETRY_LEADER_MS   3000 /* re-propose a probe not applied by then */
#define PROBE_RETRY_FOLLOWER_MS 1000 /* a forwarded proposal may be lost */
#define ADMIN_RETRY_MS          1000
#define REMOTE_DEADLINE_MS      10000
#define PROMOTE_EVERY_MS        200
#define TRANSFER_RETRY_MS       3000
#define REMOTE_MAX_REQS         (CLUSTER_MAX_SLOTS + 1024) /* then a peer's request is refused */

/* ---- list ---- */

static struct creq *creq_new(struct cluster *c, enum creq_kind kind, struct ctl_request *req,
                             unsigned timeout_ms)
{
    struct creq *q = pb_xcalloc(1, sizeof(*q));
    q->kind = kind;
    q->req = req;
    q->id = ++c->next_req_id;
    q->deadline_ms = pb_now_ms() + timeout_ms;
    q->need_action = true;
    q->slot = SIZE_MAX;
    q->next = c->reqs;
    if (c->reqs)
        c->reqs->prev = q;
    c->reqs = q;
    c->n_reqs++;
    return q;
}

static void creq_free(struct cluster *c, struct creq *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        c->reqs = q->next;
    if (q->next)
        q->next->prev = q->prev;
    c->n_reqs--;
    if (q->slot != SIZE_MAX) {
        c->slots[q->slot].req = NULL;
        c->free_slots[c->n_free++] = q->slot;
    }
    free(q->ctx);
    free(q);
}

/* ---- ADMIN wire format ----
 * request:  u8 version, u8 op, u8 hops, u64 req_id, u64 target, bytes ctx
 * response: u8 version, u8 op, u64 req_id, u32 rc (negative errno), u64 leader,
 *           bytes cluster_id (0 or 16), str message */

static void admin_send_request(struct cluster *c, uint64_t to, uint8_t op, uint8_t hops,
                               uint64_t req_id, uint64_t target, const uint8_t *ctx, size_t len)
{
    struct buf b = BUF_INIT;
    buf_put_u8(&b, ADMIN_VERSION);
    buf_put_u8(&b, op);
    buf_put_u8(&b, hops);
    buf_put_u64(&b, req_id);
    buf_put_u64(&b, target);
    buf_put_bytes(&b, ctx, len);
    int rc = net_send(c->net, to, NET_CLASS_CONTROL, CLUSTER_MSG_ADMIN, b.data, b.len);
    if (rc < 0)
        log_debug("admin request to %016" PRIx64 ": %s", to, strerror(-rc));
    buf_free(&b);
}

static void admin_send_response(struct cluster *c, uint64_t to, uint8_t op, uint64_t req_id, int rc,
                                const char *fmt, ...) PB_PRINTF(6, 7);

static void admin_send_response(struct cluster *c, uint64_t to, uint8_t op, uint64_t req_id, int rc,
                                const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    struct buf b = BUF_INIT;
    buf_put_u8(&b, ADMIN_VERSION);
    buf_put_u8(&b, op);
    buf_put_u64(&b, req_id);
    buf_put_u32(&b, (uint32_t)rc);
    buf_put_u64(&b, raft_leader(c->raft));
    buf_put_bytes(&b, c->cluster_id, c->has_cluster_id ? 16 : 0);
    buf_put_str(&b, msg);
    int sent = net_send(c->net, to, NET_CLASS_CONTROL, CLUSTER_MSG_ADMIN_RESP, b.data, b.len);
    if (sent < 0)
        log_info("cannot answer the admin request of %016" PRIx64 ": %s", to, strerror(-sent));
    buf_free(&b);
}

/* ---- finishing requests ---- */

static uint8_t creq_op(const struct creq *q)
{
    return q->kind == CREQ_JOIN       ? ADMIN_OP_JOIN
           : q->kind == CREQ_TRANSFER ? ADMIN_OP_TRANSFER
                                      : ADMIN_OP_REMOVE;
}

/* Answers a remote request with rc, or a local one with a ctl error, and
 * frees q. */
static void creq_fail(struct cluster *c, struct creq *q, int rc, const char *code, const char *msg)
{
    if (q->req != NULL)
        ctl_reply_error(q->req, code, NULL, "%s", msg);
    else if (q->origin != 0)
        admin_send_response(c, q->origin, creq_op(q), q->origin_id, rc, "%s", msg);
    creq_free(c, q);
}

static void creq_done(struct cluster *c, struct creq *q, json_t *result)
{
    if (q->req != NULL)
        ctl_reply_result(q->req, result);
    else {
        json_decref(result);
        if (q->origin != 0)
            admin_send_response(c, q->origin, creq_op(q), q->origin_id, 0, "ok");
    }
    bool leave = q->leave && q->req != NULL;
    creq_free(c, q);
    if (leave && !c->exit_pending) {
        c->exit_pending = true;
        log_notice("%s left the cluster: stopping", c->cfg->node_id);
        if (c->opts.on_exit)
            c->opts.on_exit(c->opts.arg);
    }
}

/* ---- probe ---- */

void cluster_probe(struct cluster *c, struct ctl_request *req, size_t size, unsigned timeout_ms)
{
    if (c->n_free == 0 && c->n_slots >= CLUSTER_MAX_SLOTS) {
        ctl_reply_error(req, CTL_ERR_BUSY, NULL, "too many requests in flight");
        return;
    }
    if (c->n_free == 0) {
        size_t n = c->n_slots ? c->n_slots * 2 : 64;
        if (n > CLUSTER_MAX_SLOTS)
            n = CLUSTER_MAX_SLOTS;
        c->slots = pb_xreallocarray(c->slots, n, sizeof(*c->slots));
        c->free_slots = pb_xreallocarray(c->free_slots, n, sizeof(*c->free_slots));
        for (size_t i = n; i > c->n_slots; i--) {
            c->slots[i - 1].seq = 0;
            c->slots[i - 1].req = NULL;
            c->free_slots[c->n_free++] = i - 1;
        }
        c->n_slots = n;
    }
    struct creq *q = creq_new(c, CREQ_PROBE, req, timeout_ms);
    q->slot = c->free_slots[--c->n_free];
    c->slots[q->slot].req = q;
    q->seq = ++c->slots[q->slot].seq;
    q->size = size;
    cluster_schedule(c);
}

static uint64_t probe_client_id(const struct cluster *c, size_t slot)
{
    return ((uint64_t)c->client_prefix << 32) | (uint64_t)(slot + 1);
}

void cluster_req_applied(struct cluster *c, const struct raft_entry *e)
{
    if ((e->client_id >> 32) != c->client_prefix)
        return;
    uint64_t slot = (e->client_id & 0xffffffffu) - 1;
    if (slot >= c->n_slots)
        return;
    struct creq *q = c->slots[slot].req;
    if (q == NULL || q->seq != e->seq)
        return;
    creq_done(c, q,
              json_pack("{s:I,s:I}", "index", (json_int_t)e->index, "term", (json_int_t)e->term));
}

void cluster_req_snapshot_installed(struct cluster *c)
{
    /* A probe whose entry is inside the snapshot gets no apply callback, and
     * nothing tells whether it is: probes are no-ops that leave no session
     * (sm.h), and a forwarded proposal may have been lost. So propose every
     * waiting probe again now, with its (client_id, seq), rather than when
     * its retry fires (up to PROBE_RETRY_LEADER_MS later): it is answered by
     * the first copy applied after the snapshot; a duplicate is a counted
     * no-op. */
    for (struct creq *q = c->reqs; q != NULL; q = q->next) {
        if (q->kind == CREQ_PROBE) {
            q->need_action = true;
            cluster_schedule(c);
        }
    }
}

static void probe_action(struct cluster *c, struct creq *q, uint64_t now)
{
    static const uint8_t zeros[65536];
    uint64_t index = 0;
    int rc = raft_propose(c->raft, probe_client_id(c, q->slot), q->seq, q->size ? zeros : NULL,
                          q->size, &index);
    if (rc == 0) {
        q->retry_at_ms = now + (index ? PROBE_RETRY_LEADER_MS : PROBE_RETRY_FOLLOWER_MS);
    } else if (rc == -ENOBUFS) {
        creq_fail(c, q, rc, CTL_ERR_BUSY, "the leader refuses: too many uncommitted bytes");
    } else {
        q->retry_at_ms = now + 1; /* no leader yet, or a transfer: next tick */
    }
}

/* ---- remove / leave / transfer ---- */

static int parse_member(struct cluster *c, struct ctl_request *req, const char *name, uint64_t *id)
{
    const struct cluster_member *m = cluster_member_by_name(c, name);
    if (m == NULL) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "no member named %s", name);
        return -ENOENT;
    }
    *id = m->id;
    return 0;
}

void cluster_leave(struct cluster *c, struct ctl_request *req, unsigned timeout_ms)
{
    if (cluster_member_by_id(c, c->id) == NULL) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "this node is not a member");
        return;
    }
    struct creq *q = creq_new(c, CREQ_REMOVE, req, timeout_ms);
    q->target = c->id;
    q->leave = true;
    snprintf(q->name, sizeof(q->name), "%s", c->cfg->node_id);
    cluster_schedule(c);
}

void cluster_remove(struct cluster *c, struct ctl_request *req, const char *name,
                    unsigned timeout_ms)
{
    uint64_t id;
    if (parse_member(c, req, name, &id) < 0)
        return;
    struct creq *q = creq_new(c, CREQ_REMOVE, req, timeout_ms);
    q->target = id;
    q->leave = id == c->id;
    snprintf(q->name, sizeof(q->name), "%s", name);
    cluster_schedule(c);
}

void cluster_transfer(struct cluster *c, struct ctl_request *req, const char *name,
                      unsigned timeout_ms)
{
    uint64_t id = 0;
    if (name != NULL && parse_member(c, req, name, &id) < 0)
        return;
    if (id != 0 && !cluster_member_by_id(c, id)->voter) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "%s is not a voter", name);
        return;
    }
    struct creq *q = creq_new(c, CREQ_TRANSFER, req, timeout_ms);
    q->target = id;
    q->from_leader = raft_leader(c->raft);
    cluster_schedule(c);
}

/* The most up-to-date voter other than us (leader's view). */
static uint64_t transfer_pick(struct cluster *c)
{
    struct raft_status rs;
    raft_status(c->raft, &rs);
    uint64_t best = 0, best_match = 0;
    for (size_t i = 0; i < rs.n_peers; i++) {
        const struct raft_peer_status *p = &rs.peers[i];
        if (p->id == c->id || p->role != RAFT_VOTER)
            continue;
        if (best == 0 || p->match > best_match) {
            best = p->id;
            best_match = p->match;
        }
    }
    return best;
}

static void remove_action(struct cluster *c, struct creq *q, uint64_t now)
{
    uint64_t leader = raft_leader(c->raft);
    if (raft_role(c->raft) == RAFT_LEADER) {
        if (q->index != 0)
            return; /* waiting for the commit */
        int rc = raft_change_conf(c->raft, RAFT_CONF_REMOVE, q->target, NULL, 0);
        if (rc == 0) {
            struct raft_status rs;
            raft_status(c->raft, &rs);
            q->index = rs.last_index;
            log_notice("removing member %s (conf entry %" PRIu64 ")", q->name, q->index);
        } else if (rc == -ENOENT) {
            creq_fail(c, q, rc, CTL_ERR_INVALID_PARAMS, "no such member");
        } else if (rc == -EINVAL) {
            creq_fail(c, q, rc, CTL_ERR_INVALID_PARAMS,
                      "the last voter cannot be removed (the cluster would have none)");
        } else {
            q->retry_at_ms = now + 1;
        }
        return;
    }
    if (q->origin != 0) {
        creq_fail(c, q, -EAGAIN, CTL_ERR_NOT_LEADER, "not the leader any more");
        return;
    }
    if (leader == RAFT_NONE) {
        q->retry_at_ms = now + 1;
        return;
    }
    admin_send_request(c, leader, ADMIN_OP_REMOVE, 0, q->id, q->target, NULL, 0);
    q->retry_at_ms = now + ADMIN_RETRY_MS;
}

static void transfer_action(struct cluster *c, struct creq *q, uint64_t now)
{
    uint64_t leader = raft_leader(c->raft);
    if (raft_role(c->raft) == RAFT_LEADER) {
        /* (Again after TRANSFER_RETRY_MS: the core aborts a transfer that
         * did not finish within an election timeout.) */
        uint64_t target = q->target ? q->target : transfer_pick(c);
        if (target == 0 || target == c->id) {
            if (target == 0 && q->target == 0 && c->n_members <= 1) {
                creq_fail(c, q, -EINVAL, CTL_ERR_INVALID_PARAMS, "no other voter to transfer to");
                return;
            }
            creq_done(c, q, json_pack("{s:s}", "leader_id", c->cfg->node_id));
            return;
        }
        int rc = raft_transfer_leader(c->raft, target);
        if (rc == 0 || rc == -EBUSY) {
            q->target = target;
            q->forwarded = true;
            q->retry_at_ms = now + TRANSFER_RETRY_MS;
            if (q->origin != 0) {
                creq_done(c, q, NULL); /* the origin watches for the new leader */
                return;
            }
        } else if (rc == -EINVAL) {
            creq_fail(c, q, rc, CTL_ERR_INVALID_PARAMS, "cannot transfer to that node");
        } else {
            q->retry_at_ms = now + 1;
        }
        return;
    }
    if (q->origin != 0) {
        creq_fail(c, q, -EAGAIN, CTL_ERR_NOT_LEADER, "not the leader any more");
        return;
    }
    if (leader == RAFT_NONE) {
        q->retry_at_ms = now + 1;
        return;
    }
    if (q->target == leader) {
        creq_done(c, q, json_pack("{s:s}", "leader_id", cluster_name_of(c, leader)));
        return;
    }
    admin_send_request(c, leader, ADMIN_OP_TRANSFER, 0, q->id, q->target, NULL, 0);
    q->retry_at_ms = now + ADMIN_RETRY_MS;
}

static void join_action(struct cluster *c, struct creq *q, uint64_t now)
{
    (void)now;
    if (raft_role(c->raft) != RAFT_LEADER) {
        creq_fail(c, q, -EAGAIN, CTL_ERR_NOT_LEADER, "not the leader any more");
        return;
    }
    int rc = raft_change_conf(c->raft, RAFT_CONF_ADD_LEARNER, q->target, q->ctx, q->ctx_len);
    if (rc == 0 || rc == -EEXIST) {
        if (rc == 0)
            log_notice("adding %s (%016" PRIx64 ") as a learner", q->name, q->target);
        creq_done(c, q, NULL);
    } else {
        creq_fail(c, q, rc, CTL_ERR_BUSY,
                  rc == -EBUSY    ? "another change is in progress"
                  : rc == -EAGAIN ? "the leader is not ready yet"
                                  : "cannot add the node");
    }
}

/* ---- promotion of caught-up learners (leader) ---- */

static void promote_learners(struct cluster *c, uint64_t now)
{
    if (raft_role(c->raft) != RAFT_LEADER || now < c->promote_next_ms)
        return;
    c->promote_next_ms = now + PROMOTE_EVERY_MS;
    for (size_t i = 0; i < c->n_members; i++) {
        const struct cluster_member *m = &c->members[i];
        if (m->voter)
            continue;
        int rc = raft_change_conf(c->raft, RAFT_CONF_PROMOTE, m->id, NULL, 0);
        if (rc == 0)
            log_notice("promoting %s to voter: it has caught up", m->name);
        return; /* one change at a time; -EAGAIN / -EBUSY: later */
    }
}

static void reset_join_action(struct cluster *c, struct creq *q);

/* ---- the driver's hooks ---- */

void cluster_req_actions(struct cluster *c)
{
    uint64_t now = pb_now_ms();
    struct creq *next;
    for (struct creq *q = c->reqs; q != NULL; q = next) {
        next = q->next;
        if (!q->need_action)
            continue;
        q->need_action = false;
        q->retry_at_ms = 0;
        switch (q->kind) {
        case CREQ_PROBE:
            probe_action(c, q, now);
            break;
        case CREQ_REMOVE:
            remove_action(c, q, now);
            break;
        case CREQ_TRANSFER:
            transfer_action(c, q, now);
            break;
        case CREQ_JOIN:
            join_action(c, q, now);
            break;
        case CREQ_RESET_JOIN:
            reset_join_action(c, q);
            return; /* the list may have changed under us */
        }
    }
    promote_learners(c, now);
}

void cluster_req_leader_changed(struct cluster *c)
{
    /* A proposal in flight may be lost with the old leader: propose it
     * again now, with the same (client_id, seq), instead of waiting for the
     * retry timer; the state machine applies it once. */
    for (struct creq *q = c->reqs; q != NULL; q = q->next) {
        if (q->kind == CREQ_PROBE && raft_leader(c->raft) != RAFT_NONE) {
            q->need_action = true;
            cluster_schedule(c);
        }
    }
}

void cluster_req_check(struct cluster *c)
{
    struct raft_status rs;
    bool have_rs = false;
    uint64_t leader = raft_leader(c->raft);
    struct creq *next;
    for (struct creq *q = c->reqs; q != NULL; q = next) {
        next = q->next;
        if (q->kind == CREQ_REMOVE && q->index != 0) {
            if (!have_rs) {
                raft_status(c->raft, &rs);
                have_rs = true;
            }
            if (raft_role(c->raft) != RAFT_LEADER && rs.commit < q->index) {
                /* Lost leadership before the commit: start over. */
                q->index = 0;
                q->need_action = true;
                continue;
            }
            if (rs.commit >= q->index && cluster_member_by_id(c, q->target) == NULL) {
                log_notice("member %s removed", q->name);
                creq_done(c, q,
                          q->leave ? json_pack("{s:b}", "left", 1)
                                   : json_pack("{s:s}", "removed", q->name));
            }
        } else if (q->kind == CREQ_RESET_JOIN && q->forwarded && !c->joining) {
            const char *lname = cluster_name_of(c, leader);
            creq_done(c, q,
                      json_pack("{s:b,s:s?}", "joined", 1, "leader_id",
                                leader != RAFT_NONE ? lname : NULL));
        } else if (q->kind == CREQ_TRANSFER && q->req != NULL && leader != RAFT_NONE &&
                   (q->target ? leader == q->target : leader != q->from_leader)) {
            creq_done(c, q, json_pack("{s:s}", "leader_id", cluster_name_of(c, leader)));
        }
    }
}

static void join_tick(struct cluster *c, uint64_t now)
{
    if (!c->joining || now < c->join_next_ms)
        return;
    unsigned backoff = 500u << (c->join_attempt < 3 ? c->join_attempt : 3);
    c->join_attempt++;
    c->join_next_ms = now + backoff;
    uint64_t to = raft_leader(c->raft);
    struct net_peer_stats ps;
    if (to == RAFT_NONE || net_peer_stats(c->net, to, &ps) < 0 || !ps.connected) {
        uint64_t ids[64];
        size_t n = net_peer_ids(c->net, ids, PB_ARRAY_SIZE(ids));
        to = RAFT_NONE;
        for (size_t i = 0; i < n && i < PB_ARRAY_SIZE(ids); i++) {
            if (net_peer_stats(c->net, ids[i], &ps) == 0 && ps.connected) {
                to = ids[i];
                break;
            }
        }
    }
    if (to == RAFT_NONE)
        return;
    uint8_t *ctx;
    size_t len;
    cluster_ctx_encode(c->cfg->node_id, c->cfg->advertise, &ctx, &len);
    admin_send_request(c, to, ADMIN_OP_JOIN, 0, 0, c->id, ctx, len);
    free(ctx);
}

void cluster_req_tick(struct cluster *c, uint64_t now)
{
    struct creq *next;
    for (struct creq *q = c->reqs; q != NULL; q = next) {
        next = q->next;
        if (now >= q->deadline_ms) {
            bool no_leader = raft_leader(c->raft) == RAFT_NONE;
            if (q->kind == CREQ_PROBE && no_leader)
                creq_fail(c, q, -ETIMEDOUT, CTL_ERR_NO_QUORUM, "no leader known: no quorum?");
            else
                creq_fail(c, q, -ETIMEDOUT, CTL_ERR_TIMEOUT, "timed out");
            continue;
        }
        if (q->retry_at_ms != 0 && now >= q->retry_at_ms) {
            q->retry_at_ms = 0;
            q->need_action = true;
        }
    }
    join_tick(c, now);
}

void cluster_join(struct cluster *c, struct ctl_request *req, const char *addr, unsigned timeout_ms)
{
    char host[256];
    uint16_t port;
    if (pb_split_host_port(addr, host, sizeof(host), &port) < 0 || port == 0) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "bad address %s: want host:port", addr);
        return;
    }
    if (c->joining) {
        ctl_reply_error(req, CTL_ERR_BUSY, NULL, "this node is already joining through %s",
                        c->join_addr ? c->join_addr : "?");
        return;
    }
    if (!cluster_is_lone(c)) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL,
                        "this node already belongs to a cluster with %zu members", c->n_members);
        return;
    }
    struct creq *q = creq_new(c, CREQ_RESET_JOIN, req, timeout_ms);
    snprintf(q->name, sizeof(q->name), "%s", addr);
    cluster_schedule(c);
}

static void reset_join_action(struct cluster *c, struct creq *q)
{
    if (q->forwarded)
        return; /* reset done: waiting to be a member */
    if (!cluster_is_lone(c)) {
        creq_fail(c, q, -EINVAL, CTL_ERR_INVALID_PARAMS,
                  "this node is no longer alone in its cluster");
        return;
    }
    /* Everything else in flight belonged to the cluster being discarded. */
    struct creq *next;
    for (struct creq *x = c->reqs; x != NULL; x = next) {
        next = x->next;
        if (x != q)
            creq_fail(c, x, -ESHUTDOWN, CTL_ERR_UNAVAILABLE,
                      "this node is joining another cluster");
    }
    struct pb_error err;
    pb_error_clear(&err);
    int rc = cluster_reset_for_join(c, q->name, &err);
    if (rc < 0) {
        log_err("cannot start joining: %s", err.msg);
        creq_fail(c, q, rc, CTL_ERR_INTERNAL, err.msg);
        c->exit_pending = true;
        if (c->opts.on_exit)
            c->opts.on_exit(c->opts.arg);
        return;
    }
    q->forwarded = true;
}

void cluster_partition(struct cluster *c, struct ctl_request *req, const char *name, bool on)
{
    const struct cluster_member *m = cluster_member_by_name(c, name);
    if (m == NULL || m->id == c->id) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "no peer member named %s", name);
        return;
    }
    int rc = net_set_partition(c->net, m->id, on);
    if (rc < 0) {
        ctl_reply_error(req, CTL_ERR_INTERNAL, NULL, "net_set_partition: %s", strerror(-rc));
        return;
    }
    log_notice("test hook: link to %s %s", name, on ? "cut" : "healed");
    json_t *arr = json_array();
    for (size_t i = 0; i < c->n_members; i++) {
        struct net_peer_stats ps;
        if (c->members[i].id != c->id && net_peer_stats(c->net, c->members[i].id, &ps) == 0 &&
            ps.partitioned)
            json_array_append_new(arr, json_string(c->members[i].name));
    }
    ctl_reply_result(req, json_pack("{s:o}", "partitioned", arr));
}

void cluster_req_close_all(struct cluster *c)
{
    while (c->reqs != NULL)
        creq_fail(c, c->reqs, -ESHUTDOWN, CTL_ERR_UNAVAILABLE, "the daemon is shutting down");
}

/* ---- ADMIN messages ---- */

void cluster_admin_on_request(struct cluster *c, uint64_t from, const uint8_t *p, size_t len)
{
    struct cursor cur;
    cursor_init(&cur, p, len);
    uint8_t ver = cursor_u8(&cur);
    uint8_t op = cursor_u8(&cur);
    uint8_t hops = cursor_u8(&cur);
    uint64_t req_id = cursor_u64(&cur);
    uint64_t target = cursor_u64(&cur);
    size_t ctx_len = 0;
    const uint8_t *ctx = cursor_bytes(&cur, RAFT_MAX_CONTEXT, &ctx_len);
    if (!cursor_ok(&cur) || ver != ADMIN_VERSION ||
        (target == RAFT_NONE && op != ADMIN_OP_TRANSFER)) {
        log_warning("dropped a malformed admin request from %016" PRIx64, from);
        return;
    }
    char name[65] = "", addr[CLUSTER_ADDR_MAX] = "";
    if (op == ADMIN_OP_JOIN && cluster_ctx_decode(ctx, ctx_len, name, addr) < 0) {
        admin_send_response(c, from, op, req_id, -EINVAL, "malformed member context");
        return;
    }
    if (op == ADMIN_OP_JOIN && hops == 0 && target != from) {
        /* A node asks for itself; only a member forwarding may speak for
         * another (and members are trusted as much as the leader). */
        admin_send_response(c, from, op, req_id, -EINVAL, "a node can only ask to join itself");
        return;
    }
    if (c->n_reqs >= REMOTE_MAX_REQS) {
        admin_send_response(c, from, op, req_id, -EBUSY, "too many requests in flight");
        return;
    }
    if (raft_role(c->raft) != RAFT_LEADER) {
        uint64_t leader = raft_leader(c->raft);
        if (leader == RAFT_NONE || leader == from || hops >= ADMIN_MAX_HOPS) {
            admin_send_response(c, from, op, req_id, -EAGAIN, "no leader known");
            return;
        }
        /* Forward; the requester retries until it sees the outcome. */
        admin_send_request(c, leader, op, (uint8_t)(hops + 1), req_id, target, ctx, ctx_len);
        admin_send_response(c, from, op, req_id, -EINPROGRESS, "forwarded to the leader %s",
                            cluster_name_of(c, leader) ? cluster_name_of(c, leader) : "?");
        return;
    }
    struct creq *q;
    switch (op) {
    case ADMIN_OP_JOIN: {
        const struct cluster_member *m = cluster_member_by_name(c, name);
        if (m != NULL && m->id != target) {
            admin_send_response(c, from, op, req_id, -EEXIST,
                                "the name %s is taken by member %016" PRIx64
                                ": remove it first (pickboxctl remove %s)",
                                name, m->id, name);
            return;
        }
        if (cluster_member_by_id(c, target) != NULL) {
            admin_send_response(c, from, op, req_id, 0, "already a member");
            return;
        }
        q = creq_new(c, CREQ_JOIN, NULL, REMOTE_DEADLINE_MS);
        q->ctx = pb_xmalloc(ctx_len ? ctx_len : 1);
        memcpy(q->ctx, ctx, ctx_len);
        q->ctx_len = ctx_len;
        snprintf(q->name, sizeof(q->name), "%s", name);
        break;
    }
    case ADMIN_OP_REMOVE: {
        const struct cluster_member *m = cluster_member_by_id(c, target);
        if (m == NULL) {
            admin_send_response(c, from, op, req_id, -ENOENT, "no such member");
            return;
        }
        q = creq_new(c, CREQ_REMOVE, NULL, REMOTE_DEADLINE_MS);
        snprintf(q->name, sizeof(q->name), "%s", m->name);
        break;
    }
    case ADMIN_OP_TRANSFER:
        q = creq_new(c, CREQ_TRANSFER, NULL, REMOTE_DEADLINE_MS);
        break;
    default:
        admin_send_response(c, from, op, req_id, -EOPNOTSUPP, "unknown admin operation");
        return;
    }
    q->origin = from;
    q->origin_id = req_id;
    q->target = target;
    cluster_schedule(c);
}

void cluster_admin_on_response(struct cluster *c, uint64_t from, const uint8_t *p, size_t len)
{
    struct cursor cur;
    cursor_init(&cur, p, len);
    uint8_t ver = cursor_u8(&cur);
    uint8_t op = cursor_u8(&cur);
    uint64_t req_id = cursor_u64(&cur);
    int rc = (int)cursor_u32(&cur);
    uint64_t leader = cursor_u64(&cur);
    size_t cid_len = 0;
    const uint8_t *cid = cursor_bytes(&cur, 16, &cid_len);
    char *msg = cursor_str(&cur, 255);
    if (!cursor_ok(&cur) || ver != ADMIN_VERSION || (cid_len != 0 && cid_len != 16)) {
        free(msg);
        log_warning("dropped a malformed admin response from %016" PRIx64, from);
        return;
    }
    (void)leader;
    if (op == ADMIN_OP_JOIN) {
        if (c->joining && !c->has_cluster_id && cid_len == 16 && (rc == 0 || rc == -EINPROGRESS)) {
            memcpy(c->cluster_id, cid, 16);
            c->has_cluster_id = true;
            c->pending_cluster_id = true;
            net_set_cluster_id(c->net, c->cluster_id);
        }
        if (c->joining && strcmp(c->join_last_msg, msg) != 0) {
            snprintf(c->join_last_msg, sizeof(c->join_last_msg), "%s", msg);
            if (rc == 0 || rc == -EINPROGRESS || rc == -EAGAIN || rc == -EBUSY)
                log_info("join: %s", msg);
            else
                log_warning("join refused: %s", msg);
        }
        free(msg);
        return;
    }
    struct creq *q = c->reqs;
    while (q != NULL && q->id != req_id)
        q = q->next;
    if (q == NULL || q->req == NULL) {
        free(msg);
        return;
    }
    /* The node was a member when we asked (we checked): the leader not
     * knowing it means an earlier attempt of ours removed it. */
    if ((rc == 0 || rc == -ENOENT) && q->kind == CREQ_REMOVE) {
        log_notice("member %s removed", q->name);
        creq_done(c, q,
                  q->leave ? json_pack("{s:b}", "left", 1)
                           : json_pack("{s:s}", "removed", q->name));
    } else if (rc == 0 && q->kind == CREQ_TRANSFER) {
        /* cluster_req_check() answers once the leader changed; ask again
         * if it did not. */
        q->forwarded = true;
        q->retry_at_ms = pb_now_ms() + TRANSFER_RETRY_MS;
    } else if (rc == -ENOENT || rc == -EINVAL) {
        creq_fail(c, q, rc, CTL_ERR_INVALID_PARAMS, msg);
    } else {
        q->retry_at_ms = pb_now_ms() + 100;
    }
    free(msg);
}
