/*
 * commands.c: pickboxctl's command table and the views that label and order
 * each command's result (see pickboxctl.h and render.h).
 *
 * status result (the daemon's side of the contract; every member is optional,
 * unknown members are shown too):
 *   {"node_id":"n1","version":"0.1.0","role":"leader","term":4,"leader_id":"n1",
 *    "commit_index":120,"applied_index":120,"last_index":120,"uptime_s":30,
 *    "members":[{"id":"n1","address":"127.0.0.1:8010","voter":true,
 *                "reachable":true,"match":120,"lag":0,"last_contact_ms":12}]}
 */
#include "config.h"

#include "pickboxctl/pickboxctl.h"

#include <string.h>

static const struct pbctl_field_spec member_columns[] = {
        {"id", "id", NULL, NULL},
        {"address", "address", NULL, NULL},
        {"voter", "role", pbctl_format_voter, NULL},
        {"reachable", "reachable", NULL, NULL},
        {"match", "match", NULL, NULL},
        {"lag", "lag", NULL, NULL},
        {"last_contact_ms", "last contact", pbctl_format_ms_ago, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec status_view[] = {
        {"node_id", "node", NULL, NULL},
        {"version", NULL, NULL, NULL},
        {"role", NULL, NULL, NULL},
        {"term", NULL, NULL, NULL},
        {"leader_id", "leader", NULL, NULL},
        {"commit_index", NULL, NULL, NULL},
        {"applied_index", NULL, NULL, NULL},
        {"last_index", "last log index", NULL, NULL},
        {"consensus_running", "consensus running", NULL, NULL},
        {"advertise", NULL, NULL, NULL},
        {"join", NULL, NULL, NULL},
        {"data_dir", "tree", NULL, NULL},
        {"state_dir", "state dir", NULL, NULL},
        {"uptime_s", "uptime", pbctl_format_duration_s, NULL},
        {"members", NULL, NULL, member_columns},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec hello_view[] = {
        {"node_id", "node", NULL, NULL},
        {"version", NULL, NULL, NULL},
        {"protocol", NULL, NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec sync_view[] = {
        {"index", "synced to index", NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec conflict_columns[] = {
        {"path", "path", NULL, NULL},
        {"node", "node", NULL, NULL},
        {"index", "index", NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec conflicts_view[] = {
        {"conflicts", NULL, NULL, conflict_columns},
        {NULL, NULL, NULL, NULL},
};

const struct pbctl_command pbctl_commands[] = {
        {
                .name = "status",
                .method = "status",
                .help = "show this node's role, term, indexes and members",
                .view = status_view,
        },
        {
                .name = "hello",
                .method = "hello",
                .help = "show the daemon's version and protocol",
                .view = hello_view,
        },
        {
                .name = "sync",
                .method = "sync",
                .help = "wait until every reachable node has applied what is committed now "
                        "(-t bounds the wait)",
                .view = sync_view,
        },
        {
                .name = "conflicts",
                .method = "conflicts",
                .help = "list the conflict copies in the tree (path, node, index)",
                .view = conflicts_view,
        },
        /* Added as the daemon implements them, e.g.:
         * {.name = "transfer", .args = {"node"}, .min_args = 1, .method = "transfer",
         *  .help = "hand leadership to NODE"}, */
        {.name = NULL},
};

const struct pbctl_command *pbctl_command_find(const char *name)
{
    for (const struct pbctl_command *c = pbctl_commands; c->name != NULL; c++) {
        if (strcmp(c->name, name) == 0)
            return c;
    }
    return NULL;
}
