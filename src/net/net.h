/*
 * net.h: the peer transport. One authenticated TCP connection per peer pair,
 * carrying typed opaque messages for the owner (Raft and the daemon).
 *
 * Frames and the handshake are described in frame.h and handshake.h. In
 * short: every connection starts with HELLO/AUTH (protocol version, node id,
 * name, cluster id, HMAC-SHA256 challenge-response over both nonces with the
 * shared cluster secret); a connection that has not authenticated within the
 * handshake timeout is dropped; after it, every frame carries a truncated
 * HMAC tag under a per-direction session key and a sequence number, so a
 * process without the secret can neither join nor inject nor replay.
 *
 * Two classes of traffic per peer:
 *   NET_CLASS_CONTROL  votes, heartbeats, small appends: one frame each
 *       (<= NET_FRAME_MAX_PAYLOAD), written at once, ahead of any bulk data
 *       not yet handed to the socket.
 *   NET_CLASS_BULK     snapshot and chunk data: messages up to NET_MSG_MAX,
 *       queued per peer (bounded in bytes), split into frames of at most
 *       NET_BULK_FRAME bytes; the next bulk frame is handed to the socket only
 *       once the socket buffer has drained, so a control frame waits behind
 *       at most one bulk frame plus what the kernel holds.
 * Order is kept within a class on one link, not across classes, and not
 * across a switch between two links (see below). Messages to a peer that is
 * down are refused (-ENOTCONN), not queued: Raft retries by itself. Delivery
 * is best effort: what is in flight when a link drops is lost.
 *
 * Connections: both ends dial peers they know (net_peer_add) with jittered
 * exponential backoff; if two connections between the same pair authenticate,
 * both ends keep the one dialed by the lower node id (between two dialed by
 * the same node, the newer). The other one is retired, not cut: both ends
 * stop sending on it, half-close it once its output drained and deliver what
 * still arrives on it until EOF, so what was already sent on it is not lost
 * (a bulk message half sent on it starts over on the new link). Inbound
 * connections from ids not added yet are accepted once authenticated (a
 * joining node) and reported through on_peer_state; net_peer_stats() tells
 * their name and cluster id.
 *
 * Threading: single-threaded; everything runs on the event_base given to
 * net_new(). Callbacks run from the loop; they may call net_send(),
 * net_peer_add/remove() and net_set_partition(), but not net_free().
 */
#ifndef PICKBOX_NET_NET_H
#define PICKBOX_NET_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/error.h"
#include "net/frame.h"
#include "net/handshake.h"

struct event_base;
struct net;

enum net_class {
    NET_CLASS_CONTROL = 0,
    NET_CLASS_BULK = 1,
};

/* Bulk messages travel in frames of at most this payload. */
#define NET_BULK_FRAME (256u * 1024u)

struct net_callbacks {
    /* A message of an owner type (>= NET_FRAME_USER_MIN) from an
     * authenticated peer. data is valid only during the call. */
    void (*on_frame)(void *arg, uint64_t node_id, uint8_t type, const uint8_t *data, size_t len);
    /* The peer's link came up (authenticated) or went down. */
    void (*on_peer_state)(void *arg, uint64_t node_id, bool up);
    /* net_send(..., NET_CLASS_BULK, ...) returned -ENOBUFS for this peer and
     * its bulk queue has since drained to half its limit. (When the link
     * goes down the queue is dropped and on_peer_state says so instead.) */
    void (*on_drain)(void *arg, uint64_t node_id);
};

struct net_config {
    uint64_t node_id;      /* != 0 */
    const char *node_name; /* 1..NET_NAME_MAX printable ASCII, copied */
    const uint8_t *secret; /* NET_SECRET_MIN..NET_SECRET_MAX bytes, copied */
    size_t secret_len;
    const uint8_t *cluster_id; /* NET_CLUSTER_ID_LEN bytes, or NULL while joining */
    struct net_callbacks cb;
    void *cb_arg;
    /* Limits and timers; 0 picks the default in brackets. */
    size_t bulk_queue_max;         /* bytes queued per peer [16 MiB] */
    size_t control_queue_max;      /* bytes of unsent output per peer [4 MiB] */
    unsigned handshake_timeout_ms; /* connect + handshake [5000] */
    unsigned write_timeout_ms;     /* output stalled this long -> drop [15000] */
    unsigned backoff_min_ms;       /* first redial delay [50] */
    unsigned backoff_max_ms;       /* redial delay cap [5000] */
    unsigned max_pending;          /* unauthenticated inbound connections [16] */
    int sock_buf;                  /* SO_SNDBUF/SO_RCVBUF if > 0 [kernel's] */
    uint64_t seed;                 /* backoff jitter PRNG seed [random] */
    uint16_t proto_max;            /* highest protocol version spoken, tests only
                                      [NET_PROTO_VERSION] */
};

struct net_peer_stats {
    uint64_t node_id;
    char name[NET_NAME_MAX + 1]; /* as claimed in its HELLO; "" before */
    char addr[128];              /* "" for a peer that only dialed us */
    bool connected;              /* authenticated link up */
    uint16_t version;            /* protocol version of the link (the last one while down) */
    bool initiated;              /* the link up was dialed by this node */
    bool partitioned;            /* net_set_partition() */
    bool has_cluster_id;
    uint8_t cluster_id[NET_CLUSTER_ID_LEN];
    uint64_t bytes_sent, bytes_recv;   /* frame bytes, all classes */
    uint64_t frames_sent, frames_recv; /* frames (not messages) */
    uint64_t last_contact_ms;          /* pb_now_ms() of the last frame received, 0: never */
    uint64_t connects;                 /* links established */
    size_t bulk_queued;                /* bytes waiting in the bulk queue */
    size_t out_queued;                 /* frame bytes not yet handed to the kernel */
};

struct net_stats {
    uint64_t accepted;       /* inbound TCP connections */
    uint64_t refused;        /* inbound refused over max_pending */
    uint64_t hs_ok;          /* handshakes completed */
    uint64_t hs_failed;      /* connections lost before authenticating: refused or failed
                                dials, bad MAC, version, id, timeout, partition */
    uint64_t auth_failed;    /* of which wrong MAC */
    uint64_t proto_errors;   /* authenticated links dropped for a protocol violation */
    uint64_t frames_dropped; /* by the partition hook */
};

/* Creates a transport on base. Returns NULL and fills err on a bad config. */
struct net *net_new(struct event_base *base, const struct net_config *cfg, struct pb_error *err);

/* Closes every connection and frees everything. No callbacks are made. */
void net_free(struct net *net);

/* Binds and listens on "host:port" (port 0 picks a free port). -errno + err. */
int net_listen(struct net *net, const char *hostport, struct pb_error *err);

/* Accepts on an already listening TCP socket (systemd's "peer" fd); the
 * transport owns fd from now on. -errno + err. */
int net_listen_fd(struct net *net, int fd, struct pb_error *err);

/* The local port of the listener, or 0 when not listening. */
uint16_t net_local_port(const struct net *net);

/* Sets the cluster id once this node learns it (after joining). */
void net_set_cluster_id(struct net *net, const uint8_t cluster_id[NET_CLUSTER_ID_LEN]);

/*
 * Adds (or re-addresses) peer node_id at "host:port" and starts dialing it
 * unless a link is up. The host is looked up again at each dial, a name off
 * the loop (resolve.h), so a member whose address changed is found again.
 * Returns 0, -EINVAL (bad id or address, err filled), -ENOSPC (too many peers).
 */
int net_peer_add(struct net *net, uint64_t node_id, const char *hostport, struct pb_error *err);

/*
 * Dials "host:port" without knowing which node listens there (pickboxd
 * --join ADDR), retrying with backoff until a node authenticates. That node
 * then becomes an ordinary peer with this address (on_peer_state up) and the
 * seed is forgotten. Returns 0 or -EINVAL (err filled).
 */
int net_seed_add(struct net *net, const char *hostport, struct pb_error *err);

/* Forgets peer node_id: closes its link (on_peer_state down is not called)
 * and drops its queues. Returns 0 or -ENOENT. */
int net_peer_remove(struct net *net, uint64_t node_id);

/*
 * Sends one message of owner type (>= NET_FRAME_USER_MIN) to node_id; data is
 * copied. Returns 0 (queued), -EINVAL (bad type or class), -EMSGSIZE (over
 * NET_FRAME_MAX_PAYLOAD for control, NET_MSG_MAX or the bulk queue limit for
 * bulk), -ENOENT (unknown peer), -ENOTCONN (link down), -ENOBUFS (queue
 * full: for bulk, on_drain follows; for control, the peer is not reading).
 * A peer partitioned by net_set_partition() is down.
 */
int net_send(struct net *net, uint64_t node_id, enum net_class cls, uint8_t type, const void *data,
             size_t len);

/*
 * net_send() without the copy: takes data, which must come from malloc(), and
 * frees it on every path (at once when an error is returned). The frames are
 * handed to the socket by reference, so a big message is never copied inside
 * the transport. Same errors as net_send().
 */
int net_send_take(struct net *net, uint64_t node_id, enum net_class cls, uint8_t type, void *data,
                  size_t len);

/*
 * Fault injection for tests: while partitioned, the link to node_id is
 * closed, not redialed, and its inbound connections are refused during the
 * handshake, so no traffic flows either way. Healing redials at once.
 * Creates an address-less peer entry if node_id is unknown. Returns 0 or
 * -EINVAL / -ENOSPC.
 */
int net_set_partition(struct net *net, uint64_t node_id, bool partitioned);

/* Fills *out for node_id. Returns 0 or -ENOENT. */
int net_peer_stats(const struct net *net, uint64_t node_id, struct net_peer_stats *out);

/* Bytes of bulk messages queued for node_id and not yet wholly handed to its
 * link (0 for an unknown peer). A control message sent while this is not 0
 * may arrive before them: send it as bulk to keep it behind them. */
size_t net_peer_bulk_queued(const struct net *net, uint64_t node_id);

/* Copies up to max peer ids into ids; returns the number of peers. */
size_t net_peer_ids(const struct net *net, uint64_t *ids, size_t max);

void net_get_stats(const struct net *net, struct net_stats *out);

#endif
