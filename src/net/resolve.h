/*
 * resolve.h: "host:port" to a socket address for a TCP connect, without
 * blocking the event loop.
 *
 * An address literal (127.0.0.1, [::1]) is converted at once. A host name is
 * looked up with getaddrinfo() (so /etc/hosts, DNS and every NSS source work
 * as for any program) on a short-lived thread of its own, and the answer is
 * delivered on the loop thread through an eventfd: a slow or dead DNS server
 * delays only the dial that needs it. Nothing is cached: each call looks the
 * name up again, so a member whose address changed is found at its next
 * dial.
 *
 * Threading: call from the loop thread of base; callbacks run there. At most
 * NET_RESOLVE_MAX_THREADS lookups run at once (then -EAGAIN).
 */
#ifndef PICKBOX_NET_RESOLVE_H
#define PICKBOX_NET_RESOLVE_H

#include <netdb.h>
#include <sys/socket.h>

struct event_base;
struct net_resolve;

#define NET_RESOLVE_MAX_THREADS 64

/* Called once with 0 and one address getaddrinfo() gave, or a negative
 * errno (-ENOENT: no such name, -EAGAIN: try again later). sa is
 * only valid during the call. */
typedef void (*net_resolve_fn)(void *arg, int rc, const struct sockaddr *sa, socklen_t len);

/*
 * Resolves hostport ("host:port", "[v6]:port") to its pick-th address
 * (modulo their number): a caller that counts its attempts in pick goes
 * through every address of a name ("localhost" is often ::1, then
 * 127.0.0.1, and a peer may listen on one only). Returns:
 *  0             a literal: *ss and *len are filled, *req is NULL, cb is
 *                never called;
 *  -EINPROGRESS  a name: *req is the pending lookup, cb(arg, ...) will be
 *                called once from base's loop unless net_resolve_cancel(*req)
 *                comes first;
 *  -EINVAL       hostport is malformed; -EAGAIN too many lookups running, or
 *                no thread or eventfd could be made (try again later).
 */
int net_resolve_start(struct net_resolve **req, struct event_base *base, const char *hostport,
                      unsigned pick, struct sockaddr_storage *ss, socklen_t *len, net_resolve_fn cb,
                      void *arg);

/* Forgets a pending lookup: cb will not be called. Its thread finishes in
 * the background and frees what is left. NULL is a no-op. */
void net_resolve_cancel(struct net_resolve *req);

/* Lookups whose thread has not finished yet (cancelled ones included). */
unsigned net_resolve_running(void);

/* Tests only: replaces getaddrinfo() for the lookups started from now on
 * (NULL restores it). Called on the lookup threads. */
typedef int (*net_resolve_gai_fn)(const char *host, const char *port, const struct addrinfo *hints,
                                  struct addrinfo **res);
void net_resolve_set_gai(net_resolve_gai_fn fn);

#endif
