/*
 * methods.h: the control methods pickboxd serves (DESIGN.md section 8).
 *
 * hello    -> {"protocol":1,"version":"0.1.0","node_id":"n1"}
 * status   -> node_status_json() (see node.h) with the cluster's fields
 *             (cluster_status_fill(), cluster.h) plus "control_clients"
 * members  -> {"members":[...]}
 * probe, join, leave, remove, transfer (mutating) and, only with
 * PICKBOX_TEST_HOOKS=1 in the environment, debug_partition: see
 * the cluster spec and cluster.h. They answer once done.
 *
 * Every handler's arg is the struct daemon.
 */
#ifndef PICKBOX_DAEMON_METHODS_H
#define PICKBOX_DAEMON_METHODS_H

#include <stddef.h>

struct ctl_method;

/* The method table (static storage) and its length in *n. */
const struct ctl_method *methods_table(size_t *n);

#endif
