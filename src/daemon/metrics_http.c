/*
 * metrics_http.c: GET /metrics over HTTP with libevent's evhttp (see
 * metrics_http.h). Kept apart from metrics.c so that only pickboxd links
 * libevent_extra.
 */
#include <config.h>

#include "daemon/metrics_http.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/http.h>

#include "daemon/listen.h"
#include "daemon/metrics.h"
#include "lib/log.h"
#include "lib/util.h"

struct metrics_http {
    struct evhttp *http;
    struct daemon *d;
};

/* A short text/plain answer. (evhttp_send_error() would drop our headers,
 * Allow among them.) */
static void metrics_http_reply(struct evhttp_request *req, int code, const char *reason)
{
    struct evbuffer *body = evbuffer_new();
    if (body != NULL)
        evbuffer_add_printf(body, "%d %s\n", code, reason);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "text/plain; charset=utf-8");
    evhttp_send_reply(req, code, reason, body);
    if (body != NULL)
        evbuffer_free(body);
}

static void metrics_http_on_request(struct evhttp_request *req, void *arg)
{
    struct metrics_http *h = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri != NULL ? evhttp_uri_get_path(uri) : NULL;
    if (path == NULL || strcmp(path, "/metrics") != 0) {
        metrics_http_reply(req, HTTP_NOTFOUND, "Not Found");
        return;
    }
    if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET");
        metrics_http_reply(req, 405, "Method Not Allowed");
        return;
    }
    size_t len;
    char *text = metrics_render(h->d, &len);
    struct evbuffer *body = evbuffer_new();
    /* A copy: evhttp_send_reply() moves the buffer's chains into the
     * output, so a reference to text would outlive text. */
    if (body == NULL || evbuffer_add(body, text, len) < 0) {
        if (body != NULL)
            evbuffer_free(body);
        free(text);
        metrics_http_reply(req, HTTP_INTERNAL, "Internal Server Error");
        return;
    }
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", METRICS_CONTENT_TYPE);
    evhttp_send_reply(req, HTTP_OK, "OK", body);
    evbuffer_free(body);
    free(text);
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
    h->d = d;
    h->http = evhttp_new(base);
    if (h->http == NULL) {
        close(fd);
        free(h);
        return pb_error_set(err, -ENOMEM, "cannot serve metrics: evhttp_new failed");
    }
    if (evhttp_accept_socket_with_handle(h->http, fd) == NULL) {
        /* Whether fd was closed depends on where libevent failed: leak it
         * rather than risk closing a descriptor reused meanwhile. */
        metrics_http_free(h);
        return pb_error_set(err, -EIO, "cannot serve metrics on %s", hostport);
    }
    /* Every method reaches the callback (which answers 405), not evhttp's 501. */
    evhttp_set_allowed_methods(h->http, UINT16_MAX);
    evhttp_set_max_headers_size(h->http, METRICS_HTTP_MAX_HEADERS);
    evhttp_set_max_body_size(h->http, METRICS_HTTP_MAX_BODY);
    evhttp_set_timeout(h->http, METRICS_HTTP_TIMEOUT_S);
    evhttp_set_gencb(h->http, metrics_http_on_request, h);

    log_info("serving metrics on http://%s/metrics", hostport);
    *out = h;
    return 0;
}

void metrics_http_free(struct metrics_http *h)
{
    if (h == NULL)
        return;
    if (h->http != NULL)
        evhttp_free(h->http);
    free(h);
}
