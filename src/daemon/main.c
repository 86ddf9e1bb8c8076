/*
 * main.c: pickboxd, one cluster node, in the foreground.
 *
 * Startup: load and check the configuration (errors exit 2), set up logging,
 * create the directories, take sockets from systemd or bind them, start the
 * control server, then tell systemd READY=1 and run the event loop. Any
 * failure before READY is one log line and exit 1. SIGTERM/SIGINT send
 * STOPPING=1, stop the loop, close everything (removing the control socket
 * file when we created it) and exit 0.
 */
#include <config.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "ctl/ctl.h"
#include "daemon/cluster.h"
#include "daemon/replica.h"
#include "daemon/nodeconf.h"
#include "daemon/daemon.h"
#include "daemon/dirs.h"
#include "daemon/listen.h"
#include "daemon/metrics_http.h"
#include "daemon/methods.h"
#include "daemon/node.h"
#include "daemon/notify.h"
#include "lib/error.h"
#include "lib/log.h"
#include "lib/util.h"

#define DAEMON_CONTROL_MODE 0660
/* Exit status when the state on disk is of a newer format than this build
 * reads (pickboxd.8; RestartPreventExitStatus= in the unit). */
#define DAEMON_EXIT_NEWER_FORMAT 3

static void daemon_on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
    struct daemon *d = arg;
    (void)what;
    log_notice("%s received, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    notify_stopping();
    event_base_loopexit(d->base, NULL);
}

/* SIGHUP: re-read the configuration with the same command line. log_level
 * takes effect at once; every other key is fixed for the life of the
 * process (sockets, paths, identity, timeouts the cluster agreed on), so a
 * change there is named in a warning and waits for a restart. A file that no
 * longer loads changes nothing. */
static void daemon_on_sighup(evutil_socket_t sig, short what, void *arg)
{
    struct daemon *d = arg;
    (void)sig;
    (void)what;
    notify_reloading();
    struct pb_config next;
    struct pb_error err;
    pb_error_clear(&err);
    int rc = config_load(&next, d->argc, d->argv, &err);
    if (rc != 0) {
        log_err("reload failed: %s; keeping the running configuration",
                rc < 0 ? err.msg : "no configuration to load");
    } else {
        enum log_level was = log_get_level();
        if (next.log_level != was) {
            /* said at the more verbose of the two levels, so it is seen */
            log_set_level(next.log_level > was ? next.log_level : was);
            log_notice("reload: log_level is now %s", log_level_name(next.log_level));
            log_set_level(next.log_level);
        }
        /* what the process runs with: the startup configuration, with the
         * log level as it is now */
        struct pb_config running = *d->cfg;
        running.log_level = next.log_level;
        char keys[512];
        if (config_diff(&running, &next, keys, sizeof(keys)) > 0)
            log_warning("reload: %s changed: takes effect when pickboxd restarts", keys);
        log_notice("reloaded %s", next.config_file ? next.config_file : "the command line");
    }
    config_free(&next);
    notify_ready(d->status_line);
}

/* The cluster's role, leader or term changed: refresh d->node, STATUS=. */
static void daemon_on_cluster_change(void *arg)
{
    struct daemon *d = arg;
    struct cluster_view v;
    cluster_view(d->cluster, &v);
    struct node_state *st = &d->node;
    st->consensus_running = true;
    st->role = strcmp(v.role, "leader") == 0      ? NODE_ROLE_LEADER
               : strcmp(v.role, "candidate") == 0 ? NODE_ROLE_CANDIDATE
               : strcmp(v.role, "learner") == 0   ? NODE_ROLE_LEARNER
                                                  : NODE_ROLE_FOLLOWER;
    st->term = v.term;
    free(st->leader_id);
    st->leader_id = v.leader ? pb_xstrdup(v.leader) : NULL;
    st->commit_index = v.commit;
    st->applied_index = v.applied;
    daemon_node_changed(d);
}

static void daemon_on_cluster_exit(void *arg)
{
    struct daemon *d = arg;
    /* Let the reply to `leave` go out first. */
    struct timeval tv = {0, 200 * 1000};
    event_base_loopexit(d->base, &tv);
}

static int daemon_add_signal(struct daemon *d, struct event **ev, int sig, event_callback_fn cb,
                             struct pb_error *err)
{
    *ev = evsignal_new(d->base, sig, cb, d);
    if (*ev == NULL || evsignal_add(*ev, NULL) < 0)
        return pb_error_set(err, -EINVAL, "cannot handle signal %d", sig);
    return 0;
}

/* Everything up to READY=1. On error, err says what; d is partly set up and
 * daemon_stop() releases it. */
static int daemon_start(struct daemon *d, const struct pb_config *cfg, struct pb_error *err)
{
    int rc = dirs_prepare(cfg, err);
    if (rc < 0)
        return rc;

    struct listen_fds fds;
    rc = listen_from_systemd(&fds, err);
    if (rc < 0)
        return rc;
    d->peer_fd = fds.peer;
    d->peer_from_systemd = fds.peer >= 0;
    d->control_from_systemd = fds.control >= 0;

    if (d->peer_fd < 0) {
        if (cfg->port == 0) {
            if (fds.control >= 0)
                close(fds.control);
            return pb_error_set(err, -EINVAL, "no peer port: set port or pass a 'peer' socket");
        }
        rc = listen_tcp(cfg->bind, cfg->port, &d->peer_fd, err);
        if (rc < 0) {
            if (fds.control >= 0)
                close(fds.control);
            return rc;
        }
    }

    d->base = event_base_new();
    if (d->base == NULL) {
        if (fds.control >= 0)
            close(fds.control);
        return pb_error_set(err, -ENOMEM, "cannot create the event loop");
    }
    /* Signals first: from the moment the control socket answers, SIGTERM
     * must mean a clean stop. */
    if ((rc = daemon_add_signal(d, &d->sig_term, SIGTERM, daemon_on_stop_signal, err)) < 0 ||
        (rc = daemon_add_signal(d, &d->sig_int, SIGINT, daemon_on_stop_signal, err)) < 0 ||
        (rc = daemon_add_signal(d, &d->sig_hup, SIGHUP, daemon_on_sighup, err)) < 0) {
        if (fds.control >= 0)
            close(fds.control);
        return rc;
    }
    node_state_init(&d->node, cfg, pb_now_ms());
    const char *hooks = getenv("PICKBOX_TEST_HOOKS");
    d->test_hooks = hooks != NULL && strcmp(hooks, "1") == 0;

    struct cluster_options co = {.cfg = cfg,
                                 .base = d->base,
                                 .peer_fd = d->peer_fd,
                                 .on_change = daemon_on_cluster_change,
                                 .on_exit = daemon_on_cluster_exit,
                                 .arg = d};
    d->peer_fd = -1; /* the cluster owns it now, whatever happens */
    rc = cluster_open(&d->cluster, &co, err);
    if (rc < 0) {
        if (fds.control >= 0)
            close(fds.control);
        return rc;
    }
    daemon_on_cluster_change(d);
    rc = replica_new(&d->replica, cfg, d->base, d->cluster, err);
    if (rc < 0) {
        if (fds.control >= 0)
            close(fds.control);
        return rc;
    }

    size_t n_methods;
    const struct ctl_method *methods = methods_table(&n_methods);
    d->ctl = ctl_server_new(d->base, methods, n_methods, d, NULL);
    if (fds.control >= 0) {
        rc = ctl_server_listen_fd(d->ctl, fds.control);
        if (rc < 0) {
            close(fds.control);
            return pb_error_set(err, rc, "cannot serve the control socket from systemd: %s",
                                strerror(-rc));
        }
    } else {
        rc = ctl_server_listen_path(d->ctl, cfg->control_socket, DAEMON_CONTROL_MODE);
        if (rc == -EADDRINUSE)
            return pb_error_set(err, rc,
                                "control socket %s is in use: is another pickboxd running?",
                                cfg->control_socket);
        if (rc < 0)
            return pb_error_set(err, rc, "cannot listen on control socket %s: %s",
                                cfg->control_socket, strerror(-rc));
    }

    if (cfg->metrics_listen != NULL) {
        rc = metrics_http_start(&d->metrics_http, d->base, cfg->metrics_listen, d, err);
        if (rc < 0)
            return rc;
    }

    d->watchdog = notify_watchdog_start(d->base);
    return 0;
}

void daemon_node_changed(struct daemon *d)
{
    char line[256];
    node_status_line(&d->node, line, sizeof(line));
    if (strcmp(line, d->status_line) == 0)
        return;
    snprintf(d->status_line, sizeof(d->status_line), "%s", line);
    notify_status(line);
    log_info("status: %s", line);
}

static void daemon_stop(struct daemon *d)
{
    metrics_http_free(d->metrics_http);
    d->metrics_http = NULL;
    replica_free(d->replica);
    d->replica = NULL;
    cluster_close(d->cluster); /* answers its pending requests first */
    d->cluster = NULL;
    ctl_server_free(d->ctl); /* removes the socket file if we made it */
    d->ctl = NULL;
    if (d->peer_fd >= 0)
        close(d->peer_fd);
    d->peer_fd = -1;
    struct event *events[] = {d->sig_term, d->sig_int, d->sig_hup, d->watchdog};
    for (size_t i = 0; i < PB_ARRAY_SIZE(events); i++) {
        if (events[i] != NULL)
            event_free(events[i]);
    }
    if (d->base != NULL)
        event_base_free(d->base);
    d->base = NULL;
    node_state_free(&d->node);
}

static int daemon_run(const struct pb_config *cfg, int argc, char **argv)
{
    struct daemon d = {.cfg = cfg, .argc = argc, .argv = argv, .peer_fd = -1};
    struct pb_error err;
    pb_error_clear(&err);

    int rc = daemon_start(&d, cfg, &err);
    if (rc < 0) {
        log_err("%s", err.msg);
        daemon_stop(&d);
        /* data of a newer format: only an upgrade helps, not a restart */
        return rc == -EPROTONOSUPPORT ? DAEMON_EXIT_NEWER_FORMAT : EXIT_FAILURE;
    }

    node_status_line(&d.node, d.status_line, sizeof(d.status_line));
    notify_ready(d.status_line);
    char peer[300];
    if (d.peer_from_systemd)
        snprintf(peer, sizeof(peer), "systemd");
    else if (strchr(cfg->bind, ':') != NULL)
        snprintf(peer, sizeof(peer), "[%s]:%u", cfg->bind, (unsigned)cfg->port);
    else
        snprintf(peer, sizeof(peer), "%s:%u", cfg->bind, (unsigned)cfg->port);
    log_notice("ready: node=%s control=%s peer=%s role=%s term=%llu", d.node.node_id,
               d.control_from_systemd ? "systemd" : cfg->control_socket, peer,
               node_role_name(d.node.role), (unsigned long long)d.node.term);

    rc = event_base_dispatch(d.base);
    if (rc < 0)
        log_err("event loop failed");
    daemon_stop(&d);
    if (rc == 0)
        log_info("stopped");
    return rc < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}

int main(int argc, char **argv)
{
    /* daemon(7): start from a clean signal mask, whatever our parent blocked.
     * A client that hangs up must not kill us on the next write. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct pb_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    struct pb_error err;
    pb_error_clear(&err);
    int rc = config_load(&cfg, argc, argv, &err);
    if (rc < 0) {
        fprintf(stderr, "pickboxd: %s\n", err.msg);
        config_free(&cfg);
        return 2;
    }
    if (rc == 1) {
        config_free(&cfg);
        return EXIT_SUCCESS;
    }
    if (cfg.check_config) {
        config_print(&cfg, stdout);
        printf("# configuration OK\n");
        config_free(&cfg);
        return fflush(stdout) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
    }

    log_set_level(cfg.log_level);
    if (isatty(STDERR_FILENO))
        log_set_ident(cfg.node_id); /* several nodes in several terminals */

    rc = daemon_run(&cfg, argc, argv);
    config_free(&cfg);
    return rc;
}
