/*
 * methods.c: the control methods of pickboxd (see methods.h).
 */
#include <config.h>

#include "daemon/methods.h"

#include <stdlib.h>
#include <string.h>

#include "ctl/ctl.h"
#include "daemon/cluster.h"
#include "daemon/daemon.h"
#include "daemon/metrics.h"
#include "daemon/replica.h"
#include "lib/util.h"

#define METHODS_PROBE_MAX 65536

static void method_hello(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    (void)params;
    ctl_reply_result(req, json_pack("{s:i,s:s,s:s}", "protocol", CTL_PROTOCOL_VERSION, "version",
                                    PACKAGE_VERSION, "node_id", d->node.node_id));
}

static void method_status(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    (void)params;
    json_t *st = node_status_json(&d->node, pb_now_ms());
    if (d->cluster != NULL)
        cluster_status_fill(d->cluster, st);
    if (d->replica != NULL)
        replica_status_fill(d->replica, st);
    json_object_set_new(st, "control_clients",
                        json_integer((json_int_t)ctl_server_clients(d->ctl)));
    ctl_reply_result(req, st);
}

/* params.key: an optional string (NULL when absent). -1 after replying
 * INVALID_PARAMS. */
static int param_string(struct ctl_request *req, json_t *params, const char *key, const char **out)
{
    json_t *v = json_object_get(params, key);
    *out = NULL;
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_string(v) || json_string_length(v) == 0) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "params.%s must be a string", key);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

/* params.timeout_s (a positive number) in ms, default dflt_s. */
static int param_timeout(struct ctl_request *req, json_t *params, unsigned dflt_s, unsigned *out_ms)
{
    json_t *v = json_object_get(params, "timeout_s");
    *out_ms = dflt_s * 1000;
    if (v == NULL || json_is_null(v))
        return 0;
    if (!json_is_number(v) || json_number_value(v) <= 0 || json_number_value(v) > 86400) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL,
                        "params.timeout_s must be a number of seconds in (0, 86400]");
        return -1;
    }
    *out_ms = (unsigned)(json_number_value(v) * 1000);
    if (*out_ms == 0)
        *out_ms = 1;
    return 0;
}

static bool need_cluster(struct ctl_request *req, struct daemon *d)
{
    if (d->cluster == NULL) {
        ctl_reply_error(req, CTL_ERR_UNAVAILABLE, NULL, "consensus is not running");
        return false;
    }
    return true;
}

static void method_members(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    (void)params;
    if (need_cluster(req, d))
        ctl_reply_result(req, cluster_members_json(d->cluster));
}

static void method_probe(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    json_t *v = json_object_get(params, "size");
    json_int_t size = 0;
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > METHODS_PROBE_MAX) {
            ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL,
                            "params.size must be an integer in 0..%d", METHODS_PROBE_MAX);
            return;
        }
        size = json_integer_value(v);
    }
    unsigned timeout_ms;
    if (param_timeout(req, params, 10, &timeout_ms) < 0 || !need_cluster(req, d))
        return;
    cluster_probe(d->cluster, req, (size_t)size, timeout_ms);
}

static void method_join(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    const char *addr;
    unsigned timeout_ms;
    if (param_string(req, params, "address", &addr) < 0 ||
        param_timeout(req, params, 30, &timeout_ms) < 0)
        return;
    if (addr == NULL) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "params.address is required");
        return;
    }
    if (need_cluster(req, d))
        cluster_join(d->cluster, req, addr, timeout_ms);
}

static void method_leave(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    unsigned timeout_ms;
    if (param_timeout(req, params, 30, &timeout_ms) < 0 || !need_cluster(req, d))
        return;
    cluster_leave(d->cluster, req, timeout_ms);
}

static void method_remove(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    const char *node;
    unsigned timeout_ms;
    if (param_string(req, params, "node", &node) < 0 ||
        param_timeout(req, params, 30, &timeout_ms) < 0)
        return;
    if (node == NULL) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL, "params.node is required");
        return;
    }
    if (need_cluster(req, d))
        cluster_remove(d->cluster, req, node, timeout_ms);
}

static void method_transfer(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    const char *node;
    unsigned timeout_ms;
    if (param_string(req, params, "node", &node) < 0 ||
        param_timeout(req, params, 10, &timeout_ms) < 0 || !need_cluster(req, d))
        return;
    cluster_transfer(d->cluster, req, node, timeout_ms);
}

static void method_debug_partition(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    if (!d->test_hooks) {
        ctl_reply_error(req, CTL_ERR_UNKNOWN_METHOD, NULL, "unknown method debug_partition");
        return;
    }
    const char *node;
    if (param_string(req, params, "node", &node) < 0)
        return;
    json_t *on = json_object_get(params, "on");
    if (node == NULL || !json_is_boolean(on)) {
        ctl_reply_error(req, CTL_ERR_INVALID_PARAMS, NULL,
                        "params.node (string) and params.on (boolean) are required");
        return;
    }
    if (need_cluster(req, d))
        cluster_partition(d->cluster, req, node, json_is_true(on));
}

static void method_sync(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    unsigned timeout_ms;
    if (param_timeout(req, params, 30, &timeout_ms) < 0 || !need_cluster(req, d))
        return;
    if (d->replica == NULL) {
        ctl_reply_error(req, CTL_ERR_UNAVAILABLE, NULL, "the tree is not running");
        return;
    }
    replica_sync(d->replica, req, timeout_ms);
}

static void method_conflicts(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    (void)params;
    if (d->replica == NULL) {
        ctl_reply_error(req, CTL_ERR_UNAVAILABLE, NULL, "the tree is not running");
        return;
    }
    ctl_reply_result(req, replica_conflicts_json(d->replica));
}

/* {"text": "<Prometheus text exposition>"} (metrics.h). */
static void method_metrics(struct ctl_request *req, json_t *params, void *arg)
{
    struct daemon *d = arg;
    (void)params;
    size_t len;
    char *text = metrics_render(d, &len);
    json_t *res = json_pack("{s:s%}", "text", text, len);
    free(text);
    if (res == NULL) /* not UTF-8: a label value that came from outside */
        ctl_reply_error(req, CTL_ERR_INTERNAL, NULL, "the metrics text is not valid UTF-8");
    else
        ctl_reply_result(req, res);
}

static const struct ctl_method methods[] = {
        {"hello", method_hello, 0},
        {"status", method_status, 0},
        {"members", method_members, 0},
        {"probe", method_probe, CTL_METHOD_MUTATING},
        {"join", method_join, CTL_METHOD_MUTATING},
        {"leave", method_leave, CTL_METHOD_MUTATING},
        {"remove", method_remove, CTL_METHOD_MUTATING},
        {"transfer", method_transfer, CTL_METHOD_MUTATING},
        {"debug_partition", method_debug_partition, CTL_METHOD_MUTATING},
        {"sync", method_sync, 0},
        {"conflicts", method_conflicts, 0},
        {"metrics", method_metrics, 0},
};

const struct ctl_method *methods_table(size_t *n)
{
    *n = PB_ARRAY_SIZE(methods);
    return methods;
}
