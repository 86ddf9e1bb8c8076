/*
 * net.c: the peer transport on libevent (see net.h for the contract).
 *
 * A struct net_peer is a node we know (by net_peer_add, or because it dialed
 * us and authenticated); it owns the bulk queue, the redial timer and the
 * stats. A struct net_conn is one TCP connection: it runs the handshake,
 * then, as the peer's active link, carries tagged frames. Connections are
 * never freed inside their own callbacks: conn_close() unlinks them and a
 * zero-delay event frees them once the stack has unwound.
 */
#include "config.h"

#include "net/net.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/util.h"
#include "net/resolve.h"

#define NET_MAX_PEERS         256
#define NET_DEF_BULK_QUEUE    (16u * 1024u * 1024u)
#define NET_DEF_CONTROL_QUEUE (4u * 1024u * 1024u)
#define NET_DEF_HS_TIMEOUT    5000
#define NET_DEF_WRITE_TIMEOUT 15000
#define NET_DEF_BACKOFF_MIN   50
#define NET_DEF_BACKOFF_MAX   5000
#define NET_DEF_MAX_PENDING   16
#define NET_ACCEPT_RETRY_MS   1000
#define NET_HS_WARN_MS        10000
/* Bulk fragments over this size are reassembled straight from the input
 * buffer (conn_on_bulk_fragment). */
#define NET_BULK_DIRECT_MIN (16u * 1024u)

/* A queued bulk message. Its frames are handed to the output buffer by
 * reference (evbuffer_add_reference), not copied: the message lives until the
 * queue and every frame still in an output buffer let go of it. */
struct net_bulk_msg {
    struct net_bulk_msg *next;
    uint8_t type;
    unsigned refs; /* the queue's, plus one per frame in an output buffer */
    size_t len;
    size_t off;    /* bytes already handed to the active connection */
    uint8_t *data; /* owned */
};

struct net_seed;

struct net_conn {
    struct net *net;
    struct net_seed *seed; /* outbound to a seed address (id unknown) */
    struct net_conn *next; /* net->conns, or net->dead once closed */
    struct bufferevent *bev;
    struct event *hs_timer;
    struct net_peer *peer; /* set while this is the peer's active link */
    uint64_t dial_id;      /* outbound: the peer we dialed */
    bool initiator;
    bool pending_in; /* counted in net->npending_in */
    bool authed;
    bool retired; /* lost the duplicate-link rule: draining, then closed */
    bool shut_wr; /* shutdown(SHUT_WR) done */
    bool closing;
    char desc[80]; /* remote address, for logs */
    struct net_hs hs;
    uint64_t seq_send, seq_recv;
    EVP_MAC_CTX *mac_send, *mac_recv;
    /* Bulk message being reassembled. */
    bool rx_bulk_active;
    uint8_t rx_bulk_type;
    struct buf rx_bulk;
};

struct net_peer {
    struct net_peer *next;
    struct net *net;
    uint64_t id;
    char *addr;            /* NULL: only known because it dialed us */
    struct net_conn *conn; /* active authenticated link */
    struct net_conn *dialing;
    struct net_resolve *resolving; /* its address, before dialing */
    unsigned dials;                /* attempts: which of its addresses to try */
    struct event *redial;
    unsigned backoff_ms;
    bool partitioned;
    bool want_drain;
    struct net_bulk_msg *bulk_head, *bulk_tail;
    size_t bulk_bytes;
    struct net_peer_stats st;
};

/* An address to dial without knowing who answers (pickboxd --join ADDR). */
struct net_seed {
    struct net_seed *next;
    struct net *net;
    char *addr;
    struct event *redial;
    unsigned backoff_ms;
    struct net_conn *dialing;
    struct net_resolve *resolving;
    unsigned dials;
};

struct net {
    struct event_base *base;
    struct net_config cfg;
    char *name;
    uint8_t *secret;
    struct net_hs_local local;
    struct evconnlistener *listener;
    struct event *accept_retry;
    struct net_peer *peers;
    size_t npeers;
    struct net_seed *seeds;
    struct net_conn *conns;
    struct net_conn *dead;
    struct event *reaper;
    unsigned npending_in;
    uint64_t rng;
    EVP_MAC *mac;
    struct net_stats stats;
    uint64_t hs_warn_ms; /* last handshake failure logged as a warning */
    uint64_t hs_warn_suppressed;
};

static _Noreturn void net_crypto_failed(void)
{
    log_err("net: libcrypto failed (out of memory?)");
    abort();
}

/* xorshift64*: jitter only, not security. */
static uint64_t net_rand(struct net *net)
{
    uint64_t x = net->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    net->rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static struct net_peer *net_find(const struct net *net, uint64_t id)
{
    for (struct net_peer *p = net->peers; p != NULL; p = p->next)
        if (p->id == id)
            return p;
    return NULL;
}

static void peer_dial(struct net_peer *peer);
static struct net_peer *peer_get(struct net *net, uint64_t id);
static void peer_pump(struct net_peer *peer, bool may_drain);

/* ---- connections ---------------------------------------------------- */

/*
 * A misconfigured peer (wrong secret, other version) fails again at every
 * redial: warn at most once per NET_HS_WARN_MS and log the rest at debug
 * level, counting them.
 */
static enum log_level net_hs_fail_level(struct net *net)
{
    uint64_t now = pb_now_ms();
    net->stats.hs_failed++;
    if (net->hs_warn_ms != 0 && now - net->hs_warn_ms < NET_HS_WARN_MS) {
        net->hs_warn_suppressed++;
        return LOG_LEVEL_DEBUG;
    }
    if (net->hs_warn_suppressed > 0)
        log_warning("net: %llu more handshake failures in the last %d s (debug level shows them)",
                    (unsigned long long)net->hs_warn_suppressed, NET_HS_WARN_MS / 1000);
    net->hs_warn_suppressed = 0;
    net->hs_warn_ms = now;
    return LOG_LEVEL_WARNING;
}

static void conn_destroy(struct net_conn *conn)
{
    if (conn->bev != NULL)
        bufferevent_free(conn->bev);
    if (conn->hs_timer != NULL)
        event_free(conn->hs_timer);
    net_hs_free(&conn->hs);
    EVP_MAC_CTX_free(conn->mac_send);
    EVP_MAC_CTX_free(conn->mac_recv);
    buf_free(&conn->rx_bulk);
    free(conn);
}

static void net_reap(evutil_socket_t fd, short what, void *arg)
{
    struct net *net = arg;
    while (net->dead != NULL) {
        struct net_conn *c = net->dead;
        net->dead = c->next;
        conn_destroy(c);
    }
}

static void bulk_unref(struct net_bulk_msg *m)
{
    assert(m->refs > 0);
    if (--m->refs > 0)
        return;
    free(m->data);
    free(m);
}

/* evbuffer cleanup of a bulk frame added by reference: it was written (or its
 * connection freed). */
static void bulk_frame_done(const void *data, size_t len, void *arg)
{
    (void)data;
    (void)len;
    bulk_unref(arg);
}

/* evbuffer cleanup of a control message handed over with net_send_take(). */
static void taken_frame_done(const void *data, size_t len, void *arg)
{
    (void)len;
    (void)arg;
    free((void *)(uintptr_t)data);
}

static void peer_bulk_clear(struct net_peer *peer)
{
    while (peer->bulk_head != NULL) {
        struct net_bulk_msg *m = peer->bulk_head;
        peer->bulk_head = m->next;
        bulk_unref(m);
    }
    peer->bulk_tail = NULL;
    peer->bulk_bytes = 0;
}

/* Arms redial with "equal jitter" (half the backoff fixed, half random)
 * and doubles *backoff_ms up to the configured cap. */
static void net_arm_redial(struct net *net, struct event *redial, unsigned *backoff_ms)
{
    unsigned b = *backoff_ms;
    unsigned delay = b / 2 + (unsigned)(net_rand(net) % (b / 2 + 1));
    unsigned next = b * 2;
    *backoff_ms = next > net->cfg.backoff_max_ms ? net->cfg.backoff_max_ms : next;
    struct timeval tv = {delay / 1000, (delay % 1000) * 1000};
    evtimer_add(redial, &tv);
}

static void peer_schedule_redial(struct net_peer *peer)
{
    if (peer->addr == NULL || peer->partitioned || peer->conn != NULL || peer->dialing != NULL ||
        peer->resolving != NULL)
        return;
    net_arm_redial(peer->net, peer->redial, &peer->backoff_ms);
}

static void seed_free(struct net_seed *seed)
{
    net_resolve_cancel(seed->resolving);
    event_free(seed->redial);
    free(seed->addr);
    free(seed);
}

/*
 * Closes conn: unlinks it, and if it was a peer's active link reports the
 * peer down (last, since the callback may change anything). reason may be
 * NULL for a quiet close.
 */
static void conn_close(struct net_conn *conn, enum log_level level, const char *reason)
{
    struct net *net = conn->net;
    if (conn->closing)
        return;
    conn->closing = true;
    if (conn->pending_in) {
        conn->pending_in = false;
        net->npending_in--;
    }
    bufferevent_disable(conn->bev, EV_READ | EV_WRITE);
    if (conn->hs_timer != NULL)
        event_del(conn->hs_timer);
    for (struct net_conn **pp = &net->conns; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == conn) {
            *pp = conn->next;
            break;
        }
    }
    conn->next = net->dead;
    net->dead = conn;
    event_active(net->reaper, EV_TIMEOUT, 0);

    uint64_t down_id = 0;
    if (conn->peer != NULL && conn->peer->conn == conn) {
        struct net_peer *peer = conn->peer;
        peer->conn = NULL;
        peer->st.connected = false;
        /* Queued bulk data is dropped with the link: the owner restarts
         * whatever it was sending when the peer comes back. */
        peer->want_drain = false;
        peer_bulk_clear(peer);
        peer_schedule_redial(peer);
        if (reason != NULL)
            log_msg(level, "net: link to node %llu (%s) down: %s addr=%s",
                    (unsigned long long)peer->id, peer->st.name, reason, conn->desc);
        down_id = peer->id;
    } else {
        if (reason != NULL)
            log_msg(level, "net: connection %s closed: %s", conn->desc, reason);
        if (conn->seed != NULL && conn->seed->dialing == conn) {
            conn->seed->dialing = NULL;
            net_arm_redial(net, conn->seed->redial, &conn->seed->backoff_ms);
        }
        conn->seed = NULL;
        if (conn->dial_id != 0) {
            struct net_peer *peer = net_find(net, conn->dial_id);
            if (peer != NULL && peer->dialing == conn) {
                peer->dialing = NULL;
                peer_schedule_redial(peer);
            }
        }
    }
    conn->peer = NULL;
    if (down_id != 0 && net->cfg.cb.on_peer_state != NULL)
        net->cfg.cb.on_peer_state(net->cfg.cb_arg, down_id, false);
}

/* A frame's tag: HMAC over u64 seq || header || payload, the payload fed in
 * pieces (tag_update) between tag_begin and tag_end. */
static void tag_begin(EVP_MAC_CTX *ctx, uint64_t seq, const uint8_t *hdr)
{
    uint8_t s[8];
    pb_store_u64(s, seq);
    if (EVP_MAC_init(ctx, NULL, 0, NULL) != 1 || EVP_MAC_update(ctx, s, sizeof(s)) != 1 ||
        EVP_MAC_update(ctx, hdr, NET_FRAME_HDR_LEN) != 1)
        net_crypto_failed();
}

static void tag_update(EVP_MAC_CTX *ctx, const void *p, size_t len)
{
    if (len > 0 && EVP_MAC_update(ctx, p, len) != 1)
        net_crypto_failed();
}

static void tag_end(EVP_MAC_CTX *ctx, uint8_t out[32])
{
    size_t outl = 0;
    if (EVP_MAC_final(ctx, out, &outl, 32) != 1)
        net_crypto_failed();
}

static void conn_tag(EVP_MAC_CTX *ctx, uint64_t seq, const uint8_t *hdr, const uint8_t *p,
                     size_t len, uint8_t out[32])
{
    tag_begin(ctx, seq, hdr);
    tag_update(ctx, p, len);
    tag_end(ctx, out);
}

/* Appends one frame to conn's output; tagged once authenticated. The payload
 * is copied, or, with a cleanup function, added by reference: cleanup(data,
 * len, arg) runs once the output buffer no longer needs it. */
static void conn_write_frame_ref(struct net_conn *conn, uint8_t type, uint8_t flags,
                                 const void *data, size_t len,
                                 void (*cleanup)(const void *, size_t, void *), void *arg)
{
    uint8_t hdr[NET_FRAME_HDR_LEN];
    uint8_t tag[32];
    struct evbuffer *out = bufferevent_get_output(conn->bev);
    assert(len <= NET_FRAME_MAX_PAYLOAD);
    net_frame_encode_header(hdr, type, flags, (uint32_t)len);
    size_t total = sizeof(hdr) + len;
    /* the tag first: a payload added by reference may go at any time after */
    if (conn->authed)
        conn_tag(conn->mac_send, conn->seq_send++, hdr, data, len, tag);
    evbuffer_add(out, hdr, sizeof(hdr));
    if (len > 0 && cleanup != NULL) {
        if (evbuffer_add_reference(out, data, len, cleanup, arg) != 0) {
            log_err("net: out of memory for an output buffer");
            abort();
        }
    } else if (len > 0) {
        evbuffer_add(out, data, len);
    } else if (cleanup != NULL) {
        cleanup(data, len, arg);
    }
    if (conn->authed) {
        evbuffer_add(out, tag, NET_FRAME_TAG_LEN);
        total += NET_FRAME_TAG_LEN;
    }
    if (conn->peer != NULL) {
        conn->peer->st.bytes_sent += total;
        conn->peer->st.frames_sent++;
    }
}

static void conn_write_frame(struct net_conn *conn, uint8_t type, uint8_t flags, const void *data,
                             size_t len)
{
    conn_write_frame_ref(conn, type, flags, data, len, NULL, NULL);
}

static EVP_MAC_CTX *conn_mac_new(struct net *net, const uint8_t key[NET_KEY_LEN])
{
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
            OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
            OSSL_PARAM_construct_end(),
    };
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(net->mac);
    if (ctx == NULL || EVP_MAC_init(ctx, key, NET_KEY_LEN, params) != 1)
        net_crypto_failed();
    return ctx;
}

static void conn_retire_timeout(evutil_socket_t fd, short what, void *arg)
{
    conn_close(arg, LOG_LEVEL_DEBUG, "retired link did not drain");
}

/* Half-closes a retired link once everything written on it has gone. */
static void conn_retire_flush(struct net_conn *conn)
{
    if (conn->retired && !conn->shut_wr &&
        evbuffer_get_length(bufferevent_get_output(conn->bev)) == 0) {
        conn->shut_wr = true;
        shutdown(bufferevent_getfd(conn->bev), SHUT_WR);
    }
}

/*
 * Retires a duplicate link instead of closing it at once: both ends retire
 * the same one, stop sending on it, half-close it when its output has
 * drained and read it until the other end's EOF, so nothing sent on it
 * before the switch is lost. A timer bounds the wait.
 */
static void conn_retire(struct net_conn *conn)
{
    struct net *net = conn->net;
    conn->peer = NULL;
    conn->retired = true;
    log_debug("net: retiring duplicate link to node %llu addr=%s",
              (unsigned long long)conn->hs.peer_id, conn->desc);
    event_assign(conn->hs_timer, net->base, -1, 0, conn_retire_timeout, conn);
    struct timeval ht = {net->cfg.handshake_timeout_ms / 1000,
                         (net->cfg.handshake_timeout_ms % 1000) * 1000};
    evtimer_add(conn->hs_timer, &ht);
    conn_retire_flush(conn);
}

/* The handshake completed: make conn the peer's link (or drop it). */
static void conn_authed(struct net_conn *conn)
{
    struct net *net = conn->net;
    uint64_t id = conn->hs.peer_id;
    net->stats.hs_ok++;
    event_del(conn->hs_timer);
    if (conn->pending_in) {
        conn->pending_in = false;
        net->npending_in--;
    }
    conn->authed = true;
    conn->mac_send = conn_mac_new(net, conn->hs.key_send);
    conn->mac_recv = conn_mac_new(net, conn->hs.key_recv);

    struct net_peer *peer = peer_get(net, id);
    if (peer == NULL) {
        conn_close(conn, LOG_LEVEL_WARNING, "too many peers");
        return;
    }
    if (conn->seed != NULL) {
        /* The seed answered: from now on it is an ordinary peer that is
         * redialed at this address. */
        struct net_seed *seed = conn->seed;
        for (struct net_seed **sp = &net->seeds; *sp != NULL; sp = &(*sp)->next) {
            if (*sp == seed) {
                *sp = seed->next;
                break;
            }
        }
        conn->seed = NULL;
        if (peer->addr == NULL) {
            peer->addr = seed->addr;
            seed->addr = NULL;
            snprintf(peer->st.addr, sizeof(peer->st.addr), "%s", peer->addr);
        }
        log_info("net: seed %s is node %llu (%s)", conn->desc, (unsigned long long)id,
                 conn->hs.peer_name);
        seed_free(seed);
    }
    if (peer->partitioned) {
        conn_close(conn, LOG_LEVEL_DEBUG, "partitioned (fault injection)");
        return;
    }
    if (peer->dialing == conn)
        peer->dialing = NULL;
    struct net_conn *old = peer->conn;
    if (old != NULL) {
        /* Two links to one peer: both ends keep the one dialed by the lower
         * node id; between two dialed by the same end, the newer one (the
         * older is likely a half-open leftover of a restart). */
        uint64_t lower = PB_MIN(net->cfg.node_id, id);
        bool old_pref = (old->initiator ? net->cfg.node_id : id) == lower;
        bool new_pref = (conn->initiator ? net->cfg.node_id : id) == lower;
        if (old_pref && !new_pref) {
            conn_retire(conn);
            return;
        }
        conn_retire(old);
    }
    peer->conn = conn;
    conn->peer = peer;
    evtimer_del(peer->redial);
    peer->backoff_ms = net->cfg.backoff_min_ms;
    peer->st.connected = true;
    peer->st.version = conn->hs.version;
    peer->st.initiated = conn->initiator;
    peer->st.connects++;
    snprintf(peer->st.name, sizeof(peer->st.name), "%s", conn->hs.peer_name);
    peer->st.has_cluster_id = conn->hs.peer_has_cluster_id;
    memcpy(peer->st.cluster_id, conn->hs.peer_cluster_id, NET_CLUSTER_ID_LEN);
    /* A bulk message half sent on an older link starts over on this one. */
    if (peer->bulk_head != NULL)
        peer->bulk_head->off = 0;
    if (old == NULL)
        log_info("net: link to node %llu (%s) up addr=%s dir=%s", (unsigned long long)id,
                 conn->hs.peer_name, conn->desc, conn->initiator ? "out" : "in");
    peer_pump(peer, false);
    if (old == NULL && net->cfg.cb.on_peer_state != NULL)
        net->cfg.cb.on_peer_state(net->cfg.cb_arg, id, true);
}

static void conn_proto_error(struct net_conn *conn, const char *msg)
{
    conn->net->stats.proto_errors++;
    conn_close(conn, LOG_LEVEL_WARNING, msg);
}

static void conn_deliver(struct net_conn *conn, uint8_t type, const uint8_t *p, size_t len)
{
    struct net *net = conn->net;
    if (net->cfg.cb.on_frame != NULL)
        net->cfg.cb.on_frame(net->cfg.cb_arg, conn->hs.peer_id, type, p, len);
}

/* A frame whose tag verified: counts it; false if it is not to be delivered
 * (the peer was removed or partitioned, or a protocol error closed conn). */
static bool conn_frame_admit(struct net_conn *conn, uint8_t type, size_t len)
{
    /* A retired link still delivers what the peer sent on it before it
     * switched; nothing once the peer was removed or partitioned. */
    struct net_peer *peer = conn->peer ? conn->peer : net_find(conn->net, conn->hs.peer_id);
    if (peer == NULL || peer->partitioned)
        return false;
    peer->st.bytes_recv += NET_FRAME_HDR_LEN + len + NET_FRAME_TAG_LEN;
    peer->st.frames_recv++;
    peer->st.last_contact_ms = pb_now_ms();
    if (type < NET_FRAME_USER_MIN) {
        conn_proto_error(conn, "handshake frame after authentication");
        return false;
    }
    return true;
}

/* A bulk fragment of len bytes is to be appended to the message being
 * reassembled (starting one if none is); false after a protocol error. */
static bool conn_bulk_room(struct net_conn *conn, uint8_t type, size_t len)
{
    if (!conn->rx_bulk_active) {
        conn->rx_bulk_active = true;
        conn->rx_bulk_type = type;
        buf_reset(&conn->rx_bulk);
    } else if (type != conn->rx_bulk_type) {
        conn_proto_error(conn, "bulk fragment of another type");
        return false;
    }
    if (conn->rx_bulk.len + len > NET_MSG_MAX) {
        conn_proto_error(conn, "bulk message over the size limit");
        return false;
    }
    return true;
}

/* The last fragment of a bulk message arrived: deliver it. */
static void conn_bulk_done(struct net_conn *conn)
{
    conn->rx_bulk_active = false;
    conn_deliver(conn, conn->rx_bulk_type, conn->rx_bulk.data, conn->rx_bulk.len);
    if (!conn->closing && conn->rx_bulk.cap > 2 * NET_BULK_FRAME)
        buf_free(&conn->rx_bulk); /* don't pin megabytes per idle link */
}

/* One frame on an authenticated link. */
static void conn_on_frame(struct net_conn *conn, const struct net_frame *f)
{
    uint8_t tag[32];
    conn_tag(conn->mac_recv, conn->seq_recv++, f->hdr, f->payload, f->len, tag);
    if (CRYPTO_memcmp(tag, f->tag, NET_FRAME_TAG_LEN) != 0) {
        conn_proto_error(conn, "frame tag mismatch (corrupted or injected data)");
        return;
    }
    if (!conn_frame_admit(conn, f->type, f->len))
        return;
    if (!(f->flags & NET_FRAME_F_BULK) ||
        (!conn->rx_bulk_active && !(f->flags & NET_FRAME_F_MORE))) {
        conn_deliver(conn, f->type, f->payload, f->len);
        return;
    }
    if (!conn_bulk_room(conn, f->type, f->len))
        return;
    buf_put(&conn->rx_bulk, f->payload, f->len);
    if (!(f->flags & NET_FRAME_F_MORE))
        conn_bulk_done(conn);
}

/*
 * A complete fragment of a multi-frame bulk message, still in the input
 * buffer (hdr: its valid header, len: its payload). Its tag is computed over
 * the buffer's chains in place and the payload is copied once, straight into
 * the message being reassembled: conn_on_frame() needs it contiguous, which
 * costs evbuffer_pullup() a copy of every big frame first. Drains the frame.
 */
static void conn_on_bulk_fragment(struct net_conn *conn, struct evbuffer *in, const uint8_t *hdr,
                                  size_t len)
{
    uint8_t h[NET_FRAME_HDR_LEN];
    uint8_t want[NET_FRAME_TAG_LEN];
    uint8_t tag[32];
    struct evbuffer_ptr pos;
    memcpy(h, hdr, sizeof(h)); /* hdr points into in */
    uint8_t type = h[2], flags = h[3];
    if (evbuffer_ptr_set(in, &pos, NET_FRAME_HDR_LEN + len, EVBUFFER_PTR_SET) != 0 ||
        evbuffer_copyout_from(in, &pos, want, sizeof(want)) != (ev_ssize_t)sizeof(want)) {
        conn_proto_error(conn, "short frame");
        return;
    }
    tag_begin(conn->mac_recv, conn->seq_recv++, h);
    size_t done = 0;
    while (done < len) {
        struct evbuffer_iovec v[16];
        if (evbuffer_ptr_set(in, &pos, NET_FRAME_HDR_LEN + done, EVBUFFER_PTR_SET) != 0) {
            conn_proto_error(conn, "short frame");
            return;
        }
        int n = evbuffer_peek(in, (ev_ssize_t)(len - done), &pos, v, 16);
        if (n <= 0) {
            conn_proto_error(conn, "short frame");
            return;
        }
        for (int i = 0; i < n && i < 16 && done < len; i++) {
            size_t k = PB_MIN(v[i].iov_len, len - done);
            tag_update(conn->mac_recv, v[i].iov_base, k);
            done += k;
        }
    }
    tag_end(conn->mac_recv, tag);
    if (CRYPTO_memcmp(tag, want, NET_FRAME_TAG_LEN) != 0) {
        conn_proto_error(conn, "frame tag mismatch (corrupted or injected data)");
        return;
    }
    bool deliver = conn_frame_admit(conn, type, len) && conn_bulk_room(conn, type, len);
    if (conn->closing)
        return;
    evbuffer_drain(in, NET_FRAME_HDR_LEN);
    if (deliver) {
        uint8_t *dst = buf_reserve(&conn->rx_bulk, len);
        if (evbuffer_remove(in, dst, len) != (int)len) {
            conn_proto_error(conn, "short frame");
            return;
        }
        conn->rx_bulk.len += len;
    } else {
        evbuffer_drain(in, len);
    }
    evbuffer_drain(in, NET_FRAME_TAG_LEN);
    if (deliver && !(flags & NET_FRAME_F_MORE))
        conn_bulk_done(conn);
}

/* One frame during the handshake. */
static void conn_on_hs_frame(struct net_conn *conn, const struct net_frame *f)
{
    struct net *net = conn->net;
    struct pb_error err;
    struct buf reply = BUF_INIT;
    uint8_t reply_type = 0;
    pb_error_clear(&err);
    if (f->flags != 0 || f->type >= NET_FRAME_USER_MIN) {
        conn_close(conn, net_hs_fail_level(net), "message before authentication");
        return;
    }
    int r = net_hs_input(&conn->hs, f->type, f->payload, f->len, &reply, &reply_type, &err);
    if (r < 0) {
        buf_free(&reply);
        if (r == -EACCES)
            net->stats.auth_failed++;
        conn_close(conn, net_hs_fail_level(net), err.msg);
        return;
    }
    if (conn->hs.state == NET_HS_WAIT_AUTH) {
        struct net_peer *peer = net_find(net, conn->hs.peer_id);
        if (peer != NULL && peer->partitioned) {
            buf_free(&reply);
            net->stats.hs_failed++;
            conn_close(conn, LOG_LEVEL_DEBUG, "partitioned (fault injection)");
            return;
        }
    }
    if (reply_type != 0)
        conn_write_frame(conn, reply_type, 0, reply.data, reply.len);
    buf_free(&reply);
    if (conn->hs.state == NET_HS_DONE)
        conn_authed(conn);
}

static void conn_read_cb(struct bufferevent *bev, void *arg)
{
    struct net_conn *conn = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    while (!conn->closing) {
        size_t n = evbuffer_get_length(in);
        size_t maxp = conn->authed ? NET_FRAME_MAX_PAYLOAD : NET_HELLO_MAX;
        size_t tag_len = conn->authed ? NET_FRAME_TAG_LEN : 0;
        struct net_frame f;
        struct pb_error err;
        size_t need;
        if (n < NET_FRAME_HDR_LEN)
            return;
        long r = net_frame_decode(evbuffer_pullup(in, NET_FRAME_HDR_LEN), NET_FRAME_HDR_LEN, maxp,
                                  tag_len, &f, &need, &err);
        if (r == 0 && n >= need && conn->authed && need > NET_BULK_DIRECT_MIN) {
            /* the header is valid (net_frame_decode checked it) */
            const uint8_t *hdr = evbuffer_pullup(in, NET_FRAME_HDR_LEN);
            if ((hdr[3] & NET_FRAME_F_BULK) &&
                (conn->rx_bulk_active || (hdr[3] & NET_FRAME_F_MORE))) {
                conn_on_bulk_fragment(conn, in, hdr, need - NET_FRAME_HDR_LEN - tag_len);
                continue;
            }
        }
        if (r == 0 && n >= need)
            r = net_frame_decode(evbuffer_pullup(in, (ssize_t)need), need, maxp, tag_len, &f, &need,
                                 &err);
        if (r < 0) {
            if (conn->authed)
                conn_proto_error(conn, err.msg);
            else
                conn_close(conn, net_hs_fail_level(conn->net), err.msg);
            return;
        }
        if (r == 0)
            return;
        if (conn->authed)
            conn_on_frame(conn, &f);
        else
            conn_on_hs_frame(conn, &f);
        evbuffer_drain(in, (size_t)r);
    }
}

static void conn_write_cb(struct bufferevent *bev, void *arg)
{
    struct net_conn *conn = arg;
    if (conn->closing)
        return;
    if (conn->retired)
        conn_retire_flush(conn);
    else if (conn->peer != NULL)
        peer_pump(conn->peer, true);
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct net_conn *conn = arg;
    if (what & BEV_EVENT_CONNECTED) {
        log_debug("net: connected to %s", conn->desc);
        return;
    }
    char reason[96];
    if (what & BEV_EVENT_TIMEOUT)
        snprintf(reason, sizeof(reason), "write stalled");
    else if (what & BEV_EVENT_EOF)
        snprintf(reason, sizeof(reason), "closed by peer");
    else
        snprintf(reason, sizeof(reason), "%s",
                 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
    if (!conn->authed)
        conn->net->stats.hs_failed++;
    /* Failed dials repeat with backoff: keep them out of the default log. */
    conn_close(conn, conn->authed && !conn->retired ? LOG_LEVEL_NOTICE : LOG_LEVEL_DEBUG, reason);
}

static void conn_hs_timeout(evutil_socket_t fd, short what, void *arg)
{
    struct net_conn *conn = arg;
    enum log_level level = LOG_LEVEL_DEBUG;
    /* Dials to a peer that is down time out here too: not worth a warning. */
    if (conn->initiator)
        conn->net->stats.hs_failed++;
    else
        level = net_hs_fail_level(conn->net);
    conn_close(conn, level, "no authentication within the handshake timeout");
}

static void net_sockopts(struct net *net, evutil_socket_t fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* A peer that vanished without a FIN (power loss, partition) is noticed
     * by keepalive probes within about 30 s even on a link we only read
     * from, and by TCP_USER_TIMEOUT when our data goes unacknowledged. */
    int idle = 15, intvl = 5, cnt = 3;
    unsigned int uto = net->cfg.write_timeout_ms;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof(uto));
    if (net->cfg.sock_buf > 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &net->cfg.sock_buf, sizeof(net->cfg.sock_buf));
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &net->cfg.sock_buf, sizeof(net->cfg.sock_buf));
    }
}

/* Wraps fd (nonblocking) into a connection that starts the handshake. */
static struct net_conn *conn_new(struct net *net, evutil_socket_t fd, bool initiator,
                                 uint64_t dial_id, const char *desc)
{
    struct net_conn *conn = pb_xcalloc(1, sizeof(*conn));
    uint8_t nonce[NET_NONCE_LEN];
    conn->net = net;
    conn->initiator = initiator;
    conn->dial_id = dial_id;
    snprintf(conn->desc, sizeof(conn->desc), "%s", desc);
    buf_init(&conn->rx_bulk);
    if (RAND_bytes(nonce, sizeof(nonce)) != 1)
        net_crypto_failed();
    net_hs_init(&conn->hs, &net->local, initiator, dial_id, nonce);
    conn->bev = bufferevent_socket_new(net->base, fd, BEV_OPT_CLOSE_ON_FREE);
    conn->hs_timer = evtimer_new(net->base, conn_hs_timeout, conn);
    if (conn->bev == NULL || conn->hs_timer == NULL) {
        log_err("net: out of memory for a connection");
        abort();
    }
    bufferevent_setcb(conn->bev, conn_read_cb, conn_write_cb, conn_event_cb, conn);
    struct timeval wt = {net->cfg.write_timeout_ms / 1000,
                         (net->cfg.write_timeout_ms % 1000) * 1000};
    bufferevent_set_timeouts(conn->bev, NULL, &wt);
    bufferevent_enable(conn->bev, EV_READ | EV_WRITE);
    struct timeval ht = {net->cfg.handshake_timeout_ms / 1000,
                         (net->cfg.handshake_timeout_ms % 1000) * 1000};
    evtimer_add(conn->hs_timer, &ht);
    conn->next = net->conns;
    net->conns = conn;

    struct buf hello = BUF_INIT;
    net_hs_hello(&conn->hs, &hello);
    conn_write_frame(conn, NET_FRAME_HELLO, 0, hello.data, hello.len);
    buf_free(&hello);
    return conn;
}

/* ---- peers ---------------------------------------------------------- */

static void peer_redial_cb(evutil_socket_t fd, short what, void *arg)
{
    peer_dial(arg);
}

static struct net_peer *peer_get(struct net *net, uint64_t id)
{
    struct net_peer *peer = net_find(net, id);
    if (peer != NULL || net->npeers >= NET_MAX_PEERS)
        return peer;
    peer = pb_xcalloc(1, sizeof(*peer));
    peer->net = net;
    peer->id = id;
    peer->st.node_id = id;
    peer->backoff_ms = net->cfg.backoff_min_ms;
    peer->redial = evtimer_new(net->base, peer_redial_cb, peer);
    if (peer->redial == NULL) {
        log_err("net: out of memory for a timer");
        abort();
    }
    peer->next = net->peers;
    net->peers = peer;
    net->npeers++;
    return peer;
}

/* Starts an outbound connection to sa (addr names it in logs); NULL if it
 * could not even start (the caller arms its redial timer). */
static struct net_conn *net_dial(struct net *net, const char *addr, uint64_t expect_id,
                                 const struct sockaddr *sa, socklen_t salen)
{
    evutil_socket_t fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        log_warning("net: socket: %s", strerror(errno));
        return NULL;
    }
    net_sockopts(net, fd);
    struct net_conn *conn = conn_new(net, fd, true, expect_id, addr);
    if (bufferevent_socket_connect(conn->bev, sa, (int)salen) < 0) {
        /* Not linked to its peer or seed yet: a quiet close, no redial. */
        conn->dial_id = 0;
        conn_close(conn, LOG_LEVEL_DEBUG, "connect failed");
        return NULL;
    }
    return conn;
}

static void peer_on_resolved(void *arg, int rc, const struct sockaddr *sa, socklen_t len)
{
    struct net_peer *peer = arg;
    peer->resolving = NULL;
    if (rc < 0)
        log_debug("net: cannot resolve %s: %s", peer->addr, strerror(-rc));
    else if (!peer->partitioned && peer->conn == NULL && peer->dialing == NULL)
        peer->dialing = net_dial(peer->net, peer->addr, peer->id, sa, len);
    if (peer->dialing == NULL)
        peer_schedule_redial(peer);
}

/* Looks the address up again at every dial (a host name may have moved):
 * off the loop for a name (resolve.h), then dials. */
static void peer_dial(struct net_peer *peer)
{
    if (peer->addr == NULL || peer->partitioned || peer->conn != NULL || peer->dialing != NULL ||
        peer->resolving != NULL)
        return;
    struct sockaddr_storage ss;
    socklen_t len = 0;
    int rc = net_resolve_start(&peer->resolving, peer->net->base, peer->addr, peer->dials++, &ss,
                               &len, peer_on_resolved, peer);
    if (rc == -EINPROGRESS)
        return;
    if (rc == 0)
        peer->dialing = net_dial(peer->net, peer->addr, peer->id, (struct sockaddr *)&ss, len);
    else
        log_debug("net: cannot resolve %s: %s", peer->addr, strerror(-rc));
    if (peer->dialing == NULL)
        peer_schedule_redial(peer);
}

static void seed_on_resolved(void *arg, int rc, const struct sockaddr *sa, socklen_t len)
{
    struct net_seed *seed = arg;
    seed->resolving = NULL;
    if (rc < 0)
        log_debug("net: cannot resolve %s: %s", seed->addr, strerror(-rc));
    else
        seed->dialing = net_dial(seed->net, seed->addr, 0, sa, len);
    if (seed->dialing == NULL)
        net_arm_redial(seed->net, seed->redial, &seed->backoff_ms);
    else
        seed->dialing->seed = seed;
}

static void seed_dial(struct net_seed *seed)
{
    if (seed->dialing != NULL || seed->resolving != NULL)
        return;
    struct sockaddr_storage ss;
    socklen_t len = 0;
    int rc = net_resolve_start(&seed->resolving, seed->net->base, seed->addr, seed->dials++, &ss,
                               &len, seed_on_resolved, seed);
    if (rc == -EINPROGRESS)
        return;
    seed_on_resolved(seed, rc, (struct sockaddr *)&ss, len);
}

static void seed_redial_cb(evutil_socket_t fd, short what, void *arg)
{
    seed_dial(arg);
}

/*
 * Hands bulk frames to the active link while its output buffer is empty, so
 * a control frame never waits behind more than one bulk frame in user space.
 * may_drain: called from the write callback, so on_drain may run.
 */
static void peer_pump(struct net_peer *peer, bool may_drain)
{
    struct net *net = peer->net;
    struct net_conn *conn = peer->conn;
    bool popped = false;
    if (conn == NULL)
        return;
    struct evbuffer *out = bufferevent_get_output(conn->bev);
    while (peer->bulk_head != NULL && evbuffer_get_length(out) == 0) {
        struct net_bulk_msg *m = peer->bulk_head;
        size_t chunk = PB_MIN(NET_BULK_FRAME, m->len - m->off);
        uint8_t flags = NET_FRAME_F_BULK;
        if (m->off + chunk < m->len)
            flags |= NET_FRAME_F_MORE;
        m->refs++;
        conn_write_frame_ref(conn, m->type, flags, m->data + m->off, chunk, bulk_frame_done, m);
        m->off += chunk;
        if (m->off == m->len) {
            peer->bulk_head = m->next;
            if (peer->bulk_head == NULL)
                peer->bulk_tail = NULL;
            peer->bulk_bytes -= m->len;
            bulk_unref(m);
            popped = true;
        }
    }
    if (may_drain && popped && peer->want_drain &&
        peer->bulk_bytes <= net->cfg.bulk_queue_max / 2) {
        peer->want_drain = false;
        if (net->cfg.cb.on_drain != NULL)
            net->cfg.cb.on_drain(net->cfg.cb_arg, peer->id);
    }
}

static void peer_free(struct net_peer *peer)
{
    net_resolve_cancel(peer->resolving);
    peer_bulk_clear(peer);
    event_free(peer->redial);
    free(peer->addr);
    free(peer);
}

/* ---- listener ------------------------------------------------------- */

static void net_format_addr(const struct sockaddr *sa, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        port = ntohs(s4->sin_port);
        snprintf(out, n, "%s:%u", host, port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
        port = ntohs(s6->sin6_port);
        snprintf(out, n, "[%s]:%u", host, port);
    } else {
        snprintf(out, n, "?");
    }
}

static void net_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                          int salen, void *arg)
{
    struct net *net = arg;
    char desc[80];
    net_format_addr(sa, desc, sizeof(desc));
    net->stats.accepted++;
    if (net->npending_in >= net->cfg.max_pending) {
        net->stats.refused++;
        log_warning("net: refusing %s: %u connections already authenticating", desc,
                    net->npending_in);
        evutil_closesocket(fd);
        return;
    }
    net_sockopts(net, fd);
    struct net_conn *conn = conn_new(net, fd, false, 0, desc);
    conn->pending_in = true;
    net->npending_in++;
}

static void net_accept_retry(evutil_socket_t fd, short what, void *arg)
{
    struct net *net = arg;
    if (net->listener != NULL)
        evconnlistener_enable(net->listener);
}

static void net_accept_error(struct evconnlistener *l, void *arg)
{
    struct net *net = arg;
    int e = EVUTIL_SOCKET_ERROR();
    log_warning("net: accept: %s; pausing the listener", evutil_socket_error_to_string(e));
    evconnlistener_disable(l);
    struct timeval tv = {NET_ACCEPT_RETRY_MS / 1000, 0};
    evtimer_add(net->accept_retry, &tv);
}

static int net_listener_set(struct net *net, struct evconnlistener *l, struct pb_error *err)
{
    if (l == NULL)
        return pb_error_set(err, -EIO, "net: cannot listen on the given socket");
    evconnlistener_set_error_cb(l, net_accept_error);
    net->listener = l;
    return 0;
}

int net_listen(struct net *net, const char *hostport, struct pb_error *err)
{
    char host[256];
    char port[8];
    uint16_t p;
    if (net->listener != NULL)
        return pb_error_set(err, -EBUSY, "net: already listening");
    if (pb_split_host_port(hostport, host, sizeof(host), &p) < 0) {
        /* pb_split_host_port refuses port 0; allow it to pick a free port. */
        const char *colon = strrchr(hostport, ':');
        if (colon == NULL || strcmp(colon, ":0") != 0 ||
            (size_t)(colon - hostport) >= sizeof(host) || colon == hostport)
            return pb_error_set(err, -EINVAL, "net: bad listen address '%s'", hostport);
        size_t hl = (size_t)(colon - hostport);
        memcpy(host, hostport, hl);
        host[hl] = '\0';
        if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
            memmove(host, host + 1, hl - 2);
            host[hl - 2] = '\0';
        }
        p = 0;
    }
    snprintf(port, sizeof(port), "%u", (unsigned)p);
    struct addrinfo hints;
    struct addrinfo *ai = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr != 0 || ai == NULL)
        return pb_error_set(err, -EINVAL, "net: cannot resolve listen address '%s': %s", hostport,
                            gai_strerror(gr));
    struct evconnlistener *l = evconnlistener_new_bind(
            net->base, net_accept_cb, net,
            LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_REUSEABLE, -1, ai->ai_addr,
            (int)ai->ai_addrlen);
    int e = errno;
    freeaddrinfo(ai);
    if (l == NULL)
        return pb_error_set(err, e ? -e : -EIO, "net: cannot listen on %s: %s", hostport,
                            strerror(e));
    return net_listener_set(net, l, err);
}

int net_listen_fd(struct net *net, int fd, struct pb_error *err)
{
    if (net->listener != NULL)
        return pb_error_set(err, -EBUSY, "net: already listening");
    if (evutil_make_socket_nonblocking(fd) < 0)
        return pb_error_set(err, -EINVAL, "net: listen fd %d is not usable", fd);
    /* backlog 0: the socket is already listening (event2/listener.h). */
    struct evconnlistener *l = evconnlistener_new(
            net->base, net_accept_cb, net, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
    return net_listener_set(net, l, err);
}

uint16_t net_local_port(const struct net *net)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (net->listener == NULL ||
        getsockname(evconnlistener_get_fd(net->listener), (struct sockaddr *)&ss, &len) < 0)
        return 0;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

/* ---- public API ----------------------------------------------------- */

struct net *net_new(struct event_base *base, const struct net_config *cfg, struct pb_error *err)
{
    if (cfg->node_id == 0) {
        pb_error_set(err, -EINVAL, "net: node id 0 is reserved");
        return NULL;
    }
    if (cfg->node_name == NULL || !net_hs_name_valid(cfg->node_name, strlen(cfg->node_name))) {
        pb_error_set(err, -EINVAL, "net: node name must be 1..%d printable characters",
                     NET_NAME_MAX);
        return NULL;
    }
    if (cfg->secret == NULL || cfg->secret_len < NET_SECRET_MIN ||
        cfg->secret_len > NET_SECRET_MAX) {
        pb_error_set(err, -EINVAL, "net: the cluster secret must be %d..%d bytes", NET_SECRET_MIN,
                     NET_SECRET_MAX);
        return NULL;
    }
    struct net *net = pb_xcalloc(1, sizeof(*net));
    net->base = base;
    net->cfg = *cfg;
    struct net_config *c = &net->cfg;
    if (c->bulk_queue_max == 0)
        c->bulk_queue_max = NET_DEF_BULK_QUEUE;
    if (c->control_queue_max == 0)
        c->control_queue_max = NET_DEF_CONTROL_QUEUE;
    if (c->handshake_timeout_ms == 0)
        c->handshake_timeout_ms = NET_DEF_HS_TIMEOUT;
    if (c->write_timeout_ms == 0)
        c->write_timeout_ms = NET_DEF_WRITE_TIMEOUT;
    if (c->backoff_min_ms == 0)
        c->backoff_min_ms = NET_DEF_BACKOFF_MIN;
    if (c->backoff_max_ms == 0)
        c->backoff_max_ms = NET_DEF_BACKOFF_MAX;
    if (c->backoff_max_ms < c->backoff_min_ms)
        c->backoff_max_ms = c->backoff_min_ms;
    if (c->max_pending == 0)
        c->max_pending = NET_DEF_MAX_PENDING;
    net->name = pb_xstrdup(cfg->node_name);
    net->secret = pb_xmalloc(cfg->secret_len);
    memcpy(net->secret, cfg->secret, cfg->secret_len);
    c->node_name = net->name;
    c->secret = net->secret;
    c->cluster_id = NULL;
    net->local.node_id = cfg->node_id;
    net->local.node_name = net->name;
    net->local.secret = net->secret;
    net->local.secret_len = cfg->secret_len;
    net->local.version_max = cfg->proto_max;
    if (cfg->cluster_id != NULL) {
        net->local.has_cluster_id = true;
        memcpy(net->local.cluster_id, cfg->cluster_id, NET_CLUSTER_ID_LEN);
    }
    net->rng = cfg->seed;
    if (net->rng == 0 && RAND_bytes((uint8_t *)&net->rng, sizeof(net->rng)) != 1)
        net_crypto_failed();
    if (net->rng == 0)
        net->rng = 0x9E3779B97F4A7C15ull;
    net->reaper = event_new(base, -1, 0, net_reap, net);
    net->accept_retry = evtimer_new(base, net_accept_retry, net);
    net->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (net->reaper == NULL || net->accept_retry == NULL || net->mac == NULL) {
        pb_error_set(err, -ENOMEM, "net: cannot set up (libevent or libcrypto)");
        net_free(net);
        return NULL;
    }
    return net;
}

void net_free(struct net *net)
{
    if (net == NULL)
        return;
    while (net->conns != NULL) {
        struct net_conn *c = net->conns;
        net->conns = c->next;
        conn_destroy(c);
    }
    while (net->dead != NULL) {
        struct net_conn *c = net->dead;
        net->dead = c->next;
        conn_destroy(c);
    }
    while (net->peers != NULL) {
        struct net_peer *p = net->peers;
        net->peers = p->next;
        peer_free(p);
    }
    while (net->seeds != NULL) {
        struct net_seed *sd = net->seeds;
        net->seeds = sd->next;
        seed_free(sd);
    }
    if (net->listener != NULL)
        evconnlistener_free(net->listener);
    if (net->reaper != NULL)
        event_free(net->reaper);
    if (net->accept_retry != NULL)
        event_free(net->accept_retry);
    EVP_MAC_free(net->mac);
    if (net->secret != NULL) {
        OPENSSL_cleanse(net->secret, net->cfg.secret_len);
        free(net->secret);
    }
    free(net->name);
    free(net);
}

void net_set_cluster_id(struct net *net, const uint8_t cluster_id[NET_CLUSTER_ID_LEN])
{
    net->local.has_cluster_id = true;
    memcpy(net->local.cluster_id, cluster_id, NET_CLUSTER_ID_LEN);
}

int net_peer_add(struct net *net, uint64_t node_id, const char *hostport, struct pb_error *err)
{
    char host[256];
    uint16_t port;
    if (node_id == 0 || node_id == net->cfg.node_id)
        return pb_error_set(err, -EINVAL, "net: bad peer id %llu", (unsigned long long)node_id);
    if (hostport == NULL || strlen(hostport) >= sizeof(((struct net_peer_stats *)0)->addr) ||
        pb_split_host_port(hostport, host, sizeof(host), &port) < 0)
        return pb_error_set(err, -EINVAL, "net: bad peer address '%s' (want host:port)",
                            hostport ? hostport : "(null)");
    struct net_peer *peer = peer_get(net, node_id);
    if (peer == NULL)
        return pb_error_set(err, -ENOSPC, "net: too many peers");
    if (peer->resolving != NULL && strcmp(peer->addr, hostport) != 0) {
        net_resolve_cancel(peer->resolving); /* it looks up the old address */
        peer->resolving = NULL;
    }
    free(peer->addr);
    peer->addr = pb_xstrdup(hostport);
    snprintf(peer->st.addr, sizeof(peer->st.addr), "%s", hostport);
    if (peer->conn == NULL && peer->dialing == NULL && peer->resolving == NULL) {
        evtimer_del(peer->redial);
        peer->backoff_ms = net->cfg.backoff_min_ms;
        peer_dial(peer);
    }
    return 0;
}

int net_seed_add(struct net *net, const char *hostport, struct pb_error *err)
{
    char host[256];
    uint16_t port;
    if (hostport == NULL || strlen(hostport) >= sizeof(((struct net_peer_stats *)0)->addr) ||
        pb_split_host_port(hostport, host, sizeof(host), &port) < 0)
        return pb_error_set(err, -EINVAL, "net: bad seed address '%s' (want host:port)",
                            hostport ? hostport : "(null)");
    struct net_seed *seed = pb_xcalloc(1, sizeof(*seed));
    seed->net = net;
    seed->addr = pb_xstrdup(hostport);
    seed->backoff_ms = net->cfg.backoff_min_ms;
    seed->redial = evtimer_new(net->base, seed_redial_cb, seed);
    if (seed->redial == NULL) {
        log_err("net: out of memory for a timer");
        abort();
    }
    seed->next = net->seeds;
    net->seeds = seed;
    seed_dial(seed);
    return 0;
}

int net_peer_remove(struct net *net, uint64_t node_id)
{
    struct net_peer **pp = &net->peers;
    while (*pp != NULL && (*pp)->id != node_id)
        pp = &(*pp)->next;
    struct net_peer *peer = *pp;
    if (peer == NULL)
        return -ENOENT;
    *pp = peer->next;
    net->npeers--;
    if (peer->conn != NULL) {
        struct net_conn *c = peer->conn;
        c->peer = NULL;
        peer->conn = NULL;
        conn_close(c, LOG_LEVEL_INFO, "peer removed");
    }
    if (peer->dialing != NULL) {
        struct net_conn *c = peer->dialing;
        peer->dialing = NULL;
        c->dial_id = 0;
        conn_close(c, LOG_LEVEL_DEBUG, NULL);
    }
    peer_free(peer);
    return 0;
}

/* Checks and queues one message; takes data (malloc()ed) when take, else
 * copies it. */
static int net_send_common(struct net *net, uint64_t node_id, enum net_class cls, uint8_t type,
                           const void *data, size_t len, bool take)
{
    if (type < NET_FRAME_USER_MIN || (cls != NET_CLASS_CONTROL && cls != NET_CLASS_BULK))
        return -EINVAL;
    if (len > 0 && data == NULL)
        return -EINVAL;
    if (cls == NET_CLASS_CONTROL && len > NET_FRAME_MAX_PAYLOAD)
        return -EMSGSIZE;
    if (cls == NET_CLASS_BULK && (len > NET_MSG_MAX || len > net->cfg.bulk_queue_max))
        return -EMSGSIZE;
    struct net_peer *peer = net_find(net, node_id);
    if (peer == NULL)
        return -ENOENT;
    if (peer->partitioned) {
        net->stats.frames_dropped++;
        return -ENOTCONN;
    }
    struct net_conn *conn = peer->conn;
    if (conn == NULL)
        return -ENOTCONN;
    if (cls == NET_CLASS_CONTROL) {
        if (evbuffer_get_length(bufferevent_get_output(conn->bev)) + len >
            net->cfg.control_queue_max)
            return -ENOBUFS;
        if (take)
            conn_write_frame_ref(conn, type, 0, data, len, taken_frame_done, NULL);
        else
            conn_write_frame(conn, type, 0, data, len);
        return 0;
    }
    if (peer->bulk_bytes + len > net->cfg.bulk_queue_max) {
        peer->want_drain = true;
        return -ENOBUFS;
    }
    struct net_bulk_msg *m = pb_xmalloc(sizeof(*m));
    m->next = NULL;
    m->type = type;
    m->refs = 1;
    m->len = len;
    m->off = 0;
    if (take) {
        m->data = (uint8_t *)(uintptr_t)data;
    } else {
        m->data = len > 0 ? pb_xmalloc(len) : NULL;
        if (len > 0)
            memcpy(m->data, data, len);
    }
    if (peer->bulk_tail != NULL)
        peer->bulk_tail->next = m;
    else
        peer->bulk_head = m;
    peer->bulk_tail = m;
    peer->bulk_bytes += len;
    peer_pump(peer, false);
    return 0;
}

int net_send(struct net *net, uint64_t node_id, enum net_class cls, uint8_t type, const void *data,
             size_t len)
{
    return net_send_common(net, node_id, cls, type, data, len, false);
}

int net_send_take(struct net *net, uint64_t node_id, enum net_class cls, uint8_t type, void *data,
                  size_t len)
{
    int rc = net_send_common(net, node_id, cls, type, data, len, true);
    if (rc < 0)
        free(data);
    return rc;
}

int net_set_partition(struct net *net, uint64_t node_id, bool partitioned)
{
    if (node_id == 0 || node_id == net->cfg.node_id)
        return -EINVAL;
    struct net_peer *peer = peer_get(net, node_id);
    if (peer == NULL)
        return -ENOSPC;
    if (peer->partitioned == partitioned)
        return 0;
    peer->partitioned = partitioned;
    peer->st.partitioned = partitioned;
    if (partitioned) {
        log_notice("net: partitioning node %llu (fault injection)", (unsigned long long)node_id);
        evtimer_del(peer->redial);
        net_resolve_cancel(peer->resolving);
        peer->resolving = NULL;
        if (peer->dialing != NULL)
            conn_close(peer->dialing, LOG_LEVEL_DEBUG, NULL);
        if (peer->conn != NULL)
            conn_close(peer->conn, LOG_LEVEL_NOTICE, "partitioned (fault injection)");
        return 0;
    }
    log_notice("net: healing partition to node %llu", (unsigned long long)node_id);
    peer->backoff_ms = net->cfg.backoff_min_ms;
    peer_dial(peer);
    return 0;
}

int net_peer_stats(const struct net *net, uint64_t node_id, struct net_peer_stats *out)
{
    const struct net_peer *peer = net_find(net, node_id);
    if (peer == NULL)
        return -ENOENT;
    *out = peer->st;
    out->bulk_queued = peer->bulk_bytes;
    out->out_queued =
            peer->conn != NULL ? evbuffer_get_length(bufferevent_get_output(peer->conn->bev)) : 0;
    return 0;
}

size_t net_peer_bulk_queued(const struct net *net, uint64_t node_id)
{
    const struct net_peer *peer = net_find(net, node_id);
    return peer != NULL ? peer->bulk_bytes : 0;
}

size_t net_peer_ids(const struct net *net, uint64_t *ids, size_t max)
{
    size_t n = 0;
    for (const struct net_peer *p = net->peers; p != NULL; p = p->next, n++)
        if (n < max)
            ids[n] = p->id;
    return n;
}

void net_get_stats(const struct net *net, struct net_stats *out)
{
    *out = net->stats;
}
