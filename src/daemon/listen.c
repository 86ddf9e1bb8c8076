/*
 * listen.c: listening sockets from systemd, or bound from the config (see listen.h).
 */
#include <config.h>

#include "daemon/listen.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "lib/log.h"

static void listen_close_all(struct listen_fds *fds)
{
    if (fds->control >= 0)
        close(fds->control);
    if (fds->peer >= 0)
        close(fds->peer);
    fds->control = fds->peer = -1;
}

int listen_from_systemd(struct listen_fds *fds, struct pb_error *err)
{
    fds->control = fds->peer = -1;
    char **names = NULL;
    int n = sd_listen_fds_with_names(1, &names);
    if (n < 0)
        return pb_error_set(err, n, "cannot take sockets from systemd: %s", strerror(-n));
    int rc = 0;
    for (int i = 0; i < n; i++) {
        int fd = SD_LISTEN_FDS_START + i;
        const char *name = names != NULL && names[i] != NULL ? names[i] : "unknown";
        if (rc < 0) {
            close(fd);
        } else if (strcmp(name, "control") == 0) {
            if (fds->control >= 0)
                rc = pb_error_set(err, -EINVAL, "systemd passed two sockets named 'control'");
            else if (sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) <= 0)
                rc = pb_error_set(err, -EINVAL,
                                  "the socket named 'control' is not a listening Unix "
                                  "stream socket");
            if (rc < 0)
                close(fd);
            else
                fds->control = fd;
        } else if (strcmp(name, "peer") == 0) {
            if (fds->peer >= 0)
                rc = pb_error_set(err, -EINVAL, "systemd passed two sockets named 'peer'");
            else if (sd_is_socket_inet(fd, AF_UNSPEC, SOCK_STREAM, 1, 0) <= 0)
                rc = pb_error_set(err, -EINVAL,
                                  "the socket named 'peer' is not a listening TCP socket");
            if (rc < 0)
                close(fd);
            else
                fds->peer = fd;
        } else {
            log_warning("ignoring socket %d named '%s' from systemd (want 'control' or 'peer')", fd,
                        name);
            close(fd);
        }
    }
    if (names != NULL) {
        for (int i = 0; i < n; i++)
            free(names[i]);
        free(names);
    }
    if (rc < 0)
        listen_close_all(fds);
    return rc;
}

int listen_tcp(const char *host, uint16_t port, int *fd_out, struct pb_error *err)
{
    char service[8];
    snprintf(service, sizeof(service), "%u", (unsigned)port);
    struct addrinfo hints = {
            .ai_family = AF_UNSPEC,
            .ai_socktype = SOCK_STREAM,
            .ai_flags = AI_PASSIVE | AI_NUMERICSERV,
    };
    struct addrinfo *res = NULL;
    int gai = getaddrinfo(host, service, &hints, &res);
    if (gai != 0)
        return pb_error_set(err, -EINVAL, "cannot resolve peer bind address %s: %s", host,
                            gai_strerror(gai));
    int e = EADDRNOTAVAIL;
    int fd = -1;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
            bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0)
            break;
        e = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        char where[300];
        if (strchr(host, ':') != NULL)
            snprintf(where, sizeof(where), "[%s]:%u", host, (unsigned)port);
        else
            snprintf(where, sizeof(where), "%s:%u", host, (unsigned)port);
        return pb_error_set(err, -e, "cannot listen on peer address %s: %s", where, strerror(e));
    }
    *fd_out = fd;
    return 0;
}
