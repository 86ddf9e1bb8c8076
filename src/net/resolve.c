/*
 * resolve.c: host names to addresses off the event loop (see resolve.h).
 *
 * One detached thread per lookup runs getaddrinfo() and writes an eventfd
 * that the loop watches. The request is shared by the loop and the thread
 * and counted (refs): the loop lets go when the answer is delivered or the
 * lookup cancelled, the thread when it has written its answer; the last one
 * frees it and closes the eventfd, so the thread never writes to a
 * descriptor that was closed (and maybe reused) under it.
 */
#include <config.h>

#include "net/resolve.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>

#include "lib/util.h"

struct net_resolve {
    atomic_int refs;
    atomic_bool done; /* the thread's answer below is written */
    int efd;
    struct event *ev; /* loop side; NULL once delivered or cancelled */
    net_resolve_fn cb;
    void *arg;
    net_resolve_gai_fn gai;
    char host[256];
    char port[8];
    unsigned pick;
    int rc;
    struct sockaddr_storage ss;
    socklen_t len;
};

static atomic_uint resolve_running;
static net_resolve_gai_fn resolve_gai_hook; /* tests; read on the loop thread */

static int resolve_gai(const char *host, const char *port, const struct addrinfo *hints,
                       struct addrinfo **res)
{
    return getaddrinfo(host, port, hints, res);
}

/* getaddrinfo()'s answer as 0 (ss, len: its pick-th address, modulo their
 * number) or a negative errno. */
static int resolve_answer(int gr, const struct addrinfo *ai, unsigned pick,
                          struct sockaddr_storage *ss, socklen_t *len)
{
    unsigned n = 0;
    for (const struct addrinfo *a = ai; gr == 0 && a != NULL; a = a->ai_next)
        n++;
    for (unsigned i = 0; n > 0 && i < pick % n; i++)
        ai = ai->ai_next;
    if (gr == 0 && ai != NULL && ai->ai_addrlen <= sizeof(*ss)) {
        memcpy(ss, ai->ai_addr, ai->ai_addrlen);
        *len = ai->ai_addrlen;
        return 0;
    }
    switch (gr) {
    case 0:
    case EAI_NONAME:
    case EAI_NODATA:
    case EAI_ADDRFAMILY:
        return -ENOENT;
    case EAI_AGAIN:
        return -EAGAIN;
    case EAI_MEMORY:
        return -ENOMEM;
    default:
        return -EIO;
    }
}

static void resolve_unref(struct net_resolve *r)
{
    if (atomic_fetch_sub(&r->refs, 1) == 1) {
        close(r->efd);
        free(r);
    }
}

static void *resolve_thread(void *p)
{
    struct net_resolve *r = p;
    struct addrinfo hints = {
            .ai_family = AF_UNSPEC,
            .ai_socktype = SOCK_STREAM,
            .ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG,
    };
    struct addrinfo *ai = NULL;
    int gr = r->gai(r->host, r->port, &hints, &ai);
    r->rc = resolve_answer(gr, ai, r->pick, &r->ss, &r->len);
    if (ai != NULL)
        freeaddrinfo(ai);
    atomic_store_explicit(&r->done, true, memory_order_release);
    uint64_t one = 1;
    if (write(r->efd, &one, sizeof(one)) < 0) {
        /* An eventfd write fails only on counter overflow: cannot happen. */
    }
    atomic_fetch_sub(&resolve_running, 1);
    resolve_unref(r);
    return NULL;
}

static void resolve_on_done(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct net_resolve *r = arg;
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0 || !atomic_load_explicit(&r->done, memory_order_acquire)) {
        event_add(r->ev, NULL); /* spurious: keep waiting */
        return;
    }
    event_free(r->ev);
    r->ev = NULL;
    net_resolve_fn cb = r->cb;
    void *cbarg = r->arg;
    int rc = r->rc;
    struct sockaddr_storage ss = r->ss;
    socklen_t len = r->len;
    resolve_unref(r);
    cb(cbarg, rc, rc == 0 ? (const struct sockaddr *)&ss : NULL, rc == 0 ? len : 0);
}

int net_resolve_start(struct net_resolve **req, struct event_base *base, const char *hostport,
                      unsigned pick, struct sockaddr_storage *ss, socklen_t *len, net_resolve_fn cb,
                      void *arg)
{
    *req = NULL;
    char host[256];
    uint16_t port;
    if (pb_split_host_port(hostport, host, sizeof(host), &port) < 0)
        return -EINVAL;
    char service[8];
    snprintf(service, sizeof(service), "%u", (unsigned)port);

    /* A literal never leaves the process: convert it now. */
    struct addrinfo hints = {
            .ai_family = AF_UNSPEC,
            .ai_socktype = SOCK_STREAM,
            .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV,
    };
    struct addrinfo *ai = NULL;
    int gr = getaddrinfo(host, service, &hints, &ai);
    if (gr != EAI_NONAME) {
        int rc = resolve_answer(gr, ai, 0, ss, len);
        if (ai != NULL)
            freeaddrinfo(ai);
        return rc == -ENOENT ? -EINVAL : rc;
    }

    if (atomic_fetch_add(&resolve_running, 1) >= NET_RESOLVE_MAX_THREADS) {
        atomic_fetch_sub(&resolve_running, 1);
        return -EAGAIN;
    }
    struct net_resolve *r = pb_xcalloc(1, sizeof(*r));
    atomic_init(&r->refs, 2);
    atomic_init(&r->done, false);
    r->cb = cb;
    r->arg = arg;
    r->gai = resolve_gai_hook != NULL ? resolve_gai_hook : resolve_gai;
    r->pick = pick;
    snprintf(r->host, sizeof(r->host), "%s", host);
    snprintf(r->port, sizeof(r->port), "%s", service);
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->ev = r->efd < 0 ? NULL : event_new(base, r->efd, EV_READ, resolve_on_done, r);
    pthread_attr_t attr;
    bool attr_ok = r->ev != NULL && event_add(r->ev, NULL) == 0 && pthread_attr_init(&attr) == 0;
    bool started = false;
    if (attr_ok) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* Signals stay with the loop thread. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_t t;
        started = pthread_create(&t, &attr, resolve_thread, r) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    if (!started) {
        atomic_fetch_sub(&resolve_running, 1);
        if (r->ev != NULL)
            event_free(r->ev);
        if (r->efd >= 0)
            close(r->efd);
        free(r);
        return -EAGAIN;
    }
    *req = r;
    return -EINPROGRESS;
}

void net_resolve_cancel(struct net_resolve *r)
{
    if (r == NULL)
        return;
    event_free(r->ev);
    r->ev = NULL;
    resolve_unref(r);
}

unsigned net_resolve_running(void)
{
    return atomic_load(&resolve_running);
}

void net_resolve_set_gai(net_resolve_gai_fn fn)
{
    resolve_gai_hook = fn;
}
