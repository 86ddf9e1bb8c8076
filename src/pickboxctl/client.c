/*
 * client.c: socket resolution and the one-request, one-reply exchange of
 * pickboxctl (see client.h). Everything blocks, bounded by poll() deadlines.
 */
#include "config.h"

#include "pickboxctl/client.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl/ctl.h"
#include "daemon/nodeconf.h"
#include "lib/util.h"

int pbctl_socket_resolve(const char *socket_opt, const char *node_opt, const char *env_socket,
                         const char *run_dir, char **path, struct pb_error *err)
{
    *path = NULL;
    if (run_dir == NULL)
        run_dir = PBCTL_RUN_DIR;
    if (socket_opt != NULL && node_opt != NULL)
        return pb_error_set(err, -EINVAL, "use either -s PATH or -n NAME, not both");
    if (socket_opt != NULL) {
        if (socket_opt[0] == '\0')
            return pb_error_set(err, -EINVAL, "-s: empty socket path");
        *path = pb_xstrdup(socket_opt);
        return 0;
    }
    if (node_opt != NULL) {
        if (!config_node_id_valid(node_opt))
            return pb_error_set(err, -EINVAL,
                                "-n: bad node name '%.64s' (1-64 of A-Z a-z 0-9 . _ -, not "
                                "starting with '.' or '-')",
                                node_opt);
        *path = pb_xasprintf("%s/%s/control.sock", run_dir, node_opt);
        return 0;
    }
    if (env_socket != NULL && env_socket[0] != '\0') {
        *path = pb_xstrdup(env_socket);
        return 0;
    }
    char *pattern = pb_xasprintf("%s/*/control.sock", run_dir);
    glob_t g;
    memset(&g, 0, sizeof(g));
    int rc = glob(pattern, GLOB_NOSORT | GLOB_NOESCAPE, NULL, &g);
    free(pattern);
    if (rc == 0 && g.gl_pathc == 1) {
        *path = pb_xstrdup(g.gl_pathv[0]);
        globfree(&g);
        return 0;
    }
    if (rc != 0 || g.gl_pathc == 0) {
        globfree(&g);
        return pb_error_set(err, -EINVAL,
                            "no control socket found in %s; choose one with -s PATH or -n NAME "
                            "(or set PICKBOX_SOCKET)",
                            run_dir);
    }
    size_t n = g.gl_pathc;
    globfree(&g);
    return pb_error_set(err, -EINVAL,
                        "%zu nodes run here (%s/*/control.sock); choose one with -n NAME or "
                        "-s PATH",
                        n, run_dir);
}

/* "pickboxd@NODE" when path is <run_dir>/NODE/control.sock, else "pickboxd". */
static void unit_hint(const char *path, const char *run_dir, char *buf, size_t len)
{
    size_t rl = strlen(run_dir);
    const char *tail = "/control.sock";
    size_t pl = strlen(path), tl = strlen(tail);
    snprintf(buf, len, "pickboxd");
    if (pl <= rl + 1 + tl || strncmp(path, run_dir, rl) != 0 || path[rl] != '/' ||
        strcmp(path + pl - tl, tail) != 0)
        return;
    const char *node = path + rl + 1;
    size_t nl = pl - tl - rl - 1;
    if (memchr(node, '/', nl) != NULL)
        return;
    snprintf(buf, len, "pickboxd@%.*s", (int)nl, node);
}

int pbctl_connect(const char *path, const char *run_dir, int timeout_ms, struct pb_error *err)
{
    char hint[128];
    unit_hint(path, run_dir ? run_dir : PBCTL_RUN_DIR, hint, sizeof(hint));
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa.sun_path))
        return pb_error_set(err, -ENAMETOOLONG,
                            "cannot connect to %s: socket path too long (max %zu bytes)", path,
                            sizeof(sa.sun_path) - 1);
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return pb_error_set(err, -errno, "cannot create a socket: %s", strerror(errno));
    /* A Unix stream connect blocks while the listener's backlog is full;
     * SO_SNDTIMEO bounds that wait (af_unix uses the send timeout for it). */
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    if (timeout_ms > 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    int rc;
    do {
        rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int e = errno;
        close(fd);
        if (e == EAGAIN || e == EWOULDBLOCK)
            return pb_error_set(err, -ETIMEDOUT,
                                "cannot connect to %s: not accepting connections within %d ms "
                                "(is %s stuck?)",
                                path, timeout_ms, hint);
        return pb_error_set(err, -e, "cannot connect to %s: %s (is %s running?)", path, strerror(e),
                            hint);
    }
    struct timeval none = {0, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
    return fd;
}

/* Waits until fd is ready for events or deadline (pb_now_ms) passes. */
static int wait_ready(int fd, short events, uint64_t deadline)
{
    for (;;) {
        uint64_t now = pb_now_ms();
        if (now >= deadline)
            return -ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = events};
        uint64_t left = deadline - now;
        int r = poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -ETIMEDOUT;
        return 0;
    }
}

static int send_all(int fd, const char *data, size_t len, uint64_t deadline, int timeout_ms,
                    struct pb_error *err)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (n >= 0) {
            off += (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int rc = wait_ready(fd, POLLOUT, deadline);
            if (rc == -ETIMEDOUT)
                return pb_error_set(err, rc, "timed out after %d ms sending the request",
                                    timeout_ms);
            if (rc < 0)
                return pb_error_set(err, rc, "poll: %s", strerror(-rc));
            continue;
        }
        if (errno == EPIPE || errno == ECONNRESET)
            return pb_error_set(err, -ECONNRESET,
                                "pickboxd closed the connection before the request was sent");
        return pb_error_set(err, -errno, "cannot send the request: %s", strerror(errno));
    }
    return 0;
}

/* Reads one line (without its newline) into *line and *len. */
static int read_line(int fd, uint64_t deadline, int timeout_ms, char **line, size_t *len,
                     struct pb_error *err)
{
    size_t cap = 4096, used = 0;
    char *buf = pb_xmalloc(cap);
    int rc;
    for (;;) {
        if (used == cap) {
            cap = PB_MIN(cap * 2, (size_t)CTL_MAX_LINE + 2);
            buf = pb_xrealloc(buf, cap);
        }
        ssize_t n = recv(fd, buf + used, cap - used, 0);
        if (n > 0) {
            char *nl = memchr(buf + used, '\n', (size_t)n);
            used += (size_t)n;
            if (nl != NULL) {
                *len = (size_t)(nl - buf);
                if (*len > CTL_MAX_LINE)
                    break;
                *nl = '\0';
                *line = buf;
                return 0;
            }
            if (used > CTL_MAX_LINE)
                break;
            continue;
        }
        if (n == 0) {
            free(buf);
            return pb_error_set(err, -ECONNRESET,
                                used ? "pickboxd closed the connection in the middle of a reply"
                                     : "pickboxd closed the connection without replying");
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            int e = errno;
            free(buf);
            return pb_error_set(err, -e, "cannot read the reply: %s", strerror(e));
        }
        rc = wait_ready(fd, POLLIN, deadline);
        if (rc < 0) {
            free(buf);
            if (rc == -ETIMEDOUT)
                return pb_error_set(err, rc, "no reply from pickboxd within %d ms", timeout_ms);
            return pb_error_set(err, rc, "poll: %s", strerror(-rc));
        }
    }
    free(buf);
    return pb_error_set(err, -EMSGSIZE, "bad reply from pickboxd: longer than %d bytes",
                        CTL_MAX_LINE);
}

/* Checks the reply's shape (ctl.h). */
static int reply_check(const json_t *reply, struct pb_error *err)
{
    if (!json_is_object(reply))
        return pb_error_set(err, -EBADMSG, "bad reply from pickboxd: not a JSON object");
    const json_t *id = json_object_get(reply, "id");
    if (!json_is_integer(id) || json_integer_value(id) != 1)
        return pb_error_set(err, -EBADMSG, "bad reply from pickboxd: missing or unexpected \"id\"");
    const json_t *result = json_object_get(reply, "result");
    const json_t *error = json_object_get(reply, "error");
    if ((result == NULL) == (error == NULL))
        return pb_error_set(err, -EBADMSG,
                            "bad reply from pickboxd: expected exactly one of \"result\" and "
                            "\"error\"");
    if (result != NULL && !json_is_object(result))
        return pb_error_set(err, -EBADMSG, "bad reply from pickboxd: \"result\" is not an object");
    if (error != NULL &&
        (!json_is_object(error) || !json_is_string(json_object_get(error, "code")) ||
         !json_is_string(json_object_get(error, "message"))))
        return pb_error_set(err, -EBADMSG,
                            "bad reply from pickboxd: \"error\" lacks a string code and message");
    return 0;
}

int pbctl_request(int fd, const char *method, const json_t *params, int timeout_ms, json_t **reply,
                  struct pb_error *err)
{
    *reply = NULL;
    uint64_t deadline = pb_now_ms() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return pb_error_set(err, -errno, "fcntl: %s", strerror(errno));

    json_t *req = json_object();
    json_object_set_new(req, "id", json_integer(1));
    json_object_set_new(req, "method", json_string(method));
    json_object_set_new(req, "params", params ? json_deep_copy(params) : json_object());
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    if (text == NULL)
        return pb_error_set(err, -ENOMEM, "cannot encode the request");
    size_t tl = strlen(text);
    char *line = pb_xmalloc(tl + 2);
    memcpy(line, text, tl);
    line[tl] = '\n';
    line[tl + 1] = '\0';
    free(text);
    int rc = send_all(fd, line, tl + 1, deadline, timeout_ms, err);
    free(line);
    if (rc < 0)
        return rc;

    char *buf = NULL;
    size_t len = 0;
    if ((rc = read_line(fd, deadline, timeout_ms, &buf, &len, err)) < 0)
        return rc;
    json_error_t jerr;
    json_t *r = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    free(buf);
    if (r == NULL)
        return pb_error_set(err, -EBADMSG, "bad reply from pickboxd: not JSON (%s)", jerr.text);
    if ((rc = reply_check(r, err)) < 0) {
        json_decref(r);
        return rc;
    }
    *reply = r;
    return 0;
}
