/*
 * commands.c: pickboxctl's command table and the views that label and order
 * each command's result (see pickboxctl.h and render.h).
 *
 * status result (the daemon's side of the contract, cluster-spec "Control
 * methods"; every member is optional, unknown members are shown too):
 *   {"node_id":"n1","raft_id":"00c0ffee00c0ffee","cluster_id":"<32 hex>|null",
 *    "role":"leader","term":4,"leader_id":"n1","commit_index":120,
 *    "applied_index":120,"last_index":120,"snapshot_index":100,"joining":false,
 *    "storage_error":null|{"message":"...","since_s":12},
 *    "members":[{"id":"n1","raft_id":"...","address":"127.0.0.1:8010","voter":true,
 *                "self":true,"reachable":true,"match_index":120,"applied_index":120,"lag":0,
 *                "last_contact_ms":12}], ...}
 * A storage error is shown first, in capitals, when set.
 */
#include "config.h"

#include "pickboxctl/pickboxctl.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "pickboxctl/bench.h"

/* {"message":"disk full","since_s":12} -> "FAILING for 12s: disk full". */
static void format_storage_error(const json_t *v, char *buf, size_t len)
{
    if (json_is_null(v)) {
        snprintf(buf, len, "none");
        return;
    }
    if (!json_is_object(v)) {
        pbctl_format_default(v, buf, len);
        return;
    }
    char msg[512], since[64];
    pbctl_format_default(json_object_get(v, "message") ? json_object_get(v, "message")
                                                       : json_null(),
                         msg, sizeof(msg));
    const json_t *s = json_object_get(v, "since_s");
    if (json_is_integer(s))
        pbctl_format_duration_s(s, since, sizeof(since));
    else
        snprintf(since, sizeof(since), "?");
    snprintf(buf, len, "FAILING for %s: %s (not acknowledging writes)", since, msg);
}

/* Marks this node's row in a members table. */
static void format_self(const json_t *v, char *buf, size_t len)
{
    snprintf(buf, len, "%s", json_is_true(v) ? "*" : "");
}

static const struct pbctl_field_spec member_columns[] = {
        {"id", "id", NULL, NULL},
        {"self", "self", format_self, NULL},
        {"address", "address", NULL, NULL},
        {"voter", "role", pbctl_format_voter, NULL},
        {"reachable", "reachable", NULL, NULL},
        {"match_index", "match", NULL, NULL},
        {"applied_index", "applied", NULL, NULL},
        {"lag", "lag", NULL, NULL},
        {"last_contact_ms", "last contact", pbctl_format_ms_ago, NULL},
        {"raft_id", "raft id", NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

#define STATUS_FIELDS                                                                              \
    {"node_id", "node", NULL, NULL}, {"raft_id", "raft id", NULL, NULL},                           \
            {"cluster_id", "cluster id", NULL, NULL}, {"version", NULL, NULL, NULL},               \
            {"role", NULL, NULL, NULL}, {"joining", NULL, NULL, NULL}, {"term", NULL, NULL, NULL}, \
            {"leader_id", "leader", NULL, NULL}, {"commit_index", NULL, NULL, NULL},               \
            {"applied_index", NULL, NULL, NULL}, {"last_index", "last log index", NULL, NULL},     \
            {"snapshot_index", "snapshot index", NULL, NULL},                                      \
            {"consensus_running", "consensus running", NULL, NULL},                                \
            {"advertise", NULL, NULL, NULL}, {"join", NULL, NULL, NULL},                           \
            {"data_dir", "tree dir", NULL, NULL}, {"state_dir", "state dir", NULL, NULL},          \
            {"uptime_s", "uptime", pbctl_format_duration_s, NULL},                                 \
    {                                                                                              \
        "control_clients", "control clients", NULL, NULL                                           \
    }

/* Healthy: storage_error (null) is listed after the identity fields. */
static const struct pbctl_field_spec status_view[] = {
        STATUS_FIELDS,
        {"storage_error", "storage error", format_storage_error, NULL},
        {"members", NULL, NULL, member_columns},
        {NULL, NULL, NULL, NULL},
};

/* Failing storage: the error is the first line, labelled in capitals. */
static const struct pbctl_field_spec status_failing_view[] = {
        {"storage_error", "STORAGE ERROR", format_storage_error, NULL},
        STATUS_FIELDS,
        {"members", NULL, NULL, member_columns},
        {NULL, NULL, NULL, NULL},
};

static int render_status(const struct pbctl_field_spec *view, const json_t *result,
                         struct pbctl_writer *w)
{
    const json_t *se = json_object_get(result, "storage_error");
    if (se != NULL && !json_is_null(se))
        view = status_failing_view;
    return pbctl_render(view, result, w);
}

static const struct pbctl_field_spec members_view[] = {
        {"members", NULL, NULL, member_columns},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec hello_view[] = {
        {"node_id", "node", NULL, NULL},
        {"version", NULL, NULL, NULL},
        {"protocol", NULL, NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec join_view[] = {
        {"joined", NULL, NULL, NULL},
        {"leader_id", "leader", NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec probe_view[] = {
        {"index", NULL, NULL, NULL},
        {"term", NULL, NULL, NULL},
        {NULL, NULL, NULL, NULL},
};

static const struct pbctl_field_spec transfer_view[] = {
        {"leader_id", "leader", NULL, NULL},
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

/* metrics: {"text": "..."}. The exposition is printed as is (the text
 * backend would turn its newlines into '?'); with --json the result object
 * goes through the generic walk like any other. */
static int render_metrics(const struct pbctl_field_spec *view, const json_t *result,
                          struct pbctl_writer *w)
{
    const json_t *text = json_object_get(result, "text");
    if (!pbctl_writer_is_text(w) || !json_is_string(text))
        return pbctl_render(view, result, w);
    if (fwrite(json_string_value(text), 1, json_string_length(text), w->out) !=
                json_string_length(text) ||
        fflush(w->out) != 0)
        return -EIO;
    return 0;
}

const struct pbctl_command pbctl_commands[] = {
        {
                .name = "status",
                .method = "status",
                .help = "show this node's role, term, indexes and members",
                .view = status_view,
                .render = render_status,
        },
        {
                .name = "hello",
                .method = "hello",
                .help = "show the daemon's version and protocol",
                .view = hello_view,
        },
        {
                .name = "members",
                .method = "members",
                .help = "list the cluster's members (leader's view of match and lag)",
                .view = members_view,
        },
        {
                .name = "join",
                .args = {"address"},
                .min_args = 1,
                .method = "join",
                .help = "make this lone node join the cluster at ADDRESS (host:port)",
                .view = join_view,
                .opts = PBCTL_OPT_SEND_TIMEOUT,
                .timeout_ms = 35000,
        },
        {
                .name = "leave",
                .method = "leave",
                .help = "remove this node from its cluster (the daemon then exits)",
                .timeout_ms = 35000,
        },
        {
                .name = "remove",
                .args = {"node"},
                .min_args = 1,
                .method = "remove",
                .help = "remove member NODE (e.g. a dead one) from the cluster",
        },
        {
                .name = "transfer",
                .args = {"node"},
                .min_args = 0,
                .method = "transfer",
                .help = "hand leadership to NODE (default: the most up-to-date voter)",
                .view = transfer_view,
        },
        {
                .name = "probe",
                .method = "probe",
                .help = "commit one no-op entry of --size bytes through the cluster",
                .view = probe_view,
                .opts = PBCTL_OPT_SIZE | PBCTL_OPT_SEND_TIMEOUT,
        },
        {
                .name = "bench",
                .method = "probe",
                .help = "measure commits/s and latency with concurrent probes",
                .opts = PBCTL_OPT_SIZE | PBCTL_OPT_CONCURRENCY | PBCTL_OPT_DURATION,
                .run = pbctl_bench_command,
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
        {
                .name = "metrics",
                .method = "metrics",
                .help = "print this node's metrics (Prometheus text format)",
                .render = render_metrics,
        },
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
