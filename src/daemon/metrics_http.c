/*
 * metrics_http.c: GET /metrics over HTTP (see metrics_http.h): a listener
 * and the few lines of HTTP/1.1 a scraper needs, on bufferevents.
 *
 * Not evhttp: libevent 2.1 (Debian 12) has no connection cap
 * (evhttp_set_max_connections() came with 2.2) and tells its user nothing
 * when a connection that never sent a request goes away, so the connections
 * could be neither counted nor capped. Owning them makes the cap exact and
 * costs one request line and a header terminator to parse: every request is
 * answered once, with Connection: close.
 */
#include <config.h>

#include "daemon/metrics_http.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "daemon/listen.h"
#include "daemon/metrics.h"
#include "lib/log.h"
#include "lib/util.h"

#define METRICS_HTTP_ACCEPT_RETRY_S 1 /* after accept() fails (EMFILE...) */
#define METRICS_HTTP_FULL_LOG_MS    60000

struct metrics_http_conn {
    struct metrics_http *h;
    struct metrics_http_conn *prev, *next;
    struct bufferevent *bev;
    struct event *deadline; /* the whole exchange, METRICS_HTTP_TIMEOUT_S */
    bool replied;           /* then only waiting for the client to close */
    bool client_done;       /* EOF seen before the reply was written out */
};

struct metrics_http {
    struct event_base *base;
    struct evconnlistener *listener;
    struct event *retry; /* re-enables accepting after an accept() error */
    bool accept_error;   /* retry is pending */
    bool accepting;      /* the listener is enabled */
    struct daemon *d;
    struct metrics_http_conn *conns;
    unsigned n_conns;
    uint64_t full_logged_ms;
};

/* The listener accepts unless the connections are at the cap or an accept
 * error is being waited out. */
static void metrics_http_update_listener(struct metrics_http *h)
{
    bool want = h->n_conns < METRICS_HTTP_MAX_CONNECTIONS && !h->accept_error;
    if (want == h->accepting)
        return;
    if (want)
        evconnlistener_enable(h->listener);
    else
        evconnlistener_disable(h->listener);
    h->accepting = want;
}

static void metrics_http_conn_free(struct metrics_http_conn *c)
{
    struct metrics_http *h = c->h;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    h->n_conns--;
    bufferevent_free(c->bev);
    event_free(c->deadline);
    free(c);
}

static void metrics_http_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct metrics_http_conn *c = arg;
    struct metrics_http *h = c->h;
    metrics_http_conn_free(c);
    metrics_http_update_listener(h);
}

/* The reply is written: close our side and wait for the client's EOF
 * (reading and dropping what it still sends), so that unread request bytes
 * never turn our close into a reset that could destroy the reply. */
static void metrics_http_on_written(struct bufferevent *bev, void *arg)
{
    struct metrics_http_conn *c = arg;
    if (c->client_done) {
        struct metrics_http *h = c->h;
        metrics_http_conn_free(c);
        metrics_http_update_listener(h);
        return;
    }
    shutdown(bufferevent_getfd(bev), SHUT_WR);
}

static void metrics_http_on_read(struct bufferevent *bev, void *arg);
static void metrics_http_on_event(struct bufferevent *bev, short what, void *arg);

/* Queues the whole answer; extra is more header lines ("" or CRLF-ended). */
static void metrics_http_reply(struct metrics_http_conn *c, int code, const char *reason,
                               const char *extra, const char *type, const char *body, size_t len)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    evbuffer_add_printf(out,
                        "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\n%s\r\n",
                        code, reason, type, len, extra);
    evbuffer_add(out, body, len);
    c->replied = true;
    bufferevent_setcb(c->bev, metrics_http_on_read, metrics_http_on_written, metrics_http_on_event,
                      c);
}

static void metrics_http_reply_text(struct metrics_http_conn *c, int code, const char *reason,
                                    const char *extra)
{
    char body[64];
    int n = snprintf(body, sizeof(body), "%d %s\n", code, reason);
    metrics_http_reply(c, code, reason, extra, "text/plain; charset=utf-8", body, (size_t)n);
}

/* Answers the request whose line is line (the head is complete). */
static void metrics_http_answer(struct metrics_http_conn *c, char *line)
{
    /* METHOD SP request-target SP HTTP/1.x */
    char *target = strchr(line, ' ');
    char *version = target ? strchr(target + 1, ' ') : NULL;
    if (target == NULL || version == NULL || target == line ||
        (strcmp(version + 1, "HTTP/1.1") != 0 && strcmp(version + 1, "HTTP/1.0") != 0)) {
        metrics_http_reply_text(c, 400, "Bad Request", "");
        return;
    }
    *target++ = '\0';
    *version = '\0';
    size_t path_len = strcspn(target, "?#");
    if (path_len != strlen("/metrics") || memcmp(target, "/metrics", path_len) != 0) {
        metrics_http_reply_text(c, 404, "Not Found", "");
        return;
    }
    if (strcmp(line, "GET") != 0) {
        metrics_http_reply_text(c, 405, "Method Not Allowed", "Allow: GET\r\n");
        return;
    }
    size_t len;
    char *text = metrics_render(c->h->d, &len);
    metrics_http_reply(c, 200, "OK", "", METRICS_CONTENT_TYPE, text, len);
    free(text);
}

static void metrics_http_on_read(struct bufferevent *bev, void *arg)
{
    struct metrics_http_conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    if (c->replied) {
        evbuffer_drain(in, evbuffer_get_length(in));
        return;
    }
    /* The head ends with an empty line; a body is never needed (only GET is
     * served) and is dropped with the rest. */
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0) {
        if (evbuffer_get_length(in) > METRICS_HTTP_MAX_HEADERS)
            metrics_http_reply_text(c, 431, "Request Header Fields Too Large", "");
        return;
    }
    if ((size_t)end.pos + 4 > METRICS_HTTP_MAX_HEADERS) {
        metrics_http_reply_text(c, 431, "Request Header Fields Too Large", "");
        return;
    }
    size_t n;
    char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF_STRICT);
    if (line == NULL || n != strlen(line))
        metrics_http_reply_text(c, 400, "Bad Request", "");
    else
        metrics_http_answer(c, line);
    free(line);
    evbuffer_drain(in, evbuffer_get_length(in));
}

static void metrics_http_on_event(struct bufferevent *bev, short what, void *arg)
{
    struct metrics_http_conn *c = arg;
    struct metrics_http *h = c->h;
    /* A client that half-closes after its request (printf ... | nc) still
     * gets the reply: finish writing it first. Otherwise EOF or an error
     * ends the exchange. */
    if ((what & BEV_EVENT_EOF) && !(what & BEV_EVENT_ERROR) && c->replied &&
        evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
        c->client_done = true;
        bufferevent_disable(bev, EV_READ);
        return;
    }
    metrics_http_conn_free(c);
    metrics_http_update_listener(h);
}

static void metrics_http_on_accept(struct evconnlistener *l, evutil_socket_t fd,
                                   struct sockaddr *sa, int socklen, void *arg)
{
    (void)l;
    (void)sa;
    (void)socklen;
    struct metrics_http *h = arg;
    if (h->n_conns >= METRICS_HTTP_MAX_CONNECTIONS) {
        close(fd); /* accepted in the same batch as the one that filled up */
        return;
    }
    struct metrics_http_conn *c = pb_xcalloc(1, sizeof(*c));
    c->h = h;
    c->bev = bufferevent_socket_new(h->base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->deadline = evtimer_new(h->base, metrics_http_on_deadline, c);
    if (c->bev == NULL || c->deadline == NULL) {
        if (c->bev != NULL)
            bufferevent_free(c->bev);
        else
            close(fd);
        if (c->deadline != NULL)
            event_free(c->deadline);
        free(c);
        return;
    }
    struct timeval tv = {.tv_sec = METRICS_HTTP_TIMEOUT_S};
    evtimer_add(c->deadline, &tv);
    bufferevent_setcb(c->bev, metrics_http_on_read, NULL, metrics_http_on_event, c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    c->next = h->conns;
    if (h->conns)
        h->conns->prev = c;
    h->conns = c;
    if (++h->n_conns >= METRICS_HTTP_MAX_CONNECTIONS) {
        uint64_t now = pb_now_ms();
        if (h->full_logged_ms == 0 || now - h->full_logged_ms >= METRICS_HTTP_FULL_LOG_MS) {
            h->full_logged_ms = now;
            log_warning("metrics listener: %u connections open, accepting no more until one "
                        "closes",
                        h->n_conns);
        }
    }
    metrics_http_update_listener(h);
}

static void metrics_http_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct metrics_http *h = arg;
    h->accept_error = false;
    metrics_http_update_listener(h);
}

/* accept() failed: out of descriptors or memory, most likely. The listening
 * socket stays readable, so pause instead of spinning. */
static void metrics_http_on_accept_error(struct evconnlistener *l, void *arg)
{
    (void)l;
    struct metrics_http *h = arg;
    int e = EVUTIL_SOCKET_ERROR();
    log_warning("metrics listener: accept: %s; pausing %d s", strerror(e),
                METRICS_HTTP_ACCEPT_RETRY_S);
    h->accept_error = true;
    metrics_http_update_listener(h);
    struct timeval tv = {.tv_sec = METRICS_HTTP_ACCEPT_RETRY_S};
    evtimer_add(h->retry, &tv);
}

int metrics_http_start(struct metrics_http **out, struct event_base *base, const char *hostport,
                       struct daemon *d, struct pb_error *err)
{
    *out = NULL;
    char host[256];
    uint16_t port;
    if (pb_split_host_port(hostport, host, sizeof(host), &port) < 0)
        return pb_error_set(err, -EINVAL, "metrics_listen %s: expected HOST:PORT", hostport);
    int fd = -1;
    struct pb_error lerr;
    pb_error_clear(&lerr);
    int rc = listen_tcp(host, port, &fd, &lerr);
    if (rc < 0)
        return pb_error_set(err, rc, "cannot listen on metrics address %s: %s", hostport,
                            rc == -EINVAL ? lerr.msg : strerror(-rc));
    struct metrics_http *h = pb_xcalloc(1, sizeof(*h));
    h->base = base;
    h->d = d;
    h->retry = evtimer_new(base, metrics_http_on_retry, h);
    /* backlog 0: listen_tcp() already listens. */
    h->listener = h->retry == NULL ? NULL
                                   : evconnlistener_new(base, metrics_http_on_accept, h,
                                                        LEV_OPT_CLOSE_ON_FREE, 0, fd);
    if (h->listener == NULL) {
        close(fd);
        metrics_http_free(h);
        return pb_error_set(err, -ENOMEM, "cannot serve metrics on %s", hostport);
    }
    h->accepting = true;
    evconnlistener_set_error_cb(h->listener, metrics_http_on_accept_error);
    log_info("serving metrics on http://%s/metrics", hostport);
    *out = h;
    return 0;
}

void metrics_http_free(struct metrics_http *h)
{
    if (h == NULL)
        return;
    while (h->conns != NULL)
        metrics_http_conn_free(h->conns);
    if (h->listener != NULL)
        evconnlistener_free(h->listener);
    if (h->retry != NULL)
        event_free(h->retry);
    free(h);
}
