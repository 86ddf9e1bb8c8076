/*
 * methods.c: the control methods of pickboxd (see methods.h).
 */
#include <config.h>

#include "daemon/methods.h"

#include "ctl/ctl.h"
#include "daemon/daemon.h"
#include "lib/util.h"

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
    json_object_set_new(st, "control_clients",
                        json_integer((json_int_t)ctl_server_clients(d->ctl)));
    ctl_reply_result(req, st);
}

static const struct ctl_method methods[] = {
        {"hello", method_hello, 0},
        {"status", method_status, 0},
};

const struct ctl_method *methods_table(size_t *n)
{
    *n = PB_ARRAY_SIZE(methods);
    return methods;
}
