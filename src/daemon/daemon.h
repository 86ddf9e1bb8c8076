/*
 * daemon.h: the running pickboxd, as the pieces wired by main.c see it.
 */
#ifndef PICKBOX_DAEMON_DAEMON_H
#define PICKBOX_DAEMON_DAEMON_H

#include "daemon/node.h"

struct cluster;
struct ctl_server;
struct event;
struct event_base;
struct metrics_http;
struct pb_config;
struct replica;

struct daemon {
    const struct pb_config *cfg;
    /* The command line, kept for SIGHUP: the file is re-read with it. */
    int argc;
    char **argv;
    struct event_base *base;
    struct ctl_server *ctl;
    struct node_state node;
    struct cluster *cluster; /* the Raft driver (cluster.h); NULL until started */
    struct replica *replica; /* the tree side (replica.h); NULL until started */
    bool test_hooks;         /* PICKBOX_TEST_HOOKS=1: debug_partition is served */
    /* The HTTP metrics listener (metrics_listen, metrics_http.h); NULL: off. */
    struct metrics_http *metrics_http;
    /* The peer TCP listener: bound here (or passed by systemd as "peer") so
     * that the port is owned from startup; the cluster's transport takes it
     * over (then -1). */
    int peer_fd;
    bool peer_from_systemd;
    bool control_from_systemd;
    struct event *sig_term, *sig_int, *sig_hup;
    struct event *watchdog; /* NULL when WatchdogSec= is not set */
    char status_line[256];  /* the last STATUS= sent */
};

/* Call after changing d->node (role, term, leader, ...): sends a new STATUS=
 * to systemd and logs it, when the one-line summary changed. */
void daemon_node_changed(struct daemon *d);

#endif
