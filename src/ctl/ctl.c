/*
 * ctl.c: the control socket server (see ctl.h for the protocol and contract).
 *
 * Each accepted client is a struct ctl_conn around a bufferevent. Lines are
 * cut out of its input buffer one at a time, with the CTL_MAX_LINE cap checked
 * before and while searching for the newline, so that a client sending an
 * endless line costs at most CTL_MAX_LINE bytes of memory and one linear scan.
 * While a request is being answered (possibly later, from another event), the
 * connection stops reading; the reply re-enables it and resumes cutting lines
 * that are already buffered through a deferred event, never by recursion.
 *
 * A connection is closed "after flush" (the reply that explains why is still
 * delivered) when the client sent a line that is too long or half-closed its
 * side; it is closed at once on a socket error, a timeout, or when the server
 * is freed. A request outliving its connection becomes an orphan: its reply
 * is dropped and its memory freed when the handler answers it.
 */
#include "config.h"

#include "ctl/ctl.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "lib/log.h"
#include "lib/util.h"

#define CTL_DEFAULT_MAX_CLIENTS  512
#define CTL_DEFAULT_IDLE_TIMEOUT 60
/* Stop processing requests while this much output waits for a slow reader. */
#define CTL_OUTPUT_HIGH (4 * CTL_MAX_LINE)
/* After accept() failed for lack of descriptors, retry after this long. */
#define CTL_ACCEPT_RETRY_MS 200
/* Supplementary groups looked at for the permission check. */
#define CTL_MAX_PEER_GROUPS 64

struct ctl_conn {
    struct ctl_server *srv;
    struct bufferevent *bev;
    struct event *resume; /* processes buffered lines after an async reply */
    struct ctl_request *pending;
    struct ctl_conn *prev, *next;
    size_t scanned;         /* bytes of input already searched for a newline */
    uint64_t partial_since; /* when the buffered partial line began; 0 = none */
    uid_t uid;
    gid_t gid;
    pid_t pid;
    bool privileged;
    bool eof;         /* the client half-closed: answer what is buffered, then close */
    bool closing;     /* close as soon as the output is flushed */
    bool stalled;     /* too much unread output: wait for the write callback */
    bool dispatching; /* inside a handler call: a reply is synchronous */
};

struct ctl_request {
    struct ctl_conn *conn; /* NULL once orphaned */
    json_t *id;
    char *method;
    uid_t uid;
    pid_t pid;
    bool privileged;
};

struct ctl_server {
    struct event_base *base;
    const struct ctl_method *methods;
    size_t n_methods;
    void *arg;
    size_t max_clients;
    unsigned idle_timeout_s;
    struct evconnlistener *listener;
    struct event *accept_retry;
    char *path; /* socket file we bound, removed on free */
    dev_t path_dev;
    ino_t path_ino;
    struct ctl_conn *conns;
    size_t n_conns;
    uint64_t refused_log_ms; /* last "refusing" log line, to log once a second */
    size_t refused;          /* refused since that line */
};

static void ctl_conn_process(struct ctl_conn *conn);
static void ctl_conn_free(struct ctl_conn *conn);

/* ---- replies ----------------------------------------------------------- */

/* Formats an error message into msg, cutting a multi-byte UTF-8 sequence that
 * truncation left incomplete (jansson refuses invalid UTF-8). */
static void ctl_format_message(char *msg, size_t size, const char *fmt, va_list ap)
        __attribute__((format(printf, 3, 0)));
static void ctl_format_message(char *msg, size_t size, const char *fmt, va_list ap)
{
    int n = vsnprintf(msg, size, fmt, ap);
    if (n < 0) {
        snprintf(msg, size, "(unprintable message)");
        return;
    }
    if ((size_t)n < size)
        return;
    size_t len = strlen(msg);
    size_t i = len;
    while (i > 0 && ((unsigned char)msg[i - 1] & 0xc0) == 0x80)
        i--; /* back over continuation bytes */
    if (i > 0 && ((unsigned char)msg[i - 1] & 0x80)) {
        unsigned char lead = (unsigned char)msg[i - 1];
        size_t need = (lead & 0xe0) == 0xc0 ? 2 : (lead & 0xf0) == 0xe0 ? 3 : 4;
        if (len - (i - 1) < need)
            msg[i - 1] = '\0';
    }
}

/* Writes one reply line (steals msg). Returns false if it could not be sent. */
static bool ctl_conn_send(struct ctl_conn *conn, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    json_decref(msg);
    if (text == NULL)
        return false;
    struct evbuffer *out = bufferevent_get_output(conn->bev);
    size_t len = strlen(text);
    int rc = evbuffer_add(out, text, len);
    if (rc == 0)
        rc = evbuffer_add(out, "\n", 1);
    free(text);
    return rc == 0;
}

static json_t *ctl_error_object(const char *code, json_t *data, const char *msg)
{
    json_t *err = json_pack("{s:s,s:s}", "code", code, "message", msg);
    if (err == NULL) /* a message with bytes that are not UTF-8 (a file name?) */
        err = json_pack("{s:s,s:s}", "code", code, "message", "(message is not valid UTF-8)");
    if (data != NULL)
        json_object_set_new(err, "data", data);
    return err;
}

/* An error for a line that never became a request (id is borrowed). */
static void ctl_conn_send_error(struct ctl_conn *conn, json_t *id, const char *code, json_t *data,
                                const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void ctl_conn_send_error(struct ctl_conn *conn, json_t *id, const char *code, json_t *data,
                                const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    ctl_format_message(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    json_t *reply = json_pack("{s:O?,s:o}", "id", id, "error", ctl_error_object(code, data, msg));
    if (!ctl_conn_send(conn, reply))
        conn->closing = true;
}

/* Ends req: sends msg (stolen) if the client is still there, frees req. */
static void ctl_request_finish(struct ctl_request *req, json_t *msg)
{
    struct ctl_conn *conn = req->conn;
    if (conn == NULL) {
        json_decref(msg);
    } else {
        assert(conn->pending == req);
        conn->pending = NULL;
        if (!ctl_conn_send(conn, msg)) {
            log_warning("ctl: cannot encode reply to %s pid=%ld", req->method, (long)req->pid);
            ctl_conn_send_error(conn, req->id, CTL_ERR_INTERNAL, NULL, "cannot encode the reply");
        }
        /* A reply from inside the handler is picked up by the processing loop;
         * a later one must restart it, from a fresh event so that the caller's
         * stack never re-enters a handler. */
        if (!conn->dispatching)
            event_active(conn->resume, EV_TIMEOUT, 0);
    }
    json_decref(req->id);
    free(req->method);
    free(req);
}

void ctl_reply_result(struct ctl_request *req, json_t *result)
{
    assert(req != NULL);
    if (result == NULL)
        result = json_object();
    json_t *msg = json_pack("{s:O?,s:o}", "id", req->id, "result", result);
    ctl_request_finish(req, msg);
}

void ctl_reply_error(struct ctl_request *req, const char *code, json_t *data, const char *fmt, ...)
{
    assert(req != NULL);
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    ctl_format_message(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    json_t *reply =
            json_pack("{s:O?,s:o}", "id", req->id, "error", ctl_error_object(code, data, msg));
    ctl_request_finish(req, reply);
}

const char *ctl_request_method(const struct ctl_request *req)
{
    return req->method;
}

uid_t ctl_request_uid(const struct ctl_request *req)
{
    return req->uid;
}

pid_t ctl_request_pid(const struct ctl_request *req)
{
    return req->pid;
}

bool ctl_request_privileged(const struct ctl_request *req)
{
    return req->privileged;
}

bool ctl_request_connected(const struct ctl_request *req)
{
    return req->conn != NULL;
}

/* ---- dispatch ---------------------------------------------------------- */

static const struct ctl_method *ctl_server_find(const struct ctl_server *srv, const char *name)
{
    for (size_t i = 0; i < srv->n_methods; i++) {
        if (strcmp(srv->methods[i].name, name) == 0)
            return &srv->methods[i];
    }
    return NULL;
}

/* Parses and dispatches one request line (len bytes, no newline). */
static void ctl_conn_dispatch(struct ctl_conn *conn, const char *line, size_t len)
{
    json_error_t jerr;
    json_t *msg = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    if (msg == NULL) {
        ctl_conn_send_error(conn, NULL, CTL_ERR_BAD_REQUEST, NULL, "invalid JSON at byte %d: %s",
                            jerr.position, jerr.text);
        return;
    }
    if (!json_is_object(msg)) {
        ctl_conn_send_error(conn, NULL, CTL_ERR_BAD_REQUEST, NULL,
                            "a request must be a JSON object");
        json_decref(msg);
        return;
    }
    json_t *id = json_object_get(msg, "id");
    if (id != NULL && (json_is_object(id) || json_is_array(id))) {
        ctl_conn_send_error(conn, NULL, CTL_ERR_BAD_REQUEST, NULL,
                            "\"id\" must be a string, a number or null");
        json_decref(msg);
        return;
    }
    const char *key;
    json_t *value;
    json_object_foreach(msg, key, value)
    {
        if (strcmp(key, "id") != 0 && strcmp(key, "method") != 0 && strcmp(key, "params") != 0) {
            ctl_conn_send_error(conn, id, CTL_ERR_BAD_REQUEST, json_pack("{s:s}", "member", key),
                                "unknown member \"%s\" in request", key);
            json_decref(msg);
            return;
        }
    }
    json_t *jmethod = json_object_get(msg, "method");
    if (!json_is_string(jmethod)) {
        ctl_conn_send_error(conn, id, CTL_ERR_BAD_REQUEST, NULL,
                            "\"method\" is missing or not a string");
        json_decref(msg);
        return;
    }
    const char *name = json_string_value(jmethod);
    if (strlen(name) != json_string_length(jmethod) || name[0] == '\0') {
        ctl_conn_send_error(conn, id, CTL_ERR_BAD_REQUEST, NULL, "\"method\" is not a name");
        json_decref(msg);
        return;
    }
    json_t *params = json_object_get(msg, "params");
    if (params != NULL && !json_is_object(params) && !json_is_null(params)) {
        ctl_conn_send_error(conn, id, CTL_ERR_INVALID_PARAMS, NULL, "\"params\" must be an object");
        json_decref(msg);
        return;
    }
    const struct ctl_method *method = ctl_server_find(conn->srv, name);
    if (method == NULL) {
        ctl_conn_send_error(conn, id, CTL_ERR_UNKNOWN_METHOD, json_pack("{s:s}", "method", name),
                            "unknown method \"%s\"", name);
        json_decref(msg);
        return;
    }
    if ((method->flags & CTL_METHOD_MUTATING) && !conn->privileged) {
        log_notice("ctl: %s refused: uid=%ld pid=%ld is not privileged", name, (long)conn->uid,
                   (long)conn->pid);
        ctl_conn_send_error(conn, id, CTL_ERR_PERMISSION_DENIED, NULL,
                            "\"%s\" needs root, the daemon's user or its group", name);
        json_decref(msg);
        return;
    }

    struct ctl_request *req = pb_xcalloc(1, sizeof(*req));
    req->conn = conn;
    req->id = json_incref(id);
    req->method = pb_xstrdup(name);
    req->uid = conn->uid;
    req->pid = conn->pid;
    req->privileged = conn->privileged;
    conn->pending = req;
    json_t *p = json_is_object(params) ? json_incref(params) : json_object();
    json_decref(msg);

    log_debug("ctl: request method=%s uid=%ld pid=%ld", req->method, (long)req->uid,
              (long)req->pid);
    conn->dispatching = true;
    method->handler(req, p, conn->srv->arg);
    conn->dispatching = false;
    json_decref(p);
}

/*
 * Cuts the next line out of the input. Returns 1 with *line (malloc'd) and
 * *len, 0 when no complete line is buffered, -1 when the line is too long.
 */
static int ctl_conn_next_line(struct ctl_conn *conn, char **line, size_t *len)
{
    struct evbuffer *in = bufferevent_get_input(conn->bev);
    size_t avail = evbuffer_get_length(in);
    if (avail == 0)
        return 0;
    if (conn->scanned > avail)
        conn->scanned = 0;

    /* Search only the bytes not searched before, and never past the cap. */
    struct evbuffer_ptr pos;
    size_t eol_len = 0;
    if (evbuffer_ptr_set(in, &pos, conn->scanned, EVBUFFER_PTR_SET) < 0)
        return 0;
    pos = evbuffer_search_eol(in, &pos, &eol_len, EVBUFFER_EOL_LF);
    size_t n;
    if (pos.pos < 0) {
        conn->scanned = avail;
        if (avail > CTL_MAX_LINE)
            return -1;
        if (!conn->eof)
            return 0;
        n = avail; /* the client is done: its last line needs no newline */
        eol_len = 0;
    } else {
        n = (size_t)pos.pos;
        if (n > CTL_MAX_LINE)
            return -1;
    }
    char *buf = pb_xmalloc(n + 1);
    evbuffer_remove(in, buf, n);
    evbuffer_drain(in, eol_len);
    buf[n] = '\0';
    conn->scanned = 0;
    conn->partial_since = 0;
    if (n > 0 && buf[n - 1] == '\r')
        buf[--n] = '\0';
    *line = buf;
    *len = n;
    return 1;
}

/* Sets what the connection waits for, from its state. Reading stays on while
 * a request is pending, only to notice a client that hangs up (its input is
 * bounded by the read watermark); the idle timeout is off meanwhile, since
 * the client is waiting for us, not idle. */
static void ctl_conn_arm(struct ctl_conn *conn)
{
    uint64_t idle_ms = (uint64_t)conn->srv->idle_timeout_s * 1000;
    struct timeval tv = {.tv_sec = conn->srv->idle_timeout_s, .tv_usec = 0};
    if (conn->closing || conn->stalled || conn->eof)
        bufferevent_disable(conn->bev, EV_READ);
    else
        bufferevent_enable(conn->bev, EV_READ);
    /* A line must arrive whole within the idle timeout of its first byte, so
     * that a client trickling a byte now and then cannot hold a slot. */
    struct timeval rtv = tv;
    if (conn->partial_since != 0) {
        uint64_t spent = pb_now_ms() - conn->partial_since;
        uint64_t left = spent < idle_ms ? idle_ms - spent : 1;
        rtv.tv_sec = (time_t)(left / 1000);
        rtv.tv_usec = (suseconds_t)(left % 1000) * 1000;
    }
    bufferevent_set_timeouts(conn->bev, conn->pending != NULL || conn->closing ? NULL : &rtv, &tv);
}

static void ctl_conn_close_after_flush(struct ctl_conn *conn)
{
    conn->closing = true;
    if (evbuffer_get_length(bufferevent_get_output(conn->bev)) == 0) {
        ctl_conn_free(conn);
        return;
    }
    /* The write callback frees it once the output is flushed; the write
     * timeout bounds how long a client that does not read can keep it. */
    ctl_conn_arm(conn);
}

/* Answers buffered lines until one waits for an async reply or none is left.
 * May free conn. */
static void ctl_conn_process(struct ctl_conn *conn)
{
    while (conn->pending == NULL && !conn->closing) {
        struct evbuffer *out = bufferevent_get_output(conn->bev);
        if (evbuffer_get_length(out) > CTL_OUTPUT_HIGH) {
            /* The client does not read its replies: wait until it does. */
            conn->stalled = true;
            break;
        }
        char *line = NULL;
        size_t len = 0;
        int rc = ctl_conn_next_line(conn, &line, &len);
        if (rc < 0) {
            log_notice("ctl: request line over %d bytes from pid=%ld, disconnecting", CTL_MAX_LINE,
                       (long)conn->pid);
            ctl_conn_send_error(conn, NULL, CTL_ERR_BAD_REQUEST, NULL,
                                "request line longer than %d bytes", CTL_MAX_LINE);
            conn->closing = true;
            break;
        }
        if (rc == 0)
            break;
        if (len > 0)
            ctl_conn_dispatch(conn, line, len);
        free(line);
    }
    if (conn->closing || (conn->eof && conn->pending == NULL && !conn->stalled)) {
        ctl_conn_close_after_flush(conn);
        return;
    }
    if (conn->pending != NULL || evbuffer_get_length(bufferevent_get_input(conn->bev)) == 0)
        conn->partial_since = 0;
    else if (conn->partial_since == 0)
        conn->partial_since = pb_now_ms();
    ctl_conn_arm(conn);
}

/* ---- connection events ------------------------------------------------- */

static void ctl_conn_read_cb(struct bufferevent *bev, void *ctx)
{
    (void)bev;
    ctl_conn_process(ctx);
}

static void ctl_conn_write_cb(struct bufferevent *bev, void *ctx)
{
    struct ctl_conn *conn = ctx;
    /* The write callback fires when the output drained to its low watermark (0). */
    if (conn->closing) {
        if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
            ctl_conn_free(conn);
        return;
    }
    if (conn->stalled) {
        conn->stalled = false;
        ctl_conn_process(conn);
    }
}

/* After EOF: did the client close both directions (POLLHUP on a Unix stream
 * socket), or only its sending side (it still waits for replies)? */
static bool ctl_peer_gone(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLOUT};
    if (poll(&pfd, 1, 0) < 0)
        return true;
    return (pfd.revents & (POLLHUP | POLLERR)) != 0;
}

static void ctl_conn_event_cb(struct bufferevent *bev, short what, void *ctx)
{
    struct ctl_conn *conn = ctx;
    if (what & BEV_EVENT_TIMEOUT) {
        log_debug("ctl: client pid=%ld idle for %us, disconnecting", (long)conn->pid,
                  conn->srv->idle_timeout_s);
        ctl_conn_free(conn);
        return;
    }
    if (what & BEV_EVENT_ERROR) {
        log_debug("ctl: client pid=%ld: %s", (long)conn->pid, strerror(errno));
        ctl_conn_free(conn);
        return;
    }
    if (what & BEV_EVENT_EOF) {
        if (conn->closing || ctl_peer_gone(bufferevent_getfd(bev))) {
            ctl_conn_free(conn);
            return;
        }
        /* Half-close: answer what was sent, then close. */
        conn->eof = true;
        ctl_conn_process(conn);
    }
}

static void ctl_conn_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    ctl_conn_process(arg);
}

static void ctl_conn_free(struct ctl_conn *conn)
{
    struct ctl_server *srv = conn->srv;
    if (conn->pending != NULL)
        conn->pending->conn = NULL; /* orphan: its handler still owns it */
    if (conn->prev != NULL)
        conn->prev->next = conn->next;
    else
        srv->conns = conn->next;
    if (conn->next != NULL)
        conn->next->prev = conn->prev;
    srv->n_conns--;
    event_free(conn->resume);
    bufferevent_free(conn->bev);
    free(conn);
}

/* Root, the daemon's own user, and members of its group may mutate. */
static bool ctl_peer_privileged(int fd, uid_t uid, gid_t gid)
{
    if (uid == 0 || uid == geteuid() || gid == getegid())
        return true;
#ifdef SO_PEERGROUPS
    gid_t groups[CTL_MAX_PEER_GROUPS];
    socklen_t len = sizeof(groups);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0) {
        for (size_t i = 0; i < len / sizeof(gid_t); i++) {
            if (groups[i] == getegid())
                return true;
        }
    }
#else
    (void)fd;
#endif
    return false;
}

/* Best effort: tells a client refused at accept why, without blocking. */
static void ctl_refuse(int fd, const char *why)
{
    char line[256];
    int n = snprintf(line, sizeof(line),
                     "{\"id\":null,\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}\n", CTL_ERR_BUSY,
                     why);
    if (n > 0 && (size_t)n < sizeof(line)) {
        ssize_t w = send(fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)w;
    }
    close(fd);
}

static void ctl_accept_cb(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa,
                          int socklen, void *arg)
{
    struct ctl_server *srv = arg;
    (void)lev;
    (void)sa;
    (void)socklen;

    if (srv->n_conns >= srv->max_clients) {
        srv->refused++;
        uint64_t now = pb_now_ms();
        if (srv->refused_log_ms == 0 || now - srv->refused_log_ms >= 1000) {
            log_warning("ctl: %zu clients connected, refused %zu more", srv->n_conns, srv->refused);
            srv->refused_log_ms = now;
            srv->refused = 0;
        }
        ctl_refuse(fd, "too many control clients");
        return;
    }
    struct ucred cred = {.pid = 0, .uid = (uid_t)-1, .gid = (gid_t)-1};
    socklen_t clen = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0)
        log_warning("ctl: SO_PEERCRED: %s", strerror(errno));

    struct bufferevent *bev = bufferevent_socket_new(srv->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (bev == NULL) {
        log_warning("ctl: cannot set up a client connection");
        close(fd);
        return;
    }
    struct ctl_conn *conn = pb_xcalloc(1, sizeof(*conn));
    conn->srv = srv;
    conn->bev = bev;
    conn->uid = cred.uid;
    conn->gid = cred.gid;
    conn->pid = cred.pid;
    conn->privileged = ctl_peer_privileged(fd, cred.uid, cred.gid);
    conn->resume = event_new(srv->base, -1, 0, ctl_conn_resume_cb, conn);
    conn->next = srv->conns;
    if (srv->conns != NULL)
        srv->conns->prev = conn;
    srv->conns = conn;
    srv->n_conns++;

    /* Never buffer much more than one maximal line of input. */
    bufferevent_setwatermark(bev, EV_READ, 0, CTL_MAX_LINE + 2);
    bufferevent_setcb(bev, ctl_conn_read_cb, ctl_conn_write_cb, ctl_conn_event_cb, conn);
    bufferevent_enable(bev, EV_WRITE);
    ctl_conn_arm(conn);
    log_debug("ctl: client connected uid=%ld pid=%ld clients=%zu", (long)conn->uid, (long)conn->pid,
              srv->n_conns);
}

static void ctl_accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct ctl_server *srv = arg;
    (void)fd;
    (void)what;
    if (srv->listener != NULL)
        evconnlistener_enable(srv->listener);
}

static void ctl_accept_error_cb(struct evconnlistener *lev, void *arg)
{
    struct ctl_server *srv = arg;
    int e = EVUTIL_SOCKET_ERROR();
    if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
        /* Out of descriptors: the pending connection stays in the backlog and
         * would wake us up again at once. Pause accepting for a moment. */
        log_warning("ctl: accept: %s; pausing for %d ms", strerror(e), CTL_ACCEPT_RETRY_MS);
        evconnlistener_disable(lev);
        struct timeval tv = {.tv_sec = 0, .tv_usec = CTL_ACCEPT_RETRY_MS * 1000};
        evtimer_add(srv->accept_retry, &tv);
        return;
    }
    log_warning("ctl: accept: %s", strerror(e));
}

/* ---- server ------------------------------------------------------------ */

struct ctl_server *ctl_server_new(struct event_base *base, const struct ctl_method *methods,
                                  size_t n, void *arg, const struct ctl_options *opts)
{
    struct ctl_server *srv = pb_xcalloc(1, sizeof(*srv));
    srv->base = base;
    srv->methods = methods;
    srv->n_methods = n;
    srv->arg = arg;
    srv->max_clients = CTL_DEFAULT_MAX_CLIENTS;
    srv->idle_timeout_s = CTL_DEFAULT_IDLE_TIMEOUT;
    if (opts != NULL && opts->max_clients > 0)
        srv->max_clients = opts->max_clients;
    if (opts != NULL && opts->idle_timeout_s > 0)
        srv->idle_timeout_s = opts->idle_timeout_s;
    srv->accept_retry = evtimer_new(base, ctl_accept_retry_cb, srv);
    if (srv->accept_retry == NULL) {
        log_err("ctl: cannot create a timer");
        abort();
    }
    return srv;
}

int ctl_server_listen_fd(struct ctl_server *srv, int fd)
{
    if (srv->listener != NULL)
        return -EBUSY;
    if (fd < 0)
        return -EBADF;
    if (evutil_make_socket_nonblocking(fd) < 0 || evutil_make_socket_closeonexec(fd) < 0) {
        int e = errno;
        return e > 0 ? -e : -EINVAL;
    }
    /* backlog 0: the socket is already listening (systemd, or us). */
    srv->listener = evconnlistener_new(srv->base, ctl_accept_cb, srv, LEV_OPT_CLOSE_ON_FREE, 0, fd);
    if (srv->listener == NULL)
        return -ENOMEM;
    evconnlistener_set_error_cb(srv->listener, ctl_accept_error_cb);
    return 0;
}

/* Is somebody accepting on the Unix socket at path? 1 yes, 0 no (stale), <0 error. */
static int ctl_socket_alive(const struct sockaddr_un *sun)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int rc = connect(fd, (const struct sockaddr *)sun, sizeof(*sun));
    int e = errno;
    close(fd);
    if (rc == 0)
        return 1;
    if (e == ECONNREFUSED)
        return 0;
    return -e;
}

int ctl_server_listen_path(struct ctl_server *srv, const char *path, mode_t mode)
{
    if (srv->listener != NULL)
        return -EBUSY;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sun.sun_path))
        return -ENAMETOOLONG;
    strcpy(sun.sun_path, path);

    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return -EEXIST; /* never remove something that is not a socket */
        int alive = ctl_socket_alive(&sun);
        if (alive > 0)
            return -EADDRINUSE;
        if (alive < 0 && alive != -ENOENT)
            return alive;
        if (unlink(path) < 0 && errno != ENOENT)
            return -errno;
    } else if (errno != ENOENT) {
        return -errno;
    }

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    /* Fix the mode before listen(): until then nobody can connect. */
    if (chmod(path, mode) < 0 || lstat(path, &st) < 0 || listen(fd, SOMAXCONN) < 0) {
        int e = errno;
        close(fd);
        unlink(path);
        return -e;
    }
    int rc = ctl_server_listen_fd(srv, fd);
    if (rc < 0) {
        close(fd);
        unlink(path);
        return rc;
    }
    srv->path = pb_xstrdup(path);
    srv->path_dev = st.st_dev;
    srv->path_ino = st.st_ino;
    return 0;
}

void ctl_server_free(struct ctl_server *srv)
{
    if (srv == NULL)
        return;
    while (srv->conns != NULL)
        ctl_conn_free(srv->conns);
    if (srv->listener != NULL)
        evconnlistener_free(srv->listener);
    if (srv->path != NULL) {
        /* Remove the file only if it is still ours (not a successor's). */
        struct stat st;
        if (lstat(srv->path, &st) == 0 && st.st_dev == srv->path_dev && st.st_ino == srv->path_ino)
            unlink(srv->path);
        free(srv->path);
    }
    event_free(srv->accept_retry);
    free(srv);
}

size_t ctl_server_clients(const struct ctl_server *srv)
{
    return srv->n_conns;
}
