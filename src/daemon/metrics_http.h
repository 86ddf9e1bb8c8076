/*
 * metrics_http.h: the optional HTTP endpoint for Prometheus (metrics_listen
 * in the configuration; off by default).
 *
 * HTTP/1.1 on the daemon's loop, one request per connection (Connection:
 * close). GET /metrics answers 200 with metrics_render() and Content-Type
 * METRICS_CONTENT_TYPE; another path is 404, another method on /metrics 405
 * (Allow: GET), a malformed request line 400, a head over
 * METRICS_HTTP_MAX_HEADERS bytes 431; a request body is read and dropped.
 * A connection is closed METRICS_HTTP_TIMEOUT_S seconds after it was
 * accepted, whatever its client does, and at most
 * METRICS_HTTP_MAX_CONNECTIONS are open at once: then the listener accepts
 * no more until one closes (the others wait in the kernel's backlog). So a
 * bad client costs a few sockets for a while, never the loop nor the
 * daemon's file descriptors.
 *
 * Threading: event loop thread only.
 */
#ifndef PICKBOX_DAEMON_METRICS_HTTP_H
#define PICKBOX_DAEMON_METRICS_HTTP_H

#include "lib/error.h"

struct daemon;
struct event_base;
struct metrics_http;

#define METRICS_HTTP_MAX_HEADERS 8192
#define METRICS_HTTP_TIMEOUT_S   10
/* A Prometheus server scrapes over one connection; a few are plenty. */
#define METRICS_HTTP_MAX_CONNECTIONS 32

/* Listens on "host:port" and serves d's metrics
 * (d is borrowed and must outlive the listener). Returns 0, or a negative
 * errno with err naming the address ("cannot listen on metrics address
 * 127.0.0.1:9101: Address already in use"). */
int metrics_http_start(struct metrics_http **out, struct event_base *base, const char *hostport,
                       struct daemon *d, struct pb_error *err);

/* Closes the listener and every connection. NULL is a no-op. */
void metrics_http_free(struct metrics_http *h);

#endif
