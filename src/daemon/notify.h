/*
 * notify.h: telling the service manager how we are (sd_notify(3)).
 *
 * Every call is a no-op when $NOTIFY_SOCKET is unset, so the daemon runs the
 * same way in the foreground. Failures to notify are logged at debug level
 * only: the service manager going away is not the daemon's problem.
 */
#ifndef PICKBOX_DAEMON_NOTIFY_H
#define PICKBOX_DAEMON_NOTIFY_H

struct event;
struct event_base;

/* READY=1 plus STATUS=status: the daemon can serve. */
void notify_ready(const char *status);

/* STATUS=status (shown by `systemctl status`). */
void notify_status(const char *status);

/* RELOADING=1: a configuration reload has begun; notify_ready() ends it. */
void notify_reloading(void);

/* STOPPING=1: shutdown has begun. */
void notify_stopping(void);

/*
 * When the unit sets WatchdogSec= (sd_watchdog_enabled() > 0), starts a
 * persistent timer on base that sends WATCHDOG=1 at half the interval and
 * returns it (the caller event_free()s it). Returns NULL when the watchdog
 * is off. The ping proves the event loop turns; once Raft is wired it should
 * also require the Raft tick to have advanced.
 */
struct event *notify_watchdog_start(struct event_base *base);

#endif
