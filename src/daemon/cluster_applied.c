/*
 * cluster_applied.c: every node tells its peers how far it has applied the
 * log, so that `sync` on any node can wait until every reachable member has
 * applied what is committed.
 *
 * Frame CLUSTER_MSG_APPLIED (21), sent on the control class to every
 * connected member: u8 version = 1, u64 applied index, u64 commit index.
 * Pushed rather than asked for: a node sends it from its tick when its
 * applied index has changed (so at most once per heartbeat interval, however
 * fast entries apply), at once when a link comes up, and every
 * CLUSTER_APPLIED_REFRESH_MS anyway (a new or lost link learns it without a
 * round trip). Every node thereby knows every reachable member's applied
 * index within one heartbeat, without asking the leader, and a follower
 * learns the leader's commit index as well (its own may lag by a heartbeat).
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "daemon/cluster_int.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"

#define CLUSTER_APPLIED_VERSION    1
#define CLUSTER_APPLIED_REFRESH_MS 1000

static struct cluster_applied_report *report_of(struct cluster *c, uint64_t id, bool add)
{
    for (size_t i = 0; i < c->n_reports; i++) {
        if (c->reports[i].id == id)
            return &c->reports[i];
    }
    if (!add)
        return NULL;
    if (c->n_reports == PB_ARRAY_SIZE(c->reports)) {
        /* Full: drop a report of a node that is no longer a member. */
        for (size_t i = 0; i < c->n_reports; i++) {
            if (cluster_member_by_id(c, c->reports[i].id) == NULL) {
                c->reports[i] = c->reports[--c->n_reports];
                break;
            }
        }
        if (c->n_reports == PB_ARRAY_SIZE(c->reports))
            return NULL;
    }
    struct cluster_applied_report *r = &c->reports[c->n_reports++];
    memset(r, 0, sizeof(*r));
    r->id = id;
    return r;
}

void cluster_applied_tick(struct cluster *c, uint64_t now)
{
    if (c->sm == NULL || c->net == NULL || c->raft == NULL || c->joining)
        return;
    /* what `sync` waits for: applied and in the tree (a big file being
     * written in the background holds it back, sm.h) */
    uint64_t applied = sm_materialized(c->sm), commit = raft_commit(c->raft);
    bool changed = applied != c->applied_sent || commit != c->commit_sent;
    if (!changed && now < c->applied_sent_ms + CLUSTER_APPLIED_REFRESH_MS)
        return;
    struct buf b = BUF_INIT;
    buf_put_u8(&b, CLUSTER_APPLIED_VERSION);
    buf_put_u64(&b, applied);
    buf_put_u64(&b, commit);
    for (size_t i = 0; i < c->n_members; i++) {
        uint64_t id = c->members[i].id;
        if (id == c->id)
            continue;
        int rc = net_send(c->net, id, NET_CLASS_CONTROL, CLUSTER_MSG_APPLIED, b.data, b.len);
        if (rc < 0 && rc != -ENOTCONN)
            log_debug("applied index to %s: %s", c->members[i].name, strerror(-rc));
    }
    buf_free(&b);
    c->applied_sent = applied;
    c->commit_sent = commit;
    c->applied_sent_ms = now;
}

void cluster_applied_resend(struct cluster *c)
{
    c->applied_sent_ms = 0;
    c->commit_sent = UINT64_MAX; /* "changed": sent with the next tick */
}

void cluster_applied_on_frame(struct cluster *c, uint64_t from, const uint8_t *p, size_t len)
{
    struct cursor cur;
    cursor_init(&cur, p, len);
    uint8_t version = cursor_u8(&cur);
    uint64_t applied = cursor_u64(&cur);
    uint64_t commit = cursor_u64(&cur);
    if (!cursor_ok(&cur) || version != CLUSTER_APPLIED_VERSION) {
        log_debug("malformed applied-index frame from %016" PRIx64, from);
        c->stats_malformed++;
        return;
    }
    struct cluster_applied_report *r = report_of(c, from, true);
    if (r == NULL)
        return;
    /* Indexes only grow on a node (a restart reports again from its
     * durable applied index, which never goes back). */
    r->applied = applied;
    r->commit = commit > r->commit ? commit : r->commit;
    r->at_ms = pb_now_ms();
}

bool cluster_member_applied(struct cluster *c, uint64_t id, uint64_t *applied)
{
    if (id == c->id) {
        *applied = c->sm ? sm_applied(c->sm) : 0;
        return c->sm != NULL;
    }
    const struct cluster_applied_report *r = report_of(c, id, false);
    if (r == NULL)
        return false;
    *applied = r->applied;
    return true;
}

uint64_t cluster_commit_known(struct cluster *c)
{
    uint64_t commit = raft_commit(c->raft);
    for (size_t i = 0; i < c->n_reports; i++) {
        if (cluster_member_by_id(c, c->reports[i].id) != NULL && c->reports[i].commit > commit)
            commit = c->reports[i].commit;
    }
    return commit;
}
