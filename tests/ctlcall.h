/*
 * ctlcall.h: a test helper shared by the daemon's Check suites: one request
 * over a control socket, answered by a daemon whose event loop the test runs.
 */
#ifndef PICKBOX_TESTS_CTLCALL_H
#define PICKBOX_TESTS_CTLCALL_H

#include <event2/event.h>
#include <jansson.h>

/* Connects to the Unix socket at path, writes line (which ends in '\n'), and
 * runs base without blocking until one reply line arrives (10 s at most,
 * failing the test otherwise). Returns the parsed reply; the caller owns it. */
json_t *ctlcall(struct event_base *base, const char *path, const char *line);

#endif
