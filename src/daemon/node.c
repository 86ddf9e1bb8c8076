/*
 * node.c: the node's cluster state and how it is reported (see node.h).
 */
#include <config.h>

#include "daemon/node.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/nodeconf.h"
#include "lib/util.h"

static char *node_strdup_or_null(const char *s)
{
    return s != NULL ? pb_xstrdup(s) : NULL;
}

void node_state_init(struct node_state *st, const struct pb_config *cfg, uint64_t now_ms)
{
    memset(st, 0, sizeof(*st));
    st->node_id = pb_xstrdup(cfg->node_id);
    st->advertise = node_strdup_or_null(cfg->advertise);
    st->join = node_strdup_or_null(cfg->join);
    st->data_dir = pb_xstrdup(cfg->data_dir);
    st->state_dir = pb_xstrdup(cfg->state_dir);
    /* §5.2: every server starts as a follower, at term 0, knowing no leader. */
    st->role = NODE_ROLE_FOLLOWER;
    st->term = 0;
    st->leader_id = NULL;
    st->commit_index = 0;
    st->applied_index = 0;
    st->consensus_running = false;
    st->started_ms = now_ms;
    if (st->join == NULL) {
        /* Bootstrapping: the initial configuration is this node alone. */
        st->members = pb_xcalloc(1, sizeof(*st->members));
        st->members[0].id = pb_xstrdup(st->node_id);
        st->members[0].address = node_strdup_or_null(st->advertise);
        st->members[0].voter = true;
        st->n_members = 1;
    }
}

void node_state_free(struct node_state *st)
{
    if (st == NULL)
        return;
    for (size_t i = 0; i < st->n_members; i++) {
        free(st->members[i].id);
        free(st->members[i].address);
    }
    free(st->members);
    free(st->node_id);
    free(st->advertise);
    free(st->join);
    free(st->data_dir);
    free(st->state_dir);
    free(st->leader_id);
    memset(st, 0, sizeof(*st));
}

const char *node_role_name(enum node_role role)
{
    switch (role) {
    case NODE_ROLE_FOLLOWER:
        return "follower";
    case NODE_ROLE_CANDIDATE:
        return "candidate";
    case NODE_ROLE_LEADER:
        return "leader";
    case NODE_ROLE_LEARNER:
        return "learner";
    }
    return "unknown";
}

json_t *node_status_json(const struct node_state *st, uint64_t now_ms)
{
    json_t *members = json_array();
    for (size_t i = 0; i < st->n_members; i++) {
        const struct node_member *m = &st->members[i];
        json_array_append_new(members, json_pack("{s:s,s:s?,s:b}", "id", m->id, "address",
                                                 m->address, "voter", m->voter));
    }
    uint64_t uptime_ms = now_ms >= st->started_ms ? now_ms - st->started_ms : 0;
    return json_pack("{s:s,s:s,s:I,s:s?,s:I,s:I,s:o,s:b,s:s?,s:s?,s:s,s:s,s:I,s:s}", "node_id",
                     st->node_id, "role", node_role_name(st->role), "term", (json_int_t)st->term,
                     "leader_id", st->leader_id, "commit_index", (json_int_t)st->commit_index,
                     "applied_index", (json_int_t)st->applied_index, "members", members,
                     "consensus_running", st->consensus_running, "join", st->join, "advertise",
                     st->advertise, "data_dir", st->data_dir, "state_dir", st->state_dir,
                     "uptime_s", (json_int_t)(uptime_ms / 1000), "version", PACKAGE_VERSION);
}

void node_status_line(const struct node_state *st, char *buf, size_t len)
{
    const char *role = node_role_name(st->role);
    if (!st->consensus_running) {
        snprintf(buf, len, "%s, term %llu, no leader (consensus not running yet)%s%s", role,
                 (unsigned long long)st->term, st->join ? ", join via " : "",
                 st->join ? st->join : "");
    } else if (st->role == NODE_ROLE_LEADER) {
        snprintf(buf, len, "leader, term %llu, commit %llu", (unsigned long long)st->term,
                 (unsigned long long)st->commit_index);
    } else {
        snprintf(buf, len, "%s of %s, term %llu, commit %llu", role,
                 st->leader_id ? st->leader_id : "(no leader)", (unsigned long long)st->term,
                 (unsigned long long)st->commit_index);
    }
}
