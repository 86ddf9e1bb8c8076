/*
 * listen.h: the daemon's listening sockets, from systemd or bound here.
 *
 * Under socket activation systemd passes fds named by FileDescriptorName=:
 * "control" (the Unix control socket) and optionally "peer" (the peer TCP
 * port). Anything not passed is bound by the daemon itself from its config.
 */
#ifndef PICKBOX_DAEMON_LISTEN_H
#define PICKBOX_DAEMON_LISTEN_H

#include <stdint.h>

#include "lib/error.h"

struct listen_fds {
    int control; /* listening AF_UNIX stream socket, -1 when not passed */
    int peer;    /* listening TCP socket, -1 when not passed */
};

/*
 * Takes the sockets systemd passed (sd_listen_fds_with_names, unsetting the
 * LISTEN_* variables) and sorts them by name. A passed fd of the wrong kind,
 * or a name given twice, is an error; fds with other names are closed with a
 * warning. fds is set to -1/-1 first; on error every passed fd is closed.
 * Returns 0 or a negative errno with err filled.
 */
int listen_from_systemd(struct listen_fds *fds, struct pb_error *err);

/*
 * Binds host:port (an address literal or a name resolved with getaddrinfo)
 * and listens, non-blocking and close-on-exec, with SO_REUSEADDR. *fd_out
 * receives the socket. Returns 0 or a negative errno with err filled
 * ("cannot listen on 127.0.0.1:8010: Address already in use").
 */
int listen_tcp(const char *host, uint16_t port, int *fd_out, struct pb_error *err);

#endif
