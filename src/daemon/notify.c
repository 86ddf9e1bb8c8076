/*
 * notify.c: sd_notify(3) messages and the watchdog timer (see notify.h).
 */
#include <config.h>

#include "daemon/notify.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <event2/event.h>
#include <systemd/sd-daemon.h>

#include "lib/log.h"

static void notify_send(const char *msg)
{
    int rc = sd_notify(0, msg);
    if (rc < 0)
        log_debug("sd_notify: %s", strerror(-rc));
}

void notify_ready(const char *status)
{
    char msg[600];
    snprintf(msg, sizeof(msg), "READY=1\nSTATUS=%s", status);
    notify_send(msg);
}

void notify_status(const char *status)
{
    char msg[600];
    snprintf(msg, sizeof(msg), "STATUS=%s", status);
    notify_send(msg);
}

void notify_reloading(void)
{
    notify_send("RELOADING=1");
}

void notify_stopping(void)
{
    notify_send("STOPPING=1");
}

static void notify_watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    notify_send("WATCHDOG=1");
}

struct event *notify_watchdog_start(struct event_base *base)
{
    uint64_t usec = 0;
    int rc = sd_watchdog_enabled(0, &usec);
    if (rc < 0)
        log_warning("systemd watchdog settings unreadable: %s", strerror(-rc));
    if (rc <= 0 || usec == 0)
        return NULL;
    uint64_t half = usec / 2;
    struct timeval tv = {.tv_sec = (time_t)(half / 1000000),
                         .tv_usec = (suseconds_t)(half % 1000000)};
    struct event *ev = event_new(base, -1, EV_PERSIST, notify_watchdog_cb, NULL);
    if (ev == NULL || event_add(ev, &tv) < 0) {
        log_warning("cannot start the watchdog timer");
        if (ev != NULL)
            event_free(ev);
        return NULL;
    }
    notify_send("WATCHDOG=1");
    log_info("watchdog on: pinging every %llu ms", (unsigned long long)(half / 1000));
    return ev;
}
